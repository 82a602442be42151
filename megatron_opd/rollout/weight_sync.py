"""Push HF-named tensors into a running SGLang server, by one of three routes:

- tensor (colocated): tensors go through shared memory (torch multiprocessing, file_system strategy),
  in buckets of at most `bucket_bytes`, via /update_weights_from_tensor;
- distributed: the trainer and the server form a process group once; tensors are broadcast bucket by
  bucket while /update_weights_from_distributed receives them;
- disk: the model is written as safetensors and read back by /update_weights_from_disk (the fallback).

The first two sit between /begin_weight_update and /end_weight_update (SGLang 0.5.23's protocol); every
route names the new weight version and flushes the cache.
"""
from concurrent.futures import ThreadPoolExecutor
from typing import Iterable, Iterator

import requests
import torch

from checkpoint_tools.hf_files import write_hf_dir
from megatron_opd.rollout.engine import RolloutError

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


def buckets(named_tensors: NamedTensors, bucket_bytes: int) -> Iterator[list[tuple[str, torch.Tensor]]]:
    bucket, size = [], 0
    for name, tensor in named_tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if bucket and size + nbytes > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, tensor.detach().contiguous().cpu()))
        size += nbytes
    if bucket:
        yield bucket


def sync_from_tensor(url: str, named_tensors: NamedTensors, version: str, bucket_bytes: int, timeout: float,
                     server_tp: int = 1) -> None:
    from sglang.srt.utils import MultiprocessingSerializer

    torch.multiprocessing.set_sharing_strategy("file_system")
    post(url, "/begin_weight_update", {}, timeout)
    try:
        pending = list(buckets(named_tensors, bucket_bytes))
        for i, bucket in enumerate(pending):
            serialized = MultiprocessingSerializer.serialize(bucket, output_str=True)
            last = i == len(pending) - 1
            post(url, "/update_weights_from_tensor", {
                "serialized_named_tensors": [serialized] * server_tp, "flush_cache": last,
                **({"weight_version": version} if last else {})}, timeout)
    finally:
        post(url, "/end_weight_update", {}, timeout)


class DistributedSync:
    """The trainer (rank 0) and the server's TP ranks (1..server_tp) in one gloo/NCCL group."""

    def __init__(self, url: str, server_tp: int, timeout: float, group_name: str):
        self.url, self.server_tp, self.timeout, self.group_name = url, server_tp, timeout, group_name
        self.group = None

    def connect(self) -> None:
        from sglang.srt.utils import init_custom_process_group

        from megatron_opd.parallel import free_port

        port = free_port()
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        body = {"master_address": "127.0.0.1", "master_port": port, "rank_offset": 1,
                "world_size": self.server_tp + 1, "group_name": self.group_name, "backend": backend}
        answer = _BESIDE.submit(post, self.url, "/init_weights_update_group", body, self.timeout)
        self.group = init_custom_process_group(backend=backend, init_method=f"tcp://127.0.0.1:{port}",
                                               world_size=self.server_tp + 1, rank=0, group_name=self.group_name)
        answer.result()

    def sync(self, named_tensors: NamedTensors, version: str, bucket_bytes: int) -> None:
        if self.group is None:
            self.connect()
        post(self.url, "/begin_weight_update", {}, self.timeout)
        try:
            pending = list(buckets(named_tensors, bucket_bytes))
            for i, bucket in enumerate(pending):
                last = i == len(pending) - 1
                body = {"names": [n for n, _ in bucket], "dtypes": [str(t.dtype).removeprefix("torch.") for _, t in bucket],
                        "shapes": [list(t.shape) for _, t in bucket], "group_name": self.group_name,
                        "flush_cache": last, **({"weight_version": version} if last else {})}
                answer = _BESIDE.submit(post, self.url, "/update_weights_from_distributed", body, self.timeout)
                for _, tensor in bucket:
                    torch.distributed.broadcast(tensor, src=0, group=self.group)
                answer.result()
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
