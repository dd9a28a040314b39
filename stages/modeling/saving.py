"""Saving a trained model as one ordinary `save_pretrained` directory: the full model, its LoRA adapter merged
in, or the adapter alone (kept, with its base named by reference).

An adapter on a base sharded as it loaded (`modeling.loading.place`) is whole in every process (transformers'
Trainer keeps such adapters alike in each); peft cannot merge it into sharded weights, so the main process
merges it into its base loaded again whole on the CPU, as for a quantized base."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch.distributed.tensor import DTensor

from rlhf_pipeline.stages.core.config import LoraConfig
from rlhf_pipeline.stages.modeling.chat_template import end_of_turn_ids
from rlhf_pipeline.stages.modeling.data_parallel import stage_processes
from rlhf_pipeline.stages.modeling.loading import merged_whole, unwrap_adapter
from rlhf_pipeline.stages.modeling.lora import AdapterBase

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger("rlhf.stage")


def save_model(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    out_dir: Path,
    lora: LoraConfig | None,
    base: AdapterBase,
) -> None:
    """Save a trained model with `save_pretrained`: the full model, the adapter merged in, or the adapter alone.
    Every process calls it (a sharded model is gathered for its main process to save).

    A quantized (QLoRA) base is not merged into: the adapter is applied to the base reloaded unquantized, so
    the merged model carries no quantization error.
    """
    if lora is None or not hasattr(model, "peft_config"):
        save_whole(model, tokenizer, out_dir)
        return
    sharded_base = unwrap_adapter(model).is_distributed_loading_by_transformers
    if sharded_base and not stage_processes().main:
        return  # the adapter is whole in the main process, and the base, untrained, needs no gathering
    adapter = model.peft_config["default"]
    adapter.base_model_name_or_path = base.ref
    if isinstance(adapter.target_modules, set):  # peft's set: written in each process's string-hash order
        adapter.target_modules = sorted(adapter.target_modules)
    if not lora.merge:
        log.info("keeping the LoRA adapter (base %s)", base.ref)
        save_adapter(model, out_dir)
        tokenizer.save_pretrained(out_dir)
    elif lora.quantize is not None or sharded_base:
        with tempfile.TemporaryDirectory(prefix="adapter-") as adapter_dir:  # never inside the artifact
            save_whole(merged_again(model, Path(adapter_dir), base.path, sharded_base), tokenizer, out_dir)
    else:
        save_whole(model.merge_and_unload(), tokenizer, out_dir)


def save_whole(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, out_dir: Path) -> None:
    """A whole model and its tokenizer. A policy's generation config stops at every end-of-turn id, so that
    `generate` outside the pipeline (the model card's example, a serving stack) ends its answer where the
    pipeline's sampling does: a Qwen base's eos `<|endoftext|>` never ends a ChatML turn, and the model went
    on to write the user's next turn."""
    if model.can_generate():
        model.generation_config.eos_token_id = end_of_turn_ids(tokenizer, model)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def save_adapter(model: PreTrainedModel, directory: Path) -> None:
    """The adapter alone. peft would gather each sharded tensor of the base into every process first, only to
    keep the adapter's, which are whole in each process already: it is given the whole tensors only."""
    whole = {name: tensor for name, tensor in model.state_dict().items() if not isinstance(tensor, DTensor)}
    model.save_pretrained(directory, state_dict=whole)


def merged_again(model: PreTrainedModel, adapter_dir: Path, base_path: str, sharded: bool) -> PreTrainedModel:
    """The trained adapter merged into its base loaded again whole and unquantized (a kept adapter base too).
    A sharded base is loaded on the CPU, where a whole copy fits, in the dtype it trained over."""
    save_adapter(model, adapter_dir)
    base = unwrap_adapter(model)
    device = torch.device("cpu") if sharded else next(model.parameters()).device
    merged = merged_whole(adapter_dir, base_path, device, base.config.pad_token_id, base.config.num_labels)
    return merged.to(base.dtype) if sharded else merged
