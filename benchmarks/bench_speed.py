"""Speed of our condensation iterations and evaluation along several paths, side by side.

A path is ``kernel/layers[/bf16]``: ``loop/plain`` (the per-class loop with torch's layers, as the
reference code: the straightforward path, the speed-ups' baseline), ``loop/fast`` (the default layers),
``batched/...`` (``--kernel batched``; a default path on CUDA only), ``.../bf16`` (``--precision bf16``)
and, with ``--compile``, ``compiled/fast``. Cases: one DC, DSA, DM and BS (uneven clusters) iteration,
one evaluation and the 10,000-image test pass on random data with the datasets' shapes; the paths of a
case are warmed up once each, then timed in turn (a, b, a, b, ...). Figures: docs/performance.md.

    python benchmarks/bench_speed.py --num_threads 2 --compile        # the CPU table
    python benchmarks/bench_speed.py --device cuda --ipcs 1 10 50
"""
from __future__ import annotations

import argparse
import itertools
import os
import statistics
import sys
import time
from types import SimpleNamespace

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

DSA_STRATEGY = "color_crop_cutout_flip_scale_rotate"     # the reference's default
SHAPES = {"FashionMNIST": (1, (28, 28), 6000, 10000), "CIFAR10": (3, (32, 32), 5000, 10000)}
PATHS = ("loop/plain", "loop/fast", "batched/fast", "batched/plain", "loop/fast/bf16", "batched/fast/bf16")
DEFAULT_PATHS = {"cpu": ["loop/plain", "loop/fast"], "cuda": ["loop/plain", "loop/fast", "batched/fast"]}
STRAIGHTFORWARD = "loop/plain"


# --------------------------------------------------------------------------- shared with the other benchmarks
def _data(shape: str, device):
    """Random tensors with a dataset's shape, 10 classes and its training and test set sizes."""
    import torch
    from dcbs.data import RealData
    channel, im_size, per_class, n_test = SHAPES[shape]
    g = torch.Generator().manual_seed(0)
    return RealData(name=shape, source="random", channel=channel, im_size=im_size, num_classes=10,
                    class_names=[str(c) for c in range(10)], mean=[0.0] * channel, std=[1.0] * channel,
                    images_train=torch.randn(10 * per_class, channel, *im_size, generator=g).to(device),
                    labels_train=torch.arange(10).repeat_interleave(per_class).to(device),
                    images_test=torch.randn(n_test, channel, *im_size, generator=g).to(device),
                    labels_test=torch.randint(0, 10, (n_test,), generator=g).to(device),
                    fingerprint="random")


def _sync(device):
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize()


def interleaved(fns: dict, device, repeats: int) -> dict:
    """Seconds per call of each function: one untimed warm-up call each (allocator, oneDNN primitives,
    compilation), then ``repeats`` calls timed in turn: a, b, a, b, ..."""
    for fn in fns.values():
        fn()
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            _sync(device)
            t = time.perf_counter()
            fn()
            _sync(device)
            times[k].append(time.perf_counter() - t)
    return times


def summary(times: list) -> dict:
    return {"times": times, "median_s": statistics.median(times), "min_s": min(times), "max_s": max(times)}


def compose(times: dict, outer: int) -> list:
    """Seconds of whole DC/DSA iterations from their parts' repetitions ("match", "inner"), paired:
    ``outer`` synthetic updates with an inner loop between each two (main.py stops after the last)."""
    return [outer * m + (outer - 1) * i for m, i in zip(times["match"], times["inner"], strict=True)]


def write_report(out: str, t0: float, body: dict, argv=None, **meta) -> None:
    """Writes ``{"meta": ..., **body}`` to ``out``; meta gets date, machine, torch, argv and wall time too."""
    import torch
    from dcbs.io import atomic_write_json
    from dcbs.rundir import machine_info
    meta = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": machine_info(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "cpus": os.cpu_count(),
            "torch": torch.__version__, **meta, "argv": sys.argv[1:] if argv is None else list(argv),
            "wall_s": time.time() - t0}
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    atomic_write_json(out, {"meta": meta, **body})


