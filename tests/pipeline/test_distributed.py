"""A stage in several data-parallel processes (`deploy.stages.<stage>.processes`): `torchrun` starts
them (gloo on CPU here, NCCL on GPUs), TRL's trainer or the stage's own loop splits the batches, and only the
main process publishes."""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import psutil
import pytest
import torch
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
from safetensors.torch import load as load_weights

from rlhf_pipeline.flows.launchers.launcher import StageCrashed
from rlhf_pipeline.flows.launchers.process import FLOW_RUN_ID, NODE0_ADDRESS, ProcessLauncher
from rlhf_pipeline.flows.stage_flow import rlhf_stage
from rlhf_pipeline.stages.core.artifacts import Manifest, artifact_prefix, read_manifest, read_verified
from rlhf_pipeline.stages.core.config import PipelineConfig
from rlhf_pipeline.stages.core.config_loading import dump_config, load_config
from rlhf_pipeline.stages.core.cpus import CPUS_ENV, granted_cpus
from rlhf_pipeline.stages.core.planner import plan_stage
from rlhf_pipeline.stages.core.store import LocalStore
from rlhf_pipeline.stages.modeling.data_parallel import join_processes
from rlhf_pipeline.stages.modeling.loading import load_policy, load_scorer
from rlhf_pipeline.stages.modeling.sharding import load_sharded, local_bytes
from rlhf_pipeline.stages.modeling.tiny_model import save_tiny_llama
from rlhf_pipeline.stages.runner import run_stage
from tests.conftest import (
    RLHF,
    ROUNDED_METRIC,
    TINY,
    LaunchedStage,
    PidLog,
    free_port,
    kill_after_first_checkpoint,
)


class _Log:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def info(self, message, *args):
        self.lines.append(message % args if args else message)


def launch(stage: str, config: PipelineConfig, store: LocalStore) -> tuple[Manifest, _Log]:
    """The stage as the pipeline launches it, from the config stored in `store`. On several nodes the launcher
    starts the first node's torchrun and `rlhf node` each other node's (as the other pods of the stage's
    Kubernetes Job do); they meet at the first node, over loopback here (NODE0_ADDRESS)."""
    store.write_bytes(f"runs/{stage}/config.yaml", dump_config(config).encode())
    config_uri = store.uri_of(f"runs/{stage}/config.yaml")
    nodes = config.deploy.resources(stage).nodes
    others = [
        subprocess.Popen([RLHF, "node", stage, "--config", config_uri, "--node-rank", str(rank)])
        for rank in range(1, nodes)
    ]
    log = _Log()
    ProcessLauncher().launch(stage, config_uri, log)
    assert [node.wait(timeout=300) for node in others] == [0] * len(others)
    assert sum(f"rlhf.stage INFO {stage}: done" in line for line in log.lines) == 1  # rank 0, on the first node
    return read_manifest(store, plan_stage(store, config, stage).prefix), log


def torchrun_ranks(processes: list[psutil.Process]) -> list[psutil.Process]:
    """Of a stage's processes, those torchrun started (forked, they keep its title in their parent's)."""
    return [process for process in processes if process.parent().cmdline()[0].startswith("torchrun ")]


@pytest.fixture
def loopback_nodes(monkeypatch) -> None:
    monkeypatch.setenv(NODE0_ADDRESS, f"127.0.0.1:{free_port()}")


def test_sft_on_two_nodes_of_two_processes_trains_as_one_node_of_four(tmp_path, loopback_nodes):
    """Four ranks on two nodes, in the same order as on one node of four: the same cache key, the same bytes."""
    overrides = [*TINY, "run.device=cpu", "sft.max_steps=8", "sft.batch_size=4"]
    manifests = []
    for layout in (["processes=4"], ["processes=2", "nodes=2"]):
        store = LocalStore(tmp_path / "-".join(layout))
        config = load_config(None, [*overrides, f"run.store={store.uri}", *(f"deploy.stages.sft.{s}" for s in layout)])
        run_stage("prepare", config, store)
        manifests.append(launch("sft", config, store)[0])
    four, two_by_two = manifests
    assert four.cache_key == two_by_two.cache_key and two_by_two.metrics["processes"] == 4
    assert two_by_two.digest == four.digest


def test_a_node_after_the_first_logs_to_the_stage_flow_run_and_its_death_fails_the_stage(
    tmp_path, loopback_nodes, prefect_api
):
    """On Kubernetes the worker streams the first pod's output only; the pods after it send their processes'
    lines, and how they ended, to the stage's flow run (whose id the worker gives every pod). A process of the
    second node killed mid-training (out of memory, a lost GPU) fails the first node's stage, for the pipeline
    to retry, and the flow run's logs say which node and process died, and how."""
    store = LocalStore(tmp_path / "store")
    overrides = [
        "run.device=cpu",
        "sft.max_steps=60",
        "run.checkpoint_every=5",
        "deploy.stages.sft.nodes=2",
        f"run.store={store.uri}",
    ]
    config = load_config(None, [*TINY, *overrides])
    run_stage("prepare", config, store)
    store.write_bytes("runs/sft/config.yaml", dump_config(config).encode())
    config_uri = store.uri_of("runs/sft/config.yaml")
    with get_client(sync_client=True) as client:
        flow_run = client.create_flow_run(rlhf_stage, parameters={"stage": "sft", "config_uri": config_uri})
    node = [RLHF, "node", "sft", "--config", config_uri, "--node-rank", "1"]
    second = subprocess.Popen(node, env=os.environ | {FLOW_RUN_ID: str(flow_run.id)})
    first = LaunchedStage("sft", config_uri)
    first.first_checkpoint(store.root / "checkpoints" / "sft")
    (rank,) = torchrun_ranks(psutil.Process(second.pid).children(recursive=True))  # the second node's one process
    rank.send_signal(signal.SIGKILL)
    first.thread.join(timeout=120)
    assert second.wait(timeout=60) == 1
    assert not first.thread.is_alive() and first.crashed, "the first node's stage did not fail"
    assert str(first.crashed[0]).startswith("stage sft (node 0 of 2: the others log to the stage's flow run) exited")
    with get_client(sync_client=True) as client:
        logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run.id])))
    messages = [log.message for log in logs]
    assert "the stage's process of rank 1 failed first, killed by SIGKILL" in messages
    assert messages[-1] == "node 1 of stage sft exited with code 1"
    assert logs[-1].level == logging.ERROR


