"""Figures: learning curves from metrics.jsonl, attention heatmaps (matplotlib, no display)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mt.errors import MtError
from mt.files import atomic_path
from mt.metrics import METRICS_FILE, read_metrics, record_directions

# (kind, key, panel title) of the three panels; each has one line per run, and the dev panels of
# a multilingual run one more per direction (its `de-en/loss`, `de-en/bleu`; `key` is the mean).
CURVES = (
    ("train", "loss", "train loss (label-smoothed, per token)"),
    ("valid", "loss", "dev loss (label-smoothed, per token)"),
    ("valid", "bleu", "dev BLEU"),
)
FIGURE_INCHES = (15.0, 8.0)  # two rows (against steps, against wall-clock) of three panels
DPI = 100


def _pyplot() -> Any:
    """matplotlib's pyplot on the non-interactive Agg backend (works without a display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


Curve = tuple[list[int], list[float], list[float]]  # steps, seconds since the start, values


def run_curves(run_dir: Path) -> dict[tuple[str, str], dict[str, Curve]]:
    """One run's curves, {(kind, key): {line name: curve}}.

    The name "" is the curve of `key` itself; a direction (e.g. "de-en") names the curve of
    `de-en/key` in a multilingual run's dev records.
    """
    timed = (int, float)  # a record without a time (written by hand?) has no place on a clock
    records = [r for r in read_metrics(run_dir) if isinstance(r.get("time"), timed)]
    if not records:
        raise MtError(f"{run_dir}: no {METRICS_FILE} records to plot (not a trained run?)")
    clock = training_clock(records)
    directions = next((record_directions(r) for r in records if r["kind"] == "valid"), [])
    curves: dict[tuple[str, str], dict[str, Curve]] = {}
    for kind, key, _ in CURVES:
        names = ["", *directions] if kind == "valid" else [""]
        curves[kind, key] = {}
        for name in names:
            field = f"{name}/{key}" if name else key
            rows = [(r, t) for r, t in zip(records, clock, strict=True) if r["kind"] == kind]
            rows = [(r, t) for r, t in rows if field in r]
            curves[kind, key][name] = (
                [r["step"] for r, _ in rows],
                [t for _, t in rows],
                [r[field] for r, _ in rows],
            )
    return curves


def training_clock(records: list[dict[str, Any]]) -> list[float]:
    """Seconds of training at each record: time between a stop and its resume left out.

    Every process of a run (the first and each resume) starts with a `precision` record.
    """
    clock, base, start = [], 0.0, records[0]["time"]
    for i, record in enumerate(records):
        if i and record["kind"] == "precision":  # a resumed process: go on from the last record
            base, start = clock[-1], record["time"]
        clock.append(base + record["time"] - start)
    return clock


def run_labels(run_dirs: list[Path]) -> list[str]:
    """Legend names: each run directory's name, or the paths as given where names repeat."""
    names = [Path(r).resolve().name for r in run_dirs]
    return names if len(set(names)) == len(names) else [str(r) for r in run_dirs]


