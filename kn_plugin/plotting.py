"""Plots: where the knowledge neurons of a fact are (layer x neuron heatmap of IG scores)."""

from __future__ import annotations

from pathlib import Path

import torch


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_locate(result, path: str | Path, title: str | None = None) -> Path:
    """Heatmap of the mean IG score per (layer, neuron) over the prompts, refined neurons circled."""
    plt = _pyplot()
    scores = torch.stack([a.scores for a in result.attributions]).mean(0)  # [n_layers, d_mlp]
    scale = scores.abs().max().item() or 1.0
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(13, 5), gridspec_kw={"width_ratios": [4, 1]})
    im = ax.imshow(scores.numpy(), aspect="auto", cmap="RdBu_r", vmin=-scale, vmax=scale,
                   interpolation="nearest", origin="lower")
    if result.neurons:
        ax.scatter([n.index for n in result.neurons], [n.layer for n in result.neurons], s=80,
                   facecolors="none", edgecolors="black", linewidths=1.5, label="knowledge neurons")
        ax.legend(loc="upper right")
    ax.set_xlabel("FFN neuron")
    ax.set_ylabel("layer")
    fig.colorbar(im, ax=ax, label="IG score (mean over prompts)")
    per_layer = scores.clamp(min=0).sum(1)
    ax2.barh(range(len(per_layer)), per_layer.numpy(), color="tab:red")
    ax2.set_ylim(-0.5, len(per_layer) - 0.5)
    ax2.set_xlabel("sum of positive scores")
    ax2.set_yticks([])
    fig.suptitle(title or f"{result.model}: {result.prompts[0]!r} -> {result.target!r}")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
