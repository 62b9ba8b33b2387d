"""The report's figures (matplotlib, written as PNG)."""

from __future__ import annotations

import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never a window
import matplotlib.pyplot as plt

from pipeline.core.atomic import atomic_path


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def training_curves(curves: dict[str, Path], path: Path) -> None:
    """Training loss and L0 against tokens seen, one line per config."""
    fig, (loss_ax, l0_ax) = plt.subplots(1, 2, figsize=(10, 4))
    for label, tsv in curves.items():
        rows = list(csv.DictReader(tsv.open(), delimiter="\t"))
        tokens = [int(r["tokens"]) for r in rows]
        loss_ax.plot(tokens, [float(r["loss"]) for r in rows], label=label)
        l0_ax.plot(tokens, [float(r["l0"]) for r in rows], label=label)
    loss_ax.set(xlabel="tokens seen", ylabel="training loss (each config's own objective)", yscale="log")
    l0_ax.set(xlabel="tokens seen", ylabel="L0 (training batch)")
    loss_ax.legend()
    _save(fig, path)


def sparsity_fidelity(points: dict[str, tuple[float, float]], path: Path) -> None:
    """Held-out L0 against explained variance, one point per config."""
    fig, ax = plt.subplots(figsize=(5, 4))
    for label, (l0, explained) in points.items():
        ax.scatter(l0, explained)
        ax.annotate(label, (l0, explained), textcoords="offset points", xytext=(5, 5))
    ax.set(xlabel="L0 (mean active latents per token)", ylabel="explained variance", title="held-out split")
    _save(fig, path)


def feature_density(histograms: dict[str, dict], path: Path) -> None:
    """Histogram of log10 latent firing frequency per config; dead latents noted in the legend."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, hist in histograms.items():
        edges = hist["log10_frequency_bin_edges"]
        ax.stairs(hist["counts"], edges, label=f"{label} ({hist['dead']} dead)")
    ax.set(xlabel="log10 firing frequency on the held-out split", ylabel="latents")
    ax.legend()
    _save(fig, path)


def stability(shares: list[list[float | None]], labels: list[str], threshold: float, path: Path) -> None:
    """Heatmap: the share of row config's latents matched one-to-one in the column config at cos >= threshold."""
    fig, ax = plt.subplots(figsize=(1.2 * len(labels) + 2.5, 1.0 * len(labels) + 1.5))
    values = [[float("nan") if v is None else v for v in row] for row in shares]
    image = ax.imshow(values, vmin=0, vmax=1, cmap="viridis")
    for i, row in enumerate(values):
        for j, value in enumerate(row):
            if value == value:  # not NaN
                ax.text(j, i, f"{value:.2f}", ha="center", va="center", color="white" if value < 0.5 else "black")
    ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set(title=f"latents of the row SAE matched one-to-one\nin the column SAE at cosine >= {threshold}")
    fig.colorbar(image, ax=ax)
    _save(fig, path)
