"""The pipeline's config schema: one YAML file, a section per stage plus `run`, `model` and `data`.

Unknown keys are errors, and every error names the file, the line and the field.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

from stages.errors import InputError
from stages.store import DEFAULT_RETRIES, ArtifactStore, read_uri

BUILTIN_DEMO = "builtin:demo"
BUILTIN_TINY_MODEL = "builtin:tiny-llama"


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RunConfig(Section):
    name: str = "demo"
    seed: int = 0
    store: str = Field(".rlhf/store", description="artifact store: a local directory or s3://bucket/prefix")
    store_retries: int = Field(
        DEFAULT_RETRIES,
        ge=1,
        description="attempts of each S3 operation while the server is unreachable or busy before the stage "
        "gives up: 1 s apart, doubling up to 30 s (ten attempts ride out 2.5 minutes of outage); errors no retry "
        "can cure (no such bucket, access denied) stop the stage at once with exit 2",
    )
    checkpoint_every: int = Field(50, ge=1, description="training steps between checkpoints in the store")
    keep_checkpoints: int = Field(2, ge=1)
    retries: int = Field(2, ge=0, description="retries of a crashed stage process")
    retry_delay_seconds: float = Field(2.0, ge=0, description="first retry delay, doubled each retry")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    stage_start: Literal["fork", "exec"] = Field(
        "fork",
        description="how the local launcher starts a stage process on CPU: fork it from one interpreter that "
        "has imported the training stack once (saves the ~8 s import per stage), or exec a fresh "
        "`rlhf stage` interpreter; GPU stages and multi-process stages are always exec'd",
    )
    report_to: list[Literal["tensorboard", "mlflow", "wandb"]] = Field(
        [],
        description="experiment trackers every training stage reports its metrics to, as the HF Trainer's "
        "report_to; TensorBoard writes into the artifact's logs/, MLflow and W&B read their environment variables",
    )

    def open_store(self) -> ArtifactStore:
        return ArtifactStore.from_uri(self.store, self.store_retries)


class TinyModelConfig(Section):
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4


class ModelConfig(Section):
    base: str = Field(BUILTIN_TINY_MODEL, description="local directory, Hugging Face Hub id, or builtin:tiny-llama")
    tiny: TinyModelConfig = TinyModelConfig()
    max_length: int = Field(64, ge=8, description="prompt + response tokens")


class DemoDataConfig(Section):
    sft_rows: int = Field(3000, ge=10)
    preference_rows: int = Field(3000, ge=10)
    prompt_rows: int = Field(1000, ge=10)
    rated_rows: int = Field(2000, ge=10)
    safety_rows: int = Field(2000, ge=10)


class DataSource(Section):
    path: str = Field(description="a .json/.jsonl/.parquet file, a Hugging Face Hub dataset id, or builtin:demo")
    format: str | None = Field(
        None,
        description="dolly, alpaca, oasst, shp, hh-rlhf, messages, preference or prompt; default: the "
        "kind's own TRL format (messages, preference, prompt)",
    )
    split: str = Field("train", description="the Hub dataset's split")
    weight: float = Field(1.0, gt=0, description="share of the rows kept: 0.5 a random half, 2 every row twice")
    license: str | None = Field(None, description="the licence of your own data (seed datasets know theirs)")
    commercial_use: bool = Field(True, description="whether your own data may be used commercially")


def _one_source(value: Any) -> Any:
    """`data.sft: path.jsonl` is short for a list of one source."""
    return [{"path": value}] if isinstance(value, str) else value


SourceList = Annotated[list[DataSource], BeforeValidator(_one_source), Field(min_length=1)]


class DataConfig(Section):
    sft: SourceList = [DataSource(path=BUILTIN_DEMO)]
    preference: SourceList = [DataSource(path=BUILTIN_DEMO)]
    prompts: SourceList = [DataSource(path=BUILTIN_DEMO)]
    rated: Annotated[list[DataSource], BeforeValidator(_one_source)] = Field(
        [], description="responses scored per aspect by several raters, for the multi-aspect reward model"
    )
    safety: Annotated[list[DataSource], BeforeValidator(_one_source)] = Field(
        [], description="preference pairs judged on safety: trains a second, safety reward model (Llama 2)"
    )
    stage_split: dict[Literal["sft", "reward", "rl"], float] | None = Field(
        None, description="DeepSpeed-Chat style: each source's rows divided between the stages in these proportions"
    )
    allow_noncommercial: bool = Field(False, description="allow data whose licence forbids commercial use")
    max_skipped_fraction: float = Field(
        0.05,
        ge=0,
        le=1,
        description="well-formed rows that cannot be used (an empty answer, chosen identical to rejected, a tie) "
        "are skipped and counted; a source with a larger share of skipped rows is refused",
    )
    demo: DemoDataConfig = DemoDataConfig()


class PrepareConfig(Section):
    eval_fraction: float = Field(0.1, gt=0, lt=1)
    min_agreement: float | None = Field(
        None, ge=0, le=1, description="drop rated items whose raters agree less (mean share of agreeing rater pairs)"
    )


class LoraConfig(Section):
    """LoRA adapters (peft) instead of full fine-tuning; with `quantize`, QLoRA on a 4- or 8-bit base."""

    r: int = Field(8, ge=1)
    alpha: int = Field(16, ge=1)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: str | list[str] = "all-linear"
    merge: bool = Field(
        True,
        description="true: the artifact is the merged full model; false: only the adapter, applied to its "
        "base (the input model) when a later stage or a user loads it",
    )
    quantize: Literal["4bit", "8bit"] | None = Field(
        None, description="QLoRA: load the frozen base quantized by bitsandbytes (needs a CUDA GPU)"
    )


class TrainingConfig(Section):
    epochs: float = Field(1.0, gt=0)
    max_steps: int = Field(-1, description="overrides epochs when > 0")
    learning_rate: float = Field(5e-5, gt=0)
    batch_size: int = Field(8, ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    warmup: float = Field(0.0, ge=0, description="warmup steps, or a fraction of all steps when < 1")
    logging_steps: int = 10
    gradient_checkpointing: bool = Field(
        False, description="recompute activations in the backward pass: less GPU memory for about a third more compute"
    )
    lora: LoraConfig | None = None


class SFTConfig(TrainingConfig):
    epochs: float = 3.0
    learning_rate: float = 2e-3
    batch_size: int = 32
    warmup: float = 0.05


class RewardConfig(TrainingConfig):
    kind: Literal["pairwise", "multi_aspect"] = Field(
        "pairwise", description="pairwise ranking on preference pairs, or one regression head per rated aspect"
    )
    aspects: dict[str, float] = Field(
        {"relevance": 1.0, "helpfulness": 1.0}, description="multi_aspect: the aspects and their weights in the reward"
    )
    epochs: float = 2.0
    learning_rate: float = 5e-4
    batch_size: int = 32
    warmup: float = 0.05
    center_rewards_coefficient: float | None = None
    safety_threshold: float = Field(
        0.15,
        gt=0,
        lt=1,
        description="with safety data: where σ(safety score) is below this, the safety score is "
        "the reward, elsewhere the helpfulness score (Llama 2)",
    )


class GenerationConfig(Section):
    """How responses are sampled. Nothing else applies: a model's own generation_config.json is ignored."""

    max_new_tokens: int = Field(20, ge=1, description="the response budget; the prompt gets model.max_length less this")
    temperature: float = Field(1.0, gt=0)
    top_k: int = Field(
        0, ge=0, description="sample from the k likeliest tokens (0: all); PPO scores the same top-k distribution"
    )
    min_new_tokens: int = Field(
        0,
        ge=0,
        description="no end of turn before this many new tokens, in sampling and in the log-probabilities PPO "
        "scores: takes length out of the policy's hands, so that a reward cannot be gained by answering shorter",
    )

    @model_validator(mode="after")
    def _minimum_within_budget(self) -> GenerationConfig:
        if self.min_new_tokens > self.max_new_tokens:
            raise ValueError("min_new_tokens must not exceed max_new_tokens")
        return self


