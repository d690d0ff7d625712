"""The paper's study as a list of command lines: grids -> cells -> waves of jobs -> executors.

    Table 1  DC, DSA, BS(DC) (k = 20, layer 3)            x ipc 1/10/50
    Table 2  BS(DC) k in 5/10/15/20/25, layer 2, and DC    x ipc 1/10/50
    Table 3  BS(DC) layer 0/1/2/3, k = 20, and DC          x ipc 1/10/50

Every Batch Sampling cell reads clusters made with ``--norm`` (KMeansConstrained,
margin 50), as the paper did, so the plan holds the ``main_cluster.py`` jobs those
cells need. A cell is one command line of ``main.py`` / ``main_BS.py`` /
``main_cluster.py`` with a deterministic run name; a cell shared by several tables
(DC in all three, BS k=20 layer 3 in Tables 1 and 3, k=20 layer 2 in Tables 2 and 3)
is one run.

Order (waves; a wave starts when the one before it has finished):
    1. the first clustering job, alone, when it must train the feature extractor;
    2. the other clustering jobs;
    3. every condensation cell (a Batch Sampling cell whose clustering failed is skipped).

Re-running the same command skips finished runs (``DONE``) and finished cluster files,
skips a run another process is writing (its ``.lock`` is held: ``dcbs.rundir.is_locked``),
continues an unfinished run from its checkpoint (``--resume``), and starts again a run
that stopped before its first checkpoint (its directory is moved to ``.stale/``).

Executors: ``inline`` (one subprocess after another), ``local`` (submitit's
LocalExecutor, N at once) and ``slurm`` (submitit's SlurmExecutor, each wave one job
array). Imports of torch and of submitit happen inside functions only.
"""
from __future__ import annotations

import hashlib
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field

from .cmdline import ConfigError
from .config import load_run_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IPCS = (1, 10, 50)
BS_NORM_MARGIN = 50          # the paper's --norm clusters: sizes within n_c // k +- 50
DEFAULT_CLUSTER_MODEL = "ResNet18"

# table -> its cells (method, k, layer) before the ipc axis; method "BS" is BS(DC) with --norm clusters
TABLES = {
    "table1": [("DC", None, None), ("DSA", None, None), ("BS", 20, 3)],
    "table2": [("BS", k, 2) for k in (5, 10, 15, 20, 25)] + [("DC", None, None)],
    "table3": [("BS", 20, layer) for layer in (0, 1, 2, 3)] + [("DC", None, None)],
    # which real batch helps gradient matching (results/samplers.md): every sampler on DC, layer-3 features
    "samplers": [("DC", None, None), ("BS", 20, 3), ("STRAT", None, 3), ("DREAM", None, 3), ("PRUNE", None, None),
                 ("SYS", None, 3)],
}
PAPER_TABLES = ("table1", "table2", "table3")
# sweep method -> --sampler (every sampler cell condenses with DC)
SAMPLER_OF = {"BS": "cluster", "STRAT": "stratified", "DREAM": "representative", "PRUNE": "pruned",
              "SYS": "systematic"}
SPREAD_K = 256               # stratified / representative / systematic: a cluster per image of --batch_real's default
TABLE_TITLES = {
    "table1": "Table 1: DC, DSA and Batch Sampling (BS(DC), k = 20, layer 3)",
    "table2": "Table 2: number of clusters k (BS(DC), features from layer 2)",
    "table3": "Table 3: feature layer (BS(DC), k = 20)",
    "samplers": "Real-batch samplers on DC (class, cluster, stratified, representative, pruned, systematic)",
}
# flags the sweep sets itself; passing them after `--` would make the run names lie
OWN_FLAGS = {"--method", "--dataset", "--data_path", "--ipc", "--save_path", "--run_name", "--seed", "--preset",
             "--resume", "--num_cluster", "--layer_idx", "--norm", "--margin", "--cluster_model", "--cluster_path",
             "--cluster_file", "--num_threads", "--device", "--load_syn"}


class SweepError(ConfigError):
    """A sweep that cannot be planned as asked; the message says what to change."""


# --------------------------------------------------------------------------- #
# the grid
# --------------------------------------------------------------------------- #
@dataclass(frozen=True)
class Cell:
    """One condensation result of a table: method DC / DSA / BS (k clusters from ``layer``) at ``ipc``."""
    method: str
    ipc: int
    k: int | None = None
    layer: int | None = None

    @property
    def sampler(self) -> str:
        return SAMPLER_OF.get(self.method, "class")


