"""Bad config or input: exit code 2, a message naming the file, the line and the field, no traceback."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import yaml

from rlhf_pipeline.stages.core.config import PipelineConfig
from rlhf_pipeline.stages.core.config_loading import dump_config, load_config
from rlhf_pipeline.stages.core.errors import InputError
from tests.conftest import REPO, rlhf


def test_demo_yaml_is_the_builtin_demo():
    assert load_config(REPO / "examples" / "demo.yaml") == load_config(None) == PipelineConfig()


def test_set_overrides_any_field_by_dotted_path():
    config = load_config(None, ["rl.algorithm=rejection_sampling", "rl.ppo.kl_coef=0.2", "run.store=s3://b/p"])
    assert config.rl.algorithm == "rejection_sampling"
    assert config.rl.ppo.kl_coef == 0.2
    assert config.run.store == "s3://b/p"


def test_unknown_key_names_file_line_and_field(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("run:\n  seed: 1\nsft:\n  epochs: 1\n  learnin_rate: 0.1\n")
    with pytest.raises(InputError) as error:
        load_config(path)
    assert str(error.value) == f"{path}:5: sft.learnin_rate: unknown key"


def test_wrong_type_names_file_line_and_field(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("rl:\n  algorithm: ppo\n  ppo:\n    batch_size: many\n")
    with pytest.raises(InputError, match=r"bad.yaml:4: rl.ppo.batch_size: Input should be a valid integer"):
        load_config(path)


def test_invalid_choice_and_cross_field_rules(tmp_path):
    known = "'ppo', 'rejection_sampling', 'dpo', 'grpo', 'rloo'"
    with pytest.raises(InputError, match=f"rl.algorithm: 'reinforce' is not one of {known}, nor is it"):
        load_config(None, ["rl.algorithm=reinforce"])
    with pytest.raises(InputError, match="rl.algorithm: 'reinforce' is not one of"):
        load_config(None, ["rl.algorithm=[ppo, reinforce]"])
    with pytest.raises(InputError, match="multiple of mini_batch_size"):
        load_config(None, ["rl.ppo.batch_size=10", "rl.ppo.mini_batch_size=4"])


def test_yaml_syntax_error_names_the_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("run:\n  seed: 1\n sft: [\n")
    with pytest.raises(InputError, match=r"broken.yaml:\d+: not valid YAML"):
        load_config(path)
    with pytest.raises(InputError, match=r"--set 'run.name=\[x': the value is not valid YAML"):
        load_config(None, ["run.name=[x"])


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _validate(*overrides: str):
    """`rlhf validate` of the demo config with some fields overridden."""
    return rlhf(
        "validate", str(REPO / "examples" / "demo.yaml"), *[a for o in overrides for a in ("--set", o)], timeout=60
    )


def test_cli_bad_config_exits_2_fast_without_traceback(tmp_path):
    config = _write(tmp_path / "c.yaml", yaml.safe_dump({"sft": {"learning_rate": "fast"}}))
    started = time.monotonic()
    result = rlhf("run", str(config), "--store", str(tmp_path / "store"), timeout=60)
    assert result.returncode == 2
    assert "c.yaml:2: sft.learning_rate" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert time.monotonic() - started < 15
    assert not (tmp_path / "store").exists()


def test_cli_bad_data_line_exits_2(tmp_path):
    data = _write(
        tmp_path / "sft.jsonl",
        '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}\n'
        '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant" "content": "x"}]}\n',
    )
    result = _validate(f"data.sft={data}")
    assert result.returncode == 2
    assert f"{data}:2: not valid JSON" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ('{"messages": []}', ":3: field 'messages': expected a non-empty list of messages"),
        ('{"messages": [{"role": "human", "content": "x"}]}', ":3: field 'messages': [0].role: 'human' is not one of"),
        ('{"text": "x"}', ":3: missing field 'messages'"),
        # Well formed but unusable: skipped and counted; one of three is more than data.max_skipped_fraction.
        (
            '{"messages": [{"role": "user", "content": "x"}]}',
            ": skipped 1 of 3 rows: 1 no assistant answer at the end (line 3), more than data.max_skipped_fraction",
        ),
    ],
)
def test_cli_bad_rows_name_line_and_field(tmp_path, row, message):
    good = '{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}'
    data = _write(tmp_path / "sft.jsonl", f"{good}\n{good}\n{row}\n")
    result = _validate(f"data.sft={data}")
    assert result.returncode == 2
    assert f"{data}{message}" in result.stderr and "Traceback" not in result.stderr


def test_cli_validate_accepts_good_inputs(tmp_path):
    rows = _write(
        tmp_path / "prefs.jsonl",
        '{"prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "assistant", "content": "good"}],'
        ' "rejected": [{"role": "assistant", "content": "bad"}], "margin": 1.5}\n',
    )
    result = _validate(f"data.preference={rows}")
    assert result.returncode == 0, result.stderr
    assert "data.preference" in result.stdout and "(1 preference rows, unspecified)" in result.stdout


@pytest.mark.parametrize("name", ["2025", "yes", "@runs"])
def test_a_store_path_is_a_path_whatever_yaml_reads_in_it(tmp_path, name):
    """`--store` went through `--set`'s YAML: 2025 became a number, yes a boolean, @runs a YAML error."""
    demo = str(REPO / "examples" / "demo.yaml")
    result = rlhf("validate", demo, "--store", name, timeout=60, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"run.store: {tmp_path / name}\n" in result.stdout


def test_cli_empty_data_file_and_missing_model(tmp_path):
    empty = _write(tmp_path / "empty.jsonl", "")
    result = _validate(f"data.prompts={empty}", "evaluate.judge=reward_model")
    assert result.returncode == 2 and "empty.jsonl: no rows" in result.stderr
    result = _validate(f"model.base={tmp_path}/nope")
    assert result.returncode == 2 and "model.base" in result.stderr and "config.json" in result.stderr


def test_cli_stage_with_missing_config_exits_2(tmp_path):
    result = rlhf("stage", "sft", "--config", str(tmp_path / "missing.yaml"), timeout=60)
    assert result.returncode == 2
    assert "missing.yaml: cannot read config" in result.stderr
    assert "Traceback" not in result.stderr
    resolved = tmp_path / "resolved.yaml"
    resolved.write_text(dump_config(load_config(None)))
    result = rlhf("stage", "prepare", "--config", str(resolved), "--set", "prepare.eval_fraction=2", timeout=60)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "--set: prepare.eval_fraction: Input should be less than 1" in result.stderr


def test_cli_node_outside_the_stages_nodes_exits_2(tmp_path):
    path = tmp_path / "two-nodes.yaml"
    path.write_text(yaml.safe_dump({"deploy": {"stages": {"sft": {"nodes": 2, "processes": 2}}}}))
    result = rlhf("node", "sft", "--config", str(path), "--node-rank", "2", timeout=60)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "--node-rank 2: deploy.stages.sft.nodes is 2 (ranks 0 to 1)" in result.stderr


@pytest.mark.parametrize("name", ["hh-rlhf", "shp", "oasst", "oasst-qlora", "dolly", "alpaca"])
def test_seed_dataset_examples_are_valid_and_licence_clean(name):
    from rlhf_pipeline.stages.data.sources import check_licenses

    config = load_config(REPO / "examples" / f"{name}.yaml")
    licenses = check_licenses(config)
    assert licenses and all(license for license in licenses.values())
    assert config.evaluate.judge == "reward_model"


NO_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": None,
    "AWS_SECRET_ACCESS_KEY": None,
    "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent",
    "AWS_CONFIG_FILE": "/nonexistent",
    "AWS_EC2_METADATA_DISABLED": "true",
}


