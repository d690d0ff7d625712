"""Long runs that survive: kill/resume equality, clean interruption, guarded inputs."""
import csv
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT, run_cli, run_main

BASE = ["--preset", "smoke", "--method", "DSA", "--Iteration", 6, "--eval_it", 0, 3, 6, "--num_eval", 1,
        "--num_exp", 2, "--ckpt_every", 1, "--ipc", 2, "--num_threads", 1,
        "--model", "ConvNetW32", "--batch_real", 16]


def outputs(d):
    syn = [torch.load(os.path.join(d, f"syn_exp{e}.pt"), weights_only=True)["data"][0][0] for e in range(2)]
    acc = json.load(open(os.path.join(d, "accuracies.json")))
    rows = [{k: v for k, v in r.items() if k not in ("seconds", "sample_seconds")}   # timing differs run to run
            for r in csv.DictReader(open(os.path.join(d, "diagnostics.csv")))]
    return syn, acc, rows


def assert_same(a, b):
    assert all(torch.equal(x, y) for x, y in zip(a[0], b[0]))
    assert a[1] == b[1]
    assert a[2] == b[2]


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    save = tmp_path_factory.mktemp("ref")
    r = run_cli("main.py", *BASE, "--save_path", save, "--run_name", "ref")
    assert r.returncode == 0, r.stderr
    return outputs(os.path.join(save, "ref"))


