"""Inter-rater agreement: Fleiss' kappa over items each rated by the same number of raters."""

from __future__ import annotations

from collections.abc import Hashable, Sequence


def category_counts(ratings: Sequence[Sequence[Hashable]]) -> list[list[int]]:
    """Per item, how many raters chose each category (categories: every value seen, sorted)."""
    categories = sorted({value for item in ratings for value in item})
    return [[list(item).count(category) for category in categories] for item in ratings]


def item_agreement(counts: Sequence[int]) -> float:
    """P_i: the share of rater pairs that agree on this item."""
    raters = sum(counts)
    if raters < 2:
        raise ValueError("an item needs at least two ratings")
    return (sum(c * c for c in counts) - raters) / (raters * (raters - 1))


def fleiss_kappa(counts: Sequence[Sequence[int]]) -> float:
    """κ = (P̄ − P̄e) / (1 − P̄e), from a table of items × categories of rating counts."""
    raters = {sum(row) for row in counts}
    if len(raters) != 1:
        raise ValueError("Fleiss' kappa needs the same number of raters for every item")
    n = raters.pop()
    items = len(counts)
    observed = sum(item_agreement(row) for row in counts) / items
    shares = [sum(row[j] for row in counts) / (items * n) for j in range(len(counts[0]))]
    expected = sum(p * p for p in shares)
    if expected == 1.0:
        return 1.0
    return (observed - expected) / (1 - expected)
