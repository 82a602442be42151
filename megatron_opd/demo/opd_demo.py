"""The main job on the embedded default: on-policy distillation on CPU in minutes, with its baseline.

  1. teacher: SFT of a 4-layer model on the synthetic task's worked answers (two-step sums, held-out test);
  2. student: brief SFT of a 3-layer model, so it starts weak;
  3. on-policy: the student distilled from the teacher on its own samples (opd-train, embedded engine);
  4. off-policy baseline: the same weak student SFT'd on teacher samples (opd-generate) holding as many
     tokens as the teacher scored in step 3 (opd-train trainer.mode=sft);
  5. report: held-out accuracy (greedy) and KL(student || teacher) on the student's own samples for each,
     a table, a JSON summary and a plot of accuracy and KL against steps.

Every stage goes through the project's CLIs and keeps its outputs under --out, so a stage can be re-run
alone (`--stages onpolicy,report`); a stage whose output exists is skipped unless --force. Independent
stages (teacher and student; on-policy and the teacher's samples) run side by side, a core each.

Run: .venv/bin/python -m megatron_opd.demo.opd_demo [--out runs/demo] [--seed 0]
"""
import argparse
import json
import os
import shutil
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

from megatron_opd.demo.cli_runner import cli, share_cores
from megatron_opd.demo.report import measure_and_report
from megatron_opd.demo.settings import (
    BATCH, DIFFICULTY, DISTILL_OPTIM, KL, LANES, LARGEST, RESPONSE_TOKENS, SAMPLES, SFT_COMMON, STUDENT, TEACHER,
    TEMPERATURE, TEST_PROBLEMS)

STAGES = ("data", "teacher", "student", "samples", "onpolicy", "offpolicy", "report")
NEEDS = {"data": (), "teacher": ("data",), "student": ("data",), "samples": ("teacher",),
         "onpolicy": ("teacher", "student"), "offpolicy": ("student", "samples", "onpolicy"),
         "report": ("onpolicy", "offpolicy")}


