"""The comparison's settings, fixed before any run: the tasks, the model sizes, the budget every arm shares,
the lr grid, and the two presets (the demo: one seed, one lr; --full: the whole comparison)."""
from dataclasses import dataclass
from typing import Optional

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
RECOVERY_REQUIRED = 0.95  # the walk teacher's recoveries after a forced wrong move, checked before any arm runs
ARMS = ("on-policy", "SeqKD", "supervised KD")
# (first, second) arm pairs given a verdict, per task
PAIRS = (("on-policy", "SeqKD"), ("on-policy", "supervised KD"), ("supervised KD", "SeqKD"))


@dataclass(frozen=True)
class Conversations:
    """A task played in turns with an environment (rollout.env), in every arm and evaluation alike."""
    env: str  # rollout.env
    max_turns: int  # rollout.max_turns
    max_turn_tokens: int  # rollout.max_turn_tokens


@dataclass(frozen=True)
class Task:
    name: str
    # the longest answer fits, with its end-of-sequence token (in turns: the longest conversation after its prompt)
    response_tokens: int
    teacher_steps: int  # SFT of the teacher (lr 3e-3, batch 32)
    student_steps: int  # the cold start: brief SFT on ground-truth answers, so the student starts weak
    walk: bool = False  # the walk's measures too: shortest, recoveries, by distance, slips
    # a walk's success after each forced slip (evaluate*.py): each a premise of its teacher, checked before any arm
    recoveries: tuple = ("recovery",)
    conversations: Optional[Conversations] = None
    # actor.max_tokens_per_micro_batch of every run: sequences of very different lengths in micro-batches of
    # similar ones (the same loss; on the conversations half the time of one padded micro-batch)
    micro_batch_tokens: Optional[int] = None
    test_prompts: Optional[int] = None  # held-out prompts scored; None: TEST_PROMPTS


TASKS = {
    # Two-step sums of operands up to 10: a test question never appears in training, but its single steps
    # do, so a model that learned to chain them can solve it (and a slip in the first step derails the second).
    "arithmetic": Task("arithmetic", response_tokens=32, teacher_steps=800, student_steps=300),  # 0.19 at seed 0
    # Walk to a goal 6..14 moves away with 4 moves of slack: a slip can be recovered from.
    # 18 moves of 3 tokens, and the end; a student after 100 SFT steps scores 0.07, after 300 0.67 (seed 0).
    "walk": Task("walk", response_tokens=64, teacher_steps=900, student_steps=200, walk=True),
    # The walk in turns (walk_env.py, walk_turns.py): one plain move a turn, the environment answers with the
    # position and the way left. Up to 18 turns (14 + SLACK) of up to 4 tokens (a move with its note, the
    # stop token) and 17 answers of 20 tokens (Qwen2's pre-tokenizer: one token per digit) between them.
    # After 100 steps the teacher recovers from every forced wrong move and every forced overshoot; a student
    # after 30 SFT steps scores 0.14 (seed 0). Its evaluations re-fill each conversation every turn: 100 test
    # prompts, not 400, for time (this task alone: 6 min of the demo).
    "walk_env": Task("walk_env", response_tokens=416, teacher_steps=100, student_steps=30, walk=True,
                     conversations=Conversations("walk", max_turns=18, max_turn_tokens=4), micro_batch_tokens=2048,
                     test_prompts=100, recoveries=("recovery", "overshoot_recovery")),
}


@dataclass(frozen=True)
class Preset:
    seeds: int
    lr_grid: tuple  # every arm's lr is chosen from this grid on the validation split (seed 0's runs)
    steps: int  # optimizer steps of every arm: the budget is steps x BATCH x SAMPLES sequences (conversations)
    task_steps: tuple = ()  # (task, steps) where a task's arms take other steps than `steps`, all arms alike
    task_test_prompts: tuple = ()  # (task, n) where only the first n of a task's test prompts are scored

    def steps_of(self, task: str) -> int:
        return dict(self.task_steps).get(task, self.steps)

    def test_prompts_of(self, task: str) -> Optional[int]:
        return dict(self.task_test_prompts).get(task)


# walk_env's steps cost 2-4 times the walk's; from its cold start (0.14, seed 0) SeqKD and supervised KD reach
# 0.80 in 20 steps, and 0.94 in 40 in four seeds of five. The demo's 15 steps and 50 test prompts keep its three
# tasks within 15 minutes (20 and 100 measured 15 min 25 s).
PRESETS = {"demo": Preset(seeds=1, lr_grid=(1e-3,), steps=150, task_steps=(("walk_env", 15),),
                          task_test_prompts=(("walk_env", 50),)),
           "full": Preset(seeds=5, lr_grid=(1e-3, 3e-3), steps=200, task_steps=(("walk_env", 40),))}
