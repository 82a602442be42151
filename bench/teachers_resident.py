"""What several Megatron teachers keep resident on each rank, by layout, measured on the built models.

    python bench/teachers_resident.py [--teachers 2 --hidden 512 --layers 4 --ranks 2]

Two processes (gloo, CPU) hold a student at TP=1 (DP=2) and --teachers teachers of one shape (tiny Qwen2 of
--hidden x --layers, fp32). Per layout, each rank reports the bytes of every teacher's parameters it holds
(summed over the model chunks it built) and its RSS growth while building them:
  co-located:       each teacher in the student's layout (TP=1): whole on every rank
  own layout TP=R:  each teacher at teacher.parallel.tensor = R (the number of ranks): 1/R of it per rank
The number is what the routing design keeps resident for the run (teacher/routed.py): every teacher, in its
own layout, whether or not a step has rows for it.
"""
import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from megatron_opd.parallel.quiet import quiet_known_messages  # noqa: E402

quiet_known_messages()

from peak_memory import status_mib  # noqa: E402

from megatron_opd.config import ActorConfig  # noqa: E402
from megatron_opd.demo.tiny import write_tiny_checkpoint  # noqa: E402
from megatron_opd.parallel import ParallelConfig, initialize_model_parallel  # noqa: E402
from megatron_opd.parallel.local_group import run_local  # noqa: E402
from megatron_opd.parallel.own_layout import own_layout_dims  # noqa: E402
from megatron_opd.teacher import MegatronTeacher  # noqa: E402


def _resident(rank, world_size, paths, tensor):
    student = initialize_model_parallel(ParallelConfig())
    before = status_mib("VmRSS")
    own = None if tensor == 1 else own_layout_dims(ParallelConfig(tensor=tensor), student)
    teachers = [MegatronTeacher(path, "float32", student, own, ActorConfig(kl_loss_type="kl"), 1.0, 256, 256)
                for path in paths]
    held = sum(p.numel() * p.element_size() for t in teachers for chunk in t.chunks for p in chunk.parameters())
    return held, status_mib("VmRSS") - before


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--teachers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--ranks", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as root:
        shape = dict(hidden_size=args.hidden, num_hidden_layers=args.layers, intermediate_size=4 * args.hidden,
                     num_attention_heads=8, num_key_value_heads=args.ranks)
        paths = [write_tiny_checkpoint(os.path.join(root, f"teacher{i}"), "qwen2", seed=i, **shape)
                 for i in range(args.teachers)]
        whole = None
        print(f"{args.teachers} teachers of hidden {args.hidden} x {args.layers} layers on {args.ranks} ranks")
        print(f"| layout | teacher bytes per rank (MiB) | share of all teachers | RSS growth per rank (MiB) |")
        print("|---|---|---|---|")
        for name, tensor in (("co-located (TP=1)", 1), (f"own layout TP={args.ranks}", args.ranks)):
            results = run_local(_resident, args.ranks, paths, tensor, timeout_s=600)
            held = max(r[0] for r in results)
            whole = whole or held
            rss = max(r[1] for r in results)
            print(f"| {name} | {held / 2**20:.1f} | {held / whole:.2f} | {rss:.0f} |")


if __name__ == "__main__":
    main()
