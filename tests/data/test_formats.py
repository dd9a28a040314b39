"""Each seed dataset's published row format, converted exactly; broken files named by file, line/row and field."""

from __future__ import annotations

import gzip
import json
import math
from pathlib import Path

import pytest

from rlhf_pipeline.stages.core.artifacts import artifact_prefix, read_verified
from rlhf_pipeline.stages.core.config_loading import load_config
from rlhf_pipeline.stages.core.errors import InputError
from rlhf_pipeline.stages.core.store import LocalStore
from rlhf_pipeline.stages.data import demo_task
from rlhf_pipeline.stages.data.formats import convert as convert_source
from rlhf_pipeline.stages.data.sources import check_licenses, stage_share, weighted
from rlhf_pipeline.stages.runner import run_stage
from tests.conftest import rlhf

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


def convert(source: str, format_name: str, kind: str, max_skipped_fraction: float = 1.0) -> list[dict]:
    """The rows only; the small fixtures' skipped rows are not refused here (they are tested on their own)."""
    return convert_source(source, format_name, kind, "train", max_skipped_fraction).rows


def load_rows_of(store: LocalStore, manifest, name: str) -> list[dict]:
    prefix = artifact_prefix("prepare", manifest.cache_key)
    return [json.loads(line) for line in read_verified(store, prefix, name).decode().splitlines()]


def _contents(rows: list[dict]) -> str:
    return json.dumps(rows)


def test_dolly_context_joins_the_instruction_in_the_user_turn():
    rows = convert(str(FIXTURES / "dolly.jsonl"), "dolly", "sft")
    assert rows[0]["messages"] == [
        {
            "role": "user",
            "content": "When did Virgin Australia start operating?\n\n"
            "Virgin Australia commenced services on 31 August 2000 as Virgin Blue.",
        },
        {"role": "assistant", "content": "Virgin Australia started on 31 August 2000."},
    ]
    assert rows[1]["messages"][0]["content"] == "Which is a species of fish? Tope or Rope"
    assert convert(str(FIXTURES / "dolly.jsonl"), "dolly", "prompt")[1] == {
        "prompt": [{"role": "user", "content": "Which is a species of fish? Tope or Rope"}]
    }


def test_alpaca_json_array_with_and_without_input():
    rows = convert(str(FIXTURES / "alpaca.json"), "alpaca", "sft")
    assert rows[0]["messages"][0] == {"role": "user", "content": "Give three tips for staying healthy."}
    assert rows[1]["messages"] == [
        {"role": "user", "content": "Translate the sentence into French.\n\nI like cheese."},
        {"role": "assistant", "content": "J'aime le fromage."},
    ]


def test_oasst_sft_follows_the_best_ranked_replies_from_root_to_leaf():
    rows = convert(str(FIXTURES / "oasst.jsonl"), "oasst", "sft")
    assert rows == [
        {
            "messages": [
                {"role": "user", "content": "What is a kite?"},
                {"role": "assistant", "content": "A tethered flying craft."},
                {"role": "user", "content": "How do I fly one?"},
                {"role": "assistant", "content": "Face the wind and let out line."},
            ]
        }
    ]


def test_oasst_preferences_come_from_ranked_siblings_with_their_history():
    rows = convert(str(FIXTURES / "oasst.jsonl"), "oasst", "preference")
    pairs = {(r["chosen"][0]["content"], r["rejected"][0]["content"]): r["prompt"] for r in rows}
    assert set(pairs) == {("A tethered flying craft.", "A bird."), ("Face the wind and let out line.", "Throw it.")}
    assert [m["content"] for m in pairs[("Face the wind and let out line.", "Throw it.")]] == [
        "What is a kite?",
        "A tethered flying craft.",
        "How do I fly one?",
    ]


def test_oasst_never_shows_deleted_or_failed_review_messages():
    everything = _contents(
        [
            row
            for kind in ("sft", "preference", "prompt")
            for row in convert(str(FIXTURES / "oasst.jsonl"), "oasst", kind)
        ]
    )
    for hidden in ("DELETED", "FAILED REVIEW", "UNDER"):
        assert hidden not in everything
    assert convert(str(FIXTURES / "oasst.jsonl"), "oasst", "prompt") == [
        {"prompt": [{"role": "user", "content": "What is a kite?"}]}
    ]


