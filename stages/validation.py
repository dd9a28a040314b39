"""`rlhf validate`: check the config and every input it names without training (and without torch)."""

from __future__ import annotations

from pathlib import Path

from stages.config import BUILTIN_DEMO, BUILTIN_TINY_MODEL, PipelineConfig
from stages.data import read_jsonl
from stages.errors import InputError
from stages.store import ArtifactStore


def validate_inputs(config: PipelineConfig) -> list[str]:
    """Raise InputError on the first bad input; return one line per checked input."""
    checked = []
    for field, kind in (("sft", "sft"), ("preference", "preference"), ("prompts", "prompt")):
        source = getattr(config.data, field)
        if source == BUILTIN_DEMO:
            checked.append(f"data.{field}: built-in demo data")
            continue
        rows = read_jsonl(Path(source), kind)
        checked.append(f"data.{field}: {source} ({len(rows)} {kind} rows)")
    checked.append(f"model.base: {_check_model(config.model.base)}")
    store = ArtifactStore.from_uri(config.run.store)
    checked.append(f"run.store: {store.uri}")
    return checked


def _check_model(base: str) -> str:
    if base == BUILTIN_TINY_MODEL:
        return "built-in tiny Llama"
    if base.startswith("builtin:"):
        raise InputError(f"model.base: unknown built-in model {base!r} (known: {BUILTIN_TINY_MODEL})")
    path = Path(base)
    if path.exists() or base.startswith((".", "/", "~")):
        if not (path.expanduser() / "config.json").is_file():
            raise InputError(f"model.base: {base}: no config.json there (expected a save_pretrained directory)")
        return f"local model {base}"
    return f"Hugging Face Hub id {base} (downloaded by the stages)"
