"""IMDB movie reviews (the Large Movie Review Dataset): the classic sentiment task of RLHF tutorials.

Rows carry a review and its label: `review` + `sentiment` positive/negative (the 50k-review CSV), or `text` +
`label` 1/0 (the Hub's `imdb`). Each review becomes a continuation task: the prompt asks to continue a review
from its first words, the answer is the words that follow.
- sft: prompt and the review's own continuation, of both labels (the model learns to write reviews);
- prompt: the prompts alone (RL then steers the continuations);
- preference: a positive review's continuation chosen over a negative one's. The prompt alternates between the
  two reviews' openings, so that fitting the opening is no cue: only the sentiment separates the answers.
Reviews too short to continue (a handful in the 50k) are skipped and counted; a missing field or unknown label
is an error.
"""

from __future__ import annotations

import re
from typing import Any

from rlhf_pipeline.stages.data.formats.records import Record, Skipped, UnusableRow, each

PREFIX_WORDS = 8
CONTINUATION_WORDS = 16
INSTRUCTION = "Continue this movie review: "
LABELS = {"positive": True, "negative": False, "1": True, "0": False}
MARKUP = re.compile(r"<[^>]+>")


def _review(record: Record) -> tuple[str, str, bool]:
    """The review's opening, its continuation, and whether it is positive."""
    words = MARKUP.sub(" ", record.get("review" if "review" in record.row else "text")).split()
    label_field = "sentiment" if "sentiment" in record.row else "label"
    label = str(record.get(label_field, (str, int))).strip().lower()
    if label not in LABELS:
        raise record.error(label_field, f"{label!r} is outside its range (positive/negative or 1/0)")
    if len(words) < PREFIX_WORDS + CONTINUATION_WORDS // 2:
        raise UnusableRow("review too short to continue")
    continuation = " ".join(words[PREFIX_WORDS : PREFIX_WORDS + CONTINUATION_WORDS])
    return " ".join(words[:PREFIX_WORDS]), continuation, LABELS[label]


def _reviews(records: list[Record]) -> tuple[list[tuple[str, str, bool]], Skipped]:
    return each(_review)(records)


def _prompt(opening: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": INSTRUCTION + opening}]


def _answer(text: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": text}]


def sft(records: list[Record]) -> tuple[list[dict[str, Any]], Skipped]:
    reviews, skipped = _reviews(records)
    return [{"messages": _prompt(opening) + _answer(continuation)} for opening, continuation, _ in reviews], skipped


def prompt(records: list[Record]) -> tuple[list[dict[str, Any]], Skipped]:
    reviews, skipped = _reviews(records)
    return [{"prompt": _prompt(opening)} for opening, _, _ in reviews], skipped


def preference(records: list[Record]) -> tuple[list[dict[str, Any]], Skipped]:
    reviews, skipped = _reviews(records)
    positive = [r for r in reviews if r[2]]
    negative = [r for r in reviews if not r[2]]
    rows = []
    for index, (good, bad) in enumerate(zip(positive, negative, strict=False)):
        opening = (good if index % 2 == 0 else bad)[0]
        rows.append({"prompt": _prompt(opening), "chosen": _answer(good[1]), "rejected": _answer(bad[1])})
    return rows, skipped
