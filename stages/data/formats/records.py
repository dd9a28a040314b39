"""Reading raw rows from JSON, JSONL, CSV or Parquet files, or from the Hugging Face Hub, each with its location.

Every row keeps where it came from (`file:line` for JSONL and CSV, `file: row N` otherwise), so that a problem
found while converting it names the file, the line or row, and the field.

Two kinds of problem: a broken file (not JSON, a missing field, a wrong type) is an error that stops the run
(`Record.error`); a well-formed row that cannot be trained on (an empty answer, chosen identical to rejected, a
tie) is skipped and counted (`Record.unusable`, collected in `Skipped`), as every real dump has a few.
"""

from __future__ import annotations

import csv
import gzip
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from rlhf_pipeline.stages.core.errors import InputError

MISSING = object()


class UnusableRow(Exception):
    """A well-formed row that cannot be trained on; the message is the reason, as counted."""


@dataclass(frozen=True)
class Record:
    where: str
    row: dict[str, Any]

    def error(self, field: str, problem: str) -> InputError:
        return InputError(f"{self.where}: field {field!r}: {problem}")

    @property
    def position(self) -> str:
        """The line number (JSONL, CSV) or `row N` (JSON arrays, Parquet, the Hub)."""
        return self.where.rpartition(":")[2].strip()

    def get(self, field: str, kind: type | tuple[type, ...] = str, default: Any = MISSING) -> Any:
        """The field's value, checked against `kind`; a missing field is an error unless a default is given."""
        value = self.row.get(field)
        if value is None:
            if default is not MISSING:
                return default
            raise InputError(f"{self.where}: missing field {field!r}")
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            expected = " or ".join(k.__name__ for k in kinds)
            raise self.error(field, f"expected {expected}, got {type(value).__name__}")
        return value


SHOWN_POSITIONS = 5


@dataclass
class Skipped:
    """Rows skipped while converting one source: how many rows were read, and per reason where they were."""

    read: int = 0
    reasons: dict[str, list[str]] = field(default_factory=dict)

    def add(self, reason: str, record: Record) -> None:
        self.reasons.setdefault(reason, []).append(record.position)

    @property
    def count(self) -> int:
        return sum(len(positions) for positions in self.reasons.values())

    def summary(self) -> str:
        """`skipped 5 of 2312 rows: transcripts share no prompt (lines 1255, 1689, ...); ...`"""
        parts = []
        for reason, positions in sorted(self.reasons.items(), key=lambda item: -len(item[1])):
            shown = positions[:SHOWN_POSITIONS]
            noun = ("line" if len(positions) == 1 else "lines") if all(p.isdigit() for p in shown) else "at"
            more = ", ..." if len(positions) > len(shown) else ""
            parts.append(f"{len(positions)} {reason} ({noun} {', '.join(shown)}{more})")
        return f"skipped {self.count} of {self.read} rows: " + "; ".join(parts)

    def as_metrics(self) -> dict[str, Any]:
        return {
            "skipped": self.count,
            "skipped_reasons": {r: {"count": len(p), "first": p[:SHOWN_POSITIONS]} for r, p in self.reasons.items()},
        }


def each(convert_one: Callable[[Record], Any]) -> Callable[[list[Record]], tuple[list, Skipped]]:
    """A converter of whole sources from one that converts a row, skipping and counting unusable rows."""

    def convert(records: list[Record]) -> tuple[list, Skipped]:
        rows, skipped = [], Skipped(len(records))
        for record in records:
            try:
                rows.append(convert_one(record))
            except UnusableRow as exc:
                skipped.add(str(exc), record)
        return rows, skipped

    return convert


FILE_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet")
GZIP = ".gz"


def read_records(source: str, split: str = "train") -> list[Record]:
    """Rows of a local .json/.jsonl/.csv/.parquet file (the first three also gzipped, as hh-rlhf and oasst publish
    them), or of a Hub dataset id (needs network)."""
    path = Path(source).expanduser()
    local = path.exists() or _file_kind(path) in FILE_SUFFIXES
    records = list(_read_file(path)) if local else _read_hub(source, split)
    if not records:
        raise InputError(f"{source}: no rows (the file is empty)")
    return records


def _file_kind(path: Path) -> str:
    """`.jsonl` for both `x.jsonl` and `x.jsonl.gz`."""
    return Path(path.stem).suffix if path.suffix == GZIP else path.suffix


def _read_file(path: Path) -> Iterator[Record]:
    if not path.is_file():
        raise InputError(f"{path}: data file not found")
    kind = _file_kind(path)
    if kind == ".parquet":
        yield from _read_parquet(path)
        return
    if kind == ".csv":
        yield from _read_csv(path)
        return
    try:
        with _open_text(path) as file:
            text = file.read()
    except (OSError, EOFError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: cannot read data file ({exc})") from None
    if kind == ".json" and text.lstrip().startswith("["):
        for index, row in enumerate(_parse_json(text, path)):
            yield _record(f"{path}: row {index}", row)
        return
    # Lines end at "\n" only: JSON leaves U+2028 and other Unicode line separators unescaped inside strings.
    for number, line in enumerate(text.split("\n"), start=1):
        if line.strip():
            yield _record(f"{path}:{number}", _parse_json(line, path, number))


def _open_text(path: Path) -> IO[str]:
    """The file as text, gunzipped if it ends in .gz; a UTF-8 byte-order mark (Windows tools write one) dropped."""
    if path.suffix == GZIP:
        return gzip.open(path, "rt", encoding="utf-8-sig", newline="")
    return path.open(encoding="utf-8-sig", newline="")


def _parse_json(text: str, path: Path, line: int | None = None) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"{path}:{line or exc.lineno}: not valid JSON ({exc.msg})") from None
    except RecursionError:
        raise InputError(f"{path}:{line or 1}: JSON nested too deeply to read") from None


def _read_csv(path: Path) -> Iterator[Record]:
    """A header line, then one row per record (quoted fields may span lines: the location is the row's first)."""
    try:
        with _open_text(path) as file:
            reader = csv.reader(file)
            header = next(reader, [])
            start = reader.line_num + 1
            for values in reader:
                if values:  # a blank line
                    if len(values) != len(header):
                        raise InputError(f"{path}:{start}: expected {len(header)} columns, got {len(values)}")
                    yield Record(f"{path}:{start}", dict(zip(header, values, strict=True)))
                start = reader.line_num + 1
    except (OSError, EOFError, UnicodeDecodeError, csv.Error) as exc:
        raise InputError(f"{path}: not a readable CSV file ({exc})") from None


def _read_parquet(path: Path) -> Iterator[Record]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several unrelated types for a broken file
        raise InputError(f"{path}: not a readable Parquet file ({exc})") from None
    for index, row in enumerate(table.to_pylist()):
        yield _record(f"{path}: row {index}", row)


def _read_hub(dataset_id: str, split: str) -> list[Record]:
    import datasets

    try:
        rows = datasets.load_dataset(dataset_id, split=split)
    except Exception as exc:  # offline, unknown id, no such split
        raise InputError(f"{dataset_id}: neither a local file nor a loadable Hub dataset ({exc})") from None
    return [_record(f"{dataset_id}[{split}]: row {index}", row) for index, row in enumerate(rows)]


def _record(where: str, row: Any) -> Record:
    if not isinstance(row, dict):
        raise InputError(f"{where}: expected a JSON object")
    return Record(where, row)
