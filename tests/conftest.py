import os
import shutil
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("DCBS_NO_DOWNLOAD", "1")
torch.set_num_threads(1)


def pytest_xdist_auto_num_workers(config):
    """``-n auto``: one worker per usable core (the container's, not the host's), at most 8:
    every worker holds its own torch and test data."""
    return max(1, min(len(os.sched_getaffinity(0)), 8))


# torch.compile (--compile) on the CPU: inductor builds C++ kernels
needs_cxx = pytest.mark.skipif(not (shutil.which("c++") or shutil.which("g++")),
                               reason="torch.compile on the CPU needs a C++ compiler")


def run_cli(script, *args, timeout=600, env=None):
    """Runs one of our scripts as a user would; returns the CompletedProcess."""
    e = dict(os.environ, OMP_NUM_THREADS="1", DCBS_NO_DOWNLOAD="1", PYTHONHASHSEED="0")
    e.update(env or {})
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout, env=e)


def run_main(script, *args):
    """main.py or main_BS.py in this process, for input they refuse before any training: both scripts
    are ``sys.exit(main(argv, default_sampler))``, so this skips only the ~3 s start of a new Python.
    Returns what run_cli returns (returncode, stdout, stderr)."""
    import contextlib
    import io
    from types import SimpleNamespace
    from dcbs.cli import main
    sampler = {"main.py": "class", "main_BS.py": "cluster"}[script]
    out, err, cwd = io.StringIO(), io.StringIO(), os.getcwd()
    os.chdir(ROOT)                      # as run_cli: relative defaults (checkpoints/, results/) under the repository
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                rc = main([str(a) for a in args], default_sampler=sampler)
            except SystemExit as e:     # argparse's refusals
                rc = e.code
    finally:
        os.chdir(cwd)
    return SimpleNamespace(returncode=rc, stdout=out.getvalue(), stderr=err.getvalue())


@pytest.fixture(scope="session")
def digits():
    from dcbs.data import load_data
    return load_data("digits")
