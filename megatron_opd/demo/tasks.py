"""Each task's files, the same for every seed: train/validation/test prompts (the validation and test
start/goal pairs or questions held out of training and of each other), the teacher's training rows, a
tokenizer trained on the training text, and the teacher's initial weights. The walk with an environment also
has the cold-start student's rows (its oracle conversations with the environment's parts marked), which the
prompt files' schema cannot hold."""
import json
import os
import re

# Resolved once, in the main thread: transformers' lazy imports race when the demo's job threads first meet them.
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast  # noqa: F401

from megatron_opd.data import write_rows
from megatron_opd.demo.arithmetic import questions, synthetic_rows
from megatron_opd.demo.walk import detour_walk_rows, walk_rows
from megatron_opd.demo.walk_turns import conversation_rows, detour_conversation_rows, render
from megatron_opd.demo.jobs import TORCH_IN_PROCESS
from megatron_opd.demo.settings import TASKS, TEACHER, TEST_PROMPTS, TRAIN_PROMPTS, VAL_PROMPTS
from megatron_opd.demo.tiny import SPECIAL_TOKENS, train_tokenizer, write_tiny_checkpoint

DIFFICULTY, LARGEST = 2, 10  # the arithmetic task: two-step sums of operands up to 10


def _rows(task: str, count: int, split: str, exclude=()):
    if task == "walk":
        return walk_rows(count, seed=0, split=split, exclude=exclude)
    if task == "walk_env":
        return conversation_rows(count, seed=0, split=split, exclude=exclude)
    return synthetic_rows(count, DIFFICULTY, seed=0, split=split, exclude=exclude, largest=LARGEST)


def _teacher_rows(task: str, held_out: set):
    if task == "walk":
        return detour_walk_rows(TRAIN_PROMPTS, seed=0, exclude=held_out)
    if task == "walk_env":
        return detour_conversation_rows(TRAIN_PROMPTS, seed=0, exclude=held_out)
    return _rows(task, TRAIN_PROMPTS, "teacher", exclude=held_out)


def _corpus(task: str, rows: list[dict]) -> list[str]:
    if task == "walk_env":  # the conversations as the template writes them, cut at its special tokens
        special = "|".join(map(re.escape, SPECIAL_TOKENS))
        return [piece for row in rows for piece in re.split(special, render(row["prompt"], True)
                                                            + row["extra_info"]["answer"]) if piece]
    return ["user\n" + row["prompt"][0]["content"] + " assistant\n" + row["extra_info"]["answer"] for row in rows]


def _write_jsonl(path: str, rows) -> None:
    with open(path, "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)


def write_task(task: str, out: str) -> None:
    """out/{train,val,test}.parquet, out/teacher_train.jsonl (walks: detours marked for masking), walk_env's
    out/student_train.jsonl, out/tokenizer, out/init_teacher."""
    os.makedirs(out, exist_ok=True)
    test = list(_rows(task, TASKS[task].test_prompts or TEST_PROMPTS, "test"))
    val = list(_rows(task, VAL_PROMPTS, "val", exclude=questions(test)))
    held_out = questions(test) | questions(val)
    write_rows(os.path.join(out, "test.parquet"), test)
    write_rows(os.path.join(out, "val.parquet"), val)
    train = list(_rows(task, TRAIN_PROMPTS, "train", exclude=held_out))
    write_rows(os.path.join(out, "train.parquet"), train)
    if task == "walk_env":
        _write_jsonl(os.path.join(out, "student_train.jsonl"), train)
    _write_jsonl(os.path.join(out, "teacher_train.jsonl"), _teacher_rows(task, held_out))
    tokenizer = train_tokenizer(_corpus(task, train[:2000]), 400)
    tokenizer.save_pretrained(os.path.join(out, "tokenizer"))
    with TORCH_IN_PROCESS:
        write_tiny_checkpoint(os.path.join(out, "init_teacher"), "qwen2", seed=0, tokenizer=tokenizer, **TEACHER)


def split_rows(out: str, split: str = "test") -> list[dict]:
    import pyarrow.parquet as pq

    return pq.read_table(os.path.join(out, f"{split}.parquet")).to_pylist()
