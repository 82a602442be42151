"""Several teachers routed by data source: in one batch mixing arithmetic and walk rows, each row's divergence
equals the one its own teacher alone gives (rel 1e-6), for a full-vocabulary kind (the teachers' hidden
sizes and padded vocabularies differ: the Qwen2.5-7B look-alike and the tiny Qwen2) and a sampled kind, with
both teachers co-located and with one on its SGLang server; a teacher runs only on the micro-batches that
hold its rows. A two-teacher run on 2 processes (DP=2) equals one process, with per-teacher metrics; a row
whose data source has no teacher stops the run at start-up, naming its file and row."""
import pytest
import torch

from megatron_opd.data.schema import write_rows
from megatron_opd.demo.arithmetic import SYNTHETIC_DATA_SOURCE
from megatron_opd.demo.walk import WALK_DATA_SOURCE, walk_rows
from megatron_opd.config import ConfigError
from tests.conftest import run_distributed
from tests.runs import REL, run_config, train

MIXED = ("data.max_prompt_length=512", "rollout.n=1", "data.train_batch_size=8", "actor.micro_batch_size=2",
         "teacher.path=null", "trainer.export_hf=false")


@pytest.fixture(scope="module")
def mixed(distill_setup, qwen_pair, tmp_path_factory):
    """The arithmetic rows and as many walk rows, and the two teachers' overrides: the 7B look-alike scores
    arithmetic, distill_setup's teacher walks (and is the default)."""
    walk = str(tmp_path_factory.mktemp("walk") / "walk.parquet")
    write_rows(walk, walk_rows(64, seed=0))
    return {**distill_setup, "files": f"data.train_files=[{distill_setup['train']},{walk}]", "walk_file": walk,
            "arith": (f"+teachers.arith.path={qwen_pair['teacher']}",
                      f"+teachers.arith.data_sources=[{SYNTHETIC_DATA_SOURCE}]"),
            "walk": (f"+teachers.walk.path={distill_setup['teacher']}", "+teachers.walk.default=true")}


def _routed_and_single(rank, world_size, cfg):
    """Per micro-batch: which teachers ran, its rows' teachers, the routed per-token divergence and each
    teacher's own on every row, for one step's sequences and the same student hidden states."""
    from megatron_opd.loss import response_counts
    from megatron_opd.models.head import output_weight
    from megatron_opd.trainer.loop import Trainer
    from megatron_opd.trainer.objective import LossInputs, Objective
    from megatron_opd.trainer.rollouts import step_samples

    trainer = Trainer(cfg)
    run = trainer.run
    try:
        samples = step_samples(run, cfg, 0, run.next_items())
        batch = samples.batch(run.pad_id, run.dims.device, 1)
        micro = batch.micro_batches(cfg.actor.micro_batch_size)
        scored, served = {}, {t: teacher.engine for t, teacher in enumerate(run.teacher.teachers)
                              if getattr(teacher, "engine", None) is not None}

        def counting(t, score):
            def counted(sequences, *args):
                scored[t] = scored.get(t, 0) + len(sequences)
                return score(sequences, *args)
            return counted

        for t, engine in served.items():  # a served teacher: what it sends its server in the routed pass
            engine.score = counting(t, engine.score)
        routed = run.teacher.outputs(samples.pairs, batch, micro)
        for engine in served.values():
            del engine.score
        singles = [teacher.outputs(samples.pairs, batch, micro) for teacher in run.teacher.teachers]
        weight, counts = output_weight(run.student[-1]).detach(), response_counts([mb.loss_mask for mb in micro])
        alone = [Objective(cfg.actor, trainer.objective.temperature, run.vocab_size, None, head)
                 for head in run.teacher.head_weight]
        torch.manual_seed(0)
        result = []
        for m, mb in enumerate(micro):
            hidden = torch.randn(mb.size, mb.tokens.shape[1], run.arch.hidden_size)
            kl = trainer.objective.per_token_kl(LossInputs(hidden, weight, mb, counts, m, routed[m]))
            own = [objective.per_token_kl(LossInputs(hidden, weight, mb, counts, m, single[m]))
                   for objective, single in zip(alone, singles)]
            result.append(([part is not None for part in routed[m]["parts"]], mb.teacher_index.tolist(),
                           (kl * mb.loss_mask).detach(), [(k * mb.loss_mask).detach() for k in own]))
        return result, scored, batch.teacher_index.tolist()
    finally:
        run.close()


