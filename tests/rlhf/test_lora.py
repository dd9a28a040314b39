"""LoRA and QLoRA in every training stage: adapters merged or kept, PPO's reference as the disabled adapter,
rejection sampling's one adapter through all rounds, and QLoRA refused where there is no GPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load as load_weights
from trl.trainer.utils import create_model_from_path, get_config_model_id

from rlhf_pipeline.stages.core.artifacts import read_verified
from rlhf_pipeline.stages.core.config_loading import load_config
from rlhf_pipeline.stages.core.errors import InputError
from rlhf_pipeline.stages.core.store import LocalStore
from rlhf_pipeline.stages.modeling.loading import load_policy, load_tokenizer, materialize_base, policy_source
from rlhf_pipeline.stages.modeling.lora import fetch_artifacts
from rlhf_pipeline.stages.runner import run_stage
from rlhf_pipeline.stages.tools.chat import fetch_model
from tests.conftest import TINY

CPU = torch.device("cpu")


def _files(manifest) -> set[str]:
    return {entry.path for entry in manifest.files}


def _run(store: LocalStore, *overrides: str, stages=("prepare", "sft", "reward", "rl")) -> dict:
    config = load_config(None, [*TINY, f"run.store={store.uri}", *overrides])
    return {stage: run_stage(stage, config, store)[0] for stage in stages}


def _fetched(store: LocalStore, manifests: dict, tmp_path, *overrides: str) -> dict:
    """Artifacts fetched as a later stage sees them: kept adapters linked to their local bases."""
    config = load_config(None, [*TINY, *overrides])
    return fetch_artifacts(
        {name: (store, f"artifacts/{name}/{manifest.cache_key}") for name, manifest in manifests.items()},
        tmp_path / "inputs",
        lambda: materialize_base(config.model, config.run.seed, tmp_path),
    )


def test_sft_with_lora_trains_adapters_and_saves_a_merged_model(tmp_path):
    store = LocalStore(tmp_path / "store")
    manifests = _run(store, "sft.lora.r=8", "sft.learning_rate=1e-2", stages=("prepare", "sft"))
    assert "model.safetensors" in _files(manifests["sft"]) and "adapter_config.json" not in _files(manifests["sft"])
    assert manifests["sft"].metrics["last_loss"] < manifests["sft"].metrics["first_loss"]


def test_kept_adapter_applied_to_its_base_is_the_merged_model(tmp_path):
    """`merge: false` stores only the adapter; loading it onto its base gives exactly the merged model."""
    store = LocalStore(tmp_path / "store")
    lora = ["sft.lora.r=8", "sft.learning_rate=1e-2", "sft.max_steps=20"]
    merged = _run(store, *lora, stages=("prepare", "sft"))["sft"]
    kept = _run(store, *lora, "sft.lora.merge=false", stages=("prepare", "sft"))["sft"]
    assert _files(kept) >= {"adapter_model.safetensors", "adapter_config.json"}
    assert "model.safetensors" not in _files(kept)
    cards = [read_verified(store, f"artifacts/sft/{m.cache_key}", "README.md").decode() for m in (merged, kept)]
    assert "library_name: transformers" in cards[0] and "library_name: peft" in cards[1]
    adapter_bytes = sum(f.size for f in kept.files if f.path.startswith("adapter_model"))
    assert adapter_bytes < 0.5 * next(f.size for f in merged.files if f.path == "model.safetensors")
    timing = {"train_seconds"}
    # same training, only the saving differs
    assert {k: v for k, v in kept.metrics.items() if k not in timing} == {
        k: v for k, v in merged.metrics.items() if k not in timing
    }

    merged_dir = _fetched(store, {"sft": merged}, tmp_path / "a")["sft"]
    kept_dir = _fetched(store, {"sft": kept}, tmp_path / "b")["sft"]
    assert json.loads((kept_dir / "adapter_config.json").read_text())["base_model_name_or_path"] == str(
        tmp_path / "b" / "base-model"
    )
    tokenizer = load_tokenizer(str(kept_dir))
    batch = tokenizer(["<|user|> tell me about the sea <|end|>"], return_tensors="pt")
    # TRL's DPO, GRPO and RLOO build their reference again from the policy's path: the SFT model, not its base.
    policy = load_policy(policy_source({"sft": kept_dir}, rebuilt_reference=True), CPU)
    reference = create_model_from_path(get_config_model_id(policy.config))
    with torch.no_grad():
        expected = load_policy(str(merged_dir), CPU)(**batch).logits
        for model in (policy, reference):
            torch.testing.assert_close(model(**batch).logits, expected, rtol=1e-4, atol=1e-4)
        base = load_policy(str(tmp_path / "b" / "base-model"), CPU)(**batch).logits
    assert (base - expected).abs().max() > 1e-2  # the adapter changed the model


def test_dpo_on_a_kept_sft_adapter_measures_against_the_sft_model(tmp_path):
    """The first step's policy is its reference: DPO's implicit rewards are exactly 0. With the reference TRL built
    from the policy's path (the base, where the SFT adapter was merged into it on load) they were not."""
    store = LocalStore(tmp_path / "store")
    sft = ["sft.lora.r=8", "sft.lora.merge=false", "sft.learning_rate=1e-2", "sft.max_steps=20"]
    dpo = ["rl.algorithm=dpo", "rl.dpo.max_steps=2", "rl.dpo.logging_steps=1", "rl.dpo.beta=1.0"]
    rl = _run(store, *sft, *dpo, stages=("prepare", "sft", "rl"))["rl"]
    history = read_verified(store, f"artifacts/rl/{rl.cache_key}", "logs/metrics-history.jsonl").decode()
    first = next(row for row in map(json.loads, history.splitlines()) if "rewards/chosen" in row)
    assert first["step"] == 1
    assert first["rewards/chosen"] == first["rewards/rejected"] == 0.0
    assert first["loss"] == pytest.approx(0.6931, abs=1e-4)  # log 2


