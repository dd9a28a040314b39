"""rl: optimise the SFT policy, with `rl.algorithm` one of
`ppo` and `rejection_sampling` (written here, against the reward model), `grpo` and `rloo` (TRL trainers,
rewarded by the reward model), or `dpo` (TRL's DPOTrainer, from the preference pairs directly)."""

from __future__ import annotations

import importlib
from typing import Any

from stages.runner import StageContext

MODULES = {
    "ppo": "stages.ppo",
    "rejection_sampling": "stages.rejection_sampling",
    "dpo": "stages.dpo",
    "grpo": "stages.group_rl",
    "rloo": "stages.group_rl",
}


def run(ctx: StageContext) -> dict[str, Any]:
    # Imported by name so that each algorithm pays only for the libraries it uses.
    algorithm = importlib.import_module(MODULES[ctx.config.rl.algorithm])
    return {"algorithm": ctx.config.rl.algorithm} | algorithm.run(ctx)
