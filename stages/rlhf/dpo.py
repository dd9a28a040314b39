"""DPO with TRL's DPOTrainer: the SFT model learns from the preference pairs directly; the frozen SFT model is
the reference (also where sft kept its adapter: `loading.policy_source`). The reward model then serves
evaluation only. Pairs that `model.max_length` cuts to the same tokens are left out and counted.

With `rl.distributed.strategy: fsdp` the policy is sharded as it loads (`modeling.trainer`), and so is the
reference unless `rl.distributed.frozen: replicate` (then TRL loads it whole in every process)."""

from __future__ import annotations

from typing import Any

from datasets import Dataset
from trl import DPOConfig, DPOTrainer

from rlhf_pipeline.stages.data.rows import load_rows
from rlhf_pipeline.stages.modeling.lengths import distinct_pairs
from rlhf_pipeline.stages.modeling.loading import load_policy, load_tokenizer, policy_source
from rlhf_pipeline.stages.modeling.lora import AdapterBase, adapter_config, artifact_base, quantization_config
from rlhf_pipeline.stages.modeling.stage_context import StageContext
from rlhf_pipeline.stages.modeling.trainer import (
    ResumesShardedModels,
    frozen_shards,
    model_shards,
    train_evaluate_save,
    training_arguments,
)


class DPOStageTrainer(ResumesShardedModels, DPOTrainer):
    """TRL's DPOTrainer, able to resume a model sharded as it loaded."""


def run(ctx: StageContext) -> dict[str, Any]:
    config = ctx.config.rl.dpo
    sft_dir = str(ctx.inputs["sft"])
    prepared = ctx.inputs["prepare"]
    tokenizer = load_tokenizer(sft_dir)
    max_length = ctx.config.model.max_length
    train, train_dropped = distinct_pairs(load_rows(prepared / "preference_train.jsonl"), tokenizer, max_length)
    held_out, eval_dropped = distinct_pairs(load_rows(prepared / "preference_eval.jsonl"), tokenizer, max_length)
    quantization = quantization_config(config.lora, ctx.device, "rl.dpo")
    source = policy_source(ctx.inputs, rebuilt_reference=config.lora is None)
    shards = model_shards(ctx, ctx.config.rl.distributed)
    frozen = frozen_shards(shards, ctx.config.rl.distributed)
    trainer = DPOStageTrainer(
        model=load_policy(source, ctx.device, quantization, train=config.lora is None, shards=shards),
        ref_model=load_policy(source, ctx.device, shards=frozen) if frozen > 1 else None,
        args=DPOConfig(
            beta=config.beta,
            loss_type=[config.loss_type],
            **training_arguments(ctx, config, ctx.work_dir / "trainer", shards),
        ),
        train_dataset=Dataset.from_list(train),
        eval_dataset=Dataset.from_list(held_out),
        processing_class=tokenizer,
        peft_config=adapter_config(config.lora),
    )
    reported = {"eval_reward_accuracy": "eval_rewards/accuracies", "eval_loss": "eval_loss"}
    metrics = train_evaluate_save(trainer, ctx, config, AdapterBase(sft_dir, artifact_base("sft")), reported)
    return metrics | {"rows_too_long": {"train": train_dropped, "eval": eval_dropped}}
