"""Figures: learning curves from metrics.jsonl, attention heatmaps (matplotlib, no display)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mt.errors import MtError
from mt.files import atomic_path
from mt.metrics import METRICS_FILE, read_metrics

# (kind, key, panel title) of the three curves; each panel has one line per run.
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


def run_curves(run_dir: Path) -> dict[tuple[str, str], tuple[list[int], list[float], list[float]]]:
    """{(kind, key): (steps, seconds since the first record, values)} of one run's metrics."""
    records = read_metrics(run_dir)
    if not records:
        raise MtError(f"{run_dir}: no {METRICS_FILE} records to plot (not a trained run?)")
    start = records[0]["time"]
    curves = {}
    for kind, key, _ in CURVES:
        rows = [r for r in records if r["kind"] == kind and key in r]
        curves[kind, key] = (
            [r["step"] for r in rows],
            [r["time"] - start for r in rows],
            [r[key] for r in rows],
        )
    return curves


def plot_curves(run_dirs: list[Path], output: Path, labels: list[str] | None = None) -> Path:
    """Train loss, dev loss and dev BLEU of runs against steps (top) and wall-clock (bottom)."""
    labels = labels or [Path(r).name for r in run_dirs]
    curves = [run_curves(Path(r)) for r in run_dirs]
    longest = max((max(c[1], default=0.0) for run in curves for c in run.values()), default=0.0)
    unit, per = ("hours", 3600.0) if longest > 7200 else ("minutes", 60.0)
    plt = _pyplot()
    fig, axes = plt.subplots(2, len(CURVES), figsize=FIGURE_INCHES, dpi=DPI, squeeze=False)
    for col, (kind, key, title) in enumerate(CURVES):
        for row, x_label in enumerate(("step", unit)):
            ax = axes[row][col]
            for label, run in zip(labels, curves, strict=True):
                steps, seconds, ys = run[kind, key]
                xs = steps if row == 0 else [t / per for t in seconds]
                ax.plot(xs, ys, marker="o" if kind == "valid" else None, markersize=3, label=label)
            ax.set_title(title, fontsize=10)
            ax.set_xlabel(x_label)
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, output)


CELL_INCHES = 0.3  # heatmap cell size: the figure grows with the token counts
MARGIN_INCHES = (2.0, 2.6)  # room for the piece labels, the title and the colour bar


def heatmap_inches(sources: int, targets: int, panels: int) -> tuple[float, float]:
    """Figure size (width, height) for `panels` heatmaps of targets x sources cells."""
    return (
        MARGIN_INCHES[0] * panels + CELL_INCHES * sources * panels,
        MARGIN_INCHES[1] + CELL_INCHES * targets,
    )


def plot_attention(
    weights: Any, source: list[str], target: list[str], titles: list[str], output: Path
) -> Path:
    """Heatmaps of attention weights (panels, T, S): target pieces down, source pieces across."""
    panels, rows, cols = weights.shape
    if (rows, cols) != (len(target), len(source)):
        raise ValueError(f"weights of {rows} x {cols} for {len(target)} x {len(source)} labels")
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
