"""The multi-aspect reward model: one regression head per rated aspect (quality, relevance, helpfulness, ...),
trained on the raters' mean scores (standardized per aspect), then folded into one reward head r = Σ w_a · r_a.

The heads are linear, so the weighted sum is itself one linear head: the artifact is an ordinary one-score
reward model that PPO, rejection sampling, GRPO/RLOO and evaluation use unchanged; the per-aspect model is
kept beside it in `per_aspect/`. With LoRA the adapter is always merged, since folding changes the head.
With `reward.distributed.strategy: fsdp` the model is sharded as it loads (`modeling.trainer`); the per-aspect
model is gathered as it is saved, and the main process folds that saved model's heads.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from datasets import Dataset
from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

from rlhf_pipeline.stages.core.errors import InputError
from rlhf_pipeline.stages.data.rows import load_rows
from rlhf_pipeline.stages.modeling.data_parallel import stage_processes
from rlhf_pipeline.stages.modeling.lengths import whole_rated
from rlhf_pipeline.stages.modeling.loading import load_scorer, load_tokenizer
from rlhf_pipeline.stages.modeling.lora import with_adapter
from rlhf_pipeline.stages.modeling.stage_context import StageContext
from rlhf_pipeline.stages.modeling.trainer import (
    ResumesShardedModels,
    model_shards,
    train_with_resume,
    training_arguments,
    training_summary,
)
from rlhf_pipeline.stages.rlhf.scoring import pairwise_accuracy


def standardization(rows: list[dict[str, Any]], aspects: list[str]) -> dict[str, tuple[float, float]]:
    """Each aspect's mean and standard deviation over the training items: the heads learn z-scores, so no
    aspect dominates the loss by its scale and none has to spend capacity on its offset."""
    stats = {}
    for aspect in aspects:
        values = np.array([r["targets"][aspect] for r in rows], dtype=float)
        stats[aspect] = (float(values.mean()), float(values.std()) or 1.0)
    return stats


def encode(tokenizer, rows, aspects: list[str], stats: dict[str, tuple[float, float]]) -> Dataset:
    """Each rated response as the reward model reads it (the whole conversation, no end token added), with its
    targets standardized."""
    texts = [tokenizer.apply_chat_template(r["prompt"] + r["response"], tokenize=False) for r in rows]
    encoded = tokenizer(texts, add_special_tokens=False)
    labels = [[(r["targets"][a] - stats[a][0]) / stats[a][1] for a in aspects] for r in rows]
    return Dataset.from_dict({**encoded, "labels": labels})


def fold_heads(model, weights: list[float]) -> None:
    """Replace the per-aspect heads by their weighted sum: one head, one score, in the dtype of the rest of the
    model (a LoRA-trained head is fp32 on a bf16 base)."""
    head = model.score
    combined = torch.nn.Linear(head.in_features, 1, bias=head.bias is not None)
    with torch.no_grad():
        w = torch.tensor(weights, dtype=head.weight.dtype, device=head.weight.device)
        combined.weight.copy_(w @ head.weight)
        if head.bias is not None:
            combined.bias.copy_(w @ head.bias)
    combined.to(device=head.weight.device, dtype=model.get_input_embeddings().weight.dtype)
    model.score = combined
    model.config.num_labels = 1


class MultiAspectTrainer(ResumesShardedModels, Trainer):
    """The HF Trainer, able to resume a model sharded as it loaded."""


def run(ctx: StageContext) -> dict[str, Any]:
    config = ctx.config.reward
    aspects = list(config.aspects)
    prepared = ctx.inputs["prepare"]
    train_rows, eval_rows = load_rows(prepared / "rated_train.jsonl"), load_rows(prepared / "rated_eval.jsonl")
    rated = sorted(train_rows[0]["targets"]) if train_rows else []
    missing = [a for a in aspects if a not in rated]
    if missing:
        raise InputError(f"reward.aspects: {missing} not rated in data.rated (its aspects: {rated})")
    sft_dir = str(ctx.inputs["sft"])
    tokenizer = load_tokenizer(sft_dir, padding_side="right")  # DataCollatorWithPadding pads on that side
    shards = model_shards(ctx, config.distributed)
    heads = len(aspects)
    model = load_scorer(
        sft_dir, ctx.device, tokenizer.pad_token_id, train=config.lora is None, num_labels=heads, shards=shards
    )
    model.config.problem_type = "regression"
    if config.lora is not None:
        model = with_adapter(model, config.lora, "SEQ_CLS")
    arguments = training_arguments(ctx, config, ctx.work_dir / "trainer", shards)
    max_length = arguments.pop("max_length")
    train_rows, train_dropped = whole_rated(train_rows, tokenizer, max_length)
    eval_rows, eval_dropped = whole_rated(eval_rows, tokenizer, max_length)
    stats = standardization(train_rows, aspects)
    trainer = MultiAspectTrainer(
        model=model,
        args=TrainingArguments(**arguments),
        train_dataset=encode(tokenizer, train_rows, aspects, stats),
        eval_dataset=encode(tokenizer, eval_rows, aspects, stats),
        data_collator=DataCollatorWithPadding(tokenizer),
        processing_class=tokenizer,
    )
    train_with_resume(trainer, ctx)
    prediction = trainer.predict(trainer.eval_dataset)
    correlation = {
        aspect: round(float(np.corrcoef(prediction.predictions[:, i], prediction.label_ids[:, i])[0, 1]), 4)
        for i, aspect in enumerate(aspects)
    }
    summary = training_summary(trainer)  # of the model trained, before its heads are folded
    if config.lora is not None:
        model = model.merge_and_unload()
    model.save_pretrained(ctx.out_dir / "per_aspect")  # every process: a sharded model is gathered
    if shards > 1:
        if not stage_processes().main:
            return summary  # the main process publishes, from the whole model it saved
        model = load_scorer(str(ctx.out_dir / "per_aspect"), ctx.device, tokenizer.pad_token_id, num_labels=heads)
    fold_heads(model, [config.aspects[a] for a in aspects])
    model.save_pretrained(ctx.out_dir)
    tokenizer.save_pretrained(ctx.out_dir)
    return summary | {
        "kind": "multi_aspect",
        "aspect_weights": config.aspects,
        "aspect_mean_std": {a: [round(m, 4), round(sd, 4)] for a, (m, sd) in stats.items()},
        "aspect_correlation": correlation,
        "eval_rows": len(prediction.label_ids),  # gathered from every process, each row once
        "eval_loss": round(prediction.metrics["test_loss"], 4),
        "eval_accuracy": pairwise_accuracy(model.eval(), tokenizer, load_rows(prepared / "preference_eval.jsonl")),
        "rows_too_long": {"train": train_dropped, "eval": eval_dropped},
    }
