"""A run's typed config: the schema behind `configs/distillation_trainer.yaml` (which only overrides).
Every section validates itself when built, so a bad value fails before any model exists, naming its key.
Where a setting is resolved from others (the divergence's temperature, the teacher's layout), the one
function that does it is here."""
from dataclasses import dataclass, field
from typing import Any, Optional

from megatron_opd.data.config import DataConfig
from megatron_opd.data.scorers import ENV_REWARD, NO_REWARD, reward_function
from megatron_opd.loss.distillation import AGG_MODES
from megatron_opd.loss.kinds import FULL_KINDS, KL_LOSS_TYPES, SAMPLED_KINDS, TOPK_KINDS, named
from megatron_opd.models.builder import AUX_LOSS_TYPES
from megatron_opd.parallel import DEVICE_KINDS, ParallelConfig
from megatron_opd.config.checks import ConfigError, check, check_url, one_of
from megatron_opd.config.models import (
    MODEL_DTYPES, SINGLE_TEACHER, TEACHER_ENGINES, ModelConfig, TeacherConfig, TeacherParallelConfig, TeacherRouting,
    parse_teachers)
from megatron_opd.rollout.envs.factory import EnvConfigError, make_env_factory
from megatron_opd.rollout.sglang_server import SGLangConfig

LR_DECAY = ("constant", "linear", "cosine")
POLICY_LOSSES = ("direct", "pg")
IS_MODES = ("truncate", "mask")
LOGGERS = ("console", "jsonl", "tensorboard", "wandb")
DOCTOR_MODES = ("off", "warn", "strict")
DEFAULT_TOTAL_STEPS = 10


