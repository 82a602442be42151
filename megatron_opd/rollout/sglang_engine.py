"""The SGLang engine: student rollouts and teacher scoring over SGLang's HTTP API, weight sync after
every optimizer step, and recovery from a server that dies or stops answering (restart it, restore the
current weights, retry the interrupted batch a bounded number of times). A server colocated with the
trainer on its GPUs frees their memory while the trainer updates the model (sleep/wake_up)."""
import functools
import logging
import os
import tempfile
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, Iterator, Optional, TypeVar

import requests
import torch

from megatron_opd.models import load_arch
from megatron_opd.rollout import weight_sync
from megatron_opd.rollout.engine import (
    RolloutEngine, RolloutError, Sample, SamplingParams, ScoredSequence, StaleWeightsError)
from megatron_opd.rollout.sglang_server import SGLangConfig, SGLangServer, ServerAt, ServerStartError

log = logging.getLogger(__name__)
T = TypeVar("T")
_SERVER_GONE = (requests.ConnectionError, requests.Timeout, ConnectionError)
PADDING_ROW_BIAS = -1e4  # added to a logit: exp(-1e4) is 0 in any float format
# SGLang 0.5.23's memory regions (sglang.srt.constants.GPU_MEMORY_ALL_TYPES).
WEIGHTS = "weights"
MEMORY_TAGS = (WEIGHTS, "kv_cache", "cuda_graph")


def _copied_to_host(named_tensors: Iterable[tuple[str, torch.Tensor]], copies: list) -> Iterator:
    """Pass the stream on unchanged, keeping a host-memory copy of each tensor in `copies`."""
    for name, tensor in named_tensors:
        copies.append((name, tensor.detach().to("cpu", copy=True)))
        yield name, tensor


