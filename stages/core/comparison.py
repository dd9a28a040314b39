"""Several alignment methods of one run, side by side: each method's evaluation (judge score, reward, KL to SFT,
length, win rates, answer diversity), the win rate of each method against each other on the same held-out
prompts, and where each lands on the reward/KL frontier.

Every method's `evaluate` answers the same prompts with the same seed from the same SFT policy, so their
per-prompt judge scores (report.json's `judge_scores`) can be set against each other directly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rlhf_pipeline.stages.core.plots import save_frontier

FRONTIER_FILE = "frontier.png"
# What the table shows of each method's policy, from its evaluation report: (report field, column heading).
COLUMNS = (
    ("mean_judge_score", "judge score"),
    ("mean_reward", "reward (RM)"),
    ("kl_rl_sft", "KL to SFT"),
    ("response_length", "length (words)"),
    ("win_rate_vs_sft", "win rate vs SFT"),
    ("distinct_1", "distinct-1"),
    ("distinct_2", "distinct-2"),
    ("repeated_word_rate", "repeated words"),
    ("finished_fraction", "ended turn"),
)
REFERENCE = "sft"  # the policy every method starts from, shown as the first row


def win_rate(candidate: list[float], baseline: list[float]) -> float:
    """Share of prompts where the candidate's answer scores higher; ties count half."""
    wins = sum(1.0 if c > b else 0.5 if c == b else 0.0 for c, b in zip(candidate, baseline, strict=True))
    return wins / len(candidate)


def policy_row(report: dict[str, Any], policy: str) -> dict[str, float | None]:
    """One policy's numbers from an evaluation report; per-policy fields are keyed base/sft/rl, and the numbers
    about the RL policy alone (its KL to SFT, its win rate over SFT) are 0 and none for SFT itself."""
    row: dict[str, float | None] = {}
    for field, _ in COLUMNS:
        value = report[field]
        if isinstance(value, dict):
            row[field] = value[policy]
        else:
            row[field] = value if policy == "rl" else 0.0 if field == "kl_rl_sft" else None
    return row


def compare_methods(reports: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The comparison of a run's methods from their evaluation reports (report.json of each `evaluate`)."""
    first = next(iter(reports.values()))
    scores = {method: report["judge_scores"]["rl"] for method, report in reports.items()}
    return {
        "judge": first["judge"],
        "prompts": first["prompts"],
        "policies": {REFERENCE: policy_row(first, REFERENCE)}
        | {method: policy_row(report, "rl") for method, report in reports.items()},
        "win_rates": {
            method: {other: round(win_rate(scores[method], scores[other]), 4) for other in reports if other != method}
            for method in reports
        },
    }


def comparison_markdown(comparison: dict[str, Any], frontier: str | None = FRONTIER_FILE) -> str:
    headings = [heading for _, heading in COLUMNS]
    lines = [
        "# Alignment methods compared",
        "",
        f"Judge: {comparison['judge']}; {comparison['prompts']} held-out prompts, the same for every method.",
        "",
        "| policy | " + " | ".join(headings) + " |",
        "|---" * (len(headings) + 1) + "|",
    ]
    for policy, row in comparison["policies"].items():
        cells = ["-" if row[field] is None else f"{row[field]:.3f}" for field, _ in COLUMNS]
        lines.append(f"| {policy} | " + " | ".join(cells) + " |")
    methods = list(comparison["win_rates"])
    lines += ["", "Win rate of the row's answers over the column's, prompt by prompt (ties count half):", ""]
    lines += ["| | " + " | ".join(methods) + " |", "|---" * (len(methods) + 1) + "|"]
    for method in methods:
        cells = ["-" if other == method else f"{comparison['win_rates'][method][other]:.3f}" for other in methods]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    if frontier:
        lines += ["", f"![Judge score against KL to SFT for each method]({frontier})"]
    return "\n".join(lines) + "\n"


def save_comparison_frontier(comparison: dict[str, Any], path: Path) -> None:
    """Judge score against KL(policy ‖ SFT): up and to the left is better; SFT sits at KL 0."""
    points = {
        policy: (float(row["kl_rl_sft"] or 0.0), float(row["mean_judge_score"] or 0.0))
        for policy, row in comparison["policies"].items()
    }
    save_frontier(points, "KL to SFT (nats per answer)", "mean judge score", path)