def test_a_process_that_hangs_fails_the_stage_after_the_collective_timeout(tmp_path):
    """A process that stops answering (a lost node, a stuck GPU) holds the others at their next collective for
    `deploy.stages.<stage>.collective_timeout_minutes` (6 s here, 2 h by default), not for the 30 minutes that
    accelerate leaves a Trainer stage's CPU process group at: then the one still running fails, and the stage
    crashes, for the pipeline to retry it from its last checkpoint."""
    store = LocalStore(tmp_path / "store")
    timeout = 6
    overrides = [
        "run.device=cpu",
        "sft.max_steps=60",
        "run.checkpoint_every=5",
        "deploy.stages.sft.processes=2",
        f"run.store={store.uri}",
    ]
    config = load_config(None, [*TINY, *overrides, f"deploy.stages.sft.collective_timeout_minutes={timeout / 60}"])
    run_stage("prepare", config, store)
    config_path = tmp_path / "config.yaml"
    config_path.write_text(dump_config(config))
    launched = LaunchedStage("sft", str(config_path))
    launched.first_checkpoint(store.root / "checkpoints" / "sft")
    hung, running = sorted(torchrun_ranks(launched.processes()), key=lambda rank: rank.pid)
    hung.send_signal(signal.SIGSTOP)
    stopped = time.monotonic()
    _, alive = psutil.wait_procs([running], timeout=timeout + 30)
    waited = time.monotonic() - stopped
    hung.send_signal(signal.SIGCONT)  # to take torchrun's SIGTERM now rather than its SIGKILL 30 s later
    launched.thread.join(timeout=120)
    assert not alive, "the process still running waited on past the collective timeout"
    assert timeout - 1 < waited < timeout + 20
    assert launched.crashed, "the stage did not fail"
    # the exception that ended the process still running, named where the pipeline reports the crash
    assert "failed first, exit code 1: RuntimeError: " in str(launched.crashed[0])
    assert "Timed out waiting 6000ms" in str(launched.crashed[0])


def test_a_node_that_never_comes_fails_the_stage_after_the_collective_timeout(tmp_path, monkeypatch):
    """The first node waits for the others as long as a collective would (6 s here, 2 h by default): torchrun's
    static rendezvous gave up after 600 s whatever the config said, too soon for a pod scheduled late."""
    store = LocalStore(tmp_path / "store")
    overrides = ["run.device=cpu", "deploy.stages.sft.nodes=2", "deploy.stages.sft.collective_timeout_minutes=0.1"]
    config = load_config(None, [*TINY, *overrides, f"run.store={store.uri}"])
    run_stage("prepare", config, store)
    config_path = tmp_path / "config.yaml"
    config_path.write_text(dump_config(config))
    monkeypatch.setenv(NODE0_ADDRESS, f"127.0.0.1:{free_port()}")
    started = time.monotonic()
    with pytest.raises(StageCrashed):
        ProcessLauncher().launch("sft", str(config_path), PidLog())
    assert time.monotonic() - started < 60


ADAPTER_FILE = "adapter_model.safetensors"


def published_weights(store: LocalStore, stage: str, manifest: Manifest, path: str = "model.safetensors") -> dict:
    return load_weights(read_verified(store, artifact_prefix(stage, manifest.cache_key), path))


def assert_trained_alike(
    sharded: Manifest,
    ddp: Manifest,
    stage: str,
    stores: tuple[LocalStore, LocalStore],
    compared: tuple[str, ...] = ("first_loss", "last_loss", "eval_loss"),
    halved: tuple[str, ...] = ("parameter_bytes", "optimizer_bytes"),
    weights_file: str = "model.safetensors",
) -> None:
    """FSDP and DDP on two processes train the same model (the same batches; gradients reduced in another
    order): the same losses and published weights (`weights_file`: a kept adapter's) within float rounding;
    each FSDP process holds half of what is sharded (`halved`: the trained parameters and the optimizer state,
    or a LoRA run's frozen base) within the 15 % that uneven shards may add."""
    assert sharded.metrics["processes"] == ddp.metrics["processes"] == 2
    for key in compared:
        assert sharded.metrics[key] == pytest.approx(ddp.metrics[key], rel=1e-4, abs=ROUNDED_METRIC), key
    for key in halved:
        assert sharded.metrics[key] == pytest.approx(ddp.metrics[key] / 2, rel=0.15), key
    weights = [
        published_weights(store, stage, m, weights_file) for store, m in zip(stores, (sharded, ddp), strict=True)
    ]
    # transformers' gathered save of a sharded model keeps a tied output embedding as its own copy (the model
    # loads the same: the copy is the input embedding, and tying makes them one tensor again).
    tied = weights[0].keys() - weights[1].keys()
    assert tied <= {"lm_head.weight"}
    for name in tied:
        assert torch.equal(weights[0].pop(name), weights[0]["model.embed_tokens.weight"])
    assert weights[0].keys() == weights[1].keys()
    for name, tensor in weights[0].items():
        torch.testing.assert_close(tensor, weights[1][name], rtol=1e-4, atol=1e-5, msg=name)


