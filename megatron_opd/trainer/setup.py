"""Everything a run holds, built in the order that fails fastest: config and layout checks, then data,
then the parallel layout and its device, models (student, co-located teacher), optimizer, engine, resume,
metric sinks."""
import dataclasses
import json
import os

import torch

from checkpoint_tools.pretrained import checkpoint_dtype, is_hf_dir, load_pretrained
from megatron_opd.config import (
    MODEL_DTYPES, ConfigError, ModelConfig, OPDConfig, TeacherRouting, run_teachers, teacher_key, teacher_layout)
from megatron_opd.data.prompt_dataset import PromptDataset
from megatron_opd.data.sampler import PromptSampler
from megatron_opd.data.scorers import mean_score
from megatron_opd.loss.kinds import FULL_KINDS, SAMPLED_KINDS, TOPK_KINDS, named
from megatron_opd.models import RouterLoss, load_arch, padded_vocab_size
from megatron_opd.models.batch import response_loss_mask
from megatron_opd.parallel import DeviceError, ParallelConfig, current_device, initialize_model_parallel
from megatron_opd.rollout.conversation import MultiTurn
from megatron_opd.rollout.factory import make_engine
from megatron_opd.rollout.engine import SamplingParams
from megatron_opd.rollout.hf_dir import HFDirWriter
from megatron_opd.rollout.sglang_server import unserved_layers_problem
from megatron_opd.teacher import RoutedTeachers, make_teacher
from megatron_opd.trainer import checkpoint
from megatron_opd.trainer.metrics import Metrics
from megatron_opd.trainer.optim import wrap_and_build_optimizer
from megatron_opd.trainer.cross_rows import cross_tokens
from megatron_opd.trainer.vocab import load_tokenizer, shared_vocab_size, tokenizer_mode
from megatron_opd.trainer.weight_push import push_weights


def _check_layout(layout: ParallelConfig, world_size: int, key: str, path: str, arch) -> None:
    try:  # the backend is checked once the device is known
        layout.validate(world_size, arch.num_attention_heads, arch.num_key_value_heads, arch.num_layers,
                        te_available=True, num_experts=arch.moe.num_experts if arch.moe else None)
    except ValueError as err:
        raise ConfigError(f"{key}={path}: {err}") from None


