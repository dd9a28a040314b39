"""PPO for language models (TRL removed its PPOTrainer in 1.13), on torch and transformers.

Per rollout batch: sample responses from the policy; score them with the reward model; per-token rewards are
the KL penalty to the frozen reference (the SFT model) plus the score at the last token; GAE on the value
model's estimates gives advantages, whitened; then several PPO epochs of clipped policy and value losses over
shuffled mini-batches. The value model starts from the reward model, as in InstructGPT.
With `rl.ppo.lora`, the policy and the value model train LoRA adapters, and the reference is the policy with
its adapter disabled: no second copy of the policy's weights.
"""

from __future__ import annotations

import json
import logging
import random
import time
from pathlib import Path
from typing import Any

import torch

from stages import ppo_math
from stages.config import PPOConfig
from stages.data import load_rows
from stages.generation import Rollout, response_logprobs, reward_scores, sample, token_values
from stages.lora import AdapterBase, quantization_config, resume_adapter, save_model, with_adapter
from stages.models import load_policy, load_scorer, load_tokenizer
from stages.progress import report_metrics, report_progress
from stages.reward_models import load_reward_model
from stages.runner import StageContext
from stages.tracking import trackers

log = logging.getLogger("rlhf.stage")


class PPOTrainer:
    def __init__(self, ctx: StageContext, config: PPOConfig) -> None:
        self.ctx = ctx
        self.config = config
        self.sft_dir, self.reward_dir = str(ctx.inputs["sft"]), str(ctx.inputs["reward"])
        self.tokenizer = load_tokenizer(self.sft_dir)
        self.quantization = quantization_config(config.lora, ctx.device, "rl.ppo")
        self.history: list[dict[str, float]] = []
        self.start = ctx.checkpoints.latest() or 0
        if self.start:
            self.restore_checkpoint(self.start)
        else:
            self.build_trainable()
        self.reference = None
        if config.lora is None:
            self.reference = load_policy(self.sft_dir, ctx.device).eval().requires_grad_(False)
        self.reward_model = load_reward_model(self.reward_dir, ctx.device, self.tokenizer.pad_token_id)
        self.reward_model.requires_grad_(False)
        self.prompts = [row["prompt"] for row in load_rows(ctx.inputs["prepare"] / "prompt_train.jsonl")]

    def build_trainable(self, checkpoint: Path | None = None) -> None:
        """Policy (from SFT), value model (from the reward model) and their optimizer, or a checkpoint's."""
        device, lora, pad = self.ctx.device, self.config.lora, self.tokenizer.pad_token_id
        if lora is None:
            policy_dir = str(checkpoint / "policy") if checkpoint else self.sft_dir
            value_dir = str(checkpoint / "value") if checkpoint else self.reward_dir
            self.policy = load_policy(policy_dir, device)
            self.value_model = load_scorer(value_dir, device, pad)
        else:
            policy = load_policy(self.sft_dir, device, self.quantization)
            value = load_scorer(self.reward_dir, device, pad, self.quantization)
            if checkpoint:
                self.policy = resume_adapter(policy, checkpoint / "policy")
                self.value_model = resume_adapter(value, checkpoint / "value")
            else:
                self.policy, self.value_model = with_adapter(policy, lora), with_adapter(value, lora, "SEQ_CLS")
        if self.config.gradient_checkpointing:
            for model in (self.policy, self.value_model):
                enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
                enable({"use_reentrant": False})
        self.optimizer = torch.optim.AdamW(self.trainable_parameters(), lr=self.config.learning_rate, eps=1e-5)

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for model in (self.policy, self.value_model) for p in model.parameters() if p.requires_grad]

    def reference_logprobs(self, rollout: Rollout, temperature: float) -> torch.Tensor:
        if self.reference is not None:
            return response_logprobs(self.reference, rollout, temperature)
        with self.policy.disable_adapter():
            return response_logprobs(self.policy, rollout, temperature)

    def prompts_for_step(self, step: int) -> list[list[dict[str, str]]]:
        """Deterministic per step, so that a resumed run sees the same data it would have seen."""
        rng = random.Random(f"{self.ctx.config.run.seed}-ppo-{step}")
        if len(self.prompts) >= self.config.batch_size:
            return rng.sample(self.prompts, self.config.batch_size)
        return rng.choices(self.prompts, k=self.config.batch_size)

    @torch.no_grad()
    def rollout(self, step: int) -> tuple[Rollout, dict[str, torch.Tensor], dict[str, float]]:
        self.policy.eval()
        rollout = sample(self.policy, self.tokenizer, self.prompts_for_step(step), self.config.generation)
        temperature = self.config.generation.temperature
        mask = rollout.response_mask.float()
        logprobs = response_logprobs(self.policy, rollout, temperature)
        ref_logprobs = self.reference_logprobs(rollout, temperature)
        values = token_values(self.value_model, rollout)
        scores = reward_scores(self.reward_model, rollout)
        if self.config.missing_eos_penalty is not None:
            finished = (rollout.response_ids == self.tokenizer.eos_token_id).any(dim=1)
            scores = scores - self.config.missing_eos_penalty * (~finished).float()
        rewards, kl = ppo_math.kl_penalized_rewards(logprobs, ref_logprobs, scores, mask, self.config.kl_coef)
        advantages, returns = ppo_math.generalized_advantages(rewards, values, mask, self.config.gamma, self.config.lam)
        batch = {
            "logprobs": logprobs,
            "values": values,
            "advantages": ppo_math.masked_whiten(advantages, mask),
            "returns": returns,
            "mask": mask,
        }
        stats = {
            "tokens": rollout.input_ids.numel(),
            "score": scores.mean().item(),
            "kl": kl.sum(dim=1).mean().item(),
            "response_length": mask.sum(dim=1).mean().item(),
        }
        return rollout, batch, stats

    def optimize(self, rollout: Rollout, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        self.policy.train()
        config = self.config
        totals = {"policy_loss": 0.0, "value_loss": 0.0, "clip_fraction": 0.0}
        updates = 0
        for _ in range(config.ppo_epochs):
            order = torch.randperm(config.batch_size, device=rollout.response_ids.device)
            for start in range(0, config.batch_size, config.mini_batch_size):
                index = order[start : start + config.mini_batch_size]
                mini = rollout.select(index)
                mask = batch["mask"][index]
                logprobs = response_logprobs(self.policy, mini, config.generation.temperature)
                values = token_values(self.value_model, mini)
                policy_loss, clip_fraction = ppo_math.clipped_policy_loss(
                    logprobs, batch["logprobs"][index], batch["advantages"][index], mask, config.clip_range
                )
                value_loss = ppo_math.clipped_value_loss(
                    values, batch["values"][index], batch["returns"][index], mask, config.clip_range_value
                )
                self.optimizer.zero_grad()
                (policy_loss + config.vf_coef * value_loss).backward()
                torch.nn.utils.clip_grad_norm_(self.trainable_parameters(), max_norm=1.0)
                self.optimizer.step()
                totals["policy_loss"] += policy_loss.item()
                totals["value_loss"] += value_loss.item()
                totals["clip_fraction"] += clip_fraction.item()
                updates += 1
        return {name: total / updates for name, total in totals.items()}

    def save_checkpoint(self, step: int) -> None:
        local = self.ctx.work_dir / f"ppo-checkpoint-{step}"
        self.policy.save_pretrained(local / "policy")
        self.value_model.save_pretrained(local / "value")
        torch.save(
            {"optimizer": self.optimizer.state_dict(), "torch_rng": torch.get_rng_state(), "step": step},
            local / "state.pt",
        )
        (local / "history.json").write_text(json.dumps(self.history))
        self.ctx.checkpoints.save(step, local)
        log.info("rl: checkpoint at step %d saved to the store", step)

    def restore_checkpoint(self, step: int) -> None:
        local = self.ctx.work_dir / f"ppo-restore-{step}"
        self.ctx.checkpoints.restore(step, local)
        self.build_trainable(local)
        state = torch.load(local / "state.pt", weights_only=True)
        self.optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
        self.history = json.loads((local / "history.json").read_text())

    def train(self) -> None:
        if self.start:
            self.ctx.resumed_from = self.start
            log.info("rl: resuming PPO from step %d", self.start)
        every = self.ctx.config.run.checkpoint_every
        with trackers(self.ctx) as log_metrics:
            for step in range(self.start, self.config.steps):
                started = time.perf_counter()
                rollout, batch, stats = self.rollout(step)
                stats |= self.optimize(rollout, batch) | {"seconds": time.perf_counter() - started}
                self.history.append({"step": step + 1, **{k: round(v, 5) for k, v in stats.items()}})
                throughput = {"tokens_per_second": stats["tokens"] / stats["seconds"]}
                report_progress("rl", step + 1, self.config.steps)
                report_metrics("rl", step + 1, self.history[-1] | throughput)
                log_metrics(stats | throughput, step + 1)
                if step % 10 == 0 or step + 1 == self.config.steps:
                    log.info("rl: step %d/%d %s", step + 1, self.config.steps, self.history[-1])
                if (step + 1) % every == 0 and step + 1 < self.config.steps:
                    self.save_checkpoint(step + 1)


def run(ctx: StageContext) -> dict[str, Any]:
    trainer = PPOTrainer(ctx, ctx.config.rl.ppo)
    trainer.train()
    base = AdapterBase(trainer.sft_dir, "artifact:sft")
    save_model(trainer.policy, trainer.tokenizer, ctx.out_dir, ctx.config.rl.ppo.lora, base)
    write_history(ctx.out_dir / "ppo_history.jsonl", trainer.history)
    throughput = {
        "train_tokens": sum(h["tokens"] for h in trainer.history),
        "train_seconds": round(sum(h["seconds"] for h in trainer.history), 2),
    }
    return summarize(trainer.history, ("score", "kl", "response_length", "policy_loss", "value_loss")) | throughput


def write_history(path: Path, history: list[dict[str, float]]) -> None:
    path.write_text("".join(json.dumps(entry) + "\n" for entry in history))


def summarize(history: list[dict[str, float]], keys: tuple[str, ...]) -> dict[str, float]:
    """Mean of each key over the first and the last tenth of training: the direction things moved."""
    window = max(1, len(history) // 10)
    summary: dict[str, float] = {"steps": len(history)}
    for key in keys:
        summary[f"first_{key}"] = round(sum(h[key] for h in history[:window]) / window, 4)
        summary[f"last_{key}"] = round(sum(h[key] for h in history[-window:]) / window, 4)
    return summary
