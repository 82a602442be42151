"""The YAML and the schema agree; bad configs fail before any model is built, naming the key."""
import os
import subprocess
import sys
import time

import pytest
from omegaconf import OmegaConf

from megatron_opd.config import ConfigError, OPDConfig, to_config
from megatron_opd.trainer.setup import check_layout_and_vocab
from tests.conftest import distill_overrides
from tests.runs import composed


def test_yaml_adds_no_defaults_of_its_own():
    from_yaml = OmegaConf.to_container(composed(), resolve=False)
    from_schema = OmegaConf.to_container(OmegaConf.structured(OPDConfig), resolve=False)
    from_yaml.pop("hydra", None)
    assert from_yaml == from_schema


def test_seed_defaults():
    schema = OmegaConf.structured(OPDConfig)
    assert (schema.actor.kl_loss_coef, schema.actor.kl_loss_type, schema.actor.entropy_coeff, schema.actor.optim.lr,
            schema.actor.ppo_epochs, schema.rollout.temperature) == (1.0, "low_var_kl", 0.0, 1e-5, 1, 0.6)


def test_valid_overrides_build_a_config(distill_setup, tmp_path):
    cfg = to_config(composed(*distill_overrides(distill_setup, tmp_path)))
    assert cfg.data.train_files == [distill_setup["train"]] and cfg.rollout.n == 2


def test_environment_settings_that_cannot_run_are_refused(distill_setup, tmp_path):
    env = "rollout.env=walk"
    for extra, message in {("trainer.mode=sft", "data.response_key=extra_info.answer"):
                           r"rollout.env='walk': rolls out conversations for trainer.mode=distill",
                           ("actor.policy_loss=pg", "reward.fn=gsm8k"):
                           r"reward.fn='gsm8k': must be none or env with rollout.env=walk"}.items():
        with pytest.raises(ConfigError, match=message):
            to_config(composed(*distill_overrides(distill_setup, tmp_path, env, *extra)))


