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

from rlhf_pipeline.stages.core.artifacts import MANIFEST, Manifest, read_manifest, read_verified
from rlhf_pipeline.stages.core.config import ModelConfig, RunConfig
from rlhf_pipeline.stages.core.errors import InputError
from rlhf_pipeline.stages.core.store import ArtifactStore
from rlhf_pipeline.stages.modeling.lora import ADAPTER_CONFIG, fetch_artifacts, upstream_stage

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
    lineage = adapter_lineage(uri)
    own, deepest = next(iter(lineage)), list(lineage)[-1]
    own_dir = Path(tempfile.mkdtemp(dir=work_dir))
    fetched = fetch_artifacts(
        {stage: (store, prefix) for stage, (store, prefix, _) in lineage.items()},
        own_dir,
        lambda: base_of(lineage[deepest][2], own_dir),
    )
    return fetched[own], lineage[own][2]


def adapter_lineage(uri: str) -> dict[str, tuple[ArtifactStore, str, Manifest]]:
    """By stage, the artifact at `uri` and, where it is a kept adapter, the upstream artifacts its base lives
    in (an rl adapter over an sft adapter over the base model): each one's store, prefix and manifest."""
    lineage: dict[str, tuple[ArtifactStore, str, Manifest]] = {}
    while True:
        store, prefix = locate(uri)
        manifest = read_manifest(store, prefix)
        if manifest is None:
            raise InputError(f"{uri}: no artifact there (no manifest.json) and not a model directory")
        lineage[manifest.stage] = (store, prefix, manifest)
        upstream = adapter_upstream(store, prefix, manifest)
        if upstream not in manifest.inputs:
            return lineage
        uri = input_uri(uri, manifest, upstream)


def input_uri(uri: str, manifest: Manifest, upstream: str) -> str:
    """The URI of the artifact's input `upstream` as its manifest names it, followed only where it is an artifact
    of the same store (`<store>/artifacts/<upstream>/<key>`): a manifest cannot send a download elsewhere."""
    named = manifest.inputs[upstream].uri
    root = _normalized(uri).rsplit("/", 3)[0]
    key = _normalized(named).removeprefix(f"{root}/artifacts/{upstream}/")
    if key == _normalized(named) or not key or "/" in key or key in (".", ".."):
        raise InputError(f"{uri}/{MANIFEST}: its input {upstream!r} names {named!r}, outside the artifact's store")
    return named


def _normalized(uri: str) -> str:
    return uri.rstrip("/") if uri.startswith("s3://") else str(Path(uri).resolve())


def adapter_upstream(store: ArtifactStore, prefix: str, manifest: Manifest) -> str | None:
    """The stage whose artifact a kept adapter was trained on (its base `artifact:<stage>`), or None."""
    if not any(entry.path == ADAPTER_CONFIG for entry in manifest.files):
        return None
    ref = json.loads(read_verified(store, prefix, ADAPTER_CONFIG, manifest))["base_model_name_or_path"]
    return upstream_stage(ref)


def base_of(manifest: Manifest, work_dir: Path) -> str:
    """The configured base model of the run that wrote `manifest`, rebuilt in `work_dir` where it is built in."""
    from rlhf_pipeline.stages.modeling.loading import materialize_base

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
            store, prefix = locate(input_uri(source.uri, source.manifest, "prepare"))
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
        from rlhf_pipeline.stages.modeling.loading import init_torch, load_policy, load_tokenizer

        try:
            policy = load_policy(str(source.path), init_torch(RunConfig())).eval()
        except (OSError, ValueError) as exc:
            raise InputError(f"{source.uri}: cannot load a causal language model ({exc})") from None
        return cls(source.label, policy, load_tokenizer(str(source.path)))

    @property
    def window(self) -> int | None:
        return getattr(self.policy.config, "max_position_embeddings", None)

    def within_context(self, conversation: Conversation, max_new_tokens: int) -> Conversation:
        """The conversation less its oldest exchanges, as many as it takes to leave room for the answer in the
        model's context window; the system message and the latest turn always stay."""
        from rlhf_pipeline.stages.modeling.chat_template import trim_turns

        budget = self.window - max_new_tokens if self.window else None
        return trim_turns(self.tokenizer, conversation, budget)[0]

    def answer(self, conversations: list[Conversation], max_new_tokens: int) -> list[str]:
        """The next assistant turn of each conversation, greedy, stopped at any end-of-turn token; a prompt too
        long for the context window keeps its end."""
        from rlhf_pipeline.stages.rlhf.rollout import decode_responses, sample

        answers = []
        for start in range(0, len(conversations), BATCH):
            batch = conversations[start : start + BATCH]
            rollout = sample(
                self.policy, self.tokenizer, batch, None, max_length=self.window, max_new_tokens=max_new_tokens
            )
            answers += decode_responses(self.tokenizer, rollout)
        return answers
