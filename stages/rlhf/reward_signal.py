"""The reward as the RL stages see it: the trained reward model, or Llama 2's pair of models.

With a safety model beside the helpfulness model, the reward is the safety score where the safety model is
worried (σ(r_safety) < threshold) and the helpfulness score elsewhere, both as logits (Llama 2, section 3.2.2).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import PreTrainedModel
from transformers.modeling_outputs import SequenceClassifierOutput

from rlhf_pipeline.stages.modeling.loading import load_scorer

SAFETY_DIR = "safety"
GATE_FILE = "reward_gate.json"


class GatedReward(torch.nn.Module):
    def __init__(self, helpfulness: PreTrainedModel, safety: PreTrainedModel, threshold: float) -> None:
        super().__init__()
        self.helpfulness = helpfulness
        self.safety = safety
        self.threshold = threshold

    @property
    def device(self) -> torch.device:
        return self.helpfulness.device

    def forward(self, **inputs) -> SequenceClassifierOutput:
        helpful = self.helpfulness(**inputs).logits[:, :1]
        safe = self.safety(**inputs).logits[:, :1]
        return SequenceClassifierOutput(logits=torch.where(torch.sigmoid(safe) < self.threshold, safe, helpful))


def load_reward_model(source: str, device: torch.device, pad_token_id: int, shards: int = 1) -> torch.nn.Module:
    """The reward stage's artifact as one scorer: `model(**batch).logits[:, 0]` is the reward. Over `shards`
    processes it is sharded as it loads: each process scores its own batches, and every process must call it
    as many times as the others (each call gathers the weights)."""
    helpfulness = load_scorer(source, device, pad_token_id, shards=shards).eval()
    gate = Path(source) / GATE_FILE
    if not gate.exists():
        return helpfulness
    safety = load_scorer(str(Path(source) / SAFETY_DIR), device, pad_token_id, shards=shards).eval()
    return GatedReward(helpfulness, safety, json.loads(gate.read_text())["safety_threshold"]).eval()
