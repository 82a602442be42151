"""opd-generate: responses of a model to a prompt set, written as verl-schema rows with a `response`
column (jsonl or parquet, by the output's extension), and the accuracy printed (each row scored by its
data_source's scorer: GSM8K-style, or walk success).

The output is valid training data as it stands: `trainer.mode=sft data.response_key=response` trains on
it (the off-policy distillation baseline: SFT on teacher samples). With rollout.env each row is a
conversation with the environment (rollout/conversation.py): its first messages as the prompt, the rest as
the response, the environment's parts in extra_info.env_spans (data.response_skip_key=extra_info.env_spans
trains without them), scored by the environment.

Run: python -m megatron_opd.generate model.path=DIR data.val_files=test.parquet [output=out.jsonl]
         [rollout.engine=sglang [rollout.url=http://HOST:PORT]] [do_sample=true rollout.temperature=0.6 rollout.n=4]
         [rollout.env=walk|tools|module:Class rollout.max_turns=8]
(with rollout.url the server there answers as it is: it should serve model.path's weights)
"""
import json
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Optional

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf.errors import OmegaConfBaseException

from megatron_opd.config import ConfigError, ModelConfig, RolloutConfig
from megatron_opd.config.verl_keys import GENERATE_ALIASES, rewrite_argv
from megatron_opd.data.config import DataConfig
from megatron_opd.parallel.device import DEVICE_KINDS
from megatron_opd.parallel.quiet import quiet_known_messages
from megatron_opd.config.composition import CONFIG_DIR


@dataclass
class GenerateConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)  # the prompts are data.val_files
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    do_sample: bool = False  # false: greedy decoding
    output: str = "outputs/generations.jsonl"
    score_method: str = "strict"
    max_prompts: Optional[int] = None
    seed: int = 0  # of the sampling (do_sample=true)
    device: str = "auto"  # auto (CUDA when usable, else CPU with a notice) | cuda | cpu

    def __post_init__(self):
        if not self.model.path:
            raise ConfigError("model.path=None: is required (an HF model directory)")
        if self.data.val_files is None:
            raise ConfigError("data.val_files=None: is required (the prompts to answer)")
        if not self.output.endswith((".jsonl", ".parquet")):
            raise ConfigError(f"output={self.output!r}: must end in .jsonl or .parquet")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ConfigError(f"seed={self.seed!r}: must be an integer >= 0")
        if self.device not in DEVICE_KINDS:
            raise ConfigError(f"device={self.device!r}: must be one of {'|'.join(DEVICE_KINDS)}")


ConfigStore.instance().store(name="generate_schema", node=GenerateConfig)


def generate(cfg: GenerateConfig) -> float:
    from transformers import AutoTokenizer

    from checkpoint_tools.pretrained import is_hf_dir
    from megatron_opd.data.scorers import score_response
    from megatron_opd.data.prompt_dataset import PromptDataset
    from megatron_opd.models.builder import resolve_dtype
    from megatron_opd.parallel import resolve_device
    from megatron_opd.rollout.conversation import MultiTurn
    from megatron_opd.rollout.factory import make_engine
    from megatron_opd.rollout.engine import SamplingParams
    from megatron_opd.trainer.setup import model_dtype

    if not is_hf_dir(cfg.model.path):
        raise ConfigError(f"model.path={cfg.model.path}: not a Hugging Face checkpoint; convert a Megatron one "
                          f"with `opd-convert mcore-to-hf` first")
    tokenizer = AutoTokenizer.from_pretrained(cfg.model.path)
    dataset = PromptDataset.from_config(cfg.data, tokenizer, "val")
    items = [dataset[i] for i in range(min(len(dataset), cfg.max_prompts or len(dataset)))]
    r = cfg.rollout
    sampling = SamplingParams(max_new_tokens=r.response_length, temperature=r.temperature if cfg.do_sample else 0.0,
                              top_p=r.top_p, top_k=r.top_k, n=r.n, stop_token_ids=(tokenizer.eos_token_id,),
                              seed=cfg.seed)
    engine = make_engine(r.engine, cfg.model.path, r.sglang, dtype=resolve_dtype(model_dtype(cfg.model, "model")),
                         device=resolve_device(cfg.device), url=r.url)
    multi_turn = MultiTurn.of(r, tokenizer)
    engine.start()
    try:
        started = time.perf_counter()
        samples = (multi_turn.roll_out(engine, items, sampling) if multi_turn is not None
                   else engine.generate([item["input_ids"] for item in items], sampling))
        seconds = time.perf_counter() - started
    finally:
        engine.stop()
    if multi_turn is not None:
        rows = _conversation_rows(samples, items, tokenizer, r.n)
    else:
        texts = tokenizer.batch_decode([s.response_ids for s in samples], skip_special_tokens=True)
        rows = []
        for k, text in enumerate(texts):
            item = items[k // r.n]
            rows.append({**_row(item, k % r.n), "prompt": item["raw_prompt"], "response": text,
                         "score": score_response(item["data_source"], text, item["ground_truth"], cfg.score_method)})
    _write(rows, cfg.output)
    accuracy = sum(row["score"] for row in rows) / len(rows)
    tokens = sum(len(s.response_ids) for s in samples)
    print(f"{len(items)} prompts x {r.n}: accuracy {accuracy:.4f} ({cfg.score_method}); {tokens} tokens in "
          f"{seconds:.1f}s ({tokens / seconds:.0f} tok/s, {r.engine} engine); wrote {cfg.output}")
    return accuracy


def _row(item: dict, sample: int) -> dict:
    return {"data_source": item["data_source"], "ability": "math",
            "reward_model": {"style": "rule", "ground_truth": item["ground_truth"]},
            "extra_info": {"index": item["index"], "sample": sample}}


def _conversation_rows(conversations, items: list[dict], tokenizer, n: int) -> list[dict]:
    """rollout.env: each conversation's first messages as the prompt, the rest as the response with the
    environment's character spans in extra_info.env_spans (data.response_skip_key=extra_info.env_spans trains
    on the assistant's turns only), scored by its environment."""
    from megatron_opd.rollout.conversation import as_text

    rows = []
    for k, conversation in enumerate(conversations):
        item = items[k // n]
        text, spans = as_text(conversation, tokenizer)
        row = _row(item, k % n)
        row["extra_info"].update(env_spans=spans, turns=conversation.turns, ending=conversation.ending)
        rows.append({**row, "prompt": conversation.messages or item["raw_prompt"], "response": text,
                     "score": conversation.reward})
    return rows


def _write(rows: list[dict], path: str) -> None:
    from megatron_opd.atomic import replaced_when_done, write_text

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if not path.endswith(".parquet"):
        write_text(path, "".join(json.dumps(row) + "\n" for row in rows))
        return
    import pyarrow as pa
    import pyarrow.parquet as pq

    with replaced_when_done(path) as tmp:
        pq.write_table(pa.Table.from_pylist(rows), tmp)


@hydra.main(config_path=CONFIG_DIR, config_name="generation", version_base=None)
def main(raw) -> None:
    quiet_known_messages()
    from omegaconf import OmegaConf

    try:
        cfg = OmegaConf.to_object(raw)
    except (ValueError, OmegaConfBaseException) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    generate(cfg)


def cli() -> None:
    """opd-generate and `python -m`: verl's main_generation keys translated (config/verl_keys.py), then main."""
    rewrite_argv(GENERATE_ALIASES)
    main()


if __name__ == "__main__":
    cli()