def test_ppo_with_lora_uses_the_disabled_adapter_as_reference_and_keeps_the_adapter(tmp_path):
    """An rl adapter kept over an sft adapter kept over the base: every stage and `rlhf chat` fetch the chain."""
    store = LocalStore(tmp_path / "store")
    lora = ["rl.ppo.lora.r=8", "rl.ppo.lora.merge=false", "rl.ppo.learning_rate=2e-3"]
    lora += ["sft.lora.r=8", "sft.lora.merge=false", "sft.learning_rate=1e-2"]
    manifests = _run(store, *lora, stages=("prepare", "sft", "reward", "rl", "evaluate"))
    # the reward model fully fine-tunes the kept sft adapter merged into its base: every weight trains
    assert manifests["reward"].metrics["last_loss"] < manifests["reward"].metrics["first_loss"]
    rl = manifests["rl"]
    assert _files(rl) >= {"adapter_model.safetensors", "adapter_config.json", "ppo_history.jsonl"}
    assert "model.safetensors" not in _files(rl)
    inputs = _fetched(store, {"sft": manifests["sft"], "rl": rl}, tmp_path)
    history = [json.loads(line) for line in (inputs["rl"] / "ppo_history.jsonl").read_text().splitlines()]
    # LoRA starts as a no-op: the first rollout's policy is exactly the reference, so its KL is exactly 0.
    assert history[0]["kl"] == 0.0 and history[-1]["kl"] != 0.0
    # What moved it is the kept rl adapter: its B matrices start at zero and PPO trained them. (Its score is no
    # test here: 12 steps of 16 rollouts on the tiny model score 0.61-0.88 a step, noise around no clear trend.)
    adapter = load_weights((inputs["rl"] / "adapter_model.safetensors").read_bytes())
    trained = [tensor for name, tensor in adapter.items() if "lora_B" in name]
    assert trained and all(tensor.abs().sum() > 0 for tensor in trained)
    adapter_config = json.loads((inputs["rl"] / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(inputs["sft"])
    # in one order whatever the process's string hashing (peft holds a set): the artifact's bytes are the run's
    assert adapter_config["target_modules"] == sorted(adapter_config["target_modules"])
    # evaluate loaded the kept adapter onto the SFT model: RL's answers differ from SFT's (with the adapter left
    # out they would be SFT's own, same seeds per prompt: KL exactly 0, the same rewards). Twelve LoRA steps raise
    # PPO's own score but not the held-out reward on this tiny model (full fine-tuning does: test_pipeline_e2e).
    report = manifests["evaluate"].metrics
    assert report["kl_rl_sft"] != 0 and report["mean_reward"]["rl"] != report["mean_reward"]["sft"]
    # `rlhf chat` follows the lineage from the rl artifact alone: the same chain, the same model
    chat_dir = fetch_model(store.uri_of(f"artifacts/rl/{rl.cache_key}"), tmp_path).path
    sft_dir = json.loads((chat_dir / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert json.loads((Path(sft_dir) / "adapter_config.json").read_text())["base_model_name_or_path"] != "model:base"
    tokenizer = load_tokenizer(str(chat_dir))
    batch = tokenizer(["<|user|> tell me about the sea <|end|>"], return_tensors="pt")
    with torch.no_grad():
        expected = load_policy(str(inputs["rl"]), CPU)(**batch).logits
        actual = load_policy(str(chat_dir), CPU)(**batch).logits
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


def test_rejection_sampling_trains_one_adapter_through_all_rounds(tmp_path):
    store = LocalStore(tmp_path / "store")
    overrides = [
        "rl.algorithm=rejection_sampling",
        "rl.rejection_sampling.training.lora.r=8",
        "rl.rejection_sampling.training.learning_rate=1e-2",
    ]
    rl = _run(store, *overrides)["rl"]
    assert _files(rl) >= {"model.safetensors", "rounds.jsonl"}  # merged (the default)
    assert "adapter_config.json" not in _files(rl)
    assert rl.metrics["steps"] == 2
    assert rl.metrics["last_best_score"] > rl.metrics["last_score"]  # best of n beats the average


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        (["sft.lora.quantize=4bit"], "sft.lora.quantize"),
        (["reward.lora.quantize=8bit"], "reward.lora.quantize"),
    ],
)
def test_qlora_without_a_gpu_is_an_input_error(tmp_path, overrides, field):
    store = LocalStore(tmp_path / "store")
    with pytest.raises(InputError, match=rf"{field}: QLoRA needs a CUDA GPU and the bitsandbytes package"):
        _run(store, *overrides, stages=("prepare", "sft", "reward"))


@pytest.mark.parametrize("task_type", ["CAUSAL_LM", "SEQ_CLS"])
def test_qlora_merge_goes_into_the_unquantized_base(tmp_path, task_type):
    """What a QLoRA stage saves with `merge: true`: the adapter merged into the base reloaded without
    quantization, equal to merging in place (here on CPU, where the trained base is not quantized)."""
    from rlhf_pipeline.stages.core.config import LoraConfig, ModelConfig
    from rlhf_pipeline.stages.modeling.loading import load_scorer
    from rlhf_pipeline.stages.modeling.lora import AdapterBase, with_adapter
    from rlhf_pipeline.stages.modeling.saving import save_model
    from rlhf_pipeline.stages.modeling.tiny_model import save_tiny_llama

    base = tmp_path / "base"
    save_tiny_llama(ModelConfig(tiny={"hidden_size": 16, "num_layers": 1, "num_heads": 2}), 0, base)
    tokenizer = load_tokenizer(str(base))
    load = load_policy if task_type == "CAUSAL_LM" else lambda p, d: load_scorer(p, d, tokenizer.pad_token_id)
    model = with_adapter(load(str(base), CPU), LoraConfig(r=4), task_type)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_()
    saved = AdapterBase(str(base), "model:base")
    save_model(model, tokenizer, tmp_path / "qlora", LoraConfig(r=4, quantize="4bit"), saved)
    save_model(model, tokenizer, tmp_path / "plain", LoraConfig(r=4), saved)
    batch = tokenizer(["<|user|> tell me about the sea <|end|>"], return_tensors="pt")
    with torch.no_grad():
        expected = load(str(tmp_path / "plain"), CPU)(**batch).logits
        actual = load(str(tmp_path / "qlora"), CPU)(**batch).logits
    assert not (tmp_path / "qlora" / "adapter_config.json").exists()
    torch.testing.assert_close(actual, expected)


def test_multi_aspect_reward_refuses_a_kept_adapter():
    with pytest.raises(InputError, match="multi_aspect' folds its heads into one"):
        load_config(None, ["reward.kind=multi_aspect", "data.rated=builtin:demo", "reward.lora.merge=false"])
