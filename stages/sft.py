"""sft: supervised fine-tuning of the base model on demonstrations with TRL's SFTTrainer.

Each conversation is split before its final assistant turn (prompt/completion), so the loss is computed on the
assistant's tokens only and the prompt tokens are masked. Optional LoRA/QLoRA via peft, merged or kept.
"""

from __future__ import annotations

from typing import Any

from datasets import Dataset
from trl import SFTConfig, SFTTrainer

from stages.data import load_rows, sft_as_prompt_completion
from stages.lora import BASE_MODEL, AdapterBase, adapter_config, quantization_config
from stages.models import load_policy, load_tokenizer, materialize_base
from stages.runner import StageContext
from stages.training import train_evaluate_save, training_arguments


def sft_dataset(path) -> Dataset:
    return Dataset.from_list([sft_as_prompt_completion(row) for row in load_rows(path)])


def run(ctx: StageContext) -> dict[str, Any]:
    config = ctx.config.sft
    base = materialize_base(ctx.config.model, ctx.config.run.seed, ctx.work_dir)
    tokenizer = load_tokenizer(base)
    args = SFTConfig(completion_only_loss=True, **training_arguments(ctx, config, ctx.work_dir / "trainer"))
    trainer = SFTTrainer(
        model=load_policy(base, ctx.device, quantization_config(config.lora, ctx.device, "sft")),
        args=args,
        train_dataset=sft_dataset(ctx.inputs["prepare"] / "sft_train.jsonl"),
        eval_dataset=sft_dataset(ctx.inputs["prepare"] / "sft_eval.jsonl"),
        processing_class=tokenizer,
        peft_config=adapter_config(config.lora),
    )
    return train_evaluate_save(trainer, ctx, config, AdapterBase(base, BASE_MODEL), {"eval_loss": "eval_loss"})
