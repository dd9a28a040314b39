"""The pipeline's config schema: one YAML file, a section per stage plus `run`, `model` and `data`.

Unknown keys are errors, and every error names the file, the line and the field.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic.fields import FieldInfo

from rlhf_pipeline.stages.core.errors import SeveralMethods
from rlhf_pipeline.stages.core.registry import ALGORITHMS, STAGE_NAMES, STAGES
from rlhf_pipeline.stages.core.store import DEFAULT_RETRIES, ArtifactStore

BUILTIN_DEMO = "builtin:demo"
BUILTIN_TINY_MODEL = "builtin:tiny-llama"


class Section(BaseModel):
    # An infinite or NaN number passes every bound (`gt=0` included) and fails much later, in a stage.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        """A section that changes an inherited field's default (`epochs: float = 3.0`) keeps the field's limits
        and description: pydantic would otherwise replace the whole field, so `sft.batch_size: 0` would pass."""
        super().__pydantic_init_subclass__(**kwargs)
        parent = next(base for base in cls.__mro__[1:] if issubclass(base, BaseModel))
        merged = False
        for name, field in cls.model_fields.items():
            inherited = parent.model_fields.get(name)
            if inherited is not None and field is not inherited and not field.metadata and not field.description:
                cls.model_fields[name] = FieldInfo.merge_field_infos(inherited, field)
                merged = True
        if merged:
            cls.model_rebuild(force=True)


class RunConfig(Section):
    name: str = Field("demo", description="prefix of run ids")
    seed: int = Field(
        0, description="seeds data generation, splits, initialisation and sampling; part of every cache key"
    )
    store: str = Field(".rlhf/store", description="artifact store: a local directory or s3://bucket/prefix")
    store_retries: int = Field(
        DEFAULT_RETRIES,
        ge=1,
        description="attempts of each S3 operation while the server is unreachable or busy before the stage "
        "gives up: 1 s apart, doubling up to 30 s (ten attempts ride out 2.5 minutes of outage); errors no retry "
        "can cure (no such bucket, access denied) stop the stage at once with exit 2",
    )
    checkpoint_every: int = Field(50, ge=1, description="training steps between checkpoints in the store")
    keep_checkpoints: int = Field(2, ge=1, description="newest complete checkpoints kept per stage")
    retries: int = Field(2, ge=0, description="retries of a crashed stage process")
    retry_delay_seconds: float = Field(2.0, ge=0, description="first retry delay, doubled each retry")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto (CUDA when present), cuda or cpu")
    stage_start: Literal["fork", "exec"] = Field(
        "fork",
        description="how the local launcher starts a stage's processes on CPU: fork them from one interpreter "
        "that has imported the training stack once (saves the ~8 s import per process; torchrun's processes "
        "are forked from a child of it), or exec a fresh `rlhf stage` (or torchrun) interpreter; GPU stages are "
        "always exec'd",
    )
    report_to: list[Literal["tensorboard", "mlflow", "wandb"]] = Field(
        [],
        description="experiment trackers every training stage reports its metrics to, as the HF Trainer's "
        "report_to; TensorBoard writes into the artifact's logs/, MLflow and W&B read their environment variables",
    )

    def open_store(self) -> ArtifactStore:
        return ArtifactStore.from_uri(self.store, self.store_retries)


class TinyModelConfig(Section):
    hidden_size: int = Field(128, ge=1, description="width of the built-in tiny Llama")
    num_layers: int = Field(4, ge=1, description="its decoder layers")
    num_heads: int = Field(4, ge=1, description="its attention heads")

    @model_validator(mode="after")
    def _heads_split_the_width(self) -> TinyModelConfig:
        if self.hidden_size % (2 * self.num_heads):  # each head's rotary embedding turns pairs of dimensions
            raise ValueError("hidden_size must be a multiple of 2 × num_heads (each head an even width)")
        return self


class ModelConfig(Section):
    base: str = Field(BUILTIN_TINY_MODEL, description="local directory, Hugging Face Hub id, or builtin:tiny-llama")
    tiny: TinyModelConfig = Field(
        TinyModelConfig(), description="the size of the built-in model (model.base: builtin:tiny-llama)"
    )
    max_length: int = Field(64, ge=8, description="prompt + response tokens")


class DemoDataConfig(Section):
    sft_rows: int = Field(3000, ge=10, description="demo SFT conversations generated")
    preference_rows: int = Field(3000, ge=10, description="demo preference pairs generated")
    prompt_rows: int = Field(1000, ge=10, description="demo RL prompts generated")
    rated_rows: int = Field(2000, ge=10, description="demo rated responses generated (multi-aspect reward)")
    safety_rows: int = Field(2000, ge=10, description="demo safety pairs generated")


class DataSource(Section):
    path: str = Field(
        description="a .json/.jsonl/.csv/.parquet file (the first three also .gz), a Hugging Face Hub dataset id, "
        "or builtin:demo"
    )
    format: str | None = Field(
        None,
        description="dolly, alpaca, oasst, shp, hh-rlhf, messages, preference or prompt; default: the "
        "kind's own TRL format (messages, preference, prompt)",
    )
    split: str = Field("train", description="the Hub dataset's split")
    weight: float = Field(1.0, gt=0, description="share of the rows kept: 0.5 a random half, 2 every row twice")
    license: str | None = Field(None, description="the licence of your own data (seed datasets know theirs)")
    commercial_use: bool = Field(True, description="whether your own data may be used commercially")
    digest: str | None = Field(
        None,
        description="filled in by `rlhf run`: the sha256 of a local file's bytes, so that a file changed in place "
        "is prepared again (prepare's cache key holds the rest of this section); leave it unset",
    )


def _one_source(value: Any) -> Any:
    """`data.sft: path.jsonl` is short for a list of one source."""
    return [{"path": value}] if isinstance(value, str) else value


SourceList = Annotated[list[DataSource], BeforeValidator(_one_source), Field(min_length=1)]


class DataConfig(Section):
    sft: SourceList = Field(
        [DataSource(path=BUILTIN_DEMO)], description="conversations for SFT: a source or a list of sources"
    )
    preference: SourceList = Field(
        [DataSource(path=BUILTIN_DEMO)], description="chosen/rejected pairs for the reward model (and DPO)"
    )
    prompts: SourceList = Field([DataSource(path=BUILTIN_DEMO)], description="prompts for RL and evaluation")
    rated: Annotated[list[DataSource], BeforeValidator(_one_source)] = Field(
        [], description="responses scored per aspect by several raters, for the multi-aspect reward model"
    )
    safety: Annotated[list[DataSource], BeforeValidator(_one_source)] = Field(
        [], description="preference pairs judged on safety: trains a second, safety reward model (Llama 2)"
    )
    stage_split: dict[Literal["sft", "reward", "rl"], Annotated[float, Field(ge=0)]] | None = Field(
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
    demo: DemoDataConfig = Field(DemoDataConfig(), description="the size of the built-in demo data")

    @field_validator("stage_split")
    @classmethod
    def _some_share(cls, split: dict[str, float] | None) -> dict[str, float] | None:
        if split is not None and not sum(split.values()) > 0:
            raise ValueError("the proportions must not all be 0")
        return split


class PrepareConfig(Section):
    eval_fraction: float = Field(0.1, gt=0, lt=1, description="held-out share of each dataset")
    min_agreement: float | None = Field(
        None, ge=0, le=1, description="drop rated items whose raters agree less (mean share of agreeing rater pairs)"
    )


class LoraConfig(Section):
    """LoRA adapters (peft) instead of full fine-tuning; with `quantize`, QLoRA on a 4- or 8-bit base."""

    r: int = Field(8, ge=1, description="adapter rank")
    alpha: int = Field(16, ge=1, description="LoRA scaling numerator (the update is scaled by alpha / r)")
    dropout: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="dropout on the adapters' input (PPO turns it off: old and new log-probabilities must agree)",
    )
    target_modules: str | list[str] = Field(
        "all-linear", description="the modules that get adapters: all-linear, or a list of module names"
    )
    merge: bool = Field(
        True,
        description="true: the artifact is the merged full model; false: only the adapter, applied to its "
        "base (the input model) when a later stage or a user loads it",
    )
    quantize: Literal["4bit", "8bit"] | None = Field(
        None, description="QLoRA: load the frozen base quantized by bitsandbytes (needs a CUDA GPU)"
    )


class TrainingConfig(Section):
    epochs: float = Field(1.0, gt=0, description="passes over the training rows")
    max_steps: int = Field(-1, description="overrides epochs when > 0")
    learning_rate: float = Field(5e-5, gt=0, description="peak learning rate of AdamW (linear decay after warmup)")
    batch_size: int = Field(8, ge=1, description="rows per optimizer step and process, before accumulation")
    gradient_accumulation_steps: int = Field(1, ge=1, description="batches summed per optimizer step")
    warmup: float = Field(0.0, ge=0, description="warmup steps, or a fraction of all steps when < 1")
    logging_steps: int = Field(10, ge=1, description="steps between logged metrics")
    gradient_checkpointing: bool = Field(
        False, description="recompute activations in the backward pass: less GPU memory for about a third more compute"
    )
    lora: LoraConfig | None = Field(None, description="LoRA instead of full fine-tuning (null: train every weight)")


class DistributedConfig(Section):
    """How the processes of `deploy.stages.<stage>.processes` hold the model they train (one process: no
    difference)."""

    strategy: Literal["ddp", "fsdp"] = Field(
        "ddp",
        description="ddp: every process holds whole models and the gradients are summed; fsdp: FSDP2 "
        "(fully_shard) shards each trained model's parameters, gradients and optimizer state over the processes "
        "(with LoRA: the frozen base; the Trainer stages keep the adapters whole in each process), and "
        "checkpoints are sharded (torch.distributed.checkpoint)",
    )


class RLDistributedConfig(DistributedConfig):
    frozen: Literal["shard", "replicate"] = Field(
        "shard",
        description="fsdp: the models that do not train (the references and reward models of every method) "
        "sharded too (least memory), or whole in every process (no gathering of their weights in each forward "
        "pass)",
    )


class SFTConfig(TrainingConfig):
    epochs: float = 3.0
    learning_rate: float = 2e-3
    batch_size: int = 32
    warmup: float = 0.05
    distributed: DistributedConfig = Field(
        DistributedConfig(), description="how several processes of the sft stage hold the model"
    )


class RewardConfig(TrainingConfig):
    kind: Literal["pairwise", "multi_aspect"] = Field(
        "pairwise", description="pairwise ranking on preference pairs, or one regression head per rated aspect"
    )
    aspects: dict[str, float] = Field(
        {"relevance": 1.0, "helpfulness": 1.0},
        min_length=1,
        description="multi_aspect: the aspects and their weights in the reward",
    )
    epochs: float = 2.0
    learning_rate: float = 5e-4
    batch_size: int = 32
    warmup: float = 0.05
    center_rewards_coefficient: float | None = Field(
        None, description="TRL's reward-centering term: pushes the mean reward towards 0"
    )
    safety_threshold: float = Field(
        0.15,
        gt=0,
        lt=1,
        description="with safety data: where σ(safety score) is below this, the safety score is "
        "the reward, elsewhere the helpfulness score (Llama 2)",
    )
    distributed: DistributedConfig = Field(
        DistributedConfig(), description="how several processes of the reward stage hold the model"
    )


class GenerationConfig(Section):
    """How responses are sampled. Nothing else applies: a model's own generation_config.json is ignored."""

    max_new_tokens: int = Field(20, ge=1, description="the response budget; the prompt gets model.max_length less this")
    temperature: float = Field(1.0, gt=0, description="sampling temperature")
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
    mini_batch_size: int = Field(16, ge=1, description="rollouts per optimisation step")
    ppo_epochs: int = Field(4, ge=1, description="passes over each rollout batch, in shuffled mini-batches")
    learning_rate: float = Field(5e-5, gt=0, description="AdamW over the policy and the value model")
    kl_coef: float = Field(0.05, ge=0, description="β of the per-token KL penalty to the frozen SFT reference")
    clip_range: float = Field(0.2, gt=0, description="PPO's clipping of the policy ratio")
    clip_range_value: float = Field(0.2, gt=0, description="clipping of the value model's update")
    vf_coef: float = Field(0.1, ge=0, description="weight of the value loss")
    gamma: float = Field(1.0, ge=0, le=1, description="discount of GAE")
    lam: float = Field(0.95, ge=0, le=1, description="λ of GAE")
    missing_eos_penalty: float | None = Field(None, description="subtracted from the score of unfinished responses")
    generation: GenerationConfig = Field(GenerationConfig(), description="how rollouts are sampled")
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
    rounds: int = Field(2, ge=1, description="rounds of sample, pick the best, fine-tune (Llama 2)")
    prompts_per_round: int = Field(256, ge=1, description="prompts answered per round")
    samples_per_prompt: int = Field(
        8, ge=2, description="answers sampled per prompt; the reward model's best one is kept"
    )
    generation: GenerationConfig = Field(GenerationConfig(), description="how the answers are sampled")
    training: TrainingConfig = Field(
        TrainingConfig(),
        description="the fine-tuning on the best answers of each round; its batch_size is the whole step's, "
        "divided among the processes of deploy.stages.rl",
    )


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
    generation: GenerationConfig = Field(GenerationConfig(), description="how the group's answers are sampled")

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