def setup_torch(p: argparse.ArgumentParser, device: str, num_threads: int | None):
    """The scripts' allocator settings and ``num_threads``; refuses CUDA where there is none."""
    import torch
    from dcbs.perf import tune_allocator
    if device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but CUDA is not available")
    tune_allocator()
    if num_threads:
        torch.set_num_threads(num_threads)
    return torch.device(device)


# --------------------------------------------------------------------------- what a case times
def _uneven_clusters(data, k: int = 20):
    """k clusters per class of uneven sizes, as K-Means gives."""
    import torch
    g = torch.Generator().manual_seed(1)
    out = []
    for ix in data.indices_class:
        ix = ix.cpu()[torch.randperm(len(ix), generator=g)]
        sizes = (torch.distributions.Dirichlet(torch.full((k,), 3.0)).sample() * len(ix)).long().clamp(min=1)
        sizes[-1] = len(ix) - sizes[:-1].sum()
        out.append([p.sort().values for p in ix.split(sizes.tolist())])
    return out


def case_fns(case: dict, data, device) -> tuple[dict, int]:
    """``({"iter": fn}, 1)``, or ``({"match": one synthetic update, "inner": one inner loop}, outer_loop)``
    for DC/DSA/BS at ipc > 1 (composed as ``outer x match + (outer - 1) x inner``); iteration
    callables carry ``.net`` and ``.image_syn``, which they update."""
    if case["kind"] != "iter":
        return {"iter": _evaluation_fn(case, data, device)}, 1
    import torch
    import dcbs.condense as cd
    from dcbs import matching
    from dcbs.augment import ParamDiffAug
    from dcbs.fast_ops import build_model
    from dcbs.samplers import ClassSampler, ClusterSampler

    method, ipc = case["method"], case["ipc"]
    base = "DC" if method == "BS" else method
    outer, inner = matching.get_loops(ipc) if base != "DM" else (1, 0)
    compiled = case["kernel"] == "compiled"              # the loop kernel with --compile (DM)
    cfg = SimpleNamespace(ipc=ipc, outer_loop=1, inner_loop=inner, batch_real=256, batch_train=256, lr_net=0.01,
                          dsa_strategy=case.get("dsa_strategy") or (DSA_STRATEGY if base == "DSA" else "none"),
                          seed=0, dis_metric="ours", kernel="loop" if compiled else case["kernel"], method=base,
                          precision=case.get("precision", "fp32"), compile=compiled)
    sampler = (ClusterSampler(_uneven_clusters(data), seed=2) if method == "BS"
               else ClassSampler(data.indices_class, seed=2))
    net = build_model("ConvNet", data.channel, data.num_classes, data.im_size, ops=case["ops"]).to(device)
    image_syn = torch.randn(10 * ipc, data.channel, *data.im_size, device=device, requires_grad=True)
    label_syn = torch.arange(10, device=device).repeat_interleave(ipc)
    opt = torch.optim.SGD([image_syn], lr=1.0 if base == "DM" else 0.1, momentum=0.5)
    dsa_param = ParamDiffAug()
    names, its = [n for n, _ in net.named_parameters()], itertools.count()

    def one_step():
        ctx = cd.StepContext(cfg, data, sampler, ClassSampler(data.indices_class, 3), 0, next(its), device,
                             dsa_param, cd.Diagnostics(names))
        cd.STEPS[base](net, image_syn, label_syn, opt, ctx)

    fns = {"iter": one_step}
    if outer > 1:
        opt_net = torch.optim.SGD(net.parameters(), lr=cfg.lr_net)
        crit, g = torch.nn.CrossEntropyLoss(), torch.Generator().manual_seed(0)
        fns = {"match": one_step, "inner": lambda: cd.train_on_synthetic(net, opt_net, crit, image_syn, label_syn,
                                                                         cfg, inner, g, dsa_param)}
    for fn in fns.values():
        fn.net, fn.image_syn = net, image_syn
    return fns, outer


