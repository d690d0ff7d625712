"""``--precision bf16``: bfloat16 autocast for the parts of gradient matching that tolerate it.

What runs in bf16 (DC, DSA and Batch Sampling; ``autocast``):

* the real-data gradient of every class: the forward pass of the real batch under autocast, so its
  convolutions and matmuls (and the backward pass autograd records for them) run in bf16 with
  fp32 accumulation; the loss is taken in fp32. This gradient enters the matching loss only
  through cosine similarities (eq. 1), and the parameters it is taken for stay fp32;
* the inner loop's network updates (ordinary mixed-precision training: bf16 forward and
  backward, fp32 weights and SGD step).

What stays fp32: the synthetic images, their forward pass and the double backward that gives
their gradient (the quantity being optimised), the matching loss, DM, evaluation and the test
pass. The ConvNet's fused first block (``dcbs.fast_ops.conv_instance_norm``) computes its
instance norm statistics in fp32 under autocast too.

Its speed: docs/performance.md; its accuracy against fp32: results/README.md (accuracy guards). On CPUs without native
bf16 instructions (no avx512_bf16 / AMX) autocast emulates bf16 and is slower than fp32: ``check``
warns. On CUDA it needs a GPU with bf16 (Ampere or newer).
"""
from __future__ import annotations

import contextlib

import torch

__all__ = ["PRECISIONS", "autocast", "check", "cpu_has_native_bf16", "upcast"]

PRECISIONS = ("fp32", "bf16")


def autocast(device: torch.device | str, precision: str):
    """A callable returning the context the bf16 parts run in: bf16 autocast on ``device`` for
    ``precision == "bf16"``, a no-op for "fp32"."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of: {', '.join(PRECISIONS)}")
    if precision == "fp32":
        return contextlib.nullcontext
    kind = torch.device(device).type
    return lambda: torch.autocast(kind, dtype=torch.bfloat16)


def upcast(t: torch.Tensor) -> torch.Tensor:
    """``t`` in fp32 when autocast left it in a half-precision type, else as it is (float64 runs
    stay float64): what losses are taken on."""
    return t.float() if t.dtype in (torch.bfloat16, torch.float16) else t


def cpu_has_native_bf16() -> bool:
    """Whether oneDNN runs bf16 convolutions and matmuls natively here (avx512_bf16 or AMX)."""
    probe = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    try:
        return bool(probe()) if probe is not None else False
    except RuntimeError:
        return False


def check(precision: str, device: torch.device) -> str | None:
    """Refuses bf16 where it cannot run (a CUDA GPU without bf16: the message says what to do);
    returns a warning where it runs but slower than fp32 (a CPU without native bf16), else None."""
    if precision != "bf16":
        return None
    if device.type == "cuda":
        if not torch.cuda.is_bf16_supported():
            raise ValueError(f"--precision bf16: {torch.cuda.get_device_name(device)} has no bf16 support "
                             "(Ampere or newer needed); use --precision fp32")
        return None
    if device.type == "cpu" and not cpu_has_native_bf16():
        return ("--precision bf16: this CPU has no native bf16 instructions (avx512_bf16 or AMX), so bf16 is "
                "emulated and slower than fp32 here; --precision fp32 is faster on this machine")
    return None
