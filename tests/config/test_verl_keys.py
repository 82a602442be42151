"""verl's keys (megatron_opd/config/verl_keys.py): a verl command composes to exactly the config of the same
command in this project's keys; each key this project cannot honour is refused by name; docs/verl_keys.md is
the table. The seed doc's command through the CLI: tests/test_seed_example.py."""
import pathlib
import sys

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import megatron_opd.generate  # noqa: F401  (registers generate_schema for compose)
from megatron_opd.config import to_config
from megatron_opd.config.verl_keys import GENERATE_ALIASES, TRAIN_ALIASES, VerlKeyError, markdown, translate
from megatron_opd.train import CONFIG_DIR
from tests.runs import forked

ROOT = pathlib.Path(__file__).resolve().parents[2]


def seed_overrides(data, student, teacher, run, verl: bool) -> list[str]:
    """The seed doc's GSM8K command at the tiny run's size (README, "verl's keys"), in verl's keys or ours."""
    common = [f"data.train_files={data}/train.parquet", f"data.val_files={data}/test.parquet",
              "data.train_batch_size=2", "data.max_prompt_length=1024", "trainer.logger=[jsonl]"]
    if verl:
        return common + [
            "data.max_response_length=8", f"actor_rollout_ref.model.path={student}",
            f"actor_rollout_ref.ref.model.path={teacher}", "actor_rollout_ref.actor.optim.lr=1e-6",
            "actor_rollout_ref.actor.ppo_mini_batch_size=2", "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2",
            "actor_rollout_ref.actor.kl_loss_coef=1.0", "actor_rollout_ref.actor.kl_loss_type=low_var_kl",
            "actor_rollout_ref.rollout.n=2", "actor_rollout_ref.rollout.name=hf",
            "actor_rollout_ref.rollout.temperature=0.6", "trainer.total_training_steps=2",
            "trainer.n_gpus_per_node=1", "trainer.nnodes=1", f"trainer.default_local_dir={run}"]
    return common + [
        "rollout.response_length=8", f"student.path={student}", f"teacher.path={teacher}", "actor.optim.lr=1e-6",
        "actor.ppo_mini_batch_size=2", "actor.micro_batch_size=2", "actor.kl_loss_coef=1.0",
        "actor.kl_loss_type=low_var_kl", "rollout.n=2", "rollout.engine=local", "rollout.temperature=0.6",
        "trainer.total_steps=2", f"trainer.save_dir={run}"]


def config(config_name, overrides, build=to_config):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        return build(compose(config_name=config_name, overrides=list(overrides)))


def translated(config_name, verl_args, table=TRAIN_ALIASES, build=to_config):
    """The config a verl command line composes to, its --config-name passed through the translation."""
    args, _ = translate([f"--config-name={config_name}", *verl_args], table)
    assert args[0] == f"--config-name={config_name}"
    return config(config_name, args[1:], build)


SEED = ("/data", "/ckpt/student", "/ckpt/teacher", "/runs/seed")


@pytest.mark.parametrize("config_name", ["distillation_trainer", "distillation_megatron_trainer"])
def test_the_seed_command_in_verl_keys_is_the_same_config(config_name):
    ours = config("distillation_trainer", seed_overrides(*SEED, verl=False))
    assert translated(config_name, seed_overrides(*SEED, verl=True)) == ours
    assert (ours.rollout.response_length, ours.rollout.engine, ours.actor.micro_batch_size, ours.trainer.total_steps,
            ours.trainer.save_dir) == (8, "local", 2, 2, "/runs/seed")


def test_world_size_keys_are_accepted_with_a_notice():
    _, notices = translate(seed_overrides(*SEED, verl=True), TRAIN_ALIASES)
    assert [n.split(":")[0] for n in notices] == ["trainer.n_gpus_per_node=1", "trainer.nnodes=1"]
    assert all("the launcher decides the world size" in n for n in notices)