AlgorithmName = Literal[tuple(ALGORITHMS)]  # type: ignore[valid-type]  # the registry's names


class RLConfig(Section):
    algorithm: AlgorithmName | list[AlgorithmName] = Field(  # type: ignore[valid-type]
        "ppo",
        description="ppo and rejection_sampling (written here) and grpo/rloo (TRL) optimise against the reward "
        "model; dpo (TRL) learns from the preference pairs directly. A list (e.g. [ppo, dpo]) runs rl and "
        "evaluate once per method, side by side, on the same prepare, sft and reward artifacts, and compares them",
    )
    ppo: PPOConfig = Field(PPOConfig(), description="PPO, written here")
    rejection_sampling: RejectionSamplingConfig = Field(
        RejectionSamplingConfig(), description="best-of-N rejection sampling, written here"
    )
    dpo: DPOConfig = Field(DPOConfig(), description="TRL's DPOTrainer")
    grpo: GroupRLConfig = Field(GroupRLConfig(), description="TRL's GRPOTrainer")
    rloo: GroupRLConfig = Field(GroupRLConfig(), description="TRL's RLOOTrainer")
    distributed: RLDistributedConfig = Field(
        RLDistributedConfig(), description="how several processes of the rl stage hold the models"
    )

    @field_validator("algorithm", mode="before")
    @classmethod
    def _known_methods(cls, value: Any) -> Any:
        """One message for a name or a list of names (pydantic would report both arms of the union)."""
        for name in value if isinstance(value, list) else [value]:
            if name not in ALGORITHMS:
                known = ", ".join(repr(known) for known in ALGORITHMS)
                raise ValueError(f"{name!r} is not one of {known}, nor is it a list of them")
        return value

    @model_validator(mode="after")
    def _methods_named_once(self) -> RLConfig:
        if isinstance(self.algorithm, list) and (not self.algorithm or len(set(self.algorithm)) < len(self.algorithm)):
            raise ValueError("algorithm: a list names each method once, and at least one")
        return self

    @property
    def methods(self) -> tuple[str, ...]:
        """The alignment methods the run trains and compares, in the order given."""
        return tuple(self.algorithm) if isinstance(self.algorithm, list) else (self.algorithm,)

    @property
    def method(self) -> str:
        """The one method of a config that names one, as each stage process's config does (a run of several
        gives each of its branches a config of its own: PipelineConfig.for_method)."""
        if len(self.methods) > 1:
            raise SeveralMethods(
                f"rl.algorithm lists several methods ({', '.join(self.methods)}): a stage trains one; choose it with "
                f"--set rl.algorithm={self.methods[0]}"
            )
        return self.methods[0]


