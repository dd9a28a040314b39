"""Cache keys: a stage's name, resolved config, inputs' digests and code version, and nothing else."""

from stages import artifacts
from stages.artifacts import FileEntry, Manifest, cache_key
from stages.config import load_config


def test_key_depends_on_every_ingredient(monkeypatch):
    base = cache_key("sft", {"lr": 1}, {"prepare": "d1"})
    assert base == cache_key("sft", {"lr": 1}, {"prepare": "d1"})
    assert base != cache_key("reward", {"lr": 1}, {"prepare": "d1"})
    assert base != cache_key("sft", {"lr": 2}, {"prepare": "d1"})
    assert base != cache_key("sft", {"lr": 1}, {"prepare": "d2"})
    monkeypatch.setattr(artifacts, "code_version", lambda: "other-code")
    assert base != cache_key("sft", {"lr": 1}, {"prepare": "d1"})


def test_a_stage_keys_only_on_its_own_sections():
    ppo = load_config(None)
    rejection = load_config(None, ["rl.algorithm=rejection_sampling"])
    for stage in ("prepare", "sft", "reward"):
        assert ppo.stage_sections(stage) == rejection.stage_sections(stage)
    assert ppo.stage_sections("rl") != rejection.stage_sections("rl")
    moved_store = load_config(None, ["run.store=/elsewhere", "run.checkpoint_every=7"])
    assert all(ppo.stage_sections(s) == moved_store.stage_sections(s) for s in ("prepare", "sft", "rl"))
    assert ppo.stage_sections("sft") != load_config(None, ["run.seed=1"]).stage_sections("sft")


def test_digest_covers_content_not_timestamps():
    files = [FileEntry(path="a", size=1, sha256="x")]
    first = Manifest(stage="s", cache_key="k", code_version="c", config={}, files=files, created_at="2020")
    second = Manifest(stage="s", cache_key="k", code_version="c", config={}, files=files, created_at="2030")
    changed = Manifest(
        stage="s", cache_key="k", code_version="c", config={}, files=[FileEntry(path="a", size=1, sha256="y")]
    )
    assert first.digest == second.digest != changed.digest
