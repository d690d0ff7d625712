"""The sampler study's report (results/samplers.md): each sampler against DC on paired seeds.

    python reproduce.py study --save_path results/real/samplers [--out results/samplers_table.md]
                              [--figures results/figures/samplers]

``collect`` reads every run directory (finished or not) into a ``Record``: its label, setting, seed,
every model's accuracy (percent) at each evaluated iteration, and from ``diagnostics.csv`` its cost per
iteration, real batch sizes and real gradient norms per tensor. ``paired`` groups finished runs by (dataset, ipc, preset) and compares each label
with the baseline (DC) seed by seed: d_s = mean over its models − mean over DC's models, same seed and
iteration. ``render_markdown`` writes the tables, ``plot`` the accuracy curves and, per seed, the
paper's Figures 6 and 7 (gradient norms per layer) with one bar or line per sampler. Unfinished runs
are listed apart, never averaged.
"""
from __future__ import annotations

import csv
import json
import math
import os
import re
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from .plots import REAL
from .samplers import SAMPLERS, method_label
from .tables import read_runs

__all__ = ["Record", "LabelStats", "Comparison", "Group", "collect", "paired", "render_markdown", "plot",
           "grad_figures", "GAIN_POINTS", "GAIN_SE"]

# results/samplers.md's rule, fixed before any seed ran: a gain is mean d >= 1 point and mean d > 2 SE
GAIN_POINTS, GAIN_SE = 1.0, 2.0
DASH = "–"

# the settings that tell runs of one sampler apart, in the order they are named, with how each is written
_DETAILS = {
    "cluster": [("num_cluster", lambda v: f"k={v}"), ("layer_idx", lambda v: f"layer {v}"),
                ("norm", lambda v: "norm" if v else "no norm"), ("margin", lambda v: f"margin {v}"),
                ("cluster_model", str), ("cluster_weighting", lambda v: f"{v} weighting"),
                ("mix", lambda v: "mix" if v else "no mix"), ("mix_after", lambda v: f"mix after {v}")],
    "stratified": [("layer_idx", lambda v: f"layer {v}"), ("cluster_model", str)],
    "representative": [("layer_idx", lambda v: f"layer {v}"), ("cluster_model", str),
                       ("rep_embed", lambda v: f"{v} embedding"), ("rep_partitions", lambda v: f"{v} partitions"),
                       ("candidates", lambda v: f"{v} candidates"), ("interval", lambda v: f"interval {v}")],
    "pruned": [("cluster_model", str), ("prune_hard", lambda v: f"{100 * float(v):g} % pruned")],
    "systematic": [("num_cluster", lambda v: f"k={v}"), ("layer_idx", lambda v: f"layer {v}"),
                   ("norm", lambda v: "norm" if v else "no norm"), ("cluster_model", str)],
}


@dataclass
class Record:
    """One run directory of a condensation run, finished or not."""
    path: str
    config: dict
    label: str
    method: str
    sampler: str
    dataset: str
    ipc: int
    preset: str | None
    seed: int
    done: bool
    accs: dict = field(default_factory=dict)     # iteration -> every model's accuracy (percent), all experiments
    sec_per_it: float | None = None              # median of diagnostics.csv's `seconds` (None: column absent)
    sample_sec_per_it: float | None = None       # median of its `sample_seconds` (None: column absent)
    cum_seconds: dict = field(default_factory=dict)   # iteration -> condensation seconds before its evaluation
    details: tuple = ()                          # the sampler's settings, written out (see _DETAILS)
    batch_mean: float | None = None              # mean over iterations of `batch_real_mean` (real images per class)
    batch_min: int | None = None                 # smallest `batch_real_min` of any iteration
    gw_real: dict = field(default_factory=dict)  # tensor -> mean over iterations of its real gradient L2 norm

    @property
    def name(self) -> str:
        return os.path.basename(self.path)

    @property
    def last_it(self) -> int | None:
        return max(self.accs) if self.accs else None