def plot_curves(run_dirs: list[Path], output: Path, labels: list[str] | None = None) -> Path:
    """Train loss, dev loss and dev BLEU of runs against steps (top) and wall-clock (bottom)."""
    labels = labels or run_labels(run_dirs)
    curves = [run_curves(Path(r)) for r in run_dirs]
    seconds = [c[1] for run in curves for lines in run.values() for c in lines.values()]
    longest = max((max(s, default=0.0) for s in seconds), default=0.0)
    unit, per = ("hours", 3600.0) if longest > 7200 else ("minutes", 60.0)
    plt = _pyplot()
    fig, axes = plt.subplots(2, len(CURVES), figsize=FIGURE_INCHES, dpi=DPI, squeeze=False)
    for col, (kind, key, title) in enumerate(CURVES):
        for row, x_label in enumerate(("step", unit)):
            ax = axes[row][col]
            for label, run in zip(labels, curves, strict=True):
                for name, (steps, times, ys) in run[kind, key].items():
                    xs = steps if row == 0 else [t / per for t in times]
                    # Markers on dev points, and on a lone training point (a line needs two).
                    marked = kind == "valid" or len(xs) == 1
                    style = {"marker": "o", "markersize": 3} if marked else {}
                    if name:  # a direction: thinner than the mean, which stays the run's line
                        style.update(linewidth=0.8, linestyle="--", markersize=2)
                    ax.plot(xs, ys, label=f"{label} {name}".strip(), **style)
            ax.set_title(title, fontsize=10)
            ax.set_xlabel(x_label)
            ax.grid(alpha=0.3)
    per_direction = any(len(lines) > 1 for run in curves for lines in run.values())
    for ax in axes[0] if per_direction else axes[0][:1]:  # the dev panels name directions
        ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, output)


CELL_INCHES = 0.3  # heatmap cell size: the figure grows with the token counts
MARGIN_INCHES = (2.0, 2.6)  # room for the piece labels, the title and the colour bar
PANEL_MIN_INCHES = 4.5  # a panel's title fits even above a short sentence


MAX_PIXELS = 2**16 - 1  # matplotlib's Agg renderer draws no larger image, either way


def heatmap_inches(sources: int, targets: int, panels: int) -> tuple[float, float]:
    """Figure size (width, height) for `panels` heatmaps of targets x sources cells."""
    panel = max(MARGIN_INCHES[0] + CELL_INCHES * sources, PANEL_MIN_INCHES)
    return panel * panels, MARGIN_INCHES[1] + CELL_INCHES * targets


def check_heatmap_size(sources: int, targets: int, panels: int) -> None:
    """MtError if `panels` heatmaps of targets x sources cells are too large to draw."""
    width, height = (round(inches * DPI) for inches in heatmap_inches(sources, targets, panels))
    if max(width, height) > MAX_PIXELS:
        fewer = " (one layer's with --layer is smaller)" if panels > 1 else ""
        raise MtError(
            f"{panels} heatmap{'s' if panels > 1 else ''} of {targets} x {sources} pieces would "
            f"be {width:,} x {height:,} pixels, over the {MAX_PIXELS:,} a side a PNG can be "
            f"drawn at{fewer}"
        )


def plot_attention(
    weights: Any, source: list[str], target: list[str], titles: list[str], output: Path
) -> Path:
    """Heatmaps of attention weights (panels, T, S): target pieces down, source pieces across."""
    panels, rows, cols = weights.shape
    if (rows, cols) != (len(target), len(source)):
        raise ValueError(f"weights of {rows} x {cols} for {len(target)} x {len(source)} labels")
    check_heatmap_size(cols, rows, panels)
    plt = _pyplot()
    fig, axes = plt.subplots(
        1,
        panels,
        figsize=heatmap_inches(cols, rows, panels),
        dpi=DPI,
        squeeze=False,
        layout="constrained",
    )
    for ax, panel, title in zip(axes[0], weights, titles, strict=True):
        image = ax.imshow(panel, cmap="viridis", vmin=0.0, vmax=1.0, aspect="equal")
        ax.set_xticks(range(cols), source, rotation=90, fontsize=8)
        ax.set_yticks(range(rows), target, fontsize=8)
        ax.set_title(title, fontsize=10)
    fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8, label="attention weight")
    return save_figure(fig, output)


def save_figure(fig: Any, output: Path) -> Path:
    """Write a figure as PNG, atomically (the parent directory must exist); closes it."""
    plt = _pyplot()
    output = Path(output)
    if not output.parent.is_dir():
        raise MtError(f"{output}: directory {output.parent} does not exist")
    try:
        with atomic_path(output) as temp:
            fig.savefig(temp, format="png")
    finally:
        plt.close(fig)
    return output
