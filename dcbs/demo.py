"""The whole method in a few minutes on scikit-learn's digits (``python reproduce.py demo``).

It runs, as subprocesses, the commands a user runs, into one folder (``--save_path``):

1. ``main_cluster.py``: trains a small ConvNet extractor on digits, takes its layer-2
   features and splits every class into k size-constrained clusters (``--norm``), with
   the Figure 2 view of one class;
2. ``main.py`` (DC) and ``main_BS.py`` (BS(DC)) under the same reduced protocol and seed
   (``--preset demo``, real batches of 64, evaluated at the last iteration); DC starts
   alongside the clustering, BS(DC) once its clusters exist, each process on
   ``--num_threads`` threads;
3. ``plot_runs.py``: real and synthetic gradient norms per layer, matching loss and
   both synthetic sets;

then prints DC vs BS(DC) (mean ± std over the evaluation models) and the figures.
The same command again reuses what is finished (the cluster file, ``DONE`` runs),
continues an interrupted run from its checkpoint, and refuses a folder that holds
a demo made with other settings. ``--smoke`` is the same pipeline in seconds
(``--preset smoke``, an extractor of two steps), for the tests.
"""
from __future__ import annotations

import fcntl
import json
import os
import re
import signal
import subprocess
import time
from dataclasses import asdict, dataclass

__all__ = ["DemoError", "DemoSettings", "plan_commands", "run_demo"]

DATASET, MODEL, LAYER = "digits", "ConvNet", 2
# real batches of 64 (256 would be a whole ~125-image class) and one evaluation, at the end: minutes on 2 cores
FULL = dict(preset="demo", extractor=["--extractor_epochs", "3"], runs=["--batch_real", "64"])
# a test of the pipeline, not a result: tiny batches everywhere
SMOKE = dict(preset="smoke", extractor=["--extractor_epochs", "1", "--max_steps", "2", "--extractor_batch", "32",
                                        "--embedding", "pca"], runs=["--batch_real", "16"])
RUN_NAMES = {"DC": "DC", "BS": "BS"}
MANIFEST = "demo.json"
HEARTBEAT_S = 30
AGAIN = "finished steps are reused, interrupted runs resume from their checkpoints"


class DemoError(RuntimeError):
    """The demo cannot start or go on; the message says what to do."""


@dataclass(frozen=True)
class DemoSettings:
    save_path: str = os.path.join("results", "demo")
    num_cluster: int = 5
    seed: int = 0
    smoke: bool = False
    num_threads: int = 1
    device: str = "auto"

    @property
    def mode(self) -> dict:
        return SMOKE if self.smoke else FULL

    def result_keys(self) -> dict:
        """What decides the demo's numbers; a folder made with other values is refused."""
        return {"smoke": self.smoke, "num_cluster": self.num_cluster, "seed": self.seed}


# --------------------------------------------------------------------------- the commands
def _paths(s: DemoSettings) -> dict:
    from .clusters import cluster_file_name
    ck = os.path.join(s.save_path, "checkpoints")
    runs = os.path.join(s.save_path, "runs")
    stem = os.path.splitext(cluster_file_name(DATASET, s.num_cluster, LAYER, True, model=MODEL))[0]
    return {"checkpoints": ck, "clusters": os.path.join(s.save_path, "clusters"), "runs": runs,
            "figures": os.path.join(s.save_path, "figures"), "logs": os.path.join(s.save_path, "logs"),
            "cluster_file": os.path.join(ck, stem + ".pt"), "cluster_stem": stem,
            "extractor": os.path.join(ck, f"{MODEL}_{DATASET}.pt"),
            "DC": os.path.join(runs, RUN_NAMES["DC"]), "BS": os.path.join(runs, RUN_NAMES["BS"])}


def _tail(s: DemoSettings) -> list[str]:
    return ["--num_threads", str(s.num_threads), "--device", s.device]


