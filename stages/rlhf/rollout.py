"""Sampling responses from a policy, on token ids, from exactly the distribution that is later scored.

Prompts are rendered through the chat template, limited to the tokens the model's budget leaves them (oldest
turns dropped first) and left-padded; responses are right-padded and cut after their first end-of-turn token,
which is any of the ids `end_of_turn_ids` finds (the template's turn ending, eos, the model's own list).
Positions are given explicitly so that left padding does not shift them. Sampling uses a generation config
built here from the stage's settings alone: a model's own `generation_config.json` (repetition penalty, top-p,
...) never changes what is sampled.

Sampling is seeded per prompt (`prompt_seeds`): each prompt's answer is drawn with its own random stream, so it
is the same whichever prompts share its batch, its process or the number of processes.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from transformers import GenerationConfig as HFGenerationConfig
from transformers import (
    LogitsProcessor,
    LogitsProcessorList,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
)

from rlhf_pipeline.stages.core.config import GenerationConfig
from rlhf_pipeline.stages.modeling.chat_template import Conversation, end_of_turn_ids, fit_prompt
from rlhf_pipeline.stages.modeling.loading import unwrap_adapter


@dataclass
class Rollout:
    prompts: list[Conversation]
    prompt_ids: torch.Tensor  # (B, P), left-padded
    prompt_mask: torch.Tensor
    response_ids: torch.Tensor  # (B, R), pad after the first end-of-turn token
    response_mask: torch.Tensor
    finished: torch.Tensor  # (B,), bool: the response ended with an end-of-turn token
    end_ids: tuple[int, ...]  # the end-of-turn ids generation stopped at

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
            [self.prompts[i] for i in index.tolist()],
            self.prompt_ids[index],
            self.prompt_mask[index],
            self.response_ids[index],
            self.response_mask[index],
            self.finished[index],
            self.end_ids,
        )

    def rows(self) -> list[tuple[list[int], list[int], bool]]:
        """Each row's prompt ids and response ids without padding, and whether it ended its turn."""
        return [
            (prompt[prompt_mask.bool()].tolist(), response[response_mask.bool()].tolist(), done)
            for prompt, prompt_mask, response, response_mask, done in zip(
                self.prompt_ids,
                self.prompt_mask,
                self.response_ids,
                self.response_mask,
                self.finished.tolist(),
                strict=True,
            )
        ]

    @staticmethod
    def from_rows(
        prompts: list[Conversation],
        rows: list[tuple[list[int], list[int], bool]],
        end_ids: tuple[int, ...],
        pad_id: int,
        device: torch.device,
    ) -> Rollout:
        """The rollout of `rows` (as `rows()` gives them, from any number of rollouts), padded as `sample` pads."""
        prompt_width = max(len(prompt) for prompt, _, _ in rows)
        response_width = max(len(response) for _, response, _ in rows)

        def padded(ids: list[int], width: int, left: bool) -> tuple[list[int], list[int]]:
            pad = [pad_id] * (width - len(ids))
            fill = [0] * len(pad)
            return (pad + ids, fill + [1] * len(ids)) if left else (ids + pad, [1] * len(ids) + fill)

        prompt_ids, prompt_mask = zip(*(padded(prompt, prompt_width, left=True) for prompt, _, _ in rows), strict=True)
        response_ids, response_mask = zip(
            *(padded(response, response_width, left=False) for _, response, _ in rows), strict=True
        )

        def tensor(values) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.long, device=device)

        finished = torch.tensor([done for _, _, done in rows], dtype=torch.bool, device=device)
        return Rollout(
            list(prompts),
            tensor(prompt_ids),
            tensor(prompt_mask),
            tensor(response_ids),
            tensor(response_mask),
            finished,
            end_ids,
        )


