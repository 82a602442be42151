import pytest

from megatron_opd.parallel import ParallelConfig, ParallelConfigError, transformer_engine_available


def test_data_parallel_size_is_what_is_left():
    assert ParallelConfig(tensor=2, pipeline=2).data_parallel_size(8) == 2


def test_world_size_mismatch_says_what_to_launch():
    with pytest.raises(ParallelConfigError, match=r"world size 6 is not divisible by .* = 4.*multiple of 4"):
        ParallelConfig(tensor=2, pipeline=2).check_world(6)


def test_heads_not_divisible_by_tp():
    with pytest.raises(ParallelConfigError, match=r"num_attention_heads=6 is not divisible by parallel.tensor=4"):
        ParallelConfig(tensor=4).check_model(num_attention_heads=6, num_query_groups=2, num_layers=4)


def test_query_groups_not_divisible_by_tp():
    with pytest.raises(ParallelConfigError, match=r"num_key_value_heads=2 is not divisible by parallel.tensor=4"):
        ParallelConfig(tensor=4).check_model(num_attention_heads=8, num_query_groups=2, num_layers=4)


def test_layers_not_divisible_by_pipeline_chunks():
    with pytest.raises(ParallelConfigError, match=r"num_hidden_layers=4 .* 2\*3 = 6"):
        ParallelConfig(pipeline=2, virtual_pipeline=3).check_model(4, 4, num_layers=4)


@pytest.mark.skipif(transformer_engine_available(), reason="this machine has Transformer Engine")
def test_context_parallel_without_transformer_engine_fails_here():
    with pytest.raises(ParallelConfigError, match=r"parallel.context=2 needs Transformer Engine"):
        ParallelConfig(context=2).validate(world_size=2, num_attention_heads=4, num_query_groups=2, num_layers=4)


def test_context_and_sequence_parallel_need_transformer_engine():
    with pytest.raises(ParallelConfigError, match=r"parallel.context=2 needs Transformer Engine"):
        ParallelConfig(context=2).check_backend(te_available=False)
    with pytest.raises(ParallelConfigError, match=r"sequence_parallel=true needs Transformer Engine"):
        ParallelConfig(tensor=2, sequence_parallel=True).check_backend(te_available=False)
    ParallelConfig(tensor=2, context=2, sequence_parallel=True).check_backend(te_available=True)


@pytest.mark.parametrize("kwargs, message", [
    (dict(tensor=0), r"parallel.tensor=0: must be an integer >= 1"),
    (dict(pipeline="2"), r"parallel.pipeline='2'"),
    (dict(virtual_pipeline=2), r"virtual_pipeline=2 needs parallel.pipeline >= 2"),
    (dict(sequence_parallel=True), r"sequence_parallel=true needs parallel.tensor >= 2"),
])
def test_invalid_values_fail_at_construction(kwargs, message):
    with pytest.raises(ParallelConfigError, match=message):
        ParallelConfig(**kwargs)