class EvaluateConfig(Section):
    prompts: int = Field(256, ge=1, description="held-out prompts answered by each policy (cycled if fewer exist)")
    judge: Literal["gold", "reward_model", "vader"] = Field(
        "gold",
        description="gold: the demo task's ground-truth judge; reward_model: the trained RM; vader: VADER's "
        "rule-based sentiment of the response (an independent judge for sentiment tasks)",
    )
    samples: int = Field(5, ge=0, description="side-by-side examples in the report")
    generation: GenerationConfig = Field(GenerationConfig(), description="how every policy's answers are sampled")


class StageResources(Section):
    """What one stage's container or pod gets when stages run as deployments on a Docker or Kubernetes pool."""

    gpus: int = Field(0, ge=0, description="GPUs for the stage (Docker device requests, Kubernetes nvidia.com/gpu)")
    cpus: float | None = Field(
        None,
        gt=0,
        description="CPU cores for the stage: Docker's --cpus, the Kubernetes CPU request and limit, and for a "
        "local process the most compute threads it runs. Default: what the process may use (its affinity and "
        "cgroup quota); either way shared with the other stage processes running on the same machine",
    )
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
        description="training processes per node (data-parallel, through `torchrun`); default: one per GPU. For "
        "sft, reward (every kind) and rl (every algorithm; PPO's batch and mini-batch are divided among all of them)",
    )
    nodes: int = Field(
        1,
        ge=1,
        description="machines the stage runs on, each with `gpus` and `processes`: a Kubernetes pool runs one pod "
        "per node (an indexed Job); elsewhere `rlhf node` starts the nodes after the first",
    )
    collective_timeout_minutes: float = Field(
        120,
        gt=0,
        description="of a stage on several processes: how long each waits for the others at a collective (a sum "
        "of gradients, a gather of rollouts, the wait while the main process uploads a checkpoint) before it "
        "fails the stage, which the pipeline retries from its last checkpoint. A process that hangs (a lost "
        "node, a stuck GPU) ends the stage after this long instead of holding it; keep it above the slowest "
        "checkpoint upload and the spread between the processes' ends of a round's generation",
    )


