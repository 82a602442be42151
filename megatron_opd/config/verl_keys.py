"""verl's command-line keys, translated to this project's before Hydra parses them, so a verl command runs as
pasted or stops naming the verl key and what to use instead. One table per entry point (`TRAIN_ALIASES`,
`GENERATE_ALIASES`); `python -m megatron_opd.config.verl_keys` prints both as docs/verl_keys.md."""
import re
import sys
from dataclasses import dataclass
from typing import Any, Optional

from megatron_opd.loss.sampled import BASE_KINDS

REFUSE = "refused"  # Alias.values: the key is refused whatever its value


@dataclass(frozen=True)
class Needs:
    """A value that sets nothing itself: the named verl key, which must be given too, sets the key."""
    key: str


@dataclass(frozen=True)
class Join:
    """The value of several verl keys, all required, joined into one of ours by a template."""
    template: str


@dataclass(frozen=True)
class Alias:
    verl: str  # `<name>`: any teacher's name; a trailing `.*`: every key below it
    ours: Optional[str]  # None: sets nothing (accepted at the listed values, with a notice; or refused)
    values: Any = None  # None: as given | {verl value: ours, or Refused(why)} | REFUSE | Join
    note: str = ""


@dataclass(frozen=True)
class Refused:
    why: str


class VerlKeyError(ValueError):
    """A verl key or value this project cannot honour; the message names it and what to use instead."""


VLLM = Refused("this project drives SGLang or its embedded engine: use sglang")
ENGINES = {"sglang": "sglang", "hf": "local", "vllm": VLLM}
BOOL = {"true": "true", "false": "false"}
WORLD = "the launcher decides the world size here (torchrun --nproc-per-node/--nnodes, srun --nodes); not checked"
SAME = "same name"


def _same(*keys: str) -> tuple:
    return tuple(Alias(key, key, None, SAME) for key in keys)


def _renamed(verl_prefix: str, ours_prefix: str, *names: str) -> tuple:
    return tuple(Alias(f"{verl_prefix}.{n}", f"{ours_prefix}.{n}") for n in names)


