"""The chat template as every stage uses it: a conversation's prompt as token ids within a budget (oldest turns
dropped first; what still does not fit is left out of RL, or keeps its end in `rlhf chat`), and the token ids
that end an assistant turn (the template's turn ending, eos, the model's own list), which differ between
tokenizers in ways the tiny built-in one hides."""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rlhf_pipeline.stages.core.errors import InputError

Conversation = list[dict[str, Any]]
SENTINEL = "\u2063rlhf-sentinel\u2063"


def turn_ending(tokenizer: PreTrainedTokenizerBase) -> str:
    """What the chat template writes after an assistant turn's content (`<|im_end|>\\n`, `<eos>\\n`, ...)."""
    user = [{"role": "user", "content": "hi"}]
    try:
        full = tokenizer.apply_chat_template(user + [{"role": "assistant", "content": SENTINEL}], tokenize=False)
    except Exception:  # a template that refuses this conversation shape tells us nothing
        return ""
    return full.rpartition(SENTINEL)[2] if SENTINEL in full else ""


def end_of_turn_ids(tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel | None = None) -> list[int]:
    """Every token id that ends an assistant turn: the first special token of the template's turn ending,
    the tokenizer's eos, and the model's `generation_config.eos_token_id` (an id or a list of them)."""
    special = set(tokenizer.all_special_ids) | set(tokenizer.added_tokens_decoder)
    ending = tokenizer(turn_ending(tokenizer), add_special_tokens=False)["input_ids"]
    ids = [next((i for i in ending if i in special), None), tokenizer.eos_token_id]
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids += configured if isinstance(configured, list) else [configured]
    return list(dict.fromkeys(i for i in ids if i is not None))


def prompt_ids(tokenizer: PreTrainedTokenizerBase, conversation: Conversation) -> list[int]:
    """The conversation through the chat template, ending with the generation prompt, as token ids."""
    return tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True, return_dict=True)[
        "input_ids"
    ]


def trim_turns(
    tokenizer: PreTrainedTokenizerBase, conversation: Conversation, budget: int | None
) -> tuple[Conversation, list[int]]:
    """The conversation less its oldest exchanges, as many as it takes to fit `budget` prompt tokens (or all
    but the system message and the latest turn), with its prompt ids."""
    system = conversation[:1] if conversation and conversation[0]["role"] == "system" else []
    turns = conversation[len(system) :]
    ids = prompt_ids(tokenizer, system + turns)
    while budget is not None and len(ids) > budget and len(turns) > 1:
        turns = turns[2:] if len(turns) > 2 else turns[-1:]
        ids = prompt_ids(tokenizer, system + turns)
    return system + turns, ids


def fitting_prompts(
    tokenizer: PreTrainedTokenizerBase, conversations: list[Conversation], budget: int
) -> tuple[list[Conversation], int]:
    """The prompts with their oldest exchanges dropped to fit `budget` tokens, and how many were left out
    because their latest turn alone is too long. Every RL algorithm samples, scores and trains on these, so that
    the reward model judges, and rejection sampling fine-tunes on, the conversation the policy answered."""
    kept = []
    for conversation in conversations:
        trimmed, ids = trim_turns(tokenizer, conversation, budget)
        if len(ids) <= budget:
            kept.append(trimmed)
    if not kept:
        raise InputError(
            f"every prompt is longer than model.max_length less max_new_tokens ({budget} tokens), even with only "
            "its latest turn left"
        )
    return kept, len(conversations) - len(kept)


def fit_prompt(tokenizer: PreTrainedTokenizerBase, conversation: Conversation, budget: int | None) -> list[int]:
    """The prompt's token ids within `budget`: oldest exchanges dropped first; what is still too long keeps its
    end (the latest words and the generation prompt)."""
    ids = trim_turns(tokenizer, conversation, budget)[1]
    return ids if budget is None or len(ids) <= budget else ids[-budget:]