class DeployConfig(Section):
    """How stages are started; not part of any cache key, since where a stage runs does not change its output."""

    launcher: Literal["process", "deployment"] = Field(
        "process",
        description="process: each stage in its own OS process here; deployment: each stage as a flow run of its "
        "Prefect deployment `rlhf-stage/<stage>` on deploy.work_pool",
    )
    work_pool: str = Field(
        "rlhf", description="the Prefect work pool stage deployments run on (deploy.launcher: deployment)"
    )
    start_timeout_seconds: float = Field(
        600,
        gt=0,
        description="how long a stage's flow run may wait for a worker of deploy.work_pool to start it; then it "
        "is cancelled and the stage retried, with a message naming the pool",
    )
    image_prefix: str = Field("rlhf-", description="stage images are <prefix><stage>:<tag>")
    image_tag: str = Field("latest", description="tag of the stage images")
    schedule: str | None = Field(None, description="cron schedule of the pipeline deployment, e.g. '0 2 * * *'")
    stages: dict[Literal[STAGE_NAMES], StageResources] = Field(  # type: ignore[valid-type]
        default_factory=dict, description="per stage: its GPUs, processes, image and placement"
    )

    def resources(self, stage: str) -> StageResources:
        return self.stages.get(stage, StageResources())

    def image(self, stage: str) -> str:
        return self.resources(stage).image or f"{self.image_prefix}{stage}:{self.image_tag}"

    def processes_per_node(self, stage: str) -> int:
        resources = self.resources(stage)
        return resources.processes or max(resources.gpus, 1)

    def world_size(self, stage: str) -> int:
        """All the stage's training processes, on all its nodes."""
        return self.resources(stage).nodes * self.processes_per_node(stage)

    def collective_timeout(self, stage: str) -> timedelta:
        return timedelta(minutes=self.resources(stage).collective_timeout_minutes)