def plan_commands(s: DemoSettings) -> dict[str, list[str]]:
    """The fresh command line (``[script, arg, ...]``) of every step, as a user would type it."""
    p = _paths(s)
    cluster = ["main_cluster.py", "--dataset", DATASET, "--model", MODEL, "--layer_idx", str(LAYER),
               "--num_cluster", str(s.num_cluster), "--norm", "--cluster_path", p["checkpoints"],
               "--results_path", p["clusters"], "--seed", str(s.seed), *s.mode["extractor"], *_tail(s)]
    from .config import PRESETS
    last = str(PRESETS[s.mode["preset"]]["Iteration"])
    common = ["--preset", s.mode["preset"], *s.mode["runs"], "--eval_it", last, "--save_path", p["runs"],
              "--seed", str(s.seed)]
    dc = ["main.py", *common, "--run_name", RUN_NAMES["DC"], *_tail(s)]
    bs = ["main_BS.py", *common, "--run_name", RUN_NAMES["BS"], "--cluster_model", MODEL, "--layer_idx", str(LAYER),
          "--num_cluster", str(s.num_cluster), "--norm", "--cluster_path", p["checkpoints"], *_tail(s)]
    plot = ["plot_runs.py", p["DC"], p["BS"], "--out", p["figures"], "--name", "dc_vs_bs"]
    return {"cluster": cluster, "DC": dc, "BS": bs, "plot": plot}


def _cluster_step(s: DemoSettings, argv: list[str]) -> tuple[str, list[str] | None]:
    """(state, command): the cluster file is reused; an interrupted extractor training continues."""
    from .extractor import partial_path
    p = _paths(s)
    if os.path.isfile(p["cluster_file"]):
        return "done", None
    if not os.path.isfile(p["extractor"]) and os.path.exists(partial_path(p["extractor"])):
        return "resume", argv + ["--train_extractor", "--resume"]
    return "new", argv


def _run_step(s: DemoSettings, name: str, argv: list[str]) -> tuple[str, list[str] | None]:
    """(state, command) of a condensation run, as the sweep decides it (``sweep.condense_state``)."""
    from .rundir import lock_holder
    from .sweep import condense_state, move_stale
    path = _paths(s)[name]
    state = condense_state(path)
    if state == "done":
        return state, None
    if state == "running":
        raise DemoError(f"{path} is being written by {lock_holder(path)}; wait for it, or give this demo "
                        f"another --save_path")
    if state == "resume":
        return state, [argv[0], "--resume", path, *_tail(s)]
    if state == "restart":       # stopped before its first checkpoint: nothing to continue
        move_stale(path, _paths(s)["runs"])
    return state, argv


