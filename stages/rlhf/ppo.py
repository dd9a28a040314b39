"""PPO for language models (TRL removed its PPOTrainer in 1.13), on torch and transformers.

Per rollout batch: sample responses from the policy; score them with the reward model; per-token rewards are
the KL penalty to the frozen reference (the SFT model) plus the score at the last token; GAE on the value
model's estimates gives advantages, whitened; then several PPO epochs of clipped policy and value losses over
shuffled mini-batches. The value model starts from the reward model, as in InstructGPT.
With `rl.ppo.lora`, the policy and the value model train LoRA adapters, and the reference is the policy with
its adapter disabled: no second copy of the policy's weights.

On several processes (`deploy.stages.rl.processes`, on one node or several) each generates, scores and trains on
its share of every batch and mini-batch (`modeling.data_parallel`); batch sizes, epochs, whitening and metrics
mean what they mean in one process, and sampling is seeded per prompt, so that any number of processes draws
the same rollouts and trains the same model (up to the order of sums): PPO is keyed alike on any count.
With `rl.distributed.strategy: fsdp` the policy and the value model are sharded over the processes
(`modeling.sharding`), the frozen reference and reward model too unless `rl.distributed.frozen: replicate`.
Checkpoints go through torch.distributed.checkpoint, so a run resumes on any number of processes, sharded or not.
"""

from __future__ import annotations

import json
import logging
import random
import resource
import shutil
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from rlhf_pipeline.stages.core.config import PPOConfig
from rlhf_pipeline.stages.core.progress import report_metrics, report_progress
from rlhf_pipeline.stages.data.rows import load_rows
from rlhf_pipeline.stages.modeling.chat_template import fitting_prompts
from rlhf_pipeline.stages.modeling.data_parallel import join_processes
from rlhf_pipeline.stages.modeling.loading import (
    autocast,
    disable_dropout,
    load_policy,
    load_scorer,
    load_tokenizer,
    weights_unread,
)
from rlhf_pipeline.stages.modeling.lora import (
    AdapterBase,
    artifact_base,
    quantization_config,
    with_adapter,
)
from rlhf_pipeline.stages.modeling.saving import save_model
from rlhf_pipeline.stages.modeling.sharding import (
    full_state_dict,
    load_sharded,
    load_state,
    save_state,
    training_state_bytes,
)
from rlhf_pipeline.stages.modeling.stage_context import StageContext
from rlhf_pipeline.stages.modeling.threads import take_cpu_share
from rlhf_pipeline.stages.modeling.tracking import trackers
from rlhf_pipeline.stages.rlhf import ppo_math
from rlhf_pipeline.stages.rlhf.reward_signal import load_reward_model
from rlhf_pipeline.stages.rlhf.rollout import (
    Rollout,
    TopK,
    decode_responses,
    prompt_seeds,
    reference_logprobs,
    response_logprobs,
    sample,
    token_values,
)
from rlhf_pipeline.stages.rlhf.scoring import rollout_scores

log = logging.getLogger("rlhf.stage")

PHASES = ("generation", "scoring", "reference_values", "optimization")
SAMPLES_EVERY = 10  # steps between the rollouts kept in the artifact's ppo_samples.jsonl (and the last one)
CHECKPOINT_STATE = "trained"  # a checkpoint's models and optimizer, in torch.distributed.checkpoint's format


