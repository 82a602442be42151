"""Every tensor the project's own code (megatron_opd/, checkpoint_tools/) makes is placed on the run's device, or
deliberately on the host (`parallel.HOST`: staging, Adam's step, RNG state, file reads).

Watched: each call of a tensor factory (FACTORIES: the ones that take a device) from a project file, by a
TorchFunctionMode, with the value of its `device` argument; `torch.from_numpy` and `torch.frombuffer`, which
take none and always make host tensors, by wrappers; the legacy constructors (`torch.Tensor(...)`,
`torch.LongTensor(...)`, ...), which no mode sees, by a scan of the source. A call passes when its device is
the run's (`ParallelDims.device`, compared by value) or is `HOST` itself (by identity); it fails without a
device, with a string literal, or with another device.

Runs watched, each through the trainer (or opd-generate's `generate`) on forked gloo workers: distillation
steps with validation, a checkpoint and a resume at TP=1 (top-k kind, entropy), CP=2 and PP=2 (the
policy-gradient form, a reward, two updates a step); DP=2 with a teacher in its own layout (TP=2), token-budget
micro-batches and GKD's mixture (lmbda=0.5 with masked spans); SFT with masked spans; the served teacher and
the SGLang rollout engine (the suite's server); opd-generate with the embedded engine.

Not covered: paths no run above takes (SGLang's distributed and disk weight sync, the GPU-only branches), and on
this CPU machine a host tensor made where the run's device was meant, which is the same device here: only the
literal's type (a string) or the missing argument shows it. tests/bench/test_gpu_smoke.py runs the step on a GPU
when one is lent."""
import ast
import collections
import os
import sys

import pytest
import torch
from torch.overrides import TorchFunctionMode

from megatron_opd.config import to_config
from megatron_opd.parallel import HOST, cpu_compat
from tests.conftest import distill_overrides, run_distributed
from tests.runs import composed

FACTORIES = {torch.tensor, torch.as_tensor, torch.asarray, torch.scalar_tensor, torch.zeros, torch.ones, torch.full,
             torch.empty, torch.empty_strided, torch.arange, torch.linspace, torch.logspace, torch.eye, torch.rand,
             torch.randn, torch.randint, torch.randperm, torch.tril_indices, torch.triu_indices}
HOST_ONLY = ("from_numpy", "frombuffer")  # no device argument: the tensor is always in host memory
LEGACY = {"Tensor", "FloatTensor", "DoubleTensor", "HalfTensor", "BFloat16Tensor", "LongTensor", "IntTensor",
          "ShortTensor", "ByteTensor", "CharTensor", "BoolTensor"}
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PACKAGES = ("megatron_opd", "checkpoint_tools")
PROJECT = tuple(os.path.join(REPO, package) + os.sep for package in PACKAGES)


def _project_site(frame):
    while frame is not None and frame.f_code.co_filename == cpu_compat.__file__:  # forwards megatron's own calls
        frame = frame.f_back
    if frame is None or not frame.f_code.co_filename.startswith(PROJECT):
        return None
    return f"{os.path.relpath(frame.f_code.co_filename, REPO)}:{frame.f_lineno}"


def _placement(kwargs) -> tuple:
    """What a factory call was told: ("none",), ("host",) for HOST itself, ("literal", s), ("device", d)."""
    if kwargs.get("device") is None:
        return ("none",)
    device = kwargs["device"]
    if device is HOST:
        return ("host",)
    if isinstance(device, str):
        return ("literal", device)
    return ("device", torch.device(device))


class PlacementRecorder(TorchFunctionMode):
    """Counts (project call site, placement) of every watched factory call made while it is active."""

    def __init__(self):
        super().__init__()
        self.calls = collections.Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in FACTORIES:
            site = _project_site(sys._getframe(1))
            if site is not None:
                self.calls[site, _placement(kwargs)] += 1
        return func(*args, **kwargs)

    def host_only(self, name: str):
        original = getattr(torch, name)

        def recorded(*args, **kwargs):
            site = _project_site(sys._getframe(1))
            if site is not None:
                self.calls[site, ("host only", name)] += 1
            return original(*args, **kwargs)

        return recorded


