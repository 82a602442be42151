"""`ParallelConfig`: the parallel layout, checked against the world and the model before anything is built."""
import functools
import importlib.util
import math
import sys
from dataclasses import dataclass
from typing import Optional

# Transformer Engine's context-parallel attention; without TE, CP attention all-gathers K and V.
CP_COMM_TYPES = ("p2p", "all_gather", "a2a")
# megatron's MoE token dispatchers that run without DeepEP/HybridEP ("flex" needs them: GPUs only).
TOKEN_DISPATCHERS = ("allgather", "alltoall")


class ParallelConfigError(ValueError):
    """A layout that cannot run; the message says which key to change."""


@functools.cache
def transformer_engine_problem() -> Optional[str]:
    """None when Transformer Engine imports; otherwise why not. An installed TE that fails to import is
    reported once on stderr: it would otherwise quietly swap in megatron's local layer spec."""
    if importlib.util.find_spec("transformer_engine") is None:
        return "transformer_engine is not installed"
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception as err:  # a broken install raises anything from ImportError to OSError
        problem = f"transformer_engine is installed but fails to import ({type(err).__name__}: {err})"
        print(f"warning: {problem}; using megatron's local layer spec", file=sys.stderr, flush=True)
        return problem
    return None


def transformer_engine_available() -> bool:
    return transformer_engine_problem() is None


