"""A teacher and a student are compatible by their tokenizers' content: the Qwen2.5-like pair (one tokenizer,
configs padded to different sizes past it) runs over the tokenizer's vocabulary; a tokenizer saved again in
another file format still matches; different tokens or special tokens, and a missing tokenizer, are refused
with both paths named."""
import os
import shutil

import pytest

from megatron_opd.demo.tiny import train_tokenizer
from megatron_opd.config import ConfigError, to_config
from megatron_opd.trainer.setup import check_layout_and_vocab
from megatron_opd.trainer.vocab import load_tokenizer, shared_vocab_size
from tests.conftest import distill_overrides
from tests.runs import composed


def check(pair, tmp_path, teacher=None):
    cfg = to_config(composed(*distill_overrides(pair, tmp_path), *([f"teacher.path={teacher}"] if teacher else [])))
    return check_layout_and_vocab(cfg, world_size=1)


def with_tokenizer(model_dir, target, tokenizer):
    shutil.copytree(model_dir, target)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        if os.path.exists(target / name):
            os.remove(target / name)
    tokenizer.save_pretrained(target)
    return str(target)


def test_padded_vocabularies_of_one_tokenizer_share_the_tokenizer(qwen_pair, tiny_tokenizer, tmp_path):
    arch, _, vocab_size = check(qwen_pair, tmp_path)
    assert arch.vocab_size == len(tiny_tokenizer) + 20 and vocab_size == len(tiny_tokenizer)


def test_the_same_tokens_in_other_files_match(qwen_pair, tmp_path):
    resaved = load_tokenizer(qwen_pair["teacher"], "teacher.path")  # transformers writes its own format back
    teacher = with_tokenizer(qwen_pair["teacher"], tmp_path / "teacher", resaved)
    assert open(f"{teacher}/tokenizer.json", "rb").read() != open(f"{qwen_pair['student']}/tokenizer.json", "rb").read()
    assert check(qwen_pair, tmp_path, teacher)[2] == 300


OTHER_CORPUS = ["zebras quietly graze beyond violet mountains", "seven quick jugglers vex a wizard"]


def test_a_prefix_vocabulary_is_compatible_and_other_tokens_are_refused_naming_both(qwen_pair, tmp_path):
    # Fewer merges on the same corpus: the first 280 ids are the same tokens, which is all the rule asks.
    prefix = with_tokenizer(qwen_pair["teacher"], tmp_path / "prefix", train_tokenizer(vocab_size=280))
    assert check(qwen_pair, tmp_path, prefix)[2] == 280
    teacher = with_tokenizer(qwen_pair["teacher"], tmp_path / "teacher", train_tokenizer(OTHER_CORPUS))
    with pytest.raises(ConfigError, match=rf"student.path={qwen_pair['student']} and teacher.path={teacher} do not "
                                          r"share a tokenizer: \d+ of the first \d+ token ids differ, e.g. id \d+"):
        check(qwen_pair, tmp_path, teacher)


def test_other_special_tokens_are_refused(tiny_tokenizer):
    other = train_tokenizer()
    other.eos_token = "<|endoftext|>"
    with pytest.raises(ConfigError, match=r"special tokens differ: student \{.*\}, teacher \{.*\}"):
        shared_vocab_size(tiny_tokenizer, other, "s", "t")


def test_a_missing_tokenizer_is_an_error_not_a_pass(qwen_pair, tmp_path):
    teacher = tmp_path / "teacher"
    shutil.copytree(qwen_pair["teacher"], teacher)
    for name in os.listdir(teacher):
        if name.startswith(("tokenizer", "special_tokens", "chat_template", "vocab", "merges")):
            os.remove(teacher / name)
    with pytest.raises(ConfigError, match=rf"teacher.path={teacher}: no tokenizer"):
        check(qwen_pair, tmp_path, str(teacher))


def test_each_of_several_teachers_is_checked_by_name(qwen_pair, tmp_path):
    other = with_tokenizer(qwen_pair["teacher"], tmp_path / "other", train_tokenizer(OTHER_CORPUS))
    teachers = ("teacher.path=null", f"+teachers.math.path={qwen_pair['teacher']}", "+teachers.math.default=true",
                f"+teachers.code.path={other}", "+teachers.code.data_sources=[code]")
    cfg = to_config(composed(*distill_overrides(qwen_pair, tmp_path), *teachers))
    with pytest.raises(ConfigError, match=rf"student.path={qwen_pair['student']} and teachers.code.path={other} do "
                                          r"not share a tokenizer"):
        check_layout_and_vocab(cfg, world_size=1)