class PPOConfig(Section):
    steps: int = Field(150, ge=1, description="rollout batches")
    batch_size: int = Field(64, ge=1, description="prompts per rollout batch")
    mini_batch_size: int = Field(16, ge=1)
    ppo_epochs: int = Field(4, ge=1)
    learning_rate: float = Field(5e-5, gt=0)
    kl_coef: float = Field(0.05, ge=0)
    clip_range: float = Field(0.2, gt=0)
    clip_range_value: float = Field(0.2, gt=0)
    vf_coef: float = Field(0.1, ge=0)
    gamma: float = 1.0
    lam: float = 0.95
    missing_eos_penalty: float | None = Field(None, description="subtracted from the score of unfinished responses")
    generation: GenerationConfig = GenerationConfig()
    gradient_checkpointing: bool = Field(
        False, description="recompute activations in the backward pass: less GPU memory for about a third more compute"
    )
    lora: LoraConfig | None = Field(
        None,
        description="LoRA on the policy and the value model; the reference is the policy with its adapter disabled",
    )

    @model_validator(mode="after")
    def _mini_batches_divide_batch(self) -> PPOConfig:
        if self.batch_size % self.mini_batch_size:
            raise ValueError("batch_size must be a multiple of mini_batch_size")
        return self


class RejectionSamplingConfig(Section):
    rounds: int = Field(2, ge=1)
    prompts_per_round: int = Field(256, ge=1)
    samples_per_prompt: int = Field(8, ge=2)
    generation: GenerationConfig = GenerationConfig()
    training: TrainingConfig = TrainingConfig()


