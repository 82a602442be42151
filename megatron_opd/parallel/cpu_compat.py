"""The CPU compatibility layer: lets megatron-core's local (non-Transformer-Engine) path run on a torch
without a usable GPU, over gloo.

This is the one place in the project that patches torch or megatron. The distributed init calls `apply()`
when the run's device is the CPU (`trainer.device`), so GPU runs never see it.

What megatron-core 0.19 assumes about CUDA, and what we give it instead:
- `torch.cuda.current_device()` as the device of buffers -> "cpu".
- `torch.cuda.synchronize/current_stream/default_stream` (p2p comm, DDP grad sync) and the side streams and
  events of the MoE alltoall token dispatcher (`torch.cuda.Stream/stream/Event`) -> no-ops.
- that dispatcher's split sizes: `maybe_move_tensor_to_cpu(..., as_numpy=True)` turns GPU tensors into numpy
  arrays, which `all_to_all_single` takes; CPU tensors it leaves as tensors, which gloo's refuses -> numpy.
- the CUDA RNG tracker (tensor_parallel.random) -> backed by the CPU generator, so per-TP-rank
  dropout/init seeds still fork correctly.
- `.cuda()` (tied embeddings, broadcast_data, the CP slice of the rotary embedding) -> the tensor itself,
  and `Tensor.type()` checks against "torch.cuda.*Tensor" (optimizers, clip_grads) -> the CUDA name.
- hard-coded `device="cuda"` and `pin_memory=True` in tensor factories (causal masks, schedules' token
  counters, optimizers' flags, grad-norm buffers, checkpoint verification) -> the modules that do it
  see a `torch` whose factories put tensors on the CPU.

Patches of names rather than a process-wide TorchFunctionMode: a mode runs Python on every tensor op of
the process, which more than doubled the embedded engine's decode time (34 -> 84 ms for 8 x 32 tokens).
"""
import contextlib

import torch

# megatron-core modules (on the paths this project runs) with literal device="cuda" or pin_memory=True.
CUDA_FACTORY_MODULES = (
    "megatron.core.dist_checkpointing.exchange_utils",
    "megatron.core.dist_checkpointing.strategies.state_dict_saver",
    "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.models.common.embeddings.rope_utils",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.optimizer.grad_scaler",
    "megatron.core.optimizer.optimizer",
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.rerun_state_machine",
    "megatron.core.tensor_parallel.data",
    "megatron.core.transformer.utils",
    "megatron.core.utils",
)
_FACTORIES = ("tensor", "zeros", "ones", "empty", "full", "arange", "empty_like", "zeros_like", "ones_like")
_applied = False


def _is_cuda(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    return isinstance(device, str) and device.startswith("cuda")


def _on_cpu(factory):
    def factory_on_cpu(*args, **kwargs):
        if _is_cuda(kwargs.get("device")):
            kwargs["device"] = "cpu"
        kwargs.pop("pin_memory", None)
        return factory(*args, **kwargs)

    return factory_on_cpu


class _TorchOnCpu:
    """torch as a module that hard-codes CUDA sees it: the same attributes, factories that ignore CUDA."""

    def __init__(self):
        for name in _FACTORIES:
            setattr(self, name, _on_cpu(getattr(torch, name)))

    def __getattr__(self, name):
        return getattr(torch, name)


_tensor_type = torch.Tensor.type


def _cuda_type(self, *args, **kwargs):
    if args or kwargs:
        return _tensor_type(self, *args, **kwargs)
    name = _tensor_type(self)
    return name if name.startswith("torch.cuda.") else name.replace("torch.", "torch.cuda.", 1)


def _init_data_on_cpu(init_data):
    def init_data_on_cpu(self, device, *args, **kwargs):
        return init_data(self, "cpu" if _is_cuda(device) else device, *args, **kwargs)

    return init_data_on_cpu


class _NullStream:
    def __init__(self, *args, **kwargs):
        pass

    def wait_event(self, *args, **kwargs):
        pass

    def wait_stream(self, *args, **kwargs):
        pass

    def synchronize(self):
        pass

    def record_event(self, *args, **kwargs):
        return _NullEvent()


class _NullEvent:
    def __init__(self, *args, **kwargs):
        pass

    def record(self, *args, **kwargs):
        pass

    def synchronize(self):
        pass

    def wait(self, *args, **kwargs):
        pass

    def query(self):
        return True


def _splits_to_host(tensor, as_numpy: bool = False, record_stream: bool = False):
    """megatron's maybe_move_tensor_to_cpu for tensors already on the CPU: numpy copies where asked, as it
    gives for GPU tensors."""
    if as_numpy and torch.is_tensor(tensor):
        return tensor.detach().clone().numpy()
    return tensor


def apply() -> None:
    """Patch torch/megatron for a run on the CPU (idempotent)."""
    global _applied
    if _applied:
        return
    import importlib

    from megatron.core.dist_checkpointing.mapping import ShardedTensor
    from megatron.core.tensor_parallel import random as megatron_random
    from megatron.core.transformer.moe import token_dispatcher

    torch.cuda.current_device = lambda: "cpu"
    torch.cuda.synchronize = lambda *args, **kwargs: None
    torch.cuda.current_stream = lambda *args, **kwargs: _NullStream()
    torch.cuda.default_stream = lambda *args, **kwargs: _NullStream()
    torch.cuda.Stream = _NullStream
    torch.cuda.stream = lambda *args, **kwargs: contextlib.nullcontext()
    torch.cuda.Event = _NullEvent
    token_dispatcher.maybe_move_tensor_to_cpu = _splits_to_host
    torch.cuda.get_rng_state = lambda *args, **kwargs: torch.get_rng_state()
    torch.cuda.manual_seed = lambda seed: torch.manual_seed(seed)
    megatron_random._get_cuda_rng_state = lambda *args, **kwargs: torch.get_rng_state()
    megatron_random._set_cuda_rng_state = lambda state, *args, **kwargs: torch.set_rng_state(state)
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    torch.Tensor.type = _cuda_type
    ShardedTensor.init_data = _init_data_on_cpu(ShardedTensor.init_data)
    torch_on_cpu = _TorchOnCpu()
    for name in CUDA_FACTORY_MODULES:
        importlib.import_module(name).torch = torch_on_cpu
    _applied = True


def is_active() -> bool:
    return _applied
