"""The run directory: what a run leaves behind, written atomically, never overwritten.

    config.json           resolved settings, git revision, torch version, command line
    log.txt               the log
    diagnostics.csv       one row per iteration (loss, gradient norms, real batch sizes)
    accuracies.json       every model's accuracy by experiment, iteration and architecture
    grid_exp{e}_it{it}.png  denormalised synthetic images, nrow = ipc
    syn_exp{e}.pt         the synthetic set of experiment e
    res_<method>_<dataset>_<model>_<ipc>ipc.pt   reference-compatible results
    checkpoint.pt         resume state (see ``Checkpoint``)
    DONE                  written last
"""
from __future__ import annotations

import csv
import io
import json
import logging
import os
import subprocess
import sys
import time

import torch

from .io import atomic_save, atomic_write_json, atomic_write_text, safe_load, FileFormatError

__all__ = ["RunDir", "RunDirError", "git_revision", "setup_logging"]

log = logging.getLogger("dcbs")
CKPT_FORMAT = "dcbs-checkpoint-v1"


class RunDirError(RuntimeError):
    pass


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


def setup_logging(path: str | None = None, level=logging.INFO) -> None:
    """Console (stderr) and, when ``path`` is given, a log file; one line per event."""
    root = logging.getLogger()
    root.setLevel(level)
    for h in list(root.handlers):
        if getattr(h, "_dcbs", False):
            root.removeHandler(h)
    fmt = logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S")
    handlers = [logging.StreamHandler(sys.stderr)]
    if path:
        handlers.append(logging.FileHandler(path, encoding="utf-8"))
    for h in handlers:
        h.setFormatter(fmt)
        h._dcbs = True
        root.addHandler(h)


class RunDir:
    def __init__(self, path: str):
        self.path = path

    # ------------------------------------------------------------------ create / open
    @classmethod
    def create(cls, save_path: str, run_name: str | None, default_name: str) -> "RunDir":
        """A new, empty run directory; an explicit name that exists is refused, a default one gets a suffix."""
        os.makedirs(save_path, exist_ok=True)
        name = run_name or default_name
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
        if not os.path.isdir(path):
            raise RunDirError(f"--resume {path}: no such run directory")
        rd = cls(path)
        if rd.done:
            raise RunDirError(f"--resume {path}: this run is finished (DONE exists); nothing to resume")
        if not os.path.exists(rd.file("checkpoint.pt")):
            raise RunDirError(f"--resume {path}: no checkpoint.pt in it (the run stopped before its first "
                              f"checkpoint); start it again without --resume")
        return rd

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
        return state
