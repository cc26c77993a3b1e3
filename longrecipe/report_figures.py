"""The report's figures and pages. Figures as PNG bytes (matplotlib's Agg backend: no
display needed): a score or perplexity by context length, one line per model, and every
model's NIAH heatmap side by side on one colour scale; no software or date metadata, so
the same numbers give the same bytes. Pages: the Markdown as one self-contained HTML
file, and as Markdown with its figures embedded (data URIs) and no local links."""

from __future__ import annotations

import base64
import io
import re
from pathlib import Path

from longrecipe.evaluate.heatmap import grid


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, metadata={"Software": None})
    return buf.getvalue()


def lines_png(series: dict[str, list[tuple[int, float]]], ylabel: str, *,
              ylim: tuple[float, float] | None = None) -> bytes | None:
    """One line per model: (context length, value) points."""
    if not series:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 3.8), layout="constrained")
    try:
        lengths = sorted({n for pts in series.values() for n, _ in pts})
        for name, pts in series.items():
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
        ax.set_xticks(lengths, [f"{n:,}" for n in lengths])
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel(ylabel)
        if ylim:
            ax.set_ylim(ylim[0] - 0.03 * (ylim[1] - ylim[0]), ylim[1] * 1.03)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        return _png(fig)
    finally:
        plt.close(fig)


def heatmaps_png(by_model: dict[str, list[tuple[float, int, float]]]) -> bytes | None:
    """Every model's NIAH heatmap (depth rows by length columns) in one row of panels."""
    if not by_model:
        return None
    from matplotlib.colors import LinearSegmentedColormap

    plt = _plt()
    grids = {name: grid(rows) for name, rows in by_model.items()}
    n_depths = max(len(g[0]) for g in grids.values())
    n_lengths = max(len(g[1]) for g in grids.values())
    cols = len(grids)
    fig, axes = plt.subplots(1, cols, squeeze=False, sharey=True, layout="constrained",
                             figsize=(1.6 + cols * max(0.6 * n_lengths + 0.4, 2.0), 1.8 + 0.3 * n_depths))
    cmap = LinearSegmentedColormap.from_list("miss_to_hit", ["#d7301f", "#fee08b", "#1a9850"])
    try:
        im = None
        for ax, (name, (depths, lengths, means)) in zip(axes[0], grids.items(), strict=True):
            im = ax.imshow(means, cmap=cmap, vmin=0, vmax=100, aspect="auto")
            ax.set_xticks(range(len(lengths)), [f"{n:,}" for n in lengths], rotation=45, fontsize=7)
            ax.set_yticks(range(len(depths)), [f"{d:.0f}%" for d in depths], fontsize=7)
            flat = [v for line in means for v in line if v == v]
            label = name.replace(" + ", "\n+ ", 1)  # "X + anneal + merge" on two lines
            ax.set_title(f"{label}\nmean {sum(flat) / max(len(flat), 1):.0f}%", fontsize=8)
            for r, line in enumerate(means):
                for c, v in enumerate(line):
                    if v == v:  # not NaN
                        ax.text(c, r, f"{v:.0f}", ha="center", va="center", fontsize=6)
        axes[0][0].set_ylabel("needle depth")
        fig.supxlabel("context length (tokens)", fontsize=8)
        fig.colorbar(im, ax=list(axes[0]), label="% found", fraction=0.05, pad=0.02)
        return _png(fig)
    finally:
        plt.close(fig)


# --------------------------------------------------------------------------- HTML, embedding

_IMAGE = re.compile(r"!\[([^\]]*)\]\(([^)\s]+)\)")
_LINK = re.compile(r"(?<!!)\[([^\]]*)\]\(([^)\s]+)\)")
LINKS_NOTE = " (links relative to this page)"
"""What the report says of its store links; gone with the links where they are dropped."""
_LOCAL_LINKS = re.compile(r" \((?:, )?(?:\[[^\]]*\]\((?![a-z]+://)[^)\s]+\)(?:, )?)+\)")
"""A parenthesised list of links to local files: dropped whole where they cannot open."""


def embedded_markdown(md: str, folder: Path) -> str:
    """The report's Markdown with every figure as a data URI and links to local files
    reduced to their text: what a page that cannot read the store shows whole."""

    def image(m: re.Match) -> str:
        return f"![{m.group(1)}]({_data_uri(folder / m.group(2))})"

    def link(m: re.Match) -> str:
        return m.group(0) if re.match(r"^[a-z]+://", m.group(2)) else m.group(1)

    return _LINK.sub(link, _LOCAL_LINKS.sub("", _IMAGE.sub(image, md))).replace(LINKS_NOTE, "")


def to_html(md: str, folder: Path, title: str) -> str:
    """One HTML page: the Markdown rendered, figures embedded as data URIs, relative links
    kept (they resolve inside a copied store)."""
    import html

    from markdown_it import MarkdownIt

    body = MarkdownIt("commonmark", {"html": False}).enable("table").render(
        _IMAGE.sub(lambda m: f"![{m.group(1)}]({_data_uri(folder / m.group(2))})", md))
    return (
        "<!doctype html>\n<html lang=en><meta charset=utf-8>\n"
        f"<title>{html.escape(title)}</title>\n<style>{_CSS}</style>\n<body>\n{body}</body></html>\n"
    )


def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


_CSS = (
    "body{font-family:system-ui,sans-serif;max-width:72rem;margin:2rem auto;padding:0 1rem;"
    "line-height:1.45;color:#222}table{border-collapse:collapse;margin:.5rem 0}"
    "th,td{border:1px solid #ccc;padding:.25rem .6rem;text-align:right}"
    "th:first-child,td:first-child{text-align:left}img{max-width:100%}"
    "code{background:#f3f3f3;padding:0 .2rem}"
)
