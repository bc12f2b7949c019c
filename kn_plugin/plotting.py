"""Plots: knowledge-neuron heatmaps, layer distributions and benchmark bars."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from kn_plugin.validation import output_path, plot_suffixes


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_locate(result, path: str | Path, title: str | None = None) -> Path:
    """Heatmap of the mean IG score per (layer, neuron) over the prompts, refined neurons circled."""
    plt = _pyplot()
    scores = torch.stack([a.scores for a in result.attributions]).mean(0)  # [n_layers, d_mlp]
    # saturate at the 99.9th percentile so that single strong neurons stay visible
    scale = torch.quantile(scores.abs().flatten().float(), 0.999).item() or scores.abs().max().item() or 1.0
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(13, 5), gridspec_kw={"width_ratios": [4, 1]})
    im = ax.imshow(scores.numpy(), aspect="auto", cmap="RdBu_r", vmin=-scale, vmax=scale,
                   interpolation="nearest", origin="lower")
    if result.neurons:
        ax.scatter([n.index for n in result.neurons], [n.layer for n in result.neurons], s=80,
                   facecolors="none", edgecolors="black", linewidths=1.5, label="knowledge neurons")
        ax.legend(loc="lower right", bbox_to_anchor=(1.0, 1.0), fontsize=8, frameon=False)
    from matplotlib.ticker import MaxNLocator

    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("FFN neuron")
    ax.set_ylabel("layer")
    fig.colorbar(im, ax=ax, label="IG score (mean over prompts)")
    per_layer = scores.clamp(min=0).sum(1)
    ax2.barh(range(len(per_layer)), per_layer.numpy(), color="tab:red")
    ax2.set_ylim(-0.5, len(per_layer) - 0.5)
    ax2.set_xlabel("sum of positive scores")
    ax2.set_yticks([])
    fig.suptitle(title or f"{result.model}: {result.prompts[0]!r} -> {result.target!r}")
    return _save(fig, path)


def plot_layer_distribution(layer_counts: list[int], path: str | Path, title: str) -> Path:
    """Share of knowledge neurons per layer (the paper's layer-distribution figure)."""
    plt = _pyplot()
    total = sum(layer_counts) or 1
    fig, ax = plt.subplots(figsize=(8, 3.5))
    ax.bar(range(len(layer_counts)), [100 * c / total for c in layer_counts], color="tab:blue")
    ax.set_xlabel("layer")
    ax.set_ylabel("% of knowledge neurons")
    ax.set_title(title)
    return _save(fig, path)


def _grouped_bars(names: list[str], series: list[tuple[str, list[float], list | None, str]], ylabel: str,
                  title: str, path: str | Path) -> Path:
    """Bars grouped by ``names``, one bar per series ``(label, values, [lower, upper] errors or None,
    color)``, with a zero line."""
    plt = _pyplot()

    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(names) + 2), 4))
    width = 0.8 / len(series)
    for k, (label, values, err, color) in enumerate(series):
        ax.bar(x + (k - (len(series) - 1) / 2) * width, values, width, label=label, color=color,
               yerr=None if err is None else np.nan_to_num(np.array(err)), capsize=2, edgecolor="grey",
               linewidth=0.5)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(x, names)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=7)
    return _save(fig, path)


def plot_relation_bars(rows: dict[str, dict], path: str | Path, title: str) -> Path:
    """Per-relation relative change of P(correct) when suppressing/amplifying, with controls."""
    rels = list(rows)
    series = [(key.replace("_", " "), [100 * rows[r][key] for r in rels], None, color)
              for key, color in (("suppress", "tab:blue"), ("amplify", "tab:red"),
                                 ("random_suppress", "lightsteelblue"), ("random_amplify", "mistyrose"))]
    return _grouped_bars(rels, series, "relative change of P(correct), %", title, path)


def plot_interval_groups(tables: dict[str, dict], groups: dict[str, str], path: str | Path, title: str,
                         ylabel: str) -> Path:
    """One bar per group for each table row, with its interval: ``tables[name][group]`` holds
    ``mean``, ``lo`` and ``hi`` (e.g. T1/T2/T3 activations with bootstrap intervals)."""
    names = list(tables)
    colors = ("tab:red", "tab:orange", "tab:grey", "tab:blue", "tab:green")
    series = []
    for (group, label), color in zip(groups.items(), colors):
        cells = [tables[n][group] for n in names]
        series.append((label, [c["mean"] for c in cells],
                       [[c["mean"] - c["lo"] for c in cells], [c["hi"] - c["mean"] for c in cells]], color))
    return _grouped_bars(names, series, ylabel, title, path)


def plot_histogram(values: list[int], path: str | Path, title: str, xlabel: str) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    top = max(values) if values else 1
    ax.hist(values, bins=range(0, top + 2), color="tab:green", edgecolor="white", align="left")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("facts")
    ax.set_title(title)
    return _save(fig, path)


def plot_effect_vs_cost(rows: dict[str, dict], path: str | Path, title: str) -> Path:
    """One point per attribution method: seconds per prompt (log scale) against the change of
    P(correct) when its neurons are suppressed and amplified, with the unrelated-fact control."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    series = (("suppress", "tab:blue", "o"), ("amplify", "tab:red", "^"),
              ("unrelated_suppress", "grey", "x"))
    for key, color, marker in series:
        pts = [(v["seconds_per_prompt"], 100 * v[key]) for v in rows.values() if v.get(key) is not None]
        if pts:
            ax.scatter(*zip(*pts), color=color, marker=marker, label=key.replace("_", " "), zorder=3)
    for name, v in rows.items():
        if v.get("suppress") is not None:
            ax.annotate(name, (v["seconds_per_prompt"], 100 * v["suppress"]), textcoords="offset points",
                        xytext=(5, 5 + 9 * (list(rows).index(name) % 3)), fontsize=8)
    ax.set_xscale("log")
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xlabel("seconds per prompt (log scale)")
    ax.set_ylabel("relative change of P(correct), %")
    ax.set_title(title)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_activation_histogram(values: list[float], path: str | Path, title: str) -> Path:
    """Histogram of one neuron's activations over every token of a corpus (log counts)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.hist(values, bins=60, color="tab:purple", edgecolor="white", log=True)
    ax.set_xlabel("activation")
    ax.set_ylabel("tokens (log scale)")
    ax.set_title(title)
    return _save(fig, path)


def _save(fig, path: str | Path) -> Path:
    plt = _pyplot()
    try:
        path = output_path(path, "plot", plot_suffixes())
    except BaseException:
        plt.close(fig)
        raise
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
