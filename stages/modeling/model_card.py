"""The model card every model artifact carries: a `README.md` in the Hugging Face format, so that the directory
uploads to a model hub as it is and a reader knows what it is: the base model, the datasets and their licences,
the stage's config, its metrics, and its lineage (the digest of every input artifact).

Wall-clock figures (seconds, throughput) stay in the manifest. Like the manifest, the card records the run: a
resumed run reports some metrics from its own history, so the card is left out of the artifact's digest
(`MODEL_CARD`), and downstream keys depend on the weights alone.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from rlhf_pipeline.stages.core.artifacts import MODEL_CARD
from rlhf_pipeline.stages.core.config import PipelineConfig
from rlhf_pipeline.stages.core.planner import StagePlan, key_sections
from rlhf_pipeline.stages.core.registry import STAGES
from rlhf_pipeline.stages.modeling.lora import ADAPTER_CONFIG

WALL_CLOCK = ("seconds", "runtime", "per_second")


def deterministic(metrics: dict[str, Any]) -> dict[str, Any]:
    return {name: value for name, value in metrics.items() if not any(word in name for word in WALL_CLOCK)}


def front_matter(config: PipelineConfig, plan: StagePlan, out_dir: Path, licenses: dict[str, str]) -> dict[str, Any]:
    kept_adapter = (out_dir / ADAPTER_CONFIG).exists()
    datasets = sorted(path for path in licenses if "/" in path and not Path(path).exists())  # Hub ids
    distinct = sorted(set(licenses.values()))
    metadata: dict[str, Any] = {
        "library_name": "peft" if kept_adapter else "transformers",
        "pipeline_tag": STAGES[plan.stage].pipeline_tag,
        "tags": ["rlhf", "trl", plan.stage] + ([config.rl.method] if plan.stage == "rl" else []),
        # The Hub wants one licence id; several, or one given as prose, are "other" (named in the card).
        "license": distinct[0] if len(distinct) == 1 and " " not in distinct[0] else "other",
    }
    if not Path(config.model.base).exists() and ":" not in config.model.base:
        metadata["base_model"] = config.model.base  # a Hub id
    if datasets:
        metadata["datasets"] = datasets
    return metadata


def render_card(config: PipelineConfig, plan: StagePlan, out_dir: Path, metrics: dict[str, Any]) -> str:
    licenses: dict[str, str] = {}
    for _, manifest in plan.inputs.values():
        licenses |= manifest.metrics.get("licenses", {})
    lines = [
        "---",
        yaml.safe_dump(front_matter(config, plan, out_dir, licenses), sort_keys=False).rstrip(),
        "---",
        f"# {config.run.name}: {plan.stage}",
        "",
        f"{STAGES[plan.stage].model.capitalize()}, trained by the `{plan.stage}` stage of an RLHF pipeline run from "
        f"the base model `{config.model.base}`. Load it with `from_pretrained` on this directory.",
        "",
        "## Data and licences",
        "",
        *(f"- `{path}`: {license}" for path, license in sorted(licenses.items())),
        "",
        "## Metrics",
        "",
        "```json",
        json.dumps(deterministic(metrics), indent=2, sort_keys=True, default=str),
        "```",
        "",
        "## Lineage",
        "",
        f"Cache key `{plan.key}`, code version `{plan.code_version}`. Inputs (artifact digests):",
        "",
        *(f"- `{name}`: `{manifest.digest}`" for name, (_, manifest) in plan.inputs.items()),
        "",
        "## Configuration",
        "",
        "The parts of the run's config this artifact depends on:",
        "",
        "```yaml",
        yaml.safe_dump(key_sections(config, plan.stage), sort_keys=False).rstrip(),
        "```",
    ]
    return "\n".join(lines) + "\n"


def write_model_card(config: PipelineConfig, plan: StagePlan, out_dir: Path, metrics: dict[str, Any]) -> None:
    """Write the card into the artifact of a stage that publishes a model; other stages' get none."""
    if STAGES[plan.stage].model is not None:
        (out_dir / MODEL_CARD).write_text(render_card(config, plan, out_dir, metrics))
