"""reward: a reward model trained from the SFT model.

`reward.kind: pairwise` (default): TRL's RewardTrainer on preference pairs, with the pairwise ranking loss
-log σ(r_chosen − r_rejected); pairs with a `margin` column get the Llama-2 margin loss
-log σ(r_chosen − r_rejected − margin). Held-out pairwise accuracy is reported as `eval_accuracy`.
`reward.kind: multi_aspect`: one regression head per rated aspect, see `rlhf.multi_aspect`.
On several processes, DDP or (pairwise) FSDP (`reward.distributed`, `modeling.trainer`).
With safety pairs (`data.safety`), a second pairwise model is trained on them into `safety/`, and the reward
becomes Llama 2's gated combination (`rlhf.reward_signal.GatedReward`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from datasets import Dataset
from transformers import Trainer
from trl import RewardConfig, RewardTrainer

from rlhf_pipeline.stages.core.checkpoints import CheckpointStore
from rlhf_pipeline.stages.data.rows import load_rows
from rlhf_pipeline.stages.modeling.lengths import whole_pairs
from rlhf_pipeline.stages.modeling.loading import load_scorer, load_tokenizer
from rlhf_pipeline.stages.modeling.lora import AdapterBase, artifact_base, quantization_config, with_adapter
from rlhf_pipeline.stages.modeling.stage_context import StageContext
from rlhf_pipeline.stages.modeling.trainer import (
    ResumesShardedModels,
    model_shards,
    train_evaluate_save,
    training_arguments,
)
from rlhf_pipeline.stages.rlhf import multi_aspect
from rlhf_pipeline.stages.rlhf.reward_signal import GATE_FILE, SAFETY_DIR
from rlhf_pipeline.stages.rlhf.scoring import pairwise_accuracy


class RewardStageTrainer(ResumesShardedModels, RewardTrainer):
    """TRL's RewardTrainer, able to resume a model sharded as it loaded."""


def run(ctx: StageContext) -> dict[str, Any]:
    if ctx.config.reward.kind == "multi_aspect":
        return multi_aspect.run(ctx)
    metrics = train_pairwise(ctx, "preference", ctx.out_dir, ctx.checkpoints)
    if load_rows(ctx.inputs["prepare"] / "safety_train.jsonl"):
        safety = train_pairwise(ctx, "safety", ctx.out_dir / SAFETY_DIR, ctx.checkpoints.nested("safety"))
        metrics |= {f"safety_{name}": value for name, value in safety.items()}
        gate = {"safety_threshold": ctx.config.reward.safety_threshold}
        (ctx.out_dir / GATE_FILE).write_text(json.dumps(gate))
    return metrics


def pairs_dataset(rows: list[dict[str, Any]]) -> Dataset:
    """The pairs as TRL's dataset. `Dataset.from_list` takes its columns from the first row: where only some
    sources carry a `margin`, a first row without one dropped every margin, and a later one without it crashed
    the collator (None). A pair without a margin gets 0, the plain loss."""
    if any("margin" in row for row in rows):
        rows = [{"margin": 0.0} | row for row in rows]
    return Dataset.from_list(rows)


def train_pairwise(ctx: StageContext, rows: str, out_dir: Path, checkpoints: CheckpointStore) -> dict[str, Any]:
    """One reward model on the `rows` pairs written by prepare (`preference` or `safety`)."""
    config = ctx.config.reward
    sft_dir = str(ctx.inputs["sft"])
    tokenizer = load_tokenizer(sft_dir)
    prepared = ctx.inputs["prepare"]
    max_length = ctx.config.model.max_length
    train, train_dropped = whole_pairs(load_rows(prepared / f"{rows}_train.jsonl"), tokenizer, max_length)
    held_out, eval_dropped = whole_pairs(load_rows(prepared / f"{rows}_eval.jsonl"), tokenizer, max_length)
    quantization = quantization_config(config.lora, ctx.device, "reward")
    shards = model_shards(ctx, config.distributed)
    model = load_scorer(
        sft_dir, ctx.device, tokenizer.pad_token_id, quantization, train=config.lora is None, shards=shards
    )
    if config.lora is not None:  # applied here, not by TRL: a sharded base's trained head needs `with_adapter`
        model = with_adapter(model, config.lora, "SEQ_CLS")
    trainer = RewardStageTrainer(
        model=model,
        args=RewardConfig(
            center_rewards_coefficient=config.center_rewards_coefficient,
            **training_arguments(ctx, config, ctx.work_dir / f"trainer-{rows}", shards),
        ),
        train_dataset=pairs_dataset(train),
        eval_dataset=pairs_dataset(held_out),
        processing_class=tokenizer,
    )
    base = AdapterBase(sft_dir, artifact_base("sft"))

    # Held-out accuracy through the scoring path every later stage uses (TRL's own is computed on its batches).
    def accuracy(trained: Trainer) -> dict[str, Any]:
        return {"eval_accuracy": pairwise_accuracy(trained.model.eval(), tokenizer, held_out)}

    metrics = train_evaluate_save(
        trainer, ctx, config, base, {"eval_loss": "eval_loss"}, out_dir, checkpoints, accuracy
    )
    return metrics | {"rows_too_long": {"train": train_dropped, "eval": eval_dropped}}