def _accuracies(path: str, arch: str) -> dict:
    """iteration -> accuracies (percent) of every model of every experiment, from accuracies.json."""
    try:
        with open(os.path.join(path, "accuracies.json"), encoding="utf-8") as f:
            acc = json.load(f)
    except (OSError, json.JSONDecodeError):
        return {}
    out: dict = {}
    for per in acc.values():
        for it, archs in per.items():
            vals = archs.get(arch) or []
            if vals:
                out.setdefault(int(it), []).extend(100.0 * float(a) for a in vals)
    return dict(sorted(out.items()))


def _float(x) -> float | None:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _diagnostics(path: str) -> list | None:
    """diagnostics.csv's rows, one per (experiment, iteration), in order; None when the file is missing."""
    try:
        with open(os.path.join(path, "diagnostics.csv"), newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    except OSError:
        return None
    by_key = {}
    for r in rows:   # a row written again after a resume replaces the earlier one
        try:
            by_key[(int(r["exp"]), int(r["it"]))] = r
        except (KeyError, TypeError, ValueError):
            continue
    return [by_key[k] for k in sorted(by_key)]


def _column(rows, col) -> list:
    return [v for v in (_float(r.get(col)) for r in rows) if v is not None]


def _timing(rows, eval_its) -> tuple:
    """(seconds per iteration, sample seconds per iteration, iteration -> cumulative seconds).

    ``seconds`` is written per row (one iteration's condensation step with its sampling, evaluation
    excluded), so the time before the evaluation at iteration t is the sum over rows with it < t,
    averaged over experiments. Per iteration: the median of the rest of the step (one iteration of a
    suspended process must not move it) plus the mean of ``sample_seconds`` (a sampler that
    re-clusters every few steps costs nothing on most rows; the mean counts it).
    """
    if rows is None:
        return None, None, {}
    sample = _column(rows, "sample_seconds")
    sample_mean = float(np.mean(sample)) if sample else None
    rest = [v - (_float(r.get("sample_seconds")) or 0.0) for r, v in
            ((r, _float(r.get("seconds"))) for r in rows) if v is not None]
    sec = float(np.median(rest)) + (sample_mean or 0.0) if rest else None

    cum = {}
    if rows and "seconds" in rows[0]:
        per_exp: dict = {}
        for r in rows:
            per_exp.setdefault(int(r["exp"]), {})[int(r["it"])] = _float(r.get("seconds"))
        for t in eval_its:
            sums = []
            for secs in per_exp.values():
                before = [secs.get(i) for i in range(t)]
                if all(s is not None for s in before):   # only experiments whose rows cover 0..t-1
                    sums.append(sum(before))
            if sums:
                cum[t] = float(np.mean(sums))
    return sec, sample_mean, cum


def _batches_and_grads(rows) -> tuple:
    """(mean real batch per class, smallest real batch, tensor -> mean real gradient L2 norm), over all rows."""
    if not rows:
        return None, None, {}
    means, mins = _column(rows, "batch_real_mean"), _column(rows, "batch_real_min")
    grads = {}
    for col in rows[0]:
        if col.startswith(REAL):
            vals = _column(rows, col)
            if vals:
                grads[col[len(REAL):]] = float(np.mean(vals))
    return (float(np.mean(means)) if means else None), (int(min(mins)) if mins else None), grads


def _details(cfg: dict) -> tuple:
    return tuple((key, fmt(cfg.get(key))) for key, fmt in _DETAILS.get(cfg.get("sampler"), ()))


def collect(save_paths) -> list[Record]:
    """Every condensation run under ``save_paths`` (finished or not), as a Record."""
    records = []
    for run in read_runs(save_paths):
        cfg = run.config
        if "method" not in cfg or "ipc" not in cfg or cfg.get("load_syn"):
            continue   # not a condensation run, or the evaluation of a saved set
        accs = _accuracies(run.path, cfg.get("model", "ConvNet"))
        rows = _diagnostics(run.path)
        sec, sample, cum = _timing(rows, list(accs))
        batch_mean, batch_min, gw_real = _batches_and_grads(rows)
        sampler = cfg.get("sampler", "class")
        records.append(Record(path=run.path, config=cfg, label=method_label(cfg["method"], sampler),
                              method=cfg["method"], sampler=sampler, dataset=cfg.get("dataset"), ipc=cfg["ipc"],
                              preset=cfg.get("preset"), seed=cfg.get("seed", 0), done=run.done, accs=accs,
                              sec_per_it=sec, sample_sec_per_it=sample, cum_seconds=cum, details=_details(cfg),
                              batch_mean=batch_mean, batch_min=batch_min, gw_real=gw_real))
    # runs of one sampler whose settings differ are told apart by those settings only
    by_label: dict = {}
    for r in records:
        by_label.setdefault(r.label, []).append(r)
    for label, rs in by_label.items():
        differ = [key for key, _ in rs[0].details if len({dict(r.details).get(key) for r in rs}) > 1]
        for r in rs:
            extra = " ".join(v for key, v in r.details if key in differ)
            if extra:
                r.label = f"{label} {extra}"
    return records


# --------------------------------------------------------------------------- #
# statistics
# --------------------------------------------------------------------------- #
def _sd(x) -> float | None:
    """Sample standard deviation (n - 1); None below two values."""
    return float(np.std(x, ddof=1)) if len(x) > 1 else None


@dataclass
class LabelStats:
    """One label's finished runs in a group, each seed at the label's final iteration."""
    label: str
    final_it: int | None
    runs: dict = field(default_factory=dict)          # seed -> Record
    seed_means: dict = field(default_factory=dict)    # seed -> mean over models at final_it
    mean: float | None = None                         # mean of the seed means
    sd: float | None = None                           # their std across seeds (n - 1)
    model_mean: float | None = None                   # every model of every seed pooled
    model_sd: float | None = None                     # std over those models (n)
    n_models: int = 0
    sec_per_it: float | None = None                   # mean over seeds
    sample_sec_per_it: float | None = None
    by_it: dict = field(default_factory=dict)         # iteration -> seed -> mean over models
    batch_mean: float | None = None                   # real images per class per draw: mean over seeds
    batch_min: int | None = None                      # the smallest draw of any seed
    gw_real: dict = field(default_factory=dict)       # tensor -> real gradient L2 norm, mean over seeds

    @property
    def seeds(self) -> list:
        return sorted(self.seed_means)


@dataclass
class Comparison:
    """A label against the baseline on the seeds both finished at the same final iteration."""
    label: str
    final_it: int | None
    d: dict = field(default_factory=dict)             # seed -> d_s (points)
    mean_d: float | None = None
    sd_d: float | None = None                         # n - 1
    se: float | None = None                           # sd_d / sqrt(n); None with one seed
    d_by_it: dict = field(default_factory=dict)       # iteration -> seed -> d_s there
    unpaired: dict = field(default_factory=dict)      # seed -> why it is not paired

    @property
    def n(self) -> int:
        return len(self.d)

    @property
    def gain(self) -> bool:
        return (self.mean_d is not None and self.se is not None and self.mean_d >= GAIN_POINTS
                and self.mean_d > GAIN_SE * self.se)


@dataclass
class Group:
    dataset: str
    ipc: int
    preset: str | None
    baseline: str
    stats: dict = field(default_factory=dict)         # label -> LabelStats, baseline first
    comparisons: dict = field(default_factory=dict)   # label -> Comparison (every label but the baseline)
    unfinished: list = field(default_factory=list)    # Records, never averaged
    not_counted: list = field(default_factory=list)   # (Record, why): finished but left out

    @property
    def key(self) -> tuple:
        return self.dataset, self.ipc, self.preset

    @property
    def counted(self) -> list:
        return [r for s in self.stats.values() for r in s.runs.values()]


def _order(baseline):
    sampler_rank = {name: i for i, name in enumerate(SAMPLERS)}

    def key(item):
        label, recs = item
        r = recs[0]
        # numbers in the label compare as numbers: k=5 before k=10, layer 2 before layer 10
        natural = [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", label)]
        return label != baseline, sampler_rank.get(r.sampler, len(sampler_rank)), r.method, natural
    return key


def _label_stats(label: str, recs: list, not_counted: list) -> LabelStats:
    finished = [r for r in recs if r.accs]
    not_counted += [(r, "no accuracies recorded") for r in recs if not r.accs]
    if not finished:
        return LabelStats(label, None)
    counts = Counter(r.last_it for r in finished)
    final = max(counts, key=lambda it: (counts[it], it))   # the most common final iteration; ties: the later
    st = LabelStats(label, final)
    for r in sorted(finished, key=lambda r: r.name):
        if r.last_it != final:
            not_counted.append((r, f"final iteration {r.last_it}, the label's is {final}"))
        elif r.seed in st.runs:
            not_counted.append((r, f"second finished run of seed {r.seed} (`{st.runs[r.seed].name}` counts)"))
        else:
            st.runs[r.seed] = r
    st.seed_means = {s: float(np.mean(r.accs[final])) for s, r in sorted(st.runs.items())}
    means = list(st.seed_means.values())
    st.mean, st.sd = float(np.mean(means)), _sd(means)
    pooled = [a for r in st.runs.values() for a in r.accs[final]]
    st.model_mean, st.model_sd, st.n_models = float(np.mean(pooled)), float(np.std(pooled)), len(pooled)
    secs = [r.sec_per_it for r in st.runs.values() if r.sec_per_it is not None]
    samp = [r.sample_sec_per_it for r in st.runs.values() if r.sample_sec_per_it is not None]
    st.sec_per_it = float(np.mean(secs)) if secs else None
    st.sample_sec_per_it = float(np.mean(samp)) if samp else None
    batches = [r.batch_mean for r in st.runs.values() if r.batch_mean is not None]
    st.batch_mean = float(np.mean(batches)) if batches else None
    st.batch_min = min((r.batch_min for r in st.runs.values() if r.batch_min is not None), default=None)
    tensors = [t for r in st.runs.values() for t in r.gw_real]
    st.gw_real = {t: float(np.mean([r.gw_real[t] for r in st.runs.values() if t in r.gw_real]))
                  for t in dict.fromkeys(tensors)}
    for s, r in sorted(st.runs.items()):
        for it, a in r.accs.items():
            st.by_it.setdefault(it, {})[s] = float(np.mean(a))
    st.by_it = dict(sorted(st.by_it.items()))
    return st


def _compare(st: LabelStats, base: LabelStats | None, baseline: str) -> Comparison:
    c = Comparison(st.label, st.final_it)
    for s in st.seeds:
        b = base.runs.get(s) if base is not None else None
        if b is None:
            c.unpaired[s] = f"no finished {baseline} run of seed {s}"
        elif b.last_it != st.final_it:
            c.unpaired[s] = f"{baseline}'s final iteration is {b.last_it}, not {st.final_it}"
        else:
            c.d[s] = st.seed_means[s] - base.seed_means[s]
            for it in st.runs[s].accs:
                if it in b.accs:
                    c.d_by_it.setdefault(it, {})[s] = st.by_it[it][s] - float(np.mean(b.accs[it]))
    c.d_by_it = dict(sorted(c.d_by_it.items()))
    if c.d:
        d = list(c.d.values())
        c.mean_d, c.sd_d = float(np.mean(d)), _sd(d)
        c.se = None if c.sd_d is None else c.sd_d / math.sqrt(len(d))
    return c


def paired(records, baseline: str = "DC") -> list[Group]:
    """Per (dataset, ipc, preset): each label's accuracy over seeds and its paired difference with the baseline."""
    groups: dict = {}
    for r in records:
        groups.setdefault((r.dataset, r.ipc, r.preset), []).append(r)
    out = []
    for (dataset, ipc, preset), recs in sorted(groups.items(), key=lambda g: (str(g[0][0]), g[0][1], str(g[0][2]))):
        g = Group(dataset, ipc, preset, baseline)
        g.unfinished = sorted((r for r in recs if not r.done), key=lambda r: r.name)
        by_label: dict = {}
        for r in recs:
            if r.done:
                by_label.setdefault(r.label, []).append(r)
        for label, rs in sorted(by_label.items(), key=_order(baseline)):
            g.stats[label] = _label_stats(label, rs, g.not_counted)
        base = g.stats.get(baseline)
        for label, st in g.stats.items():
            if label != baseline and st.final_it is not None:
                g.comparisons[label] = _compare(st, base, baseline)
        out.append(g)
    return out


# --------------------------------------------------------------------------- #
# markdown
# --------------------------------------------------------------------------- #
def _f(x, fmt=".2f") -> str:
    return DASH if x is None else format(x, fmt)


def _acc_cell(st: LabelStats) -> str:
    mean = f"{st.mean:.2f} ± {st.sd:.2f}" if st.sd is not None else f"{st.mean:.2f} (one seed)"
    return f"{mean} [models {st.model_mean:.2f} ± {st.model_sd:.2f}, n={st.n_models}], it {st.final_it}"


def _d_cell(c: Comparison | None) -> str:
    if c is None:
        return "baseline"
    if not c.d:
        return f"{DASH} (no paired seed)"
    if c.se is None:
        return f"{c.mean_d:+.2f} (n=1, no SE)"
    return f"{c.mean_d:+.2f} ± {c.se:.2f} (n={c.n})" + (" **gain**" if c.gain else "")


def _per_seed_cell(c: Comparison | None) -> str:
    if c is None:
        return DASH
    parts = [f"s{s}: {d:+.2f}" for s, d in c.d.items()]
    parts += [f"s{s}: unpaired ({why})" for s, why in c.unpaired.items()]
    return "; ".join(parts) or DASH


def _values(recs, key) -> str:
    vals = Counter(str(v) for v in (key(r) for r in recs))
    if len(vals) == 1:
        return next(iter(vals))
    return " / ".join(f"{v} ({n} run{'s' * (n > 1)})" for v, n in sorted(vals.items()))


def _protocol(g: Group) -> str:
    recs = g.counted
    cfgs = [r.config for r in recs]
    preset = f"preset `{g.preset}` (a reduced protocol)" if g.preset else "no preset (the published protocol)"
    its = _values(cfgs, lambda c: c.get("Iteration"))
    evals = _values(cfgs, lambda c: ", ".join(str(i) for i in c.get("eval_it") or []) or "?")
    models = _values(cfgs, lambda c: f"{c.get('num_eval')} × {c.get('num_exp')}")
    seen = _values(recs, lambda r: len(r.accs[r.last_it]))
    revs = Counter(str(c.get("git_revision", "unknown")) for c in cfgs)
    rev = ", ".join(f"`{v[:12]}{'+dirty' if v.endswith('+dirty') and len(v) > 12 else ''}` ({n})"
                    for v, n in sorted(revs.items()))
    return (f"Protocol (the runs' config.json): {preset}; {its} iterations; evaluation at iterations {evals}; "
            f"models per evaluation point num_eval × num_exp = {models} ({seen} accuracies at the final "
            f"iteration per run); model {_values(cfgs, lambda c: c.get('model', 'ConvNet'))}; "
            f"code revision(s): {rev}.")


def _weight_tensors(stats) -> list[str]:
    """Tensors with gradient norms, in network order, without the 1-D ones (biases, normalisation)."""
    from .plots import tensor_shapes
    names = list(dict.fromkeys(t for st in stats for t in st.gw_real))
    shapes = {}
    for st in stats:
        for r in st.runs.values():
            shapes = tensor_shapes(r.config) or {}
            break
        if shapes:
            break
    return [t for t in names if (len(shapes[t]) > 1 if t in shapes else not t.endswith(".bias"))]


def _diagnostics_lines(g: Group) -> list[str]:
    """Figures 6-7 as numbers: real batch sizes and the real gradient's L2 norm per weight tensor."""
    stats = [st for st in g.stats.values() if st.final_it is not None and (st.gw_real or st.batch_mean is not None)]
    if not stats:
        return []
    tensors = _weight_tensors(stats)
    lines = ["", "Real batches and real gradients (diagnostics.csv, every iteration; mean over seeds): real images "
                 "per class in one draw, mean (smallest), and the L2 norm of the real gradient of each weight "
                 "tensor of the matching network, mean over iterations:", "",
             "| sampler | real batch | " + " | ".join(f"`{t}`" for t in tensors) + " |",
             "|---|---|" + "---|" * len(tensors)]
    for st in stats:
        batch = DASH if st.batch_mean is None else f"{st.batch_mean:.1f} ({_f(st.batch_min, 'd')})"
        lines.append(f"| {st.label} | {batch} | " + " | ".join(_f(st.gw_real.get(t), ".3f") for t in tensors) + " |")
    return lines


def _so_far(r: Record) -> str:
    """``iteration 25: 35.29 ± 0.52 (10 models); ...`` for a run still going; – before its first evaluation."""
    return "; ".join(f"iteration {it}: {np.mean(a):.2f} ± {np.std(a):.2f} ({len(a)} models)"
                     for it, a in r.accs.items()) or DASH


def _group_lines(g: Group) -> list[str]:
    title = f"## {g.dataset}, ipc {g.ipc}, preset {g.preset or 'none'}"
    lines = [title, ""] + ([_protocol(g), ""] if g.counted else [])
    if g.stats:
        lines += ["| sampler | seeds | accuracy at final iteration (mean ± std over seed means) | "
                  f"d vs {g.baseline} (mean ± SE, n) | per-seed d | s/iteration | sample s/iteration |",
                  "|---|---|---|---|---|---|---|"]
        for label, st in g.stats.items():
            if st.final_it is None:
                continue
            c = g.comparisons.get(label)
            seeds = ", ".join(str(s) for s in st.seeds)
            lines.append(f"| {label} | {seeds} | {_acc_cell(st)} | {_d_cell(c)} | "
                         f"{_per_seed_cell(c)} | {_f(st.sec_per_it)} | {_f(st.sample_sec_per_it, '.3f')} |")
        its = sorted({it for st in g.stats.values() for it in st.by_it})
        if its:
            lines += ["", f"Accuracy at each evaluation iteration (mean over seeds of the mean over models, %; "
                          f"in brackets the mean paired d vs {g.baseline} there, and the seeds when fewer than "
                          f"the sampler's):", "",
                      "| sampler | " + " | ".join(f"it {it}" for it in its) + " |", "|---|" + "---|" * len(its)]
            for label, st in g.stats.items():
                if st.final_it is None:
                    continue
                c = g.comparisons.get(label)
                cells = []
                for it in its:
                    at = st.by_it.get(it)
                    if not at:
                        cells.append(DASH)
                        continue
                    cell = f"{np.mean(list(at.values())):.2f}"
                    if c is not None and c.d_by_it.get(it):
                        cell += f" ({np.mean(list(c.d_by_it[it].values())):+.2f})"
                    if len(at) < len(st.seeds):
                        cell += f" [n={len(at)}]"
                    cells.append(cell)
                lines.append(f"| {label} | " + " | ".join(cells) + " |")
        lines += _diagnostics_lines(g)
    else:
        lines.append("No finished run in this group.")
    if g.unfinished:
        lines += ["", "Running / not finished (accuracy at each iteration evaluated so far), not in the numbers "
                  "above:", ""]
        lines += [f"- `{r.name}` ({r.label}, seed {r.seed}): {_so_far(r)}" for r in g.unfinished]
    if g.not_counted:
        lines += ["", "Finished but not counted:", ""]
        lines += [f"- `{r.name}` ({r.label}, seed {r.seed}): {why}" for r, why in g.not_counted]
    return lines + [""]


def render_markdown(records, save_paths=(), baseline: str = "DC", figures=()) -> str:
    """The study's tables: one per (dataset, ipc, preset), then accuracy per evaluation iteration."""
    groups = paired(records, baseline)
    n_done = sum(len(g.counted) for g in groups)
    where = ", ".join(f"`{p}`" for p in save_paths) or "the given folders"
    lines = ["# The sampler study: each real-batch sampler against DC on paired seeds", "",
             f"Written by `python reproduce.py study` from {n_done} finished run(s) under {where} "
             f"(results/samplers.md pins the protocol).", "",
             f"- d_s = mean accuracy of the sampler's models − mean accuracy of {baseline}'s models, same seed and "
             f"iteration (points, %). Mean d ± SE, SE = sd(d) / √n with sd over seeds (n − 1); a seed counts only "
             f"when both runs finished at the same final iteration.",
             "- Accuracy: mean ± std (n − 1) over the seeds' means at the final iteration (it); in square brackets "
             "every model of every seed pooled, mean ± std (n).",
             "- s/iteration, sample s/iteration: from diagnostics.csv, `sample_seconds` (drawing the real batches) "
             "as a mean over iterations, `seconds` (one condensation step with its sampling, evaluation excluded) "
             "as the median of the step without its sampling plus that mean; mean over seeds; "
             f"{DASH} where a run's file has no such column.",
             f"- Rule (results/samplers.md, fixed before any seed ran): a gain counts when mean d ≥ "
             f"{GAIN_POINTS:g} point and mean d > {GAIN_SE:g} SE (marked **gain**).", ""]
    if not groups:
        lines += ["No run directories found.", ""]
    for g in groups:
        lines += _group_lines(g)
    if figures:
        lines += ["## Figures", ""] + [f"- `{p}`" for p in figures] + [""]
    return "\n".join(lines)


# --------------------------------------------------------------------------- #
# figures
# --------------------------------------------------------------------------- #
def plot(records, out_dir: str, baseline: str = "DC") -> list[str]:
    """Per (dataset, ipc): accuracy vs iteration and vs cumulative condensation time, one line per sampler."""
    from .plots import _colors, _pyplot, _save
    plt = _pyplot()
    by_fig: dict = {}
    for g in paired(records, baseline):
        by_fig.setdefault((g.dataset, g.ipc), []).append(g)
    paths = []
    for (dataset, ipc), groups in sorted(by_fig.items(), key=lambda f: (str(f[0][0]), f[0][1])):
        lines = []
        several = len(groups) > 1
        for g in groups:
            for label, st in g.stats.items():
                if st.by_it:
                    lines.append((f"{label} [{g.preset or 'none'}]" if several else label, st))
        if not lines:
            continue
        fig, (ax_it, ax_t) = plt.subplots(1, 2, figsize=(12, 4.5))
        for (name, st), color in zip(lines, _colors(len(lines))):
            its = list(st.by_it)
            means = [float(np.mean(list(st.by_it[it].values()))) for it in its]
            sds = [_sd(list(st.by_it[it].values())) or 0.0 for it in its]
            n = len(st.seeds)
            ax_it.errorbar(its, means, yerr=sds, marker="o", capsize=3, color=color,
                           label=f"{name} ({n} seed{'s' * (n != 1)})")
            timed = [(it, [st.runs[s].cum_seconds[it] for s in st.by_it[it] if it in st.runs[s].cum_seconds])
                     for it in its]
            timed = [(it, ts) for it, ts in timed if ts]
            if timed:
                k = [its.index(it) for it, _ in timed]
                ax_t.errorbar([float(np.mean(ts)) for _, ts in timed], [means[i] for i in k],
                              yerr=[sds[i] for i in k], marker="o", capsize=3, color=color, label=name)
        presets = sorted({str(g.preset) for g in groups if g.preset})
        suffix = f" - preset {'/'.join(presets)} (reduced protocol)" if presets else ""
        ax_it.set(xlabel="iteration", ylabel="test accuracy (%)",
                  title=f"{dataset}, {ipc} ipc{suffix}: mean over seeds ± std")
        ax_t.set(xlabel="condensation seconds (cumulative, evaluation excluded)", ylabel="test accuracy (%)",
                 title="accuracy against time spent")
        for ax in (ax_it, ax_t):
            ax.grid(alpha=0.3)
            if ax.lines or ax.collections:
                ax.legend(fontsize=8)
        paths.append(_save(fig, os.path.join(out_dir, f"study_{dataset}_ipc{ipc}.png")))
    for g in paired(records, baseline):
        paths += grad_figures(g, out_dir)
    return paths


def grad_figures(g: Group, out_dir: str, smooth: int = 10) -> list[str]:
    """Figures 6 and 7 for every sampler: per seed, the real and synthetic gradient norms per layer (bars)
    and over iterations (lines, moving average of ``smooth``), one bar or line per sampler."""
    from .plots import grad_norm_figure, grad_norm_lines_figure, load_run
    seeds = sorted({s for st in g.stats.values() for s in st.runs})
    paths = []
    for seed in seeds:
        runs = []
        for label, st in g.stats.items():
            r = st.runs.get(seed)
            if r is not None and r.gw_real:
                run = load_run(r.path)
                run.label = label
                runs.append(run)
        if not runs:
            continue
        stem = os.path.join(out_dir, f"study_{g.dataset}_ipc{g.ipc}_{g.preset or 'none'}_s{seed}")
        paths.append(grad_norm_figure(runs, f"{stem}_grad_norms.png"))
        paths.append(grad_norm_lines_figure(runs, f"{stem}_grad_norms_iter.png", smooth=smooth))
    return paths