def _check_teacher(cfg: OPDConfig, teacher, key: str, world_size: int, tokenizer, sequences: int, micro: int):
    """A teacher fits its layout and shares the student's tokenizer; returns the vocabulary size they share and
    its arch where it sits in the student's layout (None elsewhere)."""
    arch = load_arch(teacher.path)
    teacher_tokenizer = load_tokenizer(teacher.path, f"{key}.path")
    if tokenizer_mode(teacher, key, tokenizer, teacher_tokenizer, cfg.student.path) == "same":
        shared = min(arch.vocab_size, shared_vocab_size(tokenizer, teacher_tokenizer, cfg.student.path, teacher.path,
                                                        key))
    else:
        _check_cross(cfg, teacher, key)
        shared = None  # its own vocabulary: nothing of the student's is cut
    if teacher.engine != "megatron":
        _check_served(arch, f"{key}.engine={teacher.engine}", teacher.path)
        return shared, None
    layout = teacher_layout(cfg, teacher)
    if layout is not None and layout.expert > 1 and not arch.moe:
        raise ConfigError(f"{key}.parallel.expert={layout.expert}: {teacher.path} is a dense model (no experts); "
                          f"leave {key}.parallel.expert unset")
    _check_layout(layout or cfg.parallel, world_size, f"{key}.path", teacher.path, arch)
    teacher_dp = layout.data_parallel_size(world_size) if layout is not None else None
    if teacher_dp and (sequences % teacher_dp or (sequences // teacher_dp) % micro):
        raise ConfigError(f"{key}.parallel={{tensor: {layout.tensor}, pipeline: {layout.pipeline}}}: each "
                          f"of the teacher's {teacher_dp} data-parallel ranks gets {sequences / teacher_dp:g} of "
                          f"the step's {sequences} sequences, which must be a whole multiple of "
                          f"actor.micro_batch_size={cfg.actor.micro_batch_size}")
    return shared, arch if layout is None else None


def _check_cross(cfg: OPDConfig, teacher, key: str) -> None:
    """What a teacher of another tokenizer does not do yet, refused by name."""
    problems = [
        (teacher.engine != "megatron", f"{key}.engine={teacher.engine}", "a served teacher"),
        (cfg.actor.kl_loss_type in TOPK_KINDS, f"actor.kl_loss_type={cfg.actor.kl_loss_type}",
         f"top-k kinds (the sampled kinds {named(SAMPLED_KINDS)} and the full kinds {named(FULL_KINDS)} run)"),
        (cfg.actor.policy_loss == "pg" and cfg.actor.kl_loss_type in FULL_KINDS,
         f"actor.policy_loss=pg with actor.kl_loss_type={cfg.actor.kl_loss_type}",
         f"the pg form on a full kind (its advantages are sampled tokens' log-probs: use a sampled kind, "
         f"{named(SAMPLED_KINDS)})"),
        (cfg.rollout.env is not None, f"rollout.env={cfg.rollout.env}", "conversations with an environment"),
        (cfg.parallel.context > 1, f"parallel.context={cfg.parallel.context}", "context parallelism"),
    ]
    for refused, where, what in problems:
        if refused:
            raise ConfigError(f"{where}: {key}.tokenizer resolves to cross ({teacher.path} has another tokenizer than "
                              f"the student), which does not support {what} yet; use a teacher of the student's "
                              f"tokenizer for it")


def _check_served(arch, key: str, path: str) -> None:
    problem = unserved_layers_problem(arch)
    if problem:
        raise ConfigError(f"{key}: {path} cannot be served by SGLang: {problem}")


def check_routing(cfg: OPDConfig, dataset) -> None:
    """Several teachers: every data source of the training rows has one (the data's column read once)."""
    routing = TeacherRouting(run_teachers(cfg))
    for source, (path, row) in dataset.first_rows_by_source().items():
        if routing.teacher_of(source) is None:
            raise ConfigError(f"{path} row {row}: data_source {source!r} has no teacher: add it to a teacher's "
                              f"data_sources (teachers.<name>.data_sources) or make one teacher the default "
                              f"(teachers.<name>.default=true)")


def check_layout_and_vocab(cfg: OPDConfig, world_size: int):
    """Before any model is built: both models fit their layouts and share a tokenizer. Returns the student's
    arch, its tokenizer and the vocabulary size the divergences run over."""
    student = load_arch(cfg.student.path)
    _check_layout(cfg.parallel, world_size, "student.path", cfg.student.path, student)
    if cfg.rollout.engine == "sglang":
        _check_served(student, "rollout.engine=sglang", cfg.student.path)
    if cfg.rollout.engine == "local" and student.mla is not None:
        raise ConfigError(f"rollout.engine=local: {cfg.student.path} has multi-latent attention ({student.architecture}), "
                          f"which the embedded engine's decode loop does not implement; set rollout.engine=sglang")
    tokenizer = load_tokenizer(cfg.student.path, "student.path")
    vocab_size = min(len(tokenizer), student.vocab_size)
    sequences = cfg.data.train_batch_size * cfg.rollout.n
    micro = 1 if cfg.actor.max_tokens_per_micro_batch else cfg.actor.micro_batch_size
    colocated = [student]
    if cfg.trainer.mode == "distill":
        for name, teacher in run_teachers(cfg).items():
            shared, arch = _check_teacher(cfg, teacher, teacher_key(cfg, name), world_size, tokenizer, sequences,
                                          micro)
            vocab_size = min(vocab_size, shared) if shared is not None else vocab_size
            colocated += [arch] if arch is not None else []
    if cfg.parallel.expert > 1 and not any(arch.moe for arch in colocated):
        raise ConfigError(f"parallel.expert={cfg.parallel.expert}: no model in the student's layout has experts "
                          f"(the student and its co-located teachers are dense); set parallel.expert=1")
    dp = world_size // cfg.parallel.model_parallel_size
    mini = (cfg.actor.ppo_mini_batch_size or cfg.data.train_batch_size) * cfg.rollout.n
    if mini % dp or (mini // dp) % micro:
        raise ConfigError(f"actor.micro_batch_size={cfg.actor.micro_batch_size}: each of the {dp} data-parallel "
                          f"ranks gets {mini / dp:g} sequences per mini-batch ({mini} = ppo_mini_batch_size x "
                          f"rollout.n), which must be a whole multiple of it")
    return student, tokenizer, vocab_size


def model_dtype(model: ModelConfig, key: str) -> str:
    """The configured dtype, else the checkpoint's own (bf16 checkpoints train in bf16 with fp32 main
    weights, gradients and optimizer state)."""
    if model.dtype is not None:
        return model.dtype
    dtype = {"bf16": "bfloat16", "fp32": "float32"}.get(checkpoint_dtype(model.path), checkpoint_dtype(model.path))
    if dtype not in MODEL_DTYPES:
        raise ConfigError(f"{key}.dtype=null: {model.path} holds {dtype} weights, which the trainer does not run; "
                          f"set {key}.dtype to one of {'|'.join(MODEL_DTYPES)}")
    return dtype


def check_device(requested: str) -> torch.device:
    """The process group's device must be the one `trainer.device` asks for."""
    device = current_device()
    if requested != "auto" and device.type != requested:
        raise DeviceError(f"trainer.device={requested}, but this process group runs on {device}; start the "
                          f"trainer through `opd-train` / `python -m megatron_opd.train`, which joins it on "
                          f"the requested device")
    return device


class Run:
    def __init__(self, cfg: OPDConfig):
        import torch.distributed as dist

        self.cfg = cfg
        self.arch, self.tokenizer, self.vocab_size = check_layout_and_vocab(cfg, dist.get_world_size())
        # teachers of another tokenizer, by name; each says so at start-up
        self.cross = cross_tokens(cfg, self.tokenizer, announce=dist.get_rank() == 0)
        self.student_dtype = model_dtype(cfg.student, "student")
        teacher_dtypes = ({name: model_dtype(t, teacher_key(cfg, name)) for name, t in run_teachers(cfg).items()
                           if t.engine == "megatron"} if cfg.trainer.mode == "distill" else {})
        check_device(cfg.trainer.device)
        self.multi_turn = MultiTurn.of(cfg.rollout, self.tokenizer)
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else self.tokenizer.eos_token_id
        self.dataset = PromptDataset.from_config(cfg.data, self.tokenizer, "train")
        self.val_dataset = PromptDataset.from_config(cfg.data, self.tokenizer, "val") if cfg.data.val_files else None
        self.sampler = PromptSampler(len(self.dataset), cfg.data.train_batch_size, cfg.data.seed, cfg.data.shuffle)
        if cfg.trainer.total_steps is None:  # total_epochs' passes (verl's total_training_steps would cap them)
            cfg.trainer.total_steps = cfg.trainer.total_epochs * self.sampler.batches_per_epoch
        self.routing = None
        if cfg.teachers and cfg.trainer.mode == "distill":
            check_routing(cfg, self.dataset)
            self.routing = TeacherRouting(run_teachers(cfg))
        self.dims = initialize_model_parallel(cfg.parallel, seed=cfg.trainer.seed)
        _, self.student = load_pretrained(cfg.student.path, cfg.parallel, self.student_dtype, cfg.actor.recompute,
                                          router_loss=RouterLoss(cfg.actor.moe_aux_loss_coef, cfg.actor.moe_aux_loss_type,
                                                                 cfg.actor.moe_z_loss_coef))
        self.teacher = self._make_teachers(teacher_dtypes) if cfg.trainer.mode == "distill" else None
        if cfg.actor.max_tokens_per_micro_batch:  # micro-batches of varying shapes cross pipeline stages
            self.student[0].config.variable_seq_lengths = True
        mini_batch = cfg.actor.ppo_mini_batch_size or cfg.data.train_batch_size
        self.mini_batches_per_step = cfg.data.train_batch_size // mini_batch
        total_updates = cfg.trainer.total_steps * cfg.actor.ppo_epochs * self.mini_batches_per_step
        self.ddp, self.optimizer, self.scheduler = wrap_and_build_optimizer(self.student, cfg.actor, total_updates)
        self.uses_engine = cfg.trainer.mode == "distill" or bool(cfg.trainer.test_freq)
        self.engine = None
        self.resumed_ahead = None
        self.metrics = None
        try:
            self.engine = self._start_engine() if self.uses_engine else None
            self.start_step, self.skipped_updates, restored = self._resume()
            if self.dims.rank == 0:
                self.metrics = Metrics(cfg.trainer.logger, cfg.trainer.save_dir, cfg.trainer.total_steps,
                                       self.start_step, json.loads(json.dumps(dataclasses.asdict(cfg), default=str)))
                if restored is not None:
                    self.metrics.restore(self.start_step, restored)
        except BaseException:
            self.close()
            raise

    def _make_teachers(self, dtypes: dict):
        """Collective. The one teacher, or several routed by data source; those already started are stopped
        when a later one fails."""
        cfg = self.cfg
        shard = padded_vocab_size(self.arch.vocab_size, cfg.parallel.tensor) // cfg.parallel.tensor
        built = {}
        try:
            for name, teacher in run_teachers(cfg).items():
                built[name] = make_teacher(cfg, teacher, teacher_key(cfg, name), dtypes.get(name), self.vocab_size,
                                           self.dims, shard, cross=self.cross.get(name), name=name)
        except BaseException:
            for teacher in built.values():
                teacher.close()
            raise
        return RoutedTeachers(built, self.dims) if cfg.teachers else built[next(iter(built))]

    def _resume(self):
        """(start step, skipped updates so far, the checkpoint's metrics line or None)."""
        found = checkpoint.find(self.cfg.trainer.save_dir, self.cfg.trainer.resume)
        if not found:
            return 0, 0, None
        extra = checkpoint.load(found, self.ddp, self.optimizer, self.scheduler, self.dims)
        self.sampler.load_state_dict(extra["sampler"])
        self.resumed_ahead = extra.get("ahead")  # rollout.max_staleness: the steps drawn ahead, made
        return extra["step"], extra["skipped_updates"], extra["metrics"]

    def _start_engine(self):
        """On rank 0; elsewhere None. A converted (Megatron) student first gets an HF copy to start from."""
        cfg = self.cfg
        model_dir = cfg.student.path
        if not is_hf_dir(model_dir):
            model_dir = os.path.join(cfg.trainer.save_dir, "engine_start")
            push_weights(HFDirWriter(model_dir, cfg.student.path), self.student, self.arch, 0, self.dims)
        if self.dims.rank != 0:
            return None
        dtype = torch.bfloat16 if self.student_dtype == "bfloat16" else torch.float32
        engine = make_engine(cfg.rollout.engine, model_dir, cfg.rollout.sglang, dtype=dtype, device=self.dims.device,
                             url=cfg.rollout.url)
        engine.start()
        return engine

    def sync_engine(self, version: int) -> None:
        """Collective: the engine (rank 0) gets the student's current weights."""
        if self.uses_engine:
            push_weights(self.engine, self.student, self.arch, version, self.dims)

    def sampling(self, step: int) -> SamplingParams:
        r = self.cfg.rollout
        return SamplingParams(max_new_tokens=r.response_length, temperature=r.temperature, top_p=r.top_p, top_k=r.top_k,
                              n=r.n, stop_token_ids=(self.tokenizer.eos_token_id,),
                              seed=self.cfg.trainer.seed * 1_000_003 + step, vocab_size=self.vocab_size)

    def next_items(self) -> list[dict]:
        items = [self.dataset[i] for i in self.sampler.next_batch()]
        if self.cfg.trainer.mode == "sft" or self.cfg.actor.lmbda < 1:
            for item in items:
                encoded = self.tokenizer(item["response"] + self.tokenizer.eos_token, add_special_tokens=False,
                                         return_offsets_mapping="response_skip" in item)
                item["response_ids"] = encoded["input_ids"]
                if "response_skip" in item:
                    item["response_loss_mask"] = response_loss_mask(encoded["offset_mapping"], item["response_skip"])
        return items

    def validate(self) -> float:
        """Greedy answers to every validation prompt, each scored by its data_source's scorer; with rollout.env,
        greedy conversations, each scored by its environment."""
        items = [self.val_dataset[i] for i in range(len(self.val_dataset))]
        max_new = self.cfg.trainer.val_max_new_tokens or self.cfg.rollout.response_length
        greedy = SamplingParams(max_new_tokens=max_new, temperature=0.0, stop_token_ids=(self.tokenizer.eos_token_id,),
                                vocab_size=self.vocab_size)
        if self.multi_turn is not None:
            conversations = self.multi_turn.roll_out(self.engine, items, greedy)
            return sum(c.reward for c in conversations) / len(conversations)
        samples = self.engine.generate([it["input_ids"] for it in items], greedy)
        texts = self.tokenizer.batch_decode([s.response_ids for s in samples], skip_special_tokens=True)
        return mean_score([it["data_source"] for it in items], texts, [it["ground_truth"] for it in items])

    def log(self, step: int, metrics: dict) -> None:
        if self.metrics is not None:
            self.metrics.log(step, metrics)

    def export_hf(self, out_dir: str) -> None:
        push_weights(HFDirWriter(out_dir, self.cfg.student.path) if self.dims.rank == 0 else None,
                     self.student, self.arch, -1, self.dims)

    def close(self) -> None:
        """Idempotent; stops the engine and a served teacher (and their servers) whatever else fails."""
        metrics, engine, teacher = self.metrics, self.engine, getattr(self, "teacher", None)
        self.metrics = self.engine = self.teacher = None
        try:
            if metrics is not None:
                metrics.close()
        finally:
            try:
                if engine is not None:
                    engine.stop()
            finally:
                if teacher is not None:
                    teacher.close()
