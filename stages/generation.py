"""Sampling responses from a policy and scoring them with a reward model, on token ids.

Prompts are left-padded, responses right-padded and cut after their first end-of-turn token; positions are
given explicitly so that left padding does not shift them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from stages.config import GenerationConfig


@dataclass
class Rollout:
    prompt_ids: torch.Tensor  # (B, P), left-padded
    prompt_mask: torch.Tensor
    response_ids: torch.Tensor  # (B, R), pad after the first end-of-turn token
    response_mask: torch.Tensor

    @property
    def input_ids(self) -> torch.Tensor:
        return torch.cat([self.prompt_ids, self.response_ids], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:
        return torch.cat([self.prompt_mask, self.response_mask], dim=1)

    @property
    def position_ids(self) -> torch.Tensor:
        return (self.attention_mask.cumsum(-1) - 1).clamp(min=0)

    def select(self, index: torch.Tensor) -> Rollout:
        return Rollout(
            self.prompt_ids[index], self.prompt_mask[index], self.response_ids[index], self.response_mask[index]
        )


def encode_prompts(
    tokenizer: PreTrainedTokenizerBase, prompts: list[list[dict[str, Any]]], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    texts = [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in prompts]
    tokenizer.padding_side = "left"
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    return batch["input_ids"].to(device), batch["attention_mask"].to(device)


@torch.no_grad()
def sample(
    policy: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[list[dict[str, Any]]],
    config: GenerationConfig,
) -> Rollout:
    prompt_ids, prompt_mask = encode_prompts(tokenizer, prompts, policy.device)
    output = policy.generate(
        input_ids=prompt_ids,
        attention_mask=prompt_mask,
        max_new_tokens=config.max_new_tokens,
        do_sample=True,
        temperature=config.temperature,
        top_k=config.top_k,
        top_p=1.0,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    response_ids = output[:, prompt_ids.shape[1] :]
    response_mask = response_mask_until_eos(response_ids, tokenizer.eos_token_id)
    response_ids = response_ids.masked_fill(response_mask == 0, tokenizer.pad_token_id)
    return Rollout(prompt_ids, prompt_mask, response_ids, response_mask)


def response_mask_until_eos(response_ids: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """1 for every token up to and including the first end-of-turn token, 0 after it."""
    is_eos = (response_ids == eos_token_id).long()
    after_eos = (is_eos.cumsum(dim=1) - is_eos) > 0
    return (~after_eos).long()


def response_logprobs(policy: PreTrainedModel, rollout: Rollout, temperature: float = 1.0) -> torch.Tensor:
    """log π(response token | prefix) for every response position, (B, R)."""
    logits = policy(
        input_ids=rollout.input_ids, attention_mask=rollout.attention_mask, position_ids=rollout.position_ids
    ).logits
    prompt_length = rollout.prompt_ids.shape[1]
    logits = logits[:, prompt_length - 1 : -1].float() / temperature
    return torch.log_softmax(logits, dim=-1).gather(-1, rollout.response_ids.unsqueeze(-1)).squeeze(-1)


def token_values(value_model: PreTrainedModel, rollout: Rollout) -> torch.Tensor:
    """The value head applied to the state before each response token, (B, R)."""
    if hasattr(value_model, "get_base_model"):  # peft: the LoRA layers live inside the wrapped model
        value_model = value_model.get_base_model()
    backbone = getattr(value_model, value_model.base_model_prefix)
    hidden = backbone(
        input_ids=rollout.input_ids, attention_mask=rollout.attention_mask, position_ids=rollout.position_ids
    ).last_hidden_state
    prompt_length = rollout.prompt_ids.shape[1]
    return value_model.score(hidden[:, prompt_length - 1 : -1]).squeeze(-1).float()


@torch.no_grad()
def reward_scores(reward_model: PreTrainedModel, rollout: Rollout) -> torch.Tensor:
    """The reward model's scalar score of each prompt + response, (B,)."""
    return (
        reward_model(
            input_ids=rollout.input_ids, attention_mask=rollout.attention_mask, position_ids=rollout.position_ids
        )
        .logits[:, 0]
        .float()
    )


def decode_responses(tokenizer: PreTrainedTokenizerBase, rollout: Rollout) -> list[str]:
    return [
        tokenizer.decode(ids[mask.bool()], skip_special_tokens=True).strip()
        for ids, mask in zip(rollout.response_ids, rollout.response_mask, strict=True)
    ]


@torch.no_grad()
def conversation_scores(
    reward_model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, conversations: list[list[dict[str, Any]]]
) -> list[float]:
    """The reward model's score of whole conversations, tokenized through the chat template as in training."""
    tokenizer.padding_side = "right"
    scores: list[float] = []
    for start in range(0, len(conversations), 64):
        texts = [tokenizer.apply_chat_template(c, tokenize=False) for c in conversations[start : start + 64]]
        batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(reward_model.device)
        scores += reward_model(**batch).logits[:, 0].float().tolist()
    return scores