class PhaseTimer:
    """Seconds spent in each phase of a PPO step (CUDA work is waited for at each phase's end), so that users
    tune what dominates: generation, in every published RLHF system."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.totals = dict.fromkeys(PHASES, 0.0)

    @contextmanager
    def phase(self, name: str):
        started = time.perf_counter()
        try:
            yield
        finally:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.totals[name] += time.perf_counter() - started

    def seconds(self) -> dict[str, float]:
        return {f"{name}_seconds": value for name, value in self.totals.items()}


class PPOTrainer:
    def __init__(self, ctx: StageContext, config: PPOConfig) -> None:
        self.ctx = ctx
        self.config = config
        self.sft_dir, self.reward_dir = str(ctx.inputs["sft"]), str(ctx.inputs["reward"])
        self.processes = join_processes(ctx.device, ctx.collective_timeout)
        distributed = ctx.config.rl.distributed
        self.sharded = distributed.strategy == "fsdp" and self.processes.count > 1
        self.tokenizer = load_tokenizer(self.sft_dir)
        self.prompts, self.prompts_too_long = fitting_prompts(
            self.tokenizer,
            [row["prompt"] for row in load_rows(ctx.inputs["prepare"] / "prompt_train.jsonl")],
            ctx.config.model.max_length - config.generation.max_new_tokens,
        )
        self.quantization = quantization_config(config.lora, ctx.device, "rl.ppo")
        self.history: list[dict[str, float]] = []
        self.samples: list[dict[str, Any]] = []  # what the policy answered, every SAMPLES_EVERY steps
        # Seconds to save and to load checkpoints, the store's transfers aside.
        self.checkpoint_seconds = {"checkpoint_save_seconds": 0.0, "checkpoint_load_seconds": 0.0}
        self.start = ctx.checkpoints.restore_latest(self.restore_dir, self.processes) or 0
        if self.start:
            self.load_checkpoint(self.restore_dir(self.start))
        else:
            self.build_trainable()
        shard_frozen = self.sharded and distributed.frozen == "shard"
        self.reference = None
        if config.lora is None:
            self.reference = self.load(lambda device: load_policy(self.sft_dir, device), shard_frozen)
            self.reference.eval().requires_grad_(False)
        pad = self.tokenizer.pad_token_id
        self.reward_model = self.load(lambda device: load_reward_model(self.reward_dir, device, pad), shard_frozen)
        self.reward_model.requires_grad_(False)

    def build_trainable(self) -> None:
        """Policy (from SFT), value model (from the reward model), LoRA adapters on them where configured, and
        their optimizer; sharded if so configured. Full fine-tuning trains fp32 master weights; dropout is off."""
        self.policy = self.load(self.policy_for_training, self.sharded)
        self.value_model = self.load(self.value_model_for_training, self.sharded)
        for model in (self.policy, self.value_model):
            disable_dropout(model)
            if self.config.gradient_checkpointing:
                enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
                enable({"use_reentrant": False})
        self.optimizer = torch.optim.AdamW(self.trainable_parameters(), lr=self.config.learning_rate, eps=1e-5)

    def policy_for_training(self, device: torch.device) -> torch.nn.Module:
        lora = self.config.lora
        if lora is None:
            return load_policy(self.sft_dir, device, train=True)
        return with_adapter(load_policy(self.sft_dir, device, self.quantization), lora)

    def value_model_for_training(self, device: torch.device) -> torch.nn.Module:
        lora, pad = self.config.lora, self.tokenizer.pad_token_id
        if lora is None:
            return load_scorer(self.reward_dir, device, pad, train=True)
        return with_adapter(load_scorer(self.reward_dir, device, pad, self.quantization), lora, "SEQ_CLS")

    def load(self, load: Callable[[torch.device], torch.nn.Module], sharded: bool) -> torch.nn.Module:
        """The model `load` gives on this process's device, sharded straight away if `sharded`."""
        if sharded:
            return load_sharded(load, self.ctx.device, self.processes)
        return load(self.ctx.device)

    def trained_models(self) -> torch.nn.ModuleDict:
        return torch.nn.ModuleDict({"policy": self.policy, "value": self.value_model})

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for model in (self.policy, self.value_model) for p in model.parameters() if p.requires_grad]

    def policy_logprobs(self, rollout: Rollout) -> tuple[torch.Tensor, torch.Tensor | None]:
        """log-probabilities of the distribution that was sampled (minimum length, temperature and top-k
        applied), and the top-k token ids they are renormalised over."""
        return response_logprobs(self.policy, rollout, self.config.generation)

    def reference_logprobs(self, rollout: Rollout, support: TopK | None) -> torch.Tensor:
        """The SFT model's distribution over the same top-k tokens as the policy's: the KL penalty measures how
        far the policy moved, and is 0 on the first rollout."""
        generation = self.config.generation
        if self.reference is not None:
            return reference_logprobs(self.reference, rollout, generation, support)
        with self.policy.disable_adapter():
            return reference_logprobs(self.policy, rollout, generation, support)

    def prompts_for_step(self, step: int) -> list[list[dict[str, str]]]:
        """Deterministic per step, so that a resumed run sees the same data it would have seen."""
        rng = random.Random(f"{self.ctx.config.run.seed}-ppo-{step}")
        if len(self.prompts) >= self.config.batch_size:
            return rng.sample(self.prompts, self.config.batch_size)
        return rng.choices(self.prompts, k=self.config.batch_size)

    @torch.no_grad()
    def rollout(self, step: int, timer: PhaseTimer) -> tuple[Rollout, dict[str, torch.Tensor], dict[str, float]]:
        """The step's rollouts and everything PPO needs of them, for the whole batch: this process generates
        and scores its share of the prompts, and the shares are gathered."""
        self.policy.eval()
        self.value_model.eval()
        device, max_length, shares = self.ctx.device, self.ctx.config.model.max_length, self.processes
        prompts = self.prompts_for_step(step)
        seeds = prompt_seeds(self.ctx.config.run.seed, f"ppo-step-{step}", range(len(prompts)))
        mine = shares.share(len(prompts))
        with timer.phase("generation"), autocast(device):
            sampled = sample(
                self.policy,
                self.tokenizer,
                [prompts[i] for i in mine],
                self.config.generation,
                [seeds[i] for i in mine],
                max_length,
            )
        rows = shares.gather_objects(sampled.rows())
        rollout = Rollout.from_rows(prompts, rows, sampled.end_ids, self.tokenizer.pad_token_id, device)
        part = rollout.select(torch.tensor(mine, device=device))
        with timer.phase("scoring"), autocast(device):
            scores = rollout_scores(self.reward_model, self.tokenizer, part)
        with timer.phase("reference_values"), autocast(device):
            logprobs, support = self.policy_logprobs(part)
            ref_logprobs = self.reference_logprobs(part, support)
            values = token_values(self.value_model, part)
        scores, logprobs, ref_logprobs, values = map(shares.gather_rows, (scores, logprobs, ref_logprobs, values))
        if self.config.missing_eos_penalty is not None:
            scores = scores - self.config.missing_eos_penalty * (~rollout.finished).float()
        mask = rollout.response_mask.float()
        rewards, kl = ppo_math.kl_penalized_rewards(logprobs, ref_logprobs, scores, mask, self.config.kl_coef)
        advantages, returns = ppo_math.generalized_advantages(rewards, values, mask, self.config.gamma, self.config.lam)
        batch = {
            "logprobs": logprobs,
            "values": values,
            "advantages": ppo_math.masked_whiten(advantages, mask),
            "returns": returns,
            "mask": mask,
            "scores": scores,
        }
        stats = {
            "tokens": rollout.input_ids.numel(),
            "score": scores.mean().item(),
            "kl": kl.sum(dim=1).mean().item(),
            "response_length": mask.sum(dim=1).mean().item(),
            "finished_fraction": rollout.finished.float().mean().item(),
        }
        return rollout, batch, stats

    def mini_batches(self, step: int) -> list[torch.Tensor]:
        """The rows of each mini-batch of every epoch: shuffled by a generator seeded by the step, the same in
        every process and in a resumed run."""
        config, generator = self.config, torch.Generator()
        generator.manual_seed(random.Random(f"{self.ctx.config.run.seed}-ppo-order-{step}").getrandbits(63))
        batches = []
        for _ in range(config.ppo_epochs):
            order = torch.randperm(config.batch_size, generator=generator)
            batches += list(order.split(config.mini_batch_size))
        return batches

    def optimize(
        self, step: int, rollout: Rollout, batch: dict[str, torch.Tensor], timer: PhaseTimer
    ) -> dict[str, float]:
        """`ppo_epochs` passes of clipped updates over shuffled mini-batches; each process computes its share of
        a mini-batch's rows, with the losses averaged over the whole mini-batch's tokens and the gradients
        summed. The first mini-batch of the first epoch sees the very model that sampled (dropout is off): its
        ratio is 1 and its approximate KL 0, which `first_ratio_error` and `first_approx_kl` report."""
        self.policy.train()
        self.value_model.train()
        config, shares = self.config, self.processes
        names = ("policy_loss", "value_loss", "clip_fraction", "approx_kl")
        totals = dict.fromkeys(names, 0.0)
        first: dict[str, float] = {}
        updates = 0
        with timer.phase("optimization"):
            for rows in self.mini_batches(step):
                tokens = batch["mask"][rows].sum()  # the whole mini-batch's: every loss is a mean over them
                mine = shares.share(len(rows))
                index = rows[mine.start : mine.stop].to(rollout.response_ids.device)
                mini = rollout.select(index)
                mask = batch["mask"][index]
                with autocast(self.ctx.device):
                    logprobs = self.policy_logprobs(mini)[0]
                    values = token_values(self.value_model, mini)
                old_logprobs = batch["logprobs"][index]
                policy_loss, clip_fraction = ppo_math.clipped_policy_loss(
                    logprobs, old_logprobs, batch["advantages"][index], mask, config.clip_range, tokens
                )
                value_loss = ppo_math.clipped_value_loss(
                    values, batch["values"][index], batch["returns"][index], mask, config.clip_range_value, tokens
                )
                approx_kl = ppo_math.approx_kl(logprobs.detach(), old_logprobs, mask, tokens)
                losses = (policy_loss, value_loss, clip_fraction, approx_kl)
                parts = shares.sum({name: value.item() for name, value in zip(names, losses, strict=True)})
                if not first:
                    ratio = torch.exp(logprobs.detach() - old_logprobs)
                    error = shares.max({"first_ratio_error": ((ratio - 1).abs() * mask).max().item()})
                    first = error | {"first_approx_kl": parts["approx_kl"]}
                self.optimizer.zero_grad()
                (policy_loss + config.vf_coef * value_loss).backward()
                if not self.sharded:  # sharded models' gradients are summed by FSDP
                    shares.sum_gradients(self.trainable_parameters())
                torch.nn.utils.clip_grad_norm_(self.trainable_parameters(), max_norm=1.0)
                self.optimizer.step()
                for name in names:
                    totals[name] += parts[name]
                updates += 1
        return {name: total / updates for name, total in totals.items()} | first

    def keep_samples(self, step: int, rollout: Rollout, scores: torch.Tensor) -> None:
        responses = decode_responses(self.tokenizer, rollout)
        self.samples += [
            {"step": step + 1, "prompt": prompt, "response": response, "score": round(score, 5)}
            for prompt, response, score in zip(rollout.prompts, responses, scores.tolist(), strict=True)
        ]

    def save_checkpoint(self, step: int) -> None:
        """The trained weights (LoRA: the adapters) and the optimizer through torch.distributed.checkpoint, each
        process writing its shards (or its part of the replicas), which any number of processes, sharded or
        not, can load."""
        local = self.ctx.work_dir / f"ppo-checkpoint-{step}"
        local.mkdir()
        started = time.perf_counter()
        save_state(self.trained_models(), self.optimizer, local / CHECKPOINT_STATE)
        self.checkpoint_seconds["checkpoint_save_seconds"] += time.perf_counter() - started
        if self.processes.main:
            (local / "history.json").write_text(json.dumps(self.history))
            (local / "samples.json").write_text(json.dumps(self.samples))
        self.ctx.checkpoints.save(step, local, self.processes)
        shutil.rmtree(local)  # in the store now: the local copy would only fill the disk

    def restore_dir(self, step: int) -> Path:
        return self.ctx.work_dir / f"ppo-restore-{step}"

    def load_checkpoint(self, local: Path) -> None:
        started = time.perf_counter()
        self.build_trainable()
        load_state(self.trained_models(), self.optimizer, local / CHECKPOINT_STATE)
        self.checkpoint_seconds["checkpoint_load_seconds"] = time.perf_counter() - started
        self.history = json.loads((local / "history.json").read_text())
        self.samples = json.loads((local / "samples.json").read_text())

    def publish(self, out_dir: Path) -> None:
        """The trained policy as one ordinary model (or its adapter, where kept), saved by the main process. A
        sharded policy is gathered whole into the main process first, into a copy built on the meta device."""
        policy = self.policy
        if self.sharded:
            weights = full_state_dict(self.policy)
            if self.processes.main:
                with weights_unread():
                    policy = self.policy_for_training(torch.device("cpu"))
                policy.load_state_dict(weights, assign=True)
        if self.processes.main:
            base = AdapterBase(self.sft_dir, artifact_base("sft"))
            save_model(policy, self.tokenizer, out_dir, self.config.lora, base)

    def memory(self) -> dict[str, int]:
        """Bytes of the trained state one process holds (parameters, gradients, optimizer state; the most any
        process holds, as shards differ by rounding) and the largest resident memory any process reached, and
        with several processes that of the main one apart: it alone reads whole weights from disk."""
        held = self.processes.max(training_state_bytes([self.policy, self.value_model], self.optimizer))
        peaks = self.processes.gather_objects([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024])  # KiB
        apart = {"main_process": peaks[0], "other_processes": max(peaks[1:])} if len(peaks) > 1 else {}
        return (
            {f"{name}_per_process": int(value) for name, value in held.items()}
            | {"peak_rss_bytes_per_process": max(peaks)}
            | {f"peak_rss_bytes_{name}": value for name, value in apart.items()}
        )

    def train(self) -> None:
        if self.start:
            self.ctx.resumed_from = self.start
            log.info("rl: resuming PPO from step %d", self.start)
        every = self.ctx.config.run.checkpoint_every
        with trackers(self.ctx) as log_metrics:
            for step in range(self.start, self.config.steps):
                take_cpu_share()
                started = time.perf_counter()
                timer = PhaseTimer(self.ctx.device)
                rollout, batch, stats = self.rollout(step, timer)
                if step % SAMPLES_EVERY == 0 or step + 1 == self.config.steps:
                    self.keep_samples(step, rollout, batch["scores"])
                stats |= self.optimize(step, rollout, batch, timer) | timer.seconds()
                stats["seconds"] = time.perf_counter() - started
                self.history.append({"step": step + 1, **{k: round(v, 5) for k, v in stats.items()}})
                throughput = {"tokens_per_second": stats["tokens"] / stats["seconds"]}
                report_progress("rl", step + 1, self.config.steps)
                report_metrics("rl", step + 1, self.history[-1] | throughput)
                log_metrics(stats | throughput, step + 1)
                if self.processes.main and (step % 10 == 0 or step + 1 == self.config.steps):
                    log.info("rl: step %d/%d %s", step + 1, self.config.steps, self.history[-1])
                if (step + 1) % every == 0 and step + 1 < self.config.steps:
                    self.save_checkpoint(step + 1)


