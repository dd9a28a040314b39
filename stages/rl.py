"""rl: optimise the SFT policy against the reward model, with `rl.algorithm` = `ppo` or `rejection_sampling`."""

from __future__ import annotations

import importlib
from typing import Any

from stages.runner import StageContext


def run(ctx: StageContext) -> dict[str, Any]:
    # Imported by name so that PPO, which needs no TRL trainer, does not pay for importing one.
    algorithm = importlib.import_module(f"stages.{ctx.config.rl.algorithm}")
    return {"algorithm": ctx.config.rl.algorithm} | algorithm.run(ctx)
