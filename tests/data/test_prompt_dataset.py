import json

import pytest
import torch

from megatron_opd.data import DataConfig, DataConfigError, DataError, PromptDataset, collate_prompts
from megatron_opd.data.chat import encode_prompt
from megatron_opd.data.schema import make_row, write_rows


def rows(n, start=0, words=lambda i: 1):
    """Row i asks about i with `words(i)` filler words, so prompt lengths can vary."""
    return [make_row(data_source="test", question=f"{'fox ' * words(i)}What is {i} + 1?", instruction="Answer.",
                     ground_truth=str(i + 1), split="train", index=i, answer=f"#### {i + 1}")
            for i in range(start, start + n)]


def write(path, records):
    if str(path).endswith(".jsonl"):
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    else:
        write_rows(path, records)
    return str(path)


class CountingTokenizer:
    """The tokenizer, counting every call into it that renders or tokenises."""

    def __init__(self, tokenizer):
        self._tokenizer, self.calls = tokenizer, 0

    def __getattr__(self, name):
        attribute = getattr(self._tokenizer, name)
        if name in ("apply_chat_template", "encode"):
            self.calls += 1
        return attribute

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self._tokenizer(*args, **kwargs)


def test_item_fields(tmp_path, tiny_tokenizer):
    dataset = PromptDataset(write(tmp_path / "a.parquet", rows(4)), tiny_tokenizer, max_prompt_length=256)
    item = dataset[2]
    assert set(item) == {"input_ids", "raw_prompt", "ground_truth", "data_source", "index"}
    assert item["raw_prompt"] == [{"role": "user", "content": "fox What is 2 + 1? Answer."}]
    assert item["input_ids"] == encode_prompt(tiny_tokenizer, item["raw_prompt"])
    assert tiny_tokenizer.decode(item["input_ids"]).endswith("<|im_end|>\n<|im_start|>assistant\n")
    assert (item["ground_truth"], item["data_source"], item["index"]) == ("3", "test", 2)
    assert dataset[-1]["index"] == 3
    with pytest.raises(IndexError):
        dataset[4]


@pytest.mark.parametrize("suffix", [".parquet", ".jsonl"])
def test_response_key_gives_sft_targets(tmp_path, tiny_tokenizer, suffix):
    path = write(tmp_path / f"a{suffix}", rows(3))
    dataset = PromptDataset(path, tiny_tokenizer, max_prompt_length=256, response_key="extra_info.answer")
    assert dataset[1]["response"] == "#### 2"
    with pytest.raises(DataError, match=r"key 'extra_info.missing'.*response is missing"):
        PromptDataset(path, tiny_tokenizer, max_prompt_length=256, response_key="extra_info.missing")[0]


@pytest.mark.parametrize("suffix", [".parquet", ".jsonl"])
def test_response_skip_key_gives_checked_spans(tmp_path, tiny_tokenizer, suffix):
    records = rows(2)
    records[0]["extra_info"]["skip"], records[1]["extra_info"]["skip"] = [[0, 2], [3, 4]], [[0, 9]]
    keys = dict(max_prompt_length=256, response_key="extra_info.answer", response_skip_key="extra_info.skip")
    good, bad = (write(tmp_path / f"{name}{suffix}", part) if suffix == ".jsonl" else
                 _parquet_with_skip(tmp_path / f"{name}{suffix}", part)
                 for name, part in (("good", records[:1]), ("bad", records)))
    assert PromptDataset(good, tiny_tokenizer, **keys)[0]["response_skip"] == [(0, 2), (3, 4)]
    with pytest.raises(DataError, match=r"bad.*row 1.*key 'extra_info.skip': spans are .*6 characters"):
        PromptDataset(bad, tiny_tokenizer, **keys)
    with pytest.raises(DataConfigError, match="response_skip_key.*needs data.response_key"):
        DataConfig(response_skip_key="extra_info.skip")


def _parquet_with_skip(path, records):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(records), path)
    return str(path)


def test_many_files_of_both_formats(tmp_path, tiny_tokenizer):
    files = [write(tmp_path / "a.parquet", rows(3)), write(tmp_path / "b.jsonl", rows(5, start=3)),
             write(tmp_path / "c.parquet", rows(2, start=8))]
    dataset = PromptDataset(files, tiny_tokenizer, max_prompt_length=256)
    assert len(dataset) == dataset.num_rows == 10 and dataset.num_filtered == 0
    assert [dataset[i]["ground_truth"] for i in range(10)] == [str(i + 1) for i in range(10)]
    assert [dataset[i]["index"] for i in range(10)] == list(range(10))
    assert len(PromptDataset(files[1], tiny_tokenizer, max_prompt_length=256)) == 5


def test_from_config(tmp_path, tiny_tokenizer):
    train, val = write(tmp_path / "t.parquet", rows(6)), write(tmp_path / "v.jsonl", rows(2))
    config = DataConfig(train_files=train, val_files=[val], max_prompt_length=256)
    assert len(PromptDataset.from_config(config, tiny_tokenizer)) == 6
    assert len(PromptDataset.from_config(config, tiny_tokenizer, split="val")) == 2
    with pytest.raises(DataConfigError, match="data.val_files is not set"):
        PromptDataset.from_config(DataConfig(train_files=train), tiny_tokenizer, split="val")
    with pytest.raises(DataConfigError, match="data.train_files is not set"):
        PromptDataset.from_config(DataConfig(), tiny_tokenizer)