def test_oasst_orphan_message_is_an_error(tmp_path):
    path = tmp_path / "o.jsonl"
    path.write_text(json.dumps({"message_id": "a", "parent_id": "zzz", "role": "assistant", "text": "x"}) + "\n")
    with pytest.raises(InputError, match=r"o.jsonl:1: field 'parent_id': 'zzz' is not a message_id"):
        convert(str(path), "oasst", "sft")


def test_shp_label_picks_the_preferred_comment_and_keeps_the_score_ratio_as_margin():
    rows = convert(str(FIXTURES / "shp.jsonl"), "shp", "preference")
    assert rows[0]["chosen"][0]["content"] == "Rayleigh scattering."
    assert rows[0]["rejected"][0]["content"] == "Because it is."
    assert rows[0]["margin"] == pytest.approx(math.log(40 / 10))
    assert rows[1]["chosen"][0]["content"] == "It makes things wet."
    assert rows[1]["margin"] == pytest.approx(math.log(30 / 3))
    assert rows[0]["prompt"] == [{"role": "user", "content": "Why is the sky blue?"}]


def test_hh_rlhf_transcripts_become_multi_turn_messages():
    rows = convert(str(FIXTURES / "hh_rlhf.jsonl"), "hh-rlhf", "preference")
    assert rows[0] == {
        "prompt": [
            {"role": "user", "content": "What is 2+2?"},
            {"role": "assistant", "content": "4."},
            {"role": "user", "content": "And times 3?"},
        ],
        "chosen": [{"role": "assistant", "content": "12."}],
        "rejected": [{"role": "assistant", "content": "I don't know."}],
    }
    sft = convert(str(FIXTURES / "hh_rlhf.jsonl"), "hh-rlhf", "sft")
    assert [m["role"] for m in sft[0]["messages"]] == ["user", "assistant", "user", "assistant"]
    assert "Human:" not in _contents(rows + sft) and "Assistant:" not in _contents(rows + sft)


def test_imdb_reviews_become_continuations_and_sentiment_pairs():
    """The CSV of the 50k-review set: markup gone, a quoted review spanning two lines, a too-short review left out."""
    sft = convert(str(FIXTURES / "imdb.csv"), "imdb", "sft")
    assert len(sft) == 4
    assert sft[0]["messages"] == [
        {
            "role": "user",
            "content": "Continue this movie review: A wonderful little production. The filming technique is",
        },
        {
            "role": "assistant",
            "content": "very unassuming, very old-time BBC fashion and gives a comforting sense of realism.",
        },
    ]
    assert sft[2]["messages"][1]["content"].endswith("with a story that spans two lines of this")
    pairs = convert(str(FIXTURES / "imdb.csv"), "imdb", "preference")
    # positives (rows 1, 3) against negatives (rows 2, 5); the opening alternates between the two reviews
    assert len(pairs) == 2
    assert pairs[0]["prompt"][0]["content"].endswith("A wonderful little production. The filming technique is")
    assert pairs[0]["rejected"][0]["content"].startswith("thinks there's a zombie")
    assert pairs[1]["prompt"][0]["content"].endswith("This movie made it into one of my")
    assert pairs[1]["chosen"][0]["content"].startswith("is a visually stunning film")
    assert [p["prompt"] for p in convert(str(FIXTURES / "imdb.csv"), "imdb", "prompt")] == [
        row["messages"][:1] for row in sft
    ]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (
            'review,sentiment\n"Great film, loved every minute of it and more, truly.",neutral\n',
            r"x.csv:2: field 'sentiment': 'neutral' is outside",
        ),
        ('review,sentiment\n"One, two",positive,extra\n', r"x.csv:2: expected 2 columns"),
        ("text\nno label here at all in this row of the file ok\n", r"x.csv:2: missing field 'label'"),
    ],
)
def test_broken_imdb_csv_names_line_and_field(tmp_path, content, message):
    path = tmp_path / "x.csv"
    path.write_text(content)
    with pytest.raises(InputError, match=message):
        convert(str(path), "imdb", "preference")


