"""`rlhf validate`: check the config and every input it names without training (and without torch)."""

from __future__ import annotations

from pathlib import Path

from rlhf_pipeline.stages.core.config import BUILTIN_DEMO, BUILTIN_TINY_MODEL, PipelineConfig
from rlhf_pipeline.stages.core.errors import InputError
from rlhf_pipeline.stages.data.sources import CONFIG_FIELD, check_licenses, load_kind


def validate_inputs(config: PipelineConfig) -> list[str]:
    """Raise InputError on the first bad input; return one line per checked input."""
    licenses = check_licenses(config)
    checked = []
    for kind, field in CONFIG_FIELD.items():
        for part in load_kind(config, kind):
            where, source = f"data.{field}[{part.index}]", part.source
            if source.path == BUILTIN_DEMO:
                checked.append(f"{where}: built-in demo data")
                continue
            line = f"{where}: {source.path} ({len(part.rows)} {kind} rows, {licenses[source.path]})"
            checked.append(line + (f"; {part.skipped.summary()}" if part.skipped.count else ""))
    checked.append(f"model.base: {_check_model(config.model.base)}")
    store = config.run.open_store()
    store.check_access()
    checked.append(f"run.store: {store.uri}")
    return checked


def _check_model(base: str) -> str:
    if base == BUILTIN_TINY_MODEL:
        return "built-in tiny Llama"
    if base.startswith("builtin:"):
        raise InputError(f"model.base: unknown built-in model {base!r} (known: {BUILTIN_TINY_MODEL})")
    path = Path(base).expanduser()
    if base.endswith(".gguf"):
        if not path.is_file():
            raise InputError(f"model.base: {base}: GGUF file not found (`make assets` fetches the example's)")
        return f"GGUF file {base} (dequantized by the stages)"
    if path.exists() or base.startswith((".", "/", "~")):
        if not (path / "config.json").is_file():
            raise InputError(f"model.base: {base}: no config.json there (expected a save_pretrained directory)")
        return f"local model {base}"
    return f"Hugging Face Hub id {base} (downloaded by the stages)"
