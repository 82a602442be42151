"""The main job's settings: the task, the model sizes, and the budget and sampling every arm shares."""

LANES = 2  # stages run at once; each subprocess gets cores // LANES threads
TEACHER = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4)
STUDENT = dict(hidden_size=96, intermediate_size=256, num_hidden_layers=3)
# Two-step sums of operands up to 10: a test question never appears in training, but its single steps do,
# so a model that learned to chain them can solve it (and a slip in the first step derails the second).
DIFFICULTY, LARGEST = 2, 10
TEST_PROBLEMS = 256
BATCH = 16  # prompts per step
SAMPLES = 2  # on-policy samples per prompt
RESPONSE_TOKENS = 32
TEMPERATURE = 0.7  # sampling temperature of the on-policy rollouts and of the teacher's samples alike
KL = "forward"
# On-policy and off-policy students train with the same optimizer settings.
DISTILL_OPTIM = ["actor.optim.lr=1e-3", "actor.optim.lr_decay=cosine", "actor.optim.min_lr=1e-4",
                 "actor.optim.warmup_steps=30"]
SFT_COMMON = ["trainer.mode=sft", "data.response_key=extra_info.answer", "actor.optim.lr_decay=cosine",
              "actor.optim.warmup_steps=20", "actor.optim.min_lr=1e-4"]
