"""reproduce.py: the tables' grids, skipping and resuming, the executors, the aggregator, one real sweep."""
from __future__ import annotations

import json
import os
import re
import sys

import numpy as np
import pytest

from conftest import ROOT, run_cli

sys.path.insert(0, ROOT)
from dcbs import reproduce_cli as reproduce  # noqa: E402
from dcbs import sweep, tables  # noqa: E402
from dcbs.sweep import Cell, Settings, SweepError  # noqa: E402


def settings(tmp_path, **kw):
    return Settings(**{**dict(dataset="CIFAR10", save_path=str(tmp_path / "sweep"),
                              cluster_path=str(tmp_path / "ck")), **kw})


@pytest.fixture
def with_extractor(tmp_path):
    """An (empty) extractor checkpoint where the plan looks for it; nothing reads it while planning."""
    (tmp_path / "ck").mkdir()
    (tmp_path / "ck" / "ResNet18_CIFAR10.pt").write_bytes(b"")
    return settings(tmp_path)


def kinds(plan, kind):
    return [j for j in plan.jobs if j.kind == kind]


# --------------------------------------------------------------------------- #
# the grids
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("table, cells, clusters", [
    ("table1", {("DC", None, None), ("DSA", None, None), ("BS", 20, 3)}, {(20, 3)}),
    ("table2", {("DC", None, None)} | {("BS", k, 2) for k in (5, 10, 15, 20, 25)}, {(k, 2) for k in (5, 10, 15, 20, 25)}),
    ("table3", {("DC", None, None)} | {("BS", 20, layer) for layer in range(4)}, {(20, layer) for layer in range(4)}),
])
def test_each_table_expands_to_its_cells_and_clustering_jobs(with_extractor, table, cells, clusters):
    plan = sweep.make_plan([table], with_extractor)
    got = [j.cell for j in kinds(plan, "condense")]
    assert len(got) == len(set(got)) == 3 * len(cells)
    assert set(got) == {Cell(m, ipc, k, l) for m, k, l in cells for ipc in (1, 10, 50)}
    assert {j.name for j in kinds(plan, "cluster")} == {f"class_idx_cifar10_k{k}_{l}_True.pt" for k, l in clusters}
    n_bs = sum(c[0] == "BS" for c in cells)
    assert sum(j.cell.sampler == "cluster" for j in kinds(plan, "condense")) == 3 * n_bs   # 3 / 15 / 12
    # clustering first: every Batch Sampling cell waits for its own clustering job, in a later wave
    waves = plan.waves
    assert [j.kind for j in waves[0]] == ["cluster"] * len(clusters)
    assert all(j.kind == "condense" for j in waves[1]) and len(waves) == 2
    for j in kinds(plan, "condense"):
        if j.cell.sampler == "cluster":
            assert j.deps == [f"class_idx_cifar10_k{j.cell.k}_{j.cell.layer}_True.pt"]
            assert j.argv[:1] == ["main_BS.py"] and "--norm" in j.argv
            assert j.argv[j.argv.index("--num_cluster") + 1] == str(j.cell.k)
            assert j.argv[j.argv.index("--layer_idx") + 1] == str(j.cell.layer)
        else:
            assert j.argv[:3] == ["main.py", "--method", j.cell.method] and not j.deps


def test_all_runs_each_shared_cell_and_clustering_once(with_extractor):
    plan = sweep.make_plan(list(sweep.PAPER_TABLES), with_extractor)
    cond, clus = kinds(plan, "condense"), kinds(plan, "cluster")
    # DC, DSA; BS k 5-25 at layer 2; BS k 20 at layers 0, 1 (2 is Table 2's, 3 is Table 1's): 10 columns x 3 ipc
    assert len(cond) == 30 and len({j.name for j in cond}) == 30
    assert len(clus) == 8
    by_cell = {j.cell: j.tables for j in cond}
    assert by_cell[Cell("DC", 1)] == ["table1", "table2", "table3"]
    assert by_cell[Cell("BS", 10, 20, 3)] == ["table1", "table3"]
    assert by_cell[Cell("BS", 50, 20, 2)] == ["table2", "table3"]
    assert sweep.run_name(Cell("DC", 1), with_extractor) == "DC_CIFAR10_ipc1_full_s0"
    assert sweep.run_name(Cell("BS", 10, 20, 3), Settings(dataset="CIFAR10", preset="cpu", seed=2)) \
        == "BS-DC_k20_l3_norm_CIFAR10_ipc10_cpu_s2"