BASE = ["data.train_files=/d/train.parquet", "student.path=/s"]
LOSS = "distillation.distillation_loss"


def test_one_verl_teacher_without_a_key_is_the_one_teacher():
    verl = [*BASE, "distillation.enabled=True", "distillation.teacher_models.teacher_model.model_path=/t",
            "distillation.teacher_models.teacher_model.inference.name=sglang",
            "distillation.teacher_models.teacher_model.inference.tensor_model_parallel_size=2",
            f"{LOSS}.loss_mode=forward_kl_topk", f"{LOSS}.topk=8", f"{LOSS}.use_policy_gradient=False",
            f"{LOSS}.use_task_rewards=False", f"{LOSS}.distillation_loss_coef=0.5", f"{LOSS}.loss_max_clamp=10.0",
            f"{LOSS}.log_prob_min_clamp=-10.0", "actor_rollout_ref.actor.megatron.tensor_model_parallel_size=2",
            "actor_rollout_ref.model.enable_gradient_checkpointing=True", "actor.kl_temperature=1.0"]
    ours = [*BASE, "teacher.path=/t", "teacher.engine=sglang", "teacher.sglang.tensor_parallel=2",
            "actor.kl_loss_type=topk_forward", "actor.topk=8", "actor.policy_loss=direct", "reward.fn=none",
            "actor.kl_loss_coef=0.5", "actor.loss_max_clamp=10.0", "actor.log_prob_min_clamp=-10.0",
            "parallel.tensor=2", "actor.recompute=full", "actor.kl_temperature=1.0"]
    cfg = translated("distillation_megatron_trainer", verl)
    assert cfg == config("distillation_trainer", ours)
    assert (cfg.teacher.path, cfg.teachers, cfg.teacher.sglang.tensor_parallel, cfg.actor.topk) == ("/t", {}, 2, 8)


def test_several_verl_teachers_with_keys_are_the_teachers_map():
    teacher = "distillation.teacher_models"
    verl = [*BASE, "distillation.teacher_key=data_source", f"{teacher}.math.model_path=/m", f"{teacher}.math.key=gsm8k",
            f"{teacher}.code.model_path=/c", f"{teacher}.code.key=[mbpp,humaneval]",
            "teachers.code.default=true"]  # one of ours under `teachers`, written without Hydra's `+`
    ours = [*BASE, "+teachers.math.path=/m", "+teachers.math.data_sources=[gsm8k]", "+teachers.code.path=/c",
            "+teachers.code.data_sources=[mbpp,humaneval]", "+teachers.code.default=true"]
    cfg = translated("distillation_trainer", verl)
    assert cfg == config("distillation_trainer", ours)
    assert {name: (t.path, t.data_sources, t.default) for name, t in cfg.teachers.items()} == {
        "math": ("/m", ["gsm8k"], False), "code": ("/c", ["mbpp", "humaneval"], True)}


def test_verl_moe_keys_are_the_expert_layout_and_the_aux_loss():
    megatron, override = "actor_rollout_ref.actor.megatron", "actor_rollout_ref.actor.megatron.override_transformer_config"
    verl = [*BASE, "teacher.path=/t", f"{megatron}.expert_model_parallel_size=2",
            f"{megatron}.expert_tensor_parallel_size=1", "actor_rollout_ref.ref.megatron.expert_model_parallel_size=2",
            f"+{override}.moe_aux_loss_coeff=0.01", f"+{override}.moe_token_dispatcher_type=alltoall"]
    ours = [*BASE, "teacher.path=/t", "parallel.expert=2", "parallel.expert_tensor=1", "teacher.parallel.expert=2",
            "actor.moe_aux_loss_coef=0.01", "parallel.token_dispatcher=alltoall"]
    cfg = translated("distillation_megatron_trainer", verl)
    assert cfg == config("distillation_trainer", ours)
    assert (cfg.parallel.expert, cfg.teacher.parallel.expert, cfg.actor.moe_aux_loss_coef) == (2, 2, 0.01)


