"""Figures from run directories: gradient L2 norms per layer and matching-loss curves.

The paper's Figures 6 and 7 compare Batch Sampling runs (by number of
clusters, by feature layer) with DC through two views of training:

* the L2 norm of the real and synthetic gradient of every weight tensor of the
  matching network, averaged over iterations: grouped bars, one bar per run
  (``grad_norm_figure``), and the same norms over iterations (``grad_norm_lines_figure``);
* the matching loss over iterations, one line per run (``loss_figure``).

Everything is read from what every run directory already holds: ``config.json``
(method, label, Batch Sampling settings, preset) and ``diagnostics.csv`` (one row
per iteration: loss and ``gw_real:<param>`` / ``gw_syn:<param>`` columns). DM
runs have no gradient columns; they appear in the loss figure only.
"""
from __future__ import annotations

import csv
import json
import math
import os
from dataclasses import dataclass, field

import numpy as np

from .cmdline import ConfigError
from .config import load_run_config
from .io import atomic_write
from .samplers import method_label

__all__ = ["PlotError", "RunData", "load_run", "load_runs", "run_label", "tensor_shapes", "weight_params",
           "moving_average", "grad_norm_figure", "grad_norm_lines_figure", "loss_figure", "plot_runs"]

REAL, SYN = "gw_real:", "gw_syn:"


class PlotError(ConfigError):
    """A run directory that cannot be plotted; the message names it and says why."""


@dataclass
class RunData:
    """One run directory, reduced to what the figures need (one experiment)."""
    path: str
    config: dict
    label: str
    it: np.ndarray                       # iterations, ascending
    loss: np.ndarray
    gw_real: dict = field(default_factory=dict)   # param name -> norms over iterations
    gw_syn: dict = field(default_factory=dict)

    @property
    def has_grads(self) -> bool:
        return bool(self.gw_real)

    @property
    def preset(self):
        return self.config.get("preset")


def run_label(config: dict) -> str:
    """``DC``, ``DSA``, ``DM`` or ``BS(DC) k=20 L3`` (``norm`` appended for size-constrained clusters)."""
    method = config.get("method", "?")
    label = config.get("label") or method_label(method, config.get("sampler", "class"))
    if config.get("sampler") == "cluster":
        k = config.get("cluster_k", config.get("num_cluster"))
        layer = config.get("cluster_layer", config.get("layer_idx"))
        norm = config.get("cluster_norm", config.get("norm"))
        if k is not None:
            label += f" k={k}"
        if layer is not None:
            label += f" L{layer}"
        if norm:
            label += " norm"
        if config.get("mix"):
            label += f" mix>{config.get('mix_after')}"
    return label


def _float(x: str) -> float:
    try:
        return float(x)
    except (TypeError, ValueError):
        return math.nan