def kill_and_resume(stage: str, config: PipelineConfig, store: LocalStore, path: Path) -> tuple[Manifest, Manifest]:
    """The stage of `config` killed after its first checkpoint and run again: that checkpoint and the artifact."""
    path.write_text(dump_config(config))
    key = plan_stage(store, config, stage).key
    killed_at = kill_after_first_checkpoint(stage, path, store.root / "checkpoints" / stage)
    checkpoint = read_manifest(store, f"checkpoints/{stage}/{key}/step-{killed_at:08d}")
    ProcessLauncher().launch(stage, str(path), _Log())
    return checkpoint, read_manifest(store, plan_stage(store, config, stage).prefix)


def test_sft_on_two_processes_trains_under_ddp_and_fsdp_alike_and_both_resume_exactly(tmp_path):
    """DDP: each process, on its share of the cores, trains a batch of its own (twice one process's tokens
    per step, so another cache key) and the main one publishes. FSDP (`sft.distributed.strategy: fsdp`):
    transformers shards the model as it loads and the Trainer trains the shards, as DDP trains. Killed after
    its first checkpoint, each resumes to the uninterrupted run's bytes: under DDP the checkpoint holds every
    process's RNG state beside the main one's model and optimizer, under FSDP each process's shards (and not
    the Trainer's gathered copy of the weights besides)."""
    overrides = [*TINY, "run.device=cpu", "sft.max_steps=8", "sft.logging_steps=1"]
    prepared = LocalStore(tmp_path / "prepared")
    one = load_config(None, [*overrides, f"run.store={prepared.uri}"])
    run_stage("prepare", one, prepared)
    single = run_stage("sft", one, prepared)[0]
    stores, configs, runs = [], [], []
    for strategy in ("fsdp", "ddp"):
        store = LocalStore(tmp_path / strategy)
        shutil.copytree(prepared.root / "artifacts" / "prepare", store.root / "artifacts" / "prepare")
        layout = ["deploy.stages.sft.processes=2", f"sft.distributed.strategy={strategy}", "run.checkpoint_every=4"]
        configs.append(load_config(None, [*overrides, *layout, f"run.store={store.uri}"]))
        stores.append(store)
        manifest, log = launch("sft", configs[-1], store)
        runs.append(manifest)
        threads = max(1, math.floor(granted_cpus() / 2))  # two ranks share what the stage may use
        assert sum(f"INFO running on cpu, compute threads: {threads}" in line for line in log.lines) == 2
    ddp = runs[1]
    assert ddp.cache_key != single.cache_key and "processes" not in single.metrics
    assert ddp.metrics["steps"] == single.metrics["steps"] == 8
    assert ddp.metrics["train_tokens"] == pytest.approx(2 * single.metrics["train_tokens"], rel=0.1)
    assert ddp.metrics["last_loss"] < ddp.metrics["first_loss"]
    assert ddp.metrics["eval_loss"] < single.metrics["eval_loss"] + 0.5
    assert_trained_alike(*runs, "sft", tuple(stores))

    written = {"fsdp": {"__0_0.distcp", "__1_0.distcp"}, "ddp": {"rng_state_0.pth", "rng_state_1.pth"}}
    for (strategy, files), config, uninterrupted in zip(written.items(), configs, runs, strict=True):
        resumed = LocalStore(tmp_path / f"resumed-{strategy}")
        shutil.copytree(prepared.root / "artifacts" / "prepare", resumed.root / "artifacts" / "prepare")
        config = config.model_copy(update={"run": config.run.model_copy(update={"store": resumed.uri})})
        checkpoint, again = kill_and_resume("sft", config, resumed, tmp_path / f"{strategy}.yaml")
        names = {entry.path.rpartition("/")[2] for entry in checkpoint.files}
        assert files <= names and ("model.safetensors" in names) == (strategy == "ddp"), strategy
        assert again.resumed_from == checkpoint.step == 4
        assert again.digest == uninterrupted.digest, strategy


def test_sft_with_lora_on_a_sharded_base_trains_as_ddp_and_resumes_exactly(upstream, tmp_path):
    """LoRA under the Trainer's FSDP: transformers shards the frozen base as it loads, and the adapters peft adds
    after it are whole in every process, kept alike by the Trainer (broadcast once, gradients averaged). The
    same losses and merged model as DDP (the main process merges the adapters into its base loaded again whole),
    half of the base in each process. Killed after its first checkpoint (the adapters, their optimizer state
    and each process's RNG states, which the adapters' dropout draws from), it resumes to the uninterrupted
    run's bytes."""
    store, overrides = upstream
    lora = ["sft.lora.r=8", "sft.lora.dropout=0.1", "sft.learning_rate=2e-3", "sft.max_steps=6", "sft.logging_steps=1"]
    lora = [*overrides, *lora, "run.checkpoint_every=3"]
    stores, runs = sharded_and_ddp("sft", store, lora, tmp_path, ("sft.distributed.strategy=fsdp",))
    assert runs[0].metrics["last_loss"] < runs[0].metrics["first_loss"]
    assert_trained_alike(*runs, "sft", stores, halved=("frozen_bytes",))
    assert runs[0].metrics["parameter_bytes"] == runs[1].metrics["parameter_bytes"]  # the adapters, whole

    resumed = LocalStore(tmp_path / "resumed")
    shutil.copytree(stores[0].root / "artifacts" / "prepare", resumed.root / "artifacts" / "prepare")
    sharded = ["sft.distributed.strategy=fsdp", "deploy.stages.sft.processes=2", f"run.store={resumed.uri}"]
    config = load_config(None, [*lora, *sharded])
    checkpoint, again = kill_and_resume("sft", config, resumed, tmp_path / "resumed.yaml")
    assert again.resumed_from == checkpoint.step == 3 and again.digest == runs[0].digest


