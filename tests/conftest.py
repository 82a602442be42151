"""Shared fixtures: tiny HF checkpoints of every supported architecture (built locally), and the gloo
runner (forked workers with a deadline). The SGLang servers are in tests/sglang_servers.py, in-process runs
in tests/runs.py."""
import os

import pytest

from megatron_opd.parallel.quiet import quiet_known_messages  # noqa: E402

quiet_known_messages()

from megatron_opd.demo.tiny import train_tokenizer, write_tiny_checkpoint  # noqa: E402
from megatron_opd.parallel.local_group import run_local  # noqa: E402

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # its threads and fork() do not mix
pytest_plugins = ["tests.sglang_servers"]

FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
MOE_FAMILIES = ("qwen3_moe", "mixtral", "qwen2_moe", "deepseek_v3")
# GSM8K (MIT) as the workplace ships it, beside the checkout; its tests fail without it rather than skip.
GSM8K_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                         "shared", "data", "gsm8k")
# A hung collective fails the test after this long instead of hanging CI.
WORKER_DEADLINE_S = float(os.environ.get("OPD_TEST_DEADLINE_S", 180))


def run_distributed(fn, world_size, *args, timeout_s=WORKER_DEADLINE_S):
    """fn(rank, world_size, *args) on forked gloo workers; returns per-rank results."""
    return run_local(fn, world_size, *args, timeout_s=timeout_s)


@pytest.fixture(scope="session")
def gsm8k_dir():
    """The real GSM8K files (train.jsonl, test.jsonl)."""
    import pathlib

    if not os.path.isfile(os.path.join(GSM8K_DIR, "test.jsonl")):
        pytest.fail(f"GSM8K not found at {GSM8K_DIR}: these tests need ../shared/data/gsm8k beside the checkout "
                    f"(train.jsonl and test.jsonl from openai/grade-school-math)", pytrace=False)
    return pathlib.Path(GSM8K_DIR)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return train_tokenizer()


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory, tiny_tokenizer):
    """family -> directory of a tiny random HF checkpoint (fp32 safetensors, config, tokenizer)."""
    root = tmp_path_factory.mktemp("tiny_models")
    return {family: write_tiny_checkpoint(str(root / family), family, seed=11, tokenizer=tiny_tokenizer)
            for family in FAMILIES}


@pytest.fixture(scope="session")
def tiny_moe_models(tmp_path_factory, tiny_tokenizer):
    """family -> directory of a tiny random mixture-of-experts HF checkpoint (4 experts, top-2)."""
    root = tmp_path_factory.mktemp("tiny_moe_models")
    return {family: write_tiny_checkpoint(str(root / family), family, seed=11, tokenizer=tiny_tokenizer)
            for family in MOE_FAMILIES}


@pytest.fixture(scope="session")
def distill_setup(tmp_path_factory, tiny_tokenizer):
    """A tiny student and a different teacher (same tokenizer) and synthetic-task parquet files."""
    from megatron_opd.demo.arithmetic import write_synthetic_parquet

    root = tmp_path_factory.mktemp("distill")
    paths = {"student": write_tiny_checkpoint(str(root / "student"), "qwen2", seed=1, tokenizer=tiny_tokenizer),
             "teacher": write_tiny_checkpoint(str(root / "teacher"), "qwen2", seed=2, tokenizer=tiny_tokenizer),
             "train": write_synthetic_parquet(str(root / "train.parquet"), 64, seed=0),
             # One batch of prompts, drawn every step (data.shuffle=false): a curve over steps shows learning,
             # not the luck of each step's prompts.
             "fixed": write_synthetic_parquet(str(root / "fixed.parquet"), 4, seed=0),
             "test": write_synthetic_parquet(str(root / "test.parquet"), 8, seed=1, split="test")}
    return paths