@pytest.mark.parametrize(
    ("env", "bucket", "message"),
    [
        (NO_CREDENTIALS, "present", "no S3 credentials (set AWS_ACCESS_KEY_ID"),
        ({}, "absent", "bucket 'absent-bucket' at http://127.0.0.1:"),
        ({"AWS_ENDPOINT_URL": "http://127.0.0.1:9", "AWS_MAX_ATTEMPTS": "1"}, "present", "cannot reach the S3"),
        ({"AWS_ENDPOINT_URL": "https:"}, "present", "no TLS connection to the S3 endpoint https://127.0.0.1:"),
        ({"AWS_SECRET_ACCESS_KEY": None}, "present", "Partial credentials found in env, missing: AWS_SECRET"),
        ({"AWS_ENDPOINT_URL": "127.0.0.1:9000"}, "present", "AWS_ENDPOINT_URL: Invalid endpoint: 127.0.0.1:9000"),
    ],
)
def test_an_unusable_s3_store_exits_2_naming_it(s3_bucket, tmp_path, env, bucket, message):
    """No credentials or half of them, no bucket, no server, https:// to a plain-HTTP server, an endpoint without
    its scheme: `rlhf validate`, `run`, `runs` and `chat` stop before anything starts."""
    name = s3_bucket if bucket == "present" else "absent-bucket"
    store = f"s3://{name}/runs"
    if env.get("AWS_ENDPOINT_URL") == "https:":  # the test server's address, as https://
        env = {"AWS_ENDPOINT_URL": os.environ["AWS_ENDPOINT_URL"].replace("http:", "https:")}
    child_env = {k: v for k, v in (os.environ | env).items() if v is not None}
    demo = str(REPO / "examples" / "demo.yaml")
    for command in (
        ("validate", demo, "--store", store),
        ("run", "--store", store),
        ("runs", "--store", store),
        ("chat", f"{store}/artifacts/sft/0123"),
    ):
        result = rlhf(*command, timeout=120, env=child_env, input="")
        assert result.returncode == 2, (command, result.stderr[-2000:])
        assert f"store {store}" in result.stderr and message in result.stderr, (command, result.stderr[-2000:])
        assert "Traceback" not in result.stderr + result.stdout


