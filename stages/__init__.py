"""What runs inside a stage's process or container: one module per stage plus a small shared library."""

STAGE_NAMES = ("prepare", "sft", "reward", "rl", "evaluate")