def test_parquet_files_are_read_row_by_row(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [json.loads(line) for line in (FIXTURES / "shp.jsonl").read_text().splitlines()]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "shp.parquet")
    assert convert(str(tmp_path / "shp.parquet"), "shp", "preference") == convert(
        str(FIXTURES / "shp.jsonl"), "shp", "preference"
    )
    rows[1]["labels"] = 7
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "bad.parquet")
    with pytest.raises(InputError, match=r"bad.parquet: row 1: field 'labels': 7 is outside its range"):
        convert(str(tmp_path / "bad.parquet"), "shp", "preference")


@pytest.mark.parametrize(
    ("fmt", "kind", "content", "message"),
    [
        ("dolly", "sft", '{"instruction": "a", "response": "b"}\n{"instruction": "a"\n', r"x.jsonl:2: not valid JSON"),
        ("dolly", "sft", '{"instruction": "a"}\n', r"x.jsonl:1: missing field 'response'"),
        ("alpaca", "sft", '{"instruction": 3, "output": "b"}\n', r"x.jsonl:1: field 'instruction': expected str"),
        (
            "shp",
            "preference",
            '{"history": "h", "human_ref_A": "a", "human_ref_B": "b", "labels": 2}\n',
            r"x.jsonl:1: field 'labels': 2 is outside its range",
        ),
        (
            "hh-rlhf",
            "preference",
            '{"chosen": "no turns here", "rejected": "x"}\n',
            r"x.jsonl:1: field 'chosen': text before the first 'Human:' turn",
        ),
        ("hh-rlhf", "preference", '{"chosen": "", "rejected": ""}\n', r"x.jsonl:1: field 'chosen': no 'Human:'"),
        (
            "messages",
            "sft",
            '{"messages": [{"role": "human", "content": "x"}]}\n',
            r"x.jsonl:1: field 'messages': \[0\].role: 'human' is not one of",
        ),
        ("dolly", "sft", "", r"x.jsonl: no rows \(the file is empty\)"),
        ("dolly", "preference", '{"instruction": "a"}\n', r"format 'dolly' has no preference rows"),
        ("reddit", "sft", '{"a": 1}\n', r"unknown format 'reddit'"),
    ],
)
def test_broken_input_names_file_line_and_field(tmp_path, fmt, kind, content, message):
    path = tmp_path / "x.jsonl"
    path.write_text(content)
    with pytest.raises(InputError, match=message):
        convert(str(path), fmt, kind)


def test_cli_convert_prints_jsonl_and_exits_2_on_bad_rows(tmp_path):
    result = rlhf("data", "convert", str(FIXTURES / "hh_rlhf.jsonl"), "--format", "hh-rlhf", "--kind", "prompt")
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert lines[1] == {"prompt": [{"role": "user", "content": "Say hi."}]}
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"history": "h", "human_ref_A": "a", "human_ref_B": "b", "labels": -1}\n')
    result = rlhf("data", "convert", str(bad), "--format", "shp", "--kind", "preference")
    assert result.returncode == 2
    assert "bad.jsonl:1: field 'labels': -1 is outside its range" in result.stderr
    assert "Traceback" not in result.stderr


def test_noncommercial_data_is_refused_unless_allowed_and_licences_are_recorded():
    alpaca = {"path": str(FIXTURES / "alpaca.json"), "format": "alpaca"}
    config = load_config(None, [f"data.sft=[{json.dumps(alpaca)}]"])
    with pytest.raises(InputError, match=r"data.sft\[0\]: .*alpaca.json is licensed CC BY-NC 4.0"):
        check_licenses(config)
    allowed = load_config(None, [f"data.sft=[{json.dumps(alpaca)}]", "data.allow_noncommercial=true"])
    assert check_licenses(allowed)[alpaca["path"]] == "CC BY-NC 4.0"
    dolly = load_config(None, [f'data.sft=[{{"path": "{FIXTURES / "dolly.jsonl"}", "format": "dolly"}}]'])
    assert check_licenses(dolly)[str(FIXTURES / "dolly.jsonl")] == "CC BY-SA 3.0"


