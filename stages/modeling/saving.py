"""Saving a trained model as one ordinary `save_pretrained` directory: the full model, its LoRA adapter merged
in, or the adapter alone (kept, with its base named by reference)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from rlhf_pipeline.stages.core.config import LoraConfig
from rlhf_pipeline.stages.modeling.loading import load_policy, load_scorer, merged_adapter
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

    A quantized (QLoRA) base is not merged into: the adapter is applied to the base reloaded unquantized, so
    the merged model carries no quantization error.
    """
    if lora is not None and hasattr(model, "peft_config"):
        adapter = model.peft_config["default"]
        adapter.base_model_name_or_path = base.ref
        if isinstance(adapter.target_modules, set):  # peft's set: written in each process's string-hash order
            adapter.target_modules = sorted(adapter.target_modules)
        if not lora.merge:
            log.info("keeping the LoRA adapter (base %s)", base.ref)
        elif lora.quantize is not None:
            model = merged_unquantized(model, out_dir.parent / f"{out_dir.name}-adapter", base.path)
        else:
            model = model.merge_and_unload()
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def merged_unquantized(model: PreTrainedModel, adapter_dir: Path, base_path: str) -> PreTrainedModel:
    """The trained adapter merged into its base loaded again without quantization (a kept adapter base too)."""
    model.save_pretrained(adapter_dir)
    config = model.get_base_model().config
    device = next(model.parameters()).device
    if model.peft_config["default"].task_type == "SEQ_CLS":
        return merged_adapter(load_scorer(base_path, device, config.pad_token_id), str(adapter_dir), "SEQ_CLS")
    return merged_adapter(load_policy(base_path, device), str(adapter_dir))
