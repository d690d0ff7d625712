"""Layer-level timings behind ``--ops fast``: torch's layers against the fast ones.

Times, interleaved in one process, on one batch of 256 images:

* the 2x2 average pooling of the ConvNet's first block (256x128x32x32), forward and
  backward: ``F.avg_pool2d`` against ``dcbs.fast_ops.AvgPool2x2``;
* a whole ConvNet: the real-data gradient (forward + backward, what a DC/DSA
  iteration does once per class) and the inference forward (what the evaluation's
  test pass does 40 times), built with ``ops="plain"`` and ``ops="fast"``.

    python benchmarks/bench_ops.py                      # FashionMNIST and CIFAR10 shapes
    python benchmarks/bench_ops.py --num_threads 2 --repeats 10 --out results/bench/ops_cpu.json

Prints medians with min-max and the speed-up, and writes them as JSON (``--out``).
Run it on an otherwise idle machine; it says nothing about other CPUs or GPUs
(on CUDA the fast layers call torch's kernels).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
SHAPES = {"FashionMNIST": (1, (28, 28)), "CIFAR10": (3, (32, 32))}


def cases(shapes, batch: int):
    """{name: {"plain": fn, "fast": fn}} of the pooling and the ConvNet passes."""
    import torch
    import torch.nn.functional as F
    from dcbs.fast_ops import AvgPool2x2, build_model

    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 128, 32, 32, generator=g, requires_grad=True)
    go = torch.randn(batch, 128, 16, 16, generator=g)
    pools = {"plain": torch.nn.AvgPool2d(2, 2), "fast": AvgPool2x2()}
    out = {"pool forward 128x32x32": {k: (lambda p=p: p(x.detach())) for k, p in pools.items()},
           "pool backward 128x32x32": {k: (lambda p=p: torch.autograd.grad(p(x), x, go)) for k, p in pools.items()}}
    for shape in shapes:
        channel, im_size = SHAPES[shape]
        xs = torch.randn(batch, channel, *im_size, generator=g)
        ys = torch.randint(0, 10, (batch,), generator=g)
        nets = {k: build_model("ConvNet", channel, 10, im_size, ops=k) for k in ("plain", "fast")}

        def real_grad(net, xs=xs, ys=ys):     # bound now: the loop rebinds xs and ys per shape
            return torch.autograd.grad(F.cross_entropy(net(xs)[0], ys), list(net.parameters()))

        def forward(net, xs=xs):
            with torch.inference_mode():
                return net(xs)[0]
        out[f"ConvNet {shape} real-data gradient"] = {k: (lambda n=n, f=real_grad: f(n)) for k, n in nets.items()}
        out[f"ConvNet {shape} inference forward"] = {k: (lambda n=n, f=forward: f(n)) for k, n in nets.items()}
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--repeats", type=int, default=7, help="timed calls per side (after one warm-up)")
    p.add_argument("--num_threads", type=int, default=None)
    p.add_argument("--out", default=os.path.join("results", "bench", "ops.json"))
    args = p.parse_args(argv)
    if args.repeats < 1 or args.batch < 1:
        print("error: --repeats and --batch must be >= 1", file=sys.stderr)
        return 2
    import torch
    from bench_speed import interleaved, write_report  # same folder
    from dcbs.perf import tune_allocator
    tune_allocator()
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    t0 = time.time()
    rows = []
    print(f"batch {args.batch}; {torch.get_num_threads()} threads; {args.repeats} interleaved calls per side "
          f"(+1 warm-up); medians (min-max)")
    for name, fns in cases(args.shapes, args.batch).items():
        for fn in fns.values():
            fn()                                  # warm-up (allocator, oneDNN primitives)
        times = interleaved(fns, torch.device("cpu"), args.repeats)
        row = {"what": name, **{k: {"median_s": statistics.median(v), "min_s": min(v), "max_s": max(v), "times": v}
                                for k, v in times.items()}}
        row["speedup"] = row["plain"]["median_s"] / row["fast"]["median_s"]
        rows.append(row)
        cell = lambda s: f"{1e3 * s['median_s']:8.1f} ms ({1e3 * s['min_s']:.0f}-{1e3 * s['max_s']:.0f})"
        print(f"{name:<44} plain {cell(row['plain'])}   fast {cell(row['fast'])}   {row['speedup']:.2f}x", flush=True)
    write_report(args.out, t0, {"rows": rows}, threads=torch.get_num_threads(), batch=args.batch,
                 repeats=args.repeats, argv=sys.argv[1:] if argv is None else list(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
