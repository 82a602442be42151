"""HF <-> Megatron checkpoint converters, their CLI (`python -m checkpoint_tools`, `opd-convert`), and the
name mapping that also feeds the rollout weight sync."""
