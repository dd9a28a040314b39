"""GRPO and RLOO with TRL's trainers: for each prompt several answers are sampled and compared with each
other (group-normalised, or leave-one-out baselines), rewarded by the trained reward model."""

from __future__ import annotations

from typing import Any

from datasets import Dataset
from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

from stages.data import load_rows
from stages.generation import conversation_scores
from stages.lora import AdapterBase, adapter_config, quantization_config
from stages.models import load_policy, load_tokenizer
from stages.reward_models import load_reward_model
from stages.runner import StageContext
from stages.training import save_trained, train_with_resume, training_arguments, training_summary

TRAINERS = {"grpo": (GRPOTrainer, GRPOConfig), "rloo": (RLOOTrainer, RLOOConfig)}


def reward_function(ctx: StageContext, pad_token_id: int):
    """The trained reward (one model, or Llama 2's gated pair) as TRL's reward function of conversations."""
    reward_dir = str(ctx.inputs["reward"])
    model = load_reward_model(reward_dir, ctx.device, pad_token_id)
    tokenizer = load_tokenizer(reward_dir)

    def reward_model(prompts, completions, **_) -> list[float]:
        return conversation_scores(model, tokenizer, [p + c for p, c in zip(prompts, completions, strict=True)])

    return reward_model


def run(ctx: StageContext) -> dict[str, Any]:
    algorithm = ctx.config.rl.algorithm
    config = getattr(ctx.config.rl, algorithm)
    trainer_class, config_class = TRAINERS[algorithm]
    sft_dir = str(ctx.inputs["sft"])
    tokenizer = load_tokenizer(sft_dir)
    arguments = training_arguments(ctx, config, ctx.work_dir / "trainer")
    arguments.pop("max_length")
    trainer = trainer_class(
        model=load_policy(sft_dir, ctx.device, quantization_config(config.lora, ctx.device, f"rl.{algorithm}")),
        reward_funcs=reward_function(ctx, tokenizer.pad_token_id),
        args=config_class(
            num_generations=config.num_generations,
            beta=config.beta,
            max_completion_length=config.generation.max_new_tokens,
            temperature=config.generation.temperature,
            top_k=config.generation.top_k,
            **arguments,
        ),
        train_dataset=Dataset.from_list(load_rows(ctx.inputs["prepare"] / "prompt_train.jsonl")),
        processing_class=tokenizer,
        peft_config=adapter_config(config.lora),
    )
    train_with_resume(trainer, ctx)
    save_trained(trainer, config, AdapterBase(sft_dir, "artifact:sft"), ctx.out_dir)
    return training_summary(trainer, "reward")
