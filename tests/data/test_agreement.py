"""Fleiss' kappa against the worked example in Fleiss (1971) as tabulated on Wikipedia: 10 items, 14 raters."""

import pytest

from rlhf_pipeline.stages.data.agreement import category_counts, fleiss_kappa, item_agreement

TABLE = [
    [0, 0, 0, 0, 14],
    [0, 2, 6, 4, 2],
    [0, 0, 3, 5, 6],
    [0, 3, 9, 2, 0],
    [2, 2, 8, 1, 1],
    [7, 7, 0, 0, 0],
    [3, 2, 6, 3, 0],
    [2, 5, 3, 2, 2],
    [6, 5, 2, 1, 0],
    [0, 2, 2, 3, 7],
]


def test_fleiss_kappa_matches_the_hand_computed_table():
    # P̄ = 0.378, P̄e = 0.2128 (column shares 0.143, 0.200, 0.279, 0.150, 0.229), κ = 0.210
    assert item_agreement(TABLE[0]) == 1.0
    assert item_agreement(TABLE[1]) == pytest.approx(0.253, abs=1e-3)
    assert fleiss_kappa(TABLE) == pytest.approx(0.2099, abs=1e-4)


def test_perfect_and_chance_agreement():
    assert fleiss_kappa([[3, 0], [0, 3], [3, 0]]) == pytest.approx(1.0)
    assert fleiss_kappa([[1, 1], [1, 1]]) == pytest.approx(-1.0)


def test_counts_from_raw_ratings():
    assert category_counts([[1, 1, 2], [3, 3, 3]]) == [[2, 1, 0], [0, 0, 3]]


def test_unequal_rater_counts_are_rejected():
    with pytest.raises(ValueError, match="same number of raters"):
        fleiss_kappa([[2, 0], [1, 2]])
