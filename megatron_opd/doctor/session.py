"""What the measured checks share, built once in this one process: the student at TP = PP = CP = 1 on the
run's device, the embedded engine holding its weights, and a few real rows — the first prompts of
data.train_files with responses the engine samples at the run's sampling parameters — as the trainer's
micro-batches. Teachers are built one at a time through the trainer's own path (megatron_opd.teacher) and
dropped after their checks."""
import dataclasses
import gc
import shutil
import tempfile

import torch

from checkpoint_tools.pretrained import is_hf_dir, load_pretrained
from megatron_opd.config import OPDConfig, TeacherConfig, divergence_temperature
from megatron_opd.config.models import TeacherParallelConfig
from megatron_opd.data.prompt_dataset import PromptDataset
from megatron_opd.models import padded_vocab_size
from megatron_opd.models.batch import build_batch
from megatron_opd.models.head import final_hidden_states, output_weight
from megatron_opd.models.pipeline import forward_pass
from megatron_opd.parallel import ParallelConfig
from megatron_opd.rollout.engine import SamplingParams
from megatron_opd.rollout.factory import make_engine
from megatron_opd.rollout.hf_dir import HFDirWriter
from megatron_opd.teacher import make_teacher
from megatron_opd.trainer.objective import Objective
from megatron_opd.trainer.setup import model_dtype
from megatron_opd.trainer.vocab import load_tokenizer
from megatron_opd.trainer.weight_push import push_weights

ROWS = 4  # prompts of data.train_files
MAX_NEW_TOKENS = 32  # per response (at most rollout.response_length)
ONE_PROCESS = ParallelConfig()
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class Session:
    def __init__(self, cfg: OPDConfig, vocab_size: int, dims):
        """`vocab_size`: the ids the divergence runs over; `dims`: this one process's layout."""
        self.cfg, self.vocab_size, self.dims = cfg, vocab_size, dims
        self.dtype = model_dtype(cfg.student, "student")
        self.tokenizer = load_tokenizer(cfg.student.path, "student.path")
        self.arch, self.student = load_pretrained(cfg.student.path, ONE_PROCESS, self.dtype)
        self.weight = output_weight(self.student[-1])
        self.temperature = divergence_temperature(cfg)
        self.engine, self._engine_dir = None, None
        try:
            self.samples = self._sample()
        except BaseException:
            self.close()
            raise
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else self.tokenizer.eos_token_id
        self.pairs = [(s.prompt_ids, s.response_ids) for s in self.samples]
        self.batch = build_batch([p for p, _ in self.pairs], [r for _, r in self.pairs], self.pad_id, dims.device,
                                 engine_logprobs=[s.logprobs for s in self.samples])
        self.micro = self.batch.micro_batches(1)
        self.masks = [mb.loss_mask for mb in self.micro]
        self.hidden = forward_pass(self.student, self.micro, lambda out, mb: out.detach(), 1,
                                   output_processor=final_hidden_states)  # [1, s, H] per row

    def sampling(self) -> SamplingParams:
        """The run's sampling parameters (trainer/setup.py Run.sampling), one sample of a short response."""
        r = self.cfg.rollout
        return SamplingParams(max_new_tokens=min(r.response_length, MAX_NEW_TOKENS), temperature=r.temperature,
                              top_p=r.top_p, top_k=r.top_k, n=1, stop_token_ids=(self.tokenizer.eos_token_id,),
                              seed=self.cfg.trainer.seed * 1_000_003, vocab_size=self.vocab_size)

    def _sample(self) -> list:
        """The embedded engine (whatever rollout.engine says: the engine check reports it), given the
        student's weights as the trainer gives them, samples one response to each of the first prompts."""
        dataset = PromptDataset.from_config(self.cfg.data, self.tokenizer, "train")
        prompts = [dataset[i]["input_ids"] for i in range(min(ROWS, len(dataset)))]
        model_dir = self.cfg.student.path
        if not is_hf_dir(model_dir):  # a converted student: the engine starts from an HF copy, as in a run
            self._engine_dir = tempfile.mkdtemp(prefix="opd-doctor-engine-")
            model_dir = self._engine_dir
            push_weights(HFDirWriter(model_dir, self.cfg.student.path), self.student, self.arch, 0, self.dims)
        self.engine = make_engine("local", model_dir, dtype=TORCH_DTYPES[self.dtype], device=self.dims.device)
        self.engine.start()
        push_weights(self.engine, self.student, self.arch, 0, self.dims)
        return self.engine.generate(prompts, self.sampling())

    @property
    def response_tokens(self) -> int:
        return int(self.batch.loss_mask.sum().item())

    def objective(self, teacher=None, clamps: bool = True) -> Objective:
        """The run's objective with `teacher`'s head (full kinds): the divergence alone (no entropy bonus,
        which is not 0 at teacher = student), without verl's clamps unless `clamps`."""
        objective = Objective.of_run(self.cfg, self.vocab_size, self.dims.tp_group, teacher)
        unclamped = {} if clamps else {"loss_max_clamp": None, "log_prob_min_clamp": None}
        objective.actor = dataclasses.replace(self.cfg.actor, entropy_coeff=0.0, **unclamped)
        return objective

    def student_log_probs(self, temperature: float, ids=None) -> list:
        """The trainer's log-probs of each row's next tokens (or of `ids` per row) at `temperature`."""
        objective = self.objective()
        with torch.no_grad():
            return [objective.log_probs(h, self.weight, mb.labels if ids is None else ids[i], temperature)
                    for i, (h, mb) in enumerate(zip(self.hidden, self.micro))]

    def teacher(self, teacher: TeacherConfig, key: str):
        """A Megatron teacher built as the trainer builds it (make_teacher), co-located in this process."""
        own = dataclasses.replace(teacher, engine="megatron", parallel=TeacherParallelConfig())
        cfg = dataclasses.replace(self.cfg, parallel=ONE_PROCESS)
        return make_teacher(cfg, own, key, own.dtype or model_dtype(own, key), self.vocab_size, self.dims,
                            padded_vocab_size(self.arch.vocab_size, 1))

    def self_teacher(self):
        """The student's own checkpoint as its teacher."""
        return self.teacher(TeacherConfig(path=self.cfg.student.path, dtype=self.dtype), "student")

    def zero_grad(self) -> None:
        for chunk in self.student:
            chunk.zero_grad(set_to_none=True)

    def grad_norm(self) -> float:
        grads = [p.grad.float().pow(2).sum() for chunk in self.student for p in chunk.parameters()
                 if p.grad is not None]
        return torch.stack(grads).sum().sqrt().item() if grads else 0.0

    def close(self) -> None:
        engine, self.engine = self.engine, None
        if engine is not None:
            engine.stop()
        if self._engine_dir is not None:
            shutil.rmtree(self._engine_dir, ignore_errors=True)
            self._engine_dir = None


def free_memory(device: torch.device) -> None:
    """After a teacher's last reference is dropped: its memory back before the next one is built."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