def _pairs(words: list[str]) -> list[dict]:
    return [
        {
            "prompt": [{"role": "user", "content": f"describe the {w} ."}],
            "chosen": [{"role": "assistant", "content": f"the {w} is kind ."}],
            "rejected": [{"role": "assistant", "content": f"the {w} is rude ."}],
        }
        for w in words
    ]


def test_prepare_deduplicates_splits_and_then_weights_each_source(tmp_path):
    """`weight: 2` repeats a source's training rows (it used to be deduplicated away), eval never holds a copy of
    a training row, and rows that an earlier source already has count as duplicates."""
    words = [f"w{i}" for i in range(20)]
    first, second = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    first.write_text("".join(json.dumps(r) + "\n" for r in _pairs(words) + _pairs(words[:5])))
    second.write_text("".join(json.dumps(r) + "\n" for r in _pairs(words[:3] + [f"v{i}" for i in range(7)])))
    sources = [{"path": str(first), "weight": 2}, {"path": str(second), "weight": 0.5}]
    store = LocalStore(tmp_path / "store")
    config = load_config(None, [f"data.preference={json.dumps(sources)}", f"run.store={store.uri}"])
    manifest, _ = run_stage("prepare", config, store)
    metrics = manifest.metrics["preference"]
    assert metrics["rows"] == 35 and metrics["duplicates"] == 5 + 3
    train = [json.dumps(r) for r in load_rows_of(store, manifest, "preference_train.jsonl")]
    held_out = [json.dumps(r) for r in load_rows_of(store, manifest, "preference_eval.jsonl")]
    # a.jsonl: 20 unique rows, 2 held out, 18 trained twice; b.jsonl: 7 new rows, 1 held out, half of 6 trained.
    assert len(held_out) == 2 and len(train) == 18 * 2 + 3 == metrics["train"]
    assert not set(held_out) & set(train)
    assert sorted(train.count(row) for row in set(train))[-18:] == [2] * 18


def test_stage_split_gives_each_stage_different_rows():
    rows = list(range(100))
    split = {"sft": 2, "reward": 4, "rl": 4}
    parts = {stage: stage_share(rows, split, stage, "seed") for stage in ("sft", "reward", "rl")}
    assert [len(parts[s]) for s in ("sft", "reward", "rl")] == [20, 40, 40]
    assert sorted(parts["sft"] + parts["reward"] + parts["rl"]) == rows


def test_weighted_repeats_and_samples():
    import random

    assert weighted([1, 2, 3, 4], 1.5, random.Random(0)).count(1) >= 1
    assert len(weighted([1, 2, 3, 4], 1.5, random.Random(0))) == 6
    assert len(weighted([1, 2, 3, 4], 0.25, random.Random(0))) == 1


QUIRKS = FIXTURES / "hh_rlhf_quirks.jsonl"


def test_hh_rlhf_rows_that_cannot_be_used_are_skipped_and_counted_with_their_lines():
    """Rows shaped like the real dump's odd ones: the prompt is the turns both transcripts share (TRL's rule)
    where that makes a usable pair; what cannot be used is skipped, counted by reason, with line numbers."""
    converted = convert_source(str(QUIRKS), "hh-rlhf", "preference", "train", 0.25)
    assert len(converted.rows) == 14
    assert converted.skipped.summary() == (
        "skipped 4 of 18 rows: 1 chosen identical to rejected (line 15); 1 empty answer (line 16); "
        "1 transcripts share no prompt (line 17); 1 no assistant answer at the end (line 18)"
    )
    diverged = converted.rows[13]  # line 14: the two transcripts differ at the first assistant turn already
    assert diverged["prompt"] == [{"role": "user", "content": "What do you think of my plan?"}]
    assert [m["content"] for m in diverged["chosen"]] == [
        "It sounds thoughtful.",
        "Should I go ahead?",
        "Yes, if you have checked the risks.",
    ]
    assert diverged["rejected"][0] == {"role": "assistant", "content": "It sounds bad."}
    # Prompts are the chosen transcript before its answer: only the row whose chosen answer is empty has none.
    prompts = convert_source(str(QUIRKS), "hh-rlhf", "prompt", "train", 0.25)
    assert len(prompts.rows) == 17 and prompts.skipped.reasons == {"empty answer": ["16"]}