@pytest.mark.parametrize("override, message", [
    ("actor.kl_loss_type=foo", r"actor.kl_loss_type='foo': must be one of kl\|abs\|mse\|low_var_kl"),
    ("actor.ppo_mini_batch_size=3", r"actor.ppo_mini_batch_size=3: must divide data.train_batch_size=4"),
    ("rollout.temperature=0", r"rollout.temperature=0.0: must be > 0"),
    ("rollout.env=chess", r"rollout.env='chess': must be walk \| tools \(built in\) or module:Class"),
    ("rollout.env=os:getcwd", r"rollout.env='os:getcwd': <built-in function getcwd> is not an Environment subclass"),
    ("rollout.max_turns=0", r"rollout.max_turns=0: must be >= 1"),
    ("rollout.max_turn_tokens=0", r"rollout.max_turn_tokens=0: must be null or >= 1"),
    ("reward.fn=env", r"reward.fn='env': is the environment's reward: set rollout.env"),
    ("data.truncation=middle", r"data.truncation='middle': must be one of error\|left\|right"),
    ("parallel.tensor=0", r"parallel.tensor=0: must be an integer >= 1"),
    ("trainer.mode=sft", r"data.response_key=None: is required with trainer.mode=sft"),
    ("actor.lmbda=0.5", r"data.response_key=None: is required with actor.lmbda=0.5 < 1"),
    ("actor.lmbda=1.5", r"actor.lmbda=1.5: must be in \[0, 1\]"),
    ("reward.fn=gsm8k", r"reward.fn='gsm8k': needs actor.policy_loss=pg"),
    ("actor.policy_loss=pg reward.fn=gsm8k rollout.n=1", r"rollout.n=1: must be >= 2 with reward.fn=gsm8k"),
    ("actor.policy_loss=pg actor.kl_loss_type=topk_reverse actor.topk=4",
     r"actor.kl_loss_type='topk_reverse': actor.policy_loss=pg needs the teacher's log-prob of each sampled token"),
    ("actor.policy_loss=pg actor.kl_temperature=1.0", r"actor.kl_temperature=1.0: must be null or rollout.temperature"),
    ("actor.policy_loss=pg parallel.context=2 actor.kl_discount=1", r"actor.kl_discount=1.0: must be 0 with parallel"),
    ("actor.policy_loss=pg actor.lmbda=0.5 data.response_key=extra_info.answer",
     r"actor.lmbda=0.5: must be 1 with actor.policy_loss=pg"),
    ("actor.is_cap=1.0", r"actor.is_cap=1.0: must be null \(measure the mismatch only\) or > 1"),
    ("actor.is_cap=2.0 actor.kl_loss_type=reverse", r"actor.is_cap=2.0: weights sampled tokens; with actor.policy_loss"
                                                    r"=direct it corrects the sampled kinds"),
    ("rollout.max_staleness=-1", r"rollout.max_staleness=-1: must be >= 0"),
    ("rollout.max_staleness=1 trainer.mode=sft data.response_key=extra_info.answer",
     r"rollout.max_staleness=1: draws the student's samples ahead; trainer.mode=sft"),
    ("rollout.url=http://127.0.0.1:1", r"rollout.url='http://127.0.0.1:1': names an SGLang server: set rollout.engine"),
    ("rollout.engine=sglang rollout.url=127.0.0.1:1", r"rollout.url='127.0.0.1:1': must be the server's http\(s\)://"),
    ("actor.policy_loss=pg reward.fn=nowhere:score", r"reward.fn='nowhere:score': cannot import score from nowhere"),
    ("actor.policy_loss=pg reward.fn=bogus", r"reward.fn='bogus': must be none, gsm8k or data_source, or module:function"),
    ("actor.kl_loss_type=k3-", r"actor.kl_loss_type='k3-': must be one of kl\|abs\|mse\|low_var_kl\|k1\|k2\|k3\|kl\+"),
    ("+teachers.a.path=x", r"teacher.path='.*': and teachers \(a\) are both set"),
    ("teacher.path=null +teachers.a.path=x +teachers.a.data_sources=[s] +teachers.b.path=y +teachers.b.data_sources=[s]",
     r"teachers.b.data_sources=\['s'\]: 's' is teachers.a's already: a row has one teacher"),
    ("teacher.path=null +teachers.a.path=x +teachers.a.default=true +teachers.b.path=y +teachers.b.default=true",
     r"a and b are both default"),
    ("teacher.path=null +teachers.a.path=x +teachers.a.data_sources=[s] +teachers.b.path=y",
     r"teachers.b.data_sources=\[\]: names no data source and the teacher is not the default"),
    ("teacher.path=null +teachers.a.path=x +teachers.a.bogus=1", r"teachers.a: Key 'bogus' not in 'TeacherConfig'"),
    ("teacher.path=null +teachers.a.path=x +teachers.a.engine=sglang actor.kl_loss_type=reverse",
     r"served teacher \(teachers.a.engine=sglang\) does not send"),
    ("teacher.path=null trainer.mode=distill", r"teacher.path=None: is required with trainer.mode=distill"),
    ("actor.kl_loss_type=reverse actor.log_prob_min_clamp=-10", r"actor.log_prob_min_clamp=-10.0: floors the log-probs"),
    ("actor.loss_max_clamp=0", r"actor.loss_max_clamp=0.0: must be null \(no clamp\) or > 0"),
    ("trainer.total_epochs=0", r"trainer.total_epochs=0: must be null or >= 1"),
    ("trainer.doctor=maybe", r"trainer.doctor='maybe': must be one of off\|warn\|strict"),
])
def test_bad_values_name_the_key(distill_setup, tmp_path, override, message):
    with pytest.raises(ValueError, match=message):
        to_config(composed(*distill_overrides(distill_setup, tmp_path), *override.split()))


def test_impossible_layout_and_mismatched_vocab_fail_before_models(distill_setup, tiny_tokenizer, tmp_path):
    from megatron_opd.demo.tiny import train_tokenizer, write_tiny_checkpoint

    cfg = to_config(composed(*distill_overrides(distill_setup, tmp_path), "parallel.tensor=2"))
    with pytest.raises(ConfigError, match=r"student.path=.*world size 1 is not divisible"):
        check_layout_and_vocab(cfg, world_size=1)
    cfg = to_config(composed(*distill_overrides(distill_setup, tmp_path), "parallel.tensor=4"))
    with pytest.raises(ConfigError, match=r"num_key_value_heads=2 is not divisible by parallel.tensor=4"):
        check_layout_and_vocab(cfg, world_size=4)
    other = write_tiny_checkpoint(str(tmp_path / "other_vocab"), "qwen2",
                                  tokenizer=train_tokenizer(["zebras quietly graze beyond violet mountains"]))
    cfg = to_config(composed(*distill_overrides(distill_setup, tmp_path), f"teacher.path={other}"))
    with pytest.raises(ConfigError, match=r"do not share a tokenizer"):
        check_layout_and_vocab(cfg, world_size=1)


def test_cli_rejects_unknown_key_and_bad_type_quickly(distill_setup, tmp_path):
    base = [sys.executable, "-m", "megatron_opd.train", *distill_overrides(distill_setup, tmp_path)]
    for bad, message in (("trainer.bogus=1", "Key 'bogus' not in 'TrainerConfig'"),
                         ("actor.micro_batch_size=two", "could not be converted to Integer")):
        started = time.monotonic()
        done = subprocess.run(base + [bad], capture_output=True, text=True, timeout=120)
        assert done.returncode != 0 and message in done.stderr, done.stderr[-2000:]
        assert time.monotonic() - started < 60
    assert not os.path.exists(tmp_path / "metrics.jsonl")
