"""Our trainer as `python -m megatron_opd.train` runs it (same arguments), with each step's CPU seconds added
to its metrics line as `bench/cpu_s`: unlike its wall time, a single-threaded step's CPU time barely moves
when other processes share the machine, so bench/peer_trl.py reports both.

Run (as peer_trl.py does, from the repository root): .venv/bin/python -m bench.peer.ours_step student.path=DIR ...
"""
import sys
import time

CPU_KEY = "bench/cpu_s"


def main() -> None:
    from megatron_opd.trainer import loop

    step = loop.Trainer._step

    def step_with_cpu(self, index):
        began = time.process_time()
        metrics = step(self, index)
        metrics[CPU_KEY] = time.process_time() - began
        return metrics

    loop.Trainer._step = step_with_cpu
    from megatron_opd.train import main as train

    train()


if __name__ == "__main__":
    sys.exit(main())
