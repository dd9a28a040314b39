"""Dataset formats: each published row format, converted to TRL's conversational rows of one kind.

Kinds: `sft` → `{"messages": [...]}`; `preference` → `{"prompt", "chosen", "rejected"[, "margin"]}`;
`prompt` → `{"prompt": [...]}`; `rated` → `{"prompt", "response", "ratings": {aspect: [scores]}}`.
Each seed dataset knows its licence, so runs can record and police it. Rows that are well formed but cannot be
used are skipped and counted (`Skipped`); a source with more of them than `max_skipped_fraction` is refused.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from rlhf_pipeline.stages.core.errors import InputError
from rlhf_pipeline.stages.data.formats import conversational, hh_rlhf, imdb, instructions, oasst, shp
from rlhf_pipeline.stages.data.formats.records import Record, Skipped, read_records

Kind = Literal["sft", "preference", "prompt", "rated"]
KINDS: tuple[Kind, ...] = ("sft", "preference", "prompt", "rated")
Converter = Callable[[list[Record]], tuple[list[dict[str, Any]], Skipped]]


@dataclass(frozen=True)
class Format:
    name: str
    converters: dict[str, Converter]
    license: str | None  # None: the user's own data, licence as configured
    commercial_use: bool = True


FORMATS: dict[str, Format] = {
    f.name: f
    for f in (
        Format("messages", {"sft": conversational.sft}, None),
        Format("preference", {"preference": conversational.preference}, None),
        Format("prompt", {"prompt": conversational.prompt}, None),
        Format("rated", {"rated": conversational.rated}, None),
        Format("dolly", {"sft": instructions.dolly_sft, "prompt": instructions.dolly_prompt}, "CC BY-SA 3.0"),
        Format(
            "alpaca",
            {"sft": instructions.alpaca_sft, "prompt": instructions.alpaca_prompt},
            "CC BY-NC 4.0",
            commercial_use=False,
        ),
        Format("oasst", {"sft": oasst.sft, "preference": oasst.preference, "prompt": oasst.prompt}, "Apache-2.0"),
        Format(
            "shp",
            {"sft": shp.sft, "preference": shp.preference, "prompt": shp.prompt},
            "Reddit API terms (non-commercial research)",
            commercial_use=False,
        ),
        Format("hh-rlhf", {"sft": hh_rlhf.sft, "preference": hh_rlhf.preference, "prompt": hh_rlhf.prompt}, "MIT"),
        Format(
            "imdb",
            {"sft": imdb.sft, "preference": imdb.preference, "prompt": imdb.prompt},
            "IMDB Large Movie Review Dataset (Maas et al., 2011): research use",
            commercial_use=False,
        ),
    )
}


def get_format(name: str, kind: str) -> Format:
    if name not in FORMATS:
        raise InputError(f"unknown format {name!r} (known: {', '.join(FORMATS)})")
    found = FORMATS[name]
    if kind not in found.converters:
        raise InputError(f"format {name!r} has no {kind} rows (it has: {', '.join(found.converters)})")
    return found


@dataclass(frozen=True)
class Converted:
    rows: list[dict[str, Any]]
    skipped: Skipped


def convert(source: str, format_name: str, kind: str, split: str, max_skipped_fraction: float) -> Converted:
    """Normalized rows of one kind from a file or Hub dataset in the given format, and the rows skipped."""
    converter = get_format(format_name, kind).converters[kind]
    rows, skipped = converter(read_records(source, split))
    if skipped.count > max_skipped_fraction * skipped.read:
        raise InputError(
            f"{source}: {skipped.summary()}, more than data.max_skipped_fraction ({max_skipped_fraction:g}) allows"
        )
    if not rows:
        raise InputError(f"{source}: no {kind} rows in it (format {format_name})")
    return Converted(rows, skipped)
