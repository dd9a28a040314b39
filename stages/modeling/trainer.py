"""What the Trainer-based stages share: TrainingArguments from the config, LoRA, checkpoints that go to the
store every `run.checkpoint_every` steps and come back when a stage is retried, and FSDP.

With `<stage>.distributed.strategy: fsdp` on several processes the trained model is sharded as it loads, by
transformers' own FSDP2 (`modeling.loading.place`), and the Trainer trains it as it is (no DDP around it).
transformers checkpoints only the gathered weights of such a model and cannot load them back into its shards,
so its weights, optimizer state and learning-rate schedule are checkpointed here, through
torch.distributed.checkpoint (`modeling.sharding`); the Trainer keeps its own state (step, data position)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.integrations import TensorBoardCallback

from rlhf_pipeline.stages.core.checkpoints import CheckpointStore
from rlhf_pipeline.stages.core.config import DistributedConfig, RLDistributedConfig, TrainingConfig
from rlhf_pipeline.stages.core.progress import report_metrics, report_progress
from rlhf_pipeline.stages.modeling.data_parallel import join_processes, stage_processes
from rlhf_pipeline.stages.modeling.loading import compute_dtype, save_merged_copies
from rlhf_pipeline.stages.modeling.lora import AdapterBase
from rlhf_pipeline.stages.modeling.saving import save_model
from rlhf_pipeline.stages.modeling.sharding import load_state, local_bytes, save_state, training_state_bytes
from rlhf_pipeline.stages.modeling.stage_context import StageContext
from rlhf_pipeline.stages.modeling.threads import take_cpu_share
from rlhf_pipeline.stages.modeling.tracking import logs_dir, report_to, run_name

log = logging.getLogger("rlhf.stage")


# transformers renamed TrainingArguments' gradient_checkpointing to activation_checkpointing (after 5.17).
CHECKPOINTING_ARGUMENT = next(
    name
    for name in ("activation_checkpointing", "gradient_checkpointing")
    if name in TrainingArguments.__dataclass_fields__
)


SHARDED_STATE = "sharded-state"  # in a checkpoint: the sharded model's weights and optimizer state
SCHEDULE_FILE = "lr-schedule.pt"


def model_shards(ctx: StageContext, distributed: DistributedConfig) -> int:
    """The processes a stage's trained model is sharded over: all of them with fsdp (the kept adapters among
    its inputs merged into whole copies first, for the model to load into its shards), else 1 (each process
    holds it whole, under DDP). Their process group is joined here, after the merging (`save_merged_copies`)
    and before accelerate would join it: with the stage's collective timeout, which accelerate leaves at
    torch's default on CPUs (TrainingArguments' `ddp_timeout` reaches GPU process groups only)."""
    processes = stage_processes()
    sharded = distributed.strategy == "fsdp" and processes.count > 1
    if sharded:
        save_merged_copies(ctx.inputs)
    join_processes(ctx.device, ctx.collective_timeout)
    return processes.count if sharded else 1


def frozen_shards(shards: int, distributed: RLDistributedConfig) -> int:
    """The processes the models that do not train (references, reward models) are sharded over: the trained
    model's, unless `frozen: replicate` (then each process holds them whole)."""
    return shards if distributed.frozen == "shard" else 1


def training_arguments(ctx: StageContext, config: TrainingConfig, output_dir: Path, shards: int = 1) -> dict[str, Any]:
    """Keyword arguments shared by TRL's trainer configs. Activation checkpointing is off unless configured
    (TRL turns it on by default). A sharded model's Trainer checkpoints only its weights
    (`ShardedTrainingState` the rest)."""
    run = ctx.config.run
    return {
        CHECKPOINTING_ARGUMENT: config.gradient_checkpointing,
        f"{CHECKPOINTING_ARGUMENT}_kwargs": {"use_reentrant": False},
        "output_dir": str(output_dir),
        "num_train_epochs": config.epochs,
        "max_steps": config.max_steps,
        "learning_rate": config.learning_rate,
        "per_device_train_batch_size": config.batch_size,
        "per_device_eval_batch_size": config.batch_size,
        "gradient_accumulation_steps": config.gradient_accumulation_steps,
        "warmup_steps": config.warmup,
        "logging_steps": config.logging_steps,
        "save_strategy": "steps",
        "save_steps": run.checkpoint_every,
        "save_total_limit": run.keep_checkpoints,
        "save_only_model": shards > 1,
        "seed": run.seed,
        # Mixed precision: bf16 autocast over the fp32 weights the stages load for training.
        "bf16": compute_dtype(ctx.device) == torch.bfloat16,
        "use_cpu": ctx.device.type == "cpu",
        "report_to": report_to(ctx),
        "run_name": run_name(ctx),
        "include_num_input_tokens_seen": "all",
        "disable_tqdm": True,
        "max_length": ctx.config.model.max_length,
    }


