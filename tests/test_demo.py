"""reproduce.py demo, the README's first command: the whole pipeline end to end, in its smoke form.

``--smoke`` is the demo's pipeline (main_cluster.py, main.py and main_BS.py, plot_runs.py as
subprocesses) with ``--preset smoke`` and a two-step extractor. What a user relies on: the
table holds both methods, the figures it names exist, the commands it ran are ones the scripts
accept, the same command again reuses the finished steps instead of redoing or overwriting
them, an interrupted run is continued, and a folder made with other settings is refused with a
message naming --save_path.
"""
from __future__ import annotations

import json
import os
import re
import shlex

import pytest

from conftest import ROOT, run_cli

from dcbs import demo as dm


def _demo(save_path, *more):
    return run_cli("reproduce.py", "demo", "--smoke", "--save_path", save_path, "--device", "cpu", *more, timeout=600)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    path = tmp_path_factory.mktemp("demo") / "demo"
    r = _demo(path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return path, r


def _demo_here(capsys, save_path, *more):
    """reproduce.py demo in this process (reproduce.py only calls reproduce_cli.main), for refusals:
    (exit status, stderr)."""
    from dcbs import reproduce_cli
    capsys.readouterr()
    rc = reproduce_cli.main(["demo", "--smoke", "--save_path", str(save_path), "--device", "cpu", *more])
    return rc, capsys.readouterr().err


def _figures(stdout: str) -> list[str]:
    tail = stdout.split("\nfigures:\n", 1)[1]
    return [ln.split()[-1] for ln in tail.splitlines() if ln.startswith("  ") and ln.strip().endswith(".png")]


def test_prints_the_table_of_both_methods(smoke):
    _, r = smoke
    assert "reduced protocol (--preset smoke: 2 iterations, real batches of 16" in r.stdout
    rows = [ln for ln in r.stdout.splitlines() if ln.startswith("| ")]
    assert rows[0] == "| method | iteration 2 |" and len(rows) == 3
    dc, bs = rows[1], rows[2]
    assert dc.startswith("| DC |") and bs.startswith("| BS(DC) k=5, layer 2, norm |")
    for row in (dc, bs):
        assert re.search(r"\| \d+\.\d\d ± \d+\.\d\d \(n=1\) \|$", row), row


def test_draws_every_figure_it_names(smoke):
    path, r = smoke
    figs = _figures(r.stdout)
    for f in figs:
        assert os.path.isfile(f), f
    names = {os.path.basename(f) for f in figs}
    assert "class_idx_digits_k5_2_True_ConvNet_class0_clusters.png" in names      # step 1: the clusters
    assert {os.path.join("DC", "grid_exp0_it2.png"), os.path.join("BS", "grid_exp0_it2.png")} <= {
        os.path.relpath(f, path / "runs") for f in figs}                             # step 2: both synthetic sets
    assert {"dc_vs_bs_grad_norms.png", "dc_vs_bs_loss.png", "dc_vs_bs_synthetic.png"} <= names   # step 3


def test_the_commands_it_ran_are_the_scripts_own(smoke):
    from dcbs import cluster_cli as main_cluster
    from dcbs import plot_cli as plot_runs
    from dcbs.config import build_parser, resolve
    path, r = smoke
    with open(path / "demo.json", encoding="utf-8") as f:
        doc = json.load(f)
    assert [c[0] for c in doc["commands"]] == ["main_cluster.py", "main.py", "main_BS.py", "plot_runs.py"]
    first = doc["invocations"][0]
    assert all(c in doc["commands"] for c in first["ran"]) and len(first["ran"]) == 3
    for script, *argv in doc["commands"]:
        if script == "main_cluster.py":
            main_cluster.build_parser().parse_args(argv)
        elif script == "plot_runs.py":
            plot_runs.build_parser().parse_args(argv)
        else:
            sampler = "cluster" if script == "main_BS.py" else "class"
            cfg = resolve(build_parser(sampler).parse_args(argv), sampler)
            assert cfg.preset == "smoke" and cfg.seed == 0 and cfg.sampler == sampler
        assert f"python {shlex.join([script, *argv])}" in r.stdout     # shown as a user would type it
    assert first["finished"] and first["rows"][0]["method"] == "DC" and first["rows"][1]["accuracy"]["2"]


def test_the_same_command_again_reuses_what_is_finished(smoke):
    path, first = smoke
    done = {n: os.path.getmtime(path / "runs" / n / "DONE") for n in ("DC", "BS")}
    cluster = path / "checkpoints" / "class_idx_digits_k5_2_True_ConvNet.pt"
    stamp = os.path.getmtime(cluster)
    r = _demo(path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    for step in ("cluster", "DC", "BS"):
        assert f"  reuse {step}: finished before" in r.stdout
    assert "start DC" not in r.stdout and "start BS" not in r.stdout and "start cluster" not in r.stdout
    assert {n: os.path.getmtime(path / "runs" / n / "DONE") for n in ("DC", "BS")} == done
    assert os.path.getmtime(cluster) == stamp
    with open(path / "demo.json", encoding="utf-8") as f:
        assert [e["ran"] == [] for e in json.load(f)["invocations"]] == [False, True]
    table = [ln for ln in first.stdout.splitlines() if ln.startswith("| ")]
    assert table == [ln for ln in r.stdout.splitlines() if ln.startswith("| ")]


def test_a_demo_of_other_settings_is_refused(smoke, capsys):
    path, _ = smoke
    rc, err = _demo_here(capsys, path, "--num_cluster", "3")
    assert rc == 2
    assert f"--save_path {path} holds a demo made with num_cluster=5" in err
    assert not os.path.exists(path / "checkpoints" / "class_idx_digits_k3_2_True_ConvNet.pt")


def test_a_folder_that_is_not_a_demo_is_refused(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    rc, err = _demo_here(capsys, tmp_path)
    assert rc == 2 and "holds no demo" in err and "--save_path" in err
    assert os.listdir(tmp_path) == ["notes.txt"] or set(os.listdir(tmp_path)) == {"notes.txt", ".lock"}


def test_an_interrupted_run_resumes_and_a_stale_one_starts_again(tmp_path):
    s = dm.DemoSettings(save_path=str(tmp_path), smoke=True, device="cpu")
    fresh = dm.plan_commands(s)
    run = tmp_path / "runs" / "DC"
    run.mkdir(parents=True)
    (run / "config.json").write_text("{}")
    (run / "checkpoint.pt").write_bytes(b"")
    state, argv = dm._run_step(s, "DC", fresh["DC"])
    assert state == "resume" and argv == ["main.py", "--resume", str(run), "--num_threads", "1", "--device", "cpu"]
    (run / "checkpoint.pt").unlink()                  # killed before its first checkpoint
    state, argv = dm._run_step(s, "DC", fresh["DC"])
    assert state == "restart" and argv == fresh["DC"] and not run.exists()
    assert len(os.listdir(tmp_path / "runs" / ".stale")) == 1


def test_a_run_another_process_writes_is_refused(tmp_path):
    from dcbs.rundir import RunDir
    s = dm.DemoSettings(save_path=str(tmp_path), smoke=True)
    run = RunDir.create(str(tmp_path / "runs"), "BS", "BS")      # holds the run's lock until closed
    try:
        with pytest.raises(dm.DemoError, match="another --save_path"):
            dm._run_step(s, "BS", dm.plan_commands(s)["BS"])
    finally:
        run.close()


def test_readme_starts_with_the_demo():
    from dcbs import reproduce_cli as reproduce
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        text = f.read()
    setup = text.split("## Set-up", 1)[1]
    block = re.search(r"^```bash\n(.*?)^```", setup, flags=re.S | re.M).group(1)
    first = next(w for w in (shlex.split(ln, comments=True) for ln in block.splitlines()) if w)
    assert first == ["pip", "install", "-r", "requirements.txt", "&&", "python", "reproduce.py", "demo"]
    assert reproduce.build_demo_parser().parse_args([]).save_path == os.path.join("results", "demo")
