"""rl: optimise the SFT policy with `rl.algorithm`, one of the registry's algorithms (stages/core/registry.py):
`ppo` and `rejection_sampling` (written here, against the reward model), `grpo` and `rloo` (TRL trainers,
rewarded by the reward model), or `dpo` (TRL's DPOTrainer, from the preference pairs directly)."""

from __future__ import annotations

import importlib
from typing import Any

from rlhf_pipeline.stages.core.registry import ALGORITHMS
from rlhf_pipeline.stages.modeling.stage_context import StageContext


def run(ctx: StageContext) -> dict[str, Any]:
    # Imported by name so that each algorithm pays only for the libraries it uses.
    algorithm = importlib.import_module(ALGORITHMS[ctx.config.rl.method].module)
    return {"algorithm": ctx.config.rl.method} | algorithm.run(ctx)