@dataclass
class RolloutConfig:
    engine: str = "local"  # local (embedded, in-process) | sglang
    n: int = 1
    temperature: float = 0.6
    top_p: float = 1.0
    top_k: int = -1
    # The response's tokens; with rollout.env, the whole conversation's after its prompt (the environment's
    # included), each turn sampling at most what is left.
    response_length: int = 256
    # Multi-turn rollouts: an environment answers between the student's turns (rollout/conversation.py).
    # walk | tools | module:Class (rollout/envs/factory.py); null: one response per prompt.
    env: Optional[str] = None
    max_turns: int = 8  # assistant turns of a conversation (rollout.env)
    # A turn's tokens (rollout.env): a turn cut there is closed with its end token (no loss) and answered;
    # null: what is left of response_length, and a turn cut there ends the conversation.
    max_turn_tokens: Optional[int] = None
    env_timeout_s: float = 30.0  # an environment call that takes longer fails its conversation
    sglang: SGLangConfig = field(default_factory=SGLangConfig)  # engine=sglang: the server rank 0 starts
    # engine=sglang: a server already running (null: rank 0 starts one). This run pushes the student's weights
    # to it and never starts or stops it: it must serve the student's architecture, for this run alone.
    url: Optional[str] = None
    # Bounded staleness: step s trains on samples the engine drew from the weights of step max(0, s - k), made
    # while the trainer updates (trainer/prefetch.py); 0: generate, then train, in turn.
    max_staleness: int = 0

    def __post_init__(self):
        one_of("rollout.engine", self.engine, ("local", "sglang"))
        check(self.max_staleness >= 0, "rollout.max_staleness", self.max_staleness, "must be >= 0")
        check(self.url is None or self.engine == "sglang", "rollout.url", self.url,
               "names an SGLang server: set rollout.engine=sglang, or rollout.url=null")
        check_url("rollout.url", self.url)
        check(self.n >= 1, "rollout.n", self.n, "must be >= 1")
        check(self.temperature > 0, "rollout.temperature", self.temperature, "must be > 0 (on-policy sampling)")
        check(0 < self.top_p <= 1, "rollout.top_p", self.top_p, "must be in (0, 1]")
        check(self.response_length >= 1, "rollout.response_length", self.response_length, "must be >= 1")
        check(self.max_turns >= 1, "rollout.max_turns", self.max_turns, "must be >= 1")
        check(self.max_turn_tokens is None or self.max_turn_tokens >= 1, "rollout.max_turn_tokens",
              self.max_turn_tokens, "must be null or >= 1")
        check(self.env_timeout_s > 0, "rollout.env_timeout_s", self.env_timeout_s, "must be > 0")
        if self.env is not None:
            try:
                make_env_factory(self.env)
            except EnvConfigError as err:
                raise ConfigError(str(err)) from None


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
        check(self.lr > 0, "actor.optim.lr", self.lr, "must be > 0")
        check(0 <= self.min_lr <= self.lr, "actor.optim.min_lr", self.min_lr, "must be in [0, lr]")
        check(self.warmup_steps >= 0, "actor.optim.warmup_steps", self.warmup_steps, "must be >= 0")
        one_of("actor.optim.lr_decay", self.lr_decay, LR_DECAY)


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
    # pg, and direct with a sampled kind: the trainer/engine ratio of each sampled token as an importance weight,
    # truncated at is_cap (is_mode=truncate) or 0 outside [1 / is_cap, is_cap] (mask). null: measured (mismatch/*,
    # pg and rollout.max_staleness > 0), not applied.
    is_cap: Optional[float] = None
    is_mode: str = "truncate"
    # verl's distillation_loss clamps: each token's divergence (or pg's per-token reverse KL) clamped to
    # [-loss_max_clamp, loss_max_clamp], no gradient where it binds; the sampled and top-k kinds' log-probs,
    # both sides, floored at log_prob_min_clamp before the estimator. null: none.
    loss_max_clamp: Optional[float] = None
    log_prob_min_clamp: Optional[float] = None
    grad_clip: float = 1.0
    recompute: str = "none"
    # A mixture-of-experts student's router load-balancing loss (megatron's switch loss, summed over its MoE
    # layers). null: the student's config.json router_aux_loss_coef (0 for a dense student). The teacher has none.
    moe_aux_loss_coef: Optional[float] = None
    moe_aux_loss_type: str = "aux_loss"  # aux_loss: over each micro-batch's tokens | seq_aux_loss: each sequence's
    moe_z_loss_coef: float = 0.0  # the router z-loss (ST-MoE: the squared log-sum-exp of its logits); 0: none
    optim: OptimConfig = field(default_factory=OptimConfig)

    def __post_init__(self):
        one_of("actor.kl_loss_type", self.kl_loss_type, KL_LOSS_TYPES)
        one_of("actor.loss_agg_mode", self.loss_agg_mode, AGG_MODES)
        one_of("actor.recompute", self.recompute, ("none", "selective", "full"))
        check(0 <= self.jsd_beta <= 1, "actor.jsd_beta", self.jsd_beta, "must be in [0, 1]")
        check(self.kl_temperature is None or self.kl_temperature > 0, "actor.kl_temperature", self.kl_temperature,
               "must be null (rollout.temperature) or > 0")
        check(self.kl_loss_type not in TOPK_KINDS or self.topk >= 1, "actor.topk", self.topk,
               f"must be >= 1 with actor.kl_loss_type={self.kl_loss_type}")
        check(self.ppo_epochs >= 1, "actor.ppo_epochs", self.ppo_epochs, "must be >= 1")
        check(self.micro_batch_size >= 1, "actor.micro_batch_size", self.micro_batch_size, "must be >= 1")
        check(self.max_tokens_per_micro_batch is None or self.max_tokens_per_micro_batch >= 1,
               "actor.max_tokens_per_micro_batch", self.max_tokens_per_micro_batch, "must be null or >= 1")
        check(self.ppo_mini_batch_size is None or self.ppo_mini_batch_size >= 1, "actor.ppo_mini_batch_size",
               self.ppo_mini_batch_size, "must be null or >= 1")
        check(0 <= self.lmbda <= 1, "actor.lmbda", self.lmbda, "must be in [0, 1] (1: on-policy)")
        check(self.grad_clip >= 0, "actor.grad_clip", self.grad_clip, "must be >= 0 (0 disables clipping)")
        check(self.moe_aux_loss_coef is None or self.moe_aux_loss_coef >= 0, "actor.moe_aux_loss_coef",
              self.moe_aux_loss_coef, "must be null (the student's router_aux_loss_coef) or >= 0")
        one_of("actor.moe_aux_loss_type", self.moe_aux_loss_type, AUX_LOSS_TYPES)
        check(self.moe_z_loss_coef >= 0, "actor.moe_z_loss_coef", self.moe_z_loss_coef, "must be >= 0 (0: none)")
        one_of("actor.policy_loss", self.policy_loss, POLICY_LOSSES)
        check(self.loss_max_clamp is None or self.loss_max_clamp > 0, "actor.loss_max_clamp", self.loss_max_clamp,
              "must be null (no clamp) or > 0")
        check(self.log_prob_min_clamp is None or self.log_prob_min_clamp < 0, "actor.log_prob_min_clamp",
              self.log_prob_min_clamp, "must be null (no floor) or < 0 (a log-prob)")
        check(self.log_prob_min_clamp is None or self.kl_loss_type not in FULL_KINDS, "actor.log_prob_min_clamp",
              self.log_prob_min_clamp, f"floors the log-probs the sampled and top-k kinds take; "
              f"actor.kl_loss_type={self.kl_loss_type} is exact over the whole vocabulary: set it to null")
        one_of("actor.is_mode", self.is_mode, IS_MODES)
        check(0 <= self.kl_discount <= 1, "actor.kl_discount", self.kl_discount, "must be in [0, 1]")
        check(self.clip_ratio > 0, "actor.clip_ratio", self.clip_ratio, "must be > 0")
        check(self.is_cap is None or self.is_cap > 1, "actor.is_cap", self.is_cap,
               "must be null (measure the mismatch only) or > 1")
        check(self.is_cap is None or self.policy_loss == "pg" or self.kl_loss_type in SAMPLED_KINDS, "actor.is_cap",
              self.is_cap, f"weights sampled tokens; with actor.policy_loss=direct it corrects the sampled kinds "
              f"({named(SAMPLED_KINDS)}) only, and actor.kl_loss_type={self.kl_loss_type} is not one: set it to "
              f"null (the mismatch is still measured)")
        check(self.policy_loss == "direct" or self.kl_loss_type not in TOPK_KINDS, "actor.kl_loss_type",
               self.kl_loss_type, "actor.policy_loss=pg needs the teacher's log-prob of each sampled token, which "
               f"a top-k teacher need not hold: use a sampled-token kind ({named(SAMPLED_KINDS)}) or a full one "
               f"({named(FULL_KINDS)})")