def test_too_many_unusable_rows_refuse_the_source_naming_file_and_fraction(tmp_path):
    with pytest.raises(InputError, match=r"hh_rlhf_quirks.jsonl: skipped 4 of 18 rows: .*data.max_skipped_fraction"):
        convert_source(str(QUIRKS), "hh-rlhf", "preference", "train", 0.05)
    result = rlhf("data", "convert", str(QUIRKS), "--format", "hh-rlhf", "--kind", "preference")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "more than data.max_skipped_fraction (0.05)" in result.stderr
    result = rlhf(
        "data", "convert", str(QUIRKS), "--format", "hh-rlhf", "--kind", "preference", "--max-skipped-fraction", "0.3"
    )
    assert result.returncode == 0 and len(result.stdout.splitlines()) == 14
    assert result.stderr.strip().endswith("1 no assistant answer at the end (line 18)")


def test_prepare_reports_skipped_rows_in_its_metrics(tmp_path):
    store = LocalStore(tmp_path / "store")
    source = {"path": str(QUIRKS), "format": "hh-rlhf"}
    overrides = [f"data.preference=[{json.dumps(source)}]", "data.max_skipped_fraction=0.25", f"run.store={store.uri}"]
    metrics = run_stage("prepare", load_config(None, overrides), store)[0].metrics["preference"]
    assert metrics["rows"] == 14 and metrics["skipped"] == 4
    assert metrics["skipped_reasons"][str(QUIRKS)]["empty answer"] == {"count": 1, "first": ["16"]}