def encode_prompts(
    tokenizer: PreTrainedTokenizerBase, prompts: list[Conversation], device: torch.device, budget: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    batch = tokenizer.pad(
        {"input_ids": [fit_prompt(tokenizer, p, budget) for p in prompts]}, padding_side="left", return_tensors="pt"
    )
    return batch["input_ids"].to(device), batch["attention_mask"].to(device)


@contextmanager
def own_generation_config(policy: PreTrainedModel):
    """Generation sees only the settings passed to it: transformers fills every unset field of a passed
    config from the model's own generation_config, so that is emptied while generating."""
    model = unwrap_adapter(policy)
    saved = model.generation_config
    model.generation_config = HFGenerationConfig()
    try:
        yield
    finally:
        model.generation_config = saved


def prompt_seeds(run_seed: int, purpose: str, indices: Iterable[int]) -> list[int]:
    """One seed per prompt, from the run's seed, what is sampled (`ppo-step-7`, ...) and the prompt's index in
    the whole batch (not in a process's share of it)."""
    return [random.Random(f"{run_seed}-{purpose}-{index}").getrandbits(63) for index in indices]


class PromptSeededNoise(LogitsProcessor):
    """Gumbel noise from one random stream per row, seeded by that row's prompt seed alone. The arg-max of
    scores plus Gumbel noise is an exact draw from softmax(scores) (the Gumbel-max trick), so greedy decoding
    over these scores samples, from the scores as the processors before this one left them (minimum length,
    temperature, top-k), with no draw depending on another row."""

    def __init__(self, seeds: list[int]) -> None:
        self.seeds = seeds
        self.generators: list[torch.Generator] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if not self.generators:
            self.generators = [torch.Generator(scores.device).manual_seed(seed) for seed in self.seeds]
        vocabulary = scores.shape[-1]
        uniform = torch.stack([torch.rand(vocabulary, generator=g, device=scores.device) for g in self.generators])
        gumbel = -torch.log(-torch.log(uniform.clamp(min=torch.finfo(uniform.dtype).tiny)))
        return scores + gumbel.to(scores.dtype)


def sampling_config(
    tokenizer: PreTrainedTokenizerBase, config: GenerationConfig | None, end_ids: list[int], new_tokens: int
) -> HFGenerationConfig:
    """Everything transformers generates with besides `sampling_processors`, and nothing else: the minimum of
    new tokens from `config` and the response budget, stopping at every end-of-turn id. Decoding is greedy:
    sampling is the prompt-seeded noise's arg-max."""
    settings: dict[str, Any] = {} if config is None else {"min_new_tokens": config.min_new_tokens}
    return HFGenerationConfig(
        max_new_tokens=new_tokens,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=end_ids,
        do_sample=False,
        **settings,
    )


def sampling_processors(config: GenerationConfig, seeds: list[int]) -> LogitsProcessorList:
    """Temperature, top-k and the prompts' own noise, in transformers' order (after its minimum length)."""
    processors: list[LogitsProcessor] = [TemperatureLogitsWarper(config.temperature)]
    if config.top_k > 0:
        processors.append(TopKLogitsWarper(config.top_k))
    return LogitsProcessorList([*processors, PromptSeededNoise(seeds)])


@torch.no_grad()
def sample(
    policy: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[Conversation],
    config: GenerationConfig | None,
    seeds: list[int] | None = None,
    max_length: int | None = None,
    max_new_tokens: int | None = None,
) -> Rollout:
    """Responses to `prompts`: sampled as `config` says (temperature, top-k, minimum length), each prompt
    from its seed (`seeds`, one per prompt), or greedy when `config` is None. Prompt and response together
    stay within `max_length` tokens."""
    new_tokens = max_new_tokens or config.max_new_tokens
    budget = max_length - new_tokens if max_length else None
    prompt_ids, prompt_mask = encode_prompts(tokenizer, prompts, policy.device, budget)
    end_ids = end_of_turn_ids(tokenizer, policy)
    generation = sampling_config(tokenizer, config, end_ids, new_tokens)
    processors = None
    if config is not None:
        if seeds is None or len(seeds) != len(prompts):
            raise ValueError("sampling needs one seed per prompt")
        processors = sampling_processors(config, seeds)
    with own_generation_config(policy):
        output = policy.generate(
            input_ids=prompt_ids,
            attention_mask=prompt_mask,
            generation_config=generation,
            logits_processor=processors,
        )
    response_ids = output[:, prompt_ids.shape[1] :]
    response_mask = response_mask_until_end(response_ids, end_ids)
    finished = (torch.isin(response_ids, torch.tensor(end_ids, device=response_ids.device)) & response_mask.bool()).any(
        dim=1
    )
    response_ids = response_ids.masked_fill(response_mask == 0, tokenizer.pad_token_id)
    return Rollout(list(prompts), prompt_ids, prompt_mask, response_ids, response_mask, finished, tuple(end_ids))


def response_mask_until_end(response_ids: torch.Tensor, end_ids: list[int]) -> torch.Tensor:
    """1 for every token up to and including the first end-of-turn token, 0 after it."""
    is_end = torch.isin(response_ids, torch.tensor(end_ids, device=response_ids.device)).long()
    after_end = (is_end.cumsum(dim=1) - is_end) > 0
    return (~after_end).long()


TIES_KEPT = 16  # tokens tied with the k-th likeliest, beyond the k, that the support can hold


@dataclass(frozen=True)
class TopK:
    """What top-k sampling draws from at each position: every token whose logit is at least the k-th largest
    (transformers' TopKLogitsWarper keeps the ties, and bf16 logits tie often), as ids and which of them count."""

    ids: torch.Tensor  # (B, R, k + TIES_KEPT), likeliest first
    kept: torch.Tensor  # bool, the same shape: the first k, and those tied with the k-th


def top_k_support(logits: torch.Tensor, top_k: int) -> TopK | None:
    """The tokens top-k sampling keeps at each position, or None for all."""
    if top_k <= 0 or top_k >= logits.shape[-1]:
        return None
    values, ids = torch.topk(logits, min(top_k + TIES_KEPT, logits.shape[-1]), dim=-1)
    return TopK(ids, values >= values[..., top_k - 1 : top_k])


def support_logprobs(
    logits: torch.Tensor, tokens: torch.Tensor, temperature: float, support: TopK | None
) -> torch.Tensor:
    """log p(token) of softmax(logits / temperature) restricted to `support` and renormalised: the
    distribution top-k sampling draws from when `support` is the sampler's top k."""
    logprobs = torch.log_softmax(logits.float() / temperature, dim=-1)
    chosen = logprobs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    if support is None:
        return chosen
    within = logprobs.gather(-1, support.ids).masked_fill(~support.kept, float("-inf"))
    return chosen - torch.logsumexp(within, dim=-1)


def response_logits(model: PreTrainedModel, rollout: Rollout) -> torch.Tensor:
    """The logits that predicted each response token, (B, R, V)."""
    logits = model(
        input_ids=rollout.input_ids, attention_mask=rollout.attention_mask, position_ids=rollout.position_ids
    ).logits
    return logits[:, rollout.prompt_ids.shape[1] - 1 : -1]


def without_early_ends(logits: torch.Tensor, end_ids: tuple[int, ...], min_new_tokens: int) -> torch.Tensor:
    """The logits with every end-of-turn id impossible at the first `min_new_tokens` response positions: what
    transformers' `min_new_tokens` does before temperature and top-k, so the scored distribution is the
    sampled one."""
    if min_new_tokens == 0:
        return logits
    early = torch.zeros(logits.shape[-2:], dtype=torch.bool, device=logits.device)
    early[:min_new_tokens, list(end_ids)] = True
    return logits.masked_fill(early, float("-inf"))


def sampled_logits(model: PreTrainedModel, rollout: Rollout, generation: GenerationConfig) -> torch.Tensor:
    """The model's logits for each response position as sampling saw them before temperature and top-k."""
    return without_early_ends(response_logits(model, rollout), rollout.end_ids, generation.min_new_tokens)


def response_logprobs(
    policy: PreTrainedModel, rollout: Rollout, generation: GenerationConfig
) -> tuple[torch.Tensor, TopK | None]:
    """log π(response token | prefix) for every response position, (B, R), of the distribution that was
    sampled (no end of turn before the minimum length, temperature, the policy's own top k renormalised), and
    that top k (`TopK`)."""
    logits = sampled_logits(policy, rollout, generation)
    support = top_k_support(logits, generation.top_k)
    return support_logprobs(logits, rollout.response_ids, generation.temperature, support), support


def reference_logprobs(
    model: PreTrainedModel, rollout: Rollout, generation: GenerationConfig, support: TopK | None
) -> torch.Tensor:
    """A reference model's log-probabilities over what the sampling policy could sample (its top k, `support`,
    and no early end of turn): KL(π ‖ π_ref) then compares two distributions over the same tokens, and is
    exactly 0 while the policy is the reference."""
    logits = sampled_logits(model, rollout, generation)
    return support_logprobs(logits, rollout.response_ids, generation.temperature, support)


def token_values(value_model: PreTrainedModel, rollout: Rollout) -> torch.Tensor:
    """The value head applied to the state before each response token, (B, R)."""
    value_model = unwrap_adapter(value_model)  # peft: the LoRA layers live inside the wrapped model
    backbone = getattr(value_model, value_model.base_model_prefix)
    hidden = backbone(
        input_ids=rollout.input_ids, attention_mask=rollout.attention_mask, position_ids=rollout.position_ids
    ).last_hidden_state
    prompt_length = rollout.prompt_ids.shape[1]
    return value_model.score(hidden[:, prompt_length - 1 : -1]).squeeze(-1).float()


def decode_responses(tokenizer: PreTrainedTokenizerBase, rollout: Rollout) -> list[str]:
    return [
        tokenizer.decode(ids[mask.bool()], skip_special_tokens=True).strip()
        for ids, mask in zip(rollout.response_ids, rollout.response_mask, strict=True)
    ]