# Qwen2.5-0.5B-Instruct / Qwen2.5-7B-Instruct's quirks at tiny size: one tokenizer, config vocabularies padded
# differently past its length (151936 and 152064 rows over 151665 tokens), tied embeddings in the student
# only, 14 query / 2 KV heads against 28 / 4.
QWEN_PAIR = {"student": dict(vocab_pad=20, tie_word_embeddings=True, hidden_size=112, num_attention_heads=14,
                             num_key_value_heads=2, intermediate_size=224, num_hidden_layers=2),
             "teacher": dict(vocab_pad=84, tie_word_embeddings=False, hidden_size=224, num_attention_heads=28,
                             num_key_value_heads=4, intermediate_size=448, num_hidden_layers=2)}


@pytest.fixture(scope="session")
def qwen_pair(tmp_path_factory, tiny_tokenizer, distill_setup):
    """The quirky student and teacher (HF directories) with the distill_setup's prompt files."""
    root = tmp_path_factory.mktemp("qwen_pair")
    pair = dict(distill_setup)
    for role, seed in (("student", 1), ("teacher", 2)):
        shape = dict(QWEN_PAIR[role])
        vocab_size = len(tiny_tokenizer) + shape.pop("vocab_pad")
        pair[role] = write_tiny_checkpoint(str(root / role), "qwen2", seed=seed, tokenizer=tiny_tokenizer,
                                           vocab_size=vocab_size, **shape)
    return pair


def fixed_data(setup):
    """Overrides that train on the same 4 prompts every step."""
    return [f"data.train_files={setup['fixed']}", "data.shuffle=false"]


def mean_falls(curve, window: int, factor: float = 0.9) -> bool:
    """The mean of the last `window` values is below `factor` x the mean of the first `window`."""
    return sum(curve[-window:]) / window < factor * sum(curve[:window]) / window


def distill_overrides(setup, save_dir, *extra):
    """Hydra-style overrides of a tiny run: 4 prompts x 2 samples, 16 new tokens, 4 steps."""
    return [f"student.path={setup['student']}", f"teacher.path={setup['teacher']}",
            f"data.train_files={setup['train']}", f"data.val_files={setup['test']}", "data.train_batch_size=4",
            "data.max_prompt_length=128", "rollout.response_length=16", "rollout.n=2", "actor.micro_batch_size=2",
            "actor.optim.lr=1e-3", "trainer.total_steps=4", f"trainer.save_dir={save_dir}", "trainer.logger=[jsonl]",
            *extra]


def _local_slurm(tmp_path_factory, nodes):
    """A started cluster of `nodes` nodes, stopped after the session; a set-up error fails the test."""
    from tests.launch.local_slurm import LocalSlurm, SlurmSetupError, install_if_missing

    cluster = None
    try:
        install_s = install_if_missing()
        cluster = LocalSlurm(tmp_path_factory.mktemp(f"slurm-{nodes}-node"), nodes=nodes)
        cluster.install_s = install_s
        cluster.start()
    except SlurmSetupError as err:
        if cluster is not None:
            cluster.stop()
        pytest.fail(f"local SLURM cluster: {err}", pytrace=False)
    installed = "already installed" if install_s is None else f"apt-get install {install_s:.0f} s"
    print(f"local SLURM cluster of {nodes} node(s): {installed}, started in {cluster.start_s:.1f} s ({cluster.conf})")
    yield cluster
    cluster.stop()


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """A real one-node SLURM cluster on this machine (tests/launch/local_slurm.py): slurm-wlm and munge are
    installed with apt when missing (root), then a private munged, slurmctld and slurmd are started."""
    yield from _local_slurm(tmp_path_factory, nodes=1)


@pytest.fixture(scope="session")
def slurm_two_node_cluster(tmp_path_factory):
    """Two simulated nodes on this machine, each its own `slurmd -N <node>` on its own port, both names in
    /etc/hosts as 127.0.0.1 (root): jobs spanning them rendezvous across "nodes" as on a real cluster."""
    yield from _local_slurm(tmp_path_factory, nodes=2)