def test_multi_aspect_reward_model_sharded_over_two_processes_learns_and_publishes_one_folded_head(tmp_path):
    """HF's Trainer on two processes, the model sharded (`reward.distributed.strategy: fsdp`; each process holds
    half of it): the held-out predictions are gathered from both, each rated item once, and the main process
    publishes the reward model with its heads folded into one, the per-aspect model gathered beside it."""
    store = LocalStore(tmp_path / "store")
    rated = ["reward.kind=multi_aspect", "data.rated=builtin:demo", "data.demo.rated_rows=400"]
    rated.append("reward.distributed.strategy=fsdp")
    overrides = [*TINY, *rated, "prepare.min_agreement=0.3", "reward.max_steps=100", "reward.learning_rate=1e-3"]
    config = load_config(None, [*overrides, f"run.store={store.uri}", "run.device=cpu"])
    for stage in ("prepare", "sft"):
        run_stage(stage, config, store)
    two_processes = load_config(None, ["deploy.stages.reward.processes=2"]).deploy
    two, _ = launch("reward", config.model_copy(update={"deploy": two_processes}), store)
    assert two.metrics["kind"] == "multi_aspect" and two.metrics["processes"] == 2
    prepared = artifact_prefix("prepare", plan_stage(store, config, "prepare").key)
    assert two.metrics["eval_rows"] == len(read_verified(store, prepared, "rated_eval.jsonl").decode().splitlines())
    assert two.metrics["eval_rows"] > 0 and two.metrics["last_loss"] < two.metrics["first_loss"]
    assert two.metrics["aspect_correlation"]["helpfulness"] > 0.5  # as on one process (test_pipeline_e2e)
    assert two.metrics["eval_accuracy"] > 0.7  # the folded reward ranks held-out preference pairs
    prefix = artifact_prefix("reward", two.cache_key)
    models = [
        load_weights(read_verified(store, prefix, f"{folder}model.safetensors")) for folder in ("", "per_aspect/")
    ]
    whole = sum(tensor.nbytes for tensor in models[1].values())
    assert two.metrics["parameter_bytes"] == pytest.approx(whole / 2, rel=0.15)
    heads = [model["score.weight"] for model in models]
    assert heads[0].shape[0] == 1 and heads[1].shape[0] == 2
    weights = torch.tensor(list(config.reward.aspects.values()))
    torch.testing.assert_close(heads[0][0], weights @ heads[1])


def test_a_stage_given_fewer_cpus_than_the_machine_runs_that_many_compute_threads(tmp_path, monkeypatch):
    """deploy.stages.<stage>.cpus caps a local stage process as a cgroup quota caps one in a container."""
    monkeypatch.delenv(CPUS_ENV)  # the session's one thread per stage (conftest): the config's cap must do it
    assert len(os.sched_getaffinity(0)) >= 2  # the cap must be below what the process could use
    store = LocalStore(tmp_path / "store")
    config = load_config(None, [*TINY, f"run.store={store.uri}", "sft.max_steps=2", "deploy.stages.sft.cpus=1"])
    run_stage("prepare", config, store)
    store.write_bytes("runs/capped/config.yaml", dump_config(config).encode())
    log = _Log()
    ProcessLauncher().launch("sft", store.uri_of("runs/capped/config.yaml"), log)
    assert sum("INFO running on cpu, compute threads: 1" in line for line in log.lines) == 1


def test_stages_that_train_in_one_process_refuse_several():
    with pytest.raises(Exception, match="deploy.stages.evaluate: this stage runs in one process"):
        load_config(None, ["deploy.stages.evaluate.gpus=4"])
    with pytest.raises(Exception, match="deploy.stages.evaluate: this stage runs in one process"):
        load_config(None, ["deploy.stages.evaluate.processes=1", "deploy.stages.evaluate.nodes=2"])
    config = load_config(None, ["deploy.stages.evaluate.gpus=4", "deploy.stages.evaluate.processes=1"])
    assert config.deploy.world_size("evaluate") == 1
    deploy = load_config(None, ["deploy.stages.sft.gpus=8", "deploy.stages.sft.nodes=2"]).deploy
    assert deploy.processes_per_node("sft") == 8 and deploy.world_size("sft") == 16


def test_every_process_takes_the_main_process_decision(tmp_path):
    """Whether a stage is cached is read from the store by each process, but decided by the main one: here
    the second process sees an artifact the main one did not, then the other way round."""
    script = tmp_path / "decide.py"
    script.write_text(
        "import os\n"
        "from datetime import timedelta\n"
        "from rlhf_pipeline.stages.modeling.data_parallel import main_process_decides\n"
        "rank = int(os.environ['RANK'])\n"
        "minute = timedelta(minutes=1)\n"
        "first = main_process_decides('sft/cached', rank == 1, minute)\n"
        "second = main_process_decides('rl/cached', rank == 0, minute)\n"
        "os.write(1, f'decided {rank} {first} {second}\\n'.encode())  # one write: the two lines never interleave\n"
    )
    run = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script)]
    lines = subprocess.run(run, capture_output=True, text=True, check=True, timeout=120).stdout.splitlines()
    assert sorted(line for line in lines if line.startswith("decided")) == [
        "decided 0 False True",
        "decided 1 False True",
    ]


