"""Push HF-named tensors into a running SGLang server, by one of three routes:

- tensor (same node): tensors go in buckets of at most `bucket_bytes` via /update_weights_from_tensor,
  serialized by SGLang's MultiprocessingSerializer: CUDA tensors as CUDA IPC handles (the server reads the
  trainer's GPU memory), CPU tensors through shared memory (torch multiprocessing, file_system strategy);
- distributed: the trainer and the server form a process group once (NCCL on GPUs, gloo on CPUs); tensors
  are broadcast bucket by bucket while /update_weights_from_distributed receives them;
- disk: the model is written as safetensors and read back by /update_weights_from_disk (the fallback).

Buckets are built as the stream is read, on the route's device, and dropped once sent: at most one is alive.
The first two routes sit between /begin_weight_update and /end_weight_update (SGLang 0.5.23's protocol);
every route names the new weight version and flushes the cache.
"""
from concurrent.futures import ThreadPoolExecutor
from typing import Iterable, Iterator

import requests
import torch

from checkpoint_tools.hf_files import write_hf_dir
from megatron_opd.parallel.distributed import backend_for
from megatron_opd.rollout.engine import RolloutError
from megatron_opd.rollout.sglang_server import SGLangConfigError

NamedTensors = Iterable[tuple[str, torch.Tensor]]
# The distributed route's HTTP calls block until the collective they wait for is done: run them beside it.
_BESIDE = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sglang-sync")


def post(url: str, path: str, body: dict, timeout: float) -> dict:
    response = requests.post(url + path, json=body, timeout=timeout)
    if response.status_code != 200:
        raise RolloutError(f"SGLang {path} answered HTTP {response.status_code}: {response.text[:500]}")
    try:
        result = response.json()
    except ValueError:
        return {}
    if isinstance(result, dict) and result.get("success") is False:
        raise RolloutError(f"SGLang {path} failed: {result.get('message', result)}")
    return result


def served_version(url: str, timeout: float) -> str:
    """The weight version the server answers under (read without touching the model or its KV cache)."""
    response = requests.get(url + "/model_info", timeout=timeout)
    if response.status_code != 200:
        raise RolloutError(f"SGLang /model_info answered HTTP {response.status_code}: {response.text[:500]}")
    return response.json()["weight_version"]


def buckets(named_tensors: NamedTensors, bucket_bytes: int, device: torch.device
            ) -> Iterator[tuple[list[tuple[str, torch.Tensor]], bool]]:
    """(bucket on `device`, is it the last) as the stream is read: a bucket is only built once the one
    before it has been handed on, and is known to be the last when the stream ends."""
    bucket, size = [], 0
    for name, tensor in named_tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if bucket and size + nbytes > bucket_bytes:
            yield bucket, False
            bucket, size = [], 0
        bucket.append((name, tensor.detach().to(device).contiguous()))
        size += nbytes
    if bucket:
        yield bucket, True


def _version_fields(last: bool, version: str) -> dict:
    """The last bucket flushes the cache and names the new version; the others do neither."""
    return {"flush_cache": last, **({"weight_version": version} if last else {})}


def sync_from_tensor(url: str, named_tensors: NamedTensors, version: str, bucket_bytes: int, timeout: float,
                     server_tp: int, device: torch.device) -> None:
    from sglang.srt.utils import MultiprocessingSerializer

    if device.type == "cpu":
        torch.multiprocessing.set_sharing_strategy("file_system")
    post(url, "/begin_weight_update", {}, timeout)
    try:
        for bucket, last in buckets(named_tensors, bucket_bytes, device):
            if device.type == "cpu":
                # Sharing moves a CPU tensor's whole storage into shared memory in place: send copies, never
                # the storage of the trainer's parameters.
                bucket = [(name, tensor.clone()) for name, tensor in bucket]
            serialized = MultiprocessingSerializer.serialize(bucket, output_str=True)
            # Every TP rank of the server opens the same handles and keeps the slices it needs.
            post(url, "/update_weights_from_tensor",
                 {"serialized_named_tensors": [serialized] * server_tp, **_version_fields(last, version)}, timeout)
            del bucket, serialized  # the server has copied it: free it before the next one is built
    finally:
        post(url, "/end_weight_update", {}, timeout)
        if device.type == "cuda":
            torch.cuda.ipc_collect()  # blocks the server has let go of are freed now, not at the next send


