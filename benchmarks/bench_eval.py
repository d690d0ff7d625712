"""Wall time per evaluated model: trained one after another, or together in one vmapped pass.

Trains ``--models`` ConvNets on a random CIFAR10-shaped synthetic set of each ``--ipcs`` with
``train_and_test`` (``--eval_batch 1``) and with ``train_and_test_batched`` (``--eval_batch N``), and
prints seconds per model, the speed-up and the largest accuracy difference between the two ways.
It trains ``--epochs`` and tests on ``--test_images``: a reduced protocol, for the ratio of the two.

    python benchmarks/bench_eval.py --num_threads 2                    # CPU: ipc 1 10 50, 4 models, 20 epochs
    python benchmarks/bench_eval.py --device cuda --models 20 --epochs 300 --test_images 10000
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))   # bench_speed, which puts the repository on sys.path
from bench_speed import DSA_STRATEGY, _sync, setup_torch, write_report  # noqa: E402


def measure(ipc: int, models: int, epochs: int, test_images: int, device, dsa: bool) -> dict:
    import torch
    from dcbs.augment import ParamDiffAug
    from dcbs.evaluate import EvalSettings, build_eval_model, train_and_test, train_and_test_batched

    g = torch.Generator().manual_seed(ipc)
    x = torch.randn(10 * ipc, 3, 32, 32, generator=g).to(device)
    y = torch.arange(10).repeat_interleave(ipc).to(device)
    xt = torch.randn(test_images, 3, 32, 32, generator=g).to(device)
    yt = torch.randint(0, 10, (test_images,), generator=g).to(device)
    strategy = DSA_STRATEGY if dsa else "none"
    nets = lambda: [build_eval_model("ConvNet", 3, 10, (32, 32), 0, "bench", i).to(device) for i in range(models)]
    gens = lambda: [torch.Generator().manual_seed(100 + i) for i in range(models)]
    warm = EvalSettings(1, 0.01, 256, strategy, None)       # oneDNN primitives, CUDA context
    train_and_test(nets()[0], x, y, xt[:256], yt[:256], warm, gens()[0], ParamDiffAug())
    train_and_test_batched(nets()[:2], x, y, xt[:256], yt[:256], warm, gens()[:2], ParamDiffAug())

    settings = EvalSettings(epochs, 0.01, 256, strategy, None)
    ms, gs = nets(), gens()
    _sync(device)
    t = time.perf_counter()
    seq_acc = [train_and_test(m, x, y, xt, yt, settings, gi, ParamDiffAug())[2] for m, gi in zip(ms, gs)]
    _sync(device)
    seq, ms, gs = time.perf_counter() - t, nets(), gens()
    _sync(device)
    t = time.perf_counter()
    bat_acc = train_and_test_batched(ms, x, y, xt, yt, settings, gs, ParamDiffAug())[2]
    _sync(device)
    bat = time.perf_counter() - t
    return {"ipc": ipc, "models": models, "epochs": epochs, "test_images": test_images, "dsa": dsa,
            "sequential_s_per_model": seq / models, "batched_s_per_model": bat / models,
            "speedup": seq / bat, "max_acc_diff": max(abs(a - b) for a, b in zip(seq_acc, bat_acc))}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--ipcs", nargs="+", type=int, default=[1, 10, 50])
    p.add_argument("--models", type=int, default=4, help="models per path")
    p.add_argument("--epochs", type=int, default=20, help="epochs actually trained")
    p.add_argument("--test_images", type=int, default=2000)
    p.add_argument("--dsa", action="store_true", help="train with DSA augmentation, as DSA's evaluation does")
    p.add_argument("--num_threads", type=int, default=None)
    p.add_argument("--out", default=os.path.join("results", "bench", "eval.json"))
    args = p.parse_args(argv)
    if args.models < 2 or args.epochs < 1 or args.test_images < 1 or min(args.ipcs) < 1:
        p.error("--models must be >= 2, --epochs, --test_images and --ipcs >= 1")
    import torch
    device, t0, rows = setup_torch(p, args.device, args.num_threads), time.time(), []
    print(f"{args.epochs} epochs and a test pass over {args.test_images} images per model "
          f"(the protocol: 300 or 1000 epochs, 10,000 test images)")
    print(f"{'ipc':>4}{'models':>7}{'epochs':>7}  {'seq s/model':>12}{'batched s/model':>16}{'x':>6}  max |acc diff|")
    for ipc in args.ipcs:
        r = measure(ipc, args.models, args.epochs, args.test_images, device, args.dsa)
        rows.append(r)
        print(f"{ipc:>4}{args.models:>7}{args.epochs:>7}  {r['sequential_s_per_model']:>12.2f}"
              f"{r['batched_s_per_model']:>16.2f}{r['speedup']:>6.2f}  {r['max_acc_diff']:.4f}", flush=True)
    write_report(args.out, t0, {"rows": rows}, device=str(device), threads=torch.get_num_threads(),
                 gpu=torch.cuda.get_device_name() if device.type == "cuda" else None,
                 note="--epochs epochs and --test_images test images per model: a reduced protocol", argv=argv)
    print(f"\nwritten {args.out} ({time.time() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
