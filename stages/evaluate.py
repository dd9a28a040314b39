"""evaluate: answer held-out prompts with the base, SFT and RL policies and compare them.

Reports mean reward (the trained reward model, and an independent judge when configured: the demo's gold judge
or VADER's sentiment), the win rate of RL over SFT under the configured judge, KL(RL ‖ SFT) on RL's own samples,
response lengths, answer diversity (distinct-1/2, repeated words: an over-optimised policy collapses onto a few
words), and side-by-side answers (base vs SFT vs RL) as JSON and Markdown. report.json also keeps each answer's
judge score, so that a run of several methods can set their answers to the same prompts against each other.
"""

from __future__ import annotations

import json
from itertools import cycle, islice
from typing import Any

import torch

from rlhf_pipeline.stages.core.artifacts import REWARDS_FILE
from rlhf_pipeline.stages.core.comparison import win_rate
from rlhf_pipeline.stages.core.plots import save_distributions
from rlhf_pipeline.stages.data import demo_task
from rlhf_pipeline.stages.data.rows import load_rows
from rlhf_pipeline.stages.modeling.chat_template import fitting_prompts
from rlhf_pipeline.stages.modeling.loading import load_policy, load_tokenizer, materialize_base
from rlhf_pipeline.stages.modeling.stage_context import StageContext
from rlhf_pipeline.stages.rlhf.reward_signal import load_reward_model
from rlhf_pipeline.stages.rlhf.rollout import (
    Rollout,
    decode_responses,
    prompt_seeds,
    reference_logprobs,
    response_logprobs,
    sample,
)
from rlhf_pipeline.stages.rlhf.scoring import response_scores

POLICIES = ("base", "sft", "rl")
BATCH = 64


def generate_all(ctx: StageContext, source: str, prompts: list) -> tuple[list[Rollout], list[str], list[bool]]:
    """Every policy answers the same prompts with the same seed per prompt; also whether each answer ended its
    turn."""
    tokenizer = load_tokenizer(source)
    policy = load_policy(source, ctx.device).eval()
    seeds = prompt_seeds(ctx.config.run.seed, "evaluate", range(len(prompts)))
    generation, max_length = ctx.config.evaluate.generation, ctx.config.model.max_length
    rollouts = [
        sample(policy, tokenizer, prompts[i : i + BATCH], generation, seeds[i : i + BATCH], max_length)
        for i in range(0, len(prompts), BATCH)
    ]
    responses = [text for r in rollouts for text in decode_responses(tokenizer, r)]
    return rollouts, responses, [done for r in rollouts for done in r.finished.tolist()]


JUDGES = {
    "gold": demo_task.GOLD_JUDGE,
    "reward_model": "trained reward model",
    "vader": "VADER sentiment (compound score of the response, vaderSentiment 3.3)",
}


def judge(name: str, prompts: list, responses: list[str]) -> list[float]:
    """Scores from a judge that RL never optimised: the demo's gold judge, or VADER's sentiment."""
    if name == "gold":
        return [demo_task.gold_score(p[-1]["content"], r) for p, r in zip(prompts, responses, strict=True)]
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    analyzer = SentimentIntensityAnalyzer()
    return [analyzer.polarity_scores(response)["compound"] for response in responses]


def mean(values: list[float]) -> float:
    return round(sum(values) / len(values), 4)


def distinct_n(responses: list[str], n: int) -> float:
    """Distinct n-grams over all n-grams of all the answers (Li et al., 2016): 1 when no word sequence
    repeats anywhere, near 0 for a policy that says the same thing to every prompt."""
    grams = [tuple(words[i : i + n]) for words in map(str.split, responses) for i in range(len(words) - n + 1)]
    return round(len(set(grams)) / len(grams), 4) if grams else 0.0


def repeated_word_rate(responses: list[str]) -> float:
    """The share of words that repeat an earlier word of the same answer ("bright , lovely and lovely .")."""
    words = [answer.lower().split() for answer in responses]
    total = sum(len(answer) for answer in words)
    return round(sum(len(answer) - len(set(answer)) for answer in words) / total, 4) if total else 0.0


