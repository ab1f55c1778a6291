import numpy as np
import pytest

from pipeline.core.runs import consecutive_runs, run_ids


def test_runs_fill_up_to_the_bound_in_order():
    assert consecutive_runs([310, 0, 450, 220, 505, 175], 500) == [(0, 2), (2, 3), (3, 4), (4, 5), (5, 6)]
    assert consecutive_runs([2, 2, 2, 2, 2], 4) == [(0, 2), (2, 4), (4, 5)]
    assert consecutive_runs([10] * 6, 10**9) == [(0, 6)]
    assert run_ids([2, 2, 2, 2, 2], 4).tolist() == [0, 0, 1, 1, 2]
    assert run_ids([1, 1], 4).dtype == np.int32


def test_an_item_over_the_bound_is_a_run_of_its_own():
    assert consecutive_runs([1, 9, 1], 3) == [(0, 1), (1, 2), (2, 3)]
    assert consecutive_runs([9], 3) == [(0, 1)]
    assert run_ids([5, 5, 5], 1).tolist() == [0, 1, 2]


def test_zero_weight_items_never_open_a_run_alone():
    # leading empty items ride with the first weighted one; past a run over the bound, an
    # empty item opens the next run (the rule the graph's committed search groups were cut by)
    assert consecutive_runs([0, 0, 600, 0, 600, 0], 500) == [(0, 3), (3, 5), (5, 6)]
    assert consecutive_runs([0, 3, 0, 1], 5) == [(0, 4)]
    assert consecutive_runs([0, 0, 0], 1) == [(0, 3)]


def test_empty_input_has_no_runs():
    assert consecutive_runs([], 5) == []
    assert run_ids(np.zeros(0, np.int64), 5).shape == (0,)


@pytest.mark.parametrize("seed", range(5))
def test_runs_cover_every_item_once_and_respect_the_bound(seed):
    rng = np.random.default_rng(seed)
    weights = rng.integers(0, 50, 200) * (rng.random(200) < 0.8)
    runs = consecutive_runs(weights, 100)
    assert runs[0][0] == 0 and runs[-1][1] == len(weights)
    assert all(a < b and b == c for (a, b), (c, _) in zip(runs, runs[1:] + [(len(weights), None)]))
    for a, b in runs:
        assert weights[a:b].sum() <= 100 or b - a == 1 or weights[a:b].max() == weights[a:b].sum()