def _check_rows(found, teachers: int = 2):
    result, scored, index = found
    for t, sequences in scored.items():  # a served teacher scores its rows alone
        assert sequences == index.count(t) > 0
    mixed_micro = 0
    for ran, index, kl, own in result:
        assert ran == [t in index for t in range(teachers)]  # a teacher runs only where it has rows
        mixed_micro += len(set(index)) > 1
        for row, t in enumerate(index):
            assert torch.allclose(kl[row], own[t][row], rtol=1e-6, atol=1e-7), (row, t)
            other = own[1 - t][row]
            assert (other - own[t][row]).abs().max() > 1e-3  # the other teacher would give another divergence
    assert mixed_micro >= 1


@pytest.mark.parametrize("kind", [("actor.kl_loss_type=reverse",), ("actor.kl_loss_type=kl",)],
                         ids=["reverse", "kl"])
def test_each_row_gets_its_own_teachers_divergence(mixed, tmp_path, kind):
    cfg = run_config(mixed, tmp_path, mixed["files"], *MIXED, *mixed["arith"], *mixed["walk"], *kind)
    _check_rows(run_distributed(_routed_and_single, 1, cfg, timeout_s=300)[0])


def test_one_teacher_on_sglang(mixed, sglang_teacher, tmp_path):
    served = (f"+teachers.walk.path={mixed['teacher']}", "+teachers.walk.default=true", "+teachers.walk.engine=sglang",
              f"+teachers.walk.url={sglang_teacher.server.url}")
    cfg = run_config(mixed, tmp_path, mixed["files"], *MIXED, *mixed["arith"], *served, "actor.kl_loss_type=kl",
                     "actor.kl_temperature=1.0")
    found = run_distributed(_routed_and_single, 1, cfg, timeout_s=300)[0]
    assert list(found[1]) == [1]
    _check_rows(found)


def test_two_processes_equal_one_with_per_teacher_metrics(mixed, tmp_path):
    run = (mixed["files"], *MIXED, *mixed["arith"], *mixed["walk"], "actor.kl_loss_type=reverse",
           "trainer.total_steps=2")
    one = train(mixed, tmp_path / "one", *run)
    two = train(mixed, tmp_path / "two", *run, world_size=2)
    for step_one, step_two in zip(one, two, strict=True):
        for name in ("actor/kl_loss", "teacher/arith/kl_loss", "teacher/walk/kl_loss", "actor/grad_norm"):
            assert step_two[name] == pytest.approx(step_one[name], rel=REL), name
        for name in ("tokens_scored", "sequences"):
            assert step_one[f"teacher/arith/{name}"] + step_one[f"teacher/walk/{name}"] == pytest.approx(
                {"sequences": 8, "tokens_scored": step_one["response_length/mean"] * 8}[name])
        assert step_one["teacher/arith/kl_loss"] != pytest.approx(step_one["teacher/walk/kl_loss"], rel=0.01)


@pytest.mark.parametrize("form", [("actor.kl_loss_type=reverse",),
                                  ("actor.policy_loss=pg", "actor.kl_loss_type=reverse", "actor.ppo_mini_batch_size=4")],
                         ids=["direct", "pg"])
def test_a_run_on_one_teachers_rows_equals_that_teacher_alone(mixed, tmp_path, form):
    """Walk rows only: the second teacher scores them all (its head, its hidden states), as a run of it alone."""
    run = (f"data.train_files={mixed['walk_file']}", *MIXED, *form, "trainer.total_steps=2")
    routed = train(mixed, tmp_path / "routed", *run, *mixed["arith"], *mixed["walk"])
    alone = train(mixed, tmp_path / "alone", *run, f"teacher.path={mixed['teacher']}")
    for step_routed, step_alone in zip(routed, alone, strict=True):
        for name in ("actor/kl_loss", "actor/grad_norm") + (("actor/pg_loss",) if len(form) > 1 else ()):
            assert step_routed[name] == pytest.approx(step_alone[name], rel=1e-6), name
        assert step_routed["teacher/walk/kl_loss"] == pytest.approx(step_alone["actor/kl_loss"], rel=1e-6)
        assert "teacher/arith/kl_loss" not in step_routed and step_routed["teacher/walk/sequences"] == 8


def test_a_row_without_a_teacher_is_refused_at_start_up(mixed, tmp_path):
    from megatron_opd.data.prompt_dataset import PromptDataset
    from megatron_opd.trainer.setup import check_routing
    from megatron_opd.trainer.vocab import load_tokenizer

    cfg = run_config(mixed, tmp_path, mixed["files"], *MIXED, *mixed["arith"],
                     f"+teachers.walk.path={mixed['teacher']}", "+teachers.walk.data_sources=[elsewhere]")
    dataset = PromptDataset.from_config(cfg.data, load_tokenizer(cfg.student.path, "student.path"))
    with pytest.raises(ConfigError, match=rf"walk.parquet row 0: data_source '{WALK_DATA_SOURCE}' has no teacher"):
        check_routing(cfg, dataset)
    cfg.teachers["walk"].default = True
    check_routing(cfg, dataset)
