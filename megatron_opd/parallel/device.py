"""The one device of a run: `trainer.device: auto | cuda | cpu`, resolved once, before the process group.

auto picks CUDA when a GPU is usable and says so when it falls back to the CPU; cuda without a usable
GPU is an error that says why (no CUDA in this torch build, no GPU visible, a driver the torch wheel
cannot use).
"""
import os
import sys
import warnings

import torch

DEVICE_KINDS = ("auto", "cuda", "cpu")
# Host memory, named where a tensor belongs there whatever the run's device: data staged before one copy to the
# device, state torch keeps on the host (Adam's step, RNG states), weights read from files.
HOST = torch.device("cpu")


class DeviceError(RuntimeError):
    """The requested device cannot be used; the message says why and what to do."""


def cuda_problem() -> str:
    """Why CUDA is not usable here ('' when it is)."""
    if torch.version.cuda is None:
        return f"this torch build ({torch.__version__}) has no CUDA support"
    with warnings.catch_warnings(record=True) as caught:  # a too-old driver is only a warning
        warnings.simplefilter("always")
        usable = torch.cuda.is_available()
    if usable:
        return ""
    said = "; ".join(str(w.message).strip().splitlines()[0] for w in caught)
    if said:
        return f"torch (CUDA {torch.version.cuda}) cannot use the GPU: {said}"
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return f"no GPU is visible (CUDA_VISIBLE_DEVICES={visible!r})"
    return f"no usable GPU or NVIDIA driver was found (torch built for CUDA {torch.version.cuda})"


def resolve_device(kind: str = "auto", local_rank: int = 0, announce: bool = True) -> torch.device:
    """`kind` -> this process's device: cuda:<local_rank mod visible GPUs>, or cpu."""
    if kind not in DEVICE_KINDS:
        raise DeviceError(f"trainer.device={kind!r}: must be one of {'|'.join(DEVICE_KINDS)}")
    if kind == "cpu":
        return torch.device("cpu")
    problem = cuda_problem()
    if not problem:
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    if kind == "cuda":
        raise DeviceError(f"trainer.device=cuda: {problem}; fix the GPU set-up or set trainer.device=cpu")
    if announce and local_rank == 0:
        print(f"device: training on the CPU ({problem}); trainer.device=cpu silences this notice",
              file=sys.stderr, flush=True)
    return torch.device("cpu")
