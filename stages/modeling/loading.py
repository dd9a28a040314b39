"""Loading models and tokenizers from a local directory, a Hub id, a GGUF file or the built-in tiny Llama.

On CUDA: SDPA attention and the model on the stage's GPU; a model that trains keeps fp32 master weights and
computes in bf16 under autocast where the card supports it (as the HF Trainer's `bf16=True` does), so that small
updates do not round away; a frozen model (reference, reward model, evaluation) is loaded in bf16. QLoRA keeps
its own scheme (a 4/8-bit base, bf16 compute). On CPU everything is fp32.
A directory that holds a kept LoRA adapter loads as its base with the adapter merged in (`modeling.lora`).
Inside `weights_unread()` a model is built from its config on the meta device instead: what a process that
receives its shard of a model from another (`modeling.sharding`) needs.
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Literal

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from rlhf_pipeline.stages.core.config import BUILTIN_TINY_MODEL, ModelConfig, RunConfig
from rlhf_pipeline.stages.core.errors import InputError
from rlhf_pipeline.stages.modeling.chat_template import end_of_turn_ids
from rlhf_pipeline.stages.modeling.lora import adapter_base_of, adapter_task_of, kept_adapters
from rlhf_pipeline.stages.modeling.threads import take_cpu_share

# Used when a base model's tokenizer brings no chat template of its own.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


_WEIGHTS_UNREAD: ContextVar[bool] = ContextVar("weights_unread", default=False)


@contextmanager
def weights_unread() -> Iterator[None]:
    """Models loaded inside are built from their configs on the meta device: the classes, names, shapes and
    dtypes of a real load, no weights read or memory taken."""
    token = _WEIGHTS_UNREAD.set(True)
    try:
        yield
    finally:
        _WEIGHTS_UNREAD.reset(token)


def init_torch(run: RunConfig) -> torch.device:
    """Seed every generator, quiet the progress bars (logs go to the orchestrator), take this process's share
    of the CPUs and pick the device."""
    import datasets
    import transformers

    threads = take_cpu_share()
    transformers.set_seed(run.seed)
    datasets.disable_progress_bars()
    transformers.logging.disable_progress_bar()
    if run.device == "cuda" or (run.device == "auto" and torch.cuda.is_available()):
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))  # one GPU per DDP process
    else:
        device = torch.device("cpu")
    logging.getLogger("rlhf.stage").info("running on %s, compute threads: %d", device, threads)
    return device


def compute_dtype(device: torch.device) -> torch.dtype:
    """What the stage computes in: bf16 on a CUDA card that supports it, else fp32."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def weights_dtype(device: torch.device, train: bool) -> torch.dtype:
    """Trained weights (and so their gradients and optimizer state) are fp32; frozen ones the compute dtype."""
    return torch.float32 if train else compute_dtype(device)


def autocast(device: torch.device):
    """Mixed precision for hand-written training loops (PPO): bf16 matmuls over fp32 weights on a GPU."""
    dtype = compute_dtype(device)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)


def disable_dropout(model: torch.nn.Module) -> None:
    """No dropout anywhere in the model: nn.Dropout layers (LoRA's included) and the attention dropout that
    attention modules read from a float attribute. PPO needs it: old log-probabilities are computed once, and
    the first update must see the same model (ratio 1)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        for name, value in vars(module).items():
            if "dropout" in name and isinstance(value, float):
                setattr(module, name, 0.0)


def materialize_base(config: ModelConfig, seed: int, work_dir: Path) -> str:
    """Where `from_pretrained` finds the base model. The built-in one is written to `work_dir` first; a GGUF
    file is dequantized and saved there again as an ordinary checkpoint, so every later load is the usual one."""
    out = work_dir / "base-model"
    if out.exists():
        return str(out)
    if config.base == BUILTIN_TINY_MODEL:
        from rlhf_pipeline.stages.modeling.tiny_model import save_tiny_llama

        save_tiny_llama(config, seed, out)
        return str(out)
    if config.base.startswith("builtin:"):
        raise InputError(f"model.base: unknown built-in model {config.base!r} (known: {BUILTIN_TINY_MODEL})")
    if config.base.endswith(".gguf"):
        save_from_gguf(Path(config.base), out)
        return str(out)
    return config.base


def save_from_gguf(path: Path, out: Path) -> None:
    """transformers dequantizes GGUF weights on load but will not save a model marked as GGUF-quantized:
    the weights go into a model rebuilt from the same config without that mark."""
    if not path.is_file():
        raise InputError(f"model.base: GGUF file {path} not found")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    except (OSError, ValueError) as exc:
        raise InputError(f"model.base: cannot read GGUF file {path} ({exc})") from None
    config = copy.deepcopy(loaded.config)
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def load_tokenizer(source: str, padding_side: Literal["left", "right"] | None = None) -> PreTrainedTokenizerBase:
    """The model's tokenizer, with a pad token and a chat template; `padding_side` for a consumer that pads
    through the tokenizer's own setting (the Trainer's collators), the model's choice otherwise."""
    try:
        options = {"padding_side": padding_side} if padding_side else {}
        tokenizer = AutoTokenizer.from_pretrained(source, **options)
    except OSError as exc:
        raise InputError(f"model.base: cannot load a tokenizer from {source!r} ({exc})") from None
    # transformers records whether this process could reach the Hub (HF_HUB_OFFLINE): saved with the tokenizer,
    # it would make an artifact's bytes, and every cache key after it, depend on the environment.
    tokenizer.init_kwargs.pop("local_files_only", None)
    if not tokenizer.chat_template:
        tokenizer.chat_template = default_chat_template(tokenizer)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = pad_token_for(tokenizer)
    return tokenizer