def test_restrictions_and_bad_values(tmp_path, with_extractor):
    plan = sweep.make_plan(["table2"], with_extractor, ipcs=[1], ks=[5, 25])
    assert sorted(j.name for j in plan.jobs) == sorted([
        "class_idx_cifar10_k5_2_True.pt", "class_idx_cifar10_k25_2_True.pt", "DC_CIFAR10_ipc1_full_s0",
        "BS-DC_k5_l2_norm_CIFAR10_ipc1_full_s0", "BS-DC_k25_l2_norm_CIFAR10_ipc1_full_s0"])
    for kw, msg in [(dict(ipcs=[7]), "--ipc 7"), (dict(ks=[7]), "--k 7"), (dict(layers=[3]), "--layers 3"),
                    (dict(methods=["DSA"]), "--methods DSA")]:
        with pytest.raises(SweepError, match=msg):
            sweep.make_plan(["table2"], with_extractor, **kw)
    with pytest.raises(SweepError, match="layer"):   # ConvNet has feature layers 0-2 only
        sweep.make_plan(["table1"], settings(tmp_path, cluster_model="ConvNet"))


def test_missing_extractor_is_refused_with_the_command_or_trained_by_the_first_job(tmp_path):
    s = settings(tmp_path)
    with pytest.raises(SweepError) as e:
        sweep.make_plan(["table3"], s)
    msg = str(e.value)
    assert "ResNet18_CIFAR10.pt not found" in msg and "--train_extractor" in msg
    assert "python main_cluster.py --dataset CIFAR10" in msg
    plan = sweep.make_plan(["table3"], settings(tmp_path, train_extractor=True, extractor_args=("--extractor_epochs", "3")))
    first, *rest = kinds(plan, "cluster")
    assert first.argv[-3:] == ["--train_extractor", "--extractor_epochs", "3"] and not first.deps
    assert all(j.deps == [first.name] and "--train_extractor" not in j.argv for j in rest)
    assert [len(w) for w in plan.waves] == [1, 3, 15]


# --------------------------------------------------------------------------- #
# finished, unfinished and stale runs
# --------------------------------------------------------------------------- #
def fake_run(path, done=False, checkpoint=False, **cfg):
    os.makedirs(path)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)
    if done:
        open(os.path.join(path, "DONE"), "w").write("ConvNet: 1 ± 0 over 1 models\n")
    if checkpoint:
        open(os.path.join(path, "checkpoint.pt"), "wb").write(b"")


