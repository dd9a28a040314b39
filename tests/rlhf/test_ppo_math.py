"""PPO's pieces against values computed by hand."""

import math

import pytest
import torch
from transformers import TopKLogitsWarper

from rlhf_pipeline.stages.rlhf import ppo_math
from rlhf_pipeline.stages.rlhf.rollout import response_mask_until_end, support_logprobs, top_k_support


def test_response_mask_stops_after_the_first_of_any_end_of_turn_token():
    end_of_turn, eos = 9, 4
    ids = torch.tensor([[5, 6, 9, 7, 9], [5, 5, 5, 5, 5], [9, 1, 1, 1, 1], [5, 4, 9, 1, 1]])
    assert response_mask_until_end(ids, [end_of_turn, eos]).tolist() == [
        [1, 1, 1, 0, 0],
        [1, 1, 1, 1, 1],
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
    ]


def test_logprobs_are_those_of_the_top_k_distribution_that_was_sampled():
    """log p of the top-k renormalised softmax at temperature T, as transformers' warpers sample it; a reference
    restricted to the same top k gives KL 0 where it is the same model."""
    logits = torch.tensor([[[2.0, 1.0, 0.5, -1.0]]])
    tokens = torch.tensor([[1]])
    full = support_logprobs(logits, tokens, 0.5, top_k_support(logits, 0))
    assert full.item() == pytest.approx(torch.log_softmax(logits / 0.5, -1)[0, 0, 1].item())
    support = top_k_support(logits, 2)
    assert support.ids[support.kept].tolist() == [0, 1]
    top2 = support_logprobs(logits, tokens, 0.5, support)
    assert top2.item() == pytest.approx(math.log(math.exp(1.0 / 0.5) / (math.exp(2.0 / 0.5) + math.exp(1.0 / 0.5))))
    other = torch.tensor([[[0.0, 3.0, 1.0, 2.0]]])  # a reference over the policy's two tokens: p(1) = e^6/(1+e^6)
    assert support_logprobs(other, tokens, 0.5, support).item() == pytest.approx(-math.log1p(math.exp(-6.0)), rel=1e-4)
    assert support_logprobs(logits, tokens, 0.5, support).item() - top2.item() == 0.0


def test_top_k_keeps_the_tokens_tied_with_the_kth_as_transformers_samples():
    """TopKLogitsWarper keeps every token whose logit is at least the k-th largest: with a tie at rank k the
    sampler draws from more than k tokens (bf16 logits tie often), and the trained log-probability is of that
    distribution, not of k of the tied tokens picked arbitrarily."""
    logits = torch.tensor([[[3.0, 1.0, 2.0, 2.0, 2.0, -1.0]]])
    tokens = torch.tensor([[4]])
    sampled = TopKLogitsWarper(top_k=2)(None, logits[0] / 0.7).log_softmax(-1)
    assert torch.isfinite(sampled).sum().item() == 4  # the likeliest and the three tied for second
    assert support_logprobs(logits, tokens, 0.7, top_k_support(logits, 2)).item() == pytest.approx(
        sampled[0, 4].item(), rel=1e-6
    )