def start(save, name, *extra):
    env = dict(os.environ, OMP_NUM_THREADS="1", DCBS_NO_DOWNLOAD="1")
    return subprocess.Popen([sys.executable, os.path.join(ROOT, "main.py"), *map(str, BASE), "--save_path", str(save),
                             "--run_name", name, *map(str, extra)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_checkpoint(d, exp, next_it, proc, timeout=300):
    path = os.path.join(d, "checkpoint.pt")
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise AssertionError("run ended before the checkpoint: " + proc.stderr.read())
        if os.path.exists(path):
            try:
                s = torch.load(path, weights_only=True)
                if (s["exp"], s["next_it"]) >= (exp, next_it):
                    return
            except Exception:
                pass
        time.sleep(0.05)
    raise AssertionError("no checkpoint in time")


@pytest.mark.parametrize("exp,next_it", [(0, 2), (1, 4)])
def test_sigkill_then_resume_equals_uninterrupted_run(tmp_path, reference_run, exp, next_it):
    p = start(tmp_path, "k")
    wait_for_checkpoint(tmp_path / "k", exp, next_it, p)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert not os.path.exists(tmp_path / "k" / "DONE")
    r = run_cli("main.py", "--resume", tmp_path / "k")
    assert r.returncode == 0, r.stderr
    assert "resumed experiment" in r.stderr and "resuming on" not in r.stderr  # same machine: no warning
    assert_same(outputs(tmp_path / "k"), reference_run)


def test_sigint_saves_a_resumable_checkpoint(tmp_path, reference_run):
    p = start(tmp_path, "i")
    wait_for_checkpoint(tmp_path / "i", 0, 1, p)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=300)
    assert p.returncode == 130, err
    assert f"--resume {tmp_path / 'i'}" in err
    s = torch.load(tmp_path / "i" / "checkpoint.pt", weights_only=True)
    assert s["next_it"] >= 1
    r = run_cli("main.py", "--resume", tmp_path / "i")
    assert r.returncode == 0, r.stderr
    assert_same(outputs(tmp_path / "i"), reference_run)


def test_resume_refuses_changed_settings_and_lists_them(tmp_path):
    p = start(tmp_path, "c")
    wait_for_checkpoint(tmp_path / "c", 0, 1, p)
    p.send_signal(signal.SIGKILL)
    p.wait()
    r = run_cli("main.py", "--resume", tmp_path / "c", "--ipc", 3, "--lr_img", 0.5, "--device", "cpu")
    assert r.returncode == 2
    err = r.stderr.strip().splitlines()[-1]
    assert "--ipc 3" in err and "--lr_img 0.5" in err and "--device" not in err
    r = run_cli("main.py", "--resume", tmp_path / "c", "--ckpt_every", 2, "--Iteration", 6)
    assert r.returncode == 0, r.stderr  # harmless or unchanged settings are allowed


# fixed random bytes: the same test ids in every pytest-xdist worker
@pytest.mark.parametrize("content", [b"PK\x03\x04 truncated", random.Random(0).randbytes(512)],
                         ids=["truncated-zip", "random-bytes"])
def test_truncated_or_foreign_checkpoint_is_refused_and_nothing_touched(tmp_path, content):
    p = start(tmp_path, "t")
    wait_for_checkpoint(tmp_path / "t", 0, 1, p)
    p.send_signal(signal.SIGKILL)
    p.wait()
    ckpt = tmp_path / "t" / "checkpoint.pt"
    ckpt.write_bytes(content)
    before = {f: os.path.getmtime(tmp_path / "t" / f) for f in os.listdir(tmp_path / "t") if f != ".lock"}
    r = run_cli("main.py", "--resume", tmp_path / "t")
    assert r.returncode == 2
    assert str(ckpt) in r.stderr and "cannot be read" in r.stderr and "Traceback" not in r.stderr
    assert {f: os.path.getmtime(tmp_path / "t" / f) for f in os.listdir(tmp_path / "t") if f != ".lock"} == before


def test_finished_run_is_not_resumed(tmp_path):
    r = run_cli("main.py", "--preset", "smoke", "--save_path", tmp_path, "--run_name", "f", "--batch_real", 16)
    assert r.returncode == 0, r.stderr
    r = run_cli("main.py", "--resume", tmp_path / "f")
    assert r.returncode == 2 and "finished" in r.stderr


def test_non_finite_stops_and_keeps_last_good_checkpoint(tmp_path):
    r = run_cli("main.py", "--preset", "smoke", "--lr_img", "1e30", "--Iteration", 5, "--eval_it", 0,
                "--model", "ConvNetW32", "--save_path", tmp_path, "--run_name", "n")
    assert r.returncode == 2, r.stderr
    err = [l for l in r.stderr.splitlines() if l.startswith("error:")][0]
    assert "non-finite" in err and "iteration" in err and "lr_img" in err
    failed_at = int(err.split("iteration ")[1].split()[0])
    s = torch.load(tmp_path / "n" / "checkpoint.pt", weights_only=True)
    assert s["next_it"] <= failed_at and torch.isfinite(s["image_syn"]).all()
    assert not os.path.exists(tmp_path / "n" / "DONE")


# the first case of each script through the script itself, the others in this process (the scripts
# only call dcbs.cli.main)
@pytest.mark.parametrize("script,extra,needle,run", [
    ("main.py", ["--mix"], "--mix does not apply to --sampler class", run_cli),
    ("main.py", ["--init", "real", "--ipc", 500], "--init real", run_main),
    ("main.py", ["--eval_it", 5, "--Iteration", 2], "--eval_it", run_main),
    ("main.py", ["--save_path", "/proc/nope"], "not writable", run_main),
    ("main_BS.py", ["--mix_after", 3], "--mix", run_cli),
    ("main_BS.py", ["--mix", "--mix_after", 5, "--Iteration", 2], "never switch", run_main),
    ("main_BS.py", ["--num_cluster", 0], "--num_cluster", run_main),
], ids=["mix", "init-real", "eval-it", "not-writable", "bs-mix-after", "bs-never-switch", "bs-num-cluster"])
def test_invalid_flag_combinations_exit_before_training(tmp_path, script, extra, needle, run):
    r = run(script, "--preset", "smoke", "--save_path", tmp_path, *extra)
    assert r.returncode != 0
    errors = [l for l in r.stderr.splitlines() if l.startswith("error:")]
    assert len(errors) == 1 and needle in errors[0], r.stderr
    assert not any(os.scandir(tmp_path)), "nothing may be written before the checks pass"


def test_compile_may_be_switched_on_and_off_on_resume(monkeypatch):
    """--compile changes results only by rounding: a resumed run may drop it (e.g. no compiler). A run
    saved before the flag was renamed (``compile_test`` in its config) resumes with its setting."""
    from types import SimpleNamespace
    import dcbs.cli as cli
    from dcbs.config import build_parser, resolve
    saved = {**vars(resolve(build_parser().parse_args(["--preset", "smoke", "--compile"]))),
             "batch_sampling": False}
    older = {**{k: v for k, v in saved.items() if k != "compile"}, "compile_test": True}
    for config in (saved, older):
        fake = SimpleNamespace(read_config=lambda: dict(config))
        monkeypatch.setattr(cli.RunDir, "open_for_resume", staticmethod(lambda path: fake))
        for flags, expected in (([], True), (["--no-compile"], False), (["--compile"], True)):
            _, cfg = cli.resume_config(build_parser().parse_args(["--resume", "somewhere", *flags]), "class")
            assert cfg["compile"] is expected and "compile_test" not in cfg, flags
    with pytest.raises(cli.ConfigError, match="--ipc 3"):  # a setting that changes the result is still refused
        cli.resume_config(build_parser().parse_args(["--resume", "somewhere", "--no-compile", "--ipc", "3"]),
                          "class")


def test_a_run_records_its_machine_and_a_resume_elsewhere_says_so(tmp_path):
    p = start(tmp_path, "m")
    wait_for_checkpoint(tmp_path / "m", 0, 1, p)
    p.send_signal(signal.SIGKILL)
    p.wait()
    cfg_path = tmp_path / "m" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    assert isinstance(cfg["machine"]["cpu"], str) and cfg["machine"]["cpu"]
    assert set(cfg["machine"]["cpu_flags"]) <= {"avx2", "fma", "avx512f", "avx512_bf16", "amx_tile"}
    cfg["machine"] = {"cpu": "Elsewhere CPU 9000", "cpu_flags": ["avx2"], "gpu": None}
    cfg_path.write_text(json.dumps(cfg))
    r = run_cli("main.py", "--resume", tmp_path / "m", "--Iteration", 6)
    assert r.returncode == 0, r.stderr
    log = (tmp_path / "m" / "log.txt").read_text()
    assert "resuming on" in log and "(started on Elsewhere CPU 9000 [avx2])" in log
