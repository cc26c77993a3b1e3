"""Position-id schemes, one function per scheme, plus the invariant checker.

Pure numpy, no Python loop over tokens. Every scheme returns int64 positions
for one sample: they start at 0, increase strictly and stay below the target
window. Randomness comes only from the `rng` passed in, drawn in a fixed
order, so a sample is a function of its generator alone. The schemes made of
runs and gaps (pose, longrecipe) also come in gap form (boundaries, gaps),
which `batch_positions_with_gaps` turns into a whole part's positions in one
pass; the build stage uses that form.
"""

from __future__ import annotations

import numpy as np


class InvariantError(RuntimeError):
    """A built sample breaks a position invariant: a bug, never bad input."""


# --------------------------------------------------------------------------- schemes


def full_positions(n: int) -> np.ndarray:
    """FLT: contiguous positions 0..n-1."""
    return np.arange(n, dtype=np.int64)


def randomized_positions(rng: np.random.Generator, n: int, target_len: int) -> np.ndarray:
    """RPES: position 0, then a sorted sample of n-1 distinct values from [1, target_len)."""
    rest = np.sort(rng.choice(target_len - 1, size=n - 1, replace=False)) + 1
    return np.concatenate([[0], rest]).astype(np.int64)


def pose_gaps(
    rng: np.random.Generator, n: int, target_len: int
) -> tuple[np.ndarray, np.ndarray, int]:
    """PoSE with two chunks, in gap form (boundaries, gaps, head): the first `head` tokens
    keep 0..head-1, the rest are shifted by a skip uniform in [0, target_len - n], so the
    last position is uniform in [n - 1, target_len - 1]. head is uniform in
    [1, (n+1)//2] as in PoSE's code."""
    head = int(rng.integers(1, (n + 1) // 2, endpoint=True))
    skip = int(rng.integers(0, target_len - n, endpoint=True))
    return np.array([head]), np.array([skip]), head


def pose_positions(rng: np.random.Generator, n: int, target_len: int) -> tuple[np.ndarray, int]:
    """PoSE positions of one sample: (positions, head)."""
    boundaries, gaps, head = pose_gaps(rng, n, target_len)
    return positions_with_gaps(n, boundaries, gaps), head


def draw_head(rng: np.random.Generator, rule: str, n: int, head_len: int) -> int:
    """rt of LongRecipe: the first rt tokens keep positions 0..rt-1.

    `random`: uniform in [1, (n+1)//2] (the public code), `fixed`: head_len, `none`: 1
    (position 0 alone, i.e. no head)."""
    if rule == "random":
        return int(rng.integers(1, (n + 1) // 2, endpoint=True))
    if rule == "fixed":
        return min(head_len, n)
    return 1


def random_gaps(rng: np.random.Generator, m: int, total: int) -> np.ndarray:
    """A uniformly random composition of `total` into m non-negative gaps (stars and bars:
    the m-1 bars sit at distinct sorted random slots among total+m-1). The public code
    does the same with one extra trailing gap that it throws away; we spend all of
    `total`, so the last position of a sample is target_len - 1."""
    if m == 0:
        return np.zeros(0, dtype=np.int64)
    bars = np.sort(rng.choice(total + m - 1, size=m - 1, replace=False))
    edges = np.concatenate([[-1], bars, [total + m - 1]])
    return np.diff(edges).astype(np.int64) - 1


def source_gaps(distances: np.ndarray, total: int) -> np.ndarray:
    """Gaps equal to the true source distances (tokens skipped between kept sentences), or,
    when they add up to more than `total`, scaled by total/sum so the sample fits the
    target window; cumulative rounding down keeps the order and spends exactly `total`."""
    d = np.asarray(distances, dtype=np.int64)
    whole = int(d.sum())
    if whole <= total:
        return d
    scaled = np.cumsum(d) * total // whole
    return np.diff(scaled, prepend=0)


def positions_with_gaps(n: int, boundaries: np.ndarray, gaps: np.ndarray) -> np.ndarray:
    """Contiguous positions, plus gaps[j] added from token boundaries[j] on (boundaries
    distinct and above 0)."""
    step = np.ones(n, dtype=np.int64)
    step[0] = 0
    step[boundaries] += gaps
    return np.cumsum(step)


def longrecipe_gaps(
    rng: np.random.Generator | None,
    n: int,
    target_len: int,
    sentence_starts: np.ndarray,
    *,
    head_rule: str = "random",
    head_len: int = 1,
    distances: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, int]:
    """LongRecipe in gap form for n kept tokens: (boundaries, gaps, rt).

    sentence_starts: offsets in the sample where a kept sentence begins (sorted, distinct).
    The first rt tokens keep 0..rt-1; after them, gaps go only at sentence starts, so
    every sentence stays contiguous. distances=None spreads target_len - n positions as
    random gaps (`random` rule); otherwise distances[j] is the true source distance before
    sentence_starts[j] (`source` rule).
    """
    rt = draw_head(rng, head_rule, n, head_len)
    starts = np.asarray(sentence_starts, dtype=np.int64)
    eligible = (starts >= rt) & (starts > 0)
    boundaries = starts[eligible]
    total = target_len - n
    if distances is None:
        gaps = random_gaps(rng, len(boundaries), total)
    else:
        gaps = source_gaps(np.asarray(distances)[eligible], total)
    return boundaries, gaps, rt


def longrecipe_positions(rng, n, target_len, sentence_starts, **kw) -> tuple[np.ndarray, int]:
    """LongRecipe positions of one sample: (positions, rt); arguments as longrecipe_gaps."""
    boundaries, gaps, rt = longrecipe_gaps(rng, n, target_len, sentence_starts, **kw)
    return positions_with_gaps(n, boundaries, gaps), rt


def batch_positions_with_gaps(
    n: int, boundaries: list[np.ndarray], gaps: list[np.ndarray]
) -> np.ndarray:
    """positions_with_gaps for len(boundaries) samples of n tokens at once, flat int32:
    one cumulative sum over the batch, each sample's first step pulling the running
    position back to 0."""
    count = len(boundaries)
    step = np.ones(count * n, dtype=np.int32)
    if count:
        at = np.concatenate([k * n + np.asarray(b, np.int64) for k, b in enumerate(boundaries)])
        step[at] += np.concatenate(gaps).astype(np.int32)
        last = n - 1 + np.array([int(np.sum(g)) for g in gaps], dtype=np.int64)
        step[0] = 0
        step[n::n] = -last[:-1]
    return np.cumsum(step, dtype=np.int32)


# --------------------------------------------------------------------------- invariants


def check_positions(
    positions: np.ndarray,
    offsets: np.ndarray,
    *,
    length: int,
    target_len: int,
    jumps_allowed: np.ndarray | None = None,
    first_id: int = 0,
) -> None:
    """Check a batch of samples stored flat (sample i is positions[offsets[i]:offsets[i+1]]).

    Every sample has `length` positions, starts at 0, increases strictly and stays below
    target_len. With jumps_allowed (a bool per token), a step other than +1 may only land
    on a token marked True (a kept sentence start): sentences stay contiguous.
    Raises InvariantError naming the first bad sample (first_id + its index).
    """
    pos = np.asarray(positions)
    off = np.asarray(offsets, dtype=np.int64)
    lens = np.diff(off)

    def fail(i: int, what: str) -> None:
        raise InvariantError(f"sample {first_id + int(i)}: {what}")

    def sample_of(token: int) -> int:
        return int(np.searchsorted(off, token, side="right") - 1)

    bad = np.flatnonzero(lens != length)
    if len(bad):
        fail(bad[0], f"{lens[bad[0]]} positions, expected {length}")
    if len(pos) == 0:
        return
    bad = np.flatnonzero(pos[off[:-1]] != 0)
    if len(bad):
        fail(bad[0], f"position_ids[0] is {pos[off[bad[0]]]}, not 0")
    # Reductions first, locating only on failure: this runs on every token built.
    if pos.max() >= target_len:
        t = int(np.flatnonzero(pos >= target_len)[0])
        fail(sample_of(t), f"position {pos[t]} is not below target_len {target_len}")
    step = np.diff(pos)
    step[off[1:-1] - 1] = 1  # the step from one sample's last token to the next's first
    if len(step) and step.min() <= 0:
        t = int(np.flatnonzero(step <= 0)[0]) + 1
        i = sample_of(t)
        fail(i, f"positions not strictly increasing at token {t - off[i]}")
    if jumps_allowed is not None:
        jump = np.flatnonzero(step != 1) + 1
        bad = jump[~np.asarray(jumps_allowed, dtype=bool)[jump]]
        if len(bad):
            i = sample_of(int(bad[0]))
            fail(i, f"a gap inside a kept sentence at token {bad[0] - off[i]}")
