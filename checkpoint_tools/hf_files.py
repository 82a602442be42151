"""Hugging Face safetensors checkpoints: a lazy reader (single file or sharded with an index) and a
streaming writer that never holds more than one shard."""
import json
import os
from typing import Optional

import torch

from megatron_opd.parallel.device import HOST

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
# The HF metadata files carried along with the weights (tokenizer, configs, chat template).
METADATA_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                  "special_tokens_map.json", "chat_template.jinja", "vocab.json", "merges.txt",
                  "tokenizer.model", "added_tokens.json")


class CheckpointFileError(ValueError):
    """A missing, unreadable or inconsistent checkpoint file; the message names it."""


# safetensors dtype tags -> torch dtypes (the ones HF LLM checkpoints use).
_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64,
           "I64": torch.int64, "I32": torch.int32, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


def _read_header(path: str) -> tuple[dict, int]:
    """The safetensors header ({name: {dtype, shape, data_offsets}}) and where the data starts."""
    try:
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            if not 0 < size <= os.path.getsize(path) - 8:
                raise ValueError(f"header length {size} does not fit the file")
            header = json.loads(f.read(size))
    except (OSError, ValueError) as err:
        raise CheckpointFileError(f"{path}: unreadable safetensors file ({err})") from None
    header.pop("__metadata__", None)
    data_size = os.path.getsize(path) - 8 - size
    for name, entry in header.items():
        if entry["data_offsets"][1] > data_size:
            raise CheckpointFileError(f"{path}: {name} lies beyond the end of the file; the file is truncated")
        if entry["dtype"] not in _DTYPES:
            raise CheckpointFileError(f"{path}: {name} has dtype {entry['dtype']!r}, which is not supported")
    return header, 8 + size


class SafetensorsReader:
    """Reads one tensor at a time with plain file reads: unlike safetensors' mmap, pages of tensors
    already consumed do not stay resident, so a conversion holds the model once, not twice."""

    def __init__(self, hf_dir: str):
        self.hf_dir = hf_dir
        index_path, single_path = os.path.join(hf_dir, INDEX_NAME), os.path.join(hf_dir, SINGLE_NAME)
        if os.path.isfile(index_path):
            try:
                with open(index_path) as f:
                    files = sorted(set(json.load(f)["weight_map"].values()))
            except (json.JSONDecodeError, KeyError) as err:
                raise CheckpointFileError(f"{index_path}: not a valid safetensors index ({err})") from None
        elif os.path.isfile(single_path):
            files = [SINGLE_NAME]
        else:
            raise CheckpointFileError(
                f"{hf_dir}: no {SINGLE_NAME} or {INDEX_NAME}; point at a Hugging Face model directory "
                f"saved with safetensors")
        self._entries = {}  # name -> (path, header entry, data start)
        for file in files:
            path = os.path.join(hf_dir, file)
            if not os.path.isfile(path):
                raise CheckpointFileError(f"{path}: listed in {INDEX_NAME} but missing")
            header, data_start = _read_header(path)
            self._entries.update({name: (path, entry, data_start) for name, entry in header.items()})
        self.weight_map = {name: os.path.basename(path) for name, (path, _, _) in self._entries.items()}

    def names(self) -> list[str]:
        return list(self._entries)

    def get(self, name: str) -> torch.Tensor:
        path, entry, data_start = self._entries[name]
        begin, end = entry["data_offsets"]
        # Host memory: the file is read into it; the loader copies each tensor to its parameter's device.
        tensor = torch.empty(entry["shape"], dtype=_DTYPES[entry["dtype"]], device=HOST)
        buffer = (tensor.view(-1).view(torch.uint8) if tensor.numel()
                  else torch.empty(0, dtype=torch.uint8, device=HOST))
        if buffer.numel() != end - begin:
            raise CheckpointFileError(f"{path}: {name} holds {end - begin} bytes for shape {entry['shape']}")
        with open(path, "rb") as f:
            f.seek(data_start + begin)
            if f.readinto(buffer.numpy()) != end - begin:
                raise CheckpointFileError(f"{path}: {name} is cut short; the file is truncated")
        return tensor


class SafetensorsWriter:
    """add() tensors in any order; a shard is written whenever it reaches max_shard_bytes."""

    def __init__(self, out_dir: str, max_shard_bytes: int = 5 * 2**30):
        self.out_dir, self.max_shard_bytes = out_dir, max_shard_bytes
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: list[list[str]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + size > self.max_shard_bytes:
            self._flush()
        self._pending[name] = tensor.detach().contiguous().cpu()
        self._pending_bytes += size
        self.total_bytes += size

    def _flush(self) -> None:
        from safetensors.torch import save_file

        save_file(self._pending, os.path.join(self.out_dir, f"shard-{len(self._shards)}.tmp"), metadata={"format": "pt"})
        self._shards.append(list(self._pending))
        self._pending, self._pending_bytes = {}, 0

    def finish(self) -> Optional[str]:
        """Name the shards; write the index when there is more than one. Returns the index path, if any."""
        if self._pending or not self._shards:
            self._flush()
        count = len(self._shards)
        if count == 1:
            os.replace(os.path.join(self.out_dir, "shard-0.tmp"), os.path.join(self.out_dir, SINGLE_NAME))
            return None
        weight_map = {}
        for i, names in enumerate(self._shards):
            file = f"model-{i + 1:05d}-of-{count:05d}.safetensors"
            os.replace(os.path.join(self.out_dir, f"shard-{i}.tmp"), os.path.join(self.out_dir, file))
            weight_map.update({name: file for name in names})
        index_path = os.path.join(self.out_dir, INDEX_NAME)
        with open(index_path, "w") as f:
            json.dump({"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}, f, indent=2)
        return index_path


def write_hf_dir(named_tensors, out_dir: str, metadata_dir: str, max_shard_bytes: int = 5 * 2**30) -> str:
    """Streamed HF-named tensors + the metadata files of `metadata_dir` -> a complete HF checkpoint at
    out_dir, written to `<out_dir>.tmp` and swapped in only once complete."""
    import shutil

    tmp = f"{out_dir}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        writer = SafetensorsWriter(tmp, max_shard_bytes)
        for name, tensor in named_tensors:
            writer.add(name, tensor)
        writer.finish()
        for name in METADATA_FILES:
            if os.path.isfile(os.path.join(metadata_dir, name)):
                shutil.copy2(os.path.join(metadata_dir, name), tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    return out_dir
