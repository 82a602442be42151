"""The SGLang engine: student rollouts and teacher scoring over SGLang's HTTP API, weight sync after
every optimizer step, and recovery from a server that dies or stops answering (restart it, restore the
current weights, retry the interrupted batch a bounded number of times)."""
import logging
import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, TypeVar

import requests
import torch

from megatron_opd.rollout import weight_sync
from megatron_opd.rollout.engine import (
    RolloutEngine, RolloutError, Sample, SamplingParams, ScoredSequence, StaleWeightsError)
from megatron_opd.rollout.sglang_server import SGLangConfig, SGLangServer

log = logging.getLogger(__name__)
T = TypeVar("T")
_SERVER_GONE = (requests.ConnectionError, requests.Timeout, ConnectionError)


class SGLangEngine(RolloutEngine):
    def __init__(self, model_path: str, config: SGLangConfig, keep_snapshot: bool = True):
        self.model_path, self.config = model_path, config
        self.server = SGLangServer(model_path, config)
        self.weight_version = 0
        self.restarts = 0
        # The last pushed weights, to restore a restarted server (one model copy in host memory).
        self.keep_snapshot = keep_snapshot
        self._snapshot: list[tuple[str, torch.Tensor]] = []
        self._distributed = None
        self._sync_dir = None
        self._pool = ThreadPoolExecutor(max_workers=config.concurrency, thread_name_prefix="sglang-request")

    def start(self) -> None:
        self.server.start()
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
        if self._snapshot:
            self._push(self._snapshot, self.weight_version)

    def generate(self, prompts: list[list[int]], sampling: SamplingParams) -> list[Sample]:
        bodies = []
        for i, prompt in enumerate(prompts):
            for j in range(sampling.n):
                params = {"max_new_tokens": sampling.max_new_tokens, "temperature": sampling.temperature,
                          "top_p": sampling.top_p, "top_k": sampling.top_k,
                          "stop_token_ids": list(sampling.stop_token_ids), "skip_special_tokens": False}
                if sampling.seed is not None:
                    params["sampling_seed"] = sampling.seed + i * sampling.n + j
                bodies.append({"input_ids": list(prompt), "sampling_params": params, "return_logprob": True})
        answers = self._with_recovery("generate", lambda: list(self._pool.map(self._post, bodies)))
        return [self._sample(body["input_ids"], answer) for body, answer in zip(bodies, answers)]

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
                      finish_reason=meta["finish_reason"]["type"], weight_version=self.weight_version)

    def score(self, sequences: list[list[int]], top_k: int = 0) -> list[ScoredSequence]:
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
        if self.keep_snapshot:
            named_tensors = self._snapshot = [(name, tensor.detach().clone()) for name, tensor in named_tensors]
        self._with_recovery("weight sync", lambda: self._push(named_tensors, version))
        self.weight_version = version

    def _push(self, named_tensors, version: int) -> None:
        cfg, url, tag = self.config, self.server.url, str(version)
        if cfg.weight_sync == "tensor":
            weight_sync.sync_from_tensor(url, named_tensors, tag, cfg.bucket_bytes, cfg.request_timeout_s,
                                         cfg.tensor_parallel)
        elif cfg.weight_sync == "distributed":
            if self._distributed is None:
                self._distributed = weight_sync.DistributedSync(url, cfg.tensor_parallel, cfg.request_timeout_s,
                                                                group_name=f"opd_weight_sync_{self.restarts}")
            self._distributed.sync(named_tensors, tag, cfg.bucket_bytes)
        else:
            self._sync_dir = self._sync_dir or tempfile.mkdtemp(prefix="opd_weight_sync_")
            weight_sync.sync_from_disk(url, named_tensors, tag, os.path.join(self._sync_dir, "current"),
                                       self.model_path, cfg.request_timeout_s)
        served = self._post({"input_ids": [0], "sampling_params": {"max_new_tokens": 0}})["meta_info"]["weight_version"]
        if served != tag:
            raise RolloutError(f"after the weight sync the server reports version {served!r}, expected {tag!r}")