def run(ctx: StageContext) -> dict[str, Any]:
    trainer = PPOTrainer(ctx, ctx.config.rl.ppo)
    trainer.train()
    memory = trainer.memory()
    trainer.publish(ctx.out_dir)
    # Wall-clock seconds differ from run to run: they go to logs/ (left out of the digest), not into the record
    # of what was trained, so that a resumed run's artifact has the digest of an uninterrupted one.
    timeless = [{k: v for k, v in h.items() if not k.endswith("seconds")} for h in trainer.history]
    write_history(ctx.out_dir / "ppo_history.jsonl", timeless)
    write_history(ctx.out_dir / "ppo_samples.jsonl", trainer.samples)
    throughput = {
        "train_tokens": sum(h["tokens"] for h in trainer.history),
        "train_seconds": round(sum(h["seconds"] for h in trainer.history), 2),
    }
    phases = {f"{p}_seconds": round(sum(h[f"{p}_seconds"] for h in trainer.history), 2) for p in PHASES}
    keys = ("score", "kl", "response_length", "policy_loss", "value_loss", "finished_fraction")
    first = trainer.history[0] if trainer.history else {}
    checks = {key: first[key] for key in ("first_ratio_error", "first_approx_kl") if key in first}
    processes = {"processes": trainer.processes.count} if trainer.processes.count > 1 else {}
    checkpoints = {name: round(seconds, 2) for name, seconds in trainer.checkpoint_seconds.items() if seconds}
    summary = summarize(trainer.history, keys) | {"prompts_too_long": trainer.prompts_too_long}
    return summary | throughput | phases | checks | processes | memory | checkpoints


def write_history(path: Path, history: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(entry) + "\n" for entry in history))


def summarize(history: list[dict[str, float]], keys: tuple[str, ...]) -> dict[str, float]:
    """Mean of each key over the first and the last tenth of training: the direction things moved."""
    window = max(1, len(history) // 10)
    summary: dict[str, float] = {"steps": len(history)}
    for key in keys:
        summary[f"first_{key}"] = round(sum(h[key] for h in history[:window]) / window, 4)
        summary[f"last_{key}"] = round(sum(h[key] for h in history[-window:]) / window, 4)
    return summary