def _watched(rank, world_size, jobs):
    """Runs each ("train" | "generate", config) under the recorder; (the run's device, the calls seen)."""
    from megatron_opd.generate import generate
    from megatron_opd.parallel import current_device
    from megatron_opd.trainer.loop import Trainer

    recorder = PlacementRecorder()
    for name in HOST_ONLY:  # this forked worker's torch only
        setattr(torch, name, recorder.host_only(name))
    with recorder:
        for kind, cfg in jobs:
            Trainer(cfg).train() if kind == "train" else generate(cfg)
    return current_device(), dict(recorder.calls)


def check(results) -> set:
    """The sites that placed tensors well; fails naming every call that did not."""
    wrong, sites = collections.Counter(), set()
    for run_device, calls in results:
        for (site, placement), count in calls.items():
            if placement == ("host",) or placement == ("device", run_device):
                sites.add(site)
            else:
                wrong[site, placement] += count
    assert not wrong, f"tensor factories in project code not on the run's device ({results[0][0]}) nor HOST: " \
                      f"{sorted(wrong.items(), key=str)}"
    return sites


def watch(world_size, *jobs) -> set:
    return check(run_distributed(_watched, world_size, list(jobs), timeout_s=600))


def saw(sites: set, *files) -> None:
    """The check watched these files make tensors (it cannot pass by watching nothing)."""
    for file in files:
        assert any(site.startswith(file) for site in sites), (file, sorted(sites))


def _runs(setup, save_dir, *extra):
    """Two steps with a checkpoint, then the same run resumed for a third; validation at steps 0 and 2."""
    base = (*distill_overrides(setup, save_dir), "trainer.test_freq=2", "trainer.save_freq=2", *extra)
    return [("train", to_config(composed(*base, "trainer.total_steps=3", "trainer.exit_interval=2"))),
            ("train", to_config(composed(*base, "trainer.total_steps=3")))]


def _steps(setup, save_dir, steps, *extra):
    return "train", to_config(composed(*distill_overrides(setup, save_dir, f"trainer.total_steps={steps}", *extra)))


def test_the_check_fails_a_missing_literal_or_wrong_device():
    """A copy of good calls with one bad call seeded: each kind of bad call fails the check, naming its site."""
    good = {("megatron_opd/a.py:1", ("device", torch.device("cpu"))): 3, ("megatron_opd/a.py:2", ("host",)): 1}
    assert check([(torch.device("cpu"), good)]) == {"megatron_opd/a.py:1", "megatron_opd/a.py:2"}
    for bad in (("none",), ("literal", "cpu"), ("device", torch.device("meta")), ("host only", "from_numpy")):
        seeded = {**good, ("megatron_opd/b.py:9", bad): 1}
        with pytest.raises(AssertionError, match="megatron_opd/b.py:9"):
            check([(torch.device("cpu"), seeded)])
    # another run's device: cuda:1 where the run is on cuda:0 (compared as devices, not as strings)
    with pytest.raises(AssertionError, match="a.py:1"):
        check([(torch.device("cuda", 0), {("megatron_opd/a.py:1", ("device", torch.device("cuda", 1))): 1})])


def test_no_legacy_tensor_constructor_in_project_code():
    """torch.Tensor(...), torch.LongTensor(...) and the like take no device and no mode sees them."""
    found = []
    for package in PACKAGES:
        for root, _, files in os.walk(os.path.join(REPO, package)):
            for name in (f for f in files if f.endswith(".py")):
                path = os.path.join(root, name)
                for node in ast.walk(ast.parse(open(path).read())):
                    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                            and node.func.attr in LEGACY and getattr(node.func.value, "id", None) == "torch":
                        found.append(f"{os.path.relpath(path, REPO)}:{node.lineno}")
    assert not found, found


