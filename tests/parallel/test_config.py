import pytest

from megatron_opd.parallel import ParallelConfig, ParallelConfigError


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


def test_context_parallel_runs_without_transformer_engine_and_sequence_parallel_does_not():
    ParallelConfig(context=2).validate(world_size=2, num_attention_heads=4, num_query_groups=2, num_layers=4,
                                       te_available=False)
    with pytest.raises(ParallelConfigError, match=r"sequence_parallel=true needs Transformer Engine"):
        ParallelConfig(tensor=2, sequence_parallel=True).check_backend(te_available=False)
    ParallelConfig(tensor=2, context=2, sequence_parallel=True).check_backend(te_available=True)


@pytest.mark.parametrize("kwargs, multiple", [
    (dict(), 1), (dict(context=2), 4), (dict(context=4, tensor=2), 8),
    (dict(tensor=2, sequence_parallel=True), 2), (dict(context=2, tensor=4, sequence_parallel=True), 16)])
def test_sequences_pad_to_two_chunks_per_context_rank_times_tp_under_sequence_parallel(kwargs, multiple):
    assert ParallelConfig(**kwargs).sequence_multiple == multiple


def test_a_broken_transformer_engine_is_reported(monkeypatch, capsys):
    import importlib.util
    import sys

    from megatron_opd.parallel import config

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object())
    monkeypatch.setitem(sys.modules, "transformer_engine.pytorch", None)  # None: "import fails"
    config.transformer_engine_problem.cache_clear()
    try:
        assert not config.transformer_engine_available()
        assert "transformer_engine is installed but fails to import (ModuleNotFoundError" in capsys.readouterr().err
    finally:
        config.transformer_engine_problem.cache_clear()


@pytest.mark.parametrize("kwargs, message", [
    (dict(tensor=0), r"parallel.tensor=0: must be an integer >= 1"),
    (dict(pipeline="2"), r"parallel.pipeline='2'"),
    (dict(virtual_pipeline=2), r"virtual_pipeline=2 needs parallel.pipeline >= 2"),
    (dict(sequence_parallel=True), r"sequence_parallel=true needs parallel.tensor >= 2"),
])
def test_invalid_values_fail_at_construction(kwargs, message):
    with pytest.raises(ParallelConfigError, match=message):
        ParallelConfig(**kwargs)


def test_expert_parallelism_is_carved_out_of_the_data_parallel_ranks():
    assert ParallelConfig(expert=2).min_world_size == 2 and ParallelConfig(tensor=2, expert=2).min_world_size == 4
    assert ParallelConfig(tensor=2, expert=2, expert_tensor=1).min_world_size == 2
    ParallelConfig(tensor=2, expert=4, expert_tensor=1).check_world(4)
    with pytest.raises(ParallelConfigError, match=r"parallel.expert=4 x parallel.expert_tensor=1 = 4 does not divide "
                       r"the 2 ranks of a pipeline stage .*context\*data = 2 .*multiple of 8 processes"):
        ParallelConfig(pipeline=2, expert=4).check_world(4)
    with pytest.raises(ParallelConfigError, match=r"parallel.expert=3 .*choose parallel.expert dividing context\*data = 4"):
        ParallelConfig(expert=3).check_world(4)


def test_experts_must_divide_by_expert_parallelism_and_dense_models_have_none():
    ParallelConfig(expert=2).check_model(4, 2, 4, num_experts=4)
    with pytest.raises(ParallelConfigError, match=r"4 experts per layer do not divide by parallel.expert=3"):
        ParallelConfig(expert=3).check_model(4, 2, 4, num_experts=4)
    with pytest.raises(ParallelConfigError, match=r"parallel.expert=2, .*no experts"):
        ParallelConfig(expert=2).check_model(4, 2, 4, num_experts=0)


@pytest.mark.parametrize("kwargs, message", [
    (dict(expert=0), r"parallel.expert=0: must be an integer >= 1"),
    (dict(expert_tensor=0), r"parallel.expert_tensor=0: must be null"),
    (dict(token_dispatcher="flex"), r"parallel.token_dispatcher='flex': must be one of allgather\|alltoall"),
])
def test_invalid_expert_values_fail_at_construction(kwargs, message):
    with pytest.raises(ParallelConfigError, match=message):
        ParallelConfig(**kwargs)