def _evaluation_fn(case, data, device):
    import torch
    from dcbs.augment import ParamDiffAug
    from dcbs.evaluate import eval_settings_for, minibatches, test_accuracy, train_and_test
    from dcbs.fast_ops import build_model
    method, ipc = case["method"], case["ipc"]
    net = build_model("ConvNet", data.channel, 10, data.im_size, ops=case["ops"]).to(device)
    if case["kind"] == "test_pass":
        if case["kernel"] == "loop":       # the reference's: batches of 256 under no_grad
            def fn():
                with torch.no_grad():
                    net.eval()
                    for xb, yb in minibatches(data.images_test, data.labels_test, 256):
                        (net(xb)[0].argmax(1) == yb).sum().item()
            return fn
        return lambda: test_accuracy(net, data.images_test, data.labels_test, compiled=case["kernel"] == "compiled")
    s = eval_settings_for("ConvNet", case["shape"], "ConvNet", ipc, DSA_STRATEGY if method == "DSA" else "none",
                          0.01, 256, None, case["kernel"] == "compiled")
    x = torch.randn(10 * ipc, data.channel, *data.im_size, device=device)
    y = torch.arange(10, device=device).repeat_interleave(ipc)

    def fn():
        m = build_model("ConvNet", data.channel, 10, data.im_size, ops=case["ops"]).to(device)
        train_and_test(m, x, y, data.images_test, data.labels_test, s, torch.Generator().manual_seed(0),
                       ParamDiffAug())
    return fn


# --------------------------------------------------------------------------- the run
def path_of(case: dict) -> str:
    return f"{case['kernel']}/{case['ops']}" + ("/bf16" if case.get("precision") == "bf16" else "")


def plan(args) -> list[dict]:
    """The cases in (kind, method, shape, ipc) order; bf16 applies to DC/DSA/BS iterations."""
    paths = [(*p.split("/"), "fp32")[:3] for p in (args.paths or DEFAULT_PATHS[args.device])]
    cases = []
    for shape in args.shapes:
        for ipc in args.ipcs:
            if ipc > 1 and shape != "FashionMNIST" and args.device == "cpu":
                continue                   # CPU budget: ipc >= 10 on the FashionMNIST shape only
            for method in args.methods:
                for kernel, ops, precision in paths:
                    if precision == "fp32" or method != "DM":
                        cases.append(dict(kind="iter", method=method, shape=shape, ipc=ipc, kernel=kernel, ops=ops,
                                          precision=precision))
                if method == "DM" and args.compile:
                    cases.append(dict(kind="iter", method=method, shape=shape, ipc=ipc, kernel="compiled", ops="fast",
                                      precision="fp32"))
        if not args.no_eval:
            for method, ipc in (("DC", 1), ("DC", 10), ("DSA", 1)):
                if ipc in args.ipcs and (shape == "FashionMNIST" or args.device != "cpu"):
                    for ops in dict.fromkeys(o for _, o, _ in paths):
                        cases.append(dict(kind="eval", method=method, shape=shape, ipc=ipc, kernel="-", ops=ops))
            test_paths = dict.fromkeys([(k, o) for k, o, _ in paths] + ([("compiled", "fast")] if args.compile else []))
            for kernel, ops in test_paths:
                cases.append(dict(kind="test_pass", method="-", shape=shape, ipc=1, kernel=kernel, ops=ops))
    return cases


def groups(cases: list[dict]) -> list[list[dict]]:
    """The cases timed together: all paths of one (kind, method, shape, ipc), consecutive in plan order."""
    return [list(g) for _, g in itertools.groupby(cases, lambda c: (c["kind"], c["method"], c["shape"], c["ipc"]))]


