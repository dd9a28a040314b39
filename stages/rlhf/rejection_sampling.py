"""Rejection sampling fine-tuning, Llama 2 style: per round, sample N responses per prompt from the policy,
score them with the reward model, keep the best per prompt and fine-tune the policy on those.

Each finished round is a checkpoint in the store; a retried stage resumes after the last finished round.
On several processes each samples and scores its share of a round's prompts, and the fine-tuning is TRL's
data-parallel SFTTrainer with `training.batch_size` rows per step over all processes (each its share, the loss
normalized by the whole step's tokens; an epoch's short last batch left out): any number of processes trains
what one does, up to float rounding.
With LoRA (`training.lora`) one adapter on the SFT model trains through all rounds; each round's checkpoint is
just that adapter. With `rl.distributed.strategy: fsdp` the policy is sharded as it loads, for sampling and for
fine-tuning (`modeling.trainer`), and so is the reward model unless `rl.distributed.frozen: replicate`; every
process then generates and scores as many batches as the one with the most, since each forward pass of a
sharded model gathers weights from all of them.
"""

from __future__ import annotations

import logging
import random
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from transformers import PreTrainedModel
from trl import SFTConfig, SFTTrainer

from rlhf_pipeline.stages.core.progress import report_metrics, report_progress
from rlhf_pipeline.stages.data.rows import load_rows
from rlhf_pipeline.stages.modeling.chat_template import fitting_prompts
from rlhf_pipeline.stages.modeling.data_parallel import Processes, stage_processes
from rlhf_pipeline.stages.modeling.loading import load_policy, load_tokenizer, merged_adapter
from rlhf_pipeline.stages.modeling.lora import (
    AdapterBase,
    artifact_base,
    quantization_config,
    resume_adapter,
    with_adapter,
)
from rlhf_pipeline.stages.modeling.saving import save_adapter, save_model
from rlhf_pipeline.stages.modeling.sharding import frozen_bytes
from rlhf_pipeline.stages.modeling.stage_context import StageContext
from rlhf_pipeline.stages.modeling.threads import take_cpu_share
from rlhf_pipeline.stages.modeling.tracking import trackers
from rlhf_pipeline.stages.modeling.trainer import frozen_shards, model_shards, training_arguments
from rlhf_pipeline.stages.rlhf.ppo import summarize, write_history
from rlhf_pipeline.stages.rlhf.reward_signal import load_reward_model
from rlhf_pipeline.stages.rlhf.rollout import decode_responses, prompt_seeds, sample
from rlhf_pipeline.stages.rlhf.scoring import rollout_scores

log = logging.getLogger("rlhf.stage")


ROLLOUT_BATCH = 64


def load_round_policy(ctx: StageContext, round_dir: Path | None, trainable: bool, shards: int = 1) -> PreTrainedModel:
    """The policy after the round saved in `round_dir` (before the first round: the SFT model), sharded over
    `shards` processes. Without LoRA a round saves the whole model; with LoRA, the adapter that goes on the SFT
    model: merged into it to sample, unless the SFT model is sharded (peft does not merge into shards)."""
    lora = ctx.config.rl.rejection_sampling.training.lora
    sft_dir = str(ctx.inputs["sft"])
    if lora is None:
        return load_policy(str(round_dir or sft_dir), ctx.device, train=trainable, shards=shards)
    field = "rl.rejection_sampling.training"
    quantization = quantization_config(lora, ctx.device, field) if trainable else None
    model = load_policy(sft_dir, ctx.device, quantization, shards=shards)
    if round_dir is None:
        return with_adapter(model, lora) if trainable else model
    if trainable or shards > 1:
        return resume_adapter(model, round_dir)
    return merged_adapter(model, str(round_dir))


@dataclass(frozen=True)
class BestAnswer:
    """The kept answer, as text and as the very tokens sampled: the prompt's (as the policy saw it) and the
    response's, through its end-of-turn token if it ended its turn."""

    prompt: list[dict[str, str]]
    response: str
    finished: bool
    score: float
    prompt_ids: list[int]
    response_ids: list[int]

    def as_sft_row(self) -> dict[str, Any]:
        """The sampled tokens, the response's the only ones trained on. Not the text through the chat template
        again: that would end every answer's turn, also where sampling cut it at `max_new_tokens` (teaching the
        policy to stop mid-sentence), and a real tokenizer does not always give back the tokens it decoded."""
        return {
            "input_ids": self.prompt_ids + self.response_ids,
            "completion_mask": [0] * len(self.prompt_ids) + [1] * len(self.response_ids),
        }