class DPOConfig(TrainingConfig):
    """TRL's DPOTrainer on the preference pairs, straight from the SFT model (no reward model involved)."""

    epochs: float = 1.0
    learning_rate: float = 5e-4
    batch_size: int = 32
    beta: float = Field(0.1, gt=0, description="strength of the implicit KL constraint to the SFT model")
    loss_type: str = Field("sigmoid", description="TRL's DPO loss: sigmoid, ipo, hinge, ...")


class GroupRLConfig(TrainingConfig):
    """GRPO and RLOO (TRL trainers): several sampled answers per prompt, rewarded by the trained reward model."""

    max_steps: int = 60
    learning_rate: float = 1e-4
    batch_size: int = 32
    num_generations: int = Field(8, ge=2, description="answers sampled per prompt; batch_size must be a multiple")
    beta: float = Field(0.05, ge=0, description="KL coefficient to the SFT reference")
    generation: GenerationConfig = GenerationConfig()

    @model_validator(mode="after")
    def _generations_divide_batch(self) -> GroupRLConfig:
        if self.batch_size % self.num_generations:
            raise ValueError("batch_size must be a multiple of num_generations")
        return self

    @model_validator(mode="after")
    def _scored_as_sampled(self) -> GroupRLConfig:
        for field in ("top_k", "min_new_tokens"):
            if getattr(self.generation, field):
                raise ValueError(
                    f"generation.{field}: TRL's GRPO and RLOO compute log-probabilities over the full softmax, so "
                    f"it would train on another distribution than the one sampled; set {field}: 0"
                )
        return self


class RLConfig(Section):
    algorithm: Literal["ppo", "rejection_sampling", "dpo", "grpo", "rloo"] = "ppo"
    ppo: PPOConfig = PPOConfig()
    rejection_sampling: RejectionSamplingConfig = RejectionSamplingConfig()
    dpo: DPOConfig = DPOConfig()
    grpo: GroupRLConfig = GroupRLConfig()
    rloo: GroupRLConfig = GroupRLConfig()


class EvaluateConfig(Section):
    prompts: int = Field(256, ge=1)
    judge: Literal["gold", "reward_model", "vader"] = Field(
        "gold",
        description="gold: the demo task's ground-truth judge; reward_model: the trained RM; vader: VADER's "
        "rule-based sentiment of the response (an independent judge for sentiment tasks)",
    )
    samples: int = Field(5, ge=0, description="side-by-side examples in the report")
    generation: GenerationConfig = GenerationConfig()


