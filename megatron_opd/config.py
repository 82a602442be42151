"""A run's typed config: the schema behind `configs/distillation_trainer.yaml` (which only overrides).
Every section validates itself when built, so a bad value fails before any model exists, naming its key.
Where a setting is resolved from others (the divergence's temperature, the teacher's layout), the one
function that does it is here."""
from dataclasses import dataclass, field
from typing import Any, Optional

from megatron_opd.data.config import DataConfig
from megatron_opd.data.scorers import NO_REWARD, reward_function
from megatron_opd.loss.distillation import AGG_MODES
from megatron_opd.loss.kinds import FULL_KINDS, KL_LOSS_TYPES, SAMPLED_KINDS, TOPK_KINDS, named
from megatron_opd.parallel import DEVICE_KINDS, ParallelConfig
from megatron_opd.rollout.sglang_server import SGLangConfig

LR_DECAY = ("constant", "linear", "cosine")
POLICY_LOSSES = ("direct", "pg")
IS_MODES = ("truncate", "mask")
LOGGERS = ("console", "jsonl", "tensorboard", "wandb")
MODEL_DTYPES = ("float32", "bfloat16")


class ConfigError(ValueError):
    """A value that cannot work; the message names the key and what to change."""


def _check(condition: bool, key: str, value, need: str) -> None:
    if not condition:
        raise ConfigError(f"{key}={value!r}: {need}")


def _one_of(key: str, value, choices) -> None:
    _check(value in choices, key, value, f"must be one of {'|'.join(choices)}")


def _check_url(key: str, url: Optional[str]) -> None:
    _check(url is None or url.startswith(("http://", "https://")), key, url,
           "must be the server's http(s):// address, e.g. http://127.0.0.1:30000")


@dataclass
class ModelConfig:
    path: Optional[str] = None  # an HF model directory or a converted Megatron checkpoint
    dtype: Optional[str] = None  # null: the checkpoint's own (config.json's torch_dtype)

    def __post_init__(self):
        if self.dtype is not None:
            _one_of("model.dtype", self.dtype, MODEL_DTYPES)


@dataclass
class TeacherParallelConfig:
    tensor: Optional[int] = None  # null: the student's parallel.tensor
    pipeline: Optional[int] = None  # null: the student's parallel.pipeline

    def __post_init__(self):
        for key in ("tensor", "pipeline"):
            value = getattr(self, key)
            _check(value is None or (isinstance(value, int) and value >= 1), f"teacher.parallel.{key}", value,
                   "must be null (the student's) or an integer >= 1")


TEACHER_ENGINES = ("megatron", "sglang")


@dataclass
class TeacherConfig(ModelConfig):
    engine: str = "megatron"  # megatron: on the trainer's ranks | sglang: its own SGLang server
    parallel: TeacherParallelConfig = field(default_factory=TeacherParallelConfig)  # engine=megatron
    url: Optional[str] = None  # engine=sglang: a server already serving the teacher (null: rank 0 starts one)
    sglang: SGLangConfig = field(default_factory=SGLangConfig)  # engine=sglang: the server rank 0 starts

    def __post_init__(self):
        super().__post_init__()
        _one_of("teacher.engine", self.engine, TEACHER_ENGINES)
        _check(self.url is None or self.engine == "sglang", "teacher.url", self.url,
               "names a served teacher's SGLang server: set teacher.engine=sglang, or teacher.url=null")
        _check_url("teacher.url", self.url)
        for key in ("tensor", "pipeline"):
            _check(self.engine == "megatron" or getattr(self.parallel, key) is None, f"teacher.parallel.{key}",
                   getattr(self.parallel, key), "is the Megatron teacher's layout; a served teacher "
                   "(teacher.engine=sglang) takes its GPUs from teacher.sglang (tensor_parallel, base_gpu_id)")


@dataclass
class RolloutConfig:
    engine: str = "local"  # local (embedded, in-process) | sglang
    n: int = 1
    temperature: float = 0.6
    top_p: float = 1.0
    top_k: int = -1
    response_length: int = 256
    sglang: SGLangConfig = field(default_factory=SGLangConfig)  # engine=sglang: the server rank 0 starts
    # engine=sglang: a server already running (null: rank 0 starts one). This run pushes the student's weights
    # to it and never starts or stops it: it must serve the student's architecture, for this run alone.
    url: Optional[str] = None

    def __post_init__(self):
        _one_of("rollout.engine", self.engine, ("local", "sglang"))
        _check(self.url is None or self.engine == "sglang", "rollout.url", self.url,
               "names an SGLang server: set rollout.engine=sglang, or rollout.url=null")
        _check_url("rollout.url", self.url)
        _check(self.n >= 1, "rollout.n", self.n, "must be >= 1")
        _check(self.temperature > 0, "rollout.temperature", self.temperature, "must be > 0 (on-policy sampling)")
        _check(0 < self.top_p <= 1, "rollout.top_p", self.top_p, "must be in (0, 1]")
        _check(self.response_length >= 1, "rollout.response_length", self.response_length, "must be >= 1")


