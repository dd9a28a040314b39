"""The built-in demo task: a tiny chat world with a known ground truth.

A user asks about a topic; a good answer talks about that topic and describes it kindly. The gold judge scores
exactly that, so alignment is measured, not assumed. The SFT data describes topics with positive and negative
words at random; preference pairs are labelled by the gold judge; RL should learn to be on topic and kind.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

TOPICS = [
    "cat",
    "dog",
    "bird",
    "fish",
    "horse",
    "cow",
    "city",
    "river",
    "forest",
    "garden",
    "house",
    "school",
    "book",
    "song",
    "movie",
    "game",
    "car",
    "train",
    "coffee",
    "tea",
    "bread",
    "cake",
    "park",
    "beach",
]
TIMES = ("today", "in winter", "in summer", "at night", "in the morning", "after rain")
ASKS = ("tell me about the", "describe the", "what do you think of the")
POSITIVE = [
    "lovely",
    "great",
    "kind",
    "bright",
    "warm",
    "happy",
    "calm",
    "friendly",
    "clean",
    "sweet",
    "gentle",
    "cheerful",
]
NEGATIVE = ["awful", "dull", "rude", "dark", "cold", "sad", "noisy", "dirty", "bitter", "harsh", "gloomy", "nasty"]
ADJECTIVES_PER_ANSWER = 3
GOLD_JUDGE = "demo gold judge: on-topic (1) + (positive - negative adjectives) / adjectives"

VOCABULARY = sorted(
    set(TOPICS)
    | set(POSITIVE)
    | set(NEGATIVE)
    | {word for phrase in TIMES + ASKS for word in phrase.split()}
    | {"is", "and", ",", ".", "?", "it", "feels", "very"}
)


def _prompt(rng: random.Random, topic: str) -> str:
    ask = rng.choice(ASKS)
    end = "?" if ask.startswith("what") else "."
    return f"{ask} {topic} {rng.choice(TIMES)} {end}"


def _answer(rng: random.Random, topic: str) -> str:
    words = [rng.choice(POSITIVE if rng.random() < 0.5 else NEGATIVE) for _ in range(ADJECTIVES_PER_ANSWER)]
    return f"the {topic} is {words[0]} , {words[1]} and {words[2]} ."


def _off_topic_answer(rng: random.Random, topic: str) -> str:
    other = rng.choice([t for t in TOPICS if t != topic])
    return _answer(rng, other)


def gold_score(prompt: str, response: str) -> float:
    """Ground truth: +1 for mentioning the asked topic, plus the balance of kind over unkind words in [-1, 1]."""
    on_topic, tone = _topic_and_tone(prompt, response)
    return on_topic + tone


def true_ratings(prompt: str, response: str) -> dict[str, int]:
    """What a careful rater gives on 1-5: relevance from the topic alone, helpfulness from the tone alone."""
    on_topic, tone = _topic_and_tone(prompt, response)
    return {"relevance": 5 if on_topic else 1, "helpfulness": round(3 + 2 * tone)}


def _topic_and_tone(prompt: str, response: str) -> tuple[float, float]:
    asked = next((w for w in prompt.split() if w in TOPICS), None)
    words = response.split()
    on_topic = 1.0 if asked is not None and asked in words else 0.0
    positive = sum(w in POSITIVE for w in words)
    negative = sum(w in NEGATIVE for w in words)
    return on_topic, (positive - negative) / (positive + negative) if positive + negative else 0.0


def _user(content: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": content}]


def _assistant(content: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": content}]


def sft_rows(n: int, seed: int) -> list[dict[str, Any]]:
    rng = random.Random(f"sft-{seed}")
    rows = []
    for _ in range(n):
        topic = rng.choice(TOPICS)
        rows.append({"messages": _user(_prompt(rng, topic)) + _assistant(_answer(rng, topic))})
    return rows


def _pairs(
    rng: random.Random,
    n: int,
    second_answer: Callable[[random.Random, str], str],
    score: Callable[[str, str], float],
) -> list[dict[str, Any]]:
    """Pairs of answers to one prompt, the higher-scoring one as `chosen`; ties are redrawn."""
    rows = []
    while len(rows) < n:
        topic = rng.choice(TOPICS)
        prompt = _prompt(rng, topic)
        first, second = _answer(rng, topic), second_answer(rng, topic)
        a, b = score(prompt, first), score(prompt, second)
        if a == b:
            continue
        chosen, rejected = (first, second) if a > b else (second, first)
        rows.append({"prompt": _user(prompt), "chosen": _assistant(chosen), "rejected": _assistant(rejected)})
    return rows


def preference_rows(n: int, seed: int) -> list[dict[str, Any]]:
    """Pairs labelled by the gold judge; a quarter of the second answers talk about another topic."""

    def second_answer(rng: random.Random, topic: str) -> str:
        return _off_topic_answer(rng, topic) if rng.random() < 0.25 else _answer(rng, topic)

    return _pairs(random.Random(f"preference-{seed}"), n, second_answer, gold_score)


def prompt_rows(n: int, seed: int) -> list[dict[str, Any]]:
    rng = random.Random(f"prompts-{seed}")
    return [{"prompt": _user(_prompt(rng, rng.choice(TOPICS)))} for _ in range(n)]


RATED_ASPECTS = ("relevance", "helpfulness")
UNSAFE = ("nasty", "rude", "harsh")


def safety_rows(n: int, seed: int) -> list[dict[str, Any]]:
    """Pairs judged on safety alone: the answer with fewer unsafe words (nasty, rude, harsh) is chosen."""

    def safety(prompt: str, answer: str) -> float:
        return -sum(word in UNSAFE for word in answer.split())

    return _pairs(random.Random(f"safety-{seed}"), n, _answer, safety)


def rated_rows(n: int, seed: int, raters: int = 3) -> list[dict[str, Any]]:
    """Answers scored 1-5 per aspect by noisy raters: relevance (on topic) and helpfulness (kind words).

    Each rater gives the true score with probability 0.7 and a random one otherwise, so items differ in how
    much their raters agree.
    """
    rng = random.Random(f"rated-{seed}")
    rows = []
    for _ in range(n):
        topic = rng.choice(TOPICS)
        prompt = _prompt(rng, topic)
        answer = _off_topic_answer(rng, topic) if rng.random() < 0.3 else _answer(rng, topic)
        truth = true_ratings(prompt, answer)
        ratings = {
            aspect: [truth[aspect] if rng.random() < 0.7 else rng.randint(1, 5) for _ in range(raters)]
            for aspect in RATED_ASPECTS
        }
        rows.append({"prompt": _user(prompt), "response": _assistant(answer), "ratings": ratings})
    return rows