def best_of_n(
    ctx: StageContext,
    round_dir: Path | None,
    prompts: list,
    round_index: int,
    processes: Processes,
    shards: int = 1,
    frozen: int = 1,
) -> tuple[list[BestAnswer], dict]:
    """The reward model's favourite of `samples_per_prompt` responses to each prompt, for all prompts: each
    process answers its share of them and the shares are gathered. Every answer is sampled from its own seed
    (the run's seed, the round, the prompt's place in the round, the answer's number), not from what the rounds
    before left in an RNG: a resumed run, and any number of processes, sample what one uninterrupted process
    samples."""
    config = ctx.config.rl.rejection_sampling
    tokenizer = load_tokenizer(str(ctx.inputs["sft"]))
    policy = load_round_policy(ctx, round_dir, trainable=False, shards=shards).eval()
    reward_model = load_reward_model(str(ctx.inputs["reward"]), ctx.device, tokenizer.pad_token_id, frozen)
    n = config.samples_per_prompt
    seeds = prompt_seeds(ctx.config.run.seed, f"rejection-round-{round_index}", range(len(prompts) * n))
    per_batch = max(1, ROLLOUT_BATCH // n)
    max_length = ctx.config.model.max_length
    mine = processes.share(len(prompts))
    starts = range(mine.start, mine.stop, per_batch)
    if shards > 1:  # a share one batch short still joins the others' last batch, with one prompt's answers
        batches = int(processes.max({"batches": len(starts)})["batches"])
        for _ in range(batches - len(starts)):
            filler = sample(policy, tokenizer, prompts[:1] * n, config.generation, seeds[:n], max_length)
            rollout_scores(reward_model, tokenizer, filler)
    kept, mean_scores = [], []
    for start in starts:
        chunk = prompts[start : min(start + per_batch, mine.stop)]
        answers = [p for p in chunk for _ in range(n)]
        chunk_seeds = seeds[start * n : start * n + len(answers)]
        rollout = sample(policy, tokenizer, answers, config.generation, chunk_seeds, max_length)
        scores = rollout_scores(reward_model, tokenizer, rollout).view(len(chunk), n)
        best_scores, best = scores.max(dim=1)
        chosen = rollout.select(best + torch.arange(len(chunk), device=best.device) * n)
        texts, tokens = decode_responses(tokenizer, chosen), chosen.rows()
        for prompt, text, score, (prompt_ids, response_ids, done) in zip(
            chunk, texts, best_scores.tolist(), tokens, strict=True
        ):
            kept.append(BestAnswer(prompt, text, done, score, prompt_ids, response_ids))
        mean_scores += scores.mean(dim=1).tolist()
    kept, mean_scores = processes.gather_objects(kept), processes.gather_objects(mean_scores)
    stats = {
        "score": sum(mean_scores) / len(mean_scores),
        "best_score": sum(answer.score for answer in kept) / len(kept),
        "best_finished_fraction": sum(answer.finished for answer in kept) / len(kept),
        "frozen_bytes": frozen_bytes([reward_model]),
    }
    return kept, stats


def fine_tune(
    ctx: StageContext,
    round_dir: Path | None,
    rows: list,
    out_dir: Path,
    round_index: int,
    processes: Processes,
    shards: int,
) -> None:
    """One round's fine-tuning on the best answers (TRL's SFTTrainer: data-parallel on several processes, each
    a share of every step's batch; the step's consecutive shares are the one-process batch);
    the main process saves the round's policy in `out_dir` (transformers saves from rank 0 only)."""
    config = ctx.config.rl.rejection_sampling.training
    arguments = training_arguments(ctx, config, ctx.work_dir / f"trainer-round-{round_index}", shards)
    share = config.batch_size // processes.count  # the config divides it (PipelineConfig)
    arguments |= {"per_device_train_batch_size": share, "average_tokens_across_devices": True}
    # A short last batch is left out of each epoch: accelerate would fill every process's share of it with
    # rows from the epoch's start, training them twice on several processes and once on one.
    arguments |= {"dataloader_drop_last": True}
    # The rounds' metrics reach the trackers from `run`, one step per round; each round's Trainer restarting at
    # step 0 in the same tracker run would garble them.
    arguments |= {"save_strategy": "no", "seed": ctx.config.run.seed + round_index, "report_to": "none"}
    trainer = SFTTrainer(
        model=load_round_policy(ctx, round_dir, trainable=True, shards=shards),
        args=SFTConfig(completion_only_loss=True, **arguments),
        train_dataset=Dataset.from_list(rows),
        processing_class=load_tokenizer(str(ctx.inputs["sft"])),
    )
    trainer.train()
    if ctx.config.rl.rejection_sampling.training.lora is None:
        trainer.save_model(str(out_dir))  # a sharded model is gathered into the main process
    elif processes.main:
        save_adapter(trainer.model, out_dir)
    trainer.processing_class.save_pretrained(out_dir)


def save_final(ctx: StageContext, round_dir: Path) -> None:
    lora = ctx.config.rl.rejection_sampling.training.lora
    if lora is None:
        shutil.copytree(round_dir, ctx.out_dir, dirs_exist_ok=True)
        return
    sft_dir = str(ctx.inputs["sft"])
    policy = load_round_policy(ctx, round_dir, trainable=True)
    save_model(policy, load_tokenizer(sft_dir), ctx.out_dir, lora, AdapterBase(sft_dir, artifact_base("sft")))
    shutil.copy(round_dir / "rounds.jsonl", ctx.out_dir)


def round_dir_of(ctx: StageContext) -> Callable[[int], Path]:
    """Where the policy after a round is kept in this process (each process has its own work directory)."""
    return lambda done: ctx.work_dir / f"round-{done}"


def run(ctx: StageContext) -> dict[str, Any]:
    config = ctx.config.rl.rejection_sampling
    processes = stage_processes()
    shards = model_shards(ctx, ctx.config.rl.distributed)  # joins their process group
    frozen = frozen_shards(shards, ctx.config.rl.distributed)
    held_frozen = 0
    prompts, too_long = fitting_prompts(
        load_tokenizer(str(ctx.inputs["sft"])),
        [row["prompt"] for row in load_rows(ctx.inputs["prepare"] / "prompt_train.jsonl")],
        ctx.config.model.max_length - config.generation.max_new_tokens,
    )
    round_dir: Path | None = None
    history: list[dict[str, float]] = []
    start = ctx.checkpoints.restore_latest(round_dir_of(ctx), processes) or 0
    if start:
        round_dir = round_dir_of(ctx)(start)
        history = load_rows(round_dir / "rounds.jsonl")
        ctx.resumed_from = start
        log.info("rl: resuming rejection sampling after round %d", start)
    with trackers(ctx) as log_metrics:
        for round_index in range(start, config.rounds):
            take_cpu_share()
            rng = random.Random(f"{ctx.config.run.seed}-rejection-{round_index}")
            chosen = rng.sample(prompts, min(config.prompts_per_round, len(prompts)))
            kept, stats = best_of_n(ctx, round_dir, chosen, round_index, processes, shards, frozen)
            held_frozen = stats.pop("frozen_bytes")
            out = round_dir_of(ctx)(round_index + 1)
            rows = [answer.as_sft_row() for answer in kept]
            fine_tune(ctx, round_dir, rows, out, round_index, processes, shards)
            history.append({"round": round_index + 1, **stats})
            report_progress("rl", round_index + 1, config.rounds)
            metrics = {**stats, "samples_kept": len(kept)}
            report_metrics("rl", round_index + 1, metrics)
            log_metrics(metrics, round_index + 1)
            write_history(out / "rounds.jsonl", history)
            if processes.main:
                log.info("rl: rejection sampling round %d/%d %s", round_index + 1, config.rounds, stats)
                ctx.checkpoints.save(round_index + 1, out)
            processes.wait_for_main()
            if not processes.main:  # the round's policy was saved by the main process: take it from the store
                shutil.rmtree(out)
                if ctx.checkpoints.restore_latest(round_dir_of(ctx)) != round_index + 1:
                    raise RuntimeError(f"rl: round {round_index + 1}'s checkpoint is not the newest in the store")
            if round_dir is not None:  # the round before, now in the store: only the newest is needed here
                shutil.rmtree(round_dir)
            round_dir = out
    if processes.main:
        save_final(ctx, round_dir)
    several = {"processes": processes.count} if processes.count > 1 else {}
    summary = summarize(history, ("score", "best_score", "best_finished_fraction"))
    summary |= {"kept_per_round": min(config.prompts_per_round, len(prompts)), "prompts_too_long": too_long}
    return summary | several | ({"frozen_bytes": held_frozen} if held_frozen else {})