# --------------------------------------------------------------------------- the folder
def _claim_folder(s: DemoSettings) -> tuple[int, dict | None]:
    """Locks ``save_path`` for this process, checks that it holds nothing but this demo; (lock, its demo.json)."""
    os.makedirs(s.save_path, exist_ok=True)
    fd = os.open(os.path.join(s.save_path, ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise DemoError(f"another demo is writing {s.save_path}; wait for it, or pass another --save_path") from None
    manifest, doc = os.path.join(s.save_path, MANIFEST), None
    if os.path.isfile(manifest):
        try:
            with open(manifest, encoding="utf-8") as f:
                doc = json.load(f)
            had = doc["settings"]
        except (OSError, json.JSONDecodeError, KeyError, TypeError):
            had = None
        if not isinstance(had, dict):
            os.close(fd)
            raise DemoError(f"{manifest} cannot be read; remove {s.save_path} or pass another --save_path")
        diff = [f"{k}={had.get(k)!r}" for k, v in s.result_keys().items() if had.get(k) != v]
        if diff:
            os.close(fd)
            raise DemoError(f"--save_path {s.save_path} holds a demo made with {', '.join(diff)}; pass another "
                            f"--save_path (or remove {s.save_path}) to run it with these settings")
    elif set(os.listdir(s.save_path)) - {".lock"}:
        os.close(fd)
        raise DemoError(f"--save_path {s.save_path} exists and holds no demo ({MANIFEST} is missing); "
                        f"pass an empty or new folder")
    return fd, doc


def _write_manifest(s: DemoSettings, doc: dict) -> None:
    from .io import atomic_write_json
    atomic_write_json(os.path.join(s.save_path, MANIFEST), doc)


# --------------------------------------------------------------------------- running
def _display(argv: list[str]) -> str:
    from .sweep import display
    return display(argv)


def _last_line(path: str) -> str:
    """The last progress line of a log (tqdm redraws with carriage returns)."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.path.getsize(path) - 4096))
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return ""
    parts = [p.strip() for p in text.replace("\r", "\n").split("\n") if p.strip()]
    return re.sub(r"^\d{4}-\d\d-\d\d ", "", parts[-1])[:110] if parts else ""


class _Jobs:
    """Subprocesses with their output in one log file each; a status line every HEARTBEAT_S seconds."""

    def __init__(self, log_dir: str, num_threads: int, say):
        self.log_dir, self.say, self.procs = log_dir, say, {}
        # two processes share the cores: numpy's and scikit-learn's OpenMP threads too
        self.env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", str(num_threads)))
        self.t0 = time.time()

    def start(self, name: str, argv: list[str]) -> None:
        from .sweep import full_argv
        os.makedirs(self.log_dir, exist_ok=True)
        log = os.path.join(self.log_dir, f"{name}.log")
        with open(log, "ab") as f:
            f.write(f"\n$ {_display(argv)}\n".encode())
            f.flush()
            # its own process group: Ctrl-C reaches the demo only, which passes one SIGINT on (a second aborts a run)
            proc = subprocess.Popen(full_argv(argv), cwd=os.getcwd(), stdout=f, stderr=subprocess.STDOUT,
                                    env=self.env, start_new_session=True)
        self.procs[name] = (proc, log, time.time())
        self.say(f"  start {name}: {_display(argv)}\n        (log: {log})")

    def wait(self, *names: str) -> dict[str, int]:
        """Waits for ``names``; returns their exit codes as they end (others keep running)."""
        left, codes, beat = set(names), {}, time.time()
        while left:
            for n in sorted(left):
                proc, log, t = self.procs[n]
                rc = proc.poll()
                if rc is not None:
                    left.discard(n)
                    codes[n] = rc
                    self.say(f"  {'done' if rc == 0 else f'FAILED (exit {rc})'} {n} in {time.time() - t:.0f} s")
            if left and time.time() - beat >= HEARTBEAT_S:
                beat = time.time()
                for n in sorted(p for p, (proc, _, _) in self.procs.items() if proc.poll() is None):
                    self.say(f"  [{time.time() - self.t0:4.0f} s] {n}: {_last_line(self.procs[n][1])}")
            if left:
                time.sleep(0.5)
        return codes

    def stop_all(self) -> None:
        """SIGINT to every running child (the runs checkpoint on it), then wait for them."""
        for proc, _, _ in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
        for proc, _, _ in self.procs.values():
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()

    def printed(self, name: str, suffix: str) -> list[str]:
        """The lines ending in ``suffix`` that the last command of ``name`` printed (paths of its files)."""
        with open(self.procs[name][1], encoding="utf-8", errors="replace") as f:
            last = f.read().rsplit("\n$ ", 1)[-1].splitlines()[1:]
        return [ln.strip() for ln in last if ln.strip().endswith(suffix)]

    def failure(self, name: str) -> str:
        _, log, _ = self.procs[name]
        try:
            with open(log, encoding="utf-8", errors="replace") as f:
                lines = [ln.rstrip() for ln in f.read().replace("\r", "\n").split("\n") if ln.strip()]
        except OSError:
            lines = []
        return "\n".join([f"{name} failed; the end of its log {log}:", *("    " + ln for ln in lines[-12:])])


# --------------------------------------------------------------------------- the table and the figures
def _accuracies(run_path: str) -> tuple[dict, dict]:
    """(config, {iteration: [accuracy of each ConvNet model]}) of a finished run."""
    from .config import load_run_config
    cfg = load_run_config(run_path) or {}
    with open(os.path.join(run_path, "accuracies.json"), encoding="utf-8") as f:
        acc = json.load(f)
    arch = cfg.get("model", MODEL)
    by_it: dict[int, list] = {}
    for per in acc.values():
        for it, archs in per.items():
            by_it.setdefault(int(it), []).extend(float(a) for a in archs.get(arch, []))
    return cfg, dict(sorted(by_it.items()))


def _fmt(accs) -> str:
    import numpy as np
    a = 100 * np.asarray(accs, dtype=np.float64)
    return f"{a.mean():.2f} ± {a.std():.2f} (n={len(a)})"


def result_table(s: DemoSettings) -> tuple[list[str], list[dict]]:
    """The printed table (markdown lines) and its rows (for demo.json)."""
    p = _paths(s)
    dc_cfg, dc = _accuracies(p["DC"])
    bs_cfg, bs = _accuracies(p["BS"])
    its = sorted(set(dc) | set(bs))
    c = dc_cfg
    epochs = sorted({int(e) for e in (c.get("eval_epochs") or {}).values()}) or [c.get("epoch_eval_train")]
    head = (f"DC vs Batch Sampling on {c.get('dataset')}, {c.get('model')}, ipc {c.get('ipc')}, "
            f"seed {c.get('seed')}: test accuracy (%), mean ± std over n models")
    proto = (f"reduced protocol (--preset {c.get('preset')}: {c.get('Iteration')} iterations, real batches of "
             f"{c.get('batch_real')}, {c.get('num_exp')} experiment(s) x {c.get('num_eval')} models, "
             f"{'/'.join(map(str, epochs))} evaluation epochs); "
             f"BS(DC): k = {s.num_cluster} clusters per class of {MODEL} layer-{LAYER} features, --norm")
    label = f"BS(DC) k={s.num_cluster}, layer {LAYER}, norm"
    lines = [head, proto, "",
             "| method | " + " | ".join(f"iteration {i}{' (noise)' if i == 0 else ''}" for i in its) + " |",
             "|---" * (len(its) + 1) + "|"]
    rows = []
    for name, accs in (("DC", dc), (label, bs)):
        lines.append(f"| {name} | " + " | ".join(_fmt(accs[i]) if accs.get(i) else "-" for i in its) + " |")
        rows.append({"method": name, "accuracy": {str(i): accs.get(i, []) for i in its}})
    return lines, rows


def figures(s: DemoSettings, plotted: list[str]) -> list[tuple[str, str]]:
    """(what, path) of every figure the demo drew, for the summary."""
    p = _paths(s)
    out = []
    try:
        with open(os.path.join(p["clusters"], f"{p['cluster_stem']}_config.json"), encoding="utf-8") as f:
            cluster_figs = json.load(f).get("figures", [])
    except (OSError, json.JSONDecodeError):
        cluster_figs = []
    for f in cluster_figs:
        out.append(("clusters, one class (Figure 2 view)" if f.endswith("_clusters.png")
                    else "clusters, one class's features in 2-D", f))
    for name, what in (("DC", "synthetic images, DC"), ("BS", "synthetic images, BS(DC)")):
        grids = [g for g in os.listdir(p[name]) if g.startswith("grid_exp0_it") and g.endswith(".png")]
        if grids:
            last = max(grids, key=lambda g: int(g[len("grid_exp0_it"):-len(".png")]))
            out.append((what, os.path.join(p[name], last)))
    kinds = {"_grad_norms.png": "gradient norms per layer, real vs synthetic",
             "_grad_norms_iter.png": "gradient norms per layer over iterations",
             "_loss.png": "matching loss", "_synthetic.png": "synthetic images side by side"}
    for f in plotted:
        what = next((v for k, v in kinds.items() if f.endswith(k)), "figure")
        out.append((what, f))
    return out


# --------------------------------------------------------------------------- the demo
def _say(line: str) -> None:
    print(line, flush=True)     # the status lines arrive as they happen, also through a pipe


def run_demo(s: DemoSettings, say=_say) -> int:
    """Runs (or finishes) the demo; returns the exit status (0 done, 1 a step failed, 130 interrupted)."""
    if s.num_cluster < 1 or s.num_threads < 1:
        raise DemoError("--num_cluster and --num_threads must be at least 1")
    t0 = time.time()
    fd, doc = _claim_folder(s)
    try:
        return _run(s, say, t0, doc)
    finally:
        os.close(fd)


def _run(s: DemoSettings, say, t0, doc: dict | None) -> int:
    p = _paths(s)
    fresh = plan_commands(s)
    steps = {"cluster": _cluster_step(s, fresh["cluster"]), "DC": _run_step(s, "DC", fresh["DC"]),
             "BS": _run_step(s, "BS", fresh["BS"])}
    # one entry per invocation, so that a later one that only reuses does not hide the one that ran
    doc = doc or {"format": "dcbs-demo-v1", "settings": asdict(s), "invocations": []}
    doc["commands"] = [fresh[k] for k in ("cluster", "DC", "BS", "plot")]
    entry = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "num_threads": s.num_threads, "device": s.device,
             "ran": [argv for _, argv in steps.values() if argv], "finished": None}
    doc["invocations"].append(entry)
    _write_manifest(s, doc)
    mode = "smoke test" if s.smoke else "demo"
    say(f"Batch Sampling {mode} on scikit-learn's digits into {s.save_path} (seed {s.seed}, "
        f"{s.num_threads} thread(s) per process)")
    for name, (state, argv) in steps.items():
        if argv is None:
            say(f"  reuse {name}: finished before ({p['cluster_file'] if name == 'cluster' else p[name]})")
    jobs = _Jobs(p["logs"], s.num_threads, say)
    try:
        for name in ("cluster", "DC"):        # DC needs no clusters: it starts at once
            if steps[name][1]:
                jobs.start(name, steps[name][1])
        if steps["cluster"][1]:
            rc = jobs.wait("cluster")["cluster"]
            if rc != 0:
                say(jobs.failure("cluster"))
                jobs.stop_all()
                return _failed(s, say)
        if steps["BS"][1]:
            jobs.start("BS", steps["BS"][1])
        codes = jobs.wait(*[n for n in ("DC", "BS") if steps[n][1]])
        bad = [n for n, rc in codes.items() if rc != 0]
        if bad:
            for n in bad:
                say(jobs.failure(n))
            return _failed(s, say)
        jobs.start("plot", fresh["plot"])
        if jobs.wait("plot")["plot"] != 0:
            say(jobs.failure("plot"))
            return _failed(s, say)
    except KeyboardInterrupt:
        jobs.stop_all()
        say(f"interrupted: the same command again continues ({AGAIN})")
        return 130
    plotted = jobs.printed("plot", ".png")
    lines, rows = result_table(s)
    figs = figures(s, plotted)
    wall = time.time() - t0
    say("")
    for ln in lines:
        say(ln)
    say("")
    say("figures:")
    width = max(len(w) for w, _ in figs)
    for what, path in figs:
        say(f"  {what.ljust(width)}  {path}")
    minutes, seconds = divmod(int(round(wall)), 60)
    say(f"\n{mode} finished in {minutes} min {seconds} s; the commands it ran and the table: "
        f"{os.path.join(s.save_path, MANIFEST)}")
    entry.update(finished=time.strftime("%Y-%m-%d %H:%M:%S"), wall_s=round(wall, 1), table=lines, rows=rows,
                 figures=[{"what": w, "path": f} for w, f in figs])
    _write_manifest(s, doc)
    return 0


def _failed(s: DemoSettings, say) -> int:
    say(f"the demo stopped; the same command again retries what did not finish ({AGAIN})")
    return 1
