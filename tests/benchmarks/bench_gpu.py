"""GPU figures per stage, for a machine with a CUDA GPU (not part of `make test`).

Runs the demo pipeline's stages (`runner.run_stage`, a local store, no Prefect: the GPU machine needs only
the training stack) on a randomly initialised Llama of about 0.5 B parameters in bf16, with GPT-2's BPE
tokenizer from `make assets`, and reports per training stage the tokens trained on per second and the MFU
(model FLOPs utilisation) against the card's dense bf16 peak, naming the card. `--variants full checkpointing qlora`
trains the same stages again with activation checkpointing, and with 4-bit QLoRA adapters (needs bitsandbytes).

FLOPs counted (N = all parameters, T = tokens including padding, as the stages report them):
- sft, reward: 6·N·T (forward and backward);
- rl (PPO): per rollout token, generation, the policy's and the reference's log-probs, the value and the reward
  model's scores (5 forwards, 2·N each) plus `ppo_epochs` forward+backward passes of policy and value model
  (2 · 6·N each): N·T·(10 + 12·ppo_epochs);
- rl with DPO: the policy's forward and backward and the reference's forward on every token: 8·N·T;
- rl with GRPO or RLOO (T: prompt and completion tokens TRL counts): generation, the reference's and the reward
  model's forwards and the policy's forward and backward: about 12·N·T;
- rl with rejection sampling reports no trained-token count (generation dominates): seconds only.

After the pipeline with PPO, every other RL algorithm (rejection sampling, DPO, GRPO, RLOO) runs `rl` and
`evaluate` on the same prepare/sft/reward artifacts (rows `rl:<algorithm>`, `evaluate:<algorithm>`), so that a
lent GPU checks them all. The results name the precision: trained weights fp32, bf16 autocast where supported.

Usage: python tests/benchmarks/bench_gpu.py [--hidden 1024 --layers 24 --heads 16 --intermediate 4096]
       [--device cuda] [--variants full checkpointing qlora] [--stages ...] [--out DIR]
       (CPU dry run: --hidden 64 --layers 2 --heads 4 --intermediate 128 --device cpu --small)
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from rlhf_pipeline.stages.core.registry import STAGE_NAMES  # noqa: E402

# Dense bf16 peak of the cards this project is measured on (no sparsity), by name as CUDA reports it.
PEAK_BF16_FLOPS = {"H100 PCIe": 756e12, "H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12}

GPU_SETTINGS = [
    "sft.epochs=2",
    "sft.batch_size=128",
    "reward.epochs=1",
    "reward.batch_size=128",
    "rl.ppo.steps=12",
    "rl.ppo.batch_size=256",
    "rl.ppo.mini_batch_size=64",
    "rl.ppo.generation.max_new_tokens=32",
    "evaluate.prompts=256",
    "evaluate.generation.max_new_tokens=32",
    "model.max_length=96",
]
SMALL_SETTINGS = [
    "data.demo.sft_rows=200",
    "data.demo.preference_rows=200",
    "data.demo.prompt_rows=100",
    "model.max_length=40",
    "sft.max_steps=3",
    "sft.batch_size=4",
    "reward.max_steps=3",
    "reward.batch_size=4",
    "rl.ppo.steps=2",
    "rl.ppo.batch_size=4",
    "rl.ppo.mini_batch_size=2",
    "rl.ppo.generation.max_new_tokens=8",
    "evaluate.prompts=4",
    "evaluate.generation.max_new_tokens=8",
]
CHECKPOINTING_SETTINGS = [
    "sft.gradient_checkpointing=true",
    "reward.gradient_checkpointing=true",
    "rl.ppo.gradient_checkpointing=true",
]
# The other RL algorithms, each sized like the PPO stage above.
ALGORITHM_SETTINGS = {
    "rejection_sampling": [
        "rl.rejection_sampling.rounds=1",
        "rl.rejection_sampling.prompts_per_round=256",
        "rl.rejection_sampling.samples_per_prompt=4",
        "rl.rejection_sampling.generation.max_new_tokens=32",
        "rl.rejection_sampling.training.batch_size=64",
    ],
    "dpo": ["rl.dpo.max_steps=20", "rl.dpo.batch_size=64"],
    "grpo": ["rl.grpo.max_steps=10", "rl.grpo.batch_size=64", "rl.grpo.generation.max_new_tokens=32"],
    "rloo": ["rl.rloo.max_steps=10", "rl.rloo.batch_size=64", "rl.rloo.generation.max_new_tokens=32"],
}
SMALL_ALGORITHM_SETTINGS = {
    "rejection_sampling": [
        "rl.rejection_sampling.rounds=1",
        "rl.rejection_sampling.prompts_per_round=4",
        "rl.rejection_sampling.samples_per_prompt=2",
        "rl.rejection_sampling.generation.max_new_tokens=8",
        "rl.rejection_sampling.training.max_steps=2",
    ],
    "dpo": ["rl.dpo.max_steps=2", "rl.dpo.batch_size=4"],
    "grpo": [
        "rl.grpo.max_steps=2",
        "rl.grpo.batch_size=4",
        "rl.grpo.num_generations=4",
        "rl.grpo.generation.max_new_tokens=8",
    ],
    "rloo": [
        "rl.rloo.max_steps=2",
        "rl.rloo.batch_size=4",
        "rl.rloo.num_generations=4",
        "rl.rloo.generation.max_new_tokens=8",
    ],
}
FLOPS_PER_PARAMETER_TOKEN = {"sft": 6, "reward": 6, "dpo": 8, "grpo": 12, "rloo": 12}

QLORA_SETTINGS = [
    "sft.lora.quantize=4bit",
    "reward.lora.quantize=4bit",
    "rl.ppo.lora.quantize=4bit",
    "sft.learning_rate=2e-4",
    "reward.learning_rate=1e-4",
]


def build_model(args: argparse.Namespace, out: Path) -> int:
    """A random Llama with GPT-2's tokenizer, saved as an ordinary checkpoint; returns its parameter count."""
    import torch
    from transformers import GPT2TokenizerFast, LlamaConfig, LlamaForCausalLM

    tokenizer = GPT2TokenizerFast.from_pretrained(REPO / ".assets" / "gpt2-tokenizer")
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return sum(p.numel() for p in model.parameters())