def test_a_store_under_a_file_exits_2(tmp_path):
    (tmp_path / "taken").write_text("not a directory")
    result = rlhf("run", "--store", str(tmp_path / "taken" / "store"), timeout=60)
    assert result.returncode == 2
    assert f"store {tmp_path / 'taken' / 'store'}: {tmp_path / 'taken'} is a file" in result.stderr


def test_deploy_refuses_a_schedule_prefect_would_not_take(tmp_path):
    result = rlhf("deploy", "--set", "deploy.schedule=0 2 * *", "--store", str(tmp_path / "store"), timeout=60)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert "deploy.schedule: '0 2 * *' is not a cron expression" in result.stderr


def test_settings_that_would_train_on_another_distribution_or_leave_no_prompt_are_refused(tmp_path):
    path = tmp_path / "grpo.yaml"
    path.write_text("rl:\n  algorithm: grpo\n  grpo:\n    generation: {max_new_tokens: 8, top_k: 50}\n")
    with pytest.raises(InputError, match=r"grpo.yaml:3: rl.grpo: .*generation.top_k: TRL's GRPO and RLOO compute"):
        load_config(path)
    with pytest.raises(InputError, match=r"rl.rloo: .*generation.min_new_tokens: TRL's GRPO and RLOO compute"):
        load_config(None, ["rl.rloo.generation.min_new_tokens=4"])
    with pytest.raises(InputError, match=r"min_new_tokens must not exceed max_new_tokens"):
        load_config(None, ["rl.ppo.generation.min_new_tokens=30", "rl.ppo.generation.max_new_tokens=20"])
    assert load_config(None, ["rl.ppo.generation.min_new_tokens=4"]).rl.ppo.generation.min_new_tokens == 4
    with pytest.raises(InputError, match=r"rl.ppo.generation.max_new_tokens \(64\) leaves no room for the prompt"):
        load_config(None, ["rl.ppo.generation.max_new_tokens=64"])
    assert load_config(None, ["rl.ppo.generation.top_k=50"]).rl.ppo.generation.top_k == 50  # PPO scores top-k


@pytest.mark.parametrize("override", ["sft.batch_size=0", "reward.epochs=0", "rl.grpo.learning_rate=-1"])
def test_a_section_that_changes_a_default_keeps_the_fields_limits(override):
    with pytest.raises(InputError, match=override.split("=")[0].replace(".", r"\.")):
        load_config(None, [override])


@pytest.mark.parametrize(
    "override",
    [
        "sft.logging_steps=0",
        "rl.grpo.logging_steps=-5",
        "model.tiny.num_heads=0",
        "rl.ppo.gamma=1.5",
        "rl.ppo.lam=-1",
        # infinite and NaN numbers pass every bound in pydantic unless refused
        "deploy.stages.sft.collective_timeout_minutes=.inf",
        "rl.ppo.missing_eos_penalty=.nan",
        "data.stage_split={sft: .nan}",
        "data.stage_split={sft: -1, reward: 2}",
        "data.stage_split={sft: 0, reward: 0, rl: 0}",
        "data.sft=[{path: builtin:demo, weight: .inf}]",
        "reward.aspects={}",
    ],
)
def test_settings_no_stage_could_train_with_are_refused_with_the_config(override):
    """Caught where the config is read (exit 2 naming the field), not when a stage's Trainer or model refuses
    them with a traceback, retried as a crash."""
    with pytest.raises(InputError, match=override.split("=")[0].replace(".", r"\.")):
        load_config(None, [override])


