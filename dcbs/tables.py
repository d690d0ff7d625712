"""The paper's Tables 1-3 from run directories, beside the published numbers.

    python reproduce.py aggregate [--save_path results/sweep] [--out results/tables.md]

Reads every run directory under the save paths (``config.json``, ``accuracies.json``,
``DONE``), takes each finished run's last evaluation iteration, pools the accuracies
of every model of the runs of a cell (all experiments, all seeds) and writes one
markdown file: each cell ``mean ± std (n=models)`` in percent next to the published
value, ``–`` where nothing was run. The protocol (preset, iteration, settings that
differ from the published protocol) is stated per table, or per cell when the runs
of one table differ. Unfinished runs are listed apart, never averaged.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field

import numpy as np

from .config import load_run_config
from .sweep import IPCS, PAPER_TABLES, TABLE_TITLES, TABLES

# Published accuracies (ConvNet, %, mean ± std of 100 models; std None where the source gives none).
# Source: the paper ("Dataset Condensation with Batch Sampling") and the DC / DSA papers ("Published
# accuracy", Tables 2 and 3 of the published protocol). Kept per table because the paper
# reports the same cell (BS k = 20, layer 2) twice with different numbers: Table 2 gives
# 28.1±0.6 / 42.8±0.6 / 52.9±0.7, Table 3 gives 28.0±0.5 / 43.0±0.5 / 52.6±0.5.
_DC_CIFAR10 = {1: (28.3, 0.5), 10: (44.9, 0.5), 50: (53.9, 0.5)}
PUBLISHED = {
    "table1": {
        "CIFAR10": {("DC", None, None): _DC_CIFAR10,
                    ("DSA", None, None): {1: (28.8, 0.7), 10: (52.1, 0.5), 50: (60.6, 0.5)},
                    ("BS", 20, 3): {1: (28.1, 0.6), 10: (42.8, 0.6), 50: (52.9, 0.7)}},
        "FashionMNIST": {("DC", None, None): {1: (70.5, 0.6), 10: (82.3, 0.4), 50: (83.6, 0.4)},
                         ("DSA", None, None): {1: (70.6, 0.6), 10: (84.6, 0.3), 50: (88.7, 0.2)}},
        "CIFAR100": {("DC", None, None): {1: (12.8, 0.3), 10: (25.2, 0.3)},
                     ("DSA", None, None): {1: (13.9, 0.3), 10: (32.3, 0.3), 50: (42.8, 0.4)}},
        "MNIST": {("DC", None, None): {1: (91.7, None), 10: (97.4, None), 50: (98.8, None)},
                  ("DSA", None, None): {1: (88.7, None), 10: (97.8, None), 50: (99.2, None)}},
        "SVHN": {("DC", None, None): {1: (31.2, None), 10: (76.1, None), 50: (82.3, None)},
                 ("DSA", None, None): {1: (27.5, None), 10: (79.2, None), 50: (84.4, None)}},
    },
    "table2": {"CIFAR10": {
        ("BS", 5, 2): {1: (28.0, 0.6), 10: (42.6, 0.7), 50: (53.5, 0.5)},
        ("BS", 10, 2): {1: (27.6, 0.5), 10: (43.1, 0.4), 50: (53.3, 0.6)},
        ("BS", 15, 2): {1: (28.1, 0.6), 10: (43.1, 0.6), 50: (52.7, 0.5)},
        ("BS", 20, 2): {1: (28.1, 0.6), 10: (42.8, 0.6), 50: (52.9, 0.7)},
        ("BS", 25, 2): {1: (28.6, 0.7), 10: (42.8, 0.4), 50: (53.3, 0.6)},
        ("DC", None, None): _DC_CIFAR10}},
    "table3": {"CIFAR10": {
        ("BS", 20, 0): {1: (27.8, 0.6), 10: (43.6, 0.6), 50: (52.0, 0.7)},
        ("BS", 20, 1): {1: (28.3, 0.5), 10: (42.7, 0.6), 50: (52.8, 0.4)},
        ("BS", 20, 2): {1: (28.0, 0.5), 10: (43.0, 0.5), 50: (52.6, 0.5)},
        ("BS", 20, 3): {1: (28.1, 0.6), 10: (42.8, 0.6), 50: (52.9, 0.7)},
        ("DC", None, None): _DC_CIFAR10}},
}
DASH = "–"


# --------------------------------------------------------------------------- #
# reading runs
# --------------------------------------------------------------------------- #
@dataclass
class Run:
    path: str
    config: dict
    done: bool
    key: tuple | None = None       # (method, k, layer) of the tables, None when in none
    why_not: str = ""              # why a finished run is in no table
    last_it: int | None = None
    accs: list = field(default_factory=list)   # fractions, every model at last_it
    diffs: tuple = ()              # settings that differ from the published protocol (preset applied)

    @property
    def name(self) -> str:
        return os.path.basename(self.path)


def protocol_expectation(cfg: dict) -> dict:
    """The settings a run of this method and preset has under the published protocol."""
    from .config import DEFAULTS, METHOD_DEFAULTS, PRESETS
    want = dict(DEFAULTS, **METHOD_DEFAULTS.get(cfg.get("method"), {}))
    if cfg.get("preset") in PRESETS:
        want.update({k: v for k, v in PRESETS[cfg["preset"]].items() if k != "dataset"})
    keys = ["model", "Iteration", "num_exp", "num_eval", "epoch_eval_train", "lr_img", "lr_net", "batch_real",
            "batch_train", "init", "dis_metric"]
    out = {k: want[k] for k in keys}
    if cfg.get("sampler") == "cluster":
        out.update({k: DEFAULTS[k] for k in ("mix", "cluster_weighting")})
    return out


def table_key(cfg: dict) -> tuple[tuple | None, str]:
    if "method" not in cfg or "ipc" not in cfg:
        return None, "not a condensation run"
    if cfg.get("load_syn"):
        return None, "evaluation of a saved set"
    if cfg.get("sampler", "class") not in ("class", "cluster"):
        return None, f"--sampler {cfg['sampler']} is in no table (see results/samplers.md)"
    if cfg.get("sampler") == "cluster":
        if cfg["method"] != "DC":
            return None, f"BS({cfg['method']}) is in no table"
        if not cfg.get("norm"):
            return None, "Batch Sampling without --norm clusters (the tables use --norm)"
        return ("BS", cfg.get("num_cluster"), cfg.get("layer_idx")), ""
    if cfg["method"] not in ("DC", "DSA"):
        return None, f"{cfg['method']} is in no table"
    return (cfg["method"], None, None), ""


def last_accuracies(acc: dict, arch: str) -> tuple[int | None, list]:
    """(last evaluated iteration, every model's accuracy there) from exp -> it -> arch -> [acc]."""
    its = [int(it) for per in acc.values() for it, archs in per.items() if arch in archs]
    if not its:
        return None, []
    last = max(its)
    return last, [float(a) for per in acc.values() for a in per.get(str(last), {}).get(arch, [])]


def read_run(path: str) -> Run | None:
    cfg = load_run_config(path)
    if cfg is None:
        return None
    run = Run(path=path, config=cfg, done=os.path.exists(os.path.join(path, "DONE")))
    run.key, run.why_not = table_key(cfg)
    try:
        with open(os.path.join(path, "accuracies.json"), encoding="utf-8") as f:
            acc = json.load(f)
    except (OSError, json.JSONDecodeError):
        acc = {}
    run.last_it, run.accs = last_accuracies(acc, cfg.get("model", "ConvNet"))
    if run.key is not None:
        want = protocol_expectation(cfg)
        run.diffs = tuple(f"{k}={cfg[k]}" for k in want if k in cfg and cfg[k] != want[k])
    if run.done and run.key is not None and not run.accs:
        run.key, run.why_not = None, "no accuracies recorded"
    return run


def read_runs(save_paths) -> list[Run]:
    runs = []
    for root in save_paths:
        if not os.path.isdir(root):
            continue
        for name in sorted(os.listdir(root)):
            p = os.path.join(root, name)
            if name.startswith(".") or not os.path.isfile(os.path.join(p, "config.json")):
                continue
            r = read_run(p)
            if r is not None:
                runs.append(r)
    return runs


# --------------------------------------------------------------------------- #
# the tables
# --------------------------------------------------------------------------- #
def fmt_ours(accs) -> str:
    a = 100 * np.asarray(accs, dtype=np.float64)
    return f"{a.mean():.2f} ± {a.std():.2f} (n={len(a)})"


def fmt_published(v) -> str:
    if v is None:
        return DASH
    mean, std = v
    return f"{mean}" if std is None else f"{mean}±{std}"


def cell_label(key) -> str:
    method, k, layer = key
    return f"BS(DC) k={k}, layer {layer}" if method == "BS" else method


def layout(table: str):
    """(row labels, column labels, (row, col) -> (key, ipc)) in the paper's orientation."""
    keys = TABLES[table]
    if table == "table1":
        return ([cell_label(k) for k in keys], [f"ipc {i}" for i in IPCS],
                lambda r, c: (keys[r], IPCS[c]))
    if table == "table2":
        cols = [f"k={k[1]}" if k[0] == "BS" else k[0] for k in keys]
    else:
        cols = [f"layer {k[2]}" if k[0] == "BS" else k[0] for k in keys]
    return [f"ipc {i}" for i in IPCS], cols, lambda r, c: (keys[c], IPCS[r])


def cluster_spec(run: Run) -> str | None:
    """Where a Batch Sampling run's clusters came from (extractor and --norm margin); None for DC / DSA."""
    if run.key[0] != "BS":
        return None
    return f"{run.config.get('cluster_model', '?')} features, margin {run.config.get('margin', '?')}"


def variant(run: Run) -> tuple:
    return run.config.get("preset"), run.last_it, run.diffs


def describe_variant(v) -> str:
    preset, it, diffs = v
    text = (f"preset `{preset}` (a reduced protocol)" if preset else "the published protocol (no preset)")
    text += f", evaluated at iteration {it}"
    if diffs:
        text += "; settings that differ from that protocol: " + ", ".join(f"`{d}`" for d in diffs)
    return text


def render_table(table: str, dataset: str, runs: list[Run]) -> list[str]:
    mine = [r for r in runs if r.done and r.key in TABLES[table] and r.config.get("dataset") == dataset]
    variants = sorted({variant(r) for r in mine}, key=repr)
    tag = {v: f"[{chr(ord('a') + i)}]" for i, v in enumerate(variants)} if len(variants) > 1 else {}
    lines = [f"## {TABLE_TITLES[table]}, {dataset}", ""]
    if not variants:
        lines.append("No finished runs for this table.")
    elif len(variants) == 1:
        lines.append(f"Protocol: {describe_variant(variants[0])}.")
    else:
        lines.append("The runs of this table used different protocols; each cell names its own:")
        lines += [f"- {tag[v]} {describe_variant(v)}" for v in variants]
    specs = sorted({cluster_spec(r) for r in mine if r.key[0] == "BS"})
    if specs:
        lines += ["", f"Batch Sampling clusters (size-constrained K-Means): {'; '.join(specs)}"
                     f"{' (each cell names its own)' if len(specs) > 1 else ''}."]
    lines += ["", "Each cell: **ours** mean ± std (n = models pooled over experiments and runs) / published.", ""]
    rows, cols, at = layout(table)
    published = PUBLISHED.get(table, {}).get(dataset, {})
    lines.append("| | " + " | ".join(cols) + " |")
    lines.append("|---|" + "---|" * len(cols))
    for ri, row in enumerate(rows):
        cells = []
        for ci in range(len(cols)):
            key, ipc = at(ri, ci)
            pub = fmt_published(published.get(key, {}).get(ipc))
            here = [r for r in mine if r.key == key and r.config.get("ipc") == ipc]
            groups: dict = {}
            for r in here:
                groups.setdefault((variant(r), cluster_spec(r)), []).append(r)
            if not groups:
                cells.append(f"{DASH} / {pub}")
                continue
            parts = []
            for (v, cm), rs in sorted(groups.items(), key=lambda g: repr(g[0])):
                extra = " ".join(x for x in (tag.get(v, ""), f"({cm})" if cm and len(specs) > 1 else "") if x)
                parts.append(f"**{fmt_ours([a for r in rs for a in r.accs])}**" + (f" {extra}" if extra else ""))
            cells.append(f"{'<br>'.join(parts)} / {pub}")
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    if table in ("table2", "table3") and dataset == "CIFAR10":
        lines += ["", "The paper reports BS k = 20, layer 2 twice: 28.1±0.6 / 42.8±0.6 / 52.9±0.7 in Table 2 and "
                      "28.0±0.5 / 43.0±0.5 / 52.6±0.5 in Table 3; each table shows its own."]
    return lines + [""]


def render(runs: list[Run], save_paths, datasets=None) -> str:
    in_tables = [r for r in runs if r.done and r.key is not None]
    datasets = list(datasets or sorted({r.config.get("dataset") for r in in_tables}) or ["CIFAR10"])
    in_tables = [r for r in in_tables if r.config.get("dataset") in datasets]   # only what is tabulated
    lines = ["# The paper's Tables 1-3, reproduced", "",
             f"Written by `python reproduce.py aggregate` on {time.strftime('%Y-%m-%d %H:%M:%S')} from "
             f"{len(in_tables)} finished run(s) under {', '.join(f'`{p}`' for p in save_paths)}. Each run counts "
             f"at its last evaluation iteration, with the accuracy of every model trained there (ConvNet). "
             f"Published: ConvNet, mean ± std of 100 models (the Batch Sampling paper; DC / DSA papers). "
             f"{DASH}: not run. Figure 1 (DC vs CAFE) is left out: CAFE is not implemented.", ""]
    for dataset in datasets:
        for table in PAPER_TABLES:
            lines += render_table(table, dataset, runs)
    used = sorted(in_tables, key=lambda r: r.name)
    if used:
        lines += ["## Finished runs used", "", "| run | cell | ipc | preset | iteration | n |", "|---|---|---|---|---|---|"]
        lines += [f"| `{r.name}` | {cell_label(r.key)} | {r.config.get('ipc')} | {r.config.get('preset') or 'none'} "
                  f"| {r.last_it} | {len(r.accs)} |" for r in used]
        lines.append("")
    unfinished = [r for r in runs if not r.done]
    if unfinished:
        lines += ["## Unfinished runs (not averaged)", "",
                  "| run | ipc | preset | last evaluated iteration | continue with |", "|---|---|---|---|---|"]
        for r in unfinished:
            script = r.config.get("script", "main.py")
            how = (f"`python {script} --resume {r.path}`" if os.path.exists(os.path.join(r.path, "checkpoint.pt"))
                   else "rerun (no checkpoint yet)")
            lines.append(f"| `{r.name}` | {r.config.get('ipc')} | {r.config.get('preset') or 'none'} | "
                         f"{DASH if r.last_it is None else r.last_it} | {how} |")
        lines.append("")
    other = [r for r in runs if r.done and r.key is None]
    if other:
        lines += ["## Finished runs in no table", ""]
        lines += [f"- `{r.name}`: {r.why_not}" for r in other]
        lines.append("")
    return "\n".join(lines)


def write_tables(save_paths, out: str, datasets=None) -> tuple[str, list[Run]]:
    from .io import atomic_write_text
    runs = read_runs(save_paths)
    atomic_write_text(out, render(runs, save_paths, datasets))
    return out, runs