def select_cells(tables, ipcs=None, ks=None, layers=None, methods=None) -> dict[Cell, list[str]]:
    """Cells of ``tables`` (in table order, shared cells once) -> the tables they appear in.

    ``ipcs`` / ``ks`` / ``layers`` / ``methods`` restrict the grid; a value that is in
    none of the chosen tables' grids, or a restriction that leaves nothing, is refused.
    """
    def check(name, given, allowed):
        bad = sorted(set(given or ()) - set(allowed))
        if bad:
            raise SweepError(f"--{name} {' '.join(map(str, bad))}: not in the grid of {', '.join(tables)} "
                             f"(values: {' '.join(map(str, sorted(allowed)))})")
    check("ipc", ipcs, IPCS)
    bs = [c for t in tables for c in TABLES[t] if c[0] == "BS"]
    check("k", ks, {c[1] for c in bs})
    check("layers", layers, {c[2] for c in bs})
    check("methods", methods, {c[0] for t in tables for c in TABLES[t]})
    out: dict[Cell, list[str]] = {}
    for t in tables:
        for method, k, layer in TABLES[t]:
            if methods and method not in methods:
                continue
            if method == "BS" and ((ks and k not in ks) or (layers and layer not in layers)):
                continue
            for ipc in IPCS:
                if ipcs and ipc not in ipcs:
                    continue
                out.setdefault(Cell(method, ipc, k, layer), []).append(t)
    if not out:
        raise SweepError(f"the restrictions leave no cell of {', '.join(tables)}: loosen --ipc/--k/--layers/--methods")
    return out


# --------------------------------------------------------------------------- #
# settings shared by every cell, names and command lines
# --------------------------------------------------------------------------- #
@dataclass(frozen=True)
class Settings:
    dataset: str
    data_path: str = "data"
    save_path: str = os.path.join("results", "sweep")
    cluster_path: str = "checkpoints"
    cluster_model: str = DEFAULT_CLUSTER_MODEL
    margin: int = BS_NORM_MARGIN   # the paper's; small datasets (digits) need less
    preset: str | None = None
    seed: int = 0
    num_threads: int | None = None
    device: str | None = None
    extra: tuple = ()              # flags after `--`, for main.py / main_BS.py
    cluster_args: tuple = ()       # extra flags for every main_cluster.py job
    train_extractor: bool = False
    extractor_args: tuple = ()     # extra flags for the job that trains the extractor


def check_extra(extra) -> None:
    own = sorted({a.split("=")[0] for a in extra if a.split("=")[0] in OWN_FLAGS})
    if own:
        raise SweepError(f"{' '.join(own)} after '--': the sweep sets these itself (use reproduce.py's own options)")


# flags after -- that do not change what a run computes: they leave its name (and so the cell) alone
NAME_FREE_FLAGS = {"--ckpt_every"}


def _naming_extra(extra) -> list:
    """The flags after -- that name a run: ``extra`` without NAME_FREE_FLAGS and their values."""
    out, skip = [], False
    for a in extra:
        if skip:
            skip = False
        elif a in NAME_FREE_FLAGS:
            skip = True
        elif a.split("=")[0] not in NAME_FREE_FLAGS:
            out.append(a)
    return out


def run_name(cell: Cell, s: Settings, legacy: bool = False) -> str:
    """``DC_CIFAR10_ipc1_cpu_s0``, ``BS-DC_k20_l3_norm_CIFAR10_ipc10_full_s0`` (+ ``_x<hash>`` with flags after --
    that change what the run computes; ``legacy``: hash every flag after --, as names were made before)."""
    model = "" if s.cluster_model == DEFAULT_CLUSTER_MODEL else f"_{s.cluster_model}"
    if cell.method in ("STRAT", "DREAM", "SYS"):
        m = f"{cell.method}-DC_l{cell.layer}{model}"
    elif cell.method == "PRUNE":
        m = f"PRUNE-DC{model}"
    elif cell.sampler == "cluster":
        m = f"BS-DC_k{cell.k}_l{cell.layer}_norm" + ("" if s.margin == BS_NORM_MARGIN else f"_m{s.margin}") \
            + ("" if s.cluster_model == DEFAULT_CLUSTER_MODEL else f"_{s.cluster_model}")
    else:
        m = cell.method
    name = f"{m}_{s.dataset}_ipc{cell.ipc}_{s.preset or 'full'}_s{s.seed}"
    extra = list(s.extra) if legacy else _naming_extra(s.extra)
    if extra:
        name += "_x" + hashlib.sha256(" ".join(extra).encode()).hexdigest()[:8]
    return name