def default_chat_template(tokenizer: PreTrainedTokenizerBase) -> str:
    """DEFAULT_CHAT_TEMPLATE for a base tokenizer without a template, after its bos token where it puts one before
    every text (Llama 2's base models, trained with `<s>` at position 0): conversations are tokenized without
    special tokens (transformers' `apply_chat_template`, and every scoring path here), so the template writes it."""
    adds_bos = tokenizer.bos_token is not None and tokenizer("a")["input_ids"][:1] == [tokenizer.bos_token_id]
    return "{{ bos_token }}" + DEFAULT_CHAT_TEMPLATE if adds_bos else DEFAULT_CHAT_TEMPLATE


def pad_token_for(tokenizer: PreTrainedTokenizerBase) -> str:
    """A pad token for a tokenizer without one: one that never ends a turn where the vocabulary has it (`<unk>`:
    Llama 2, Mistral; a reserved pad: Llama 3.1's `<|finetune_right_pad_id|>`), else eos (GPT-2). A sequence
    classifier reads its score at the last token that is not padding: with pad = eos, where the template ends
    an answer with that token (`answer</s>`, `answer<|eot_id|>`), the reward model never saw the end of a
    turn, and scored a finished answer and one cut at `max_new_tokens` alike."""
    ending = set(end_of_turn_ids(tokenizer))
    padding_like = [token for token in tokenizer.all_special_tokens if "pad" in token.lower()]
    padding_like += sorted(token for token in tokenizer.get_added_vocab() if "pad" in token.lower())
    for token in [tokenizer.unk_token, *padding_like]:
        if token is not None and tokenizer.convert_tokens_to_ids(token) not in ending:
            return token
    return tokenizer.eos_token


def load_policy(
    source: str, device: torch.device, quantization=None, train: bool = False, shards: int = 1
) -> PreTrainedModel:
    """A causal LM; `quantization` (bitsandbytes, from `modeling.lora.quantization_config`) for a QLoRA base;
    `train`: its weights will be trained (fp32 master weights); `shards`: the processes it is sharded over."""
    base = adapter_base_of(source)
    if base is not None and shards > 1:
        return load_policy(merged_copy_of(source), device, quantization, train, shards)
    if base is not None:
        return merged_adapter(load_policy(base, device, quantization, train), source)
    return place(AutoModelForCausalLM, source, device, quantization, train, shards)


def load_scorer(
    source: str,
    device: torch.device,
    pad_token_id: int,
    quantization=None,
    train: bool = False,
    num_labels: int = 1,
    shards: int = 1,
) -> PreTrainedModel:
    """A sequence model with scalar heads (one: the reward model, and the PPO value model initialised from it)."""
    base = adapter_base_of(source)
    if base is not None and shards > 1:
        return load_scorer(merged_copy_of(source), device, pad_token_id, quantization, train, num_labels, shards)
    if base is not None:
        model = load_scorer(base, device, pad_token_id, quantization, train, num_labels)
        return merged_adapter(model, source, "SEQ_CLS")
    model = place(
        AutoModelForSequenceClassification, source, device, quantization, train, shards, num_labels=num_labels
    )
    model.config.pad_token_id = pad_token_id
    return model


def place(
    model_class, source: str, device: torch.device, quantization, train: bool, shards: int = 1, **config_overrides
) -> PreTrainedModel:
    """The model on `device`; over `shards` processes, sharded as it loads by transformers' own FSDP2
    (`DistributedConfig`), which the HF Trainer then trains without wrapping it again."""
    kwargs = {"dtype": compute_dtype(device) if quantization else weights_dtype(device, train)}
    kwargs |= {"attn_implementation": "sdpa", **sharded_loading(shards)}
    if _WEIGHTS_UNREAD.get():
        with torch.device("meta"):
            return model_class.from_config(AutoConfig.from_pretrained(source, **config_overrides), **kwargs)
    kwargs |= config_overrides
    if quantization is not None:
        return model_class.from_pretrained(
            source, quantization_config=quantization, device_map={"": device.index or 0}, **kwargs
        )
    return model_class.from_pretrained(source, **kwargs).to(device)


