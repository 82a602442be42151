"""`ParallelConfig`: the parallel layout, checked against the world and the model before anything is built."""
from dataclasses import dataclass
from typing import Optional


class ParallelConfigError(ValueError):
    """A layout that cannot run; the message says which key to change."""


def transformer_engine_available() -> bool:
    try:
        import transformer_engine  # noqa: F401
    except Exception:
        return False
    return True


@dataclass
class ParallelConfig:
    tensor: int = 1
    pipeline: int = 1
    context: int = 1
    virtual_pipeline: Optional[int] = None
    sequence_parallel: bool = False

    def __post_init__(self):
        for key in ("tensor", "pipeline", "context"):
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
        if self.sequence_parallel and self.tensor < 2:
            raise ParallelConfigError("parallel.sequence_parallel=true needs parallel.tensor >= 2")

    @property
    def model_parallel_size(self) -> int:
        return self.tensor * self.pipeline * self.context

    @property
    def virtual_stages(self) -> int:
        return self.virtual_pipeline or 1

    def data_parallel_size(self, world_size: int) -> int:
        self.check_world(world_size)
        return world_size // self.model_parallel_size

    def check_world(self, world_size: int) -> None:
        if world_size % self.model_parallel_size:
            raise ParallelConfigError(
                f"world size {world_size} is not divisible by tensor*pipeline*context = "
                f"{self.tensor}*{self.pipeline}*{self.context} = {self.model_parallel_size}; "
                f"launch a multiple of {self.model_parallel_size} processes or change parallel.*")

    def check_backend(self, te_available: Optional[bool] = None) -> None:
        """CP attention and sequence parallel exist only in megatron's Transformer Engine path."""
        te = transformer_engine_available() if te_available is None else te_available
        if self.context > 1 and not te:
            raise ParallelConfigError(
                f"parallel.context={self.context} needs Transformer Engine (megatron's context-parallel "
                f"attention is TEDotProductAttention only), which is not importable here; "
                f"set parallel.context=1 or install transformer-engine on a GPU machine")
        if self.sequence_parallel and not te:
            raise ParallelConfigError(
                "parallel.sequence_parallel=true needs Transformer Engine (megatron's local layer spec has "
                "no sequence-parallel norms); set parallel.sequence_parallel=false or install "
                "transformer-engine on a GPU machine")

    def check_model(self, num_attention_heads: int, num_query_groups: int, num_layers: int) -> None:
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

    def validate(self, world_size: int, num_attention_heads: int, num_query_groups: int, num_layers: int,
                 te_available: Optional[bool] = None) -> None:
        self.check_world(world_size)
        self.check_model(num_attention_heads, num_query_groups, num_layers)
        self.check_backend(te_available)
