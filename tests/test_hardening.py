"""Bad input and concurrent use: the run-directory lock, run names, resume of non-runs and of killed
writes, ImageFolder trees and download roots, non-finite synthetic sets."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT, run_cli, run_main
from dcbs.data import DataError, load_data
from dcbs.io import FileFormatError
from dcbs.rundir import RunDir, RunDirError


def one_error_line(stderr: str) -> str:
    errors = [ln for ln in stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, stderr
    return errors[0]


def fake_run(path, checkpoint=True, **cfg):
    """A run directory as main.py leaves it after its first checkpoint (content is not read here)."""
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)
    if checkpoint:
        open(os.path.join(path, "checkpoint.pt"), "wb").write(b"")
    return str(path)


HOLDER = """
import sys, time
sys.path.insert(0, {root!r})
from dcbs.rundir import RunDir
rd = RunDir.create({save!r}, {name!r}, "unused")
print("locked", flush=True)
time.sleep(600)
"""


@pytest.fixture
def holder(tmp_path):
    """A second process that made the run directory tmp_path/held and holds it; killed at the end."""
    p = subprocess.Popen([sys.executable, "-c", HOLDER.format(root=ROOT, save=str(tmp_path), name="held")],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = p.stdout.readline()
    assert line.strip() == "locked", p.stderr.read()
    yield p
    if p.poll() is None:
        p.kill()
    p.wait()


# --------------------------------------------------------------------------- #
# 1. the run-directory lock
# --------------------------------------------------------------------------- #
def test_second_writer_is_refused_naming_the_holder_and_sigkill_frees_the_lock(tmp_path, holder):
    from dcbs.rundir import is_locked
    path = fake_run(tmp_path / "held")          # the holder is still at its first iterations
    assert is_locked(path)
    with pytest.raises(RunDirError) as e:
        RunDir.open_for_resume(path)
    msg = str(e.value)
    assert f"run directory {path} is being written by process {holder.pid}" in msg
    assert "(started " in msg and "wait for it to finish or stop it" in msg and "\n" not in msg
    holder.send_signal(signal.SIGKILL)          # no cleanup code runs: the OS drops the lock
    holder.wait()
    assert not is_locked(path)
    rd = RunDir.open_for_resume(path)
    assert is_locked(path)                      # now this process holds it
    info = open(os.path.join(path, ".lock")).read()
    assert str(os.getpid()) in info
    rd.close()
    assert not is_locked(path)


def test_resume_while_the_run_is_written_gives_one_error_line(tmp_path, holder):
    path = fake_run(tmp_path / "held")
    r = run_cli("main.py", "--resume", path)
    assert r.returncode == 2
    err = one_error_line(r.stderr)
    assert f"is being written by process {holder.pid}" in err and "Traceback" not in r.stderr


def test_is_locked_never_writes_into_a_directory(tmp_path):
    from dcbs.rundir import is_locked
    (tmp_path / "r").mkdir()
    assert not is_locked(str(tmp_path / "r")) and not is_locked(str(tmp_path / "missing"))
    assert os.listdir(tmp_path / "r") == []


def test_sweep_classifies_a_locked_run_as_running_never_stale(tmp_path, holder):
    from dcbs import sweep
    s = sweep.Settings(dataset="CIFAR10", save_path=str(tmp_path), cluster_path=str(tmp_path / "ck"))
    # the holder's run stands for DC ipc1; it has no checkpoint yet (would be "restart" = stale if unlocked)
    os.rename(tmp_path / "held", tmp_path / "DC_CIFAR10_ipc1_full_s0")   # the lock follows the inode
    fake_run(tmp_path / "DC_CIFAR10_ipc1_full_s0", checkpoint=False, dataset="CIFAR10", ipc=1, seed=0,
             preset=None, method="DC", batch_sampling=False)
    plan = sweep.make_plan(["table1"], s, ipcs=[1], methods=["DC"])
    (job,) = plan.jobs
    assert job.state == "running" and not job.to_run and plan.waves == []
    assert any("running" in line and job.name in line for line in sweep.describe(plan))
    sweep.Runner("inline", echo=lambda *_: None).run(plan)
    assert os.path.isdir(job.path) and not os.path.exists(tmp_path / ".stale")
    holder.kill()
    holder.wait()
    assert sweep.make_plan(["table1"], s, ipcs=[1], methods=["DC"]).jobs[0].state == "restart"


def test_lock_file_is_ignored_by_git_even_in_tracked_results():
    for p in ("results/real/some_run/.lock", "results/x/.lock"):
        r = subprocess.run(["git", "check-ignore", "-q", p], cwd=ROOT)
        assert r.returncode == 0, p


# --------------------------------------------------------------------------- #
# 2. --run_name is one plain folder name
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("name", ["a/b", "..", ".", "", "a/../../b", "ABS"])
def test_run_name_must_be_one_plain_path_component(tmp_path, name):
    save = tmp_path / "save"
    if name == "ABS":
        name = str(tmp_path / "elsewhere")
    with pytest.raises(RunDirError) as e:
        RunDir.create(str(save), name, "default")
    msg = str(e.value)
    assert "--run_name" in msg and "one folder name" in msg and "--save_path" in msg
    assert not (tmp_path / "elsewhere").exists() and not (tmp_path / "b").exists()
    assert not save.exists() or os.listdir(save) == []


def test_bad_run_name_on_the_command_line(tmp_path):
    # in this process: main.py only calls dcbs.cli.main
    r = run_main("main.py", "--preset", "smoke", "--save_path", tmp_path, "--run_name", "a/b")
    assert r.returncode == 2
    assert "--run_name" in one_error_line(r.stderr)
    assert not (tmp_path / "a").exists()


# --------------------------------------------------------------------------- #
# 3. resume: folders that never were runs, leftovers of killed writes
# --------------------------------------------------------------------------- #
def test_resume_of_a_folder_that_is_not_a_run(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(RunDirError) as e:
        RunDir.open_for_resume(str(tmp_path))
    assert str(e.value) == (f"--resume {tmp_path}: {tmp_path} is not a run directory (no config.json); pass the "
                            f"folder of a run made by main.py/main_BS.py")
    assert sorted(os.listdir(tmp_path)) == ["notes.txt"]        # nothing written into it
    r = run_main("main.py", "--resume", tmp_path)          # main.py only calls dcbs.cli.main
    assert r.returncode == 2 and "is not a run directory" in one_error_line(r.stderr)


def test_resume_removes_temporary_files_of_killed_writes(tmp_path, capsys):
    rd = RunDir.create(str(tmp_path), "r", "unused")
    rd.write_config({"method": "DC"})
    rd.save_checkpoint({"exp": 0, "next_it": 3})
    rd.close()                                    # the writer is gone (killed mid-write)
    path = rd.path
    leftovers = [".checkpoint.k2j3h4.tmp.pt", ".diagnostics.a1b2.tmp.csv", ".grid_exp0_it3.zz.tmp.png"]
    for f in leftovers:
        (tmp_path / "r" / f).write_bytes(b"half")
    keep = {"config.json", "checkpoint.pt", "tmp_notes.txt"}
    (tmp_path / "r" / "tmp_notes.txt").write_text("mine")
    rd = RunDir.open_for_resume(path)
    assert set(leftovers) <= set(os.listdir(path))   # kept while the resume may still be refused
    assert rd.load_checkpoint()["next_it"] == 3       # the resume goes ahead: they go
    assert keep <= set(os.listdir(path)) and not set(leftovers) & set(os.listdir(path))
    note = open(os.path.join(path, "log.txt")).read()
    assert "removed 3 temporary file(s)" in note and ".checkpoint.k2j3h4.tmp.pt" in note
    assert "removed 3 temporary file(s)" in capsys.readouterr().err
    rd.close()


def test_temporary_files_are_kept_while_another_process_writes(tmp_path, holder):
    path = fake_run(tmp_path / "held")
    (tmp_path / "held" / ".checkpoint.abc.tmp.pt").write_bytes(b"being written")
    with pytest.raises(RunDirError, match="being written by process"):
        RunDir.open_for_resume(path)
    assert (tmp_path / "held" / ".checkpoint.abc.tmp.pt").exists()


# --------------------------------------------------------------------------- #
# 4. ImageFolder trees and download roots
# --------------------------------------------------------------------------- #
CLASSES = [str(i) for i in range(10)]


def write_tree(root, per_class=2, splits=("train", "test"), classes=CLASSES):
    rng = np.random.default_rng(0)
    for split in splits:
        for c in classes:
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8), mode="L").save(
                    root / split / c / f"{i}.png")


def tree_listing(root):
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, ds, fs in os.walk(root) for f in ds + fs)


@pytest.fixture
def offline(monkeypatch):
    """Downloads are attempted (no DCBS_NO_DOWNLOAD) and fail as they do without a network."""
    monkeypatch.delenv("DCBS_NO_DOWNLOAD", raising=False)

    def urlopen(*a, **k):
        raise urllib.error.URLError("offline (test)")
    monkeypatch.setattr(urllib.request, "urlopen", urlopen)


@pytest.mark.parametrize("present,missing", [("train", "test"), ("test", "train")])
def test_tree_missing_a_split_says_which_and_writes_nothing(tmp_path, offline, present, missing):
    write_tree(tmp_path, splits=(present,))
    before = tree_listing(tmp_path)
    with pytest.raises(DataError) as e:
        load_data("MNIST", str(tmp_path))
    msg = str(e.value)
    assert f"no {missing}/" in msg and "both" in msg and "could not be downloaded" not in msg and "\n" not in msg
    assert tree_listing(tmp_path) == before                 # no MNIST/raw/ inside the user's tree


def test_empty_class_folder_is_named(tmp_path):
    write_tree(tmp_path)
    for f in (tmp_path / "train" / "3").iterdir():
        f.unlink()
    with pytest.raises(DataError) as e:
        load_data("MNIST", str(tmp_path))
    assert os.path.join(str(tmp_path), "train", "3") in str(e.value) and "no images" in str(e.value)


@pytest.mark.parametrize("kind", ["garbage", "truncated"])
def test_unreadable_image_is_named(tmp_path, kind):
    write_tree(tmp_path)
    bad = tmp_path / "test" / "7" / "1.png"
    data = bad.read_bytes()
    bad.write_bytes(b"not an image at all" if kind == "garbage" else data[: len(data) // 2])
    with pytest.raises(DataError) as e:
        load_data("MNIST", str(tmp_path))
    msg = str(e.value)
    assert str(bad) in msg and "cannot be read" in msg and "\n" not in msg


def test_test_classes_must_be_the_training_classes(tmp_path):
    write_tree(tmp_path)
    os.rename(tmp_path / "test" / "9", tmp_path / "test" / "nine")   # same count, other name: labels would shift
    with pytest.raises(DataError, match="nine"):
        load_data("MNIST", str(tmp_path))


@pytest.mark.parametrize("name", ["CIFAR10", "MNIST"])
def test_failed_download_leaves_no_folder_behind(tmp_path, offline, name):
    root = tmp_path / "data"
    with pytest.raises(DataError) as e:
        load_data(name, str(root))
    assert "could not be downloaded" in str(e.value)
    assert not root.exists()
    # a folder the user made is kept, only what the attempt created inside it goes
    root.mkdir()
    (root / "readme.txt").write_text("mine")
    with pytest.raises(DataError):
        load_data(name, str(root))
    assert tree_listing(root) == ["readme.txt"]


def test_offline_not_found_names_the_offline_datasets(tmp_path):
    with pytest.raises(DataError) as e:
        load_data("CIFAR10", str(tmp_path / "nothing"))
    assert "--dataset digits" in str(e.value) and "--preset demo" in str(e.value)
    assert not (tmp_path / "nothing").exists()


# --------------------------------------------------------------------------- #
# 5. non-finite synthetic sets
# --------------------------------------------------------------------------- #
def test_check_synthetic_set():
    from dcbs.evaluate import check_synthetic_set
    x, y = torch.randn(20, 1, 28, 28), torch.arange(10).repeat(2)
    check_synthetic_set(x, y, 10, "syn.pt entry 0")
    for bad_x, needle in [(x.clone().index_fill_(0, torch.tensor([3]), float("nan")), "NaN"),
                          (x.clone().index_fill_(0, torch.tensor([5]), float("inf")), "inf")]:
        with pytest.raises(FileFormatError) as e:
            check_synthetic_set(bad_x, y, 10, "syn.pt entry 0")
        msg = str(e.value)
        assert msg.startswith("syn.pt entry 0: ") and needle in msg and "\n" not in msg
    for bad_y in (torch.tensor([*range(10), *range(9), 10]), torch.tensor([-1, *range(10), *range(9)])):
        with pytest.raises(FileFormatError, match=r"outside 0\.\.9"):
            check_synthetic_set(x, bad_y, 10, "syn.pt entry 1")
    with pytest.raises(FileFormatError, match="20 images but 19 labels"):
        check_synthetic_set(x, y[:19], 10, "syn.pt")
    with pytest.raises(FileFormatError, match="labels"):
        check_synthetic_set(x, y.float() + 0.5, 10, "syn.pt")