def test_a_distillation_run_at_tp1(distill_setup, tmp_path):
    sites = watch(1, *_runs(distill_setup, tmp_path, "actor.kl_loss_type=topk_reverse", "actor.topk=4",
                            "actor.entropy_coeff=0.01"))
    saw(sites, "megatron_opd/models/batch.py", "megatron_opd/teacher/outputs.py", "megatron_opd/rollout/embedded_engine.py",
        "megatron_opd/parallel/dims.py", "megatron_opd/trainer/preemption.py", "megatron_opd/trainer/checkpoint.py",
        "checkpoint_tools/hf_files.py")


# PP=2 runs the policy-gradient form with a reward and two updates a step: pi_old's own pass crosses stages.
PG_AT_PP2 = ("parallel.pipeline=2", "actor.policy_loss=pg", "reward.fn=gsm8k", "actor.ppo_epochs=2")


@pytest.mark.parametrize("layout, files", [
    (("parallel.context=2",), ("megatron_opd/parallel/context_parallel.py",)),
    (PG_AT_PP2, ("megatron_opd/trainer/weight_push.py", "megatron_opd/trainer/rollouts.py",
                 "megatron_opd/loss/policy_gradient.py"))], ids=["cp2", "pp2_pg"])
def test_a_two_process_run(distill_setup, tmp_path, layout, files):
    saw(watch(2, *_runs(distill_setup, tmp_path, *layout)), *files)


def test_dp2_with_an_own_layout_teacher_token_budgets_and_a_mixture(distill_setup, tmp_path):
    """Also SFT with masked spans, on one process."""
    from tests.trainer.test_loop import skip_worked_steps

    skip_worked_steps(distill_setup, tmp_path / "skip.jsonl")
    spans = (f"data.train_files={tmp_path / 'skip.jsonl'}", "data.response_key=extra_info.answer",
             "data.response_skip_key=extra_info.skip")
    sites = watch(2, _steps(distill_setup, tmp_path / "mixed", 2, *spans, "actor.lmbda=0.5",
                            "teacher.parallel.tensor=2", "actor.max_tokens_per_micro_batch=256"))
    saw(sites, "megatron_opd/parallel/exchange.py", "megatron_opd/teacher/outputs.py", "megatron_opd/models/batch.py")
    saw(watch(1, _steps(distill_setup, tmp_path / "sft", 2, *spans, "trainer.mode=sft")), "megatron_opd/models/batch.py")


def test_opd_generate(distill_setup, tmp_path):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from megatron_opd.generate import CONFIG_DIR  # registers opd-generate's schema

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        cfg = OmegaConf.to_object(compose(config_name="generation", overrides=[
            f"model.path={distill_setup['teacher']}", f"data.val_files={distill_setup['test']}",
            "rollout.response_length=8", "do_sample=true", "rollout.n=2", f"output={tmp_path / 'out.jsonl'}"]))
    saw(watch(1, ("generate", cfg)), "megatron_opd/rollout/embedded_engine.py")


def test_the_served_teacher_and_the_sglang_engine(distill_setup, sglang_teacher, tmp_path):
    """The suite's server serves the teacher to one run, then the student's weights (pushed by the run) to
    another that generates with it."""
    from tests.sglang_servers import SGLANG_STUB, rollout_at

    url = sglang_teacher.server.url
    served = _steps(distill_setup, tmp_path / "served", 2, "teacher.engine=sglang", f"teacher.url={url}",
                    "actor.kl_temperature=1.0", f"teacher.sglang.pythonpath=[{SGLANG_STUB}]")
    engine = _steps(distill_setup, tmp_path / "engine", 2, *rollout_at(sglang_teacher))
    saw(watch(1, served, engine), "megatron_opd/teacher/served.py")
