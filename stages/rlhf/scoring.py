"""The one reward readout: every score of a response, wherever it is computed (reward-model evaluation, PPO,
rejection sampling, GRPO/RLOO's reward function, evaluate, the safety gate), is the reward model's score of the
conversation rendered through the chat template, tokenized exactly as the reward model was trained on it.

A sequence classifier reads its score at the last token that is not padding (a tokenizer without a pad token
gets one that never ends a turn where it has one: `loading.pad_token_for`). Scoring a rollout's raw tokens
reads a different token than training did wherever the template writes something after the end token (ChatML's
`<|im_end|>\\n`) or the pad token is the end token (GPT-2, SmolLM2): there the finished answer's end token counts
as padding. Rendering the conversation again makes the two the same by construction. A response that never
ended its turn (cut at `max_new_tokens`) is rendered as the prompt followed by the bare response, without the
template's turn ending: the reward model sees an unfinished answer as unfinished.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from rlhf_pipeline.stages.modeling.chat_template import Conversation
from rlhf_pipeline.stages.rlhf.rollout import Rollout, decode_responses

BATCH = 64


def render(tokenizer: PreTrainedTokenizerBase, conversation: Conversation, finished: bool = True) -> str:
    """The conversation as the reward model reads it (it ends with the assistant's answer)."""
    if finished:
        return tokenizer.apply_chat_template(conversation, tokenize=False)
    prompt = tokenizer.apply_chat_template(conversation[:-1], tokenize=False, add_generation_prompt=True)
    return prompt + conversation[-1]["content"]


@torch.no_grad()
def conversation_scores(
    reward_model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    conversations: list[Conversation],
    finished: list[bool] | None = None,
) -> list[float]:
    """The reward model's score of each conversation; `finished[i]` False: its last answer was cut short."""
    finished = finished if finished is not None else [True] * len(conversations)
    texts = [render(tokenizer, c, f) for c, f in zip(conversations, finished, strict=True)]
    device = next(reward_model.parameters()).device
    scores: list[float] = []
    for start in range(0, len(texts), BATCH):
        batch = tokenizer(
            texts[start : start + BATCH],
            return_tensors="pt",
            padding=True,
            padding_side="right",
            add_special_tokens=False,
        ).to(device)
        scores += reward_model(**batch).logits[:, 0].float().tolist()
    return scores


def response_scores(
    reward_model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[Conversation],
    responses: list[str],
    finished: list[bool],
) -> list[float]:
    """Scores of answers to prompts, as text (what TRL's reward functions and evaluate hold)."""
    conversations = [p + [{"role": "assistant", "content": r}] for p, r in zip(prompts, responses, strict=True)]
    return conversation_scores(reward_model, tokenizer, conversations, finished)


def rollout_scores(reward_model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, rollout: Rollout) -> torch.Tensor:
    """The score of each sampled response, (B,), on the rollout's device."""
    responses = decode_responses(tokenizer, rollout)
    scores = response_scores(reward_model, tokenizer, rollout.prompts, responses, rollout.finished.tolist())
    return torch.tensor(scores, device=rollout.response_ids.device)


def pairwise_accuracy(
    reward_model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, pairs: list[dict[str, Any]]
) -> float | None:
    """How often the reward model scores the held-out chosen answer above the rejected one."""
    if not pairs:
        return None
    chosen = conversation_scores(reward_model, tokenizer, [p["prompt"] + p["chosen"] for p in pairs])
    rejected = conversation_scores(reward_model, tokenizer, [p["prompt"] + p["rejected"] for p in pairs])
    return round(sum(c > r for c, r in zip(chosen, rejected, strict=True)) / len(pairs), 4)
