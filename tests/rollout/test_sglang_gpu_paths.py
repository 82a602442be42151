"""The SGLang engine's GPU-only decisions, checked without a GPU: the server's command line per device, the
config's and the distributed route's refusals, the lazy weight buckets, and the memory release/resume
sequence of a colocated engine, spoken to a FAKE SGLang HTTP server on loopback (a real CPU server has no
memory saver: /release_memory_occupation kills it)."""
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from megatron_opd.rollout import weight_sync
from megatron_opd.rollout.engine import RolloutError, SamplingParams
from megatron_opd.rollout.sglang_engine import SGLangEngine
from megatron_opd.rollout.sglang_server import SGLangConfig, SGLangServer
from tests.sglang_servers import sglang_config

GPU = torch.device("cuda", 0)
CPU = torch.device("cpu")


@pytest.mark.parametrize("key, value", [("mem_fraction_static", 1.2), ("mem_fraction_static", 0.0),
                                        ("base_gpu_id", -1), ("tensor_parallel", 0), ("weight_sync", "nfs"),
                                        ("bucket_bytes", 0), ("max_total_tokens", 0)])
def test_bad_values_are_refused_naming_the_key(key, value):
    with pytest.raises(ValueError, match=rf"^rollout\.sglang\.{key}={value!r}: "):
        SGLangConfig(**{key: value})


def test_server_command_follows_the_device(tmp_path):
    config = SGLangConfig(base_gpu_id=2, mem_fraction_static=0.4, colocated=True, tensor_parallel=2)
    gpu, cpu = SGLangServer(str(tmp_path), config, GPU), SGLangServer(str(tmp_path), config, CPU)
    gpu_cmd, cpu_cmd = gpu.command(), cpu.command()

    def flag(cmd, name):
        return cmd[cmd.index(name) + 1] if name in cmd else None

    assert flag(gpu_cmd, "--device") == "cuda" and flag(gpu_cmd, "--base-gpu-id") == "2"
    assert flag(gpu_cmd, "--mem-fraction-static") == "0.4" and "--enable-memory-saver" in gpu_cmd
    assert "--attention-backend" not in gpu_cmd and "--max-total-tokens" not in gpu_cmd
    assert "SGLANG_USE_CPU_ENGINE" not in gpu._env()
    assert flag(cpu_cmd, "--device") == "cpu" and flag(cpu_cmd, "--attention-backend") == "torch_native"
    assert flag(cpu_cmd, "--max-total-tokens") == "8192" and flag(cpu_cmd, "--mem-fraction-static") == "0.4"
    assert "--base-gpu-id" not in cpu_cmd and "--enable-memory-saver" not in cpu_cmd
    assert cpu._env()["SGLANG_USE_CPU_ENGINE"] == "1"


def test_distributed_route_refuses_a_server_on_the_trainers_gpu(tmp_path):
    shared = SGLangConfig(weight_sync="distributed", base_gpu_id=0, tensor_parallel=2)
    with pytest.raises(ValueError, match=r"rollout\.sglang\.base_gpu_id=0 with rollout\.sglang\.tensor_parallel=2 "
                                         r".*GPUs \[0, 1\].*cuda:1"):
        SGLangEngine(str(tmp_path), shared, torch.device("cuda", 1))
    SGLangEngine(str(tmp_path), SGLangConfig(weight_sync="distributed", base_gpu_id=2, tensor_parallel=2),
                 torch.device("cuda", 1))
    SGLangEngine(str(tmp_path), shared, CPU)  # gloo: processes, not GPUs


def test_buckets_are_built_as_the_stream_is_read():
    read = []

    def stream():
        for i in range(5):
            read.append(i)
            yield f"w{i}", torch.full((4,), float(i))  # 16 bytes each

    seen = []
    for bucket, last in weight_sync.buckets(stream(), bucket_bytes=32, device=CPU):
        seen.append(([name for name, _ in bucket], last, len(read)))
    # A bucket is handed on as soon as the next tensor does not fit: never more than one tensor read ahead.
    assert seen == [(["w0", "w1"], False, 3), (["w2", "w3"], False, 5), (["w4"], True, 5)]


class FakeSGLang(BaseHTTPRequestHandler):
    """FAKE: answers the few SGLang endpoints the engine uses, records every request and keeps the tensors it
    is sent."""
    requests: list = []
    received: dict = {}
    version = "0"

    def _answer(self, body) -> None:
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        self.requests.append(("GET", self.path, None))
        self._answer({"weight_version": FakeSGLang.version} if self.path == "/model_info" else {})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])) or b"null")
        self.requests.append(("POST", self.path, body.get("tags") if isinstance(body, dict) else None))
        if self.path in ("/update_weights_from_disk", "/update_weights_from_tensor") and "weight_version" in body:
            FakeSGLang.version = body["weight_version"]
        if self.path == "/update_weights_from_tensor":
            from sglang.srt.utils import MultiprocessingSerializer

            for name, tensor in MultiprocessingSerializer.deserialize(body["serialized_named_tensors"][0]):
                FakeSGLang.received[name] = tensor.clone()
        if self.path == "/generate":
            meta = {"weight_version": FakeSGLang.version, "finish_reason": {"type": "length"},
                    "output_token_logprobs": [[-0.5, 7, None]]}
            self._answer({"output_ids": [7], "meta_info": meta})
        else:
            self._answer(None)  # what SGLang's memory endpoints answer

    def log_message(self, *args):
        pass


