"""Files that survive kills: atomic writes and loads that fail with a clear message."""
from __future__ import annotations

import json
import os
import tempfile

import torch

__all__ = ["atomic_write", "atomic_save", "atomic_write_text", "atomic_write_json", "safe_load",
           "FileFormatError", "file_sha256"]


class FileFormatError(RuntimeError):
    """A file is truncated, corrupt or not one of ours; the message names it."""


def atomic_write(path: str, write_fn) -> None:
    """Calls ``write_fn(tmp_path)`` then renames the temporary file onto ``path``.

    A kill at any point leaves either the old file or the new one, never a
    truncated file. The temporary file keeps ``path``'s extension (image writers
    look at it) and lives in the same directory (rename is atomic there).
    """
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    base, ext = os.path.splitext(os.path.basename(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{base}.", suffix=f".tmp{ext}", dir=d)
    os.close(fd)
    try:
        write_fn(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the usual mode
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_save(obj, path: str) -> None:
    """``torch.save`` to ``path`` atomically."""
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def atomic_write_text(path: str, text: str) -> None:
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
    atomic_write(path, write)


def atomic_write_json(path: str, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def safe_load(path: str, what: str = "file", weights_only: bool = True):
    """``torch.load`` that turns a missing, truncated or foreign file into a FileFormatError."""
    if not os.path.isfile(path):
        raise FileFormatError(f"{what} {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=weights_only)
    except Exception as e:  # truncated zip, random bytes, pickle of unknown classes ...
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FileFormatError(f"{what} {path} cannot be read (truncated, corrupt or not a torch file): "
                              f"{type(e).__name__}: {msg[:200]}") from None


def file_sha256(path: str) -> str:
    import hashlib
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
