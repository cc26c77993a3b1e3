"""The NIAH heatmap: needle depth (rows) by context length (columns), red (missed)
to green (found), each cell the mean score of its needles."""

from __future__ import annotations

import io
from collections import defaultdict
from collections.abc import Iterable


def grid(rows: Iterable[tuple[float, int, float]]) -> tuple[list[float], list[int], list[list[float]]]:
    """(depths, lengths, mean score per [depth][length]) from (depth, length, score) rows;
    a cell with no row is NaN."""
    cells: dict[tuple[float, int], list[float]] = defaultdict(list)
    for depth, length, score in rows:
        cells[(float(depth), int(length))].append(float(score))
    depths = sorted({d for d, _ in cells})
    lengths = sorted({n for _, n in cells})
    means = [
        [sum(v) / len(v) if (v := cells.get((d, n))) else float("nan") for n in lengths]
        for d in depths
    ]
    return depths, lengths, means


def heatmap_png(rows: Iterable[tuple[float, int, float]], title: str) -> bytes:
    """PNG bytes of the heatmap (matplotlib's Agg backend: no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LinearSegmentedColormap

    depths, lengths, means = grid(rows)
    if not depths:
        raise ValueError("heatmap: no NIAH rows to plot")
    cmap = LinearSegmentedColormap.from_list("miss_to_hit", ["#d7301f", "#fee08b", "#1a9850"])
    fig, ax = plt.subplots(figsize=(1.0 + 0.7 * len(lengths), 1.0 + 0.42 * len(depths)))
    try:
        im = ax.imshow(means, cmap=cmap, vmin=0, vmax=100, aspect="auto")
        ax.set_xticks(range(len(lengths)), [str(n) for n in lengths], rotation=45)
        ax.set_yticks(range(len(depths)), [f"{d:.0f}%" for d in depths])
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("needle depth")
        for r, line in enumerate(means):
            for c, v in enumerate(line):
                if v == v:  # not NaN
                    ax.text(c, r, f"{v:.0f}", ha="center", va="center", fontsize=7)
        ax.set_title(title, fontsize=9)
        fig.colorbar(im, ax=ax, label="score")
        fig.tight_layout()
        buf = io.BytesIO()
        # No software/date metadata: the same scores give the same bytes.
        fig.savefig(buf, format="png", dpi=110, metadata={"Software": None})
        return buf.getvalue()
    finally:
        plt.close(fig)
