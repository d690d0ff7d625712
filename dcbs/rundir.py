"""The run directory: what a run leaves behind, written atomically, never overwritten.

    config.json           resolved settings, git revision, torch version, machine, command line
    log.txt               the log
    diagnostics.csv       one row per iteration (loss, gradient norms, real batch sizes)
    accuracies.json       every model's accuracy by experiment, iteration and architecture
    grid_exp{e}_it{it}.png  denormalised synthetic images, nrow = ipc
    syn_exp{e}.pt         the synthetic set of experiment e
    res_<method>_<dataset>_<model>_<ipc>ipc.pt   reference-compatible results
    checkpoint.pt         resume state (see ``Checkpoint``)
    DONE                  written last
    .lock                 held (flock) by the process writing the run: its pid, host, start time

flock may not hold on network file systems (NFS): there two writers on two machines are not caught.
"""
from __future__ import annotations

import csv
import fcntl
import fnmatch
import io
import json
import logging
import os
import platform
import re
import socket
import subprocess
import sys
import time

import torch

from .cmdline import setup_logging  # noqa: F401  (the run's log.txt)
from .io import atomic_save, atomic_write_json, atomic_write_text, safe_load, FileFormatError

__all__ = ["RunDir", "RunDirError", "git_revision", "setup_logging", "is_locked", "lock_holder",
           "check_run_name"]

log = logging.getLogger("dcbs")
CKPT_FORMAT = "dcbs-checkpoint-v1"
LOCK_NAME = ".lock"
TMP_PATTERN = ".*.tmp*"      # the temporary names of dcbs.io.atomic_write


class RunDirError(RuntimeError):
    pass


# --------------------------------------------------------------------------- #
# run names
# --------------------------------------------------------------------------- #
def check_run_name(name: str) -> None:
    """Raises RunDirError unless ``name`` is one plain folder name (it is joined to --save_path)."""
    seps = {"/", os.sep} | ({os.altsep} if os.altsep else set())
    if not name or name in (".", "..") or any(s in name for s in seps) or "\0" in name or os.path.isabs(name):
        raise RunDirError(f"--run_name {name!r} must be one folder name (no '/', not '.' or '..', not empty), "
                          f"e.g. --run_name my_run; choose the folder it goes in with --save_path")


# --------------------------------------------------------------------------- #
# the lock: one writer per run directory
# --------------------------------------------------------------------------- #
_HELD: dict[str, list] = {}   # realpath of a lock file -> [fd, holders in this process]


def _lock_path(run_path: str) -> str:
    return os.path.join(run_path, LOCK_NAME)


def lock_holder(run_path: str) -> str:
    """Who holds the run's lock, as written by it: 'process 1234 (started ...)'."""
    try:
        with open(_lock_path(run_path), encoding="utf-8") as f:
            info = json.loads(f.read() or "{}")
    except (OSError, ValueError):
        info = {}
    if not isinstance(info, dict) or "pid" not in info:
        return "another process"
    host = info.get("host")
    where = f" on host {host}" if host and host != socket.gethostname() else ""
    return f"process {info['pid']}{where} (started {info.get('started', 'at an unknown time')})"


def is_locked(run_path: str) -> bool:
    """Whether a process (this one included) writes the run directory now. Writes nothing."""
    try:
        fd = os.open(_lock_path(run_path), os.O_RDONLY)
    except OSError:
        return False          # no lock file: no writer since locks exist, or not a run
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)          # closing drops the shared lock if we got it
    return False


class _RunLock:
    """An exclusive flock on ``<run>/.lock`` for as long as this object (or the process) lives."""

    def __init__(self, run_path: str):
        self.path = os.path.realpath(_lock_path(run_path))
        held = _HELD.get(self.path)
        if held is not None:  # this process holds it already (one RunDir per run is the rule; tests make more)
            held[1] += 1
            return
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RunDirError(f"run directory {run_path} is being written by {lock_holder(run_path)}; "
                              f"wait for it to finish or stop it") from None
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                "argv": sys.argv}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        _HELD[self.path] = [fd, 1]

    def release(self) -> None:
        held = _HELD.get(self.path)
        if held is None:
            return
        held[1] -= 1
        if held[1] == 0:
            del _HELD[self.path]
            os.close(held[0])  # drops the flock; the file stays (unlinking it would race with a new locker)
        self.path = None

    def __del__(self):
        if getattr(self, "path", None):
            self.release()


def git_revision() -> str:
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (rev or "unknown") + ("+dirty" if dirty else "")
    except Exception:
        return "unknown"


_ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile")


def machine_info() -> dict:
    """The CPU (model and the vector extensions that change fp32 rounding) and GPU a run computes on."""
    cpu, flags = platform.processor() or platform.machine(), []
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
        name = re.search(r"^model name\s*:\s*(.+)$", info, re.M)
        fl = re.search(r"^flags\s*:\s*(.+)$", info, re.M)
        cpu = name.group(1).strip() if name else cpu
        family = re.search(r"^cpu family\s*:\s*(\d+)$", info, re.M)
        model = re.search(r"^model\s*:\s*(\d+)$", info, re.M)
        if family and model:
            cpu += f" (family {family.group(1)} model {model.group(1)})"
        flags = [f for f in _ISA_FLAGS if fl and f in fl.group(1).split()]
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": cpu, "cpu_flags": flags, "gpu": gpu}