@dataclass
class RewardConfig:
    # none | gsm8k (the answer after "####") | data_source (each row's scorer) | module:function
    # (fn(data_source, solution_str, ground_truth) -> float), see data/scorers.py | env (rollout.env's reward)
    fn: str = NO_REWARD
    coef: float = 1.0  # actor.policy_loss=pg: the advantage gains coef x (reward - the mean of its prompt's samples)

    def __post_init__(self):
        if self.fn not in (NO_REWARD, ENV_REWARD):
            try:
                reward_function(self.fn)
            except ValueError as err:
                raise ConfigError(f"reward.fn={self.fn!r}: {err}") from None
        check(self.coef >= 0, "reward.coef", self.coef, "must be >= 0")


@dataclass
class TrainerConfig:
    mode: str = "distill"  # distill (on-policy, from the teacher) | sft (cross-entropy on given responses)
    # null: total_epochs passes over data.train_files, or 10 steps; set, it caps total_epochs (verl's
    # total_training_steps)
    total_steps: Optional[int] = None
    total_epochs: Optional[int] = None
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
    # opd-doctor's cheap checks at start-up: off | warn (print what they find) | strict (a failing check stops)
    doctor: str = "off"

    def __post_init__(self):
        one_of("trainer.mode", self.mode, ("distill", "sft"))
        one_of("trainer.device", self.device, DEVICE_KINDS)
        check(self.total_steps is None or self.total_steps >= 1, "trainer.total_steps", self.total_steps,
              "must be null or >= 1")
        check(self.total_epochs is None or self.total_epochs >= 1, "trainer.total_epochs", self.total_epochs,
              "must be null or >= 1")
        if self.total_steps is None and self.total_epochs is None:
            self.total_steps = DEFAULT_TOTAL_STEPS
        one_of("trainer.doctor", self.doctor, DOCTOR_MODES)
        check(self.collective_timeout_s > 0, "trainer.collective_timeout_s", self.collective_timeout_s, "must be > 0")
        for key in ("save_freq", "test_freq", "exit_interval"):
            check(getattr(self, key) >= 0, f"trainer.{key}", getattr(self, key), "must be >= 0")
        for sink in self.logger:
            one_of("trainer.logger", sink, LOGGERS)


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
    # Several teachers, each scoring the rows of its data sources (config/models.py): a map name -> teacher
    # section (the keys of teacher.*, with data_sources and default), or a list of sections with a name each.
    teachers: Optional[Any] = None

    def __post_init__(self):
        check(bool(self.student.path), "student.path", self.student.path, "is required (an HF or converted model)")
        check(self.data.train_files is not None, "data.train_files", None, "is required (parquet/jsonl prompts)")
        self.teachers = parse_teachers(self.teachers)
        check(not self.teachers or not self.teacher.path, "teacher.path", self.teacher.path,
              f"and teachers ({', '.join(self.teachers)}) are both set: give the one teacher as teacher.* or every "
              f"teacher under teachers")
        if self.trainer.mode == "distill":
            check(bool(self.teacher.path) or bool(self.teachers), "teacher.path", self.teacher.path,
                  "is required with trainer.mode=distill (or several teachers under teachers)")
            for name, teacher in run_teachers(self).items():
                self._check_served(teacher, teacher_key(self, name))
        batch = self.data.train_batch_size
        mini = self.actor.ppo_mini_batch_size or batch
        check(batch % mini == 0, "actor.ppo_mini_batch_size", mini,
               f"must divide data.train_batch_size={batch}")
        check(self.trainer.mode != "sft" or bool(self.data.response_key), "data.response_key",
               self.data.response_key, "is required with trainer.mode=sft (e.g. extra_info.answer)")
        check(self.trainer.mode != "distill" or self.actor.lmbda == 1 or bool(self.data.response_key),
               "data.response_key", self.data.response_key, f"is required with actor.lmbda={self.actor.lmbda} < 1: the "
               f"responses of the prompts the student does not answer (teacher samples from opd-generate, or the "
               f"dataset's, e.g. extra_info.answer)")
        check(self.trainer.test_freq == 0 or self.data.val_files is not None, "trainer.test_freq",
               self.trainer.test_freq, "needs data.val_files")
        self._check_environment()
        self._check_policy_gradient()

    def _check_served(self, teacher: TeacherConfig, key: str) -> None:
        """A served teacher sends neither the whole distribution nor log-probs at another temperature than 1."""
        if teacher.engine != "sglang":
            return
        check(self.actor.kl_loss_type not in FULL_KINDS, "actor.kl_loss_type", self.actor.kl_loss_type,
              f"needs the teacher's whole distribution, which a served teacher ({key}.engine=sglang) does not send: "
              f"use a sampled-token kind ({named(SAMPLED_KINDS)}), {named(TOPK_KINDS)} with actor.topk, or "
              f"{key}.engine=megatron")
        temperature = divergence_temperature(self)
        check(temperature == 1.0, "actor.kl_temperature", self.actor.kl_temperature, f"the divergence would run at "
              f"temperature {temperature:g} (null: rollout.temperature), but a served teacher ({key}.engine=sglang) "
              f"scores at 1: SGLang applies no temperature to the log-probs of given tokens. Set "
              f"actor.kl_temperature=1.0 (the student then enters at 1 too), or use {key}.engine=megatron")

    def _check_environment(self):
        check(self.rollout.max_staleness == 0 or self.trainer.mode == "distill", "rollout.max_staleness",
              self.rollout.max_staleness, "draws the student's samples ahead; trainer.mode=sft trains on given "
              "responses and draws none: set it to 0")
        env = self.rollout.env
        check(env is None or self.trainer.mode == "distill", "rollout.env", env, "rolls out conversations for "
              "trainer.mode=distill; SFT trains on given responses: set rollout.env=null")
        check(self.reward.fn != ENV_REWARD or env is not None, "reward.fn", self.reward.fn, "is the environment's "
              "reward: set rollout.env")
        check(env is None or self.reward.fn in (NO_REWARD, ENV_REWARD), "reward.fn", self.reward.fn,
              f"must be {NO_REWARD} or {ENV_REWARD} with rollout.env={env}: a conversation's reward is its "
              f"environment's")

    def _check_policy_gradient(self):
        actor, pg = self.actor, self.actor.policy_loss == "pg"
        check(self.reward.fn == NO_REWARD or pg, "reward.fn", self.reward.fn, "needs actor.policy_loss=pg: a task "
               "reward enters only the policy-gradient loss's advantages")
        check(self.reward.fn == NO_REWARD or self.rollout.n >= 2, "rollout.n", self.rollout.n, f"must be >= 2 with "
               f"reward.fn={self.reward.fn}: a reward's baseline is the mean over the samples of its prompt")
        if not pg:
            return
        check(self.trainer.mode == "distill", "actor.policy_loss", "pg", "trains on the student's own samples: "
               "use trainer.mode=distill")
        check(actor.lmbda == 1, "actor.lmbda", actor.lmbda, "must be 1 with actor.policy_loss=pg: a policy "
               "gradient needs the student's own samples (given responses have no sampling log-probs)")
        temperature = divergence_temperature(self)
        check(temperature == self.rollout.temperature, "actor.kl_temperature", actor.kl_temperature,
               f"must be null or rollout.temperature={self.rollout.temperature} with actor.policy_loss=pg: the "
               f"advantages and ratios are those of the distribution the samples were drawn from")
        check(actor.kl_discount == 0 or self.parallel.context == 1, "actor.kl_discount", actor.kl_discount,
               f"must be 0 with parallel.context={self.parallel.context}: a discounted sum runs over the whole "
               f"response, which context parallelism splits across ranks")


