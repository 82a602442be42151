"""The comparison's settings, fixed before any run: the tasks, the model sizes, the budget every arm shares,
the lr grid, and the two presets (the demo: one seed, one lr; --full: the whole comparison)."""
from dataclasses import dataclass

LANES = 2  # jobs run at once; each subprocess gets cores // LANES threads
TEACHER = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4)
STUDENT = dict(hidden_size=96, intermediate_size=256, num_hidden_layers=3)
BATCH = 16  # prompts per step
SAMPLES = 2  # samples per prompt: each step trains on BATCH x SAMPLES sequences, in every arm
TEMPERATURE = 0.7  # of the on-policy rollouts and of the teacher's samples alike
KL = "forward"  # the divergence of on-policy and supervised KD (full vocabulary), between the untempered
KL_TEMPERATURE = 1.0  # distributions whatever temperature the samples were drawn at
TRAIN_PROMPTS, VAL_PROMPTS, TEST_PROMPTS = 20000, 200, 400
SFT_SCHEDULE = ["actor.optim.lr_decay=cosine", "actor.optim.warmup_steps=20", "actor.optim.min_lr=1e-4"]
RECOVERY_REQUIRED = 0.95  # the walk teacher's recovery after a forced wrong move, checked before any arm runs
ARMS = ("on-policy", "SeqKD", "supervised KD")
# (first, second) arm pairs given a verdict, per task
PAIRS = (("on-policy", "SeqKD"), ("on-policy", "supervised KD"), ("supervised KD", "SeqKD"))


@dataclass(frozen=True)
class Task:
    name: str
    response_tokens: int  # the longest answer fits, with its end-of-sequence token
    teacher_steps: int  # SFT of the teacher (lr 3e-3, batch 32)
    student_steps: int  # the cold start: brief SFT on ground-truth answers, so the student starts weak


TASKS = {
    # Two-step sums of operands up to 10: a test question never appears in training, but its single steps
    # do, so a model that learned to chain them can solve it (and a slip in the first step derails the second).
    "arithmetic": Task("arithmetic", response_tokens=32, teacher_steps=800, student_steps=300),  # 0.19 at seed 0
    # Walk to a goal 6..14 moves away with 4 moves of slack: a slip can be recovered from.
    # 18 moves of 3 tokens, and the end; a student after 100 SFT steps scores 0.07, after 300 0.67 (seed 0).
    "walk": Task("walk", response_tokens=64, teacher_steps=900, student_steps=200),
}


@dataclass(frozen=True)
class Preset:
    seeds: int
    lr_grid: tuple  # every arm's lr is chosen from this grid on the validation split (seed 0's runs)
    steps: int  # optimizer steps of every arm


PRESETS = {"demo": Preset(seeds=1, lr_grid=(1e-3,), steps=150),
           "full": Preset(seeds=5, lr_grid=(1e-3, 3e-3), steps=200)}