def _common_tail(s: Settings) -> list[str]:
    tail = []
    if s.num_threads:
        tail += ["--num_threads", str(s.num_threads)]
    if s.device:
        tail += ["--device", s.device]
    return tail


def condense_argv(cell: Cell, s: Settings, resume_dir: str | None = None) -> list[str]:
    script = "main_BS.py" if cell.sampler == "cluster" else "main.py"
    if resume_dir:
        return [script, "--resume", resume_dir] + _common_tail(s)
    argv = [script, "--method", "DC" if cell.sampler != "class" else cell.method, "--dataset", s.dataset,
            "--data_path", s.data_path, "--ipc", str(cell.ipc), "--save_path", s.save_path,
            "--run_name", run_name(cell, s), "--seed", str(s.seed)]
    if s.preset:
        argv += ["--preset", s.preset]
    if cell.sampler not in ("class", "cluster"):
        argv += ["--sampler", cell.sampler, "--cluster_model", s.cluster_model, "--cluster_path", s.cluster_path]
        if cell.layer is not None:
            argv += ["--layer_idx", str(cell.layer)]
    if cell.sampler == "cluster":
        argv += ["--num_cluster", str(cell.k), "--layer_idx", str(cell.layer), "--norm",
                 "--cluster_model", s.cluster_model, "--cluster_path", s.cluster_path]
        if s.margin != BS_NORM_MARGIN:
            argv += ["--margin", str(s.margin)]
    return argv + _common_tail(s) + list(s.extra)


def cluster_file(s: Settings, k: int, layer: int) -> str:
    from .clusters import cluster_file_name
    return os.path.join(s.cluster_path, cluster_file_name(s.dataset, k, layer, True, model=s.cluster_model,
                                                          margin=s.margin))


def sampler_file_job(cell: Cell, s: Settings) -> tuple[str, list[str]] | None:
    """(file, main_cluster.py argv) that a stratified / systematic / representative / pruned cell reads; None for
    the others (stratified and systematic read the same file)."""
    from .clusters import cluster_file_name
    from .selection import partition_file_name, score_file_name
    base = ["main_cluster.py", "--dataset", s.dataset, "--data_path", s.data_path, "--model", s.cluster_model,
            "--cluster_path", s.cluster_path, "--results_path", os.path.join(s.save_path, "clusters")]
    if cell.sampler in ("stratified", "systematic"):
        name = cluster_file_name(s.dataset, SPREAD_K, cell.layer, False, model=s.cluster_model)
        argv = base + ["--layer_idx", str(cell.layer), "--num_cluster", str(SPREAD_K), "--no_figures"]
    elif cell.sampler == "representative":
        name = partition_file_name(s.dataset, SPREAD_K, cell.layer, 20, 1024, s.cluster_model)
        argv = base + ["--layer_idx", str(cell.layer), "--num_cluster", str(SPREAD_K), "--representative"]
    elif cell.sampler == "pruned":
        name = score_file_name(s.dataset, s.cluster_model)
        argv = base + ["--scores"]
    else:
        return None
    if s.device in ("auto", "cpu", "cuda"):
        argv += ["--device", s.device]
    return os.path.join(s.cluster_path, name), argv + list(s.cluster_args)


def extractor_file(s: Settings) -> str:
    from .extractor import default_checkpoint_path
    return default_checkpoint_path(s.cluster_path, s.cluster_model, s.dataset)


def cluster_argv(s: Settings, k: int, layer: int) -> list[str]:
    """The paper's clustering for one (k, layer): ``--norm``, margin 50, main_cluster.py's seed (0)."""
    argv = ["main_cluster.py", "--dataset", s.dataset, "--data_path", s.data_path, "--model", s.cluster_model,
            "--layer_idx", str(layer), "--num_cluster", str(k), "--norm", "--cluster_path", s.cluster_path,
            "--results_path", os.path.join(s.save_path, "clusters")]
    if s.margin != BS_NORM_MARGIN:
        argv += ["--margin", str(s.margin)]
    if s.device in ("auto", "cpu", "cuda"):
        argv += ["--device", s.device]
    return argv + list(s.cluster_args)