def test_finished_cells_are_skipped_and_unfinished_ones_resumed(with_extractor, monkeypatch):
    s = with_extractor
    save = s.save_path
    dc = dict(dataset="CIFAR10", seed=0, preset=None, method="DC", batch_sampling=False)
    fake_run(os.path.join(save, "DC_CIFAR10_ipc1_full_s0"), done=True, ipc=1, **dc)
    fake_run(os.path.join(save, "DC_CIFAR10_ipc10_full_s0"), checkpoint=True, ipc=10, **dc)
    fake_run(os.path.join(save, "DC_CIFAR10_ipc50_full_s0"), ipc=50, **dc)          # stopped before a checkpoint
    open(os.path.join(s.cluster_path, "class_idx_cifar10_k20_3_True.pt"), "wb").write(b"")
    plan = sweep.make_plan(["table1"], s)
    state = {j.name: j.state for j in plan.jobs}
    assert state["DC_CIFAR10_ipc1_full_s0"] == "done" and state["class_idx_cifar10_k20_3_True.pt"] == "done"
    assert state["DC_CIFAR10_ipc10_full_s0"] == "resume" and state["DC_CIFAR10_ipc50_full_s0"] == "restart"
    resume = next(j for j in plan.jobs if j.state == "resume")
    assert resume.argv == ["main.py", "--resume", os.path.join(save, "DC_CIFAR10_ipc10_full_s0")]
    # one wave: no clustering left, so the BS cells depend on nothing
    assert len(plan.waves) == 1 and all(not j.deps for j in plan.waves[0])
    assert "DC_CIFAR10_ipc1_full_s0" not in {j.name for j in plan.waves[0]}
    assert any(line == "  skip (finished) DC_CIFAR10_ipc1_full_s0" for line in sweep.describe(plan))
    # running it: the stale directory is moved aside, the others get their commands
    calls = []
    monkeypatch.setattr(sweep, "call", lambda argv: calls.append(argv[1:]) or 0)
    results = sweep.Runner("inline", echo=lambda *_: None).run(plan)
    assert len(calls) == 8 and all(rc == 0 for rc in results.values())
    assert [os.path.join(sweep.ROOT, "main.py"), "--resume", resume.path] in calls
    assert not os.path.exists(os.path.join(save, "DC_CIFAR10_ipc50_full_s0"))
    assert len(os.listdir(os.path.join(save, ".stale"))) == 1
    # a directory of this name with other settings is never touched
    fake_run(os.path.join(save, "DSA_CIFAR10_ipc1_full_s0"), done=True, ipc=1, **{**dc, "method": "DSA", "seed": 5})
    with pytest.raises(SweepError, match="seed=5"):
        sweep.make_plan(["table1"], s)


def test_checkpoint_frequency_after_dashes_keeps_run_names(with_extractor):
    import dataclasses
    s = with_extractor
    dc = dict(dataset="CIFAR10", seed=0, preset=None, method="DC", batch_sampling=False)
    fake_run(os.path.join(s.save_path, "DC_CIFAR10_ipc1_full_s0"), done=True, ipc=1, **dc)
    ckpt = dataclasses.replace(s, extra=("--ckpt_every", "10"))
    plan = sweep.make_plan(["table1"], ckpt, ipcs=[1], methods=["DC"])
    assert [(j.name, j.state) for j in kinds(plan, "condense")] == [("DC_CIFAR10_ipc1_full_s0", "done")]
    # flags that change the computation still name the run, whatever --ckpt_every says
    a = sweep.run_name(Cell("DC", 1), dataclasses.replace(s, extra=("--ckpt_every=5", "--eval_batch", "2")))
    b = sweep.run_name(Cell("DC", 1), dataclasses.replace(s, extra=("--eval_batch", "2")))
    assert a == b and a.startswith("DC_CIFAR10_ipc1_full_s0_x")
    # a run started under the old name (every flag hashed) resumes under that name
    legacy = sweep.run_name(Cell("DC", 10), ckpt, legacy=True)
    assert legacy != "DC_CIFAR10_ipc10_full_s0"
    fake_run(os.path.join(s.save_path, legacy), checkpoint=True, ipc=10, **dc)
    job = next(j for j in kinds(sweep.make_plan(["table1"], ckpt, ipcs=[10], methods=["DC"]), "condense"))
    assert (job.name, job.state) == (legacy, "resume") and job.argv[-2:] == ["--resume", job.path]


def test_a_failed_clustering_job_blocks_only_its_cells(tmp_path, monkeypatch):
    s = settings(tmp_path, train_extractor=True)
    plan = sweep.make_plan(["table2"], s, ipcs=[1], ks=[5, 10])
    ran = []

    def call(argv):
        ran.append(os.path.basename(argv[1]))
        return 2 if "--train_extractor" in argv else 0
    monkeypatch.setattr(sweep, "call", call)
    results = sweep.Runner("inline", echo=lambda *_: None).run(plan)
    assert ran == ["main_cluster.py", "main.py"]            # the other clustering job and both BS cells wait
    assert results["DC_CIFAR10_ipc1_full_s0"] == 0 and results["class_idx_cifar10_k5_2_True.pt"] == 2
    assert results["class_idx_cifar10_k10_2_True.pt"] is None
    assert results["BS-DC_k5_l2_norm_CIFAR10_ipc1_full_s0"] is None


