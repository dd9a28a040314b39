"""Rows that `model.max_length` leaves nothing to learn from, left out of training and counted.

TRL's SFT and DPO trainers keep the first `max_length` tokens of a row: where the prompt alone fills them, the
answer is cut away entirely and the row's loss mask is empty (a batch of such rows divides by zero). TRL's
RewardTrainer drops every pair longer than `max_length` without saying so; a rated response cut short would
be scored at a token in its middle. Each stage therefore filters its
rows itself, by the same token counts, and reports how many it left out.
"""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedTokenizerBase

from rlhf_pipeline.stages.modeling.chat_template import prompt_ids

Row = dict[str, Any]


def conversation_ids(tokenizer: PreTrainedTokenizerBase, conversation: list[dict[str, Any]]) -> list[int]:
    return tokenizer.apply_chat_template(conversation, tokenize=True, return_dict=True)["input_ids"]


def leaves_room(tokenizer: PreTrainedTokenizerBase, prompt: list[dict[str, Any]], max_length: int) -> bool:
    """Whether at least one answer token fits after the prompt."""
    return len(prompt_ids(tokenizer, prompt)) < max_length


def answerable(rows: list[Row], tokenizer: PreTrainedTokenizerBase, max_length: int) -> tuple[list, int]:
    """The `messages` rows whose answer keeps at least one token within `max_length`, and how many were left
    out."""
    kept = [row for row in rows if leaves_room(tokenizer, row["messages"][:-1], max_length)]
    return kept, len(rows) - len(kept)


def distinct_pairs(rows: list[Row], tokenizer: PreTrainedTokenizerBase, max_length: int) -> tuple[list, int]:
    """The preference pairs whose chosen and rejected conversations still differ in their first `max_length`
    tokens (what TRL's DPO keeps of each), and how many were left out. Answers are cut, as DPO does, but a pair
    cut to the same tokens (a long prompt, or answers that differ only past the cut) teaches nothing and counts
    as wrong in DPO's reward accuracy."""

    def cut(row: Row, side: str) -> list[int]:
        return conversation_ids(tokenizer, row["prompt"] + row[side])[:max_length]

    kept = [row for row in rows if cut(row, "chosen") != cut(row, "rejected")]
    return kept, len(rows) - len(kept)


def whole_pairs(rows: list[Row], tokenizer: PreTrainedTokenizerBase, max_length: int) -> tuple[list, int]:
    """The preference pairs whose chosen and rejected conversations both fit `max_length` (what TRL's
    RewardTrainer trains on), and how many were left out."""
    return _whole(rows, tokenizer, max_length, ("chosen", "rejected"))


def whole_rated(rows: list[Row], tokenizer: PreTrainedTokenizerBase, max_length: int) -> tuple[list, int]:
    """The rated responses whose conversation fits `max_length`, and how many were left out: a score read at
    a token cut off in the middle of the answer would be trained on what the answer as a whole was rated."""
    return _whole(rows, tokenizer, max_length, ("response",))


def _whole(rows: list[Row], tokenizer: PreTrainedTokenizerBase, max_length: int, answers: tuple[str, ...]):
    kept = [
        row
        for row in rows
        if max(len(conversation_ids(tokenizer, row["prompt"] + row[side])) for side in answers) <= max_length
    ]
    return kept, len(rows) - len(kept)