@dataclass
class OptimConfig:
    lr: float = 1e-5
    min_lr: float = 0.0
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    warmup_steps: int = 0
    lr_decay: str = "constant"

    def __post_init__(self):
        _check(self.lr > 0, "actor.optim.lr", self.lr, "must be > 0")
        _check(0 <= self.min_lr <= self.lr, "actor.optim.min_lr", self.min_lr, "must be in [0, lr]")
        _check(self.warmup_steps >= 0, "actor.optim.warmup_steps", self.warmup_steps, "must be >= 0")
        _one_of("actor.optim.lr_decay", self.lr_decay, LR_DECAY)


@dataclass
class ActorConfig:
    kl_loss_type: str = "low_var_kl"
    kl_loss_coef: float = 1.0
    # Both distributions enter the divergence at this temperature; null: rollout.temperature (see README).
    kl_temperature: Optional[float] = None
    jsd_beta: float = 0.5
    topk: int = 0  # the teacher's support for topk_forward/topk_reverse
    entropy_coeff: float = 0.0
    loss_agg_mode: str = "token-mean"
    ppo_epochs: int = 1
    ppo_mini_batch_size: Optional[int] = None  # prompts per optimizer step; null: the whole batch
    micro_batch_size: int = 1  # sequences per forward/backward
    # Instead: sequences grouped by length into micro-batches of at most this many (padded) tokens, each padded
    # only to its own longest sequence (verl's ppo_max_token_len_per_gpu). null: micro_batch_size.
    max_tokens_per_micro_batch: Optional[int] = None
    # GKD's lambda: the share of each batch's prompts answered by the student's own samples; the others keep
    # their given response (data.response_key: teacher samples from opd-generate, or the dataset's). 1:
    # on-policy distillation; 0: supervised KD, the same divergence on given responses.
    lmbda: float = 1.0
    # direct: the divergence's own gradient | pg: a policy gradient whose per-token advantage is the reverse KL
    # of the sampled token, -kl_loss_coef (log pi - log pi_T), plus reward.coef (r - its group's mean) with
    # reward.fn set; PPO-clipped at clip_ratio (README, "Policy-gradient OPD").
    policy_loss: str = "direct"
    kl_discount: float = 0.0  # pg: each advantage adds the later tokens' KL at this discount (0: its own only)
    clip_ratio: float = 0.2  # pg: pi / pi_old is clipped to [1 - clip_ratio, 1 + clip_ratio]
    # pg: the trainer/engine ratio of each sampled token as an importance weight, truncated at is_cap
    # (is_mode=truncate) or 0 outside [1 / is_cap, is_cap] (mask). null: measured (mismatch/*), not applied.
    is_cap: Optional[float] = None
    is_mode: str = "truncate"
    grad_clip: float = 1.0
    recompute: str = "none"
    optim: OptimConfig = field(default_factory=OptimConfig)

    def __post_init__(self):
        _one_of("actor.kl_loss_type", self.kl_loss_type, KL_LOSS_TYPES)
        _one_of("actor.loss_agg_mode", self.loss_agg_mode, AGG_MODES)
        _one_of("actor.recompute", self.recompute, ("none", "selective", "full"))
        _check(0 <= self.jsd_beta <= 1, "actor.jsd_beta", self.jsd_beta, "must be in [0, 1]")
        _check(self.kl_temperature is None or self.kl_temperature > 0, "actor.kl_temperature", self.kl_temperature,
               "must be null (rollout.temperature) or > 0")
        _check(self.kl_loss_type not in TOPK_KINDS or self.topk >= 1, "actor.topk", self.topk,
               f"must be >= 1 with actor.kl_loss_type={self.kl_loss_type}")
        _check(self.ppo_epochs >= 1, "actor.ppo_epochs", self.ppo_epochs, "must be >= 1")
        _check(self.micro_batch_size >= 1, "actor.micro_batch_size", self.micro_batch_size, "must be >= 1")
        _check(self.max_tokens_per_micro_batch is None or self.max_tokens_per_micro_batch >= 1,
               "actor.max_tokens_per_micro_batch", self.max_tokens_per_micro_batch, "must be null or >= 1")
        _check(self.ppo_mini_batch_size is None or self.ppo_mini_batch_size >= 1, "actor.ppo_mini_batch_size",
               self.ppo_mini_batch_size, "must be null or >= 1")
        _check(0 <= self.lmbda <= 1, "actor.lmbda", self.lmbda, "must be in [0, 1] (1: on-policy)")
        _check(self.grad_clip >= 0, "actor.grad_clip", self.grad_clip, "must be >= 0 (0 disables clipping)")
        _one_of("actor.policy_loss", self.policy_loss, POLICY_LOSSES)
        _one_of("actor.is_mode", self.is_mode, IS_MODES)
        _check(0 <= self.kl_discount <= 1, "actor.kl_discount", self.kl_discount, "must be in [0, 1]")
        _check(self.clip_ratio > 0, "actor.clip_ratio", self.clip_ratio, "must be > 0")
        _check(self.is_cap is None or self.is_cap > 1, "actor.is_cap", self.is_cap,
               "must be null (measure the mismatch only) or > 1")
        _check(self.policy_loss == "direct" or self.kl_loss_type not in TOPK_KINDS, "actor.kl_loss_type",
               self.kl_loss_type, "actor.policy_loss=pg needs the teacher's log-prob of each sampled token, which "
               f"a top-k teacher need not hold: use a sampled-token kind ({named(SAMPLED_KINDS)}) or a full one "
               f"({named(FULL_KINDS)})")