class StageResources(Section):
    """What one stage's container or pod gets when stages run as deployments on a Docker or Kubernetes pool."""

    gpus: int = Field(0, ge=0, description="GPUs for the stage (Docker device requests, Kubernetes nvidia.com/gpu)")
    shm_size: str | None = Field(
        None, description="Docker shared memory, e.g. '16g' (PyTorch data loaders and NCCL need more than 64 MB)"
    )
    node_selector: dict[str, str] = Field(default_factory=dict, description="Kubernetes node labels the pod needs")
    tolerations: list[dict[str, Any]] = Field(default_factory=list, description="Kubernetes taints the pod tolerates")
    work_storage: str = Field(
        "50Gi",
        description="Kubernetes ephemeral storage requested (and the limit) for the stage's work directory, "
        "an emptyDir at /tmp: inputs, checkpoints and the artifact before upload",
    )
    image: str | None = Field(None, description="the stage's image; default: deploy.image_prefix + stage + tag")
    processes: int | None = Field(
        None,
        ge=1,
        description="training processes (DDP through `torchrun`); default: one per GPU. For the stages "
        "that train through TRL's trainers: sft, reward (pairwise), rl with dpo, grpo or rloo",
    )


class DeployConfig(Section):
    """How stages are started; not part of any cache key, since where a stage runs does not change its output."""

    launcher: Literal["process", "deployment"] = Field(
        "process",
        description="process: each stage in its own OS process here; deployment: each stage as a flow run of its "
        "Prefect deployment `rlhf-stage/<stage>` on deploy.work_pool",
    )
    work_pool: str = "rlhf"
    start_timeout_seconds: float = Field(
        600,
        gt=0,
        description="how long a stage's flow run may wait for a worker of deploy.work_pool to start it; then it "
        "is cancelled and the stage retried, with a message naming the pool",
    )
    image_prefix: str = Field("rlhf-", description="stage images are <prefix><stage>:<tag>")
    image_tag: str = "latest"
    schedule: str | None = Field(None, description="cron schedule of the pipeline deployment, e.g. '0 2 * * *'")
    stages: dict[Literal["prepare", "sft", "reward", "rl", "evaluate"], StageResources] = Field(default_factory=dict)

    def resources(self, stage: str) -> StageResources:
        return self.stages.get(stage, StageResources())

    def image(self, stage: str) -> str:
        return self.resources(stage).image or f"{self.image_prefix}{stage}:{self.image_tag}"

    def processes(self, stage: str) -> int:
        resources = self.resources(stage)
        return resources.processes or max(resources.gpus, 1)