class PipelineConfig(Section):
    run: RunConfig = Field(RunConfig(), description="the run: store, seeds, retries, device")
    model: ModelConfig = Field(ModelConfig(), description="the base model")
    data: DataConfig = Field(DataConfig(), description="the datasets each stage reads")
    prepare: PrepareConfig = Field(PrepareConfig(), description="the prepare stage")
    sft: SFTConfig = Field(SFTConfig(), description="supervised fine-tuning")
    reward: RewardConfig = Field(RewardConfig(), description="reward-model training")
    rl: RLConfig = Field(RLConfig(), description="the RL stage and its algorithms")
    evaluate: EvaluateConfig = Field(EvaluateConfig(), description="judging base, SFT and RL policies")
    deploy: DeployConfig = Field(DeployConfig(), description="where stages run")

    def for_method(self, method: str) -> PipelineConfig:
        """The config of one branch of a run of several methods: this one with `rl.algorithm: <method>`, which is
        what that method's rl and evaluate are planned, cached and run with."""
        raw = self.model_dump(mode="json")
        raw["rl"]["algorithm"] = method
        return PipelineConfig.model_validate(raw)

    @model_validator(mode="after")
    def _each_method_valid(self) -> PipelineConfig:
        if len(self.rl.methods) > 1:
            for method in self.rl.methods:
                try:
                    self.for_method(method)
                except ValidationError as exc:
                    reasons = "; ".join(error["msg"].removeprefix("Value error, ") for error in exc.errors())
                    raise ValueError(f"with rl.algorithm {method}: {reasons}") from None
        return self

    @model_validator(mode="after")
    def _several_processes_only_where_stages_train(self) -> PipelineConfig:
        for stage in self.deploy.stages:
            if self.deploy.world_size(stage) > 1 and not STAGES[stage].trains:
                training = ", ".join(name for name, s in STAGES.items() if s.trains)
                raise ValueError(
                    f"deploy.stages.{stage}: this stage runs in one process (several processes: {training}); "
                    "set processes: 1 to give it several GPUs anyway, on one node"
                )
        return self

    @model_validator(mode="after")
    def _sharded_bases_unquantized(self) -> PipelineConfig:
        """fsdp shards every stage and method, LoRA included, but not a quantized (QLoRA) base."""
        trained: dict[str, TrainingConfig | PPOConfig] = {}
        if self.sft.distributed.strategy == "fsdp":
            trained["sft"] = self.sft
        if self.reward.distributed.strategy == "fsdp":
            trained["reward"] = self.reward
        if self.rl.distributed.strategy == "fsdp":
            for method in self.rl.methods:
                config = getattr(self.rl, method)
                trained[f"rl.{method}"] = getattr(config, "training", config)  # rejection sampling's fine-tuning
        for name, config in trained.items():
            if config.lora is not None and config.lora.quantize is not None:
                field = f"{name.partition('.')[0]}.distributed.strategy"
                raise ValueError(f"{field}: fsdp does not shard a quantized (QLoRA) base ({name}); use ddp with it")
        return self

    @model_validator(mode="after")
    def _batches_divide_among_processes(self) -> PipelineConfig:
        """PPO's and rejection sampling's batches are the whole step's, whatever the number of processes."""
        processes = self.deploy.world_size("rl")
        if len(self.rl.methods) > 1 or processes == 1:
            return self  # each method's config is checked on its own (_each_method_valid)
        ppo, training = self.rl.ppo, self.rl.rejection_sampling.training
        batches = {
            "ppo": {"rl.ppo.batch_size": ppo.batch_size, "rl.ppo.mini_batch_size": ppo.mini_batch_size},
            "rejection_sampling": {"rl.rejection_sampling.training.batch_size": training.batch_size},
        }
        for name, size in batches.get(self.rl.method, {}).items():
            if size % processes:
                raise ValueError(
                    f"{name}: {size} does not divide among the {processes} processes of deploy.stages.rl; "
                    f"make it a multiple of {processes}"
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