def test_verl_multi_turn_keys_are_the_turn_limit():
    assert translate(["actor_rollout_ref.rollout.multi_turn.max_assistant_turns=5",
                      "actor_rollout_ref.rollout.multi_turn.enable=false"], TRAIN_ALIASES) == (
        ["rollout.max_turns=5"], ["actor_rollout_ref.rollout.multi_turn.enable=false: accepted, sets nothing: a "
                                  "multi-turn run names its environment: rollout.env=tools (Qwen/Hermes tool calls) "
                                  "| walk | module:Class"])


def test_resume_and_run_names():
    assert translate(["trainer.resume_mode=resume_path", "trainer.resume_from_path=/r/step_000002"],
                     TRAIN_ALIASES)[0] == ["trainer.resume=/r/step_000002"]
    assert translate(["trainer.resume_mode=disable"], TRAIN_ALIASES)[0] == ["trainer.resume=never"]
    assert translate(["trainer.experiment_name=e1", "trainer.project_name=p"], TRAIN_ALIASES)[0] == [
        "trainer.save_dir=checkpoints/p/e1"]


def test_main_generation_keys_are_the_same_generate_config():
    build = OmegaConf.to_object
    verl = ["actor_rollout_ref.model.path=/m", "data.path=/d/test.parquet", "data.output_path=/o/gen.parquet",
            "data.n_samples=4", "data.batch_size=128", "rollout.temperature=0.7", "rollout.top_p=0.9",
            "rollout.top_k=50", "rollout.response_length=64", "rollout.prompt_length=256", "rollout.do_sample=True",
            "rollout.name=sglang", "rollout.tensor_model_parallel_size=2", "rollout.gpu_memory_utilization=0.5",
            "trainer.n_gpus_per_node=1", "trainer.nnodes=1", "trainer.device=cpu"]
    ours = ["model.path=/m", "data.val_files=/d/test.parquet", "output=/o/gen.parquet", "rollout.n=4",
            "rollout.temperature=0.7", "rollout.top_p=0.9", "rollout.top_k=50", "rollout.response_length=64",
            "data.max_prompt_length=256", "do_sample=true", "rollout.engine=sglang",
            "rollout.sglang.tensor_parallel=2", "rollout.sglang.mem_fraction_static=0.5", "device=cpu"]
    cfg = translated("generation", verl, GENERATE_ALIASES, build)
    assert cfg == config("generation", ours, build)
    assert (cfg.rollout.n, cfg.data.max_prompt_length, cfg.output, cfg.do_sample) == (4, 256, "/o/gen.parquet", True)


