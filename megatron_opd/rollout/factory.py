"""`rollout.engine`: the engine a run generates with, by name."""
from typing import Optional

import torch

from megatron_opd.rollout.engine import RolloutEngine


def make_engine(kind: str, model_path: str, sglang_config=None, dtype: Optional[torch.dtype] = None,
                device: torch.device = torch.device("cpu"), url: Optional[str] = None) -> RolloutEngine:
    """local (the embedded engine) or sglang, on the run's `device`; `url`: an SGLang server already running
    (rollout.url)."""
    if kind == "local":
        from megatron_opd.rollout.embedded_engine import EmbeddedEngine

        return EmbeddedEngine(model_path, dtype=dtype or torch.float32, device=device)
    if kind == "sglang":
        from megatron_opd.rollout.sglang_engine import SGLangEngine
        from megatron_opd.rollout.sglang_server import SGLangConfig

        return SGLangEngine(model_path, sglang_config or SGLangConfig(), device, url=url)
    raise ValueError(f"rollout.engine={kind!r}: one of local|sglang")
