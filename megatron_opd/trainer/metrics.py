"""Metric sinks chosen by `trainer.logger`: console (a progress bar with the key numbers), a jsonl file,
TensorBoard and Weights & Biases (offline unless WANDB_MODE says otherwise, so it works without a network).
Only global rank 0 logs.

A step's metrics line is also stored in its checkpoint (written before the line is logged). On resume from
step N the jsonl file keeps its lines up to N, one per step; the line of step N comes back from the
checkpoint if a kill between the checkpoint and the log lost it; lines after N, from steps the resumed run
will redo, are dropped."""
import json
import os

from megatron_opd.atomic import write_text

CONSOLE_KEYS = ("actor/kl_loss", "actor/sft_loss", "actor/grad_norm", "response_length/mean", "val/accuracy",
                "timing_s/step")


class ConsoleSink:
    def __init__(self, total_steps: int, start_step: int):
        from tqdm import tqdm

        self.bar = tqdm(total=total_steps, initial=start_step, desc="opd", dynamic_ncols=True)

    def log(self, step: int, metrics: dict) -> None:
        self.bar.update(step - self.bar.n)
        self.bar.set_postfix({k.split("/")[-1]: f"{metrics[k]:.4g}" for k in CONSOLE_KEYS if k in metrics})

    def close(self) -> None:
        self.bar.close()


class JsonlSink:
    def __init__(self, path: str, start_step: int):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        # a fresh run (start_step 0) keeps no line of an earlier run in the same save_dir
        self.has_start_step = self._keep_up_to(path, start_step) or not start_step
        self.file = open(path, "a")

    @staticmethod
    def _keep_up_to(path: str, step: int) -> bool:
        """Rewrite `path` with the last line of each step <= `step`; whether step `step` has one."""
        if not os.path.isfile(path):
            return False
        by_step = {}
        with open(path) as f:
            for line in f:
                if line.strip():
                    record = json.loads(line)
                    if record["step"] <= step:
                        by_step[record["step"]] = line if line.endswith("\n") else line + "\n"
        write_text(path, "".join(by_step[s] for s in sorted(by_step)))
        return step in by_step

    def log(self, step: int, metrics: dict) -> None:
        self.file.write(json.dumps({"step": step, **metrics}) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


class TensorBoardSink:
    def __init__(self, log_dir: str):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir)

    def log(self, step: int, metrics: dict) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbSink:
    def __init__(self, run_dir: str, config: dict, name: str):
        import wandb

        os.environ.setdefault("WANDB_MODE", "offline")
        self.run = wandb.init(project="megatron-opd", name=name, dir=run_dir, config=config, resume="allow")

    def log(self, step: int, metrics: dict) -> None:
        self.run.log(metrics, step=step)

    def close(self) -> None:
        self.run.finish()


class Metrics:
    def __init__(self, sinks: list[str], run_dir: str, total_steps: int, start_step: int, config: dict):
        makers = {"console": lambda: ConsoleSink(total_steps, start_step),
                  "jsonl": lambda: JsonlSink(os.path.join(run_dir, "metrics.jsonl"), start_step),
                  "tensorboard": lambda: TensorBoardSink(os.path.join(run_dir, "tensorboard")),
                  "wandb": lambda: WandbSink(run_dir, config, os.path.basename(os.path.abspath(run_dir)))}
        self.sinks = [makers[name]() for name in sinks]

    def log(self, step: int, metrics: dict) -> None:
        for sink in self.sinks:
            sink.log(step, metrics)

    def restore(self, step: int, metrics: dict) -> None:
        """The resumed checkpoint's own line, logged again when the jsonl file lost it."""
        if any(isinstance(sink, JsonlSink) and not sink.has_start_step for sink in self.sinks):
            self.log(step, metrics)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()
