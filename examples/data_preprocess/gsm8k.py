"""GSM8K -> train.parquet / test.parquet in verl's schema (files verl writes load here unchanged, and the
other way round).

Run: .venv/bin/python examples/data_preprocess/gsm8k.py --local_save_dir ~/data/gsm8k [--input_dir DIR]

--input_dir holds GSM8K's train.jsonl and test.jsonl ({"question", "answer"} per line); without it the
"main" config of openai/gsm8k is loaded from the Hugging Face hub (needs the network).
"""
import argparse
import json
import os
import re
from typing import Iterator, Optional

from megatron_opd.data.schema import DataError, make_row, write_rows

DATA_SOURCE = "openai/gsm8k"
INSTRUCTION = 'Let\'s think step by step and output the final answer after "####".'
SPLITS = ("train", "test")
_FINAL_ANSWER = re.compile(r"####\s*(-?[\d,]*\.?\d+)\s*$")


def ground_truth(answer: str) -> Optional[str]:
    """The number after GSM8K's "####", commas removed; None when the answer does not end with one."""
    match = _FINAL_ANSWER.search(answer)
    return match.group(1).replace(",", "") if match else None


def read_jsonl(path: str) -> Iterator[dict]:
    if not os.path.isfile(path):
        raise DataError(path, "no such file", fix="point --input_dir at a folder with train.jsonl and test.jsonl")
    row = 0
    with open(path, encoding="utf-8") as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(path, f"not valid JSON ({error})", row=row, line=line_number,
                                fix="fix or remove that line") from None
            row += 1


def gsm8k_rows(records, split: str, path: str) -> Iterator[dict]:
    index = -1
    for index, record in enumerate(records):
        for key in ("question", "answer"):
            value = record.get(key) if isinstance(record, dict) else None
            if not isinstance(value, str):
                found = "missing" if value is None else f"{type(value).__name__} {value!r:.60}"
                raise DataError(path, f"{key} is {found}, expected a string", row=index, key=key,
                                fix='each line must be {"question": str, "answer": str}')
        truth = ground_truth(record["answer"])
        if truth is None:
            raise DataError(path, 'the answer does not end with "#### <number>"', row=index, key="answer",
                            fix="this is not GSM8K's answer format; check the input file")
        yield make_row(data_source=DATA_SOURCE, question=record["question"], instruction=INSTRUCTION,
                       ground_truth=truth, split=split, index=index, answer=record["answer"])
    if index < 0:
        raise DataError(path, "the file has no rows", fix="check the input file")


def hub_records(split: str):
    # Needs the network, so the tests (offline) exercise --input_dir only.
    import datasets

    return datasets.load_dataset("openai/gsm8k", "main", split=split)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--local_save_dir", default="~/data/gsm8k", help="where train/test.parquet are written")
    parser.add_argument("--input_dir", default=None, help="folder with GSM8K's train.jsonl and test.jsonl")
    args = parser.parse_args(argv)
    save_dir = os.path.expanduser(args.local_save_dir)
    os.makedirs(save_dir, exist_ok=True)
    counts = {}
    for split in SPLITS:
        if args.input_dir is None:
            source, records = f"openai/gsm8k:{split}", hub_records(split)
        else:
            source = os.path.join(os.path.expanduser(args.input_dir), f"{split}.jsonl")
            records = read_jsonl(source)
        out = os.path.join(save_dir, f"{split}.parquet")
        counts[split] = write_atomically(out, gsm8k_rows(records, split, source))
        print(f"{split}: {counts[split]} rows -> {out}")
    return counts


def write_atomically(out: str, rows) -> int:
    """A bad row found half-way leaves no half-written parquet behind."""
    partial = out + ".partial"
    try:
        count = write_rows(partial, rows)
    except BaseException:
        if os.path.exists(partial):
            os.remove(partial)
        raise
    os.replace(partial, out)
    return count


if __name__ == "__main__":
    try:
        main()
    except DataError as error:
        raise SystemExit(f"error: {error}") from None
