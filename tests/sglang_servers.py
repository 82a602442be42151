"""The suite's shared SGLang servers (real SGLang 0.5.23 on CPU, with the FAKE kernel package on its path only):
each is started once, by its first user, and used through its engine or its URL (rollout.url, teacher.url).

- `sglang_engine`: the tiny Qwen2 student's architecture. Tests push the weights they need: `sglang_student`
  (the tiny student's own), `sglang_teacher` (the distillation teacher's; the student and teacher of
  `distill_setup` have this architecture).
- `sglang_pair_server`: the Qwen2.5-0.5B-like student of `qwen_pair` (20 padding rows past its tokens), for the
  trainer's runs with rollout.url; each run pushes its own weights at its start.
- `sglang_moe_engine`: a tiny Qwen3-MoE (every layer routed, as SGLang's Qwen3-MoE builds them), `served_moe`.

A CPU server busy-polls a core while it lives, so the tests of each server run as one block at the end of the
session and the server stops after the teardown of its last user."""
import os

import pytest

SGLANG_STUB = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sglang_stub")
# server fixture -> the fixtures through which a test uses it
SERVERS = {"sglang_engine": {"sglang_engine", "sglang_student", "sglang_teacher"},
           "sglang_pair_server": {"sglang_pair_server"}, "sglang_moe_engine": {"sglang_moe_engine"}}
_LAST_USER = pytest.StashKey[dict]()
_STARTED = pytest.StashKey[dict]()


def sglang_config(**overrides):
    """A CPU SGLang server: the FAKE kernel package on its PYTHONPATH only, a small KV cache, fp32."""
    from megatron_opd.rollout.sglang_server import SGLangConfig

    return SGLangConfig(**{"pythonpath": [SGLANG_STUB], "dtype": "float32", "max_total_tokens": 4096,
                           "startup_timeout_s": 240, "request_timeout_s": 120, **overrides})


def rollout_at(server) -> tuple[str, ...]:
    """Trainer overrides that generate with the shared server `server` (an SGLangEngine)."""
    return ("rollout.engine=sglang", f"rollout.url={server.server.url}", "rollout.sglang.request_timeout_s=120")


def _server_of(item):
    used = set(getattr(item, "fixturenames", ()))
    return next((server for server, fixtures in SERVERS.items() if fixtures & used), None)


@pytest.hookimpl(trylast=True)  # after deselection: the items that will run
def pytest_collection_modifyitems(config, items):
    blocks = {server: [item for item in items if _server_of(item) == server] for server in SERVERS}
    items[:] = [item for item in items if _server_of(item) is None] + [i for block in blocks.values() for i in block]
    config.stash[_LAST_USER] = {block[-1].nodeid: server for server, block in blocks.items() if block}
    config.stash[_STARTED] = {}


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item, nextitem):
    yield
    server = item.config.stash.get(_LAST_USER, {}).get(item.nodeid)
    engine = item.config.stash.get(_STARTED, {}).pop(server, None)
    if engine is not None:
        engine.stop()


def _started(pytestconfig, tmp_path_factory, name: str, model_dir: str):
    from megatron_opd.rollout.sglang_engine import SGLangEngine

    engine = SGLangEngine(model_dir, sglang_config(log_path=str(tmp_path_factory.mktemp(name) / "server.log")))
    engine.start()
    pytestconfig.stash[_STARTED][name] = engine
    return engine


@pytest.fixture(scope="session")
def sglang_engine(tiny_models, tmp_path_factory, pytestconfig):
    """One real SGLang server on the tiny Qwen2 student's architecture (~30 s to start)."""
    engine = _started(pytestconfig, tmp_path_factory, "sglang_engine", tiny_models["qwen2"])
    yield engine
    engine.stop()


def served_by(engine, model_dir):
    """The shared server, serving `model_dir`'s weights (tests before may have pushed others), through the
    tensor route."""
    from safetensors.torch import load_file

    engine.config.weight_sync = "tensor"
    engine.update_weights(load_file(os.path.join(model_dir, "model.safetensors")).items(), engine.weight_version + 1)
    return engine


@pytest.fixture
def sglang_student(sglang_engine, tiny_models):
    return served_by(sglang_engine, tiny_models["qwen2"])


@pytest.fixture
def sglang_teacher(sglang_engine, distill_setup):
    return served_by(sglang_engine, distill_setup["teacher"])


@pytest.fixture(scope="session")
def sglang_pair_server(qwen_pair, tmp_path_factory, pytestconfig):
    """One real SGLang server on the Qwen2.5-like student's architecture, for trainer runs at rollout.url."""
    engine = _started(pytestconfig, tmp_path_factory, "sglang_pair_server", qwen_pair["student"])
    yield engine
    engine.stop()


@pytest.fixture(scope="session")
def served_moe(tmp_path_factory, tiny_tokenizer):
    """A tiny Qwen3-MoE with no dense layer (mlp_only_layers=[], as Qwen3-30B-A3B)."""
    from megatron_opd.demo.tiny import write_tiny_checkpoint

    return write_tiny_checkpoint(str(tmp_path_factory.mktemp("served_moe") / "qwen3_moe"), "qwen3_moe", seed=5,
                                 tokenizer=tiny_tokenizer, mlp_only_layers=[])


@pytest.fixture(scope="session")
def sglang_moe_engine(served_moe, tmp_path_factory, pytestconfig):
    """One real SGLang server on `served_moe` (its MoE layers on SGLang's native CPU path)."""
    engine = _started(pytestconfig, tmp_path_factory, "sglang_moe_engine", served_moe)
    yield engine
    engine.stop()