class ResumesShardedModels:
    """Mixed into a Trainer class, for a model sharded as it loaded: a checkpoint holds its sharded state
    (`ShardedTrainingState` writes and loads it), not the Trainer's gathered copy of its weights, which resume
    could not load into the shards (whole tensors into shards) and which would only write the weights twice;
    and each process's RNG states, which `save_only_model` leaves out and dropout draws from."""

    def _save_checkpoint(self, model, trial) -> None:
        super()._save_checkpoint(model, trial)
        if self.is_distributed_loading_by_transformers:  # the Trainer loads them back itself
            self._save_rng_state(str(Path(self.args.output_dir) / f"checkpoint-{self.state.global_step}"))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        if not self.is_distributed_loading_by_transformers:
            super()._load_from_checkpoint(resume_from_checkpoint, model)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        if _internal_call and self.is_distributed_loading_by_transformers:  # a checkpoint's
            Path(output_dir or self.args.output_dir).mkdir(parents=True, exist_ok=True)
            return
        super().save_model(output_dir, _internal_call)


class ShardedTrainingState(TrainerCallback):
    """A sharded model's weights and optimizer state (each process its shards) and the learning-rate schedule,
    into each checkpoint the Trainer saves, and back from `resume_from` when training begins (on any number
    of processes: torch.distributed.checkpoint re-shards)."""

    def __init__(self, resume_from: Path | None) -> None:
        self.resume_from = resume_from

    def on_save(self, args, state, control, model=None, optimizer=None, lr_scheduler=None, **kwargs):
        directory = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        save_state(torch.nn.ModuleDict({"model": model}), optimizer, directory / SHARDED_STATE)
        if state.is_world_process_zero:
            torch.save(lr_scheduler.state_dict(), directory / SCHEDULE_FILE)

    def on_train_begin(self, args, state, control, model=None, optimizer=None, lr_scheduler=None, **kwargs):
        if self.resume_from is not None:
            load_state(torch.nn.ModuleDict({"model": model}), optimizer, self.resume_from / SHARDED_STATE)
            lr_scheduler.load_state_dict(torch.load(self.resume_from / SCHEDULE_FILE, weights_only=True))


class StoreCheckpoints(TrainerCallback):
    """Mirror each checkpoint the Trainer saves (weights, optimizer, scheduler, RNG, step) into the store. Of
    several processes each writes a part (the main one the model, every one its RNG state, or its shards),
    in its own work directory, wherever it runs: the checkpoint is their union."""

    def __init__(self, checkpoints: CheckpointStore) -> None:
        self.checkpoints = checkpoints

    def on_save(self, args, state, control, **kwargs):
        local = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        self.checkpoints.save(state.global_step, local, stage_processes())


class ReportProgress(TrainerCallback):
    """A Trainer's steps (each whole percent) and logged metrics, from the main process only."""

    def __init__(self, stage: str) -> None:
        self.stage = stage
        self.percent = -1

    def on_step_end(self, args, state, control, **kwargs):
        percent = int(100 * state.global_step / max(state.max_steps, 1))
        if state.is_world_process_zero and percent > self.percent:
            self.percent = percent
            report_progress(self.stage, state.global_step, state.max_steps)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            report_metrics(self.stage, state.global_step, logs)


class TakeCpuShare(TrainerCallback):
    """The compute threads kept at this process's share of the machine as the Trainer steps (`modeling.threads`)."""

    def on_step_begin(self, args, state, control, **kwargs):
        take_cpu_share()


