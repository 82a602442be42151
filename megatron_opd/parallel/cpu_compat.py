"""The CPU compatibility layer: lets megatron-core's local (non-Transformer-Engine) path run on a torch
without a usable GPU, over gloo.

This is the one place in the project that patches torch or megatron. The distributed init calls `apply()`
when the run's device is the CPU (`trainer.device`), so GPU runs never see it.

What megatron-core 0.19 assumes about CUDA, and what we give it instead:
- `torch.cuda.current_device()` as the device of buffers -> "cpu".
- `torch.cuda.synchronize/current_stream/default_stream` (p2p comm, DDP grad sync) -> no-ops.
- the CUDA RNG tracker (tensor_parallel.random) -> backed by the CPU generator, so per-TP-rank
  dropout/init seeds still fork correctly.
- hard-coded `device="cuda"`, `.cuda()`, `.to("cuda")` (causal masks, schedules' token counters,
  broadcast_data) and `Tensor.type()` checks against "torch.cuda.*Tensor" (optimizers, clip_grads)
  -> rewritten by a process-wide TorchFunctionMode, which also drops `pin_memory=True` (the CP slice of
  the rotary embedding asks for pinned memory, which needs a GPU).
- the causal masks are also replaced outright: activation recompute rebuilds them inside autograd's
  backward, where the mode above is not in effect.
"""
import torch
from torch.overrides import TorchFunctionMode

_applied = False


def _is_cuda(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    return isinstance(device, str) and device.startswith("cuda")


class _CudaToCpu(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return name if name.startswith("torch.cuda.") else name.replace("torch.", "torch.cuda.", 1)
        if _is_cuda(kwargs.get("device")):
            kwargs = dict(kwargs, device="cpu")
        if kwargs.get("pin_memory"):
            kwargs = dict(kwargs, pin_memory=False)
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda(args[1]):
            args = (args[0], "cpu", *args[2:])
        return func(*args, **kwargs)


class _NullStream:
    def wait_event(self, *args, **kwargs):
        pass

    def wait_stream(self, *args, **kwargs):
        pass

    def synchronize(self):
        pass

    def record_event(self, *args, **kwargs):
        return None


def _causal_mask(sq):
    return torch.triu(torch.ones(sq, sq, dtype=torch.bool, device="cpu"), diagonal=1)


def _sliding_window_causal_mask(sq, skv, window_size):
    visible = torch.ones(sq, skv, dtype=torch.bool, device="cpu")
    visible = torch.triu(visible, diagonal=skv - sq - window_size[0])
    return ~torch.tril(visible, diagonal=skv - sq + window_size[1])


def _patch_causal_masks():
    from megatron.core.fusions import fused_softmax
    from megatron.core.transformer import utils

    for module in (utils, fused_softmax):
        module.get_default_causal_mask = _causal_mask
        module.get_sliding_window_causal_mask = _sliding_window_causal_mask


def apply() -> None:
    """Patch torch/megatron for a run on the CPU (idempotent)."""
    global _applied
    if _applied:
        return
    from megatron.core.tensor_parallel import random as megatron_random

    torch.cuda.current_device = lambda: "cpu"
    torch.cuda.synchronize = lambda *args, **kwargs: None
    torch.cuda.current_stream = lambda *args, **kwargs: _NullStream()
    torch.cuda.default_stream = lambda *args, **kwargs: _NullStream()
    torch.cuda.get_rng_state = lambda *args, **kwargs: torch.get_rng_state()
    torch.cuda.manual_seed = lambda seed: torch.manual_seed(seed)
    megatron_random._get_cuda_rng_state = lambda *args, **kwargs: torch.get_rng_state()
    megatron_random._set_cuda_rng_state = lambda state, *args, **kwargs: torch.set_rng_state(state)
    _patch_causal_masks()
    # Entered for the life of the process (and inherited by forked workers): megatron's hard-coded
    # "cuda" tensors appear in many call sites, and a mode catches all of them without a list.
    _CudaToCpu().__enter__()
    _applied = True


def is_active() -> bool:
    return _applied