@pytest.mark.parametrize(
    ("fmt", "row", "reason"),
    [
        (
            "shp",
            {"history": "h", "human_ref_A": "a", "human_ref_B": "b", "labels": 1, "score_A": 5, "score_B": 5},
            "tied scores",
        ),
        ("shp", {"history": "h", "human_ref_A": "same", "human_ref_B": "same", "labels": 1}, "chosen identical"),
        ("dolly", {"instruction": "Name a fish.", "context": "", "response": "  "}, "empty answer"),
        ("alpaca", {"instruction": " ", "input": "", "output": "x"}, "empty instruction"),
        (
            "preference",
            {
                "prompt": [{"role": "user", "content": "q"}],
                "chosen": [{"role": "assistant", "content": "a"}],
                "rejected": [{"role": "assistant", "content": "a"}],
            },
            "chosen identical to rejected",
        ),
        ("messages", {"messages": [{"role": "user", "content": "q"}]}, "no assistant answer at the end"),
    ],
)
def test_well_formed_unusable_rows_are_skipped_not_errors(tmp_path, fmt, row, reason):
    kind = "sft" if fmt in ("dolly", "alpaca", "messages") else "preference"
    good = {
        "shp": {"history": "h", "human_ref_A": "a", "human_ref_B": "b", "labels": 1, "score_A": 5, "score_B": 2},
        "dolly": {"instruction": "Name a fish.", "context": "", "response": "Tope"},
        "alpaca": {"instruction": "Name a fish.", "input": "", "output": "Tope"},
        "preference": {
            "prompt": [{"role": "user", "content": "q"}],
            "chosen": [{"role": "assistant", "content": "a"}],
            "rejected": [{"role": "assistant", "content": "b"}],
        },
        "messages": {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
    }[fmt]
    path = tmp_path / "x.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps(row) + "\n")
    converted = convert_source(str(path), fmt, kind, "train", 0.5)
    assert len(converted.rows) == 1 and converted.skipped.count == 1
    assert list(converted.skipped.reasons)[0].startswith(reason) and converted.skipped.reasons
    assert list(converted.skipped.reasons.values()) == [["2"]]


def test_implicit_prompt_preference_rows_get_the_shared_turns_as_prompt(tmp_path):
    """TRL's implicit-prompt form: no `prompt`, two whole conversations."""
    user = {"role": "user", "content": "q"}
    row = {
        "chosen": [user, {"role": "assistant", "content": "good"}],
        "rejected": [user, {"role": "assistant", "content": "bad"}],
    }
    path = tmp_path / "x.jsonl"
    path.write_text(json.dumps(row) + "\n")
    assert convert(str(path), "preference", "preference") == [
        {"prompt": [user], "chosen": [{"role": "assistant", "content": "good"}], "rejected": row["rejected"][1:]}
    ]


def _message_rows(*contents: str) -> list[dict]:
    return [
        {"messages": [{"role": "user", "content": c}, {"role": "assistant", "content": c.upper()}]} for c in contents
    ]


def test_files_as_real_dumps_ship_them_are_read(tmp_path):
    """Gzipped files (hh-rlhf's and oasst's downloads), a UTF-8 byte-order mark (Windows tools), and text holding
    U+2028 or U+0085, which JSON leaves unescaped inside strings but Python's splitlines() breaks lines at."""
    rows = _message_rows("a\u2028b", "c\x85d", "e")
    lines = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    (tmp_path / "plain.jsonl").write_text(lines, encoding="utf-8")
    (tmp_path / "bom.jsonl").write_text("\ufeff" + lines, encoding="utf-8")
    (tmp_path / "bom.json").write_text("\ufeff" + json.dumps(rows, indent=2), encoding="utf-8")
    with gzip.open(tmp_path / "zipped.jsonl.gz", "wt", encoding="utf-8") as file:
        file.write(lines)
    for name in ("plain.jsonl", "bom.jsonl", "bom.json", "zipped.jsonl.gz"):
        assert convert(str(tmp_path / name), "messages", "sft") == rows, name
    csv_text = (FIXTURES / "imdb.csv").read_text()
    (tmp_path / "bom.csv").write_text("\ufeff" + csv_text, encoding="utf-8")
    with gzip.open(tmp_path / "zipped.csv.gz", "wt", encoding="utf-8") as file:
        file.write(csv_text)
    for name in ("bom.csv", "zipped.csv.gz"):
        assert convert(str(tmp_path / name), "imdb", "sft") == convert(str(FIXTURES / "imdb.csv"), "imdb", "sft"), name


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        # blank lines between CSV rows still count: the bad row is on line 5
        (
            "x.csv",
            'review,sentiment\n\n"One two three four five six seven eight nine",positive\n\n"x",maybe\n',
            "x.csv:5:",
        ),
        ("x.jsonl", "[" * 100_000 + "]" * 100_000 + "\n", r"x.jsonl:1: JSON nested too deeply"),
        ("x.jsonl.gz", "not gzip at all\n", r"x.jsonl.gz: cannot read data file"),
    ],
)
def test_broken_files_name_their_line(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(InputError, match=message):
        convert(str(path), "imdb" if name.endswith(".csv") else "messages", "sft")


def test_preference_rows_as_ultrafeedback_and_other_exports_shape_them(tmp_path):
    """UltraFeedback binarized keeps the prompt's text beside two whole conversations (TRL's maybe_extract_prompt
    takes the shared turns); some exports repeat a `prompt` list at the start of both conversations; a margin
    must be a finite number."""
    user = {"role": "user", "content": "q"}
    good, bad = {"role": "assistant", "content": "good"}, {"role": "assistant", "content": "bad"}
    expected = {"prompt": [user], "chosen": [good], "rejected": [bad]}
    rows = [
        {"prompt": "q", "chosen": [user, good], "rejected": [user, bad], "score_chosen": 8.0, "score_rejected": 5.0},
        {"prompt": [user], "chosen": [user, good], "rejected": [user, bad]},
        {"prompt": [user], "chosen": [good], "rejected": [bad]},
    ]
    path = tmp_path / "x.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    assert convert(str(path), "preference", "preference") == [expected] * 3
    path.write_text(json.dumps({**rows[2], "margin": float("nan")}) + "\n")
    with pytest.raises(InputError, match=r"x.jsonl:1: field 'margin': expected a finite number"):
        convert(str(path), "preference", "preference")


def test_unusable_shp_and_oasst_rows_are_counted(tmp_path):
    """An SHP row whose label prefers the lower-scored comment (SHP's preference is the score's) and an empty
    oasst message are skipped and counted with their lines; the empty message's replies go with it."""
    shp = tmp_path / "shp.jsonl"
    good = {"history": "h", "human_ref_A": "a", "human_ref_B": "b", "labels": 1, "score_A": 9, "score_B": 2}
    shp.write_text(json.dumps(good) + "\n" + json.dumps(good | {"labels": 0}) + "\n")
    converted = convert_source(str(shp), "shp", "preference", "train", 0.5)
    assert len(converted.rows) == 1 and converted.skipped.reasons == {"label disagrees with scores": ["2"]}
    messages = [
        {"message_id": "p", "parent_id": None, "role": "prompter", "text": "Hi?"},
        {"message_id": "a", "parent_id": "p", "role": "assistant", "text": "Hello.", "rank": 0},
        {"message_id": "b", "parent_id": "p", "role": "assistant", "text": "  ", "rank": 1},
        {"message_id": "c", "parent_id": "b", "role": "prompter", "text": "More?"},
    ]
    oasst = tmp_path / "oasst.jsonl"
    oasst.write_text("".join(json.dumps(m) + "\n" for m in messages))
    converted = convert_source(str(oasst), "oasst", "sft", "train", 0.5)
    assert converted.rows == [
        {"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]}
    ]
    assert converted.skipped.reasons == {"empty message": ["3"]}
    assert convert_source(str(oasst), "oasst", "prompt", "train", 0.5).skipped.count == 1


def test_prepare_refuses_a_kind_left_with_nothing_to_train_on_or_hold_out(tmp_path):
    store = LocalStore(tmp_path / "store")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(
        "".join(json.dumps({"prompt": [{"role": "user", "content": f"q{i}"}]}) + "\n" for i in range(20))
    )
    own = [f"data.prompts={prompts}", "evaluate.judge=reward_model", f"run.store={store.uri}"]
    split = [*own, "data.stage_split={sft: 1, reward: 1}"]
    with pytest.raises(InputError, match=r"data.prompts\[0\]: .*p.jsonl: data.stage_split leaves the rl stage none"):
        run_stage("prepare", load_config(None, split), store)
    held_out = [*own, "prepare.eval_fraction=0.99"]
    with pytest.raises(InputError, match=r"data.prompts: no prompt rows left to train on \(20 distinct rows"):
        run_stage("prepare", load_config(None, held_out), store)


def test_demo_raters_judge_relevance_by_topic_and_helpfulness_by_tone():
    prompt = "tell me about the bird today ."
    assert demo_task.true_ratings(prompt, "the bird is harsh , harsh and gloomy .") == {
        "relevance": 5,
        "helpfulness": 1,
    }
    assert demo_task.true_ratings(prompt, "the cat is lovely , bright and lovely .") == {
        "relevance": 1,
        "helpfulness": 5,
    }
    assert demo_task.true_ratings(prompt, "the bird is lovely , harsh and lovely .") == {
        "relevance": 5,
        "helpfulness": 4,
    }


def test_rated_items_with_other_raters_or_aspects_name_their_line_or_source(tmp_path):
    """Fleiss' kappa needs every item rated on the same aspects by as many raters: the item that differs is
    named by its line, a source that differs from another by both sources."""
    conversation = {"prompt": [{"role": "user", "content": "q"}], "response": [{"role": "assistant", "content": "a"}]}
    three, two = {"helpfulness": [4, 5, 4]}, {"helpfulness": [4, 5]}
    path = tmp_path / "rated.jsonl"
    path.write_text("".join(json.dumps(conversation | {"ratings": r}) + "\n" for r in (three, three, two)))
    with pytest.raises(InputError, match=r"rated.jsonl:3: field 'ratings': raters per aspect \{'helpfulness': 2\}"):
        convert(str(path), "rated", "rated")
    (tmp_path / "three.jsonl").write_text(json.dumps(conversation | {"ratings": three}) + "\n")
    (tmp_path / "two.jsonl").write_text(json.dumps(conversation | {"ratings": two}) + "\n")
    store = LocalStore(tmp_path / "store")
    sources = json.dumps([{"path": str(tmp_path / name), "format": "rated"} for name in ("three.jsonl", "two.jsonl")])
    config = load_config(None, [f"data.rated={sources}", f"run.store={store.uri}"])
    with pytest.raises(InputError, match=r"data.rated: raters per aspect differ between the sources: .*two.jsonl"):
        run_stage("prepare", config, store)