def load_run(path: str, exp: int = 0) -> RunData:
    """Reads ``config.json`` and the rows of experiment ``exp`` from ``diagnostics.csv``."""
    if not os.path.isdir(path):
        raise PlotError(f"{path} is not a directory (expected a run directory of main.py or main_BS.py)")
    diag = os.path.join(path, "diagnostics.csv")
    if not os.path.isfile(diag):
        raise PlotError(f"{path} has no diagnostics.csv (not a run directory, or the run has not finished "
                        f"an iteration yet)")
    config = load_run_config(path)
    if config is None:
        raise PlotError(f"{os.path.join(path, 'config.json')} cannot be read; it names the run's method")
    with open(diag, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    if not rows or "loss" not in rows[0] or "it" not in rows[0]:
        raise PlotError(f"{diag} has no rows with 'it' and 'loss' columns")
    exps = sorted({int(r["exp"]) for r in rows if r.get("exp", "").strip()})
    mine = [r for r in rows if r.get("exp", "").strip() and int(r["exp"]) == exp]
    if not mine:
        raise PlotError(f"{diag} has no rows of experiment {exp} (it has experiments {exps}); pass --exp")
    by_it = {int(r["it"]): r for r in mine}   # one row per iteration; the last one written wins
    its = sorted(by_it)
    ordered = [by_it[i] for i in its]
    cols = list(rows[0].keys())
    gw_real = {c[len(REAL):]: np.array([_float(r[c]) for r in ordered]) for c in cols if c.startswith(REAL)}
    gw_syn = {c[len(SYN):]: np.array([_float(r[c]) for r in ordered]) for c in cols if c.startswith(SYN)}
    # a column can exist only because another experiment wrote it (DM has none): drop empty ones
    gw_real = {k: v for k, v in gw_real.items() if not np.isnan(v).all()}
    gw_syn = {k: v for k, v in gw_syn.items() if k in gw_real}
    return RunData(path=path, config=config, label=run_label(config), it=np.array(its),
                   loss=np.array([_float(r["loss"]) for r in ordered]), gw_real=gw_real, gw_syn=gw_syn)


def load_runs(paths, exp: int = 0) -> list[RunData]:
    """``load_run`` of every path; labels that collide get the run directory's name appended."""
    if not paths:
        raise PlotError("no run directories given")
    runs = [load_run(p, exp) for p in paths]
    counts = {}
    for r in runs:
        counts[r.label] = counts.get(r.label, 0) + 1
    for r in runs:
        if counts[r.label] > 1:
            r.label = f"{r.label} ({os.path.basename(os.path.normpath(r.path))})"
    return runs


def tensor_shapes(config: dict) -> dict | None:
    """Parameter name -> shape of the run's network (built on the meta device), or None if unknown."""
    try:
        import torch
        from networks import build_model
        from .data import DATASETS
        spec = DATASETS[config["dataset"]]
        channel = len(config.get("mean") or ()) or spec.channel
        num_classes = len(config.get("class_counts") or ()) or spec.num_classes
        with torch.device("meta"):
            net = build_model(config["model"], channel, num_classes, spec.im_size)
        return {n: tuple(p.shape) for n, p in net.named_parameters()}
    except Exception:   # another model zoo, an old config: fall back to names
        return None


def weight_params(runs, all_params: bool = False) -> list[str]:
    """Parameter tensors to plot, in network order: every one with ``all_params``, else those
    with more than one dimension (biases and normalisation scales/shifts are 1-D)."""
    names = []
    for r in runs:
        names += [n for n in r.gw_real if n not in names]
    if all_params:
        return names
    shape_maps = list(_shapes(runs))
    keep = []
    for n in names:
        shapes = [m[n] for m in shape_maps if n in m]
        if shapes:
            if len(shapes[0]) > 1:
                keep.append(n)
        elif not n.endswith(".bias"):
            keep.append(n)
    return keep


def _shapes(runs):
    cache = {}
    for r in runs:
        if not r.has_grads:
            continue
        key = (r.config.get("model"), r.config.get("dataset"))
        if key not in cache:
            cache[key] = tensor_shapes(r.config) or {}
        yield cache[key]


def moving_average(y: np.ndarray, n: int) -> np.ndarray:
    """Trailing mean over up to ``n`` points (the first points average what there is); same length."""
    y = np.asarray(y, dtype=float)
    if n <= 1 or y.size == 0:
        return y
    c = np.cumsum(np.insert(y, 0, 0.0))
    idx = np.arange(1, y.size + 1)
    lo = np.maximum(idx - n, 0)
    return (c[idx] - c[lo]) / (idx - lo)


# --------------------------------------------------------------------------- #
# figures
# --------------------------------------------------------------------------- #
def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _colors(n):
    plt = _pyplot()
    cmap = plt.get_cmap("tab10" if n <= 10 else "tab20")
    return [cmap(i % cmap.N) for i in range(n)]


def _suffix(runs) -> str:
    """What the runs were: dataset / model / ipc when shared, and any reduced preset."""
    def shared(key):
        vals = {str(r.config.get(key)) for r in runs}
        return vals.pop() if len(vals) == 1 else None
    parts = [v for v in (shared("dataset"), shared("model")) if v and v != "None"]
    ipc = shared("ipc")
    if ipc and ipc != "None":
        parts.append(f"{ipc} ipc")
    presets = sorted({str(r.preset) for r in runs if r.preset})
    text = ", ".join(parts)
    if presets:
        text += f" - preset {'/'.join(presets)} (reduced protocol)"
    return text


def _save(fig, path: str) -> str:
    plt = _pyplot()
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120))
    plt.close(fig)
    return path


