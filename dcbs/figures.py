"""The paper's Figures 5-8 from finished sweep runs (``python reproduce.py figures``).

    Figure 5  synthetic images, DC beside BS(DC) k = 20 layer 3          (Table 1's runs)
    Figure 6  gradient L2 norms and matching loss, DC and BS(DC) k = 5..25, layer 2  (Table 2's)
    Figure 7  the same, DC and BS(DC) layer 0..3, k = 20                 (Table 3's)
    Figure 8  one class's real and synthetic features, DC vs BS(DC) k = 20 layer 3, in the
              feature space of a ConvNet trained on the whole training set (``--features``)

Runs are the finished (``DONE``) ones that the tables read (``dcbs.tables.read_runs``),
grouped by dataset, ipc, preset and seed, so that one figure never mixes protocols.
A figure is drawn for a group when it holds DC and at least one of the figure's Batch
Sampling runs; what is missing is reported, not invented. Figure 1 (DC vs CAFE) is left
out: CAFE is not implemented.
"""
from __future__ import annotations

import os

from .sweep import TABLES
from .tables import Run, read_runs

__all__ = ["FIGURES", "figure_groups", "make_figures"]

DC = ("DC", None, None)
BS_K20_L3 = ("BS", 20, 3)
# figure -> (what it shows, the table keys it draws, in legend order)
FIGURES = {
    "fig5": ("synthetic images", [DC, BS_K20_L3]),
    "fig6": ("gradient norms and loss by number of clusters (layer 2)",
             [DC] + [k for k in TABLES["table2"] if k[0] == "BS"]),
    "fig7": ("gradient norms and loss by feature layer (k = 20)", [DC] + [k for k in TABLES["table3"] if k[0] == "BS"]),
    "fig8": ("feature distribution of one class", [DC, BS_K20_L3]),
}


def _group(run: Run) -> tuple:
    c = run.config
    return c.get("dataset"), int(c.get("ipc")), c.get("preset") or "full", int(c.get("seed", 0))


def figure_groups(runs: list[Run], datasets=None) -> dict[tuple, dict[tuple, Run]]:
    """(dataset, ipc, preset, seed) -> table key -> the finished run of that cell (first found wins)."""
    out: dict[tuple, dict[tuple, Run]] = {}
    for r in runs:
        if not r.done or r.key is None or (datasets and r.config.get("dataset") not in datasets):
            continue
        out.setdefault(_group(r), {}).setdefault(r.key, r)
    return dict(sorted(out.items(), key=lambda kv: repr(kv[0])))


def make_figures(save_paths, out: str, features: str | None = None, feature_class=None, feature_real: int = 1000,
                 datasets=None, smooth: int = 5, device: str = "cpu", log=print) -> list[str]:
    """Draws every figure the finished runs allow into ``out``; returns the paths written.

    ``features``: the trained network of Figure 8; None skips that figure with a note (a
    path of ``{dataset}`` is formatted per dataset, e.g. ``checkpoints/ConvNet_{dataset}.pt``)."""
    from . import plots
    written = []
    groups = figure_groups(read_runs(save_paths), datasets)
    if not groups:
        log(f"no finished runs of the tables under {', '.join(save_paths)}: nothing to draw")
        return written
    for (dataset, ipc, preset, seed), cells in groups.items():
        tag = f"{dataset}_ipc{ipc}_{preset}_s{seed}"
        for fig, (what, keys) in FIGURES.items():
            have = [cells[k] for k in keys if k in cells]
            missing = ", ".join("DC" if k == DC else f"BS k={k[1]} L{k[2]}" for k in keys if k not in cells)
            if DC not in cells or not any(r.key[0] == "BS" for r in have):
                log(f"{fig} {tag}: skipped ({what} needs DC and a BS run; missing {missing})")
                continue
            paths = [r.path for r in have]
            name = f"{fig}_{tag}"
            if fig == "fig5":
                p = plots.synthetic_figure(plots.load_runs(paths), os.path.join(out, f"{name}_synthetic.png"))
                if p is None:
                    log(f"{fig} {tag}: skipped (the runs saved no synthetic set)")
                    continue
                written.append(p)
            elif fig in ("fig6", "fig7"):
                written += plots.plot_runs(paths, out=out, name=name, smooth=smooth, log=log,
                                           synthetic=False)
            else:
                ck = features.format(dataset=dataset) if features else None
                if not ck or not os.path.isfile(ck):
                    log(f"{fig} {tag}: skipped (no trained network{' at ' + ck if ck else ''}; make one with "
                        f"python main_cluster.py --dataset {dataset} --model ConvNet --train_extractor --layer_idx 2 "
                        f"--no_figures, then pass --features)")
                    continue
                from .featfig import figure8
                written += figure8(plots.load_runs(paths), ck, out, name, feature_class, feature_real,
                                   device=device, log=log)
            log(f"{fig} {tag}: {', '.join(r.name for r in have)}{f' (not run: {missing})' if missing else ''}")
    return written