def run_group(cases: list[dict], data, device, repeats: int) -> list[dict]:
    """One row per case, each warmed up once then all timed in turn; ``speedup``: loop/plain's median
    (an evaluation's: -/plain's) over the row's; on CUDA the group's peak GPU memory."""
    import torch
    built = [case_fns(c, data, device) for c in cases]
    fns = {(i, part): fn for i, (parts, _) in enumerate(built) for part, fn in parts.items()}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = interleaved(fns, device, repeats)
    rows = []
    for i, (c, (parts, outer)) in enumerate(zip(cases, built)):
        t = {p: times[i, p] for p in parts}
        ts = t["iter"] if outer == 1 else compose(t, outer)
        rows.append({**c, "path": path_of(c), **summary(ts), "n": len(ts)})
        if outer > 1:
            rows[-1].update(match_s=statistics.median(t["match"]), inner_loop_s=statistics.median(t["inner"]))
        if device.type == "cuda":
            rows[-1]["peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    base = next((r["median_s"] for r in rows if r["path"] in (STRAIGHTFORWARD, "-/plain")), float("nan"))
    for r in rows:
        r["speedup"] = base / r["median_s"]
    return rows


def table_line(r: dict) -> str:
    line = f"{r['kind']:<10}{r['method']:<7}{r['shape']:<13}{r['ipc']:>4} {r['path']:<18}"
    if "error" in r:
        return line + f"  error: {r['error']}"
    return line + (f"{r['median_s']:>9.3f} {r['min_s']:>7.2f}-{r['max_s']:<7.2f}{r['speedup']:>9.2f}"
                   + (f"{r['peak_mb']:>9.0f}" if "peak_mb" in r else ""))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--shapes", nargs="+", default=["FashionMNIST", "CIFAR10"], choices=list(SHAPES))
    p.add_argument("--methods", nargs="+", default=["DC", "DSA", "DM", "BS"], choices=["DC", "DSA", "DM", "BS"])
    p.add_argument("--ipcs", nargs="+", type=int, default=[1, 10])
    p.add_argument("--paths", nargs="+", default=None, choices=PATHS,
                   help=f"speed-ups are over {STRAIGHTFORWARD} (default: {' '.join(DEFAULT_PATHS['cpu'])}, on CUDA "
                        f"also batched/fast)")
    p.add_argument("--repeats", type=int, default=3, help="timed repetitions after one warm-up (evaluation: half)")
    p.add_argument("--num_threads", type=int, default=None)
    p.add_argument("--no_eval", action="store_true", help="skip the evaluation and the test pass")
    p.add_argument("--compile", action="store_true",
                   help="also time the test pass and DM iterations with the scripts' --compile (compiled/fast)")
    p.add_argument("--out", default=os.path.join("results", "bench", "speed.json"))
    return p


def main(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    if args.repeats < 1 or min(args.ipcs) < 1:
        p.error("--repeats and --ipcs must be >= 1")
    if args.compile and args.no_eval and "DM" not in args.methods:
        p.error("--compile times the test pass and DM iterations, and --no_eval skips the test pass: "
                "drop --no_eval or add DM to --methods")
    import torch
    device, cases, t0 = setup_torch(p, args.device, args.num_threads), plan(args), time.time()
    meta = dict(device=args.device, gpu=torch.cuda.get_device_name() if args.device == "cuda" else None,
                threads=torch.get_num_threads(), repeats=args.repeats, argv=argv)
    print(f"{len(cases)} cases on {args.device}, {torch.get_num_threads()} threads; speed-up over {STRAIGHTFORWARD}, "
          f"the paths of each (what, method, shape, ipc) interleaved")
    head = (f"{'what':<10}{'method':<7}{'shape':<13}{'ipc':>4} {'path':<18}{'median s':>9} {'min-max':>15}"
            f"{'speed-up':>9}" + (f"{'peak MB':>9}" if args.device == "cuda" else ""))
    print(f"{head}\n{'-' * len(head)}", flush=True)
    rows, data = [], None
    for group in groups(cases):
        c = group[0]
        if data is None or data.name != c["shape"]:
            data = None                    # one data set in memory at a time
            data = _data(c["shape"], device)
        try:
            new = run_group(group, data, device, args.repeats if c["kind"] != "eval" else max(1, args.repeats // 2))
        except Exception as e:             # e.g. out of GPU memory: the other groups still run
            new = [{**g, "path": path_of(g), "error": f"{type(e).__name__}: {e}"} for g in group]
        rows += new
        print("\n".join(table_line(r) for r in new), flush=True)
        write_report(args.out, t0, {"rows": rows}, **meta)    # after every group: a cut-off run keeps what it timed
    print(f"\nwritten {args.out} ({time.time() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
