"""The comparison's jobs, each through the project's CLIs: per task the data and the teacher; per seed a
cold-start student and fresh teacher samples; per seed and arm a run of `steps` optimizer steps on BATCH x
SAMPLES sequences each:
- on-policy:     the student's own samples, scored by the teacher (KL over the full vocabulary);
- SeqKD:         SFT on the teacher's samples (hard targets);
- supervised KD: the same divergence as on-policy on the teacher's samples (actor.lmbda=0).
Every arm's lr is chosen from the same grid by validation success of seed 0's runs; then every trained
model is scored on the held-out test prompts (evaluate.py; evaluate_env.py in turns). A task played in
turns with an environment (settings.Conversations) has it in every conversation: the on-policy rollouts, the
teacher's samples and the evaluations; the given conversations train without the environment's parts."""
import json
import os

from megatron_opd.demo.cli_runner import cli
from megatron_opd.demo.evaluate import evaluate
from megatron_opd.demo.evaluate_env import evaluate_conversations, limits
from megatron_opd.demo.jobs import TORCH_IN_PROCESS
from megatron_opd.demo.settings import (
    ARMS, BATCH, KL, KL_TEMPERATURE, RECOVERY_REQUIRED, SAMPLES, SFT_SCHEDULE, STUDENT, TASKS, TEMPERATURE, Preset)
from megatron_opd.demo.tasks import split_rows

SLUGS = {"on-policy": "onpolicy", "SeqKD": "seqkd", "supervised KD": "supkd"}
# where the SFT rows of a walk mark what trains without loss: the single-turn walk's detours; in turns the
# detour turns and the environment's parts
SKIP_KEYS = {"walk": "extra_info.detours", "walk_env": "extra_info.skip"}


