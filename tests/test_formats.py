"""Each seed dataset's published row format, converted exactly; broken files named by file, line/row and field."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from stages.config import load_config
from stages.errors import InputError
from stages.formats import convert
from stages.sources import check_licenses, load_kind, stage_share, weighted
from tests.conftest import rlhf

FIXTURES = Path(__file__).parent / "fixtures"


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


def test_sources_mix_with_weights():
    sources = [
        {"path": str(FIXTURES / "hh_rlhf.jsonl"), "format": "hh-rlhf", "weight": 2},
        {"path": str(FIXTURES / "shp.jsonl"), "format": "shp", "weight": 0.5},
    ]
    config = load_config(None, [f"data.preference={json.dumps(sources)}", "data.allow_noncommercial=true"])
    rows = load_kind(config, "preference")
    assert len(rows) == 2 * 2 + 1
    assert sum(r["prompt"][0]["content"] == "Say hi." for r in rows) == 2


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
