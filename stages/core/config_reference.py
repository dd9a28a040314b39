"""The configuration reference, generated from the schema: every field's path, type and limits, default and
description, as docs/configuration-reference.md holds it. `make docs` writes it and a test fails when the
committed file is stale, so the reference cannot drift from the code.

Sections used in several places (LoRA, generation, data sources, stage resources) are described once, at
the end, and linked from where they appear.
"""

from __future__ import annotations

import enum
import json
import sys
import types
import typing
from pathlib import Path
from typing import Any

import annotated_types
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from rlhf_pipeline.stages.core.config import (
    DataSource,
    GenerationConfig,
    LoraConfig,
    PipelineConfig,
    StageResources,
    TrainingConfig,
)

SHARED: dict[type[BaseModel], str] = {
    LoraConfig: "LoRA",
    GenerationConfig: "Generation",
    DataSource: "Data source",
    StageResources: "Stage resources",
}
LIMITS = {annotated_types.Ge: "≥", annotated_types.Gt: ">", annotated_types.Le: "≤", annotated_types.Lt: "<"}
HEADER = [
    "<!-- Generated from stages/core/config.py by `make docs`; edit the field descriptions there. -->",
    "# Configuration reference",
    "",
    "Every field of the pipeline YAML, with its type, default and meaning. Unknown keys are errors; the defaults",
    "are the built-in demo. `--set path=value` overrides any field. Guides: [configuration.md](configuration.md).",
]


def anchor(title: str) -> str:
    return title.lower().replace(" ", "-")


def section_of(annotation: Any) -> type[BaseModel] | None:
    """The section class a field holds (itself, in a list or dict, or optional), if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return next((found for arg in typing.get_args(annotation) if (found := section_of(arg)) is not None), None)


def type_name(annotation: Any) -> str:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        return type_name(args[0])
    if origin is typing.Literal:
        return " \\| ".join(f"`{value}`" for value in args)
    if origin in (typing.Union, types.UnionType):
        names = [type_name(arg) for arg in args if arg is not type(None)]
        return " or ".join(names) + (" or null" if type(None) in args else "")
    if origin is list:
        return f"list of {type_name(args[0])}"
    if origin is dict:
        return f"map of {type_name(args[0])} to {type_name(args[1])}"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        title = SHARED.get(annotation)
        return f"[{title}](#{anchor(title)})" if title else "section"
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return " \\| ".join(f"`{member.value}`" for member in annotation)
    return getattr(annotation, "__name__", str(annotation))


def limits(field: FieldInfo) -> str:
    return "".join(
        f" {sign} {getattr(item, item.__class__.__name__.lower())}"
        for item in field.metadata
        for kind, sign in LIMITS.items()
        if isinstance(item, kind)
    )


def default_of(field: FieldInfo) -> str:
    if field.default_factory is not None:
        value = field.default_factory()  # type: ignore[call-arg]  # the schema's factories take no argument
    elif field.default is PydanticUndefined:
        return "required"
    else:
        value = field.default
    if isinstance(value, BaseModel):
        return "" if section_of(field.annotation) not in SHARED else f"`{json.dumps(value.model_dump(mode='json'))}`"
    if isinstance(value, list) and value and isinstance(value[0], BaseModel):
        value = [item.model_dump(mode="json", exclude_defaults=True) for item in value]
    return f"`{json.dumps(value, ensure_ascii=False)}`"


def table(model: type[BaseModel], prefix: str) -> list[str]:
    """One row per field; a nested section that is not shared follows with its own rows, prefixed."""
    rows, nested = [], []
    for name, field in model.model_fields.items():
        path = f"{prefix}{name}"
        section = section_of(field.annotation)
        kind = type_name(field.annotation) + limits(field)
        rows.append(f"| `{path}` | {kind} | {default_of(field)} | {field.description or ''} |")
        if section is not None and section not in SHARED:
            nested.append((section, f"{path}."))
    for section, nested_prefix in nested:
        rows.extend(table(section, nested_prefix)[2:])
    return ["| field | type | default | meaning |", "|---|---|---|---|", *rows]


def docstring(model: type[BaseModel]) -> list[str]:
    own = model.__dict__.get("__doc__")
    return [" ".join(own.split()), ""] if own and model is not TrainingConfig else []


def render() -> str:
    lines = [*HEADER]
    for name, field in PipelineConfig.model_fields.items():
        section = section_of(field.annotation)
        assert section is not None and field.description, f"{name}: every top-level field is a described section"
        about = field.description[0].upper() + field.description[1:]
        lines += ["", f"## `{name}`", "", f"{about}.", "", *docstring(section), *table(section, f"{name}.")]
    for section, title in SHARED.items():
        lines += ["", f"## {title}", "", *docstring(section), *table(section, "")]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    if len(sys.argv) > 1:
        Path(sys.argv[1]).write_text(render())
    else:
        sys.stdout.write(render())