def test_the_tiny_models_heads_must_split_its_width_evenly():
    with pytest.raises(InputError, match=r"model\.tiny: .*hidden_size must be a multiple of 2 × num_heads"):
        load_config(None, ["model.tiny.hidden_size=36", "model.tiny.num_heads=4"])


def test_several_methods_are_each_checked_and_a_stage_runs_only_one(tmp_path):
    config = load_config(None, ["rl.algorithm=[ppo, rejection_sampling, dpo]"])
    assert config.rl.methods == ("ppo", "rejection_sampling", "dpo")
    assert [config.for_method(m).rl.method for m in config.rl.methods] == list(config.rl.methods)
    assert load_config(None, ["rl.algorithm=[dpo]"]).rl.method == "dpo"  # a list of one is a run of one
    with pytest.raises(InputError, match="a list names each method once"):
        load_config(None, ["rl.algorithm=[ppo, ppo]"])
    with pytest.raises(InputError, match=r"with rl.algorithm ppo: rl.ppo.batch_size: 64 does not divide among"):
        load_config(None, ["rl.algorithm=[dpo, ppo]", "deploy.stages.rl.processes=3"])
    with pytest.raises(InputError, match=r"rl.rejection_sampling.training.batch_size: 8 does not divide among the 3"):
        load_config(None, ["rl.algorithm=[dpo, rejection_sampling]", "deploy.stages.rl.processes=3"])
    path = tmp_path / "several.yaml"
    path.write_text(yaml.safe_dump({"rl": {"algorithm": ["ppo", "dpo"]}}))
    result = rlhf("stage", "rl", "--config", str(path), timeout=60)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "rl.algorithm lists several methods (ppo, dpo): a stage trains one" in result.stderr


def test_sharding_is_refused_where_it_is_not_written_yet(tmp_path):
    assert load_config(None, ["rl.distributed.strategy=fsdp"]).rl.distributed.frozen == "shard"
    assert load_config(None, ["rl.distributed.strategy=fsdp", "rl.ppo.lora.r=8"]).rl.ppo.lora.r == 8
    with pytest.raises(InputError, match=r"fsdp does not shard a quantized \(QLoRA\) base \(rl.ppo\); use ddp"):
        load_config(None, ["rl.distributed.strategy=fsdp", "rl.ppo.lora.r=8", "rl.ppo.lora.quantize=4bit"])
    path = tmp_path / "sharded.yaml"
    methods = ["ppo", "rejection_sampling"]
    path.write_text(yaml.safe_dump({"rl": {"algorithm": methods, "distributed": {"strategy": "fsdp"}}}))
    result = rlhf("validate", str(path), timeout=60)
    assert result.returncode == 0, result.stderr  # every method shards its frozen models
    assert load_config(None, ["sft.distributed.strategy=fsdp"]).sft.distributed.strategy == "fsdp"
    assert load_config(None, ["sft.distributed.strategy=fsdp", "sft.lora.r=8"]).sft.lora.r == 8  # LoRA too
    with pytest.raises(InputError, match=r"sft.distributed.strategy: fsdp does not shard a quantized \(QLoRA\)"):
        load_config(None, ["sft.distributed.strategy=fsdp", "sft.lora.r=8", "sft.lora.quantize=8bit"])
    multi_aspect = ["reward.distributed.strategy=fsdp", "reward.kind=multi_aspect", "data.rated=builtin:demo"]
    assert load_config(None, multi_aspect).reward.distributed.strategy == "fsdp"
    kept = ["sft.lora.r=8", "sft.lora.merge=false"]  # its model is merged into a whole copy, then sharded
    assert load_config(None, ["reward.distributed.strategy=fsdp", *kept]).sft.lora.merge is False
    sharded_dpo = ["rl.algorithm=dpo", "rl.distributed.strategy=fsdp"]
    assert load_config(None, sharded_dpo).rl.method == "dpo"
    assert load_config(None, [*sharded_dpo, "rl.dpo.lora.r=8"]).rl.dpo.lora.r == 8
    assert load_config(None, ["rl.algorithm=grpo", "rl.distributed.strategy=fsdp"]).rl.distributed.frozen == "shard"