@dataclass
class RewardConfig:
    # none | gsm8k (the answer after "####") | data_source (each row's scorer) | module:function
    # (fn(data_source, solution_str, ground_truth) -> float), see data/scorers.py
    fn: str = NO_REWARD
    coef: float = 1.0  # actor.policy_loss=pg: the advantage gains coef x (reward - the mean of its prompt's samples)

    def __post_init__(self):
        if self.fn != NO_REWARD:
            try:
                reward_function(self.fn)
            except ValueError as err:
                raise ConfigError(f"reward.fn={self.fn!r}: {err}") from None
        _check(self.coef >= 0, "reward.coef", self.coef, "must be >= 0")


@dataclass
class TrainerConfig:
    mode: str = "distill"  # distill (on-policy, from the teacher) | sft (cross-entropy on given responses)
    total_steps: int = 10
    save_freq: int = 0  # 0: only at the end
    test_freq: int = 0  # 0: never
    save_dir: str = "runs/opd"
    resume: str = "auto"  # auto | never | PATH of a checkpoint
    logger: list[str] = field(default_factory=lambda: ["console", "jsonl"])
    seed: int = 1
    export_hf: bool = True  # write the final student as an HF checkpoint
    val_max_new_tokens: Optional[int] = None  # null: rollout.response_length
    device: str = "auto"  # auto (CUDA when usable, else CPU with a notice) | cuda | cpu
    # Every collective's limit, including the other ranks' wait while rank 0 generates a step's rollouts.
    collective_timeout_s: float = 1800.0
    exit_interval: int = 0  # stop with a checkpoint after every step divisible by it (0: never)
    # Rank 0 writes each step's sequences (ids, text, reward) to <rollout_data_dir>/<step>.jsonl (null: none)
    rollout_data_dir: Optional[str] = None

    def __post_init__(self):
        _one_of("trainer.mode", self.mode, ("distill", "sft"))
        _one_of("trainer.device", self.device, DEVICE_KINDS)
        _check(self.total_steps >= 1, "trainer.total_steps", self.total_steps, "must be >= 1")
        _check(self.collective_timeout_s > 0, "trainer.collective_timeout_s", self.collective_timeout_s, "must be > 0")
        for key in ("save_freq", "test_freq", "exit_interval"):
            _check(getattr(self, key) >= 0, f"trainer.{key}", getattr(self, key), "must be >= 0")
        for sink in self.logger:
            _one_of("trainer.logger", sink, LOGGERS)


