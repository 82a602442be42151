import pytest
from omegaconf import OmegaConf

from megatron_opd.data import DataConfig, DataConfigError


def test_defaults_and_file_lists():
    config = DataConfig(train_files="a.parquet")
    assert config.train_files == ["a.parquet"] and config.val_files is None
    assert (config.train_batch_size, config.max_prompt_length, config.truncation) == (8, 512, "error")
    assert (config.filter_overlong_prompts, config.shuffle, config.seed) == (False, True, 0)
    assert config.prompt_key == "prompt"
    assert DataConfig(train_files=("a.parquet", "b.jsonl"), val_files="v.parquet").val_files == ["v.parquet"]
    yaml_list = OmegaConf.create({"files": ["a.parquet", "b.parquet"]}).files
    assert DataConfig(train_files=yaml_list).train_files == ["a.parquet", "b.parquet"]


@pytest.mark.parametrize("overrides, message", [
    (dict(truncation="middle"), "data.truncation='middle': must be one of error|left|right"),
    (dict(train_batch_size=0), "data.train_batch_size=0: must be an integer >= 1"),
    (dict(max_prompt_length=True), "data.max_prompt_length=True: must be an integer >= 1"),
    (dict(max_prompt_length=12.5), "data.max_prompt_length=12.5: must be an integer >= 1"),
    (dict(filter_overlong_prompts="yes"), "data.filter_overlong_prompts='yes': must be true or false"),
    (dict(shuffle=1), "data.shuffle=1: must be true or false"),
    (dict(seed=-1), "data.seed=-1: must be an integer >= 0"),
    (dict(prompt_key=""), "data.prompt_key='': must be a non-empty column name"),
    (dict(train_files=[]), "data.train_files=[]: must be a non-empty path"),
    (dict(train_files=["a.parquet", 3]), "data.train_files=['a.parquet', 3]: must be a non-empty path"),
    (dict(train_files=7), "data.train_files=7: must be a path or a list of paths"),
    (dict(val_files=""), "data.val_files='': must be a non-empty path"),
])
def test_bad_values_name_the_key(overrides, message):
    kwargs = dict(train_files="a.parquet")
    kwargs.update(overrides)
    with pytest.raises(DataConfigError) as error:
        DataConfig(**kwargs)
    assert str(error.value).startswith(message)


def test_files_are_optional_here_and_required_where_used():
    assert DataConfig().train_files is None and DataConfig().val_files is None
