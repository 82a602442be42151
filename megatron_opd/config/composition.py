"""Where the run's YAML lives and how a command composes it: Hydra over the OPDConfig schema, registered
once here for opd-train, opd-doctor and the tests alike."""
import os

from hydra.core.config_store import ConfigStore

from megatron_opd.config import OPDConfig, to_config

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "configs")
ConfigStore.instance().store(name="opd_schema", node=OPDConfig)


def compose_run_config(config_name: str, overrides: list) -> OPDConfig:
    """The validated config opd-train would run with (raises ConfigError and friends, naming the key)."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        return to_config(compose(config_name=config_name, overrides=overrides))
