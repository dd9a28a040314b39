"""Loading models and tokenizers from a local directory, a Hub id or the built-in tiny Llama.

On CUDA: bf16 where the card supports it, SDPA attention, the model on the stage's GPU. Elsewhere: fp32 on CPU.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from stages.config import BUILTIN_TINY_MODEL, ModelConfig, RunConfig
from stages.errors import InputError

# Used when a base model's tokenizer brings no chat template of its own.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def init_torch(run: RunConfig) -> torch.device:
    """Seed every generator, quiet the progress bars (logs go to the orchestrator) and pick the device."""
    import datasets
    import transformers

    transformers.set_seed(run.seed)
    datasets.disable_progress_bars()
    transformers.logging.disable_progress_bar()
    device = "cuda" if run.device == "cuda" or (run.device == "auto" and torch.cuda.is_available()) else "cpu"
    logging.getLogger("rlhf.stage").info("running on %s", device)
    return torch.device(device)


def dtype_for(device: torch.device) -> torch.dtype:
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def materialize_base(config: ModelConfig, seed: int, work_dir: Path) -> str:
    """Where `from_pretrained` finds the base model: the built-in one is written to `work_dir` first."""
    if config.base == BUILTIN_TINY_MODEL:
        from stages.tiny_model import save_tiny_llama

        out = work_dir / "base-model"
        save_tiny_llama(config, seed, out)
        return str(out)
    if config.base.startswith("builtin:"):
        raise InputError(f"model.base: unknown built-in model {config.base!r} (known: {BUILTIN_TINY_MODEL})")
    return config.base


def load_tokenizer(source: str) -> PreTrainedTokenizerBase:
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except OSError as exc:
        raise InputError(f"model.base: cannot load a tokenizer from {source!r} ({exc})") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not tokenizer.chat_template:
        tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    return tokenizer


def load_policy(source: str, device: torch.device) -> PreTrainedModel:
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype_for(device), attn_implementation="sdpa")
    return model.to(device)


def load_scorer(source: str, device: torch.device, pad_token_id: int) -> PreTrainedModel:
    """A sequence model with one scalar head: the reward model, and the PPO value model initialised from it."""
    model = AutoModelForSequenceClassification.from_pretrained(
        source, num_labels=1, dtype=dtype_for(device), attn_implementation="sdpa"
    )
    model.config.pad_token_id = pad_token_id
    return model.to(device)