ARO = "actor_rollout_ref"
TEACHER = "distillation.teacher_models.<name>"
LOSS = "distillation.distillation_loss"
TRAIN_ALIASES = (
    Alias(f"{ARO}.model.path", "student.path"),
    Alias(f"{ARO}.ref.model.path", "teacher.path", note="the reference model is the teacher"),
    *_renamed(f"{ARO}.actor", "actor", "kl_loss_coef", "kl_loss_type", "entropy_coeff", "optim.lr", "ppo_epochs",
              "ppo_mini_batch_size", "clip_ratio", "loss_agg_mode", "grad_clip"),
    Alias(f"{ARO}.actor.ppo_micro_batch_size_per_gpu", "actor.micro_batch_size"),
    Alias(f"{ARO}.actor.ppo_max_token_len_per_gpu", "actor.max_tokens_per_micro_batch"),
    Alias(f"{ARO}.actor.use_kl_loss", None, {"true": None}, "the KL to the teacher is this run's loss: "
          "actor.kl_loss_coef weighs it"),
    *(Alias(f"{ARO}.actor.megatron.{n}_model_parallel_size", f"parallel.{n}")
      for n in ("tensor", "pipeline", "context", "virtual_pipeline", "expert")),
    *(Alias(f"{ARO}.ref.megatron.{n}_model_parallel_size", f"teacher.parallel.{n}", note="the teacher's own layout")
      for n in ("tensor", "pipeline", "expert")),
    Alias(f"{ARO}.actor.megatron.expert_tensor_parallel_size", "parallel.expert_tensor"),
    Alias(f"{ARO}.actor.megatron.override_transformer_config.moe_aux_loss_coeff", "actor.moe_aux_loss_coef"),
    Alias(f"{ARO}.actor.megatron.override_transformer_config.moe_token_dispatcher_type", "parallel.token_dispatcher",
          {"allgather": "allgather", "alltoall": "alltoall",
           "flex": Refused("flex needs DeepEP/HybridEP, which this project does not install: use alltoall")}),
    Alias(f"{ARO}.actor.fsdp_config.*", None, REFUSE, "Megatron here, not FSDP: parallel.*"),
    Alias(f"{ARO}.model.enable_gradient_checkpointing", "actor.recompute", {"true": "full", "false": "none"}),
    Alias(f"{ARO}.model.use_remove_padding", None, None, "a speed setting, the same numbers: here each "
          "micro-batch is padded to its own longest sequence (actor.max_tokens_per_micro_batch groups by length)"),
    *_renamed(f"{ARO}.rollout", "rollout", "temperature", "top_p", "top_k", "n", "response_length"),
    Alias(f"{ARO}.rollout.name", "rollout.engine", ENGINES),
    Alias(f"{ARO}.rollout.tensor_model_parallel_size", "rollout.sglang.tensor_parallel"),
    Alias(f"{ARO}.rollout.gpu_memory_utilization", "rollout.sglang.mem_fraction_static"),
    *(Alias(f"{ARO}.{n}.log_prob_micro_batch_size_per_gpu", None, None, "log-probs are taken in the training "
            "micro-batches here (actor.micro_batch_size)") for n in ("rollout", "ref")),
    Alias(f"{ARO}.rollout.multi_turn.enable", None, {"false": None}, "a multi-turn run names its environment: "
          "rollout.env=tools (Qwen/Hermes tool calls) | walk | module:Class"),
    Alias(f"{ARO}.rollout.multi_turn.max_assistant_turns", "rollout.max_turns"),
    Alias(f"{ARO}.rollout.multi_turn.*", None, REFUSE, "an environment (rollout.env) holds the tools and the "
          "interaction; rollout.max_turns, max_turn_tokens and response_length bound a conversation"),
    Alias(f"{ARO}.*", None, REFUSE, "docs/verl_keys.md lists the actor/rollout/ref keys translated"),
    Alias("data.max_response_length", "rollout.response_length"),
    *_same("data.train_batch_size", "data.max_prompt_length", "data.truncation", "data.train_files",
           "data.val_files", "data.filter_overlong_prompts", "data.shuffle", "data.prompt_key"),
    Alias("data.filter_overlong_prompts_workers", None, None, "every prompt is measured once at start-up here"),
    *_same("trainer.total_epochs", "trainer.save_freq", "trainer.test_freq", "trainer.logger", "trainer.device"),
    Alias("trainer.total_training_steps", "trainer.total_steps"),
    Alias("trainer.default_local_dir", "trainer.save_dir"),
    Alias("trainer.resume_mode", "trainer.resume", {"auto": "auto", "disable": "never",
                                                    "resume_path": Needs("trainer.resume_from_path")}),
    Alias("trainer.resume_from_path", "trainer.resume", note="a checkpoint's path (verl reads it only with "
          "resume_mode=resume_path; with auto or disable as well it is refused)"),
    *(Alias(f"trainer.{n}_name", "trainer.save_dir", Join("checkpoints/{trainer.project_name}/"
                                                          "{trainer.experiment_name}"),
            "give both: they name the run's directory as verl's default_local_dir does (wandb's run name is its "
            "last part); refused with trainer.default_local_dir") for n in ("project", "experiment")),
    Alias("trainer.n_gpus_per_node", None, None, WORLD),
    Alias("trainer.nnodes", None, None, WORLD),
    Alias("trainer.critic_warmup", None, {"0": None}, "no critic here"),
    Alias("trainer.val_before_train", None, {"true": None}, "validation runs before the first step whenever "
          "trainer.test_freq > 0; set trainer.test_freq=0 for none"),
    Alias("algorithm.use_kl_in_reward", None, {"false": None}, "the teacher's KL is the loss, not a reward term"),
    Alias("algorithm.*", None, REFUSE, "advantages here: actor.policy_loss=pg (with reward.fn, a group "
          "baseline as GRPO's)"),
    Alias("critic.*", None, REFUSE, "no critic: the advantage is the teacher's KL"),
    Alias("reward_model.*", None, REFUSE, "rewards are reward.fn (gsm8k|data_source|module:function)"),
    Alias("custom_reward_function.*", None, REFUSE, "reward.fn=module:function (the module importable)"),
    Alias("ray_init.*", None, REFUSE, "no Ray: torchrun or srun starts the processes"),
    Alias("distillation.enabled", None, {"true": None}, "every run distils (trainer.mode=distill); "
          "trainer.mode=sft trains on given responses"),
    Alias("distillation.teacher_key", None, {"data_source": None}, "teachers are chosen by each row's "
          "data_source"),
    Alias(f"{TEACHER}.model_path", "teachers.<name>.path", note="one teacher and no .key: teacher.*, scoring "
          "every row; several: teachers.<name>.*"),
    Alias(f"{TEACHER}.key", "teachers.<name>.data_sources", note="the data_source it scores"),
    Alias(f"{TEACHER}.inference.name", "teachers.<name>.engine", {"sglang": "sglang", "vllm": VLLM},
          "verl's teachers are always served; without it the teacher runs on the trainer's ranks (megatron)"),
    Alias(f"{TEACHER}.inference.tensor_model_parallel_size", "teachers.<name>.sglang.tensor_parallel"),
    Alias(f"{LOSS}.loss_mode", "actor.kl_loss_type", {"forward_kl_topk": "topk_forward",
                                                      **{k: k for k in BASE_KINDS}}),
    Alias(f"{LOSS}.topk", "actor.topk"),
    Alias(f"{LOSS}.use_policy_gradient", "actor.policy_loss", {"true": "pg", "false": "direct"}),
    Alias(f"{LOSS}.use_task_rewards", "reward.fn", {"true": "data_source", "false": "none"}),
    Alias(f"{LOSS}.distillation_loss_coef", "actor.kl_loss_coef"),
    *_renamed(LOSS, "actor", "loss_max_clamp", "log_prob_min_clamp", "clip_ratio"),
    Alias(f"{LOSS}.policy_loss_mode", None, {"vanilla": None}, "PPO's clipped surrogate (actor.clip_ratio)"),
    Alias("distillation.*", None, REFUSE, "a teacher runs on the trainer's ranks (teacher.parallel.*) or on its "
          "own SGLang server (teacher.engine=sglang, teacher.sglang.*)"),
)