REFUSALS = [
    (["actor_rollout_ref.rollout.name=vllm"], TRAIN_ALIASES,
     "actor_rollout_ref.rollout.name=vllm: this project drives SGLang or its embedded engine: use sglang"),
    (["distillation.teacher_models.t.inference.name=vllm"], TRAIN_ALIASES,
     "distillation.teacher_models.t.inference.name=vllm: this project drives SGLang"),
    (["rollout.name=vllm"], GENERATE_ALIASES, "rollout.name=vllm: this project drives SGLang"),
    (["algorithm.adv_estimator=grpo"], TRAIN_ALIASES,
     "algorithm.adv_estimator: a verl key this project does not have; advantages here: actor.policy_loss=pg"),
    (["+actor_rollout_ref.actor.fsdp_config.param_offload=True"], TRAIN_ALIASES,
     "actor_rollout_ref.actor.fsdp_config.param_offload: a verl key this project does not have; Megatron here"),
    (["actor_rollout_ref.rollout.mode=async"], TRAIN_ALIASES,
     "actor_rollout_ref.rollout.mode: a verl key this project does not have"),
    (["trainer.critic_warmup=0", "critic.optim.lr=1e-5"], TRAIN_ALIASES,
     "critic.optim.lr: a verl key this project does not have; no critic"),
    (["ray_kwargs.ray_init.num_cpus=4"], GENERATE_ALIASES, "ray_kwargs.ray_init.num_cpus: a verl key"),
    (["data.max_response_length=8", "actor_rollout_ref.rollout.response_length=16"], TRAIN_ALIASES,
     "data.max_response_length and actor_rollout_ref.rollout.response_length both set rollout.response_length"),
    (["student.path=/a", "actor_rollout_ref.model.path=/b"], TRAIN_ALIASES,
     "student.path and actor_rollout_ref.model.path both set student.path: give one of them"),
    (["model.path=/a", "actor_rollout_ref.model.path=/b"], GENERATE_ALIASES,
     "model.path and actor_rollout_ref.model.path both set model.path"),
    (["distillation.teacher_models.math.model_path=/m", "teacher.path=/t"], TRAIN_ALIASES,
     "distillation.teacher_models.math.model_path and teacher.path both set teacher.path"),
    (["trainer.resume_mode=auto", "trainer.resume_from_path=/r"], TRAIN_ALIASES,
     "trainer.resume_mode and trainer.resume_from_path both set trainer.resume"),
    (["trainer.resume_mode=resume_path"], TRAIN_ALIASES,
     "trainer.resume_mode=resume_path: needs trainer.resume_from_path=PATH"),
    (["trainer.project_name=p", "trainer.experiment_name=e", "trainer.default_local_dir=/r"], TRAIN_ALIASES,
     "trainer.project_name/trainer.experiment_name and trainer.default_local_dir both set trainer.save_dir"),
    (["trainer.experiment_name=e"], TRAIN_ALIASES, "trainer.experiment_name: needs trainer.project_name too"),
    (["distillation.enabled=false"], TRAIN_ALIASES, "distillation.enabled=false: must be true"),
    (["distillation.teacher_key=ability"], TRAIN_ALIASES, "distillation.teacher_key=ability: must be data_source"),
    (["algorithm.use_kl_in_reward=True"], TRAIN_ALIASES, "algorithm.use_kl_in_reward=True: must be false"),
    (["~actor_rollout_ref.model.path"], TRAIN_ALIASES, "actor_rollout_ref.model.path: a verl key is translated"),
    (["+actor_rollout_ref.actor.megatron.override_transformer_config.moe_token_dispatcher_type=flex"], TRAIN_ALIASES,
     "actor_rollout_ref.actor.megatron.override_transformer_config.moe_token_dispatcher_type=flex: flex needs DeepEP"),
    (["actor_rollout_ref.rollout.multi_turn.enable=true"], TRAIN_ALIASES,
     "actor_rollout_ref.rollout.multi_turn.enable=true: must be false (a multi-turn run names its environment: "
     "rollout.env=tools"),
    (["actor_rollout_ref.rollout.multi_turn.tool_config_path=tools.yaml"], TRAIN_ALIASES,
     "actor_rollout_ref.rollout.multi_turn.tool_config_path: a verl key this project does not have; an "
     "environment (rollout.env) holds the tools"),
]


@pytest.mark.parametrize("args, table, message", REFUSALS, ids=[args[-1].split("=")[0] for args, _, _ in REFUSALS])
def test_refusals_name_the_key(args, table, message):
    with pytest.raises(VerlKeyError) as err:
        translate(args, table)
    assert str(err.value).startswith(message), str(err.value)


def _cli(argv):
    from megatron_opd.train import cli

    sys.argv = ["opd-train", *argv]
    cli()


def test_the_cli_refuses_with_one_line_and_exit_code_2(tmp_path):
    code, out, err = forked(tmp_path, _cli, ["student.path=/s", "actor_rollout_ref.rollout.name=vllm"], timeout_s=60)
    assert (code, err) == (2, "error: actor_rollout_ref.rollout.name=vllm: this project drives SGLang or its "
                              "embedded engine: use sglang\n")


def test_the_doc_is_the_table():
    assert (ROOT / "docs" / "verl_keys.md").read_text() == markdown()
