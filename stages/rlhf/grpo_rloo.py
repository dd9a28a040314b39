"""GRPO and RLOO with TRL's trainers: for each prompt several answers are sampled and compared with each
other (group-normalised, or leave-one-out baselines), rewarded by the trained reward model.

TRL stops and masks completions at the ids in the model's `generation_config.eos_token_id`: they are set to
every end-of-turn id (`rlhf.rollout.end_of_turn_ids`), in a generation config that holds nothing else, so
that the base model's own sampling settings do not leak in; the model keeps its own config when saved.
With `rl.distributed.strategy: fsdp` the policy is sharded as it loads (`modeling.trainer`), and so are the
reward model and the reference unless `rl.distributed.frozen: replicate`. TRL builds the reference itself, from
the policy's path and `model_init_kwargs`, which carry the sharding (TRL warns that a policy passed as a model
ignores them: it is the reference that takes them).
"""

from __future__ import annotations

from typing import Any

import torch
from datasets import Dataset
from transformers import GenerationConfig as HFGenerationConfig
from transformers import PreTrainedTokenizerBase
from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

from rlhf_pipeline.stages.data.rows import load_rows
from rlhf_pipeline.stages.modeling.chat_template import end_of_turn_ids, fitting_prompts
from rlhf_pipeline.stages.modeling.loading import (
    load_policy,
    load_tokenizer,
    policy_source,
    sharded_loading,
    unwrap_adapter,
)
from rlhf_pipeline.stages.modeling.lora import AdapterBase, adapter_config, artifact_base, quantization_config
from rlhf_pipeline.stages.modeling.sharding import frozen_bytes
from rlhf_pipeline.stages.modeling.stage_context import StageContext
from rlhf_pipeline.stages.modeling.trainer import (
    ResumesShardedModels,
    frozen_shards,
    model_shards,
    save_trained,
    train_with_resume,
    training_arguments,
    training_summary,
)
from rlhf_pipeline.stages.rlhf.reward_signal import load_reward_model
from rlhf_pipeline.stages.rlhf.scoring import response_scores


class GRPOStageTrainer(ResumesShardedModels, GRPOTrainer):
    """TRL's GRPOTrainer, able to resume a model sharded as it loaded."""


class RLOOStageTrainer(ResumesShardedModels, RLOOTrainer):
    """TRL's RLOOTrainer, able to resume a model sharded as it loaded."""


TRAINERS = {"grpo": (GRPOStageTrainer, GRPOConfig), "rloo": (RLOOStageTrainer, RLOOConfig)}


def reward_function(scorer: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, end_ids: list[int]):
    """The trained reward (`reward_signal`: one model, or Llama 2's gated pair) as TRL's reward function of
    conversations, through the one scoring path: a completion without an end-of-turn token is scored as
    unfinished. Every process scores as many completions per step, so a sharded reward model is called alike."""

    def reward_model(prompts, completions, completion_ids, **_) -> list[float]:  # TRL logs rewards by this name
        finished = [any(i in end_ids for i in ids) for ids in completion_ids]
        responses = [completion[-1]["content"] for completion in completions]
        return response_scores(scorer, tokenizer, prompts, responses, finished)

    return reward_model


def run(ctx: StageContext) -> dict[str, Any]:
    algorithm = ctx.config.rl.method
    config = getattr(ctx.config.rl, algorithm)
    trainer_class, config_class = TRAINERS[algorithm]
    sft_dir = str(ctx.inputs["sft"])
    tokenizer = load_tokenizer(sft_dir)
    source = policy_source(ctx.inputs, rebuilt_reference=config.beta > 0 and config.lora is None)
    shards = model_shards(ctx, ctx.config.rl.distributed)
    frozen = frozen_shards(shards, ctx.config.rl.distributed)
    arguments = training_arguments(ctx, config, ctx.work_dir / "trainer", shards)
    max_length = arguments.pop("max_length")
    quantization = quantization_config(config.lora, ctx.device, f"rl.{algorithm}")
    model = load_policy(source, ctx.device, quantization, train=config.lora is None, shards=shards)
    end_ids = end_of_turn_ids(tokenizer, model)
    own_config = model.generation_config
    prompts, too_long = fitting_prompts(
        tokenizer,
        [row["prompt"] for row in load_rows(ctx.inputs["prepare"] / "prompt_train.jsonl")],
        max_length - config.generation.max_new_tokens,
    )
    model.generation_config = HFGenerationConfig(eos_token_id=end_ids, pad_token_id=tokenizer.pad_token_id)
    reward_dir = str(ctx.inputs["reward"])
    scorer = load_reward_model(reward_dir, ctx.device, tokenizer.pad_token_id, frozen)
    trainer = trainer_class(
        model=model,
        reward_funcs=reward_function(scorer, load_tokenizer(reward_dir), end_ids),
        args=config_class(
            model_init_kwargs=sharded_loading(frozen) or None,  # the reference's
            num_generations=config.num_generations,
            beta=config.beta,
            max_completion_length=config.generation.max_new_tokens,
            temperature=config.generation.temperature,
            top_k=config.generation.top_k,
            **arguments,
        ),
        train_dataset=Dataset.from_list([{"prompt": prompt} for prompt in prompts]),
        processing_class=tokenizer,
        peft_config=adapter_config(config.lora),
    )
    train_with_resume(trainer, ctx)
    unwrap_adapter(trainer.model).generation_config = own_config
    summary = training_summary(trainer, "reward")  # before saving, which merges a LoRA adapter into the model
    frozen = frozen_bytes([m for m in (trainer.ref_model, scorer) if m is not None])
    summary["frozen_bytes"] = summary.get("frozen_bytes", 0) + frozen  # a LoRA policy's base counted
    save_trained(trainer, config, AdapterBase(sft_dir, artifact_base("sft")), ctx.out_dir)
    return summary | {"prompts_too_long": too_long}
