"""Training curves: ``logs/curves.png`` from ``logs/training_metrics.json`` (also ``kdcache plot RUN_DIR``)."""

from __future__ import annotations

import json
from pathlib import Path

from .errors import KdcacheError


def plot_run(run_dir: str | Path, log_dir: str | Path | None = None) -> Path:
    """Draw training losses (total, KD, CE), validation losses and the learning rate against the
    step; returns the PNG's path."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    logs = Path(log_dir) if log_dir else Path(run_dir) / "logs"
    metrics = logs / "training_metrics.json"
    if not metrics.is_file():
        raise KdcacheError(f"no {metrics}: is {run_dir} a train-student run folder?")
    history = json.loads(metrics.read_text())
    train = [h for h in history if "loss" in h]
    val = [h for h in history if "val_loss" in h]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for key, label in (("loss", "total"), ("kd_loss", "KD (T²·KL)"), ("ce_loss", "CE")):
        axes[0].plot([h["step"] for h in train], [h[key] for h in train], label=label)
    axes[0].set_title("training loss")
    for key, label in (("val_loss", "total"), ("val_kd_loss", "KD (T²·KL)"), ("val_ce_loss", "CE")):
        axes[1].plot([h["step"] for h in val], [h[key] for h in val], marker="o", label=label)
    axes[1].set_title("validation loss" if val else "validation loss (no --val-cache)")
    axes[2].plot([h["step"] for h in train], [h["lr"] for h in train])
    axes[2].set_title("learning rate")
    for ax in axes:
        ax.set_xlabel("optimizer step")
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    fig.tight_layout()
    out = logs / "curves.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