# --------------------------------------------------------------------------- #
# the plan
# --------------------------------------------------------------------------- #
@dataclass
class Job:
    name: str                      # run name, or the cluster file's name
    kind: str                      # "cluster" or "condense"
    state: str                     # done | running | new | resume | restart
    argv: list = field(default_factory=list)
    tables: list = field(default_factory=list)
    cell: Cell | None = None
    deps: list = field(default_factory=list)   # names of jobs of this plan that must succeed first
    path: str = ""                 # run directory or cluster file

    @property
    def to_run(self) -> bool:
        return self.state not in ("done", "running")


@dataclass
class Plan:
    settings: Settings
    tables: list
    jobs: list                     # every job, finished ones included, in running order
    extractor: str
    extractor_state: str           # present | trained by <job> | not needed
    seeds: tuple = ()              # the condensation seeds (default: the settings' one)

    @property
    def waves(self) -> list[list[Job]]:
        todo = [j for j in self.jobs if j.to_run]
        level: dict[str, int] = {}
        for j in todo:             # jobs come after their dependencies
            level[j.name] = 0 if not j.deps else 1 + max(level[d] for d in j.deps)
        cluster_levels = max([level[j.name] for j in todo if j.kind == "cluster"], default=-1)
        for j in todo:             # every condensation cell in the wave after the clustering
            if j.kind == "condense":
                level[j.name] = cluster_levels + 1
        return [w for w in ([j for j in todo if level[j.name] == n] for n in range(max(level.values(), default=-1) + 1))
                if w]


def _check_existing_run(path: str, cell: Cell, s: Settings) -> None:
    """An existing run directory of this name must hold this cell's settings."""
    cfg = load_run_config(path)
    if cfg is None:
        return                    # no readable config: the run stopped at its very start
    want = {"dataset": s.dataset, "ipc": cell.ipc, "seed": s.seed, "preset": s.preset,
            "method": "DC" if cell.sampler != "class" else cell.method, "sampler": cell.sampler}
    if cell.sampler in ("stratified", "representative", "systematic"):
        want.update(layer_idx=cell.layer, cluster_model=s.cluster_model)
    if cell.sampler == "cluster":
        want.update(num_cluster=cell.k, layer_idx=cell.layer, norm=True, cluster_model=s.cluster_model,
                    margin=s.margin)
    diff = [f"{k}={cfg.get(k)!r} (cell: {v!r})" for k, v in want.items() if cfg.get(k) != v]
    if diff:
        raise SweepError(f"run directory {path} exists with other settings: {', '.join(diff)}; "
                         f"move it away or use another --save_path")


def condense_state(path: str) -> str:
    """new | running (another process holds its lock) | done | resume | restart (stale: no checkpoint)."""
    from .rundir import is_locked
    if not os.path.isdir(path):
        return "new"
    if is_locked(path):           # checked first: a run at its first iterations has no checkpoint yet
        return "running"
    if os.path.exists(os.path.join(path, "DONE")):
        return "done"
    if os.path.exists(os.path.join(path, "checkpoint.pt")):
        return "resume"
    return "restart"