def log_tensorboard_into(trainer: Trainer, directory: Path) -> None:
    """Point the Trainer's TensorBoard callback (if `report_to` made one) at `directory`: transformers 5 has no
    `logging_dir` argument, only TENSORBOARD_LOGGING_DIR read when the callback is made, and defaults to the
    Trainer's output_dir, which is not part of the artifact."""
    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, TensorBoardCallback):
            callback.logging_dir = str(directory)


def train_with_resume(
    trainer: Trainer, ctx: StageContext, checkpoints: CheckpointStore | None = None, out_dir: Path | None = None
) -> None:
    """Train, resuming from the newest complete checkpoint in the store if there is one; TensorBoard logs go
    into the artifact (`out_dir`: where the model is saved, if not `ctx.out_dir`)."""
    checkpoints = checkpoints or ctx.checkpoints
    log_tensorboard_into(trainer, logs_dir(ctx, out_dir))
    output_dir = Path(trainer.args.output_dir)
    step = checkpoints.restore_latest(lambda step: output_dir / f"checkpoint-{step}", stage_processes())
    resume_from = None
    if step is not None:
        ctx.resumed_from = step
        resume_from = output_dir / f"checkpoint-{step}"
        log.info("%s: resuming from checkpoint at step %d", ctx.stage, step)
    if trainer.is_distributed_loading_by_transformers:
        trainer.add_callback(ShardedTrainingState(resume_from))  # written before the checkpoint is stored
    trainer.add_callback(StoreCheckpoints(checkpoints))
    trainer.add_callback(ReportProgress(ctx.stage))
    trainer.add_callback(TakeCpuShare())
    trainer.train(resume_from_checkpoint=resume_from and str(resume_from))


def save_trained(trainer: Trainer, config: TrainingConfig, base: AdapterBase, out_dir: Path) -> None:
    """The trained model and tokenizer: full, LoRA merged, or the adapter kept (`config.lora.merge`)."""
    save_model(trainer.model, trainer.processing_class, out_dir, config.lora, base)


def training_summary(trainer: Trainer, key: str = "loss") -> dict[str, float]:
    """First and last logged training loss (the numbers that show whether training worked), the step count,
    and the tokens trained on (padding included: what the FLOPs were spent on) with the training time."""
    history = trainer.state.log_history
    losses = [entry[key] for entry in history if key in entry]
    runtime = next((entry["train_runtime"] for entry in reversed(history) if "train_runtime" in entry), None)
    summary = {"steps": trainer.state.global_step, "train_tokens": int(trainer.state.num_input_tokens_seen)}
    if runtime is not None:
        summary["train_seconds"] = round(runtime, 2)
    if trainer.args.world_size > 1:
        summary["processes"] = trainer.args.world_size
    held = training_state_bytes([trainer.model], trainer.optimizer)  # the main process's (sharded: its shards)
    summary |= {name: held[name] for name in ("parameter_bytes", "optimizer_bytes")}
    if frozen := local_bytes([p for p in trainer.model.parameters() if not p.requires_grad]):
        summary["frozen_bytes"] = frozen  # a LoRA run's base
    if losses:
        summary |= {f"first_{key}": round(losses[0], 4), f"last_{key}": round(losses[-1], 4)}
    return summary


def train_evaluate_save(
    trainer: Trainer,
    ctx: StageContext,
    config: TrainingConfig,
    base: AdapterBase,
    reported: dict[str, str],
    out_dir: Path | None = None,
    checkpoints: CheckpointStore | None = None,
    measure: Callable[[Trainer], dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Train (resuming if a checkpoint exists), evaluate on the held-out set and save the model.

    Returns the loss curve, the step count, the evaluation metrics named in `reported` ({name: key}) and
    what `measure` finds on the trained model before it is saved.
    """
    train_with_resume(trainer, ctx, checkpoints, out_dir)
    evaluation = trainer.evaluate()
    held_out = {name: round(evaluation[key], 4) for name, key in reported.items()}
    if measure is not None:
        held_out |= measure(trainer)
    summary = training_summary(trainer)  # before saving, which merges a LoRA adapter into the model
    save_trained(trainer, config, base, out_dir or ctx.out_dir)
    return summary | held_out
