"""The position schemes and the invariant checker, on many random inputs."""

from __future__ import annotations

import re

import numpy as np
import pytest

from longrecipe.positions import (
    InvariantError,
    batch_positions_with_gaps,
    check_positions,
    full_positions,
    longrecipe_gaps,
    longrecipe_positions,
    pose_positions,
    positions_with_gaps,
    random_gaps,
    randomized_positions,
    source_gaps,
)

CASES = [(n, t) for n, t in [(2, 3), (3, 4), (5, 64), (40, 41), (100, 333), (300, 1024)]]


def _valid(pos: np.ndarray, n: int, target: int) -> None:
    check_positions(pos, np.array([0, n]), length=n, target_len=target)


@pytest.mark.parametrize("n,target", CASES)
def test_randomized_is_a_sorted_distinct_sample_from_the_window(n, target):
    for seed in range(30):
        pos = randomized_positions(np.random.default_rng(seed), n, target)
        _valid(pos, n, target)
    # Over many draws every position of the window gets used: nothing is out of reach.
    seen = np.zeros(target, bool)
    for seed in range(300):
        seen[randomized_positions(np.random.default_rng(seed), n, target)] = True
    assert seen.mean() > 0.95


@pytest.mark.parametrize("n,target", CASES)
def test_pose_is_two_contiguous_chunks_with_a_skip(n, target):
    lasts = []
    for seed in range(60):
        pos, head = pose_positions(np.random.default_rng(seed), n, target)
        _valid(pos, n, target)
        assert 1 <= head <= (n + 1) // 2
        assert np.array_equal(pos[:head], np.arange(head))
        assert (np.diff(pos[head:]) == 1).all()
        lasts.append(pos[-1])
    assert min(lasts) >= n - 1 and max(lasts) <= target - 1
    if target - n > 20:
        assert max(lasts) > n - 1 + 0.7 * (target - n)  # the skip really spans the window


def test_random_gaps_are_a_composition_of_the_total():
    rng = np.random.default_rng(0)
    for m, total in [(1, 0), (1, 7), (5, 0), (5, 3), (50, 1000), (1000, 56000)]:
        g = random_gaps(rng, m, total)
        assert len(g) == m and (g >= 0).all() and g.sum() == total
    assert len(random_gaps(rng, 0, 10)) == 0
    # Uniform composition: each gap has mean total/m.
    means = np.mean([random_gaps(rng, 4, 400) for _ in range(2000)], axis=0)
    assert np.allclose(means, 100, rtol=0.1)


def test_source_gaps_true_when_they_fit_scaled_when_not():
    d = np.array([0, 5, 10, 0, 85])
    assert np.array_equal(source_gaps(d, 100), d)
    assert np.array_equal(source_gaps(d, 200), d)
    s = source_gaps(d, 50)
    assert s.sum() == 50 and (s >= 0).all()
    assert np.array_equal(s, [0, 2, 5, 0, 43])  # cumulative floor of d * 50/100
    assert source_gaps(np.zeros(0, np.int64), 5).sum() == 0


@pytest.mark.parametrize("n,target", CASES)
@pytest.mark.parametrize("rule", ["random", "fixed", "none"])
def test_longrecipe_positions_keep_sentences_contiguous(n, target, rule):
    rng = np.random.default_rng(n * 1000 + target)
    for _ in range(20):
        k = int(rng.integers(1, n + 1))
        starts = np.sort(rng.choice(n, size=k, replace=False))
        starts[0] = 0 if rng.random() < 0.5 else starts[0]
        starts = np.unique(starts)
        allowed = np.zeros(n, bool)
        allowed[starts] = True
        pos, rt = longrecipe_positions(
            np.random.default_rng(int(rng.integers(1 << 30))),
            n,
            target,
            starts,
            head_rule=rule,
            head_len=min(3, n),
        )
        check_positions(pos, np.array([0, n]), length=n, target_len=target, jumps_allowed=allowed)
        assert np.array_equal(pos[:rt], np.arange(rt))
        if rule == "random":
            assert 1 <= rt <= (n + 1) // 2
        # All spare positions are spent whenever a sentence starts after the head.
        if (starts >= max(rt, 1)).any():
            assert pos[-1] == target - 1
        else:
            assert pos[-1] == n - 1


def test_longrecipe_source_rule_gives_true_offsets():
    # Kept sentences at source [0,3) [5,8) [20,24): offsets 0,1,2 5,6,7 20..23.
    starts, dist = np.array([0, 3, 6]), np.array([0, 2, 12])
    pos, rt = longrecipe_positions(None, 10, 100, starts, head_rule="none", distances=dist)
    assert rt == 1
    assert pos.tolist() == [0, 1, 2, 5, 6, 7, 20, 21, 22, 23]
    # Window too small for the true distances (14 > 20 - 10): gaps scaled by 10/14 with
    # cumulative rounding down (2 -> 1, 2+12 -> 10), sentences intact, last position 19.
    pos, _ = longrecipe_positions(None, 10, 20, starts, head_rule="none", distances=dist)
    assert pos.tolist() == [0, 1, 2, 4, 5, 6, 16, 17, 18, 19]


def test_batch_positions_equal_per_sample_positions():
    rng = np.random.default_rng(3)
    n, target = 50, 400
    bs, gs, singles = [], [], []
    for _ in range(7):
        starts = np.unique(rng.choice(n, size=int(rng.integers(1, 20)), replace=False))
        b, g, _ = longrecipe_gaps(rng, n, target, starts)
        bs.append(b)
        gs.append(g)
        singles.append(positions_with_gaps(n, b, g))
    flat = batch_positions_with_gaps(n, bs, gs)
    assert flat.dtype == np.int32
    assert np.array_equal(flat, np.concatenate(singles))
    assert np.array_equal(
        batch_positions_with_gaps(3, [np.zeros(0, int)] * 2, [np.zeros(0, int)] * 2),
        [0, 1, 2, 0, 1, 2],
    )
    assert len(batch_positions_with_gaps(3, [], [])) == 0


def test_full_positions():
    assert full_positions(4).tolist() == [0, 1, 2, 3]


@pytest.mark.parametrize(
    "pos,offsets,what",
    [
        ([0, 1, 2, 0, 1], [0, 3, 5], "sample 8: 2 positions, expected 3"),
        ([0, 1, 2, 1, 2, 3], [0, 3, 6], "sample 8: position_ids[0] is 1, not 0"),
        ([0, 2, 2, 0, 1, 2], [0, 3, 6], "sample 7: positions not strictly increasing at token 2"),
        ([0, 1, 2, 0, 1, 10], [0, 3, 6], "sample 8: position 10 is not below target_len 10"),
    ],
)
def test_checker_names_the_bad_sample(pos, offsets, what):
    with pytest.raises(InvariantError, match=re.escape(what)):
        check_positions(np.array(pos), np.array(offsets), length=3, target_len=10, first_id=7)


def test_checker_rejects_a_gap_inside_a_sentence():
    pos = np.array([0, 1, 5, 6, 9, 10])
    allowed = np.array([1, 0, 1, 0, 0, 0], bool)  # a sentence starts at token 2 only
    with pytest.raises(InvariantError, match="sample 0: a gap inside a kept sentence at token 4"):
        check_positions(pos, np.array([0, 6]), length=6, target_len=20, jumps_allowed=allowed)
    allowed[4] = True
    check_positions(pos, np.array([0, 6]), length=6, target_len=20, jumps_allowed=allowed)