class DistributedSync:
    """The trainer (rank 0, on `device`) and the server's TP ranks (1..server_tp) in one NCCL/gloo group."""

    def __init__(self, url: str, server_tp: int, timeout: float, group_name: str, device: torch.device):
        self.url, self.server_tp, self.timeout, self.group_name = url, server_tp, timeout, group_name
        self.device, self.backend = device, backend_for(device)
        self.group = None

    @staticmethod
    def check_placement(device: torch.device, base_gpu_id: int, server_tp: int) -> None:
        """NCCL cannot put two ranks of one communicator on one GPU: the trainer's GPU must not be the server's."""
        if device.type != "cuda":
            return
        trainer_gpu = device.index if device.index is not None else torch.cuda.current_device()
        server_gpus = range(base_gpu_id, base_gpu_id + server_tp)
        if trainer_gpu in server_gpus:
            raise SGLangConfigError(
                f"rollout.sglang.base_gpu_id={base_gpu_id} with rollout.sglang.tensor_parallel={server_tp} puts the "
                f"server on GPUs {list(server_gpus)}, which include the trainer's rank-0 GPU cuda:{trainer_gpu}; "
                f"rollout.sglang.weight_sync=distributed joins both in one NCCL group, which cannot hold two ranks "
                f"on one GPU: set rollout.sglang.base_gpu_id past the trainer's GPUs, or use weight_sync=tensor")

    def connect(self) -> None:
        from sglang.srt.utils import init_custom_process_group

        from megatron_opd.parallel import free_port

        port = free_port()
        body = {"master_address": "127.0.0.1", "master_port": port, "rank_offset": 1,
                "world_size": self.server_tp + 1, "group_name": self.group_name, "backend": self.backend}
        answer = _BESIDE.submit(post, self.url, "/init_weights_update_group", body, self.timeout)
        self.group = init_custom_process_group(backend=self.backend, init_method=f"tcp://127.0.0.1:{port}",
                                               world_size=self.server_tp + 1, rank=0, group_name=self.group_name)
        answer.result()

    def sync(self, named_tensors: NamedTensors, version: str, bucket_bytes: int) -> None:
        if self.group is None:
            self.connect()
        post(self.url, "/begin_weight_update", {}, self.timeout)
        try:
            for bucket, last in buckets(named_tensors, bucket_bytes, self.device):
                body = {"names": [n for n, _ in bucket], "dtypes": [str(t.dtype).removeprefix("torch.") for _, t in bucket],
                        "shapes": [list(t.shape) for _, t in bucket], "group_name": self.group_name,
                        **_version_fields(last, version)}
                answer = _BESIDE.submit(post, self.url, "/update_weights_from_distributed", body, self.timeout)
                for _, tensor in bucket:
                    torch.distributed.broadcast(tensor, src=0, group=self.group)
                answer.result()
                del bucket  # received: free it before the next one is built
        finally:
            post(self.url, "/end_weight_update", {}, self.timeout)

    def close(self) -> None:
        if self.group is not None:
            try:
                post(self.url, "/destroy_weights_update_group", {"group_name": self.group_name}, self.timeout)
            except (RolloutError, requests.RequestException):
                pass  # the server may already be gone; the local group goes either way
            torch.distributed.destroy_process_group(self.group)
            self.group = None


def sync_from_disk(url: str, named_tensors: NamedTensors, version: str, directory: str, metadata_dir: str,
                   timeout: float) -> None:
    """Write a complete HF checkpoint (weights + the metadata files of `metadata_dir`) and load it."""
    write_hf_dir(named_tensors, directory, metadata_dir)
    post(url, "/update_weights_from_disk", {"model_path": directory, "weight_version": version}, timeout)
