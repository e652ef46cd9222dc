"""PNG plots: GB/s per contender against the width, the copy's bandwidth as a dashed line.

One figure per op and dtype, one panel per direction. Row ops put the normalized width on a
log₂ axis (one line per contender and row count); channel ops put the shapes, in order of size,
on a categorical axis. Needs matplotlib (the `bench` extra); without it, `plot` returns `[]`.
"""

from pathlib import Path

from ._contenders import CONTENDERS
from ._ops import OPS

# One colour per contender in every figure; the copy is the dashed black roofline.
COLOURS = dict(zip(CONTENDERS, [f"C{i}" for i in range(len(CONTENDERS))], strict=False))
STYLE = {"copy": dict(color="black", linestyle="--", linewidth=1.2, marker="x", markersize=4)}


def plot(rows: list[dict], out: Path) -> list[Path]:
    """Write `<op>_<dtype>.png` under `out` for every op and dtype measured; return the paths."""
    try:
        import matplotlib
    except ImportError:
        return []
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # The training-step blocks have one shape each: no curve to draw.
    ok = [r for r in rows if r["status"] == "ok" and r["direction"] != "step"]
    paths = []
    for op, dtype in dict.fromkeys((r["op"], r["dtype"]) for r in ok):
        mine = [r for r in ok if r["op"] == op and r["dtype"] == dtype]
        directions = list(dict.fromkeys(r["direction"] for r in mine))
        fig, axes = plt.subplots(
            1, len(directions), figsize=(4.6 * len(directions), 3.6), squeeze=False
        )
        for ax, direction in zip(axes[0], directions, strict=True):
            _panel(ax, [r for r in mine if r["direction"] == direction], direction)
        handles, labels = axes[0][0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 6), fontsize=7)
        fig.suptitle(f"{op} ({dtype}), {mine[0]['device']}", fontsize=10)
        fig.tight_layout(rect=(0, 0.1, 1, 0.95))
        path = out / f"{op}_{dtype}.png"
        fig.savefig(path, dpi=72)
        plt.close(fig)
        paths.append(path)
    return paths


def _panel(ax, rows: list[dict], direction: str) -> None:
    row_op = OPS[rows[0]["op"]].family == "row"
    if row_op:

        def x_of(r):
            return r["width"]

        ax.set_xscale("log", base=2)
        ax.set_xlabel("width (normalized features)", fontsize=8)
    else:
        shapes = sorted(dict.fromkeys(r["shape"] for r in rows), key=lambda s: (_size(s), s))

        def x_of(r):
            return shapes.index(r["shape"])

        ax.set_xticks(range(len(shapes)), shapes, rotation=30, fontsize=6, ha="right")
        ax.set_xlabel("shape (batch x channels x spatial)", fontsize=8)
    # One line per contender, split by row count only where a width recurs with other rows.
    widths_rows = {(r["width"], r["rows"]) for r in rows}
    several_rows = row_op and len(widths_rows) > len({w for w, _ in widths_rows})
    series: dict[tuple[str, int], list[tuple[float, float]]] = {}
    for r in rows:
        lines_by = (r["impl"], r["rows"] if several_rows else 0)
        series.setdefault(lines_by, []).append((x_of(r), r["gbps"]))
    for (impl, count), points in series.items():
        points.sort()
        label = f"{impl} ({count} rows)" if several_rows else impl
        style = STYLE.get(impl, dict(color=COLOURS[impl], marker="o", markersize=3, linewidth=1))
        ax.plot(*zip(*points, strict=True), label=label, **style)
    ax.set_title(direction, fontsize=9)
    ax.set_ylabel("GB/s", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)


def _size(shape: str) -> int:
    size = 1
    for s in shape.split("x"):
        size *= int(s)
    return size