@pytest.fixture
def fake_sglang():
    FakeSGLang.requests, FakeSGLang.received, FakeSGLang.version = [], {}, "0"
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeSGLang)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def _engine_on_fake(port, model_dir, device, keep_snapshot=True):
    engine = SGLangEngine(model_dir, sglang_config(colocated=True, weight_sync="disk", keep_snapshot=keep_snapshot),
                          device)
    engine.server.port = port
    return engine


def test_colocated_gpu_engine_frees_memory_around_the_update(fake_sglang, tmp_path):
    engine = _engine_on_fake(fake_sglang, str(tmp_path), GPU)
    weights = [("model.embed_tokens.weight", torch.randn(8, 4)), ("lm_head.weight", torch.randn(8, 4))]
    one_token = SamplingParams(max_new_tokens=1)
    engine.sleep()
    engine.sleep()  # already asleep: nothing to send
    engine.update_weights(iter(weights), 1)
    engine.wake_up()
    engine.generate([[1, 2]], one_token)
    engine.sleep()
    # No push since: generate takes the memory back itself and restores the weights from the host copy.
    samples = engine.generate([[1, 2]], one_token)
    assert [(method, path, tags) for method, path, tags in FakeSGLang.requests] == [
        ("POST", "/release_memory_occupation", ["weights", "kv_cache", "cuda_graph"]),
        ("POST", "/resume_memory_occupation", ["weights"]),  # only what loading the weights needs
        ("POST", "/update_weights_from_disk", None),
        ("GET", "/model_info", None),
        ("POST", "/resume_memory_occupation", ["kv_cache", "cuda_graph"]),
        ("POST", "/generate", None),
        ("POST", "/release_memory_occupation", ["weights", "kv_cache", "cuda_graph"]),
        ("POST", "/resume_memory_occupation", ["weights", "kv_cache", "cuda_graph"]),
        ("POST", "/update_weights_from_disk", None),
        ("GET", "/model_info", None),
        ("POST", "/generate", None),
    ]
    assert samples[0].weight_version == engine.weight_version == 1
    # The restore copy is in host memory and independent of the pushed tensors.
    for (name, kept), (_, pushed) in zip(engine._snapshot, weights):
        assert kept.device.type == "cpu" and torch.equal(kept, pushed)
        assert kept.untyped_storage().data_ptr() != pushed.untyped_storage().data_ptr()


def test_woken_without_a_push_or_a_copy_is_an_error(fake_sglang, tmp_path):
    engine = _engine_on_fake(fake_sglang, str(tmp_path), GPU, keep_snapshot=False)
    engine.update_weights([("lm_head.weight", torch.randn(8, 4))], 1)
    engine.sleep()
    with pytest.raises(RolloutError, match=r"woken without a weight push since sleep\(\).*keep_snapshot=false"):
        engine.wake_up()


def test_cpu_tensor_route_sends_copies_not_the_trainers_storage(fake_sglang, tmp_path):
    engine = SGLangEngine(str(tmp_path), sglang_config(weight_sync="tensor", bucket_bytes=80), CPU)
    engine.server.port = fake_sglang
    parameters = torch.arange(40.0)  # one storage holding every weight, like the trainer's parameter buffer
    weights = [(f"w{i}", parameters[i * 10:(i + 1) * 10]) for i in range(4)]
    engine.update_weights(iter(weights), 1)
    assert not parameters.is_shared()  # sharing a view would have moved the whole buffer into shared memory
    assert {name: t.tolist() for name, t in FakeSGLang.received.items()} == {n: t.tolist() for n, t in weights}
    assert [path for _, path, _ in FakeSGLang.requests].count("/update_weights_from_tensor") == 2  # 40 B each, 80 B a bucket


def test_colocated_cpu_engine_never_releases(fake_sglang, tmp_path):
    engine = _engine_on_fake(fake_sglang, str(tmp_path), CPU)
    engine.sleep()
    engine.wake_up()
    engine.generate([[1, 2]], SamplingParams(max_new_tokens=1))
    assert [path for _, path, _ in FakeSGLang.requests] == ["/generate"]
    assert "--enable-memory-saver" not in engine.server.command()
