"""The stages and the RL algorithms, each declared once: the config schema, the planner and its cache keys, the
launchers, the CLI and the docs all read them from here.

Adding an RL algorithm is one module under `stages/rlhf/` with a `run(ctx)`, one entry in ALGORITHMS and, when
it has settings, its section in `RLConfig` (`rl.<name>`), which is the only part of `rl` in its cache key.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

PACKAGE = "rlhf_pipeline.stages"
RUNNER = f"{PACKAGE}.runner"  # runs every stage's program (`rlhf stage NAME`)


@dataclass(frozen=True)
class Algorithm:
    name: str
    module: str  # under stages/rlhf/: its run(ctx) trains the policy
    needs_reward_model: bool  # False: it learns from the preference pairs directly
    # True: any number of processes trains the one-process model (the same batches; sums in another order only),
    # so the process count is not part of its cache key and a run may resume on another count.
    # False: a Trainer's batch is per process (more processes, a bigger batch).
    any_process_count: bool = False


ALGORITHMS: dict[str, Algorithm] = {
    algorithm.name: algorithm
    for algorithm in (
        Algorithm("ppo", f"{PACKAGE}.rlhf.ppo", needs_reward_model=True, any_process_count=True),
        Algorithm(
            "rejection_sampling", f"{PACKAGE}.rlhf.rejection_sampling", needs_reward_model=True, any_process_count=True
        ),
        Algorithm("dpo", f"{PACKAGE}.rlhf.dpo", needs_reward_model=False),
        Algorithm("grpo", f"{PACKAGE}.rlhf.grpo_rloo", needs_reward_model=True),
        Algorithm("rloo", f"{PACKAGE}.rlhf.grpo_rloo", needs_reward_model=True),
    )
}


@dataclass(frozen=True)
class Stage:
    name: str
    inputs: tuple[str, ...]  # the upstream stages whose artifacts it reads
    sections: tuple[str, ...]  # the config sections in its cache key (besides run.seed)
    trains: bool  # whether it trains a model, and so may run on several data-parallel processes
    model: str | None = None  # what model its artifact holds (it then carries a model card), if any
    pipeline_tag: str | None = None  # that model's task, as the Hugging Face Hub names it
    per_method: bool = False  # runs once per method where rl.algorithm lists several (its own branch each)

    @property
    def program(self) -> str:
        """The stage program's module: its run(ctx) is the stage."""
        return f"{PACKAGE}.{self.name}"

    def inputs_for(self, config: Any) -> tuple[str, ...]:
        if self.name == "rl" and not ALGORITHMS[config.rl.method].needs_reward_model:
            return tuple(name for name in self.inputs if name != "reward")
        return self.inputs

    def modules_for(self, config: Any) -> tuple[str, ...]:
        """The modules the stage runs, besides what they import: the runner, the stage's program, and for rl
        the chosen algorithm's module (each loaded by name)."""
        algorithm = (ALGORITHMS[config.rl.method].module,) if self.name == "rl" else ()
        return RUNNER, self.program, *algorithm


STAGES: dict[str, Stage] = {
    stage.name: stage
    for stage in (
        Stage("prepare", (), ("data", "prepare"), trains=False),
        Stage(
            "sft",
            ("prepare",),
            ("model", "sft"),
            trains=True,
            model="a policy fine-tuned on demonstrations (supervised fine-tuning)",
            pipeline_tag="text-generation",
        ),
        Stage(
            "reward",
            ("prepare", "sft"),
            ("model", "reward"),
            trains=True,
            model="a reward model: one score per conversation, higher for the preferred answer",
            pipeline_tag="text-classification",
        ),
        Stage(
            "rl",
            ("prepare", "sft", "reward"),
            ("model", "rl"),
            trains=True,
            model="a policy optimised towards human preferences",
            pipeline_tag="text-generation",
            per_method=True,
        ),
        Stage("evaluate", ("prepare", "sft", "reward", "rl"), ("model", "evaluate"), trains=False, per_method=True),
    )
}
STAGE_NAMES = tuple(STAGES)
# The modules a warm interpreter imports so that a forked stage starts at once (flows/launchers/process.py).
STAGE_MODULES = (RUNNER, *(stage.program for stage in STAGES.values()))
ALGORITHM_MODULES = tuple(dict.fromkeys(a.module for a in ALGORITHMS.values()))
