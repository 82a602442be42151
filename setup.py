"""megatron-opd: on-policy distillation on megatron-core. Install: `bash scripts/setup.sh` (pinned venv)."""
from setuptools import find_packages, setup

setup(
    name="megatron-opd",
    version="0.1.0",
    description="On-policy distillation of LLMs on NVIDIA Megatron-Core",
    python_requires=">=3.12",
    packages=find_packages(include=["megatron_opd*", "checkpoint_tools*"]),
    install_requires=[
        "megatron-core>=0.19,<0.20",
        "torch>=2.11",
        "transformers>=5.0",
        "tokenizers",
        "safetensors",
        "hydra-core>=1.3",
        "omegaconf",
        "datasets",
        "pyarrow",
        "numpy",
        "psutil",  # megatron's dist_checkpointing hangs on save without it
        "tqdm",
    ],
    entry_points={"console_scripts": [
        "opd-convert=checkpoint_tools.cli:main",
        "opd-train=megatron_opd.train:cli",
        "opd-generate=megatron_opd.generate:cli",
        "opd-doctor=megatron_opd.doctor.cli:console",
    ],
        # data_source -> its scorer (megatron_opd/data/scorers.py)
        "megatron_opd.scorers": ["synthetic_walk=megatron_opd.demo.walk:score"]},
    extras_require={
        # SGLang's CUDA kernel package does not install on CPU; scripts/setup.sh installs the CPU subset.
        "sglang": ["sglang==0.5.23"],
        "gpu": ["transformer-engine[pytorch]"],
        "logging": ["tensorboard", "wandb"],
        "dev": ["pytest", "pytest-timeout"],
    },
)
