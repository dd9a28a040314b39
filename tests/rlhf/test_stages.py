"""Stage internals that the end-to-end numbers rest on: prompt masking in SFT, the demo's gold judge,
the built-in model and tokenizer, generation masks."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from trl import SFTConfig, SFTTrainer

from rlhf_pipeline.stages.core.config import GenerationConfig, ModelConfig
from rlhf_pipeline.stages.core.config_loading import load_config
from rlhf_pipeline.stages.core.store import LocalStore
from rlhf_pipeline.stages.data import demo_task
from rlhf_pipeline.stages.data.rows import sft_as_prompt_completion
from rlhf_pipeline.stages.modeling.loading import load_policy, load_tokenizer
from rlhf_pipeline.stages.modeling.tiny_model import save_tiny_llama
from rlhf_pipeline.stages.reward import pairs_dataset
from rlhf_pipeline.stages.rlhf.rollout import decode_responses, sample
from rlhf_pipeline.stages.runner import run_stage
from tests.conftest import ROUNDED_METRIC, TINY, forced_token


def _tiny(tmp_path):
    save_tiny_llama(ModelConfig(tiny={"hidden_size": 16, "num_layers": 1, "num_heads": 2}), 0, tmp_path / "m")
    return str(tmp_path / "m")


def test_sft_computes_loss_on_assistant_tokens_only(tmp_path):
    source = _tiny(tmp_path)
    tokenizer = load_tokenizer(source)
    row = {
        "messages": [
            {"role": "user", "content": "describe the cat today ."},
            {"role": "assistant", "content": "the cat is kind , warm and calm ."},
        ]
    }
    trainer = SFTTrainer(
        model=load_policy(source, torch.device("cpu")),
        args=SFTConfig(
            output_dir=str(tmp_path / "out"), completion_only_loss=True, report_to="none", use_cpu=True, max_length=64
        ),
        train_dataset=Dataset.from_list([sft_as_prompt_completion(row)]),
        processing_class=tokenizer,
    )
    batch = trainer.data_collator([trainer.train_dataset[0]])
    labels = batch["labels"][0]
    trained = labels[labels != -100].tolist()
    assert tokenizer.decode(trained) == "the cat is kind , warm and calm . <|end|>"
    prompt_length = len(tokenizer.apply_chat_template(row["messages"][:1], add_generation_prompt=True, tokenize=True))
    assert (labels[:prompt_length] == -100).all()


def test_gold_judge_rewards_on_topic_kind_answers():
    prompt = "describe the cat today ."
    assert demo_task.gold_score(prompt, "the cat is kind , warm and calm .") == 2.0
    assert demo_task.gold_score(prompt, "the cat is rude , cold and sad .") == 0.0
    assert demo_task.gold_score(prompt, "the dog is kind , warm and calm .") == 1.0
    assert demo_task.gold_score(prompt, "the cat is kind , cold and calm .") == 1.0 + 1 / 3


def test_demo_preferences_agree_with_the_gold_judge():
    for row in demo_task.preference_rows(200, seed=3):
        prompt = row["prompt"][0]["content"]
        chosen, rejected = row["chosen"][0]["content"], row["rejected"][0]["content"]
        assert demo_task.gold_score(prompt, chosen) > demo_task.gold_score(prompt, rejected)


def test_builtin_model_is_deterministic_and_round_trips_text(tmp_path):
    config = ModelConfig(tiny={"hidden_size": 16, "num_layers": 1, "num_heads": 2})
    save_tiny_llama(config, 7, tmp_path / "a")
    save_tiny_llama(config, 7, tmp_path / "b")
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()
    tokenizer = load_tokenizer(str(tmp_path / "a"))
    text = "the cat is kind , warm and calm ."
    assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text


def test_sampled_responses_are_masked_after_end_of_turn(tmp_path):
    """Every response ends its turn at the third token here (forced): the end token is kept, what follows it is
    padding and masked; prompts of different lengths are left-padded to end at the same column."""
    source = _tiny(tmp_path)
    tokenizer = load_tokenizer(source)
    policy = load_policy(source, torch.device("cpu"))
    prompts = [[{"role": "user", "content": "describe the cat today ."}], [{"role": "user", "content": "hi"}]] * 3
    with forced_token(policy, tokenizer.eos_token_id, step=2):
        rollout = sample(policy, tokenizer, prompts, GenerationConfig(max_new_tokens=8), list(range(6)))
    assert rollout.prompt_mask[1].tolist().count(0) > 0 and (rollout.prompt_mask[:, -1] == 1).all()
    assert rollout.finished.all() and (rollout.response_ids[:, 2] == tokenizer.eos_token_id).all()
    assert rollout.response_mask.tolist() == [[1, 1, 1, 0, 0, 0, 0, 0][: rollout.response_ids.shape[1]]] * 6
    assert (rollout.response_ids[:, 3:] == tokenizer.pad_token_id).all()
    assert len(decode_responses(tokenizer, rollout)) == 6


def test_gated_reward_uses_the_safety_score_where_the_safety_model_is_worried():
    from transformers.modeling_outputs import SequenceClassifierOutput

    from rlhf_pipeline.stages.rlhf.reward_signal import GatedReward

    class Fixed(torch.nn.Module):
        def __init__(self, scores):
            super().__init__()
            self.scores = torch.tensor(scores).unsqueeze(1)

        def forward(self, **_):
            return SequenceClassifierOutput(logits=self.scores)

    helpfulness = Fixed([2.0, 2.0, -1.0])
    safety = Fixed([-3.0, 1.0, -1.5])
    rewards = GatedReward(helpfulness, safety, threshold=0.15)(input_ids=None).logits[:, 0]
    # σ(-3) = 0.047 < 0.15: the safety score; σ(1) = 0.73 and σ(-1.5) = 0.18: the helpfulness score.
    assert rewards.tolist() == [-3.0, 2.0, -1.0]


def test_activation_checkpointing_recomputes_activations_and_trains_to_the_same_numbers(tmp_path, monkeypatch):
    """`gradient_checkpointing` trades compute for memory only: SFT, the reward model and PPO recompute their
    layers in the backward pass and reach the same losses and scores as without it."""
    import transformers.modeling_utils as modeling

    recomputed = []
    checkpoint = modeling.checkpoint
    monkeypatch.setattr(modeling, "checkpoint", lambda *a, **k: recomputed.append(1) or checkpoint(*a, **k))
    short = ["sft.max_steps=8", "reward.max_steps=8", "rl.ppo.steps=2"]
    flags = [f"{section}.gradient_checkpointing=true" for section in ("sft", "reward", "rl.ppo")]
    runs, recomputed_in = {}, {}
    for name, overrides in {"plain": short, "checkpointed": [*short, *flags]}.items():
        store = LocalStore(tmp_path / name)
        config = load_config(None, [*TINY, *overrides, f"run.store={store.uri}"])
        runs[name] = {}
        for stage in ("prepare", "sft", "reward", "rl"):
            before = len(recomputed)
            runs[name][stage] = run_stage(stage, config, store)[0].metrics
            recomputed_in[name, stage] = len(recomputed) - before
    assert all(recomputed_in["plain", stage] == 0 for stage in ("sft", "reward", "rl"))
    assert all(recomputed_in["checkpointed", stage] > 0 for stage in ("sft", "reward", "rl"))
    for stage, keys in {
        "sft": ("eval_loss",),
        "reward": ("eval_loss", "eval_accuracy"),
        "rl": ("last_score", "last_kl", "last_policy_loss", "last_value_loss"),
    }.items():
        for key in keys:
            plain = runs["plain"][stage][key]
            assert runs["checkpointed"][stage][key] == pytest.approx(plain, rel=1e-3, abs=ROUNDED_METRIC)


def test_win_rate_counts_ties_half():
    from rlhf_pipeline.stages.core.comparison import win_rate

    assert win_rate([2.0, 1.0, 0.5, 0.0], [1.0, 1.0, 1.0, 0.0]) == (1 + 0.5 + 0 + 0.5) / 4
    assert win_rate([0.0, 0.0], [1.0, 2.0]) == 0.0


def test_diversity_shows_a_policy_that_collapses_onto_a_few_words():
    from rlhf_pipeline.stages.evaluate import distinct_n, repeated_word_rate

    varied = ["the cat sat on a mat", "dogs bark at night"]
    collapsed = ["lovely and lovely .", "lovely and lovely ."]
    assert distinct_n(varied, 1) == 1.0 and distinct_n(varied, 2) == 1.0 and repeated_word_rate(varied) == 0.0
    assert distinct_n(collapsed, 1) == 3 / 8  # lovely, and, . over 8 words
    assert distinct_n(collapsed, 2) == 3 / 6  # (lovely and) (and lovely) (lovely .) over 6 bigrams
    assert repeated_word_rate(collapsed) == 2 / 8  # the second "lovely" of each answer
    assert repeated_word_rate(["Lovely lovely"]) == 0.5 and distinct_n([""], 2) == 0.0


def test_pairs_with_and_without_a_margin_train_together_in_either_order():
    """Sources with a margin (SHP) beside sources without (HH-RLHF): every pair reaches TRL's collator with a
    number, 0 (the plain loss) where it had none; the first row decided the columns before."""
    plain = {
        "prompt": [{"role": "user", "content": "hi"}],
        "chosen": [{"role": "assistant", "content": "hello"}],
        "rejected": [{"role": "assistant", "content": "go away"}],
    }
    rated = plain | {"margin": 2.5}
    for rows in ([plain, rated], [rated, plain]):
        assert sorted(pairs_dataset(rows)["margin"]) == [0.0, 2.5]
    assert "margin" not in pairs_dataset([plain]).column_names