def run(ctx: StageContext) -> dict[str, Any]:
    config = ctx.config.evaluate
    held_out, too_long = fitting_prompts(
        load_tokenizer(str(ctx.inputs["sft"])),
        [row["prompt"] for row in load_rows(ctx.inputs["prepare"] / "prompt_eval.jsonl")],
        ctx.config.model.max_length - config.generation.max_new_tokens,
    )
    prompts = list(islice(cycle(held_out), config.prompts))
    sources = {
        "base": materialize_base(ctx.config.model, ctx.config.run.seed, ctx.work_dir),
        "sft": str(ctx.inputs["sft"]),
        "rl": str(ctx.inputs["rl"]),
    }
    rollouts, responses, finished = {}, {}, {}
    for name in POLICIES:
        rollouts[name], responses[name], finished[name] = generate_all(ctx, sources[name], prompts)

    reward_tokenizer = load_tokenizer(str(ctx.inputs["reward"]))
    reward_model = load_reward_model(str(ctx.inputs["reward"]), ctx.device, reward_tokenizer.pad_token_id)
    reward = {
        name: response_scores(reward_model, reward_tokenizer, prompts, responses[name], finished[name])
        for name in POLICIES
    }
    judged = (
        reward
        if config.judge == "reward_model"
        else {name: judge(config.judge, prompts, responses[name]) for name in POLICIES}
    )
    panels = {"reward model score": reward}
    if config.judge != "reward_model":
        panels[f"{config.judge} judge score"] = judged
    save_distributions(panels, "Scores of the held-out answers", ctx.out_dir / REWARDS_FILE)
    kl = kl_rl_to_sft(ctx, sources, rollouts["rl"])
    report = {
        "judge": JUDGES[config.judge],
        "prompts": len(prompts),
        "prompts_too_long": too_long,
        "mean_reward": {name: mean(reward[name]) for name in POLICIES},
        "mean_judge_score": {name: mean(judged[name]) for name in POLICIES},
        "win_rate_vs_sft": round(win_rate(judged["rl"], judged["sft"]), 4),
        "win_rate_sft_vs_base": round(win_rate(judged["sft"], judged["base"]), 4),
        "kl_rl_sft": round(kl, 4),
        "response_length": {name: mean([float(len(r.split())) for r in responses[name]]) for name in POLICIES},
        "finished_fraction": {name: mean([float(done) for done in finished[name]]) for name in POLICIES},
        "distinct_1": {name: distinct_n(responses[name], 1) for name in POLICIES},
        "distinct_2": {name: distinct_n(responses[name], 2) for name in POLICIES},
        "repeated_word_rate": {name: repeated_word_rate(responses[name]) for name in POLICIES},
        "reward_model_eval_accuracy": ctx.input_manifest("reward").metrics.get("eval_accuracy"),
    }
    samples = [
        {"prompt": prompts[i][-1]["content"], **{name: responses[name][i] for name in POLICIES}}
        for i in range(min(config.samples, len(prompts)))
    ]
    scores = {name: [round(score, 6) for score in judged[name]] for name in POLICIES}
    (ctx.out_dir / "report.json").write_text(
        json.dumps(report | {"samples": samples, "judge_scores": scores}, indent=2)
    )
    (ctx.out_dir / "report.md").write_text(markdown_report(report, samples))
    return report


@torch.no_grad()
def kl_rl_to_sft(ctx: StageContext, sources: dict[str, str], rl_rollouts: list[Rollout]) -> float:
    """Monte-Carlo KL(RL ‖ SFT): mean over RL's own samples of Σ_t log π_RL − log π_SFT, with π_RL the
    distribution that was sampled (top-k applied) and π_SFT restricted to the same tokens, as PPO's penalty
    measures it."""
    rl_policy = load_policy(sources["rl"], ctx.device).eval()
    sft_policy = load_policy(sources["sft"], ctx.device).eval()
    generation = ctx.config.evaluate.generation
    total, count = 0.0, 0
    for rollout in rl_rollouts:
        rl_logprobs, support = response_logprobs(rl_policy, rollout, generation)
        difference = rl_logprobs - reference_logprobs(sft_policy, rollout, generation, support)
        total += (difference * rollout.response_mask).sum().item()
        count += rollout.response_ids.shape[0]
    return total / count


def markdown_report(report: dict[str, Any], samples: list[dict[str, str]]) -> str:
    lines = [
        "# Evaluation report",
        "",
        f"Judge: {report['judge']}; {report['prompts']} held-out prompts.",
        "",
        "| | base | SFT | RL |",
        "|---|---|---|---|",
        "| mean reward (reward model) | " + " | ".join(f"{report['mean_reward'][n]:.3f}" for n in POLICIES) + " |",
        "| mean judge score | " + " | ".join(f"{report['mean_judge_score'][n]:.3f}" for n in POLICIES) + " |",
        "| response length (words) | " + " | ".join(f"{report['response_length'][n]:.1f}" for n in POLICIES) + " |",
        "| distinct-1 / distinct-2 | "
        + " | ".join(f"{report['distinct_1'][n]:.3f} / {report['distinct_2'][n]:.3f}" for n in POLICIES)
        + " |",
        "| repeated-word rate | " + " | ".join(f"{report['repeated_word_rate'][n]:.3f}" for n in POLICIES) + " |",
        "",
        f"- win rate of RL over SFT: **{report['win_rate_vs_sft']:.3f}**",
        f"- KL(RL ‖ SFT): {report['kl_rl_sft']:.3f} nats per response",
        f"- reward model held-out accuracy: {report['reward_model_eval_accuracy']}",
        "",
        f"![Score distributions of the base, SFT and RL answers]({REWARDS_FILE})",
        "",
        "## Side by side",
        "",
    ]
    for sample_row in samples:
        lines += [f"**Prompt:** {sample_row['prompt']}", ""]
        lines += [f"- *{name}:* {sample_row[name]}" for name in POLICIES]
        lines.append("")
    return "\n".join(lines)