def make_plan(tables, s: Settings, ipcs=None, ks=None, layers=None, methods=None, seeds=None) -> Plan:
    """Every job of the sweep with its state; refuses up front what could not run.

    ``seeds``: condense every cell once per seed (default: ``s.seed`` only); files are made once."""
    import dataclasses
    from .extractor import check_layer, ExtractorError, partial_path
    check_extra(s.extra)
    cells = select_cells(tables, ipcs, ks, layers, methods)
    pairs = sorted({(c.k, c.layer) for c in cells if c.sampler == "cluster"}, key=lambda p: (p[1], p[0]))
    for _, layer in pairs:
        try:
            check_layer(s.cluster_model, layer)
        except ExtractorError as e:
            raise SweepError(f"--cluster_model {s.cluster_model}: {e}") from None

    cluster_jobs = {}
    for k, layer in pairs:
        path = cluster_file(s, k, layer)
        cluster_jobs[(k, layer)] = Job(name=os.path.basename(path), kind="cluster", path=path,
                                       state="done" if os.path.isfile(path) else "new",
                                       argv=cluster_argv(s, k, layer),
                                       tables=sorted({t for c, ts in cells.items() if (c.k, c.layer) == (k, layer)
                                                      for t in ts}))
    file_jobs = {}                 # cell -> the job making the file its sampler reads
    for cell, ts in cells.items():
        made = sampler_file_job(cell, s)
        if made is None:
            continue
        path, argv = made
        job = cluster_jobs.setdefault(path, Job(name=os.path.basename(path), kind="cluster", path=path,
                                                state="done" if os.path.isfile(path) else "new", argv=argv))
        job.tables = sorted(set(job.tables) | set(ts))
        file_jobs[cell] = job
    todo = [j for j in cluster_jobs.values() if j.to_run]
    ext = extractor_file(s)
    ext_state = "present" if os.path.isfile(ext) else "not needed"
    if todo and not os.path.isfile(ext):
        first = todo[0]
        if not s.train_extractor:
            cmd = display(first.argv + ["--train_extractor"])
            raise SweepError(f"extractor checkpoint {ext} not found and {len(todo)} clustering job(s) need it. "
                             f"Add --train_extractor to this command (the first clustering job then trains it), "
                             f"or train it first with: {cmd}")
        first.argv = first.argv + ["--train_extractor"] + (["--resume"] if os.path.exists(partial_path(ext)) else []) \
            + list(s.extractor_args)
        for j in todo[1:]:
            j.deps = [first.name]
        ext_state = f"trained by {first.name}"

    jobs = list(cluster_jobs.values())
    for seed in (seeds or (s.seed,)):
        ss = dataclasses.replace(s, seed=seed)
        for cell, ts in cells.items():
            name, old = run_name(cell, ss), run_name(cell, ss, legacy=True)
            if not os.path.isdir(os.path.join(s.save_path, name)) and os.path.isdir(os.path.join(s.save_path, old)):
                name = old        # started when --ckpt_every still renamed a run: continue it under its name
            path = os.path.join(s.save_path, name)
            state = condense_state(path)
            if state != "new":
                _check_existing_run(path, cell, ss)
            cj = cluster_jobs.get((cell.k, cell.layer)) if cell.sampler == "cluster" else file_jobs.get(cell)
            jobs.append(Job(name=name, kind="condense", state=state, cell=cell, tables=ts, path=path,
                            argv=condense_argv(cell, ss, resume_dir=path if state == "resume" else None),
                            deps=[cj.name] if cj is not None and cj.to_run else []))
    return Plan(settings=s, tables=list(tables), jobs=jobs, extractor=ext, extractor_state=ext_state,
                seeds=tuple(seeds or (s.seed,)))


# --------------------------------------------------------------------------- #
# showing and recording the plan
# --------------------------------------------------------------------------- #
def display(argv: list[str]) -> str:
    """The command line as a user would type it in the repository root."""
    script = argv[0] if os.path.abspath(os.getcwd()) == ROOT else os.path.join(ROOT, argv[0])
    return shlex.join(["python", script, *argv[1:]])


def full_argv(argv: list[str]) -> list[str]:
    return [sys.executable, os.path.join(ROOT, argv[0]), *argv[1:]]


def describe(plan: Plan) -> list[str]:
    s = plan.settings
    n_run = sum(j.to_run for j in plan.jobs)
    lines = [f"sweep of {', '.join(plan.tables)} on {s.dataset}, preset {s.preset or 'none (the published protocol)'}, "
             f"seed {', '.join(map(str, plan.seeds or (s.seed,)))}: {len(plan.jobs)} jobs "
             f"({sum(j.kind == 'cluster' for j in plan.jobs)} clustering, "
             f"{sum(j.kind == 'condense' for j in plan.jobs)} condensation), {n_run} to run",
             f"feature extractor {plan.extractor}: {plan.extractor_state}"]
    for j in plan.jobs:
        if j.state == "running":
            from .rundir import lock_holder
            lines.append(f"  skip (running) {j.name}: being written by {lock_holder(j.path)}")
        elif not j.to_run:
            lines.append(f"  skip (finished) {j.name}")
    for n, wave in enumerate(plan.waves, 1):
        lines.append(f"wave {n}: {len(wave)} job(s)")
        for j in wave:
            lines.append(f"  {j.state:8s} {j.name}: {display(j.argv)}")
    return lines


