"""Talking to trained policies: `rlhf compare` and `rlhf chat`.

A model is a stage artifact's URI (downloaded and checked against its manifest; a kept LoRA adapter gets its
base fetched or rebuilt the way the stages do) or a local `save_pretrained` directory. Answers are greedy, so the
same model gives the same answer to the same conversation every time.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from stages.artifacts import MANIFEST, Manifest, fetch_dir, read_manifest, read_verified
from stages.config import ModelConfig, RunConfig
from stages.errors import InputError
from stages.lora import ADAPTER_CONFIG, adapter_base_of, link_adapter_bases
from stages.store import ArtifactStore

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

Conversation = list[dict[str, str]]

POLICY_STAGES = ("sft", "rl")
PROMPTS_FILE = "prompt_eval.jsonl"
FIXED_PROMPTS = ("Tell me about the cat.", "Describe the river at night.", "What do you think of coffee?")
BATCH = 16


@dataclass(frozen=True)
class ModelSource:
    """A policy on local disk, where it came from, and the short label its answers are shown under."""

    uri: str
    path: Path
    label: str
    manifest: Manifest | None = None


def fetch_model(uri: str, work_dir: Path) -> ModelSource:
    """A policy artifact downloaded into `work_dir` (or a local model directory, used in place)."""
    local = Path(uri)
    if local.is_dir() and not (local / MANIFEST).exists():
        if not (local / "config.json").exists() and not (local / ADAPTER_CONFIG).exists():
            raise InputError(f"{uri}: neither a stage artifact nor a model directory (no config.json)")
        return ModelSource(uri, local, local.resolve().name)
    path, manifest = fetch_artifact(uri, work_dir)
    if manifest.stage not in POLICY_STAGES:
        raise InputError(f"{uri}: a {manifest.stage} artifact, not a policy (give an sft or rl artifact)")
    return ModelSource(uri, path, f"{manifest.stage}-{manifest.cache_key[:6]}", manifest)


def fetch_artifact(uri: str, work_dir: Path) -> tuple[Path, Manifest]:
    """An artifact downloaded and verified; a kept adapter pointed at its base, fetched or rebuilt likewise."""
    store, prefix = locate(uri)
    if read_manifest(store, prefix) is None:
        raise InputError(f"{uri}: no artifact there (no manifest.json) and not a model directory")
    own_dir = Path(tempfile.mkdtemp(dir=work_dir))
    path = own_dir / "artifact"
    manifest = fetch_dir(store, prefix, path)
    inputs = {manifest.stage: path}
    if (upstream := adapter_upstream(path)) in manifest.inputs:
        inputs[upstream] = fetch_artifact(manifest.inputs[upstream].uri, work_dir)[0]
    link_adapter_bases(inputs, lambda: base_of(manifest, own_dir))
    return path, manifest


def adapter_upstream(model_dir: Path) -> str | None:
    """The stage whose artifact a kept adapter was trained on (its base `artifact:<stage>`), or None."""
    ref = adapter_base_of(model_dir)
    return ref.removeprefix("artifact:") if ref is not None and ref.startswith("artifact:") else None


def base_of(manifest: Manifest, work_dir: Path) -> str:
    """The configured base model of the run that wrote `manifest`, rebuilt in `work_dir` where it is built in."""
    from stages.models import materialize_base

    return materialize_base(ModelConfig.model_validate(manifest.config["model"]), manifest.config["seed"], work_dir)


def locate(uri: str) -> tuple[ArtifactStore, str]:
    """The store holding the artifact at `uri`, and the artifact's prefix in it."""
    root, _, name = uri.rstrip("/").rpartition("/")
    store = ArtifactStore.from_uri(root or ".")
    store.check_access()
    return store, name


def default_prompts(sources: list[ModelSource], count: int = 4) -> list[Conversation]:
    """The first held-out prompts of the run that trained the first artifact given; fixed ones without one."""
    for source in sources:
        if source.manifest is not None and "prepare" in source.manifest.inputs:
            store, prefix = locate(source.manifest.inputs["prepare"].uri)
            rows = read_verified(store, prefix, PROMPTS_FILE).decode().splitlines()[:count]
            return [json.loads(row)["prompt"] for row in rows]
    return [[{"role": "user", "content": text}] for text in FIXED_PROMPTS]


@dataclass
class ChatModel:
    """A policy and its tokenizer, answering conversations through the tokenizer's chat template."""

    label: str
    policy: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase

    @classmethod
    def load(cls, source: ModelSource) -> ChatModel:
        """The policy on the GPU where there is one, else on the CPU."""
        from stages.models import init_torch, load_policy, load_tokenizer

        try:
            policy = load_policy(str(source.path), init_torch(RunConfig())).eval()
        except (OSError, ValueError) as exc:
            raise InputError(f"{source.uri}: cannot load a causal language model ({exc})") from None
        return cls(source.label, policy, load_tokenizer(str(source.path)))

    def within_context(self, conversation: Conversation, max_new_tokens: int) -> Conversation:
        """The conversation less its oldest exchanges, as many as it takes to leave room for the answer in the
        model's context window; the system message and the latest turn always stay."""
        window = getattr(self.policy.config, "max_position_embeddings", None)
        system = conversation[:1] if conversation and conversation[0]["role"] == "system" else []
        turns = conversation[len(system) :]
        while window and len(turns) > 1 and self._length(system + turns) + max_new_tokens > window:
            turns = turns[2:]
        return system + turns

    def _length(self, conversation: Conversation) -> int:
        """Prompt tokens of the conversation, encoded as `answer` encodes it."""
        from stages.generation import encode_prompts

        return encode_prompts(self.tokenizer, [conversation], self.policy.device)[0].shape[1]

    def answer(self, conversations: list[Conversation], max_new_tokens: int) -> list[str]:
        """The next assistant turn of each conversation, greedy."""
        return [
            text
            for start in range(0, len(conversations), BATCH)
            for text in self._answer_batch(conversations[start : start + BATCH], max_new_tokens)
        ]

    def _answer_batch(self, conversations: list[Conversation], max_new_tokens: int) -> list[str]:
        import torch

        from stages.generation import Rollout, decode_responses, encode_prompts, response_mask_until_eos

        prompt_ids, prompt_mask = encode_prompts(self.tokenizer, conversations, self.policy.device)
        with torch.no_grad():
            output = self.policy.generate(
                input_ids=prompt_ids,
                attention_mask=prompt_mask,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=self.tokenizer.pad_token_id,
                eos_token_id=self.tokenizer.eos_token_id,
            )
        response_ids = output[:, prompt_ids.shape[1] :]
        response_mask = response_mask_until_eos(response_ids, self.tokenizer.eos_token_id)
        return decode_responses(self.tokenizer, Rollout(prompt_ids, prompt_mask, response_ids, response_mask))