def sharded_loading(shards: int) -> dict[str, object]:
    """`from_pretrained`'s keyword that shards the model over `shards` processes as it loads (none for one):
    for `place`, and for a model TRL loads itself (GRPO's reference, through `model_init_kwargs`)."""
    if shards == 1:
        return {}
    return {"distributed_config": {"fsdp_size": shards}}  # a DistributedConfig as a dict: TRL's args hold it


def merged_copy_of(adapter_dir: str | Path) -> str:
    """Where `save_merged_copies` keeps the whole model a kept adapter makes."""
    return f"{adapter_dir}-merged"


def policy_source(inputs: dict[str, Path], rebuilt_reference: bool) -> str:
    """Where a TRL trainer's policy loads from. TRL's DPO, GRPO and RLOO trainers build their reference again
    from the policy's path (`config._name_or_path`) where `rebuilt_reference` (no reference passed, no LoRA):
    a policy assembled from the adapter sft kept would have its base's path there, and the reference would be
    the base, not the SFT model. Such a policy loads from the whole copy that adapter makes (each process its
    own, before `model_shards` joins the process group), as a sharded one does anyway; with LoRA the
    reference is the policy, its adapter disabled."""
    sft_dir = str(inputs["sft"])
    if rebuilt_reference and adapter_base_of(sft_dir) is not None:
        save_merged_copies(inputs)
        return merged_copy_of(sft_dir)
    return sft_dir


def save_merged_copies(inputs: dict[str, Path]) -> None:
    """Each kept adapter among a stage's inputs merged into its base and saved whole beside it, for
    transformers to load sharded (peft merges into whole weights only): a policy's adapter as a causal LM (a
    scorer built from that copy gets the layers it adapts), a scorer's with its head. Every process writes its
    own, on the CPU, before it joins the process group: `save_pretrained` then writes from the first only.
    The random numbers peft draws to build the adapters before loading them are not taken from the stage's
    generator: a head the stage initialises next (a scorer made from a policy) is the one it gets unsharded."""
    for model_dir in kept_adapters(inputs):
        if Path(merged_copy_of(model_dir)).exists():
            continue
        base = adapter_base_of(model_dir)
        with torch.random.fork_rng(devices=[]):
            merged = merged_whole(model_dir, base, torch.device("cpu"), load_tokenizer(str(model_dir)).pad_token_id)
        merged.save_pretrained(merged_copy_of(model_dir))


def merged_whole(
    adapter_dir: str | Path, base: str, device: torch.device, pad_token_id: int, num_labels: int = 1
) -> PreTrainedModel:
    """A kept adapter merged into its base loaded whole on `device`: a scorer's (SEQ_CLS) with its
    `num_labels` heads, any other as a causal LM."""
    if adapter_task_of(adapter_dir) == "SEQ_CLS":
        scorer = load_scorer(base, device, pad_token_id, num_labels=num_labels)
        return merged_adapter(scorer, str(adapter_dir), "SEQ_CLS")
    return merged_adapter(load_policy(base, device), str(adapter_dir))


def unwrap_adapter(model: PreTrainedModel) -> PreTrainedModel:
    """The transformers model inside a peft model (where its config, generation config and heads live)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def merged_adapter(base: PreTrainedModel, adapter_dir: str, task_type: str = "CAUSAL_LM") -> PreTrainedModel:
    """The adapter merged into its base. A policy's (causal LM) adapter also loads into a scorer built from
    that policy, where it adapts the same transformer layers and the score head stays as the scorer has it.
    peft freezes the base it loads an adapter into; the merged model is left trainable where the base was
    (a stage that fully fine-tunes a kept adapter's model trains every weight). A model built without its
    weights is the merged model's skeleton already. peft draws random numbers to initialise the adapter's layers
    before it loads their weights: from generators of their own, so that what the stage draws next (a new
    adapter it trains, a head) is what it draws where the merged model is loaded whole (`save_merged_copies`)."""
    if _WEIGHTS_UNREAD.get():
        return base
    from peft import PeftConfig, PeftModel

    config = PeftConfig.from_pretrained(adapter_dir)
    if config.task_type != task_type:
        config.task_type = None
    trainable = {name for name, parameter in base.named_parameters() if parameter.requires_grad}
    with torch.random.fork_rng(devices=[base.device] if base.device.type == "cuda" else []):
        merged = PeftModel.from_pretrained(base, adapter_dir, config=config).merge_and_unload()
    for name, parameter in merged.named_parameters():
        parameter.requires_grad_(name in trainable)
    return merged