def run_teachers(cfg: OPDConfig) -> dict[str, TeacherConfig]:
    """The run's teachers by name: `teachers`, or `teacher.*` as the one teacher named SINGLE_TEACHER."""
    return dict(cfg.teachers) if cfg.teachers else {SINGLE_TEACHER: cfg.teacher}


def teacher_key(cfg: OPDConfig, name: str) -> str:
    """A teacher's place in the config, as messages name its keys: teacher (the one of teacher.*) or
    teachers.<name>."""
    return "teachers." + name if cfg.teachers else SINGLE_TEACHER


def teacher_layout(cfg: OPDConfig, teacher: Optional[TeacherConfig] = None) -> Optional[ParallelConfig]:
    """A Megatron teacher's own layout (`teacher`, default teacher.*), or None where it is the student's
    (co-located: the student's groups, CP included, and micro-batches). Its unset tensor and pipeline sizes are
    the student's; its unset expert size is 1 (whole experts on each rank: a dense teacher has none to spread)."""
    own = (teacher or cfg.teacher).parallel
    student = cfg.parallel
    tensor, pipeline = own.tensor or student.tensor, own.pipeline or student.pipeline
    if (tensor, pipeline) == (student.tensor, student.pipeline) and own.expert in (None, student.expert):
        return None
    return ParallelConfig(tensor=tensor, pipeline=pipeline, expert=own.expert or 1,
                          token_dispatcher=student.token_dispatcher)


def divergence_temperature(cfg: OPDConfig) -> float:
    """The temperature at which both the student's and the teacher's distributions enter the divergence."""
    return cfg.actor.kl_temperature or cfg.rollout.temperature


def to_config(raw: Any) -> OPDConfig:
    """OmegaConf/Hydra config -> validated OPDConfig (raises ConfigError and friends, naming the key)."""
    from omegaconf import OmegaConf

    return OmegaConf.to_object(raw) if not isinstance(raw, OPDConfig) else raw
