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


@pytest.fixture(scope="session")
def digits():
    from dcbs.data import load_data
    return load_data("digits")
