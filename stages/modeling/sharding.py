"""FSDP2 (`fully_shard`) for the hand-written loops (PPO): each process keeps 1/N of every sharded model's
parameters, gradients and optimizer state, and gathers a layer's weights only while it computes with them.

Each transformer block (the classes a model names in `_no_split_modules`) is its own shard group, as the HF
Trainer's FSDP2 auto-wrap does; so is each top part of the model (backbone, head) unless they share weights
(tied embeddings), since PPO calls a value model's backbone and head on their own; the model is the outer group.
Gradients are summed, not averaged: PPO's losses are
each process's part of the whole mini-batch's mean (`modeling.data_parallel`), so the sum is the one-process
gradient. Checkpoints go through torch.distributed.checkpoint (each process writes its shards, a resumed run
reads them back into its own, on any number of processes); the published model is gathered whole into the
main process.
Models are loaded straight into their shards: only the main process reads the weights; the others build each
model from its config on the meta device and receive their shards from the main process.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor
from transformers import PreTrainedModel

from rlhf_pipeline.stages.modeling.data_parallel import Processes
from rlhf_pipeline.stages.modeling.loading import weights_unread


def load_sharded(
    load: Callable[[torch.device], torch.nn.Module], device: torch.device, processes: Processes
) -> torch.nn.Module:
    """The model `load` gives, sharded over the processes without a whole copy in each: the main process loads
    it (the one whole copy, until its tensors are sent), the others build it from its config on the meta
    device (`loading.weights_unread`), and each process receives its shard of every tensor from the main one.
    Buffers that no checkpoint holds (rotary frequencies) are sent whole."""
    if processes.main:
        model = load(device)
        whole = model.state_dict()  # the unsharded tensors, kept until they are sent
    else:
        with weights_unread():
            model = load(device)
        whole = {}
    shard(model, processes, device)
    if not processes.main:
        model.to_empty(device=device)
    set_model_state_dict(model, whole, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    for buffer in model.buffers():
        dist.broadcast(buffer, src=0)
    return model


def shard(model: torch.nn.Module, processes: Processes, device: torch.device) -> None:
    """A transformers model sharded, or each one a wrapper combines (the safety gate calls its two models' own
    forward passes, which is where FSDP gathers their weights)."""
    if isinstance(model, PreTrainedModel):
        shard_model(model, processes, device)
        return
    for child in model.children():
        shard(child, processes, device)


def shard_model(model: PreTrainedModel, processes: Processes, device: torch.device) -> None:
    """`model` sharded in place over the processes: its transformer blocks, then the rest; gradients summed."""
    mesh = init_device_mesh(device.type, (processes.count,))
    blocks = set(getattr(model, "_no_split_modules", None) or ())
    for module in model.modules():
        if type(module).__name__ in blocks:
            fully_shard(module, mesh=mesh)
    parts = [child for child in model.children() if any(True for _ in child.parameters())]
    owned = [{id(p) for p in part.parameters()} for part in parts]
    if sum(map(len, owned)) == len(set().union(*owned)):
        for part in parts:
            fully_shard(part, mesh=mesh)
    fully_shard(model, mesh=mesh)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)  # a plain sum, which gloo has too


def full_state_dict(model: PreTrainedModel) -> dict[str, torch.Tensor]:
    """The whole model's weights on the CPU of the main process (every process must call it: it gathers).
    Tied weights (input and output embeddings) come back gathered twice; they are made one tensor again, which
    `save_pretrained` then saves once, as it does for an unsharded model."""
    weights = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    first_name: dict[int, str] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        source = first_name.setdefault(id(parameter), name)
        if source != name and name in weights and source in weights:
            weights[name] = weights[source]
    return weights


def local_bytes(tensors: list[torch.Tensor]) -> int:
    """Bytes this process holds of `tensors`: its shards of sharded ones, all of the others."""
    return sum((t.to_local() if isinstance(t, DTensor) else t).nbytes for t in tensors)


def resharded(models: list[torch.nn.Module]) -> list[torch.nn.Module]:
    """`models`, with the sharded modules a forward pass left gathered (those FSDP keeps whole after it)
    sharded again: what a process holds between steps."""
    for module in (module for model in models for module in model.modules()):
        if isinstance(module, FSDPModule):
            module.reshard()
    return models


def training_state_bytes(models: list[torch.nn.Module], optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """This process's bytes of the trained models' parameters, gradients and optimizer state, between steps."""
    parameters = [p for model in resharded(models) for p in model.parameters() if p.requires_grad]
    state = [v for per_parameter in optimizer.state.values() for v in per_parameter.values() if v.dim() > 0]
    return {
        "parameter_bytes": local_bytes(parameters),
        "gradient_bytes": local_bytes([p.grad for p in parameters if p.grad is not None]),
        "optimizer_bytes": local_bytes(state),
    }


def frozen_bytes(models: list[torch.nn.Module]) -> int:
    """This process's bytes of the weights of models that do not train (references, reward models)."""
    return local_bytes([p for model in resharded(models) for p in model.parameters()])


# The trained weights only: a LoRA checkpoint holds the adapters, not the frozen base they adapt. The state
# loaded back has exactly the keys of the state saved (dcp.load fails on any it lacks), so the frozen weights
# are the only ones the models do not receive, which `strict` would refuse.
TRAINED_STATE = StateDictOptions(ignore_frozen_params=True, strict=False)


def save_state(models: torch.nn.ModuleDict, optimizer: torch.optim.Optimizer, directory: Path) -> None:
    """The models' trained weights and the optimizer's state through torch.distributed.checkpoint: every
    process writes its shards of sharded models, and its part of replicated ones (each replica is written
    once), into its own `directory`; the main process adds the metadata that says where each piece is. The
    union of the processes' folders is the checkpoint (`core.checkpoints`)."""
    weights, optimizer_state = get_state_dict(models, optimizer, options=TRAINED_STATE)
    with without_process_group_warning():
        dcp.save({"models": weights, "optimizer": optimizer_state}, checkpoint_id=str(directory))


def load_state(models: torch.nn.ModuleDict, optimizer: torch.optim.Optimizer, directory: Path) -> None:
    """The models' trained weights and the optimizer's state from a checkpoint of `save_state`, written by any
    number of processes, sharded or not: its pieces are re-sharded to what this process holds."""
    weights, optimizer_state = get_state_dict(models, optimizer, options=TRAINED_STATE)
    state = {"models": weights, "optimizer": optimizer_state}
    with without_process_group_warning():
        dcp.load(state, checkpoint_id=str(directory))
    set_state_dict(
        models, optimizer, model_state_dict=state["models"], optim_state_dict=state["optimizer"], options=TRAINED_STATE
    )


@contextmanager
def without_process_group_warning() -> Iterator[None]:
    """torch.distributed.checkpoint warns whenever it runs without a process group: one process is meant to."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield
