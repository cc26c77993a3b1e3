"""The `coverage` table of a build: how much of the target window the samples reach."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from longrecipe.document_stream import list_column

COVERAGE_SCHEMA = pa.schema(
    [
        ("kind", pa.string()),
        ("bin_start", pa.int64()),
        ("bin_end", pa.int64()),
        ("count", pa.int64()),
        ("samples", pa.int64()),
    ]
)
COVERAGE_BINS = 20
# Pair distances cost an FFT of ~2*target_len per sample (16 ms at 80k, longer than
# building the sample): they are counted on this many evenly spaced samples per part.
DISTANCE_SAMPLES_PER_PART = 16


class Coverage:
    """How much of the target window the samples reach: histograms of max positions, of
    gaps (positions skipped between neighbouring tokens) and of the relative distances
    between token pairs (exact pair counts per distance by FFT autocorrelation, on up to
    DISTANCE_SAMPLES_PER_PART evenly spaced samples of each part)."""

    def __init__(self, target_len: int):
        self.T = target_len
        self.edges = np.unique(
            np.linspace(0, target_len, COVERAGE_BINS + 1).round().astype(np.int64)
        )
        self.gap_edges = np.concatenate(
            [[0], 2 ** np.arange(int(np.ceil(np.log2(max(target_len, 2)))) + 1)]
        )
        self.max_positions: list[np.ndarray] = []
        self.gaps = np.zeros(len(self.gap_edges) - 1, np.int64)
        self.gap_samples = np.zeros(len(self.gap_edges) - 1, np.int64)
        self.pairs = np.zeros(target_len, np.int64)
        self.pair_samples = np.zeros(len(self.edges) - 1, np.int64)
        self.n_tokens = 0
        self.distance_samples = 0

    def add(self, table: pa.Table, chunk: int = 16) -> None:
        """Count one part of `samples` (a few samples at a time, to bound memory)."""
        self.max_positions.append(table.column("max_position").to_numpy().astype(np.int64))
        n = table.num_rows
        picked = np.unique(np.linspace(0, n - 1, min(n, DISTANCE_SAMPLES_PER_PART)).round())
        for c in range(0, n, chunk):
            rows = table.slice(c, chunk)
            pos, off = list_column(rows, "position_ids")
            self._gaps(pos.astype(np.int64), off)
            mine = picked[(picked >= c) & (picked < c + chunk)].astype(np.int64) - c
            self._distances(pos, off, mine)

    def _gaps(self, pos: np.ndarray, off: np.ndarray) -> None:
        self.n_tokens += len(pos)
        step = np.diff(pos) - 1
        inside = np.ones(len(step), bool)
        inside[off[1:-1] - 1] = False
        sample = np.repeat(np.arange(len(off) - 1), np.diff(off))[1:][inside]
        gap = step[inside]
        gbin = np.searchsorted(self.gap_edges, gap, side="right") - 1
        self.gaps += np.bincount(gbin, minlength=len(self.gaps))
        hit = np.unique(sample * len(self.gaps) + gbin)
        self.gap_samples += np.bincount(hit % len(self.gaps), minlength=len(self.gaps))

    def _distances(
        self, pos: np.ndarray, off: np.ndarray, picked: np.ndarray, chunk: int = 8
    ) -> None:
        """Pair counts per distance: the autocorrelation of each sample's position set."""
        nfft = _fft_len(2 * self.T - 1)
        self.distance_samples += len(picked)
        for c in range(0, len(picked), chunk):
            rows = picked[c : c + chunk]
            x = np.zeros((len(rows), self.T))
            for r, i in enumerate(rows):
                x[r, pos[off[i] : off[i + 1]]] = 1.0
            f = np.fft.rfft(x, nfft)
            counts = np.rint(np.fft.irfft(f * f.conj(), nfft)[:, : self.T]).astype(np.int64)
            counts[:, 0] = 0  # a token with itself
            self.pairs += counts.sum(0)
            per_bin = np.add.reduceat(counts, self.edges[:-1], axis=1)
            self.pair_samples += (per_bin > 0).sum(0)

    def table(self) -> pa.Table:
        """Rows (kind, bin_start, bin_end, count, samples) for the `coverage` table."""
        maxp = np.concatenate(self.max_positions) if self.max_positions else np.zeros(0, np.int64)
        mcount = np.histogram(maxp, self.edges)[0]
        dcount = np.add.reduceat(self.pairs, self.edges[:-1])
        k = len(self.gaps)
        kinds = ["max_position"] * len(mcount) + ["gap"] * k + ["distance"] * len(dcount)
        return pa.Table.from_arrays(
            [
                pa.array(kinds, pa.string()),
                pa.array(np.concatenate([self.edges[:-1], self.gap_edges[:-1], self.edges[:-1]])),
                pa.array(np.concatenate([self.edges[1:], self.gap_edges[1:], self.edges[1:]])),
                pa.array(np.concatenate([mcount, self.gaps, dcount]).astype(np.int64)),
                pa.array(
                    np.concatenate([mcount, self.gap_samples, self.pair_samples]).astype(np.int64)
                ),
            ],
            schema=COVERAGE_SCHEMA,
        )

    def summary(self) -> dict:
        maxp = np.concatenate(self.max_positions)
        covered = int((self.pairs[1:] > 0).sum())
        return {
            "samples": int(len(maxp)),
            "max_position": {
                "min": int(maxp.min()),
                "mean": round(float(maxp.mean()), 2),
                "max": int(maxp.max()),
            },
            "reach": round(float((maxp + 1).mean()) / self.T, 4),
            "distance_coverage": round(covered / max(self.T - 1, 1), 4),
            "distance_samples": self.distance_samples,
            "mean_gap": round(
                float((maxp + 1).sum() - self.n_tokens) / max(self.n_tokens - len(maxp), 1), 4
            ),
        }



def _fft_len(n: int) -> int:
    """The smallest 2^a * 3^b * 5^c >= n (the sizes pocketfft transforms fastest)."""
    best = 1 << max(n - 1, 0).bit_length()
    p5 = 1
    while p5 < best:
        p35 = p5
        while p35 < best:
            size = p35
            while size < n:
                size *= 2
            best = min(best, size)
            p35 *= 3
        p5 *= 5
    return best