class Experiment:
    def __init__(self, out: str, preset: Preset, tasks: list[str], scale: float = 1.0, strict: bool = False):
        """`strict`: stop when the walk teacher does not recover from a forced wrong move (the premise)."""
        self.out, self.preset, self.tasks, self.scale, self.strict = out, preset, tasks, scale, strict

    def path(self, *parts) -> str:
        return os.path.join(self.out, *map(str, parts))

    def lr_choice_path(self, task: str) -> str:
        return self.path(task, "lr_choice.json")

    def chosen_lr(self, task: str, arm: str) -> float:
        if len(self.preset.lr_grid) == 1:
            return self.preset.lr_grid[0]
        return json.load(open(self.lr_choice_path(task)))[arm]

    def grid_run(self, seed: int) -> bool:
        """Seed 0's runs try every lr of a grid of more than one (each in a directory of its own)."""
        return seed == 0 and len(self.preset.lr_grid) > 1

    def run_name(self, arm: str, lr: float = None) -> str:
        return SLUGS[arm] if lr is None else f"{SLUGS[arm]}_lr{lr:g}"

    def run_dir(self, task: str, seed: int, arm: str, lr: float = None) -> str:
        return self.path(task, f"seed{seed}", self.run_name(arm, lr))

    def trained(self, task: str, seed: int, arm: str) -> str:
        """The HF checkpoint of an arm's run at its chosen lr."""
        lr = self.chosen_lr(task, arm) if self.grid_run(seed) else None
        return os.path.join(self.run_dir(task, seed, arm, lr), "hf")

    # the commands

    def common(self, task: str, save_dir: str, seed: int) -> list[str]:
        return [f"data.train_files={self.path(task, 'data', 'train.parquet')}",
                f"data.val_files={self.path(task, 'data', 'val.parquet')}", f"data.seed={seed}",
                f"trainer.seed={seed}", f"trainer.save_dir={save_dir}", "trainer.logger=[jsonl]",
                "trainer.resume=never", "data.max_prompt_length=48",
                f"rollout.response_length={TASKS[task].response_tokens}", *self.micro_batches(task)]

    @staticmethod
    def micro_batches(task: str) -> list[str]:
        tokens = TASKS[task].micro_batch_tokens
        return [] if tokens is None else [f"actor.max_tokens_per_micro_batch={tokens}"]

    @staticmethod
    def in_turns(task: str) -> list[str]:
        """The rollout's keys of a task played in turns with an environment, none otherwise."""
        turns = TASKS[task].conversations
        return [] if turns is None else [f"rollout.env={turns.env}", f"rollout.max_turns={turns.max_turns}",
                                         f"rollout.max_turn_tokens={turns.max_turn_tokens}"]

    @staticmethod
    def skip(task: str) -> list[str]:
        return [f"data.response_skip_key={SKIP_KEYS[task]}"] if task in SKIP_KEYS else []

    def _sft_ground_truth(self, task: str, init: str, save_dir: str, steps: int, seed: int) -> None:
        data = self.path(task, "data", "teacher_train.jsonl")
        cli("megatron_opd.train", "trainer.mode=sft", "data.response_key=extra_info.answer", *self.skip(task),
            *SFT_SCHEDULE, *self.common(task, save_dir, seed), f"data.train_files={data}", f"student.path={init}",
            "data.train_batch_size=32", "actor.micro_batch_size=32", "actor.optim.lr=3e-3",
            f"trainer.total_steps={steps}")

    def teacher_steps(self, task: str) -> int:
        return max(1, round(TASKS[task].teacher_steps * self.scale))

    def student_steps(self, task: str) -> int:
        return max(1, round(TASKS[task].student_steps * self.scale))

    def teacher(self, task: str) -> None:
        self._sft_ground_truth(task, self.path(task, "data", "init_teacher"), self.path(task, "teacher"),
                               self.teacher_steps(task), seed=0)

    def student(self, task: str, seed: int) -> None:
        """The cold-start student of a seed: its own initial weights, brief SFT on oracle answers (walk: no
        detours, masked or not: the student never sees one; in turns its oracle conversations, the environment's
        parts without loss)."""
        from transformers import AutoTokenizer

        from megatron_opd.demo.tiny import write_tiny_checkpoint

        init = self.path(task, f"seed{seed}", "init_student")
        tokenizer = AutoTokenizer.from_pretrained(self.path(task, "data", "tokenizer"))
        with TORCH_IN_PROCESS:
            write_tiny_checkpoint(init, "qwen2", seed=seed + 1, tokenizer=tokenizer, **STUDENT)
        # the prompt files cannot hold a conversation's spans: in turns the same rows come from their own file
        rows = ([f"data.train_files={self.path(task, 'data', 'student_train.jsonl')}", *self.skip(task)]
                if TASKS[task].conversations else [])
        cli("megatron_opd.train", "trainer.mode=sft", "data.response_key=extra_info.answer", *SFT_SCHEDULE,
            *self.common(task, self.path(task, f"seed{seed}", "student"), seed), *rows, f"student.path={init}",
            "data.train_batch_size=32", "actor.micro_batch_size=32", "actor.optim.lr=3e-3",
            f"trainer.total_steps={self.student_steps(task)}")

    def samples(self, task: str, seed: int) -> None:
        """Fresh teacher samples for every step of SeqKD and supervised KD: steps x BATCH prompts x SAMPLES."""
        cli("megatron_opd.generate", f"model.path={self.path(task, 'teacher', 'hf')}",
            f"data.val_files={self.path(task, 'data', 'train.parquet')}", "data.max_prompt_length=48",
            f"max_prompts={self.preset.steps_of(task) * BATCH}", "do_sample=true", f"rollout.n={SAMPLES}",
            f"rollout.temperature={TEMPERATURE}", f"rollout.response_length={TASKS[task].response_tokens}",
            f"seed={seed}", f"output={self.path(task, f'seed{seed}', 'teacher_samples.jsonl')}", *self.in_turns(task))

    def arm(self, task: str, seed: int, arm: str, lr: float = None) -> None:
        run_dir = self.run_dir(task, seed, arm, lr)
        lr = self.chosen_lr(task, arm) if lr is None else lr
        student = self.path(task, f"seed{seed}", "student", "hf")
        teacher = f"teacher.path={self.path(task, 'teacher', 'hf')}"
        run = [*self.common(task, run_dir, seed), f"student.path={student}",
               f"actor.optim.lr={lr}", "actor.optim.lr_decay=cosine", "actor.optim.min_lr=1e-4",
               "actor.optim.warmup_steps=10", f"trainer.total_steps={self.preset.steps_of(task)}",
               f"actor.micro_batch_size={BATCH * SAMPLES}"]
        divergence = [f"actor.kl_loss_type={KL}", f"actor.kl_temperature={KL_TEMPERATURE}"]
        if arm == "on-policy":
            cli("megatron_opd.train", *run, teacher, f"data.train_batch_size={BATCH}", f"rollout.n={SAMPLES}",
                f"rollout.temperature={TEMPERATURE}", *divergence, *self.in_turns(task))
            return
        # BATCH x SAMPLES teacher samples a step, each once, in the order they were drawn
        given = [f"data.train_files={self.path(task, f'seed{seed}', 'teacher_samples.jsonl')}",
                 "data.response_key=response", "data.shuffle=false", f"data.train_batch_size={BATCH * SAMPLES}",
                 "rollout.n=1"]
        if TASKS[task].conversations:  # the teacher's conversations, without the environment's parts
            given.append("data.response_skip_key=extra_info.env_spans")
        if arm == "SeqKD":
            cli("megatron_opd.train", *run, *given, "trainer.mode=sft")
        else:
            cli("megatron_opd.train", *run, *given, teacher, "actor.lmbda=0", *divergence)

    def evaluate(self, model_dir: str, task: str, split: str, out_file: str) -> None:
        rows = split_rows(self.path(task, "data"), split)
        if split == "test":
            rows = rows[:self.preset.test_prompts_of(task)]
        result = (evaluate_conversations(model_dir, rows, limits(TASKS[task])) if TASKS[task].conversations
                  else evaluate(model_dir, rows, TASKS[task].response_tokens))
        os.makedirs(os.path.dirname(out_file), exist_ok=True)
        with open(out_file, "w") as f:
            json.dump(result, f, indent=1)

    def evaluate_teacher(self, task: str) -> None:
        """The teacher's test metrics; on a walk, first the premise: it gets back on course after each forced
        wrong move (settings.Task.recoveries) in at least RECOVERY_REQUIRED of the test prompts."""
        path = self.eval_path(task, None, "teacher")
        self.evaluate(self.path(task, "teacher", "hf"), task, "test", path)
        if not TASKS[task].walk:
            return
        result = json.load(open(path))
        failed = [m for m in TASKS[task].recoveries if result[m] < RECOVERY_REQUIRED]
        for metric in TASKS[task].recoveries:
            print(f"    {task} teacher: {metric.replace('_', ' ')} after a forced wrong move {result[metric]:.3f} "
                  f"(required {RECOVERY_REQUIRED}): {'DOES NOT HOLD' if metric in failed else 'holds'}", flush=True)
        if failed:
            print(f"    the {task} comparison tests nothing about recovering from that slip", flush=True)
        if self.strict and failed:
            os.remove(path)
            raise SystemExit(f"{self.path(task, 'teacher')}: the {task} teacher's "
                             + ", ".join(f"{m} {result[m]:.3f}" for m in failed) + f" below {RECOVERY_REQUIRED}; "
                             f"remove that directory and train it longer (settings.TASKS['{task}'].teacher_steps)")

    def choose_lrs(self, task: str) -> None:
        """Each arm's lr: the grid value with the best validation success of its seed-0 run (ties: smaller)."""
        validation = {arm: {lr: json.load(open(self.eval_path(task, 0, self.run_name(arm, lr), "val")))["success"]
                            for lr in self.preset.lr_grid} for arm in ARMS}
        choice = {arm: max(sorted(scores), key=lambda lr: scores[lr]) for arm, scores in validation.items()}
        with open(self.lr_choice_path(task), "w") as f:
            json.dump({**choice, "validation_success": validation}, f, indent=1)

    def eval_path(self, task: str, seed, name: str, split: str = "test") -> str:
        return self.path(task, "eval", f"seed{seed}" if seed is not None else "", f"{name}.{split}.json")
