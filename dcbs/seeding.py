"""One ``--seed`` drives every random source, through seeds derived per purpose.

``derive_seed(seed, "net", exp, it)`` gives the seed of the network built at
iteration ``it`` of experiment ``exp``; "dsa", "eval", "init", "sampler" ...
name the other purposes. Changing one setting therefore does not reshuffle the
others, and a value can be recomputed anywhere (resume, batched evaluation)
without carrying RNG state around. No clock-based seeding anywhere.
"""
from __future__ import annotations

import hashlib
import random
from contextlib import contextmanager

import numpy as np
import torch

__all__ = ["derive_seed", "generator", "seeded", "set_global_seed"]


def derive_seed(seed: int, *parts) -> int:
    """A 62-bit seed from ``seed`` and a purpose path such as ("eval", exp, it, "ConvNet", i)."""
    key = "/".join([str(int(seed))] + [str(p) for p in parts]).encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "little") >> 2


def generator(seed: int, *parts) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded with ``derive_seed(seed, *parts)``."""
    return torch.Generator().manual_seed(derive_seed(seed, *parts))


@contextmanager
def seeded(seed: int, *parts):
    """Runs the block with the global torch RNG (CPU) seeded for this purpose, then restores it.

    Used around model construction so initial weights depend only on the derived seed.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, *parts))
        yield


def set_global_seed(seed: int) -> None:
    """Seeds Python, numpy and torch global RNGs (for code we do not control)."""
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)