GENERATE_ALIASES = (
    Alias(f"{ARO}.model.path", "model.path"),
    *_same("model.path", "data.max_prompt_length", "data.prompt_key", "rollout.temperature", "rollout.top_p",
           "rollout.top_k", "rollout.response_length"),
    Alias("data.path", "data.val_files"),
    Alias("data.output_path", "output", note=".jsonl or .parquet"),
    Alias("data.n_samples", "rollout.n"),
    Alias("data.batch_size", None, None, "every prompt goes to the engine at once (it batches them itself)"),
    Alias("rollout.prompt_length", "data.max_prompt_length"),
    Alias("rollout.do_sample", "do_sample", BOOL, "this project's default is greedy (false)"),
    Alias("rollout.name", "rollout.engine", ENGINES),
    Alias("rollout.tensor_model_parallel_size", "rollout.sglang.tensor_parallel"),
    Alias("rollout.gpu_memory_utilization", "rollout.sglang.mem_fraction_static"),
    Alias("trainer.device", "device"),
    Alias("trainer.n_gpus_per_node", None, None, "opd-generate is one process; an SGLang engine takes "
          "rollout.sglang.tensor_parallel GPUs"),
    Alias("trainer.nnodes", None, {"1": None}, "opd-generate runs on one node"),
    *(Alias(f"{prefix}.*", None, REFUSE, "not a main_generation key opd-generate translates (docs/verl_keys.md)")
      for prefix in (ARO, "trainer", "ray_init", "ray_kwargs")),
)

OVERRIDE = re.compile(r"(\+\+|\+|~)?([\w.<>@/-]+?)(?:=(.*))?", re.S)


def _pattern(verl: str) -> re.Pattern:
    return re.compile(re.escape(verl).replace(re.escape("<name>"), r"(?P<name>[^.]+)")
                      .replace(r"\.\*", r"\..+") + "$")


def _find(key: str, table: tuple) -> tuple[Optional[Alias], Optional[str]]:
    """The entry for `key` (exact or `<name>` first, then the longest `.*`) and the teacher's name in it."""
    wide = None
    for alias in table:
        match = _pattern(alias.verl).match(key)
        if match and not alias.verl.endswith(".*"):
            return alias, match.groupdict().get("name")
        if match and (wide is None or len(alias.verl) > len(wide.verl)):
            wide = alias
    return wide, None


def _normal(value: str) -> str:
    return value.strip().strip("'\"").lower()


def _value(alias: Alias, key: str, value: Optional[str]):
    """Our value for a verl value (None where the alias sets nothing); raises VerlKeyError."""
    if alias.values == REFUSE:
        raise VerlKeyError(f"{key}: a verl key this project does not have; {alias.note}")
    if value is None:
        raise VerlKeyError(f"{key}: a verl key is translated as key=value only; leave it out for the default")
    if not isinstance(alias.values, dict):
        return value
    mapped = alias.values.get(_normal(value), Refused(f"must be {' or '.join(alias.values)}"))
    if isinstance(mapped, Refused):
        raise VerlKeyError(f"{key}={value}: {mapped.why}" + (f" ({alias.note})" if alias.note else ""))
    return mapped