class Demo:
    def __init__(self, out: str, seed: int, teacher_steps: int, student_steps: int, distill_steps: int):
        self.out, self.seed = out, seed
        self.teacher_steps, self.student_steps, self.distill_steps = teacher_steps, student_steps, distill_steps

    def path(self, *parts: str) -> str:
        return os.path.join(self.out, *parts)

    def data(self) -> None:
        from megatron_opd.data import questions, synthetic_rows, write_rows, write_synthetic_parquet
        from megatron_opd.models.tiny import train_tokenizer, write_tiny_checkpoint

        os.makedirs(self.path("data"), exist_ok=True)
        test = list(synthetic_rows(TEST_PROBLEMS, DIFFICULTY, seed=self.seed, split="test", largest=LARGEST))
        write_rows(self.path("data", "test.parquet"), test)
        # Held out: no test question is among the training prompts (nor in the tokenizer's corpus).
        held_out = questions(test)
        write_synthetic_parquet(self.path("data", "train.parquet"), 20000, DIFFICULTY, seed=self.seed,
                                exclude=held_out, largest=LARGEST)
        corpus = synthetic_rows(2000, DIFFICULTY, seed=self.seed, exclude=held_out, largest=LARGEST)
        tokenizer = train_tokenizer([r["prompt"][0]["content"] + " " + r["extra_info"]["answer"] for r in corpus], 400)
        write_tiny_checkpoint(self.path("init", "teacher"), "qwen2", seed=self.seed, tokenizer=tokenizer, **TEACHER)
        write_tiny_checkpoint(self.path("init", "student"), "qwen2", seed=self.seed + 1, tokenizer=tokenizer, **STUDENT)

    def common(self, save_dir: str) -> list[str]:
        return [f"data.train_files={self.path('data', 'train.parquet')}",
                f"data.val_files={self.path('data', 'test.parquet')}", f"data.seed={self.seed}",
                f"trainer.seed={self.seed}", f"trainer.save_dir={save_dir}", "trainer.logger=[jsonl]",
                "data.max_prompt_length=64", f"rollout.response_length={RESPONSE_TOKENS}"]

    def _ground_truth_sft(self, name: str, steps: int) -> None:
        cli("megatron_opd.train", *SFT_COMMON, *self.common(self.path(name)), f"student.path={self.path('init', name)}",
            "data.train_batch_size=32", "actor.micro_batch_size=32", "actor.optim.lr=3e-3",
            f"trainer.total_steps={steps}")

    def teacher(self) -> None:
        self._ground_truth_sft("teacher", self.teacher_steps)

    def student(self) -> None:
        self._ground_truth_sft("student", self.student_steps)

    def onpolicy(self) -> None:
        cli("megatron_opd.train", *self.common(self.path("onpolicy")), f"student.path={self.path('student', 'hf')}",
            f"teacher.path={self.path('teacher', 'hf')}", f"data.train_batch_size={BATCH}", f"rollout.n={SAMPLES}",
            f"rollout.temperature={TEMPERATURE}", f"actor.kl_loss_type={KL}", *DISTILL_OPTIM,
            f"actor.micro_batch_size={BATCH * SAMPLES}", f"trainer.total_steps={self.distill_steps}",
            f"trainer.test_freq={max(1, self.distill_steps // 5)}")

    def onpolicy_budget(self) -> int:
        """The teacher-scored tokens of the on-policy run."""
        steps = [json.loads(line) for line in open(self.path("onpolicy", "metrics.jsonl")) if '"actor/kl_loss"' in line]
        return int(sum(s["response_length/mean"] * BATCH * SAMPLES for s in steps))

    def samples(self) -> None:
        """Teacher samples on the training prompts, a quarter more than on-policy will score: teacher answers
        are about as long as the student's, so the off-policy stage can cut them to the measured budget."""
        os.makedirs(self.path("samples"), exist_ok=True)
        cli("megatron_opd.generate", f"model.path={self.path('teacher', 'hf')}",
            f"data.val_files={self.path('data', 'train.parquet')}",
            f"max_prompts={self.distill_steps * BATCH * 5 // 4}", "do_sample=true", f"rollout.n={SAMPLES}",
            f"rollout.temperature={TEMPERATURE}", f"rollout.response_length={RESPONSE_TOKENS}",
            "data.max_prompt_length=64",
            f"output={self.path('samples', 'teacher_samples.jsonl')}")

    def offpolicy(self) -> None:
        budget = self.onpolicy_budget()
        os.makedirs(self.path("offpolicy"), exist_ok=True)
        kept_path, kept = self._samples_within(self.path("samples", "teacher_samples.jsonl"), budget)
        # As many sequences per step as the on-policy run trained on, so the step counts line up too.
        steps = max(1, kept // (BATCH * SAMPLES))
        cli("megatron_opd.train", "trainer.mode=sft", "data.response_key=response",
            *self.common(self.path("offpolicy")), f"data.train_files={kept_path}",
            f"student.path={self.path('student', 'hf')}",
            f"data.train_batch_size={BATCH * SAMPLES}", f"actor.micro_batch_size={BATCH * SAMPLES}",
            *DISTILL_OPTIM, "data.shuffle=false", f"trainer.total_steps={steps}",
            f"trainer.test_freq={max(1, steps // 5)}")

    def _samples_within(self, samples_path: str, budget: int) -> tuple[str, int]:
        """The first teacher samples whose tokens (+ end of sequence) fit the budget, as a file of their own."""
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(self.path("teacher", "hf"))
        kept, tokens = [], 0
        for line in open(samples_path):
            tokens += len(tokenizer(json.loads(line)["response"], add_special_tokens=False)["input_ids"]) + 1
            if tokens > budget:
                break
            kept.append(line)
        path = self.path("offpolicy", "teacher_samples_budget.jsonl")
        with open(path, "w") as f:
            f.writelines(kept)
        return path, len(kept)

    def report(self) -> dict:
        return measure_and_report(self)


def run_stages(demo: "Demo", stages: list[str], outputs: dict, force: bool) -> None:
    """Runs the chosen stages, each once the chosen stages it needs are done, LANES at a time."""
    pending = []
    for stage in stages:
        if outputs[stage] and os.path.exists(outputs[stage]) and not force:
            print(f"[{stage}] exists, skipped ({outputs[stage]})", flush=True)
        else:
            pending.append(stage)

    def run(stage: str, lanes: int) -> None:
        share_cores(lanes)
        if stage not in ("data", "report"):
            shutil.rmtree(demo.path(stage), ignore_errors=True)
        print(f"[{stage}]", flush=True)
        getattr(demo, stage)()

    running = {}
    with ThreadPoolExecutor(LANES) as pool:
        while pending or running:
            ready = [s for s in pending if not any(n in pending or n in running.values() for n in NEEDS[s])]
            for stage in ready[:LANES - len(running)]:
                pending.remove(stage)
                lanes = LANES if len(ready) > 1 or running else 1
                running[pool.submit(run, stage, lanes)] = stage
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                running.pop(future)
                future.result()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/demo")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stages", default=",".join(STAGES))
    parser.add_argument("--force", action="store_true", help="re-run stages whose outputs exist")
    parser.add_argument("--teacher-steps", type=int, default=800)
    parser.add_argument("--student-steps", type=int, default=300)
    parser.add_argument("--distill-steps", type=int, default=500)
    args = parser.parse_args(argv)
    demo = Demo(args.out, args.seed, args.teacher_steps, args.student_steps, args.distill_steps)
    outputs = {"data": demo.path("init", "student"), "teacher": demo.path("teacher", "hf"),
               "student": demo.path("student", "hf"), "samples": demo.path("samples", "teacher_samples.jsonl"),
               "onpolicy": demo.path("onpolicy", "hf"), "offpolicy": demo.path("offpolicy", "hf"), "report": None}
    stages = args.stages.split(",")
    for stage in stages:
        if stage not in STAGES:
            raise SystemExit(f"--stages: unknown stage {stage!r}; choose from {','.join(STAGES)}")
    started = time.perf_counter()
    run_stages(demo, stages, outputs, args.force)
    print(f"demo finished in {time.perf_counter() - started:.0f}s")


if __name__ == "__main__":
    main()
