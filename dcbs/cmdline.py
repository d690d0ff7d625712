"""What every entry point (main.py, main_BS.py, main_cluster.py, reproduce.py, plot_runs.py) shares.

One parser class whose errors are one line, one ``ConfigError``, one device resolver,
one logging set-up and one stop-signal handler.
"""
from __future__ import annotations

import argparse
import logging
import signal
import sys

__all__ = ["Parser", "ConfigError", "pick_device", "setup_logging", "StopFlag", "print_paths", "resolve_class"]


class ConfigError(ValueError):
    """A flag value or combination that cannot work; the message says what to change."""


class _DefaultsOnce(argparse.HelpFormatter):
    """'(default: X)' where the help text does not already say it and X means something."""

    def _get_help_string(self, action):
        h = action.help or ""
        if "default" in h or action.default in (None, False, argparse.SUPPRESS) or not action.option_strings:
            return h
        return h + " (default: %(default)s)"


class Parser(argparse.ArgumentParser):
    """Bad flags give one line that says what to change (exit 2), not the usage block."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _DefaultsOnce)
        super().__init__(*args, **kwargs)

    def error(self, message):
        self.exit(2, f"error: {message} (see {self.prog} -h)\n")


def pick_device(name: str):
    """``auto`` (CUDA when available), ``cpu``, ``cuda`` or ``cuda:N`` as a torch.device."""
    import torch
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {name} requested but CUDA is not available; use --device cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device must be auto, cpu, cuda or cuda:N (got {name!r})") from None


def setup_logging(path: str | None = None, level=logging.INFO, stream=None, logger: str | None = None,
                  fmt: str = "%(asctime)s %(message)s", datefmt: str = "%Y-%m-%d %H:%M:%S") -> list:
    """A console handler (stderr unless ``stream``) and, with ``path``, a log file, on ``logger``
    (the root logger by default); earlier handlers of this function are replaced. Returns the handlers."""
    target = logging.getLogger(logger)
    target.setLevel(level)
    if logger is not None:
        target.propagate = False
    for h in list(target.handlers):
        if getattr(h, "_dcbs", False):
            target.removeHandler(h)
            h.close()
    handlers = [logging.StreamHandler(stream or sys.stderr)]
    if path:
        handlers.append(logging.FileHandler(path, encoding="utf-8"))
    for h in handlers:
        h.setFormatter(logging.Formatter(fmt, datefmt))
        h._dcbs = True
        target.addHandler(h)
    return handlers


class StopFlag:
    """SIGINT/SIGTERM -> ``stop`` is set: finish the current step, save, stop. A second Ctrl-C aborts at once."""

    def __init__(self, log=None):
        self.stop, self.signame, self._old, self._log = False, None, {}, log

    def _handler(self, signum, frame):
        if self.stop and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.stop, self.signame = True, signal.Signals(signum).name
        if self._log:
            self._log(f"{self.signame} received: finishing the current step, then saving "
                      f"(Ctrl-C again to abort without saving)")

    def __enter__(self):
        try:
            for s in (signal.SIGINT, signal.SIGTERM):
                self._old[s] = signal.signal(s, self._handler)
        except ValueError:      # not the main thread: no handlers, still usable as a flag
            pass
        return self

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)
        self._old = {}
        return False


def print_paths(make, errors) -> int:
    """Runs ``make() -> paths`` and prints one path per line (exit 0); one of ``errors`` becomes a
    one-line ``error:`` and exit 2."""
    try:
        paths = make()
    except errors as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for path in paths:
        print(path)
    return 0


def resolve_class(spec, class_names, default: str, flag: str, error=None) -> int:
    """A class index from an index or a name (any case); None gives class ``default`` when the
    dataset has it, else class 0. A bad value raises ``error`` (ConfigError) naming ``flag``."""
    error = error or ConfigError
    names = [str(n).lower() for n in class_names]
    if spec is None:
        return names.index(default) if default in names else 0
    spec = str(spec)
    if spec.lstrip("-").isdigit():
        c = int(spec)
        if not 0 <= c < len(names):
            raise error(f"{flag} {c} is out of range: the dataset has classes 0-{len(names) - 1}")
        return c
    if spec.lower() in names:
        return names.index(spec.lower())
    raise error(f"{flag} {spec!r} is not a class; use an index or one of: {', '.join(map(str, class_names))}")