def load_in_shards(rank: int, folders: list[dict[str, Path]], port: int, out: Path) -> None:
    """One of two processes: a policy and a scorer loaded into their shards from its `folders`; what they
    compute and what this process holds of them, saved to `out`."""
    os.environ |= {"RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    cpu = torch.device("cpu")
    processes = join_processes(cpu, timedelta(minutes=1))
    policy_dir, scorer_dir = str(folders[rank]["policy"]), str(folders[rank]["scorer"])
    models = {
        "policy": load_sharded(lambda device: load_policy(policy_dir, device), cpu, processes),
        "scorer": load_sharded(lambda device: load_scorer(scorer_dir, device, pad_token_id=0), cpu, processes),
    }
    held = {name: local_bytes(list(model.parameters())) for name, model in models.items()}
    with torch.no_grad():  # which leaves the outermost group's weights gathered (FSDP2 does not reshard the root)
        computed = {name: model(input_ids=SHARDED_INPUT).logits for name, model in models.items()}
    torch.save({"computed": computed, "held": held}, out / f"rank-{rank}.pt")
    torch.distributed.destroy_process_group()


SHARDED_INPUT = torch.arange(3, 15).view(2, 6)


def test_models_load_straight_into_their_shards(tmp_path):
    """Only the main process reads a sharded model's weights: the other is given folders without them, builds
    each model from its config and receives its half of every tensor (and the rotary buffers, which no
    checkpoint holds). Both compute what the model loaded whole computes, each holding about half of it."""
    cpu = torch.device("cpu")
    save_tiny_llama(load_config(None, TINY).model, 0, tmp_path / "policy")
    unsharded = {
        "policy": load_policy(str(tmp_path / "policy"), cpu),
        "scorer": load_scorer(str(tmp_path / "policy"), cpu, pad_token_id=0),  # a new score head, saved
    }
    unsharded["scorer"].save_pretrained(tmp_path / "scorer")
    folders = [{name: tmp_path / name for name in unsharded}, {}]
    for name in unsharded:
        folders[1][name] = tmp_path / "config-only" / name
        folders[1][name].mkdir(parents=True)
        shutil.copy(tmp_path / name / "config.json", folders[1][name])
    torch.multiprocessing.spawn(load_in_shards, args=(folders, free_port(), tmp_path), nprocs=2)

    ranks = [torch.load(tmp_path / f"rank-{rank}.pt") for rank in (0, 1)]
    for name, model in unsharded.items():
        with torch.no_grad():
            expected = model(input_ids=SHARDED_INPUT).logits
        size = sum(p.nbytes for p in model.parameters())
        for rank in ranks:
            torch.testing.assert_close(rank["computed"][name], expected, rtol=1e-5, atol=1e-6)
            assert rank["held"][name] <= 1.15 * size / 2, name
        assert sum(rank["held"][name] for rank in ranks) == size, name


@pytest.fixture(scope="module")
def upstream(tmp_path_factory) -> tuple[LocalStore, list[str]]:
    """prepare, sft and reward once, for the RL stages on one and on two processes."""
    store = LocalStore(tmp_path_factory.mktemp("rl") / "store")
    overrides = [*TINY, f"run.store={store.uri}", "run.device=cpu"]
    config = load_config(None, overrides)
    for stage in ("prepare", "sft", "reward"):
        run_stage(stage, config, store)
    return store, overrides


def copy_upstream(store: LocalStore, into: Path) -> LocalStore:
    """A store of its own holding `store`'s artifacts up to reward: PPO on any number of processes is keyed as
    one run, so each count that is compared trains in its own store."""
    copy = LocalStore(into)
    shutil.copytree(store.root, copy.root, ignore=shutil.ignore_patterns("rl", "checkpoints", "runs"))
    return copy


SHARDED_RL = ("rl.distributed.strategy=fsdp",)  # the frozen models too (frozen: shard, the default)


def assert_frozen_models_halved(sharded: Manifest, ddp: Manifest) -> None:
    """Each process holds half of the weights of the models that do not train (references, reward models)."""
    assert sharded.metrics["frozen_bytes"] == pytest.approx(ddp.metrics["frozen_bytes"] / 2, rel=0.15)


def sharded_and_ddp(
    stage: str, store: LocalStore, overrides: list[str], tmp_path: Path, sharded: tuple[str, ...]
) -> tuple[tuple[LocalStore, LocalStore], tuple[Manifest, Manifest]]:
    """The stage of `overrides` on two processes, sharded (`sharded`: its settings) and under DDP, each in a copy
    of `store`'s artifacts upstream of it: the two stores and the two artifacts."""
    stores, runs = [], []
    for name, layout in (("fsdp", sharded), ("ddp", ())):
        apart = LocalStore(tmp_path / name)
        shutil.copytree(store.root, apart.root, ignore=shutil.ignore_patterns(stage, "rl", "checkpoints", "runs"))
        processes = f"deploy.stages.{stage}.processes=2"
        config = load_config(None, [*overrides, *layout, processes, f"run.store={apart.uri}"])
        stores.append(apart)
        runs.append(launch(stage, config, apart)[0])
    return (stores[0], stores[1]), (runs[0], runs[1])


def rl_on_two_processes(
    store: LocalStore, overrides: list[str], tmp_path: Path, layout: tuple[str, ...] = ("deploy.stages.rl.processes=2",)
) -> tuple[Manifest, Manifest, _Log, LocalStore]:
    """The rl stage of `overrides` in this process (in `store`), and on two processes under torchrun, or on the
    processes of `layout` (in a copy of its upstream artifacts, which it returns)."""
    one = run_stage("rl", load_config(None, overrides), store)[0]
    apart = copy_upstream(store, tmp_path / "two")
    two, log = launch("rl", load_config(None, [*overrides, *layout, f"run.store={apart.uri}"]), apart)
    return one, two, log, apart


def jsonl(store: LocalStore, manifest: Manifest, path: str) -> list[dict]:
    prefix = artifact_prefix("rl", manifest.cache_key)
    return [json.loads(line) for line in read_verified(store, prefix, path).decode().splitlines()]


def rl_weights(runs: list[tuple[LocalStore, Manifest]], path: str = "model.safetensors") -> list[dict]:
    """The tensors each rl run (a store and its artifact) published in `path`."""
    return [published_weights(where, "rl", manifest, path) for where, manifest in runs]


def assert_ppo_runs_agree(runs: list[tuple[LocalStore, Manifest]]) -> list[list[dict]]:
    """Two runs (each a store and its artifact) kept the same rollouts token for token, and every step's numbers
    agree within float rounding: the first step within the history's rounding (5 decimals), later ones as the
    rounding drifts. Returns the two histories."""
    samples = [jsonl(store, manifest, "ppo_samples.jsonl") for store, manifest in runs]
    assert [s["response"] for s in samples[1]] == [s["response"] for s in samples[0]]
    histories = [jsonl(store, manifest, "ppo_history.jsonl") for store, manifest in runs]
    for single, split in zip(*histories, strict=True):
        tolerance = {"abs": 2e-5} if split["step"] == 1 else {"rel": 1e-3, "abs": 2e-4}
        for key in ("score", "kl", "response_length", "tokens", "policy_loss", "value_loss", "approx_kl"):
            assert split[key] == pytest.approx(single[key], **tolerance), (split["step"], key)
    return histories


def test_reward_model_sharded_over_two_processes_trains_as_ddp(upstream, tmp_path):
    """`reward.distributed.strategy: fsdp` for the pairwise reward model (a sequence-classification model: its
    head is sharded with the rest), trained as under DDP; its held-out accuracy is scored on the shards."""
    store, overrides = upstream
    short = [*overrides, "reward.max_steps=6", "reward.logging_steps=1"]
    stores, runs = sharded_and_ddp("reward", store, short, tmp_path, ("reward.distributed.strategy=fsdp",))
    assert_trained_alike(*runs, "reward", stores)
    assert runs[0].metrics["eval_accuracy"] == runs[1].metrics["eval_accuracy"]


def test_reward_model_with_lora_on_a_sharded_base_trains_as_ddp(upstream, tmp_path):
    """A LoRA reward model on a sharded base: peft's trained copy of the score head, copied from the sharded
    one, is made whole in each process and trains as the adapters do; the kept adapter, head included, is DDP's."""
    store, overrides = upstream
    lora = ["reward.lora.r=8", "reward.lora.merge=false", "reward.learning_rate=2e-3"]
    short = [*overrides, *lora, "reward.max_steps=6", "reward.logging_steps=1"]
    stores, runs = sharded_and_ddp("reward", store, short, tmp_path, ("reward.distributed.strategy=fsdp",))
    assert runs[0].metrics["last_loss"] < runs[0].metrics["first_loss"]
    compared = ("first_loss", "last_loss", "eval_loss", "eval_accuracy")
    assert_trained_alike(*runs, "reward", stores, compared, ("frozen_bytes",), ADAPTER_FILE)
    assert any("score" in name for name in published_weights(stores[0], "reward", runs[0], ADAPTER_FILE))


def test_stages_after_a_kept_sft_adapter_shard_its_merged_model_as_ddp_holds_it_whole(tmp_path):
    """sft kept its LoRA adapter (`merge: false`); a sharded stage after it loads the model that adapter makes
    from a whole copy each process merges on the CPU before sharding (peft merges into whole weights only). The
    reward model, a scorer made from that adapter that keeps its own adapter too, and GRPO's policy, its reference
    (TRL builds it again from the policy's path: the merged copy's) and its frozen reward model (the reward
    adapter merged into the sft adapter merged into the base) train as under DDP, each process holding half."""
    store = LocalStore(tmp_path / "kept")
    overrides = [*TINY, "run.device=cpu", "sft.max_steps=20", "sft.lora.r=8", "sft.lora.merge=false"]
    config = load_config(None, [*overrides, f"run.store={store.uri}"])
    for stage in ("prepare", "sft"):
        run_stage(stage, config, store)
    short = [*overrides, "reward.max_steps=6", "reward.logging_steps=1", "reward.lora.r=8", "reward.lora.merge=false"]
    stores, runs = sharded_and_ddp("reward", store, short, tmp_path / "reward", ("reward.distributed.strategy=fsdp",))
    assert_trained_alike(*runs, "reward", stores, halved=("frozen_bytes",), weights_file=ADAPTER_FILE)
    reward = ["reward.distributed.strategy=fsdp", "deploy.stages.reward.processes=2"]  # the sharded one's
    grpo = [*short, *reward, "rl.algorithm=grpo", "rl.grpo.max_steps=2", "rl.grpo.logging_steps=1"]
    grpo += ["rl.grpo.batch_size=8", "rl.grpo.num_generations=4"]
    stores, runs = sharded_and_ddp("rl", stores[0], grpo, tmp_path / "grpo", SHARDED_RL)
    assert_trained_alike(*runs, "rl", stores, compared=("first_reward", "last_reward"))
    assert_frozen_models_halved(*runs)
    assert runs[1].metrics["frozen_bytes"] > 1.5 * runs[1].metrics["parameter_bytes"]  # the reference too


def test_dpo_sharded_over_two_processes_trains_as_ddp(upstream, tmp_path):
    """`rl.distributed.strategy: fsdp` for DPO: the policy and the frozen reference sharded (`frozen: shard`;
    with `replicate`, TRL's own reference is whole in each process, as GRPO's below); DDP's model."""
    store, overrides = upstream
    dpo = [*overrides, "rl.algorithm=dpo", "rl.dpo.max_steps=6", "rl.dpo.logging_steps=1"]
    stores, runs = sharded_and_ddp("rl", store, dpo, tmp_path, ("rl.distributed.strategy=fsdp",))
    assert_trained_alike(*runs, "rl", stores)
    assert runs[0].metrics["eval_reward_accuracy"] == pytest.approx(runs[1].metrics["eval_reward_accuracy"])


@pytest.mark.parametrize("method", ["grpo", "rloo"])
def test_group_methods_sharded_over_two_processes_sample_and_train_as_ddp(upstream, tmp_path, method):
    """TRL's GRPO and RLOO (one stage code, `rlhf.grpo_rloo`) with the policy sharded (generation gathers each
    layer's weights, every process joining each forward pass until all are done): the same sampled answers'
    rewards and the same model as DDP; TRL's reference (loaded through `model_init_kwargs`) and the reward
    model sharded too, half of them in each process."""
    store, overrides = upstream
    group = [*overrides, f"rl.algorithm={method}", f"rl.{method}.max_steps=3", f"rl.{method}.logging_steps=1"]
    group += [f"rl.{method}.batch_size=8", f"rl.{method}.num_generations=4"]
    stores, runs = sharded_and_ddp("rl", store, group, tmp_path, SHARDED_RL)
    assert_trained_alike(*runs, "rl", stores, compared=("first_reward", "last_reward"))
    assert_frozen_models_halved(*runs)
    assert runs[1].metrics["frozen_bytes"] > 1.5 * runs[1].metrics["parameter_bytes"]  # the reference too


def test_a_kept_reward_adapter_is_sharded_as_the_frozen_reward_model_as_ddp_holds_it_whole(upstream, tmp_path):
    """The reward stage kept its LoRA adapter (`merge: false`): an RL stage sharding its frozen models loads that
    adapter's reward model from a whole copy each process merges on the CPU (with its score head), and GRPO
    samples, is rewarded and trains as under DDP, each process holding half of the reward model."""
    store, overrides = upstream
    kept = copy_upstream(store, tmp_path / "kept")
    reward = [*overrides, "reward.lora.r=8", "reward.lora.merge=false", "reward.max_steps=6"]
    adapter, _ = run_stage("reward", load_config(None, [*reward, f"run.store={kept.uri}"]), kept)
    assert "adapter_config.json" in {entry.path for entry in adapter.files}
    grpo = [*reward, "rl.algorithm=grpo", "rl.grpo.max_steps=2", "rl.grpo.logging_steps=1"]
    grpo += ["rl.grpo.batch_size=8", "rl.grpo.num_generations=4"]
    stores, runs = sharded_and_ddp("rl", kept, grpo, tmp_path, SHARDED_RL)
    assert_trained_alike(*runs, "rl", stores, compared=("first_reward", "last_reward"))
    assert_frozen_models_halved(*runs)


def test_ppo_on_two_processes_samples_the_same_rollouts_and_trains_alike(upstream, tmp_path):
    """Each process generates, scores and trains on half of every batch and mini-batch: the rollouts are
    the one-process run's token for token (sampling is seeded per prompt), and every step's numbers, which
    are computed over the whole batch, agree within float rounding (gradients summed in another order). So PPO
    is keyed alike on any number of processes: one run's artifact serves the other."""
    store, overrides = upstream
    one, two, log, apart = rl_on_two_processes(store, [*overrides, "rl.ppo.steps=4"], tmp_path)
    assert two.metrics["processes"] == 2 and two.cache_key == one.cache_key
    assert sum("rl: step 1/4" in line for line in log.lines) == 1  # the main process reports
    samples = [jsonl(where, manifest, "ppo_samples.jsonl") for where, manifest in ((store, one), (apart, two))]
    assert len(samples[0]) == 2 * 16  # the first step's rollouts and the last's
    assert [s["score"] for s in samples[1]] == pytest.approx([s["score"] for s in samples[0]], abs=1e-4)
    histories = assert_ppo_runs_agree([(store, one), (apart, two)])
    assert histories[1][0]["first_ratio_error"] <= 1e-6


def test_rejection_sampling_on_two_processes_keeps_the_same_best_answers(upstream, tmp_path):
    """Each process samples and scores half of a round's prompts, and fine-tunes on half of every step's
    batch: the rounds' scores, before and after the first fine-tuning, and the trained weights are the
    one-process run's within float rounding (gradients averaged in another order). 33 kept answers leave a
    short last batch, which accelerate filled on two processes with answers trained twice."""
    store, overrides = upstream
    rounds = [*overrides, "rl.algorithm=rejection_sampling", "rl.rejection_sampling.prompts_per_round=33"]
    one, two, _, apart = rl_on_two_processes(store, rounds, tmp_path)
    assert two.metrics["processes"] == 2 and two.cache_key == one.cache_key  # keyed as one process
    rounds = [jsonl(where, manifest, "rounds.jsonl") for where, manifest in ((store, one), (apart, two))]
    assert len(rounds[1]) == len(rounds[0]) == 2
    for single, split in zip(*rounds, strict=True):
        assert split["score"] == pytest.approx(single["score"], abs=1e-5), split["round"]
        assert split["best_score"] == pytest.approx(single["best_score"], abs=1e-5), split["round"]
    weights = rl_weights([(store, one), (apart, two)])
    for name, tensor in weights[0].items():
        torch.testing.assert_close(weights[1][name], tensor, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("lora", [(), ("rl.rejection_sampling.training.lora.r=8",)], ids=["full", "lora"])
def test_rejection_sampling_sharded_over_two_processes_keeps_ddps_best_answers(upstream, tmp_path, lora):
    """The policy sharded for sampling and fine-tuning, the reward model for scoring. 33 prompts of 16 per
    generation batch: one process runs two batches, the other one and a filler that joins the first's second
    (a sharded model's forward passes gather from every process), generated and scored. The rounds' scores and
    the weights are DDP's within float rounding; each process holds half of the reward model. With LoRA the
    second round samples from the sharded SFT model with the first round's adapter on it, unmerged."""
    store, overrides = upstream
    rounds = [*overrides, "rl.algorithm=rejection_sampling", "rl.rejection_sampling.prompts_per_round=33", *lora]
    stores, manifests = sharded_and_ddp("rl", store, rounds, tmp_path, SHARDED_RL)
    assert_frozen_models_halved(*manifests)
    runs = list(zip(stores, manifests, strict=True))
    histories = [jsonl(where, manifest, "rounds.jsonl") for where, manifest in runs]
    assert len(histories[0]) == len(histories[1]) == 2
    for sharded, ddp in zip(*histories, strict=True):
        for key in ("score", "best_score"):
            assert sharded[key] == pytest.approx(ddp[key], abs=1e-5), (sharded["round"], key)
    weights = rl_weights(runs)
    assert weights[0].keys() - weights[1].keys() <= {"lm_head.weight"}  # the tied copy (assert_trained_alike)
    for name, tensor in weights[1].items():
        torch.testing.assert_close(weights[0][name], tensor, rtol=1e-4, atol=1e-5)


def test_ppo_sharded_over_two_processes_trains_as_one_holds_half_and_resumes_on_any_count(upstream, tmp_path):
    """FSDP2: the policy, the value model and their optimizer state are sharded over the two processes (the
    frozen reference and reward model too). Each process holds half of the trained state; the rollouts and
    every step's numbers are the one-process run's; the published model is one ordinary checkpoint. A run
    killed after its sharded checkpoint resumes from it and ends with the uninterrupted run's bytes, though it
    keeps the frozen models whole (`frozen: replicate`: a sharded forward pass gathers the very same weights);
    the same checkpoint resumed by one process, unsharded, trains on as the uninterrupted runs do."""
    store, overrides = upstream
    sharded = [*overrides, "rl.ppo.steps=4", "rl.distributed.strategy=fsdp", "run.checkpoint_every=2"]
    one, two, _, apart = rl_on_two_processes(store, sharded, tmp_path)
    for name in ("parameter_bytes", "gradient_bytes", "optimizer_bytes"):
        held, whole = two.metrics[f"{name}_per_process"], one.metrics[f"{name}_per_process"]
        assert whole / 2 <= held <= 1.15 * whole / 2, name
    peaks = [two.metrics[f"peak_rss_bytes_{who}"] for who in ("main_process", "other_processes")]
    assert min(peaks) > 0 and two.metrics["peak_rss_bytes_per_process"] == max(peaks)
    assert "peak_rss_bytes_main_process" not in one.metrics  # one process has no other to tell apart
    assert_ppo_runs_agree([(store, one), (apart, two)])
    weights = rl_weights([(store, one), (apart, two)])
    assert sorted(weights[1]) == sorted(weights[0])  # tied embeddings saved once, as an unsharded model saves them
    for name, tensor in weights[0].items():
        torch.testing.assert_close(weights[1][name], tensor, rtol=1e-3, atol=1e-4)

    resumed = copy_upstream(store, tmp_path / "resumed")
    replicated = [*sharded, "rl.distributed.frozen=replicate", "deploy.stages.rl.processes=2"]
    config = load_config(None, [*replicated, f"run.store={resumed.uri}"])
    config_path = tmp_path / "config.yaml"
    config_path.write_text(dump_config(config))
    checkpoints = resumed.root / "checkpoints" / "rl"
    killed_at = kill_after_first_checkpoint("rl", config_path, checkpoints)
    assert killed_at == 2
    checkpoint = shutil.copytree(checkpoints, tmp_path / "checkpoint")  # for the one-process resume below
    ProcessLauncher().launch("rl", str(config_path), _Log())
    again = read_manifest(resumed, plan_stage(resumed, config, "rl").prefix)
    assert again.resumed_from == killed_at
    assert again.digest == two.digest

    on_one = copy_upstream(store, tmp_path / "on-one")
    shutil.copytree(checkpoint, on_one.root / "checkpoints" / "rl")
    alone, _ = run_stage("rl", load_config(None, [*sharded, f"run.store={on_one.uri}"]), on_one)
    assert alone.resumed_from == killed_at and "processes" not in alone.metrics
    assert_ppo_runs_agree([(apart, two), (on_one, alone)])


def test_ppo_with_lora_sharded_over_two_processes_trains_as_one_and_resumes_exactly(upstream, tmp_path):
    """LoRA under FSDP2: the frozen bases are sharded with their adapters, which alone train and alone are
    checkpointed. The rollouts and every step's numbers are the one-process run's, the kept adapter is the
    same, and a run killed after its sharded checkpoint ends with the uninterrupted run's bytes."""
    store, overrides = upstream
    lora = ["rl.ppo.lora.r=8", "rl.ppo.lora.merge=false", "rl.ppo.learning_rate=2e-3"]
    sharded = [*overrides, *lora, "rl.ppo.steps=4", "rl.distributed.strategy=fsdp", "run.checkpoint_every=2"]
    one, two, _, apart = rl_on_two_processes(store, sharded, tmp_path)
    assert_ppo_runs_agree([(store, one), (apart, two)])
    assert two.metrics["parameter_bytes_per_process"] <= 1.15 * one.metrics["parameter_bytes_per_process"] / 2
    adapters = rl_weights([(store, one), (apart, two)], ADAPTER_FILE)
    assert sorted(adapters[1]) == sorted(adapters[0]) and any("lora_B" in name for name in adapters[0])
    for name, tensor in adapters[0].items():
        torch.testing.assert_close(adapters[1][name], tensor, rtol=1e-3, atol=1e-4)

    resumed = copy_upstream(store, tmp_path / "resumed")
    config = load_config(None, [*sharded, "deploy.stages.rl.processes=2", f"run.store={resumed.uri}"])
    checkpoint, again = kill_and_resume("rl", config, resumed, tmp_path / "config.yaml")
    assert again.resumed_from == checkpoint.step == 2 and again.digest == two.digest


def test_ppo_on_two_nodes_of_two_processes_trains_as_one_process(upstream, tmp_path, loopback_nodes):
    """PPO on two nodes of two processes each draws the one-process rollouts and trains alike; its checkpoint
    holds what every process on both nodes wrote (each uploads its own part of the replicated models)."""
    store, overrides = upstream
    layout = ("deploy.stages.rl.nodes=2", "deploy.stages.rl.processes=2")
    ppo = [*overrides, "rl.ppo.steps=3", "run.checkpoint_every=2"]
    one, four, _, apart = rl_on_two_processes(store, ppo, tmp_path, layout)
    assert four.metrics["processes"] == 4
    assert_ppo_runs_agree([(store, one), (apart, four)])