def test_approx_kl_is_zero_for_an_unchanged_policy_and_positive_otherwise():
    old = torch.tensor([[-1.0, -2.0, -0.5]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    assert ppo_math.approx_kl(old, old, mask).item() == 0.0
    moved = old + torch.tensor([[0.1, -0.2, 5.0]])
    expected = ((math.exp(0.1) - 1 - 0.1) + (math.exp(-0.2) - 1 + 0.2)) / 2
    assert ppo_math.approx_kl(moved, old, mask).item() == pytest.approx(expected, rel=1e-5)


def test_kl_penalty_at_every_token_and_score_at_the_last():
    logprobs = torch.tensor([[-1.0, -2.0, -0.5, 0.0]])
    ref = torch.tensor([[-1.5, -1.0, -0.5, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    rewards, kl = ppo_math.kl_penalized_rewards(logprobs, ref, torch.tensor([2.0]), mask, kl_coef=0.1)
    # kl = [0.5, -1.0, 0.0, (masked)]; rewards = -0.1 * kl, plus the score 2.0 on the third (last real) token.
    assert kl[0].tolist() == pytest.approx([0.5, -1.0, 0.0, 0.0])
    assert rewards[0].tolist() == pytest.approx([-0.05, 0.1, 2.0, 0.0])


def test_gae_by_hand():
    rewards = torch.tensor([[0.0, 0.0, 1.0]])
    values = torch.tensor([[0.5, 0.2, 0.4]])
    mask = torch.ones(1, 3)
    gamma, lam = 0.9, 0.8
    advantages, returns = ppo_math.generalized_advantages(rewards, values, mask, gamma, lam)
    d2 = 1.0 - 0.4  # no value after the last token
    d1 = 0.0 + 0.9 * 0.4 - 0.2
    d0 = 0.0 + 0.9 * 0.2 - 0.5
    a2 = d2
    a1 = d1 + gamma * lam * a2
    a0 = d0 + gamma * lam * a1
    assert advantages[0].tolist() == pytest.approx([a0, a1, a2])
    assert returns[0].tolist() == pytest.approx([a0 + 0.5, a1 + 0.2, a2 + 0.4])


def test_gae_ignores_padding_after_the_response():
    rewards = torch.tensor([[0.0, 1.0, 0.0, 0.0]])
    values = torch.tensor([[0.3, 0.6, 7.0, 7.0]])  # values on padding must not leak in
    mask = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    advantages, _ = ppo_math.generalized_advantages(rewards, values, mask, gamma=1.0, lam=1.0)
    assert advantages[0].tolist() == pytest.approx([1.0 - 0.3, 1.0 - 0.6, 0.0, 0.0])


def test_masked_whiten_uses_real_tokens_only():
    values = torch.tensor([[1.0, 3.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    whitened = ppo_math.masked_whiten(values, mask)
    # mean 2, variance 1 over the two real tokens
    assert whitened[0].tolist() == pytest.approx([-1.0, 1.0, 0.0], abs=1e-4)


def test_clipped_policy_loss_by_hand():
    old = torch.log(torch.tensor([[0.5, 0.5]]))
    new = torch.log(torch.tensor([[0.75, 0.25]]))  # ratios 1.5 and 0.5
    advantages = torch.tensor([[1.0, -1.0]])
    mask = torch.ones(1, 2)
    loss, clip_fraction = ppo_math.clipped_policy_loss(new, old, advantages, mask, clip_range=0.2)
    # token 0: max(-1*1.5, -1*1.2) = -1.2 (clipped); token 1: max(1*0.5, 1*0.8) = 0.8 (clipped)
    assert loss.item() == pytest.approx((-1.2 + 0.8) / 2)
    assert clip_fraction.item() == pytest.approx(1.0)


def test_policy_loss_unclipped_inside_trust_region():
    old = torch.log(torch.tensor([[0.5]]))
    new = torch.log(torch.tensor([[0.55]]))  # ratio 1.1 inside [0.8, 1.2]
    loss, clip_fraction = ppo_math.clipped_policy_loss(new, old, torch.tensor([[2.0]]), torch.ones(1, 1), 0.2)
    assert loss.item() == pytest.approx(-2.2)
    assert clip_fraction.item() == 0.0


def test_clipped_value_loss_by_hand():
    values = torch.tensor([[1.0, 0.0]])
    old_values = torch.tensor([[0.0, 0.0]])
    returns = torch.tensor([[2.0, 1.0]])
    loss = ppo_math.clipped_value_loss(values, old_values, returns, torch.ones(1, 2), clip_range=0.5)
    # token 0: max((1-2)^2, (0.5-2)^2) = 2.25; token 1: max(1, 1) = 1
    assert loss.item() == pytest.approx(0.5 * (2.25 + 1.0) / 2)


def test_masked_mean_guards_empty_mask():
    assert ppo_math.masked_mean(torch.ones(2, 2), torch.zeros(2, 2)).item() == 0.0
    assert not math.isnan(ppo_math.masked_mean(torch.ones(1, 1), torch.ones(1, 1)).item())