def manifest_entry(plan: Plan, argv: list[str], executor: str) -> dict:
    from .rundir import git_revision
    s = plan.settings
    return {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "finished": None, "argv": list(argv),
            "tables": plan.tables, "executor": executor, "git_revision": git_revision(),
            "settings": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(s).items()},
            "preset": s.preset, "protocol": "published" if s.preset is None else f"reduced (preset {s.preset})",
            "extractor": plan.extractor, "extractor_state": plan.extractor_state,
            "jobs": [{"name": j.name, "kind": j.kind, "tables": j.tables, "state": j.state, "path": j.path,
                      "command": display(j.argv) if j.to_run else None, "deps": j.deps,
                      "result": {"done": "skipped (finished before)", "running": "skipped (another process writes it)"}
                      .get(j.state, "pending")} for j in plan.jobs]}


def write_manifest(save_path: str, entry: dict) -> str:
    """Appends (or updates, by start time and argv) this sweep's entry in ``<save_path>/sweep.json``."""
    from .io import atomic_write_json
    path = os.path.join(save_path, "sweep.json")
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except (OSError, json.JSONDecodeError):
        doc = {"format": "dcbs-sweep-v1", "sweeps": []}
    sweeps = [e for e in doc.get("sweeps", [])
              if not (e.get("started") == entry["started"] and e.get("argv") == entry["argv"])]
    doc["sweeps"] = sweeps + [entry]
    atomic_write_json(path, doc)
    return path


# --------------------------------------------------------------------------- #
# running
# --------------------------------------------------------------------------- #
def move_stale(path: str, save_path: str) -> str:
    """A run directory without checkpoint or DONE (stopped before its first checkpoint) goes to .stale/."""
    dest_dir = os.path.join(save_path, ".stale")
    os.makedirs(dest_dir, exist_ok=True)
    dest = os.path.join(dest_dir, f"{os.path.basename(path)}_{time.strftime('%Y%m%d-%H%M%S')}")
    os.replace(path, dest)
    return dest


def local_gpu_count() -> int:
    import torch
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def slurm_parameters(partition=None, time_min=2880, gpus_per_node=1, cpus_per_task=8, mem_gb=None,
                     array_parallelism=32, account=None, qos=None, constraint=None, setup=(),
                     job_name="dcbs-reproduce") -> dict:
    """Keyword arguments of ``submitit.SlurmExecutor.update_parameters`` for every job of the sweep."""
    params = {"job_name": job_name, "time": int(time_min), "nodes": 1, "ntasks_per_node": 1,
              "gpus_per_node": int(gpus_per_node), "cpus_per_task": int(cpus_per_task),
              "array_parallelism": int(array_parallelism), "signal_delay_s": 120,
              "setup": [f"export OMP_NUM_THREADS={int(cpus_per_task)}", *setup]}
    for key, value in (("partition", partition), ("account", account), ("qos", qos), ("constraint", constraint)):
        if value:
            params[key] = value
    if mem_gb:
        params["mem"] = f"{int(mem_gb)}GB"
    return params


def call(argv: list[str], cwd: str | None = None) -> int:
    """Runs ``argv`` to its end. Ctrl-C is passed on as one SIGINT and waited for, so the run writes its
    checkpoint (``subprocess.call`` would kill it 0.25 s later); a second Ctrl-C aborts the run too.
    Then KeyboardInterrupt stops the sweep."""
    # its own process group: the terminal's Ctrl-C reaches this process only, which passes it on once
    proc = subprocess.Popen(argv, cwd=cwd or os.getcwd(), start_new_session=True)
    try:
        return proc.wait()
    except KeyboardInterrupt:
        proc.send_signal(signal.SIGINT)
        print(f"interrupted: waiting for {os.path.basename(argv[1]) if len(argv) > 1 else argv[0]} to save "
              f"its checkpoint (Ctrl-C again aborts it without saving)", file=sys.stderr, flush=True)
        try:
            proc.wait()
        except KeyboardInterrupt:
            proc.send_signal(signal.SIGINT)
            proc.wait()
        raise


def _workers_import_this_repository() -> None:
    """submitit's workers unpickle ``call`` by its module name, from any working directory."""
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if ROOT not in paths:
        os.environ["PYTHONPATH"] = os.pathsep.join([ROOT, *paths])


