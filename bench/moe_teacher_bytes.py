"""The teacher path's bytes moved per token: a mixture-of-experts teacher against a dense one of the same hidden
size, each in a layout of its own beside the student, in one run.

    python bench/moe_teacher_bytes.py [--hidden 256 --sequences 8 --length 64 --kind reverse]

Two processes (gloo, CPU), the student's layout DP=2. Per teacher (tiny Qwen3 and Qwen3-MoE of --hidden, fp32,
the MoE one with 8 experts top-2) and teacher layout, one step's teacher outputs for --sequences sequences of
--length tokens (the MegatronTeacher the trainer builds, its outputs delivered to the student's micro-batches
as in a step): the bytes all ranks sent to others over the step's tokens (teacher/bytes_moved_per_token). What
moves per token is what the teacher keeps (the full kinds: its final hidden states, H values; sampled and
top-k kinds: a log-prob or K pairs), so a MoE teacher moves what a dense teacher of its hidden size does,
whatever its experts and their layout.
"""
import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from megatron_opd.parallel.quiet import quiet_known_messages  # noqa: E402

quiet_known_messages()

import torch  # noqa: E402

from megatron_opd.config import ActorConfig  # noqa: E402
from megatron_opd.demo.tiny import write_tiny_checkpoint  # noqa: E402
from megatron_opd.models.batch import build_batch  # noqa: E402
from megatron_opd.parallel import ParallelConfig, initialize_model_parallel  # noqa: E402
from megatron_opd.parallel.local_group import run_local  # noqa: E402
from megatron_opd.parallel.own_layout import own_layout_dims  # noqa: E402
from megatron_opd.teacher import MegatronTeacher  # noqa: E402

VOCAB = 256
LAYOUTS = {"TP=2": ParallelConfig(tensor=2), "TP=2, experts whole (EP=2, expert-TP=1)":
           ParallelConfig(tensor=2, expert=2, expert_tensor=1)}


def _bytes_per_token(rank, world_size, path, layout, kind, sequences, length):
    student = initialize_model_parallel(ParallelConfig())
    teacher = MegatronTeacher(path, "float32", student, own_layout_dims(layout, student),
                              ActorConfig(kl_loss_type=kind, topk=8), 1.0, VOCAB, VOCAB)
    generator = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, VOCAB, (length // 2,), generator=generator).tolist() for _ in range(sequences)]
    responses = [torch.randint(0, VOCAB, (length - length // 2,), generator=generator).tolist() for _ in prompts]
    batch = build_batch(prompts, responses, 0, student.device)
    share = sequences // student.dp_size
    mine = batch.rows(student.dp_rank * share, (student.dp_rank + 1) * share).micro_batches(1)
    teacher.outputs(None, batch, mine)
    return teacher.bytes_per_token(batch)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--sequences", type=int, default=8)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--kind", default="reverse")
    args = parser.parse_args()
    shape = dict(hidden_size=args.hidden, intermediate_size=2 * args.hidden, num_hidden_layers=2, head_dim=32,
                 num_attention_heads=args.hidden // 32, num_key_value_heads=2, vocab_size=VOCAB)
    with tempfile.TemporaryDirectory() as root:
        teachers = {"dense Qwen3": write_tiny_checkpoint(os.path.join(root, "dense"), "qwen3", **shape),
                    "Qwen3-MoE": write_tiny_checkpoint(os.path.join(root, "moe"), "qwen3_moe", num_experts=8,
                                                       moe_intermediate_size=args.hidden // 2, mlp_only_layers=[],
                                                       **shape)}
        print(f"teacher outputs moved per token, kind={args.kind}, hidden {args.hidden}, student DP=2, 2 ranks")
        print("| teacher | its layout | bytes moved per token | / dense TP=2 |")
        print("|---|---|---|---|")
        dense = None
        for name, path in teachers.items():
            for layout_name, layout in LAYOUTS.items():
                if name.startswith("dense") and layout.expert > 1:
                    continue
                moved = run_local(_bytes_per_token, 2, path, layout, args.kind, args.sequences, args.length,
                                  timeout_s=600)[0]
                dense = dense or moved
                print(f"| {name} | {layout_name} | {moved:.1f} | {moved / dense:.3f} |", flush=True)


if __name__ == "__main__":
    main()