def translate(overrides: list[str], table: tuple) -> tuple[list[str], list[str]]:
    """(Hydra overrides in this project's keys, notices of verl keys accepted that set nothing).
    Non-override arguments (--config-name=..., -m) pass unchanged. Raises VerlKeyError, naming the key."""
    parsed = [(token, OVERRIDE.fullmatch(token) if not token.startswith("-") else None) for token in overrides]
    names = {}  # verl teacher name -> whether it has a .key (several, or a key: teachers.<name>.*)
    for _, match in parsed:
        alias, name = _find(match.group(2), table) if match else (None, None)
        if name is not None:
            names[name] = names.get(name, False) or alias.verl.endswith(".key")
    one_teacher = len(names) == 1 and not any(names.values())
    out, notices, setters, given, joins, needs = [], [], {}, {}, {}, []
    for token, match in parsed:
        if not match:
            out.append(token)
            continue
        prefix, key, value = match.groups()
        alias, name = _find(key, table)
        if alias is None or alias.verl == alias.ours:
            if re.match(r"teachers\.[^.]+\.", key) and not prefix:
                prefix = "+"  # Hydra adds a key under the untyped `teachers` only with a `+`
            out.append(f"{prefix or ''}{key}" + ("" if value is None else f"={value}"))
            _claim(setters, key, key)
            continue
        mapped = _value(alias, key, value)
        given[key] = value
        if isinstance(alias.values, Join):
            group = joins.setdefault(alias.values.template, [])
            group.append(key)
            _claim(setters, alias.ours, "/".join(re.findall(r"{([^}]+)}", alias.values.template)))
        elif isinstance(mapped, Needs):
            needs.append((key, value, mapped.key))
        elif alias.ours is None:
            notices.append(f"{key}={value}: accepted, sets nothing: {alias.note}")
        else:
            ours = alias.ours.replace("<name>", name or "")
            if name is not None and one_teacher:
                ours, prefix = ours.replace(f"teachers.{name}.", "teacher.", 1), ""
            elif name is not None:
                prefix = prefix if prefix == "++" else "+"  # as for our own teachers.<name>.* keys above
                if ours.endswith(".data_sources") and not mapped.startswith("["):
                    mapped = f"[{mapped}]"
            elif prefix == "+":
                prefix = ""  # our key exists in the schema, where Hydra refuses to add it
            out.append(f"{prefix or ''}{ours}={mapped}")
            _claim(setters, ours, key)
    for key, value, needed in needs:
        if needed not in given:
            raise VerlKeyError(f"{key}={value}: needs {needed}=PATH (the checkpoint to resume from), or give "
                               f"trainer.resume=PATH")
    for template, keys in joins.items():
        missing = [k for k in re.findall(r"{([^}]+)}", template) if k not in given]
        if missing:
            raise VerlKeyError(f"{keys[0]}: needs {' and '.join(missing)} too (together they name the run's "
                               f"directory, {template}), or give trainer.default_local_dir")
        out.append(f"{_find(keys[0], table)[0].ours}=" + re.sub(r"{([^}]+)}", lambda m: given[m.group(1)], template))
    return out, notices


def _claim(setters: dict, ours: str, name: str) -> None:
    """Refuse a key of ours given under two names (verl's and ours, or two of verl's)."""
    first = setters.setdefault(ours, name)
    if first != name:
        raise VerlKeyError(f"{first} and {name} both set {ours}: give one of them")


def rewrite_argv(table: tuple) -> None:
    """sys.argv[1:] in this project's keys, before Hydra reads it; a refusal ends the process (exit code 2, as
    opd-train's start-up errors)."""
    try:
        sys.argv[1:], notices = translate(sys.argv[1:], table)
    except VerlKeyError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)
    for notice in notices:
        print(f"notice: {notice}", file=sys.stderr, flush=True)


def _values_cell(alias: Alias) -> str:
    if alias.values == REFUSE:
        return "refused"
    if isinstance(alias.values, Join):
        return f"`{alias.values.template}`"
    if not isinstance(alias.values, dict):
        return "any" if alias.ours is None else "as given"
    if alias.ours is None:
        return " or ".join(f"`{v}`" for v in alias.values) + " only"
    return ", ".join(f"`{v}` → " + (f"`{m}`" if isinstance(m, str) else "refused" if isinstance(m, Refused)
                                     else f"`{m.key}`'s") for v, m in alias.values.items())


def markdown() -> str:
    lines = ["# verl's keys", "", "Generated by `python -m megatron_opd.config.verl_keys` from "
             "`megatron_opd/config/verl_keys.py`; `tests/config/test_verl_keys.py` checks it is current. "
             "A key this project does not have is refused by name; one of ours given under two names as well.", ""]
    for title, table in (("opd-train", TRAIN_ALIASES), ("opd-generate (verl's main_generation)", GENERATE_ALIASES)):
        lines += [f"## {title}", "", "| verl key | this project's key | values | note |", "|---|---|---|---|"]
        for a in table:
            ours = f"`{a.ours}`" if a.ours else "—"
            cells = (f"`{a.verl}`", ours, _values_cell(a), a.note)
            lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown(), end="")