@dataclass
class ParallelConfig:
    tensor: int = 1
    pipeline: int = 1
    context: int = 1
    virtual_pipeline: Optional[int] = None
    sequence_parallel: bool = False
    cp_comm_type: str = "p2p"  # Transformer Engine's CP attention: p2p | all_gather | a2a
    expert: int = 1  # expert parallelism (mixture-of-experts models): carved out of tensor*context*data ranks
    expert_tensor: Optional[int] = None  # tensor parallelism inside each expert; null: parallel.tensor
    token_dispatcher: str = "allgather"  # allgather | alltoall: how tokens reach the experts of other ranks

    def __post_init__(self):
        for key in ("tensor", "pipeline", "context", "expert"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ParallelConfigError(f"parallel.{key}={value!r}: must be an integer >= 1")
        if self.virtual_pipeline is not None:
            if not isinstance(self.virtual_pipeline, int) or self.virtual_pipeline < 1:
                raise ParallelConfigError(
                    f"parallel.virtual_pipeline={self.virtual_pipeline!r}: must be null or an integer >= 1")
            if self.virtual_pipeline > 1 and self.pipeline < 2:
                raise ParallelConfigError(
                    f"parallel.virtual_pipeline={self.virtual_pipeline} needs parallel.pipeline >= 2 "
                    f"(got {self.pipeline}); set virtual_pipeline=null or raise pipeline")
        if self.expert_tensor is not None and (
                not isinstance(self.expert_tensor, int) or isinstance(self.expert_tensor, bool) or self.expert_tensor < 1):
            raise ParallelConfigError(
                f"parallel.expert_tensor={self.expert_tensor!r}: must be null (= parallel.tensor) or an integer >= 1")
        if self.token_dispatcher not in TOKEN_DISPATCHERS:
            raise ParallelConfigError(f"parallel.token_dispatcher={self.token_dispatcher!r}: must be one of "
                                      f"{'|'.join(TOKEN_DISPATCHERS)}")
        if self.sequence_parallel and self.tensor < 2:
            raise ParallelConfigError("parallel.sequence_parallel=true needs parallel.tensor >= 2")
        if self.cp_comm_type not in CP_COMM_TYPES:
            raise ParallelConfigError(f"parallel.cp_comm_type={self.cp_comm_type!r}: must be one of "
                                      f"{'|'.join(CP_COMM_TYPES)}")

    @property
    def model_parallel_size(self) -> int:
        return self.tensor * self.pipeline * self.context

    @property
    def expert_tensor_size(self) -> int:
        return self.expert_tensor or self.tensor

    @property
    def min_world_size(self) -> int:
        """The fewest processes that run this layout: megatron's expert grid (expert_tensor x expert x
        expert-data per pipeline stage) must tile the dense one (tensor x context x data)."""
        stage, expert = self.tensor * self.context, self.expert_tensor_size * self.expert
        return self.pipeline * stage * expert // math.gcd(stage, expert)

    @property
    def virtual_stages(self) -> int:
        return self.virtual_pipeline or 1

    @property
    def sequence_multiple(self) -> int:
        """Sequences are padded to this: 2 x CP chunks (megatron's load-balanced CP layout), each split
        over TP again under sequence parallelism."""
        return (2 * self.context if self.context > 1 else 1) * (self.tensor if self.sequence_parallel else 1)

    def data_parallel_size(self, world_size: int) -> int:
        self.check_world(world_size)
        return world_size // self.model_parallel_size

    def check_world(self, world_size: int) -> None:
        if world_size % self.model_parallel_size:
            raise ParallelConfigError(
                f"world size {world_size} is not divisible by tensor*pipeline*context = "
                f"{self.tensor}*{self.pipeline}*{self.context} = {self.model_parallel_size}; "
                f"launch a multiple of {self.model_parallel_size} processes or change parallel.*")
        stage_ranks, expert_ranks = world_size // self.pipeline, self.expert_tensor_size * self.expert
        if stage_ranks % expert_ranks:
            dp = world_size // self.model_parallel_size
            raise ParallelConfigError(
                f"parallel.expert={self.expert} x parallel.expert_tensor={self.expert_tensor_size} = {expert_ranks} "
                f"does not divide the {stage_ranks} ranks of a pipeline stage (tensor*context*data = "
                f"{self.tensor}*{self.context}*{dp}): megatron carves expert parallelism out of those ranks; "
                f"choose parallel.expert dividing context*data = {self.context * dp} (at expert_tensor = tensor) "
                f"or launch a multiple of {self.min_world_size} processes")

    def check_backend(self, te_available: Optional[bool] = None) -> None:
        """Sequence parallelism exists only in megatron's Transformer Engine path (the local spec's norms
        refuse it). Context parallelism runs on either: TE's attention, or the local spec with an
        all-gather attention (megatron_opd.models.cp_attention)."""
        te = transformer_engine_available() if te_available is None else te_available
        if self.sequence_parallel and not te:
            why = transformer_engine_problem() or "Transformer Engine runs on GPUs only"
            raise ParallelConfigError(
                f"parallel.sequence_parallel=true needs Transformer Engine (megatron's local layer spec has "
                f"no sequence-parallel norms), and {why}; set parallel.sequence_parallel=false or run on a "
                f"GPU machine with transformer-engine installed")

    def check_model(self, num_attention_heads: int, num_query_groups: int, num_layers: int,
                    num_experts: Optional[int] = None) -> None:
        """`num_experts`: the model's routed experts per layer (0: a dense model; None: not checked)."""
        if num_attention_heads % self.tensor:
            raise ParallelConfigError(
                f"num_attention_heads={num_attention_heads} is not divisible by parallel.tensor={self.tensor}; "
                f"choose a tensor size that divides it")
        if num_query_groups % self.tensor:
            raise ParallelConfigError(
                f"num_key_value_heads={num_query_groups} is not divisible by parallel.tensor={self.tensor}; "
                f"choose a tensor size that divides it")
        chunks = self.pipeline * self.virtual_stages
        if num_layers % chunks:
            raise ParallelConfigError(
                f"num_hidden_layers={num_layers} is not divisible by parallel.pipeline*virtual_pipeline = "
                f"{self.pipeline}*{self.virtual_stages} = {chunks}; change the pipeline layout")
        if num_experts == 0 and (self.expert > 1 or self.expert_tensor not in (None, self.tensor)):
            raise ParallelConfigError(
                f"parallel.expert={self.expert}, parallel.expert_tensor={self.expert_tensor}: the model has no "
                f"experts (a dense model); leave parallel.expert=1 and parallel.expert_tensor=null")
        if num_experts and num_experts % self.expert:
            raise ParallelConfigError(
                f"the model's {num_experts} experts per layer do not divide by parallel.expert={self.expert}; "
                f"choose an expert-parallel size that divides {num_experts}")

    def validate(self, world_size: int, num_attention_heads: int, num_query_groups: int, num_layers: int,
                 te_available: Optional[bool] = None, num_experts: Optional[int] = None) -> None:
        self.check_world(world_size)
        self.check_model(num_attention_heads, num_query_groups, num_layers, num_experts)
        self.check_backend(te_available)
