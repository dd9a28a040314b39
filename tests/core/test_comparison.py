"""Several methods of one run compared from their evaluation reports: the table, the win rates of each method
over each other prompt by prompt, and the frontier plot."""

from rlhf_pipeline.stages.core.comparison import compare_methods, comparison_markdown, save_comparison_frontier


def report(rl_scores: list[float], kl: float, distinct_1: float) -> dict:
    per_policy = {"base": 0.1, "sft": 0.4}
    return {
        "judge": "demo gold judge",
        "prompts": len(rl_scores),
        "mean_judge_score": per_policy | {"rl": sum(rl_scores) / len(rl_scores)},
        "mean_reward": per_policy | {"rl": 1.0},
        "kl_rl_sft": kl,
        "response_length": {"base": 9.0, "sft": 8.0, "rl": 7.0},
        "win_rate_vs_sft": 0.6,
        "distinct_1": {"base": 0.5, "sft": 0.4, "rl": distinct_1},
        "distinct_2": {"base": 0.7, "sft": 0.6, "rl": 0.5},
        "repeated_word_rate": {"base": 0.0, "sft": 0.1, "rl": 0.2},
        "finished_fraction": {"base": 0.5, "sft": 0.9, "rl": 1.0},
        "judge_scores": {"base": [0.0] * 4, "sft": [0.4] * 4, "rl": rl_scores},
    }


def test_methods_are_set_against_each_other_prompt_by_prompt(tmp_path):
    comparison = compare_methods(
        {"ppo": report([1.0, 0.0, 0.5, 0.5], kl=2.5, distinct_1=0.1), "dpo": report([0.0, 1.0, 0.2, 0.5], 0.8, 0.3)}
    )
    assert list(comparison["policies"]) == ["sft", "ppo", "dpo"]
    assert comparison["policies"]["sft"]["kl_rl_sft"] == 0.0 and comparison["policies"]["sft"]["distinct_1"] == 0.4
    assert comparison["policies"]["sft"]["win_rate_vs_sft"] is None
    assert comparison["policies"]["ppo"]["kl_rl_sft"] == 2.5 and comparison["policies"]["dpo"]["distinct_1"] == 0.3
    # ppo wins prompts 1 and 3, loses 2, ties 4: (1 + 0 + 1 + 0.5) / 4
    assert comparison["win_rates"] == {"ppo": {"dpo": 0.625}, "dpo": {"ppo": 0.375}}
    markdown = comparison_markdown(comparison)
    assert "| ppo | 0.500 | 1.000 | 2.500 | 7.000 | 0.600 | 0.100 |" in markdown
    assert "| sft | 0.400 | 0.400 | 0.000 | 8.000 | - |" in markdown
    assert "| ppo | - | 0.625 |" in markdown and "| dpo | 0.375 | - |" in markdown
    assert "![Judge score against KL to SFT for each method](frontier.png)" in markdown
    assert "frontier.png" not in comparison_markdown(comparison, frontier=None)
    save_comparison_frontier(comparison, tmp_path / "frontier.png")
    assert (tmp_path / "frontier.png").read_bytes().startswith(b"\x89PNG")
