"""sft: supervised fine-tuning of the base model on demonstrations with TRL's SFTTrainer.

Each conversation is split before its final assistant turn (prompt/completion), so the loss is computed on the
assistant's tokens only and the prompt tokens are masked. Optional LoRA/QLoRA via peft, merged or kept; on
several processes, DDP or FSDP (`sft.distributed`, `modeling.trainer`).
"""

from __future__ import annotations

from typing import Any

from datasets import Dataset
from trl import SFTConfig, SFTTrainer

from rlhf_pipeline.stages.data.rows import load_rows, sft_as_prompt_completion
from rlhf_pipeline.stages.modeling.lengths import answerable
from rlhf_pipeline.stages.modeling.loading import load_policy, load_tokenizer, materialize_base
from rlhf_pipeline.stages.modeling.lora import BASE_MODEL, AdapterBase, adapter_config, quantization_config
from rlhf_pipeline.stages.modeling.stage_context import StageContext
from rlhf_pipeline.stages.modeling.trainer import (
    ResumesShardedModels,
    model_shards,
    train_evaluate_save,
    training_arguments,
)


class SFTStageTrainer(ResumesShardedModels, SFTTrainer):
    """TRL's SFTTrainer, able to resume a model sharded as it loaded."""


def sft_dataset(rows: list[dict[str, Any]]) -> Dataset:
    return Dataset.from_list([sft_as_prompt_completion(row) for row in rows])


def run(ctx: StageContext) -> dict[str, Any]:
    config = ctx.config.sft
    base = materialize_base(ctx.config.model, ctx.config.run.seed, ctx.work_dir)
    tokenizer = load_tokenizer(base)
    max_length = ctx.config.model.max_length
    train, train_dropped = answerable(load_rows(ctx.inputs["prepare"] / "sft_train.jsonl"), tokenizer, max_length)
    held_out, eval_dropped = answerable(load_rows(ctx.inputs["prepare"] / "sft_eval.jsonl"), tokenizer, max_length)
    shards = model_shards(ctx, config.distributed)
    args = SFTConfig(completion_only_loss=True, **training_arguments(ctx, config, ctx.work_dir / "trainer", shards))
    quantization = quantization_config(config.lora, ctx.device, "sft")
    trainer = SFTStageTrainer(
        model=load_policy(base, ctx.device, quantization, train=config.lora is None, shards=shards),
        args=args,
        train_dataset=sft_dataset(train),
        eval_dataset=sft_dataset(held_out),
        processing_class=tokenizer,
        peft_config=adapter_config(config.lora),
    )
    metrics = train_evaluate_save(trainer, ctx, config, AdapterBase(base, BASE_MODEL), {"eval_loss": "eval_loss"})
    return metrics | {"rows_too_long": {"train": train_dropped, "eval": eval_dropped}}