class Runner:
    """Runs the waves of a plan with one executor; ``results`` maps job name -> exit status (None: lost)."""

    def __init__(self, executor: str = "inline", jobs: int = 1, folder: str | None = None,
                 slurm_params: dict | None = None, local_timeout_min: float = 60 * 24 * 14, poll_s: float = 2.0,
                 echo=print):
        self.executor, self.n, self.folder = executor, max(1, jobs), folder
        self.slurm_params, self.local_timeout_min, self.poll_s = slurm_params or {}, local_timeout_min, poll_s
        self.echo = echo
        self.results: dict[str, int | None] = {}

    def run(self, plan: Plan, on_wave_end=None) -> dict:
        for n, wave in enumerate(plan.waves, 1):
            ready = []
            for j in wave:
                failed = [d for d in j.deps if self.results.get(d) != 0]
                if failed:
                    self.results[j.name] = None
                    self.echo(f"blocked {j.name}: {', '.join(failed)} did not finish")
                else:
                    ready.append(j)
            for j in ready:
                if j.state == "restart":
                    self.echo(f"{j.name}: stopped before its first checkpoint; moved to "
                              f"{move_stale(j.path, plan.settings.save_path)}, starting it again")
            self.echo(f"wave {n}/{len(plan.waves)}: {len(ready)} job(s) ({self.executor})")
            getattr(self, f"_run_{self.executor}")(ready)
            if on_wave_end:
                on_wave_end(self.results)
        return self.results

    def _done(self, job: Job, rc) -> None:
        self.results[job.name] = rc
        self.echo(f"{'finished' if rc == 0 else 'FAILED (exit ' + str(rc) + ')'} {job.name}")

    # one subprocess after another, output to this terminal
    def _run_inline(self, wave) -> None:
        for i, j in enumerate(wave, 1):
            self.echo(f"[{i}/{len(wave)}] {j.state} {j.name}: {display(j.argv)}")
            self._done(j, call(full_argv(j.argv)))

    # submitit's LocalExecutor, at most n jobs at once, GPUs handed out round-robin
    def _run_local(self, wave) -> None:
        import submitit
        _workers_import_this_repository()
        gpus = local_gpu_count()
        ex = submitit.LocalExecutor(folder=os.path.join(self.folder, "%j"))
        pending, running = list(wave), {}
        load = [0] * gpus
        try:
            while pending or running:
                while pending and len(running) < self.n:
                    j = pending.pop(0)
                    gpu = min(range(gpus), key=load.__getitem__) if gpus else None
                    ex.update_parameters(timeout_min=self.local_timeout_min, gpus_per_node=1 if gpus else 0,
                                         visible_gpus=(gpu,) if gpus else ())
                    job = ex.submit(call, full_argv(j.argv), os.getcwd())
                    if gpus:
                        load[gpu] += 1
                    running[job.job_id] = (j, job, gpu)
                    self.echo(f"submitted {j.state} {j.name} (local job {job.job_id}"
                              f"{f', GPU {gpu}' if gpus else ''}; log {job.paths.stdout}): {display(j.argv)}")
                for key, (j, job, gpu) in list(running.items()):
                    if job.done():
                        del running[key]
                        if gpus:
                            load[gpu] -= 1
                        self._done(j, self._result(job))
                if running:
                    time.sleep(self.poll_s)
        except KeyboardInterrupt:
            for j, job, _ in running.values():
                job.cancel(check=False)     # SIGINT, which call() passes on: each run saves, then ends
            raise

    # submitit's SlurmExecutor: the wave as one job array, then wait for it
    def _run_slurm(self, wave) -> None:
        import submitit
        if not wave:
            return
        _workers_import_this_repository()
        ex = submitit.SlurmExecutor(folder=os.path.join(self.folder, "%j"))
        ex.update_parameters(**self.slurm_params)
        with ex.batch():
            handles = [ex.submit(call, full_argv(j.argv), os.getcwd()) for j in wave]
        for j, job in zip(wave, handles):
            self.echo(f"submitted {j.state} {j.name}: SLURM job {job.job_id}, log {job.paths.stdout}")
        for j, job in zip(wave, handles):
            self._done(j, self._result(job))

    def _result(self, job):
        try:
            return job.result()
        except Exception as e:     # the job itself died (time limit, node failure, cancelled)
            self.echo(f"job {job.job_id} failed: {str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}")
            return None