class PipelineConfig(Section):
    run: RunConfig = RunConfig()
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    prepare: PrepareConfig = PrepareConfig()
    sft: SFTConfig = SFTConfig()
    reward: RewardConfig = RewardConfig()
    rl: RLConfig = RLConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    deploy: DeployConfig = DeployConfig()

    @model_validator(mode="after")
    def _several_processes_only_where_trainers_distribute(self) -> PipelineConfig:
        distributed = {"sft": True, "reward": self.reward.kind == "pairwise"}
        distributed["rl"] = self.rl.algorithm in ("dpo", "grpo", "rloo")
        for stage in self.deploy.stages:
            if self.deploy.processes(stage) > 1 and not distributed.get(stage, False):
                raise ValueError(
                    f"deploy.stages.{stage}: this stage trains in one process (several processes: sft, pairwise "
                    "reward, rl with dpo/grpo/rloo); set processes: 1 to give it several GPUs anyway"
                )
        return self

    @model_validator(mode="after")
    def _responses_leave_room_for_prompts(self) -> PipelineConfig:
        sections = {
            "rl.ppo": self.rl.ppo.generation,
            "rl.rejection_sampling": self.rl.rejection_sampling.generation,
            "rl.grpo": self.rl.grpo.generation,
            "rl.rloo": self.rl.rloo.generation,
            "evaluate": self.evaluate.generation,
        }
        for name, generation in sections.items():
            if generation.max_new_tokens >= self.model.max_length:
                raise ValueError(
                    f"{name}.generation.max_new_tokens ({generation.max_new_tokens}) leaves no room for the prompt "
                    f"within model.max_length ({self.model.max_length})"
                )
        return self

    @model_validator(mode="after")
    def _multi_aspect_needs_rated_data(self) -> PipelineConfig:
        if self.reward.kind == "multi_aspect" and not self.data.rated:
            raise ValueError("reward.kind 'multi_aspect' needs rated data in data.rated")
        return self

    @model_validator(mode="after")
    def _multi_aspect_merges_lora(self) -> PipelineConfig:
        lora = self.reward.lora
        if self.reward.kind == "multi_aspect" and lora is not None and (not lora.merge or lora.quantize):
            raise ValueError("reward.kind 'multi_aspect' folds its heads into one: its LoRA is merged, unquantized")
        return self

    @model_validator(mode="after")
    def _gold_judge_needs_demo_prompts(self) -> PipelineConfig:
        if self.evaluate.judge == "gold" and any(s.path != BUILTIN_DEMO for s in self.data.prompts):
            raise ValueError("evaluate.judge 'gold' only exists for data.prompts: builtin:demo")
        return self

    def stage_sections(self, stage: str) -> dict[str, Any]:
        """The parts of the config a stage's output depends on: what goes into its cache key."""
        sections = {
            "prepare": ("data", "prepare"),
            "sft": ("model", "sft"),
            "reward": ("model", "reward"),
            "rl": ("model", "rl"),
            "evaluate": ("model", "evaluate"),
        }[stage]
        dumped = self.model_dump(mode="json")
        sections = {"seed": self.run.seed} | {name: dumped[name] for name in sections}
        # Several data-parallel processes multiply the batch a step trains on: a different model.
        processes = self.deploy.processes(stage)
        return sections | ({"processes": processes} if processes > 1 else {})


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `key.path=value` overrides; values are parsed as YAML scalars (`0.1`, `true`, `ppo`)."""
    result = copy.deepcopy(raw)
    for override in overrides:
        path, sep, value = override.partition("=")
        if not sep or not path:
            raise InputError(f"--set {override!r}: expected key.path=value")
        *parents, leaf = path.split(".")
        node = result
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise InputError(f"--set {override!r}: {part!r} is not a section")
            node = child
        node[leaf] = yaml.safe_load(value)
    return result


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> PipelineConfig:
    """Read, override and validate a config file; `None` is the built-in demo (the schema's defaults)."""
    path = Path(path) if path is not None else Path("<built-in demo>")
    text = _read_text(path) if path.name != "<built-in demo>" else "{}"
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise InputError(f"{where}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
    if not isinstance(raw, dict):
        raise InputError(f"{path}: the config must be a mapping of sections")
    raw = apply_overrides(raw, overrides or [])
    try:
        return PipelineConfig.model_validate(raw)
    except ValidationError as exc:
        raise InputError(_describe_validation_error(exc, path, text)) from None


def read_config(location: str) -> PipelineConfig:
    """The resolved config a run stored (a local path or s3://bucket/key), as stages and flows receive it."""
    try:
        text = read_uri(location).decode()
    except Exception as exc:
        raise InputError(f"{location}: cannot read config ({exc})") from None
    return parse_config_text(text, location)


def parse_config_text(text: str, source: str) -> PipelineConfig:
    """Validate an already resolved config (what a stage process receives)."""
    try:
        return PipelineConfig.model_validate(yaml.safe_load(text))
    except (yaml.YAMLError, ValidationError) as exc:
        raise InputError(f"{source}: invalid resolved config: {exc}") from None


def dump_config(config: PipelineConfig) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


def _read_text(path: Path) -> str:
    try:
        return path.read_text()
    except FileNotFoundError:
        raise InputError(f"{path}: config file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: cannot read config ({exc})") from None


def _describe_validation_error(exc: ValidationError, path: Path, text: str) -> str:
    root = yaml.compose(text)
    problems = []
    for error in exc.errors():
        loc = [str(part) for part in error["loc"] if not str(part).startswith("function-")]
        line = _line_of(root, loc)
        where = f"{path}:{line}" if line else str(path)
        field = ".".join(loc) or "(top level)"
        message = "unknown key" if error["type"] == "extra_forbidden" else error["msg"]
        problems.append(f"{where}: {field}: {message}")
    return "; ".join(problems)


def _line_of(node: yaml.Node | None, loc: list[str]) -> int | None:
    """The 1-based line of the deepest YAML node on the error's path that exists in the file."""
    line = None
    for part in loc:
        if not isinstance(node, yaml.MappingNode):
            break
        match = next((pair for pair in node.value if pair[0].value == part), None)
        if match is None:
            break
        line = match[0].start_mark.line + 1
        node = match[1]
    return line
