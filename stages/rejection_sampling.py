"""Rejection sampling fine-tuning, Llama 2 style: per round, sample N responses per prompt from the policy,
score them with the reward model, keep the best per prompt and fine-tune the policy on those.

Each finished round is a checkpoint in the store; a retried stage resumes after the last finished round.
"""

from __future__ import annotations

import logging
import random
import shutil
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from trl import SFTConfig, SFTTrainer

from stages.config import RejectionSamplingConfig
from stages.data import load_rows
from stages.generation import decode_responses, reward_scores, sample
from stages.models import load_policy, load_tokenizer
from stages.ppo import summarize, write_history
from stages.reward_models import load_reward_model
from stages.runner import StageContext
from stages.training import training_arguments

log = logging.getLogger("rlhf.stage")


ROLLOUT_BATCH = 64


def best_of_n(ctx: StageContext, policy_dir: str, prompts: list, config: RejectionSamplingConfig) -> tuple[list, dict]:
    """The reward model's favourite of `samples_per_prompt` responses to each prompt."""
    tokenizer = load_tokenizer(policy_dir)
    policy = load_policy(policy_dir, ctx.device).eval()
    reward_model = load_reward_model(str(ctx.inputs["reward"]), ctx.device, tokenizer.pad_token_id)
    n = config.samples_per_prompt
    per_batch = max(1, ROLLOUT_BATCH // n)
    kept, mean_scores, best_scores = [], [], []
    for start in range(0, len(prompts), per_batch):
        chunk = prompts[start : start + per_batch]
        rollout = sample(policy, tokenizer, [p for p in chunk for _ in range(n)], config.generation)
        scores = reward_scores(reward_model, rollout).view(len(chunk), n)
        best = scores.argmax(dim=1)
        responses = decode_responses(tokenizer, rollout.select(best + torch.arange(len(chunk)) * n))
        for prompt, response in zip(chunk, responses, strict=True):
            kept.append({"prompt": prompt, "completion": [{"role": "assistant", "content": response}]})
        mean_scores += scores.mean(dim=1).tolist()
        best_scores += scores.max(dim=1).values.tolist()
    stats = {"score": sum(mean_scores) / len(mean_scores), "best_score": sum(best_scores) / len(best_scores)}
    return kept, stats


def fine_tune(ctx: StageContext, policy_dir: str, rows: list, out_dir: Path, round_index: int) -> None:
    config = ctx.config.rl.rejection_sampling.training
    arguments = training_arguments(ctx, config, ctx.work_dir / f"trainer-round-{round_index}")
    arguments |= {"save_strategy": "no", "seed": ctx.config.run.seed + round_index}
    trainer = SFTTrainer(
        model=load_policy(policy_dir, ctx.device),
        args=SFTConfig(completion_only_loss=True, **arguments),
        train_dataset=Dataset.from_list(rows),
        processing_class=load_tokenizer(policy_dir),
    )
    trainer.train()
    trainer.save_model(str(out_dir))
    trainer.processing_class.save_pretrained(out_dir)


def run(ctx: StageContext) -> dict[str, Any]:
    config = ctx.config.rl.rejection_sampling
    prompts = [row["prompt"] for row in load_rows(ctx.inputs["prepare"] / "prompt_train.jsonl")]
    policy_dir = str(ctx.inputs["sft"])
    history: list[dict[str, float]] = []
    start = ctx.checkpoints.latest() or 0
    if start:
        restored = ctx.work_dir / f"round-{start}"
        ctx.checkpoints.restore(start, restored)
        policy_dir = str(restored)
        history = load_rows(restored / "rounds.jsonl")
        ctx.resumed_from = start
        log.info("rl: resuming rejection sampling after round %d", start)
    for round_index in range(start, config.rounds):
        rng = random.Random(f"{ctx.config.run.seed}-rejection-{round_index}")
        chosen = rng.sample(prompts, min(config.prompts_per_round, len(prompts)))
        kept, stats = best_of_n(ctx, policy_dir, chosen, config)
        out = ctx.work_dir / f"round-{round_index + 1}"
        fine_tune(ctx, policy_dir, kept, out, round_index)
        history.append({"round": round_index + 1, **stats})
        write_history(out / "rounds.jsonl", history)
        log.info("rl: rejection sampling round %d/%d %s", round_index + 1, config.rounds, stats)
        ctx.checkpoints.save(round_index + 1, out)
        policy_dir = str(out)
    shutil.copytree(policy_dir, ctx.out_dir, dirs_exist_ok=True)
    return summarize(history, ("score", "best_score")) | {"kept_per_round": config.prompts_per_round}