def test_opening_with_truncation_tokenises_nothing_and_with_error_once_in_batches(tmp_path, tiny_tokenizer):
    path = write(tmp_path / "a.parquet", rows(1000))
    tokenizer = CountingTokenizer(tiny_tokenizer)
    dataset = PromptDataset(path, tokenizer, max_prompt_length=256, truncation="left")
    assert len(dataset) == 1000 and tokenizer.calls == 0
    dataset[500]
    assert tokenizer.calls > 0
    tokenizer = CountingTokenizer(tiny_tokenizer)
    PromptDataset(path, tokenizer, max_prompt_length=256)  # truncation=error: every length checked up front
    assert 0 < tokenizer.calls < 10


def test_overlong_prompts_error_or_truncate(tmp_path, tiny_tokenizer):
    path = write(tmp_path / "long.parquet", rows(3, words=lambda i: 1 + 20 * i))
    full = [PromptDataset(path, tiny_tokenizer, max_prompt_length=10_000)[i]["input_ids"] for i in range(3)]
    limit = len(full[1]) - 1
    with pytest.raises(DataError) as error:  # at opening: not hours into a run, when row 1 is first drawn
        PromptDataset(path, tiny_tokenizer, max_prompt_length=limit)
    assert (error.value.path, error.value.row, error.value.key) == (path, 1, "prompt")
    assert f"prompt has more tokens than data.max_prompt_length={limit} (2 of the 3 prompts do)" in str(error.value)
    assert "data.filter_overlong_prompts=true" in str(error.value)
    assert PromptDataset(path, tiny_tokenizer, max_prompt_length=len(full[2]))[1]["input_ids"] == full[1]

    left = PromptDataset(path, tiny_tokenizer, max_prompt_length=limit, truncation="left")
    right = PromptDataset(path, tiny_tokenizer, max_prompt_length=limit, truncation="right")
    for i in range(3):
        assert left[i]["input_ids"] == full[i][-limit:] and right[i]["input_ids"] == full[i][:limit]
    assert tiny_tokenizer.decode(left[2]["input_ids"]).endswith("<|im_start|>assistant\n")


def test_filter_overlong_prompts_keeps_row_indices(tmp_path, tiny_tokenizer):
    def words(i):
        return 1 + 15 * (i % 3)

    files = [write(tmp_path / "a.parquet", rows(9, words=words)), write(tmp_path / "b.jsonl", rows(6, 9, words))]
    everything = PromptDataset(files, tiny_tokenizer, max_prompt_length=10_000)
    lengths = [len(everything[i]["input_ids"]) for i in range(15)]
    limit = sorted(set(lengths))[1]
    kept = [i for i in range(15) if lengths[i] <= limit]
    assert 0 < len(kept) < 15

    dataset = PromptDataset(files, tiny_tokenizer, max_prompt_length=limit, filter_overlong_prompts=True)
    assert (len(dataset), dataset.num_rows, dataset.num_filtered) == (len(kept), 15, 15 - len(kept))
    assert [dataset[j]["index"] for j in range(len(dataset))] == kept
    assert [dataset[j]["ground_truth"] for j in range(len(dataset))] == [str(i + 1) for i in kept]
    assert all(len(dataset[j]["input_ids"]) <= limit for j in range(len(dataset)))

    with pytest.raises(DataError, match="all 15 prompts are longer than data.max_prompt_length=3 tokens"):
        PromptDataset(files, tiny_tokenizer, max_prompt_length=3, filter_overlong_prompts=True)


def test_filtering_validates_every_row_up_front(tmp_path, tiny_tokenizer):
    records = rows(5)
    records[3]["prompt"][0]["content"] = 12
    path = write(tmp_path / "bad.jsonl", records)
    lazy = PromptDataset(path, tiny_tokenizer, max_prompt_length=256, truncation="right")
    assert lazy[2]["ground_truth"] == "3"
    for checked in (dict(filter_overlong_prompts=True), dict(truncation="error")):
        with pytest.raises(DataError, match=r"row 3 \(line 4\): key 'prompt\[0\].content'"):
            PromptDataset(path, tiny_tokenizer, max_prompt_length=256, **checked)


def test_bad_truncation_mode(tmp_path, tiny_tokenizer):
    with pytest.raises(DataConfigError, match="data.truncation='middle': must be one of error|left|right"):
        PromptDataset(write(tmp_path / "a.parquet", rows(1)), tiny_tokenizer, max_prompt_length=8,
                      truncation="middle")


def test_collate_left_pads(tmp_path, tiny_tokenizer):
    dataset = PromptDataset(write(tmp_path / "a.parquet", rows(3, words=lambda i: 1 + 3 * i)), tiny_tokenizer,
                            max_prompt_length=256)
    items = [dataset[i] for i in (2, 0, 1)]
    batch = collate_prompts(items, pad_token_id=tiny_tokenizer.pad_token_id)
    lengths = [len(item["input_ids"]) for item in items]
    assert batch["input_ids"].shape == batch["attention_mask"].shape == (3, max(lengths))
    assert batch["attention_mask"].sum(1).tolist() == lengths
    for row, item in enumerate(items):
        n = len(item["input_ids"])
        assert batch["input_ids"][row, -n:].tolist() == item["input_ids"]
        assert (batch["input_ids"][row, :-n] == tiny_tokenizer.pad_token_id).all()
        assert batch["attention_mask"][row, -n:].all() and not batch["attention_mask"][row, :-n].any()
    assert batch["prompt_ids"] == [item["input_ids"] for item in items]
    assert batch["ground_truth"] == ["3", "1", "2"] and batch["data_source"] == ["test"] * 3
    assert torch.equal(batch["index"], torch.tensor([2, 0, 1]))
    assert batch["raw_prompt"][1] == items[1]["raw_prompt"]