def _short(name: str) -> str:
    return name[:-len(".weight")] if name.endswith(".weight") else name


def _grad_setup(runs, all_params):
    """pyplot, the runs that have gradient columns, the tensors to draw and one colour per run."""
    runs = [r for r in runs if r.has_grads]
    params = weight_params(runs, all_params)
    if not params:
        raise PlotError("no gradient columns to plot")
    return _pyplot(), runs, params, _colors(len(runs))


def grad_norm_figure(runs, path: str, all_params: bool = False, exp: int = 0) -> str:
    """Grouped bars (seed Figures 6/7): per weight tensor, the mean over iterations of the real
    (top row) and synthetic (bottom row) gradient L2 norm, one bar per run; whiskers: std over
    iterations."""
    plt, runs, params, colors = _grad_setup(runs, all_params)
    ncol = len(params)
    fig, axes = plt.subplots(2, ncol, figsize=(max(4.0, 2.0 + 1.6 * ncol + 0.25 * len(runs) * ncol), 6.0),
                             squeeze=False)
    x = np.arange(len(runs))
    for row, (kind, attr) in enumerate((("real", "gw_real"), ("synthetic", "gw_syn"))):
        for col, p in enumerate(params):
            ax = axes[row][col]
            vals = [getattr(r, attr).get(p) for r in runs]
            means = [float(np.nanmean(v)) if v is not None else math.nan for v in vals]
            stds = [float(np.nanstd(v)) if v is not None else 0.0 for v in vals]
            ax.bar(x, means, yerr=stds, color=colors, capsize=2, error_kw={"elinewidth": 0.8},
                   hatch="//" if kind == "synthetic" else None, edgecolor="black", linewidth=0.5)
            ax.set_xticks([])
            ax.tick_params(labelsize=7)
            if row == 0:
                ax.set_title(_short(p), fontsize=8)
            if col == 0:
                ax.set_ylabel(f"{kind} gradient L2 norm", fontsize=8)
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in colors]
    fig.legend(handles, [r.label for r in runs], loc="lower center", ncol=min(len(runs), 5), fontsize=8,
               frameon=False)
    title = f"Gradient L2 norm per layer, mean over iterations (exp {exp})"
    fig.suptitle(f"{title}\n{_suffix(runs)}", fontsize=9)
    fig.tight_layout(rect=(0, 0.04 + 0.03 * ((len(runs) - 1) // 5), 1, 1))
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120))
    plt.close(fig)
    return path


def grad_norm_lines_figure(runs, path: str, all_params: bool = False, smooth: int = 1, exp: int = 0) -> str:
    """Per weight tensor, real (solid) and synthetic (dashed) gradient L2 norm over iterations."""
    plt, runs, params, colors = _grad_setup(runs, all_params)
    ncol = min(4, len(params))
    nrow = -(-len(params) // ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(3.2 * ncol, 2.6 * nrow + 0.8), squeeze=False)
    for i, p in enumerate(params):
        ax = axes[i // ncol][i % ncol]
        for r, c in zip(runs, colors):
            if p in r.gw_real:
                ax.plot(r.it, moving_average(r.gw_real[p], smooth), color=c, lw=1.0, label=r.label)
                ax.plot(r.it, moving_average(r.gw_syn[p], smooth), color=c, lw=1.0, ls="--")
        ax.set_title(_short(p), fontsize=8)
        ax.tick_params(labelsize=7)
        ax.set_xlabel("iteration", fontsize=7)
    for j in range(len(params), nrow * ncol):
        axes[j // ncol][j % ncol].axis("off")
    axes[0][0].legend(fontsize=6)
    sm = f", moving average of {smooth}" if smooth > 1 else ""
    fig.suptitle(f"Gradient L2 norm over iterations: real solid, synthetic dashed (exp {exp}{sm})\n"
                 f"{_suffix(runs)}", fontsize=9)
    return _save(fig, path)


def loss_figure(runs, path: str, smooth: int = 1, exp: int = 0) -> str:
    """Matching loss over iterations, one line per run (DM's loss is an embedding distance)."""
    plt = _pyplot()
    colors = _colors(len(runs))
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for r, c in zip(runs, colors):
        ax.plot(r.it, moving_average(r.loss, smooth), color=c, lw=1.2, label=r.label,
                marker="o" if len(r.it) <= 20 else None, ms=3)
    ax.set_xlabel("iteration")
    ax.set_ylabel("matching loss" + (f" (moving average of {smooth})" if smooth > 1 else ""))
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    ax.set_title(f"Matching loss (exp {exp})\n{_suffix(runs)}", fontsize=9)
    return _save(fig, path)


def synthetic_figure(runs, path: str, exp: int = 0) -> str | None:
    """Figure 5: each run's final synthetic set (``syn_exp<exp>.pt``) side by side, denormalised and
    clamped, one row per class and ``ipc`` columns. Runs without that file are skipped (None if all)."""
    import torch
    plt = _pyplot()
    panels = []
    for r in runs:
        f = os.path.join(r.path, f"syn_exp{exp}.pt")
        if not os.path.isfile(f):
            continue
        d = torch.load(f, weights_only=True)
        images = d["data"][0][0].float()
        if d.get("normalized", True):
            mean = torch.tensor(d["mean"]).view(1, -1, 1, 1)
            std = torch.tensor(d["std"]).view(1, -1, 1, 1)
            images = images * std + mean
        images = images.clamp(0, 1)
        ipc, nc = int(d["ipc"]), len(d.get("class_names") or []) or images.shape[0] // int(d["ipc"])
        rows = images.view(nc, ipc, *images.shape[1:])                       # class-major, as saved
        grid = torch.cat([torch.cat(list(rows[c]), dim=2) for c in range(nc)], dim=1)   # C, nc*H, ipc*W
        panels.append((r.label.replace(" (", "\n(") + f"\nit {d.get('iteration', '?')}", grid.permute(1, 2, 0).numpy(),
                       d.get("class_names") or [str(c) for c in range(nc)], images.shape[-2]))
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(1.0 + 2.4 * len(panels) * max(1, panels[0][1].shape[1] / 32 / 3),
                                                      0.45 * len(panels[0][2]) + 1.0), squeeze=False)
    for ax, (label, img, names, h) in zip(axes[0], panels):
        ax.imshow(img.squeeze(-1) if img.shape[-1] == 1 else img, cmap="gray" if img.shape[-1] == 1 else None,
                  interpolation="nearest")
        ax.set_title(label, fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([h * (c + 0.5) for c in range(len(names))])
        ax.set_yticklabels(names, fontsize=7)
    fig.suptitle(f"Synthetic images (exp {exp})", fontsize=9)
    return _save(fig, path)


def plot_runs(paths, out: str = "results/figures", name: str = "runs", exp: int = 0, smooth: int = 1,
              all_params: bool = False, lines: bool = True, synthetic: bool = True, log=print) -> list[str]:
    """Reads the run directories and writes the figures; returns the paths written.

    ``<out>/<name>_grad_norms.png`` (bars; and ``<name>_grad_norms_iter.png``, lines, with
    ``lines``) when any run has gradient columns, ``<out>/<name>_loss.png``, and
    ``<out>/<name>_synthetic.png`` (Figure 5) when the runs saved their synthetic sets and
    ``synthetic`` is set.
    """
    if smooth < 1:
        raise PlotError(f"--smooth must be >= 1, got {smooth}")
    runs = load_runs(paths, exp)
    written = []
    no_grads = [r for r in runs if not r.has_grads]
    for r in no_grads:
        why = "DM matches embeddings" if r.config.get("method") == "DM" else "no gw_real columns"
        log(f"note: {r.label} ({r.path}): no gradient norms ({why}); plotted in the loss figure only")
    if len(no_grads) < len(runs):
        written.append(grad_norm_figure(runs, os.path.join(out, f"{name}_grad_norms.png"), all_params, exp))
        if lines:
            written.append(grad_norm_lines_figure(runs, os.path.join(out, f"{name}_grad_norms_iter.png"),
                                                  all_params, smooth, exp))
    else:
        log("note: no run has gradient norms; no gradient figure written")
    written.append(loss_figure(runs, os.path.join(out, f"{name}_loss.png"), smooth, exp))
    syn = synthetic_figure(runs, os.path.join(out, f"{name}_synthetic.png"), exp) if synthetic else None
    if syn:
        written.append(syn)
    return written