# a run that takes a while to save on SIGINT, and aborts on a second one, as main.py / main_BS.py do
SLOW_SAVER = """
import pathlib, signal, sys, time
out = pathlib.Path(sys.argv[1])
def handler(signum, frame):
    if out.exists():
        out.write_text("aborted")
        sys.exit(3)
    out.write_text("saving")
    time.sleep(float(sys.argv[2]))
    out.write_text("saved")
    sys.exit(130)
signal.signal(signal.SIGINT, handler)
(out.parent / "ready").write_text("")
time.sleep(120)
"""

SWEEP_PARENT = """
import sys
sys.path.insert(0, sys.argv[1])
from dcbs import sweep
executor, folder = sys.argv[2:4]
job = sweep.Job(name="slow", kind="condense", state="new", argv=sys.argv[4:])
runner = sweep.Runner(executor, folder=folder, poll_s=0.1, echo=lambda *_: None)
try:
    runner.run(sweep.Plan(settings=None, tables=[], jobs=[job], extractor="", extractor_state=""))
except KeyboardInterrupt:
    print("stopped", runner.results)
    sys.exit(130)
"""


def _sweep_of_slow_saver(tmp_path, save_s, executor="inline"):
    import signal
    import subprocess
    import time
    (tmp_path / "child.py").write_text(SLOW_SAVER)
    out = tmp_path / "state"
    # its own process group, as a shell gives a foreground job: killpg is the terminal's Ctrl-C
    # from another directory: submitit's workers still import the sweep
    parent = subprocess.Popen([sys.executable, "-c", SWEEP_PARENT, ROOT, executor, str(tmp_path / "jobs"),
                               str(tmp_path / "child.py"), str(out), str(save_s)], cwd=tmp_path,
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    deadline = time.time() + 60
    while not (tmp_path / "ready").exists():
        assert parent.poll() is None and time.time() < deadline, "the sweep did not start its job"
        time.sleep(0.05)
    os.killpg(parent.pid, signal.SIGINT)
    return parent, out


@pytest.mark.parametrize("executor", ["inline", "local"])
def test_ctrl_c_in_a_sweep_lets_the_run_save_then_stops(tmp_path, executor):
    import time
    parent, out = _sweep_of_slow_saver(tmp_path, save_s=1.5, executor=executor)
    stdout, _ = parent.communicate(timeout=60)
    assert parent.returncode == 130 and "stopped {}" in stdout
    # inline waits for the save; under submitit the run, in its own process group, outlives the worker
    deadline = time.time() + (0 if executor == "inline" else 30)
    while out.read_text() != "saved" and time.time() < deadline:
        time.sleep(0.1)
    assert out.read_text() == "saved"          # not killed while writing its checkpoint


def test_a_second_ctrl_c_in_the_inline_sweep_aborts_the_run(tmp_path):
    import signal
    import time
    parent, out = _sweep_of_slow_saver(tmp_path, save_s=60)
    deadline = time.time() + 30
    while not (out.exists() and out.read_text() == "saving"):
        assert time.time() < deadline, "the run never got the first SIGINT"
        time.sleep(0.05)
    os.killpg(parent.pid, signal.SIGINT)
    parent.communicate(timeout=30)
    assert out.read_text() == "aborted" and parent.returncode == 130


# --------------------------------------------------------------------------- #
# command line and SLURM (nothing submitted)
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("argv, msg", [
    (["table1", "--ipc", "3"], "--ipc 3"),
    (["table3", "--k", "5"], "--k 5"),
    (["table1", "--jobs", "2"], "--executor local"),
    (["table1", "--slurm_partition", "gpu"], "--executor slurm"),
    (["table1", "--extractor_args", "--pretrained imagenet"], "--train_extractor"),
    (["table1", "--", "--ipc", "10"], "--ipc after '--'"),
    (["table9"], "invalid choice"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, argv, msg):
    try:
        rc = reproduce.main([*argv[:1], "--save_path", str(tmp_path / "s"), "--cluster_path", str(tmp_path),
                             *argv[1:]])
    except SystemExit as e:     # argparse's own refusals
        rc = e.code
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("error:") and msg in err[0], err
    assert not (tmp_path / "s").exists()


def test_slurm_parameters_and_dry_run(tmp_path, capsys, monkeypatch):
    from submitit.slurm.slurm import _make_sbatch_string
    (tmp_path / "ResNet18_CIFAR10.pt").write_bytes(b"")
    argv = ["all", "--executor", "slurm", "--slurm_partition", "gpu", "--slurm_time", "600",
            "--slurm_gpus_per_node", "2", "--slurm_cpus_per_task", "6", "--slurm_mem_gb", "40",
            "--slurm_array_parallelism", "5", "--slurm_account", "lab", "--slurm_setup", "module load cuda",
            "--save_path", str(tmp_path / "s"), "--cluster_path", str(tmp_path), "--preset", "cpu"]
    params = reproduce.slurm_parameters(reproduce.build_parser().parse_args(argv))
    assert params == {"job_name": "dcbs-reproduce", "time": 600, "nodes": 1, "ntasks_per_node": 1,
                      "gpus_per_node": 2, "cpus_per_task": 6, "array_parallelism": 5, "signal_delay_s": 120,
                      "setup": ["export OMP_NUM_THREADS=6", "module load cuda"], "partition": "gpu",
                      "account": "lab", "mem": "40GB"}
    sbatch = _make_sbatch_string(command="CMD", folder=str(tmp_path / "sb"), map_count=30, **params)
    for line in ("#SBATCH --partition=gpu", "#SBATCH --time=600", "#SBATCH --gpus-per-node=2",
                 "#SBATCH --cpus-per-task=6", "#SBATCH --mem=40GB", "#SBATCH --array=0-29%5",
                 "#SBATCH --account=lab", "module load cuda"):
        assert line in sbatch, line
    # the runner hands those parameters to SlurmExecutor and submits each wave as one array
    import submitit
    made = []

    class FakeJob:
        def __init__(self, i):
            self.job_id, self.paths = f"7_{i}", type("P", (), {"stdout": "log"})

        def result(self):
            return 0

    class FakeExecutor:
        def __init__(self, folder):
            made.append(self)
            self.params, self.submitted, self.in_batch = None, [], False

        def update_parameters(self, **kw):
            self.params = kw

        def batch(self):
            ex = self

            class Ctx:
                def __enter__(self):
                    ex.in_batch = True

                def __exit__(self, *a):
                    ex.in_batch = False
            return Ctx()

        def submit(self, fn, argv, cwd):
            assert self.in_batch
            self.submitted.append(argv)
            return FakeJob(len(self.submitted))

    monkeypatch.setattr(submitit, "SlurmExecutor", FakeExecutor)
    plan = sweep.make_plan(["table1"], settings(tmp_path, cluster_path=str(tmp_path), preset="cpu",
                                                 save_path=str(tmp_path / "s")), ipcs=[1])
    results = sweep.Runner("slurm", folder=str(tmp_path / "sub"), slurm_params=params, echo=lambda *_: None).run(plan)
    assert [len(ex.submitted) for ex in made] == [1, 3] and all(ex.params == params for ex in made)
    assert set(results.values()) == {0}
    # --dry_run shows the jobs and the parameters and runs nothing
    capsys.readouterr()
    assert reproduce.main(argv + ["--dry_run"]) == 0
    out = capsys.readouterr().out
    assert "38 jobs (8 clustering, 30 condensation)" in out and '"partition": "gpu"' in out
    assert "dry run: nothing was run" in out and not (tmp_path / "s").exists()


# --------------------------------------------------------------------------- #
# the aggregator, on hand-made run directories
# --------------------------------------------------------------------------- #
def write_run(root, name, accs, done=True, **cfg):
    base = dict(dataset="CIFAR10", model="ConvNet", method="DC", batch_sampling=False, preset="cpu", ipc=1,
                Iteration=200, seed=0)
    fake_run(os.path.join(root, name), done=done, checkpoint=not done, **{**base, **cfg})
    with open(os.path.join(root, name, "accuracies.json"), "w") as f:
        json.dump(accs, f)


def row(md, title, label):
    """Cells of the row ``label`` of the table under the heading that starts with ``title``."""
    part = md.split(f"## {title}")[1].split("\n## ")[0]
    for line in part.splitlines():
        if line.startswith(f"| {label} |"):
            return [c.strip() for c in line.strip("|").split("|")][1:]
    raise AssertionError(f"no row {label} in {title}")


def ours(accs):
    a = 100 * np.asarray(accs)
    return f"{a.mean():.2f} ± {a.std():.2f} (n={len(a)})"


def test_aggregator_tables_match_hand_made_runs(tmp_path):
    root = tmp_path / "sweep"
    a1 = {"0": {"0": {"ConvNet": [0.1, 0.12]}, "100": {"ConvNet": [0.2]}, "200": {"ConvNet": [0.25, 0.27, 0.26]}},
          "1": {"200": {"ConvNet": [0.281]}}}
    a2 = {"0": {"200": {"ConvNet": [0.24, 0.29, 0.3]}}}
    write_run(root, "DC_CIFAR10_ipc1_cpu_s0", a1)
    write_run(root, "DC_CIFAR10_ipc1_cpu_s1", a2, seed=1)                        # pooled with the one above
    bs = {"0": {"1000": {"ConvNet": [0.5, 0.52]}}}
    write_run(root, "BS-DC_k20_l3_norm_CIFAR10_ipc50_full_s0", bs, preset=None, Iteration=1000, ipc=50,
              batch_sampling=True, num_cluster=20, layer_idx=3, norm=True, cluster_model="ResNet18BN", margin=50)
    write_run(root, "DSA_CIFAR10_ipc10_cpu_s0", {"0": {"100": {"ConvNet": [0.9]}}}, done=False, method="DSA", ipc=10)
    write_run(root, "DM_CIFAR10_ipc1", {"0": {"10": {"ConvNet": [0.3]}}}, method="DM")
    os.makedirs(root / "clusters")                                              # main_cluster.py's logs
    write_run(root / ".stale", "DC_CIFAR10_ipc10_cpu_s0", {"0": {"0": {"ConvNet": [0.99]}}})
    out, runs = tables.write_tables([str(root)], str(tmp_path / "tables.md"))
    md = open(out).read()
    # Table 1: DC ipc 1 pools both runs at iteration 200; BS ipc 50 at 1000; DSA is unfinished: not averaged
    t1 = "Table 1"
    assert row(md, t1, "DC") == [f"**{ours([0.25, 0.27, 0.26, 0.281, 0.24, 0.29, 0.3])}** [a] / 28.3±0.5",
                                 "– / 44.9±0.5", "– / 53.9±0.5"]
    assert row(md, t1, "DSA") == ["– / 28.8±0.7", "– / 52.1±0.5", "– / 60.6±0.5"]
    assert row(md, t1, "BS(DC) k=20, layer 3")[2] == f"**{ours([0.5, 0.52])}** [b] / 52.9±0.7"
    assert "n=7" in row(md, t1, "DC")[0]
    assert "[a] preset `cpu` (a reduced protocol), evaluated at iteration 200" in md
    assert "[b] the published protocol (no preset), evaluated at iteration 1000" in md
    assert "ResNet18BN features, margin 50" in md
    # Table 2: DC column only, one protocol, stated once
    t2 = md.split("## Table 2")[1].split("\n## ")[0]
    assert "Protocol: preset `cpu` (a reduced protocol), evaluated at iteration 200." in t2
    assert row(md, "Table 2", "ipc 1") == ["– / 28.0±0.6", "– / 27.6±0.5", "– / 28.1±0.6", "– / 28.1±0.6",
                                           "– / 28.6±0.7", f"**{ours([0.25, 0.27, 0.26, 0.281, 0.24, 0.29, 0.3])}** / 28.3±0.5"]
    assert row(md, "Table 3", "ipc 50")[3] == f"**{ours([0.5, 0.52])}** [b] / 52.9±0.7"     # mixed here too
    assert row(md, "Table 3", "ipc 10")[2] == "– / 43.0±0.5"                      # Table 3's own layer-2 value
    # unfinished and foreign runs are listed apart; hidden folders are not read
    unfinished = md.split("## Unfinished runs")[1].split("\n## ")[0]
    assert "DSA_CIFAR10_ipc10_cpu_s0" in unfinished and "--resume" in unfinished
    assert "`DM_CIFAR10_ipc1`: DM is in no table" in md and "0.99" not in md and "99.00" not in md
    assert "CAFE" in md
    assert sorted(r.name for r in runs) == sorted(["DC_CIFAR10_ipc1_cpu_s0", "DC_CIFAR10_ipc1_cpu_s1", "DM_CIFAR10_ipc1",
                                                   "BS-DC_k20_l3_norm_CIFAR10_ipc50_full_s0", "DSA_CIFAR10_ipc10_cpu_s0"])


# --------------------------------------------------------------------------- #
# end to end: digits, smoke preset, submitit's LocalExecutor, then the aggregator
# --------------------------------------------------------------------------- #
def test_tiny_sweep_runs_through_local_executor_and_is_tabulated(tmp_path, capsys):
    """The sweep through reproduce.py; the repeat and the aggregation in this process (reproduce.py only
    calls reproduce_cli.main)."""
    save, ck = tmp_path / "sweep", tmp_path / "ck"
    argv = ["table2", "--preset", "smoke", "--ipc", "1", "--k", "5", "10", "--margin", "10",
            "--cluster_model", "ConvNet", "--train_extractor",
            "--extractor_args", "--extractor_epochs 1 --train_subset 64 --max_steps 2",
            "--cluster_args", "--no_figures --n_init 1", "--executor", "local", "--jobs", "2",
            "--num_threads", "1", "--device", "cpu", "--save_path", save, "--cluster_path", ck,
            "--", "--Iteration", "1", "--eval_it", "1", "--batch_real", "32"]
    r = run_cli("reproduce.py", *argv)
    assert r.returncode == 0, r.stdout + r.stderr
    # the extractor was trained by the first clustering job, before the second one ran
    assert "trained by class_idx_digits_k5_2_True_ConvNet_m10.pt" in r.stdout
    out = r.stdout
    assert out.index("finished class_idx_digits_k5_2") < out.index("submitted new class_idx_digits_k10_2") \
        < out.index("finished class_idx_digits_k10_2") < out.index("submitted new BS-DC_k5")
    assert (ck / "ConvNet_digits.pt").exists()
    names = {"DC": "DC_digits_ipc1_smoke_s0", "k5": "BS-DC_k5_l2_norm_m10_ConvNet_digits_ipc1_smoke_s0",
             "k10": "BS-DC_k10_l2_norm_m10_ConvNet_digits_ipc1_smoke_s0"}
    dirs = {k: next(p for p in save.iterdir() if p.name.startswith(v + "_x")) for k, v in names.items()}
    for d in dirs.values():
        assert (d / "DONE").exists()
        cfg = json.load(open(d / "config.json"))
        assert cfg["preset"] == "smoke" and cfg["Iteration"] == 1 and cfg["batch_real"] == 32
    assert json.load(open(dirs["k10"] / "config.json"))["cluster_file"].endswith("class_idx_digits_k10_2_True_ConvNet_m10.pt")
    manifest = json.load(open(save / "sweep.json"))["sweeps"][-1]
    assert manifest["preset"] == "smoke" and manifest["executor"] == "local" and manifest["finished"]
    assert {j["result"] for j in manifest["jobs"]} == {"finished"} and len(manifest["jobs"]) == 5
    # the same command again runs nothing
    capsys.readouterr()
    rc = reproduce.main([str(a) for a in argv])
    again = capsys.readouterr().out
    assert rc == 0 and "0 to run" in again and again.count("skip (finished)") == 5
    # the aggregator shows these runs' numbers
    rc = reproduce.main(["aggregate", "--save_path", str(save), "--out", str(tmp_path / "tables.md")])
    assert rc == 0, capsys.readouterr().err
    md = open(tmp_path / "tables.md").read()
    got = row(md, "Table 2", "ipc 1")

    def acc(d):
        a = json.load(open(d / "accuracies.json"))
        return a["0"]["1"]["ConvNet"]
    assert got[0] == f"**{ours(acc(dirs['k5']))}** / –" and got[1] == f"**{ours(acc(dirs['k10']))}** / –"
    assert got[5] == f"**{ours(acc(dirs['DC']))}** / –" and got[2:5] == ["– / –"] * 3
    assert "preset `smoke` (a reduced protocol), evaluated at iteration 1" in md
    assert re.search(r"`Iteration=1`, `batch_real=32`", md)


def test_aggregator_lists_only_the_datasets_it_tabulates(tmp_path):
    root = tmp_path / "real"
    write_run(root, "DC_CIFAR10_ipc1", {"0": {"200": {"ConvNet": [0.27]}}})
    write_run(root, "DC_FashionMNIST_ipc1", {"0": {"200": {"ConvNet": [0.70]}}}, dataset="FashionMNIST")
    out, _ = tables.write_tables([str(root)], str(tmp_path / "tables.md"), datasets=["CIFAR10"])
    md = open(out).read()
    assert "from 1 finished run(s)" in md
    assert "DC_CIFAR10_ipc1" in md and "FashionMNIST" not in md


# --------------------------------------------------------------------------- #
# the samplers grid
# --------------------------------------------------------------------------- #
def test_samplers_grid_makes_each_file_once_and_runs_every_sampler_per_seed(with_extractor):
    plan = sweep.make_plan(["samplers"], with_extractor, ipcs=[1], seeds=[0, 1, 2])
    files = {j.name: j for j in kinds(plan, "cluster")}
    assert set(files) == {"class_idx_cifar10_k20_3_True.pt", "class_idx_cifar10_k256_3_False.pt",
                          "rep_idx_cifar10_k256_3_R20_c1024.pt", "scores_cifar10.pt"}
    assert "--representative" in files["rep_idx_cifar10_k256_3_R20_c1024.pt"].argv
    assert "--scores" in files["scores_cifar10.pt"].argv
    assert "--norm" not in files["class_idx_cifar10_k256_3_False.pt"].argv
    runs = kinds(plan, "condense")
    assert len(runs) == 6 * 3 and {j.name[-2:] for j in runs} == {"s0", "s1", "s2"}
    by_sampler = {}
    for j in runs:
        from dcbs.config import build_parser, resolve
        script = j.argv[0]
        cfg = resolve(build_parser("cluster" if script == "main_BS.py" else "class").parse_args(j.argv[1:]),
                      "cluster" if script == "main_BS.py" else "class")
        assert cfg.method == "DC" and cfg.seed == int(j.name[-1])
        by_sampler.setdefault(cfg.sampler, []).append(j)
        if cfg.sampler != "class":                            # each waits for the file it reads
            assert len(j.deps) == 1 and j.deps[0] in files
    assert sorted(by_sampler) == ["class", "cluster", "pruned", "representative", "stratified", "systematic"]
    # systematic reads stratified's file: no second clustering job
    assert [j.deps for j in by_sampler["systematic"]] == [["class_idx_cifar10_k256_3_False.pt"]] * 3
    assert all(j.name.startswith("SYS-DC_l3_") for j in by_sampler["systematic"])
    assert all(len(v) == 3 for v in by_sampler.values())
    # `all` stays the paper's three tables
    assert "samplers" not in sweep.make_plan(sweep.PAPER_TABLES, with_extractor, ipcs=[1]).tables
