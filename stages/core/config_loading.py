"""Reading configs: a YAML file with `--set key.path=value` overrides, validated into a PipelineConfig, where
every problem is an InputError naming the file, the line and the field; and the resolved config a run stores
for its stages, written and read back."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from rlhf_pipeline.stages.core.artifacts import sha256_file
from rlhf_pipeline.stages.core.config import PipelineConfig
from rlhf_pipeline.stages.core.errors import InputError
from rlhf_pipeline.stages.core.store import read_uri


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `key.path=value` overrides; values are parsed as YAML scalars (`0.1`, `true`, `ppo`)."""
    result = copy.deepcopy(raw)
    for override in overrides:
        path, sep, value = override.partition("=")
        if not sep or not path:
            raise InputError(f"--set {override!r}: expected key.path=value")
        *parents, leaf = path.split(".")
        node = result
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise InputError(f"--set {override!r}: {part!r} is not a section")
            node = child
        try:
            node[leaf] = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            problem = getattr(exc, "problem", exc)
            raise InputError(f"--set {override!r}: the value is not valid YAML ({problem})") from None
    return result


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> PipelineConfig:
    """Read, override and validate a config file; `None` is the built-in demo (the schema's defaults)."""
    path = Path(path) if path is not None else Path("<built-in demo>")
    text = _read_text(path) if path.name != "<built-in demo>" else "{}"
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise InputError(f"{where}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
    if not isinstance(raw, dict):
        raise InputError(f"{path}: the config must be a mapping of sections")
    raw = apply_overrides(raw, overrides or [])
    try:
        return PipelineConfig.model_validate(raw)
    except ValidationError as exc:
        raise InputError(_describe_validation_error(exc, path, text)) from None


def read_config(location: str) -> PipelineConfig:
    """The resolved config a run stored (a local path or s3://bucket/key), as stages and flows receive it."""
    try:
        text = read_uri(location).decode()
    except Exception as exc:
        raise InputError(f"{location}: cannot read config ({exc})") from None
    return parse_config_text(text, location)


def parse_config_text(text: str, source: str) -> PipelineConfig:
    """Validate an already resolved config (what a stage process receives)."""
    try:
        return PipelineConfig.model_validate(yaml.safe_load(text))
    except (yaml.YAMLError, ValidationError) as exc:
        raise InputError(f"{source}: invalid resolved config: {exc}") from None


def with_overrides(config: PipelineConfig, overrides: list[str]) -> PipelineConfig:
    """A run's resolved config with `--set` overrides, validated again (`rlhf stage`)."""
    try:
        return PipelineConfig.model_validate(apply_overrides(config.model_dump(mode="json"), overrides))
    except ValidationError as exc:
        raise InputError(_describe_validation_error(exc, "--set", "{}")) from None


def with_data_digests(config: PipelineConfig) -> PipelineConfig:
    """The config as a run stores it for its stages: each local data file's digest filled in (`digest`), which
    prepare's cache key then holds beside the file's path."""
    updates = {
        name: [source.model_copy(update={"digest": _file_digest(source.path)}) for source in sources]
        for name, sources in config.data
        if isinstance(sources, list)
    }
    return config.model_copy(update={"data": config.data.model_copy(update=updates)})


def _file_digest(path: str) -> str | None:
    file = Path(path).expanduser()
    return sha256_file(file) if file.is_file() else None


def dump_config(config: PipelineConfig) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


def _read_text(path: Path) -> str:
    try:
        return path.read_text()
    except FileNotFoundError:
        raise InputError(f"{path}: config file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: cannot read config ({exc})") from None


def _describe_validation_error(exc: ValidationError, path: Path | str, text: str) -> str:
    root = yaml.compose(text)
    problems = []
    for error in exc.errors():
        loc = [str(part) for part in error["loc"] if not str(part).startswith("function-")]
        line = _line_of(root, loc)
        where = f"{path}:{line}" if line else str(path)
        field = ".".join(loc) or "(top level)"
        message = "unknown key" if error["type"] == "extra_forbidden" else error["msg"].removeprefix("Value error, ")
        problems.append(f"{where}: {field}: {message}")
    return "; ".join(problems)


def _line_of(node: yaml.Node | None, loc: list[str]) -> int | None:
    """The 1-based line of the deepest YAML node on the error's path that exists in the file."""
    line = None
    for part in loc:
        if not isinstance(node, yaml.MappingNode):
            break
        match = next((pair for pair in node.value if pair[0].value == part), None)
        if match is None:
            break
        line = match[0].start_mark.line + 1
        node = match[1]
    return line