@dataclass
class OPDConfig:
    student: ModelConfig = field(default_factory=ModelConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    actor: ActorConfig = field(default_factory=ActorConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)

    def __post_init__(self):
        _check(bool(self.student.path), "student.path", self.student.path, "is required (an HF or converted model)")
        _check(self.data.train_files is not None, "data.train_files", None, "is required (parquet/jsonl prompts)")
        if self.trainer.mode == "distill":
            _check(bool(self.teacher.path), "teacher.path", self.teacher.path, "is required with trainer.mode=distill")
            _check(self.teacher.engine != "sglang" or self.actor.kl_loss_type not in FULL_KINDS, "actor.kl_loss_type",
                   self.actor.kl_loss_type, "needs the teacher's whole distribution, which a served teacher "
                   f"(teacher.engine=sglang) does not send: use a sampled-token kind ({named(SAMPLED_KINDS)}), "
                   f"{named(TOPK_KINDS)} with actor.topk, or teacher.engine=megatron")
            temperature = divergence_temperature(self)
            _check(self.teacher.engine != "sglang" or temperature == 1.0, "actor.kl_temperature",
                   self.actor.kl_temperature, f"the divergence would run at temperature {temperature:g} (null: "
                   f"rollout.temperature), but a served teacher (teacher.engine=sglang) scores at 1: SGLang applies no "
                   f"temperature to the log-probs of given tokens. Set actor.kl_temperature=1.0 (the student then "
                   f"enters at 1 too), or use teacher.engine=megatron")
        batch = self.data.train_batch_size
        mini = self.actor.ppo_mini_batch_size or batch
        _check(batch % mini == 0, "actor.ppo_mini_batch_size", mini,
               f"must divide data.train_batch_size={batch}")
        _check(self.trainer.mode != "sft" or bool(self.data.response_key), "data.response_key",
               self.data.response_key, "is required with trainer.mode=sft (e.g. extra_info.answer)")
        _check(self.trainer.mode != "distill" or self.actor.lmbda == 1 or bool(self.data.response_key),
               "data.response_key", self.data.response_key, f"is required with actor.lmbda={self.actor.lmbda} < 1: the "
               f"responses of the prompts the student does not answer (teacher samples from opd-generate, or the "
               f"dataset's, e.g. extra_info.answer)")
        _check(self.trainer.test_freq == 0 or self.data.val_files is not None, "trainer.test_freq",
               self.trainer.test_freq, "needs data.val_files")
        self._check_policy_gradient()

    def _check_policy_gradient(self):
        actor, pg = self.actor, self.actor.policy_loss == "pg"
        _check(self.reward.fn == NO_REWARD or pg, "reward.fn", self.reward.fn, "needs actor.policy_loss=pg: a task "
               "reward enters only the policy-gradient loss's advantages")
        _check(self.reward.fn == NO_REWARD or self.rollout.n >= 2, "rollout.n", self.rollout.n, f"must be >= 2 with "
               f"reward.fn={self.reward.fn}: a reward's baseline is the mean over the samples of its prompt")
        if not pg:
            return
        _check(self.trainer.mode == "distill", "actor.policy_loss", "pg", "trains on the student's own samples: "
               "use trainer.mode=distill")
        _check(actor.lmbda == 1, "actor.lmbda", actor.lmbda, "must be 1 with actor.policy_loss=pg: a policy "
               "gradient needs the student's own samples (given responses have no sampling log-probs)")
        temperature = divergence_temperature(self)
        _check(temperature == self.rollout.temperature, "actor.kl_temperature", actor.kl_temperature,
               f"must be null or rollout.temperature={self.rollout.temperature} with actor.policy_loss=pg: the "
               f"advantages and ratios are those of the distribution the samples were drawn from")
        _check(actor.kl_discount == 0 or self.parallel.context == 1, "actor.kl_discount", actor.kl_discount,
               f"must be 0 with parallel.context={self.parallel.context}: a discounted sum runs over the whole "
               f"response, which context parallelism splits across ranks")


def teacher_layout(cfg: OPDConfig) -> Optional[ParallelConfig]:
    """The Megatron teacher's own layout, or None where it is the student's (co-located: the student's groups,
    CP included, and micro-batches). teacher.parallel's unset sizes are the student's."""
    own = cfg.teacher.parallel
    tensor, pipeline = own.tensor or cfg.parallel.tensor, own.pipeline or cfg.parallel.pipeline
    if (tensor, pipeline) == (cfg.parallel.tensor, cfg.parallel.pipeline):
        return None
    return ParallelConfig(tensor=tensor, pipeline=pipeline)


def divergence_temperature(cfg: OPDConfig) -> float:
    """The temperature at which both the student's and the teacher's distributions enter the divergence."""
    return cfg.actor.kl_temperature or cfg.rollout.temperature


def to_config(raw: Any) -> OPDConfig:
    """OmegaConf/Hydra config -> validated OPDConfig (raises ConfigError and friends, naming the key)."""
    from omegaconf import OmegaConf

    return OmegaConf.to_object(raw) if not isinstance(raw, OPDConfig) else raw
