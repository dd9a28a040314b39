"""LoRA and QLoRA (peft): adapter configs, quantized bases, and adapters that are merged or kept.

A kept adapter is saved without its base weights; its `adapter_config.json` names the base portably, as
`artifact:<stage>` (an upstream artifact) or `model:base` (the config's `model.base`). A stage that fetches
such an artifact points that name at the local copy (`link_adapter_bases`), and the model loaders then apply
the adapter to its base (`modeling.loading`).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from rlhf_pipeline.stages.core.artifacts import fetch_dir
from rlhf_pipeline.stages.core.config import LoraConfig
from rlhf_pipeline.stages.core.errors import InputError
from rlhf_pipeline.stages.core.store import ArtifactStore

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel

ADAPTER_CONFIG = "adapter_config.json"
BASE_MODEL = "model:base"
ARTIFACT_BASE = "artifact:"  # + the upstream stage whose artifact is the base
TaskType = Literal["CAUSAL_LM", "SEQ_CLS"]


def artifact_base(stage: str) -> str:
    """How a kept adapter names its base when that is an upstream stage's artifact."""
    return f"{ARTIFACT_BASE}{stage}"


def upstream_stage(ref: str) -> str | None:
    """The stage whose artifact an adapter's base names (`artifact:<stage>`), or None for another base."""
    return ref.removeprefix(ARTIFACT_BASE) if ref.startswith(ARTIFACT_BASE) else None


@dataclass(frozen=True)
class AdapterBase:
    """The model an adapter is trained on: its local directory, and how a kept adapter names it."""

    path: str
    ref: str


def adapter_config(lora: LoraConfig | None, task_type: TaskType = "CAUSAL_LM"):
    """peft's LoraConfig, or None for full fine-tuning. SEQ_CLS also trains (and saves) the score head."""
    if lora is None:
        return None
    from peft import LoraConfig as PeftLoraConfig

    return PeftLoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        task_type=task_type,
    )


def quantization_config(lora: LoraConfig | None, device: torch.device, field: str):
    """bitsandbytes settings for a QLoRA base; refused (exit 2) where there is no CUDA GPU or no bitsandbytes."""
    if lora is None or lora.quantize is None:
        return None
    import importlib.util

    if device.type != "cuda" or importlib.util.find_spec("bitsandbytes") is None:
        raise InputError(
            f"{field}.lora.quantize: QLoRA needs a CUDA GPU and the bitsandbytes package (pip install "
            f"'rlhf-pipeline[qlora]'); this stage runs on {device.type}. Remove `quantize` for plain LoRA."
        )
    import torch
    from transformers import BitsAndBytesConfig

    if lora.quantize == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16,
    )


def with_adapter(model: PreTrainedModel, lora: LoraConfig, task_type: TaskType = "CAUSAL_LM") -> PreTrainedModel:
    """A fresh trainable adapter on a frozen base (prepared for k-bit training when the base is quantized)."""
    from peft import get_peft_model

    adapted = get_peft_model(prepared_for_training(model), adapter_config(lora, task_type))
    make_trained_copies_whole_fp32(adapted)
    return adapted


def make_trained_copies_whole_fp32(model: PreTrainedModel) -> None:
    """peft trains a copy of each module it saves whole (SEQ_CLS: the score head). Copied from a base sharded
    as it loaded, the copy would hold shards that no FSDP module gathers; it is made whole in every process
    (a collective: every process calls it), so that it trains as the adapters beside it do. Copied from a bf16
    base, it is made fp32, as peft makes the adapters: AdamW's updates of bf16 weights round away (a value head
    at learning rate 5e-5 would not move). Its input is cast to fp32, so that it runs outside autocast too."""
    import torch
    from peft.utils import ModulesToSaveWrapper
    from torch.distributed.tensor import DTensor
    from torch.nn import Parameter

    wrappers = [module for module in model.modules() if isinstance(module, ModulesToSaveWrapper)]
    for copy in (copy for wrapper in wrappers for copy in wrapper.modules_to_save.values()):
        for module in copy.modules():
            for name, parameter in list(module.named_parameters(recurse=False)):
                data = parameter.data.full_tensor() if isinstance(parameter.data, DTensor) else parameter.data
                if data.dtype in (torch.bfloat16, torch.float16):
                    data = data.float()
                if data is not parameter.data:
                    setattr(module, name, Parameter(data, parameter.requires_grad))
        copy.register_forward_pre_hook(_inputs_as_fp32)


def _inputs_as_fp32(module, args: tuple) -> tuple:
    import torch

    return tuple(a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)


def resume_adapter(model: PreTrainedModel, adapter_dir: Path) -> PreTrainedModel:
    """An adapter saved by a checkpoint, trainable again, on the same (equally prepared) base."""
    from peft import PeftModel

    resumed = PeftModel.from_pretrained(prepared_for_training(model), str(adapter_dir), is_trainable=True)
    make_trained_copies_whole_fp32(resumed)
    return resumed


def prepared_for_training(model: PreTrainedModel) -> PreTrainedModel:
    """A quantized base gets peft's k-bit preparation before an adapter trains on it; others are unchanged.
    Activation checkpointing is left to the stage's `gradient_checkpointing` setting."""
    from peft import prepare_model_for_kbit_training

    if not getattr(model, "is_quantized", False):
        return model
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)


def adapter_base_of(model_dir: str | Path) -> str | None:
    """The base model directory of a kept adapter, or None when `model_dir` holds a full model."""
    config = Path(model_dir) / ADAPTER_CONFIG
    if not config.exists():
        return None
    return json.loads(config.read_text())["base_model_name_or_path"]


def adapter_task_of(model_dir: str | Path) -> TaskType | None:
    """What a kept adapter was trained as (CAUSAL_LM: a policy's, SEQ_CLS: a scorer's)."""
    return json.loads((Path(model_dir) / ADAPTER_CONFIG).read_text()).get("task_type")


def fetch_artifacts(
    sources: dict[str, tuple[ArtifactStore, str]], into: Path, materialize_base: Callable[[], str]
) -> dict[str, Path]:
    """Artifacts (by stage: their store and prefix) downloaded and verified into `into/<stage>`, each kept
    adapter among them pointed at its base: the upstream artifact fetched beside it, or `materialize_base()`."""
    fetched = {stage: into / stage for stage in sources}
    for stage, (store, prefix) in sources.items():
        fetch_dir(store, prefix, fetched[stage])
    link_adapter_bases(fetched, materialize_base)
    return fetched


def kept_adapters(inputs: dict[str, Path]) -> list[Path]:
    """The kept adapters among a stage's fetched inputs: an artifact's own, and a safety model's under it."""
    folders = [path for root in inputs.values() for path in (root, *root.iterdir()) if path.is_dir()]
    return [folder for folder in folders if (folder / ADAPTER_CONFIG).exists()]


def link_adapter_bases(inputs: dict[str, Path], materialize_base: Callable[[], str]) -> None:
    """Point each fetched kept adapter (and a safety model's under it) at the local copy of its base."""
    for model_dir in kept_adapters(inputs):
        config_path = model_dir / ADAPTER_CONFIG
        config = json.loads(config_path.read_text())
        ref = config["base_model_name_or_path"]
        if ref == BASE_MODEL:
            config["base_model_name_or_path"] = materialize_base()
        elif (stage := upstream_stage(ref)) is not None:
            if stage not in inputs:
                raise InputError(f"{model_dir}: the adapter's base {ref!r} is not an input of this stage")
            config["base_model_name_or_path"] = str(inputs[stage])
        config_path.write_text(json.dumps(config, indent=2))