class RunDir:
    """A run directory, locked (``.lock``) for writing by this process while the object lives."""

    def __init__(self, path: str, lock: bool = True):
        self.path = path
        self._lock = _RunLock(path) if lock else None
        self.removed_tmp: list[str] = []

    def close(self) -> None:
        """Releases the lock before the process ends (it is released at exit anyway)."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    # ------------------------------------------------------------------ create / open
    @classmethod
    def create(cls, save_path: str, run_name: str | None, default_name: str) -> "RunDir":
        """A new, empty run directory; an explicit name that exists is refused, a default one gets a suffix."""
        name = default_name if run_name is None else run_name
        check_run_name(name)
        os.makedirs(save_path, exist_ok=True)
        path = os.path.join(save_path, name)
        if run_name is None:
            k = 1
            while os.path.exists(path):
                path = os.path.join(save_path, f"{name}_{k}")
                k += 1
        try:
            os.makedirs(path)
        except FileExistsError:
            raise RunDirError(f"run directory {path} already exists; choose another --run_name, "
                              f"or continue it with --resume {path}") from None
        return cls(path)

    @classmethod
    def open_for_resume(cls, path: str) -> "RunDir":
        """The run at ``path``, locked; refuses non-runs, finished runs, runs another process writes."""
        if not os.path.isdir(path):
            raise RunDirError(f"--resume {path}: no such run directory")
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise RunDirError(f"--resume {path}: {path} is not a run directory (no config.json); pass the "
                              f"folder of a run made by main.py/main_BS.py")
        if os.path.exists(os.path.join(path, "DONE")):
            raise RunDirError(f"--resume {path}: this run is finished (DONE exists); nothing to resume")
        rd = cls(path)
        if not os.path.exists(rd.file("checkpoint.pt")):
            rd.close()
            raise RunDirError(f"--resume {path}: no checkpoint.pt in it (the run stopped before its first "
                              f"checkpoint); start it again without --resume")
        return rd

    def _remove_stale_tmp(self) -> None:
        """Deletes the half-written temporary files of a killed writer (called by the lock holder only)."""
        stale = sorted(f for f in os.listdir(self.path)
                       if fnmatch.fnmatch(f, TMP_PATTERN) and os.path.isfile(self.file(f)))
        for f in stale:
            os.unlink(self.file(f))
        self.removed_tmp = stale
        if stale:
            # logging is set up for this run only later: the line goes to the console and log.txt now
            line = (f"{time.strftime('%Y-%m-%d %H:%M:%S')} removed {len(stale)} temporary file(s) left by an "
                    f"interrupted write: {', '.join(stale)}")
            print(line, file=sys.stderr)
            with open(self.file("log.txt"), "a", encoding="utf-8") as f:
                f.write(line + "\n")

    def file(self, name: str) -> str:
        return os.path.join(self.path, name)

    @property
    def done(self) -> bool:
        return os.path.exists(self.file("DONE"))

    # ------------------------------------------------------------------ writers
    def write_config(self, cfg: dict) -> None:
        atomic_write_json(self.file("config.json"), cfg)

    def read_config(self) -> dict:
        try:
            with open(self.file("config.json"), encoding="utf-8") as f:
                return json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise RunDirError(f"{self.file('config.json')} cannot be read: {e}") from None

    def write_diagnostics(self, rows: list[dict]) -> None:
        if not rows:
            return
        cols = []
        for r in rows:
            cols += [k for k in r if k not in cols]
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)
        atomic_write_text(self.file("diagnostics.csv"), buf.getvalue())

    def write_accuracies(self, acc: dict) -> None:
        atomic_write_json(self.file("accuracies.json"), acc)

    def save_grid(self, images_vis: torch.Tensor, exp: int, it: int, nrow: int) -> str:
        from torchvision.utils import save_image
        from .io import atomic_write
        path = self.file(f"grid_exp{exp}_it{it}.png")
        atomic_write(path, lambda tmp: save_image(images_vis, tmp, nrow=nrow))
        return path

    def save(self, obj, name: str) -> str:
        atomic_save(obj, self.file(name))
        return self.file(name)

    def mark_done(self, summary: str) -> None:
        atomic_write_text(self.file("DONE"), summary + "\n")

    # ------------------------------------------------------------------ checkpoint
    def save_checkpoint(self, state: dict) -> None:
        state = dict(state, format=CKPT_FORMAT, saved_at=time.time())
        atomic_save(state, self.file("checkpoint.pt"))

    def load_checkpoint(self) -> dict:
        path = self.file("checkpoint.pt")
        try:
            state = safe_load(path, "checkpoint")
        except FileFormatError as e:
            raise RunDirError(str(e)) from None
        if not isinstance(state, dict) or state.get("format") != CKPT_FORMAT:
            raise RunDirError(f"checkpoint {path} is not a dcbs checkpoint (format "
                              f"{state.get('format') if isinstance(state, dict) else type(state).__name__})")
        if self._lock is not None:  # the resume goes ahead: what a killed write left is garbage now
            self._remove_stale_tmp()
        return state
