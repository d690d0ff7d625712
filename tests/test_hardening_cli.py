"""Bad input at the command line: one clear error line, no run directory, nothing half-written."""
import os
from types import SimpleNamespace

import pytest
import torch

from conftest import run_cli, run_main


def _error(r):
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    return lines[0]


# the first case through main.py itself, the others in this process (main.py only calls dcbs.cli.main)
@pytest.mark.parametrize("flags,words,run", [
    (["--epoch_eval_train", 0], ["--epoch_eval_train must be at least 1", "untrained"], run_cli),
    (["--lr_img", "inf"], ["--lr_img must be a positive finite number"], run_main),
    (["--lr_net", "nan"], ["--lr_net must be a positive finite number"], run_main),
    (["--eval_it", -1], ["--eval_it [-1]", "count from 0"], run_main),
    (["--outer_loop", 0], ["--outer_loop must be at least 1"], run_main),
    (["--run_name", "../escaped"], ["--run_name"], run_main),
], ids=["epoch_eval_train", "lr_img", "lr_net", "eval_it", "outer_loop", "run_name"])
def test_bad_values_are_refused_up_front(tmp_path, flags, words, run):
    line = _error(run("main.py", "--preset", "smoke", "--save_path", tmp_path / "out", *flags))
    assert all(w in line for w in words), line
    assert not (tmp_path / "out").exists() and not (tmp_path / "escaped").exists()


def _saved_set(tmp_path, images, labels):
    path = tmp_path / "syn.pt"
    torch.save({"data": [[images, labels]], "dataset": "digits", "normalized": True}, path)
    return path


@pytest.mark.parametrize("what", ["nan", "inf", "labels"])
def test_a_broken_synthetic_set_is_refused_before_any_run_directory(tmp_path, what):
    """The first case through main.py itself, the others in this process (main.py only calls dcbs.cli.main)."""
    x, y = torch.zeros(10, 1, 28, 28), torch.arange(10)
    if what == "nan":
        x[3, 0, 5, 5] = float("nan")
    elif what == "inf":
        x[0] = float("inf")
    else:
        y[4] = 12
    run = run_cli if what == "nan" else run_main
    line = _error(run("main.py", "--load_syn", _saved_set(tmp_path, x, y), "--save_path", tmp_path / "out"))
    assert "syn.pt" in line and ("non-finite" in line or "label" in line), line
    assert not (tmp_path / "out").exists()


def test_smoke_preset_is_short_at_ipc_10_and_says_so(tmp_path):
    r = run_cli("main.py", "--preset", "smoke", "--ipc", 10, "--save_path", tmp_path, "--run_name", "s",
                "--eval_it", 2, "--num_threads", 1, "--batch_real", 16)   # small real batches: the preset's loops are checked
    assert r.returncode == 0, r.stderr
    log = (tmp_path / "s" / "log.txt").read_text()
    assert "outer_loop 1, inner_loop 1" in log and "REDUCED" in log


def test_a_run_resumed_by_the_other_script_names_the_right_one(tmp_path):
    r = run_cli("main.py", "--preset", "smoke", "--save_path", tmp_path, "--run_name", "dc", "--Iteration", 1,
                "--eval_it", 1, "--batch_real", 16)
    assert r.returncode == 0, r.stderr
    os.remove(tmp_path / "dc" / "DONE")                     # as if killed after its last checkpoint
    os.replace(tmp_path / "dc" / "checkpoint_final.pt", tmp_path / "dc" / "checkpoint.pt")
    line = _error(run_cli("main_BS.py", "--resume", tmp_path / "dc"))
    assert "main.py (--sampler class) made this run" in line and f"python main.py --resume {tmp_path / 'dc'}" in line


def test_help_says_each_default_once(capsys):
    # in this process: each script only calls its main (test_samplers runs main.py -h and main_BS.py -h as scripts)
    from dcbs.cluster_cli import main as cluster_main
    for script in ("main.py", "main_BS.py", "main_cluster.py"):
        if script == "main_cluster.py":
            capsys.readouterr()
            with pytest.raises(SystemExit) as e:
                cluster_main(["-h"])
            r = SimpleNamespace(returncode=e.value.code, stdout=capsys.readouterr().out)
        else:
            r = run_main(script, "-h")
        assert r.returncode == 0
        text = " ".join(r.stdout.split())
        assert text.startswith("usage:") and "--help" in text
        assert "(default: None)" not in text
        assert "default 20) (default: 20)" not in text and "(default 20 (default" not in text


def test_the_printed_cluster_command_works_and_batch_sampling_follows(tmp_path, digits):
    """main_BS.py names the main_cluster.py command that makes its missing file; run as printed (from another
    folder, so its results/ lands there), it makes the file, and the same main_BS.py command then runs."""
    import shlex
    import subprocess
    import sys
    from conftest import ROOT
    from dcbs import extractor as ex
    ck = tmp_path / "ck"
    ck.mkdir()
    net = ex.build_extractor("ConvNet", digits.channel, digits.num_classes, digits.im_size, seed=3)
    torch.save(net.state_dict(), ck / "ConvNet_digits.pt")      # a small extractor, made first
    bs = ["--dataset", "digits", "--layer_idx", 2, "--num_cluster", 20, "--norm", "--cluster_model", "ConvNet",
          "--cluster_path", ck, "--preset", "smoke", "--ipc", 10, "--save_path", tmp_path / "runs",
          "--num_threads", 1, "--eval_it", 2,      # one evaluation: the run is what is checked
          "--model", "ConvNetW32"]                 # the condensation network: any, the extractor is ConvNet
    line = _error(run_main("main_BS.py", *bs, "--run_name", "first"))
    cmd = shlex.split(line.split("make it with: ")[1])
    assert cmd[:2] == ["python", "main_cluster.py"] and "--norm" in cmd
    env = dict(os.environ, OMP_NUM_THREADS="1", DCBS_NO_DOWNLOAD="1")
    r = subprocess.run([sys.executable, os.path.join(ROOT, cmd[1]), *cmd[2:]], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    r = run_cli("main_BS.py", *bs, "--run_name", "second")
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "runs" / "second" / "DONE").exists()