def warm_up(base: Path, device: str) -> None:
    """A forward and backward pass before anything is timed, so the first stage measured does not pay for the
    CUDA context and cuBLAS start-up (nothing to warm up on a CPU, where bf16 logits over GPT-2's vocabulary
    would take minutes)."""
    import torch
    from transformers import AutoModelForCausalLM

    if device != "cuda":
        return
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16).to(device)
    tokens = torch.randint(0, model.config.vocab_size, (64, 96), device=device)
    model(input_ids=tokens, labels=tokens).loss.backward()
    del model
    torch.cuda.synchronize()
    torch.cuda.empty_cache()


def stage_flops(stage: str, algorithm: str, metrics: dict, parameters: int, ppo_epochs: int) -> float | None:
    tokens = metrics.get("train_tokens")
    if not tokens:
        return None
    if stage == "rl" and algorithm == "ppo":
        return parameters * tokens * (10 + 12 * ppo_epochs)
    factor = FLOPS_PER_PARAMETER_TOKEN.get(algorithm if stage == "rl" else stage)
    return factor * parameters * tokens if factor else None


def run_stages(
    overrides: list[str], stages: list[str], work: Path, parameters: int, peak: float | None, label: str = ""
) -> list[dict]:
    from rlhf_pipeline.stages.core.config_loading import load_config
    from rlhf_pipeline.stages.core.store import LocalStore
    from rlhf_pipeline.stages.runner import run_stage

    config = load_config(None, [*overrides, f"run.store={work / 'store'}"])
    store = LocalStore(work / "store")
    rows = []
    for stage in stages:
        started = time.monotonic()
        manifest, _ = run_stage(stage, config, store)
        row = {"stage": stage + label, "seconds": round(time.monotonic() - started, 1)}
        metrics = manifest.metrics
        if stage == "rl" and "generation_seconds" in metrics:
            row["phase_seconds"] = {
                phase: metrics[f"{phase}_seconds"]
                for phase in ("generation", "scoring", "reference_values", "optimization")
            }
        flops = stage_flops(stage, config.rl.algorithm, metrics, parameters, config.rl.ppo.ppo_epochs)
        if flops and metrics.get("train_seconds"):
            row["train_tokens"] = metrics["train_tokens"]
            row["train_seconds"] = metrics["train_seconds"]
            row["tokens_per_second"] = round(metrics["train_tokens"] / metrics["train_seconds"])
            achieved = flops / metrics["train_seconds"]
            row["tflops"] = round(achieved / 1e12, 1)
            row["mfu"] = round(achieved / peak, 4) if peak else None
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--intermediate", type=int, default=4096)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--small", action="store_true", help="a few steps of each stage (a dry run)")
    parser.add_argument(
        "--variants",
        nargs="+",
        choices=["full", "checkpointing", "qlora"],
        default=["full"],
        help="full fine-tuning; the same with activation checkpointing; 4-bit QLoRA adapters",
    )
    parser.add_argument("--stages", nargs="+", default=list(STAGE_NAMES), help="a prefix of the stages")
    parser.add_argument("--out", type=Path, help="folder for results.json")
    args = parser.parse_args()

    import torch

    from rlhf_pipeline.stages.modeling.loading import compute_dtype, weights_dtype

    card = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    peak = next((flops for name, flops in PEAK_BF16_FLOPS.items() if name in card), None)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        parameters = build_model(args, work / "base")
        print(f"{card}: random Llama, {parameters / 1e9:.3f} B parameters, peak bf16 {peak}", flush=True)
        overrides = [f"model.base={work / 'base'}", f"run.device={args.device}", "evaluate.judge=reward_model"]
        overrides += SMALL_SETTINGS if args.small else GPU_SETTINGS
        device = torch.device(args.device)
        results = {
            "card": card,
            "parameters": parameters,
            "precision": {
                "trained_weights": str(weights_dtype(device, train=True)).removeprefix("torch."),
                "compute": str(compute_dtype(device)).removeprefix("torch."),
            },
        }
        algorithms = SMALL_ALGORITHM_SETTINGS if args.small else ALGORITHM_SETTINGS
        variants = {
            "full": overrides,
            "checkpointing": [*overrides, *CHECKPOINTING_SETTINGS],
            "qlora": [*overrides, *QLORA_SETTINGS],
        }
        warm_up(work / "base", args.device)
        for variant in args.variants:
            rows = run_stages(variants[variant], args.stages, work / variant, parameters, peak)
            if variant == "full" and "evaluate" in args.stages:
                for algorithm, settings in algorithms.items():
                    overrides_for = [*variants[variant], *settings, f"rl.algorithm={algorithm}"]
                    label = f":{algorithm}"
                    rows += run_stages(overrides_for, ["rl", "evaluate"], work / variant, parameters, peak, label)
            results[variant] = rows
            if args.out:
                args.out.mkdir(parents=True, exist_ok=True)
                (args.out / "results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