class SGLangEngine(RolloutEngine):
    def __init__(self, model_path: str, config: SGLangConfig, device: torch.device = torch.device("cpu"),
                 keep_snapshot: Optional[bool] = None, url: Optional[str] = None, url_key: str = "rollout.url"):
        """`url`: a server already running (named by the config key `url_key`), used and never started or
        stopped; None: the engine starts its own from `model_path`."""
        if config.weight_sync == "distributed":
            weight_sync.DistributedSync.check_placement(device, config.base_gpu_id, config.tensor_parallel)
        self.model_path, self.config, self.device = model_path, config, device
        self.server = SGLangServer(model_path, config, device) if url is None else ServerAt(url, config, url_key)
        if url is not None and not self.server.healthy():
            raise ServerStartError(f"{url_key}={url}: no SGLang server answers {self.server.url}/health; start one "
                                   f"there, or set {url_key}=null to have rank 0 start one")
        self.weight_version = 0
        self.restarts = 0
        # The last pushed weights in host memory, to restore a restarted server: never a second model on the GPU.
        self.keep_snapshot = config.keep_snapshot if keep_snapshot is None else keep_snapshot
        self._snapshot: list[tuple[str, torch.Tensor]] = []
        self._restorable = True  # a restarted server can be given the current weights (at first: its own)
        self._released: list[str] = []  # memory regions the server has given up, in MEMORY_TAGS order
        self._distributed = None
        self._sync_dir = None
        self._pool = ThreadPoolExecutor(max_workers=config.concurrency, thread_name_prefix="sglang-request")

    def start(self) -> None:
        self.server.start()
        self._released = []
        # A fresh server calls its weights "default"; name them by our version so responses can be checked.
        weight_sync.post(self.server.url, "/update_weight_version", {"new_version": str(self.weight_version)},
                         self.config.request_timeout_s)

    def stop(self) -> None:
        if self._distributed is not None:
            self._distributed.close()
            self._distributed = None
        self.server.stop()

    def healthy(self) -> bool:
        return self.server.healthy()

    @property
    def releases_memory(self) -> bool:
        # A CPU server has no memory saver: /release_memory_occupation kills it.
        return self.config.colocated and self.device.type == "cuda"

    def sleep(self) -> None:
        if not self.releases_memory or self._released:
            return

        def release():
            weight_sync.post(self.server.url, "/release_memory_occupation", {"tags": list(MEMORY_TAGS)},
                             self.config.request_timeout_s)
            self._released = list(MEMORY_TAGS)

        self._with_recovery("sleep", release)

    def wake_up(self) -> None:
        weights_lost = WEIGHTS in self._released  # released memory comes back uninitialised
        self._resume(MEMORY_TAGS)
        if weights_lost:  # nothing was pushed since sleep(): give the server the current weights again
            if not self._snapshot:
                raise RolloutError("the SGLang server was woken without a weight push since sleep() and there is no "
                                   "host copy to restore (rollout.sglang.keep_snapshot=false, or nothing pushed yet): "
                                   "push the weights (update_weights) before generating")
            self._with_recovery("weight restore", lambda: self._push(self._snapshot, self.weight_version))

    def _resume(self, wanted: tuple[str, ...]) -> None:
        def resume():
            tags = [tag for tag in self._released if tag in wanted]  # none after a restart: all memory is back
            if tags:
                weight_sync.post(self.server.url, "/resume_memory_occupation", {"tags": tags},
                                 self.config.request_timeout_s)
                self._released = [tag for tag in self._released if tag not in tags]

        self._with_recovery("wake-up", resume)

    def _post(self, body: dict) -> dict:
        return weight_sync.post(self.server.url, "/generate", body, self.config.request_timeout_s)

    def _with_recovery(self, what: str, attempt: Callable[[], T]) -> T:
        for tries in range(self.config.max_retries + 1):
            try:
                return attempt()
            except _SERVER_GONE + (RolloutError,) as err:
                if isinstance(err, RolloutError) and self.server.healthy():
                    raise  # the server is fine and said no: retrying will not help
                if tries == self.config.max_retries:
                    raise RolloutError(f"{what} failed after {tries + 1} attempts and {self.restarts} server "
                                       f"restarts: {err}; server log tail:\n{self.server.log_tail()}") from err
                log.warning("SGLang server lost during %s (%s); restarting it", what, err)
                self._restart()
        raise AssertionError("unreachable")

    def _restart(self) -> None:
        self._distributed = None  # its peer is gone; a new group forms on the next sync
        self.server.stop()
        self.start()
        self.restarts += 1
        if not self._restorable:
            raise RolloutError("the SGLang server was restarted, but rollout.sglang.keep_snapshot=false keeps no "
                               "copy of the current weights to give it: set keep_snapshot=true to recover")
        if self._snapshot:
            self._push(self._snapshot, self.weight_version)

    def generate(self, prompts: list[list[int]], sampling: SamplingParams) -> list[Sample]:
        self.wake_up()
        bodies = []
        for i, prompt in enumerate(prompts):
            for j in range(sampling.n):
                params = {"max_new_tokens": sampling.max_new_tokens, "temperature": sampling.temperature,
                          "top_p": sampling.top_p, "top_k": sampling.top_k,
                          "stop_token_ids": list(sampling.stop_token_ids), "skip_special_tokens": False}
                if sampling.seed is not None:
                    params["sampling_seed"] = sampling.seed + i * sampling.n + j
                params.update(self._padding_rows_bias(sampling.vocab_size))
                bodies.append({"input_ids": list(prompt), "sampling_params": params, "return_logprob": True})
        answers = self._with_recovery("generate", lambda: list(self._pool.map(self._post, bodies)))
        return [self._sample(body["input_ids"], answer) for body, answer in zip(bodies, answers)]

    @functools.cached_property
    def model_vocab_size(self) -> int:
        """Rows of the served model's vocabulary (its config's, padding included)."""
        return load_arch(self.model_path).vocab_size

    def _padding_rows_bias(self, vocab_size) -> dict:
        """SGLang samples from the model's whole vocabulary; ids past `vocab_size` (padding rows, no token)
        get a bias that makes them unsampleable."""
        if vocab_size is None or vocab_size >= self.model_vocab_size:
            return {}
        return {"logit_bias": {str(i): PADDING_ROW_BIAS for i in range(vocab_size, self.model_vocab_size)}}

    def _sample(self, prompt: list[int], answer: dict) -> Sample:
        meta = answer["meta_info"]
        if meta.get("weight_version") != str(self.weight_version):
            raise StaleWeightsError(f"response generated with weight version {meta.get('weight_version')!r}, "
                                    f"engine is at {self.weight_version}")
        token_logprobs = meta["output_token_logprobs"]
        response = [token for _, token, _ in token_logprobs]
        if response != answer["output_ids"]:
            raise RolloutError("SGLang's output_ids and output_token_logprobs disagree")
        return Sample(prompt_ids=list(prompt), response_ids=response, logprobs=[lp for lp, _, _ in token_logprobs],
                      finish_reason=meta["finish_reason"]["type"], weight_version=self.weight_version,
                      cached_tokens=int(meta.get("cached_tokens", 0)))

    def score(self, sequences: list[list[int]], top_k: int = 0) -> list[ScoredSequence]:
        self.wake_up()
        bodies = [{"input_ids": list(seq), "sampling_params": {"max_new_tokens": 0, "temperature": 1.0},
                   "return_logprob": True, "logprob_start_len": 0, **({"top_logprobs_num": top_k} if top_k else {})}
                  for seq in sequences]
        answers = self._with_recovery("score", lambda: list(self._pool.map(self._post, bodies)))
        scored = []
        for answer in answers:
            meta = answer["meta_info"]
            result = ScoredSequence(token_logprobs=[lp for lp, _, _ in meta["input_token_logprobs"][1:]])
            if top_k:
                tops = meta["input_top_logprobs"][1:]
                result.top_ids = [[token for _, token, _ in position] for position in tops]
                result.top_logprobs = [[lp for lp, _, _ in position] for position in tops]
            scored.append(result)
        return scored

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        """Streams the tensors to the server as they come (on the GPU: straight from the trainer's memory) and,
        with keep_snapshot, copies them to host memory on the way. A push that a lost server interrupts is
        repeated from that copy once the stream has been read to its end."""
        self._resume((WEIGHTS,))  # the KV cache stays released while the weights arrive: a lower peak
        snapshot = [] if self.keep_snapshot else None
        stream = iter(named_tensors if snapshot is None else _copied_to_host(named_tensors, snapshot))
        self._snapshot = []  # superseded: a restart during this push must not restore the old weights
        first_try = [stream]

        def push():
            if first_try:
                return self._push(first_try.pop(), version)
            if snapshot is None:
                raise RolloutError("a weight push was interrupted and rollout.sglang.keep_snapshot=false keeps "
                                   "no copy to repeat it from; set keep_snapshot=true to recover")
            for _ in stream:  # the host copy gets the tensors the interrupted push never read
                pass
            return self._push(snapshot, version)

        self._with_recovery("weight sync", push)
        self._snapshot, self._restorable = snapshot or [], snapshot is not None
        self.weight_version = version

    def _push(self, named_tensors, version: int) -> None:
        cfg, url, tag = self.config, self.server.url, str(version)
        if cfg.weight_sync == "tensor":
            weight_sync.sync_from_tensor(url, named_tensors, tag, cfg.bucket_bytes, cfg.request_timeout_s,
                                         cfg.tensor_parallel, self.device)
        elif cfg.weight_sync == "distributed":
            if self._distributed is None:
                weight_sync.DistributedSync.check_placement(self.device, cfg.base_gpu_id, cfg.tensor_parallel)
                # torch keeps every group name of the process: a name of this engine's own (several engines, or
                # restarts, in one process).
                name = f"opd_weight_sync_{uuid.uuid4().hex[:12]}"
                self._distributed = weight_sync.DistributedSync(url, cfg.tensor_parallel, cfg.request_timeout_s, name,
                                                                self.device)
            self._distributed.sync(named_tensors, tag, cfg.bucket_bytes)
        else:
            self._sync_dir = self._sync_dir or tempfile.mkdtemp(prefix="opd_weight_sync_")
            weight_sync.sync_from_disk(url, named_tensors, tag, os.path.join(self._sync_dir, "current"),
                                       self.model_path, cfg.request_timeout_s)
        served = weight_sync.served_version(url, cfg.request_timeout_s)
        if served != tag:
            raise RolloutError(f"after the weight sync the server reports version {served!r}, expected {tag!r}")
