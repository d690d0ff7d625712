"""Speed benchmark of the condensation loop and the evaluation.

Times, in one run and on the same machine, the per-iteration cost of DC, DSA, DM
and Batch Sampling along several *paths*, and the per-model evaluation cost
(training and the 10,000-image test pass). A path is ``kernel/layers``:

* ``loop/plain`` - the straightforward path: per-class loop as the protocol reads,
  torch's own layers (as the public reference code builds them). Speed-ups are
  measured against it.
* ``loop/fast`` - the default: the same loop with the fast layers (``--ops fast``:
  2x2 average pooling as strided sums, ``networks.AvgPool2x2``).
* ``batched/fast`` - all classes in one vmapped pass (``--kernel batched``); in the default
  paths on CUDA only (on the CPU it is 2-4x slower and would double the run's time).
* a ``/bf16`` suffix (``loop/fast/bf16``, ``batched/fast/bf16``) - the same under
  ``--precision bf16``; DC/DSA/BS iterations only (DM, evaluation and the test pass are fp32).

For the test pass ``loop`` is the reference's loop (batches of 256 under
``no_grad``) and ``batched`` our ``test_accuracy``. With ``--compile`` a ``compiled/fast``
path (the scripts' ``--compile``: ``test_accuracy`` through ``torch.compile``, and DM's
``loop`` iteration with its real-image embeddings compiled; compilation is in the untimed
warm-up) is timed beside them, for the test pass and DM iterations.

Cases run one after another; on a machine whose speed drifts (the shared 2-core VM
here: its matmul ceiling read 146, 119 and 131 GFLOP/s within 20 minutes) that order
alone can move a ratio by 10 %, so ``--rounds N`` runs the whole list N times in turn
and pools each case's repetitions, and ``--interleave`` times the paths of one
(method, shape, ipc) in one process, repetition by repetition (a, b, ..., a, b, ...).
Random tensors with the datasets' shapes stand in for the data (timing only). Every
case (with ``--interleave``: every such group) runs in its own child process, so its
peak memory (RSS; GPU memory on CUDA) is its own (the group's).

For ipc 10 the iteration is 10 outer matching steps and 9 x 50 inner training
steps; the benchmark times one matching step and one inner loop of 50 steps and
composes ``10 * match + 9 * inner`` (the inner loop is the same code for every
kernel). FLOPs come from ``torch.utils.flop_counter`` on one untimed call, the warm-up;
the CPU ceiling is the fp32 rate of a 2048x2048 matmul measured in the same run.

    python benchmarks/bench_speed.py                       # the full table (35 min on 2 cores)
    python benchmarks/bench_speed.py --quick               # a minute: tiny repeats, to check it runs
    python benchmarks/bench_speed.py --device cuda --ipcs 1 10 50
    python benchmarks/bench_speed.py --shapes FashionMNIST --ipcs 1 --paths loop/plain loop/fast
    python benchmarks/bench_speed.py --shapes FashionMNIST --ipcs 10 --paths loop/plain loop/fast --interleave

Prints a table (median, min-max, GFLOP/s, % of ceiling, peak memory, speed-up
over loop/plain) and writes it as JSON (``--out``).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from types import SimpleNamespace

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# Public reference implementation, FashionMNIST shape, ConvNet, on a 2-core AMD EPYC Zen 4 VM
# (AVX-512 + avx512_bf16): the straightforward path should land within about 10 % of these there.
REFERENCE_S = {("iter", "DC", "FashionMNIST", 1): 5.40, ("iter", "DSA", "FashionMNIST", 1): 5.60,
               ("iter", "DC", "FashionMNIST", 10): 156.0, ("iter", "DSA", "FashionMNIST", 10): 173.0,
               ("iter", "DM", "FashionMNIST", 1): 1.54, ("iter", "DM", "FashionMNIST", 10): 2.23,
               ("eval", "DC", "FashionMNIST", 1): 12.5, ("eval", "DC", "FashionMNIST", 10): 51.9,
               ("eval", "DSA", "FashionMNIST", 1): 23.8, ("test_pass", "-", "FashionMNIST", 1): 8.5}

DSA_STRATEGY = "color_crop_cutout_flip_scale_rotate"     # the DSA iterations' (the reference's default)
SHAPES = {"FashionMNIST": (1, (28, 28), 6000, 10000), "CIFAR10": (3, (32, 32), 5000, 10000)}


# --------------------------------------------------------------------------- child side
def _data(shape: str, device):
    import torch
    from dcbs.data import RealData
    channel, im_size, per_class, n_test = SHAPES[shape]
    g = torch.Generator().manual_seed(0)
    n = 10 * per_class
    return RealData(name=shape, source="random", channel=channel, im_size=im_size, num_classes=10,
                    class_names=[str(c) for c in range(10)], mean=[0.0] * channel, std=[1.0] * channel,
                    images_train=torch.randn(n, channel, *im_size, generator=g).to(device),
                    labels_train=torch.arange(10).repeat_interleave(per_class).to(device),
                    images_test=torch.randn(n_test, channel, *im_size, generator=g).to(device),
                    labels_test=torch.randint(0, 10, (n_test,), generator=g).to(device),
                    fingerprint="random")


def _uneven_clusters(data, k: int = 20):
    """k clusters per class with uneven sizes (plain K-Means gives ~50 to ~500 of 5000)."""
    import torch
    g = torch.Generator().manual_seed(1)
    out = []
    for ix in data.indices_class:
        ix = ix.cpu()[torch.randperm(len(ix), generator=g)]
        w = torch.distributions.Dirichlet(torch.full((k,), 3.0)).sample()
        sizes = (w * len(ix)).long().clamp(min=1)
        sizes[-1] = len(ix) - sizes[:-1].sum()
        out.append([p.sort().values for p in ix.split(sizes.tolist())])
    return out


def _sync(device):
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize()


def _timed(fn, device, repeats: int, warm_up: bool = True):
    if warm_up:
        fn()                               # warm-up (allocator, oneDNN primitives, CUDA context)
    _sync(device)
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        _sync(device)
        ts.append(time.perf_counter() - t)
    return ts


def interleaved(fns: dict, device, repeats: int) -> dict:
    """Seconds per call of each function, timed in turn: a, b, a, b, ... (no warm-up: the caller's)."""
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            _sync(device)
            t = time.perf_counter()
            fn()
            _sync(device)
            times[k].append(time.perf_counter() - t)
    return times


def write_report(out: str, t0: float, body: dict, **meta) -> None:
    """Writes ``{"meta": ..., **body}`` to ``out`` atomically and says so. ``meta`` gets the
    date, machine, CPU count, torch version and wall time since ``t0`` besides the caller's keys."""
    import torch
    from dcbs.io import atomic_write_json
    meta = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "torch": torch.__version__, **meta, "wall_s": time.time() - t0}
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    atomic_write_json(out, {"meta": meta, **body})
    print(f"\nwritten {out} ({time.time() - t0:.0f} s)")


def _flops(fn) -> float:
    """FLOPs of one call of ``fn``, by ``torch.utils.flop_counter``'s formulas (``flop_count_mode``)."""
    with flop_count_mode()() as fc:
        fn()
    return float(fc.total)


def flop_count_mode():
    """The class of a FLOP-counting dispatch mode (``with flop_count_mode()() as fc: ...; fc.total``),
    built on call so that importing this script does not import torch."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils.flop_counter import flop_registry

    class _FlopCount(TorchDispatchMode):
        """Counts FLOPs as ``torch.utils.flop_counter.FlopCounterMode`` does (its formulas; an op
        without one is decomposed where it can be, as there), without its per-module attribution.

        Why not FlopCounterMode itself: it made the peak RSS of the call it counts non-deterministic
        (its module tracker, which this mode leaves out, is the suspect). bench_speed's DC ipc-10 evaluation under it read 1423-1914 MB in most
        runs and 5109-6338 MB in 4 of 15 (2-core AMD Zen 5 EPYC, torch 2.14.1, each run in a process
        of its own, same seed; the heap grew in the training epochs). Under a mode like this one the
        same call read 1235-1403 MB in 8 of 8 runs, and 1234-1380 MB without any counter in 8 of 8
        (docs/performance.md). The counted call is the warm-up, whose peak is the
        case's peak memory, so the counter must not add to it."""

        def __init__(self):
            super().__init__()
            self.total = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func not in flop_registry and func is not torch.ops.prim.device.default:
                with self:                          # FlopCounterMode's rule, kept as it is
                    out = func.decompose(*args, **kwargs)
                if out is not NotImplemented:
                    return out
            out = func(*args, **kwargs)
            formula = flop_registry.get(func._overloadpacket)
            if formula is not None:
                self.total += formula(*args, **kwargs, out_val=out)
            return out

    return _FlopCount


PATHS = ("loop/plain", "loop/fast", "batched/fast", "batched/plain", "loop/fast/bf16", "batched/fast/bf16")
DEFAULT_PATHS = {"cpu": ["loop/plain", "loop/fast"], "cuda": ["loop/plain", "loop/fast", "batched/fast"]}
STRAIGHTFORWARD = "loop/plain"


def _setup(case: dict):
    """Process-wide settings of a child (allocator, threads) and the case's data and device."""
    import torch
    from dcbs.perf import tune_allocator
    tune_allocator()
    if case.get("num_threads"):
        torch.set_num_threads(case["num_threads"])
    device = torch.device(case["device"])
    return _data(case["shape"], device), device


def _peak_mb(device) -> float:
    import torch
    return (torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def _repeats(case: dict, part: str) -> int:
    """Timed repetitions of one part: the inner loop (ipc >= 10) gets half, it is the long one."""
    return max(1, case["repeats"] // 2) if part == "inner" else case["repeats"]


def case_fns(case: dict, data, device) -> tuple[dict, int]:
    """What a case times, built and called with its own layers (``networks.ops``): ``{"iter": fn}``
    (an iteration at ipc 1, a DM iteration, an evaluation, a test pass) or, for DC/DSA/BS at ipc >= 10,
    ``{"match": one outer matching step, "inner": one inner loop}``; and the iteration's outer loop
    count (1 where there is no composition). An iteration's callables carry the network and the
    synthetic images they update (``.net``, ``.image_syn``). DSA iterations augment with
    ``case["dsa_strategy"]`` (default ``DSA_STRATEGY``), other methods only when it is given."""
    from networks import ops
    with ops(case["ops"]):
        if case["kind"] == "iter":
            fns, outer = _iteration_fns(case, data, device)
        else:
            fns, outer = {"iter": _evaluation_fn(case, data, device)}, 1

    def with_ops(fn):
        def call():
            with ops(case["ops"]):      # models built inside the call (evaluation) get the case's layers
                fn()
        call.__dict__.update(fn.__dict__)
        return call
    return {k: with_ops(fn) for k, fn in fns.items()}, outer


def compose(parts: dict, outer: int, paired: bool = True) -> tuple[list, float]:
    """Seconds and FLOPs of one whole DC/DSA iteration from its parts: ``outer`` synthetic updates
    with an inner loop between each two (main.py breaks after the last update). ``parts`` maps
    "match" and "inner" to ``(times, flops)``. ``paired``: repetition i counts ``outer * match_i +
    (outer - 1) * inner_i`` (parts timed in the same rounds, as bench_reference.py times them);
    otherwise every match repetition is counted with the inner loop's median (the inner loop timed
    half as often, as here: ``_repeats``)."""
    (tm, fm), (ti, fi) = parts["match"], parts["inner"]
    if paired and len(tm) != len(ti):
        raise ValueError(f"{len(tm)} match and {len(ti)} inner-loop repetitions: time them in the same rounds")
    inner = ti if paired else [statistics.median(ti)] * len(tm)
    return [outer * m + (outer - 1) * i for m, i in zip(tm, inner)], outer * fm + (outer - 1) * fi


def case_result(case: dict, times: dict, flops: dict, outer: int) -> dict:
    """A case's timed repetitions and FLOPs; a composed iteration (``compose``, unpaired) also
    reports its parts' medians."""
    if "iter" in times:
        return {**case, "times": times["iter"], "flops": flops["iter"]}
    t, f = compose({k: (times[k], flops[k]) for k in ("match", "inner")}, outer, paired=False)
    return {**case, "times": t, "flops": f, "match_s": statistics.median(times["match"]),
            "inner_loop_s": statistics.median(times["inner"])}


def flops_and_warm_up(fns: dict, compiled=lambda key: False) -> dict:
    """FLOPs of each callable, counted on an untimed call that is also its warm-up; those that
    ``compiled(key)`` marks get one more untimed call. A call under the FLOP counter does not leave
    a compiled test pass compiled for the calls after it: the next call compiles (measured: 4.2 s
    under the counter, then 2.9 s, then 0.7 s on 1000 images with a warm inductor cache; with a
    cold one the first timed repetition took 29.7 s against 7-9 s for the others), so without that
    call compilation lands in the first timed repetition."""
    flops = {k: _flops(fn) for k, fn in fns.items()}
    for k, fn in fns.items():
        if compiled(k):
            fn()
    return flops


def run_case(case: dict) -> dict:
    """One case alone in this process: each part's FLOPs counted on its warm-up call
    (``flops_and_warm_up``), then its repetitions timed."""
    import torch
    data, device = _setup(case)
    fns, outer = case_fns(case, data, device)
    flops = flops_and_warm_up(fns, compiled=lambda k: case["kernel"] == "compiled")
    times = {k: _timed(fn, device, _repeats(case, k), warm_up=False) for k, fn in fns.items()}
    return {**case_result(case, times, flops, outer), "peak_mb": _peak_mb(device), "threads": torch.get_num_threads()}


def run_group(cases: list[dict]) -> list[dict]:
    """The paths of one (kind, method, shape, ipc) in this process, their repetitions interleaved
    (path a, path b, ..., path a, ...), so that a machine whose speed drifts slows them alike. Each
    part's FLOPs are counted on its warm-up call (``flops_and_warm_up``). Peak memory is the
    process's, shared by the group (``peak_shared``): run without --interleave for each path's own.
    Five 2048x2048 matmuls are timed in turn with the paths (``ceiling_probe``); the median reading
    is the group's ceiling, which its rows' "% of ceiling" use."""
    import torch
    data, device = _setup(cases[0])
    built = [case_fns(c, data, device) for c in cases]
    fns = {(i, k): fn for i, (parts, _) in enumerate(built) for k, fn in parts.items()}
    flops = flops_and_warm_up(fns, compiled=lambda key: cases[key[0]]["kernel"] == "compiled")
    probe, probe_flops = ceiling_probe(cases[0]["device"])
    probe()
    times = {}
    for part_is_inner in (False, True):
        some = {key: fn for key, fn in fns.items() if (key[1] == "inner") == part_is_inner}
        if some:
            some[-1, "probe"] = probe
            t = interleaved(some, device, _repeats(cases[0], "inner" if part_is_inner else "match"))
            times.setdefault((-1, "probe"), []).extend(t.pop((-1, "probe")))
            times.update(t)
    ceiling = statistics.median(probe_flops / t / 1e9 for t in times[-1, "probe"])
    peak = _peak_mb(device)
    return [{**case_result(c, {k: times[i, k] for k in parts}, {k: flops[i, k] for k in parts}, outer),
             "peak_mb": peak, "peak_shared": True, "ceiling_gflops": ceiling, "threads": torch.get_num_threads()}
            for i, (c, (parts, outer)) in enumerate(zip(cases, built))]


def _iteration_fns(case, data, device) -> tuple[dict, int]:
    import torch
    import dcbs.condense as cd
    from dcbs.augment import ParamDiffAug
    from dcbs.samplers import ClassSampler, ClusterSampler
    from networks import build_model

    method, ipc = case["method"], case["ipc"]
    base = "DC" if method == "BS" else method
    dsa = case.get("dsa_strategy") or (DSA_STRATEGY if base == "DSA" else "none")
    compiled = case["kernel"] == "compiled"              # the loop kernel with --compile (DM)
    cfg = SimpleNamespace(ipc=ipc, batch_real=256, dsa_strategy=dsa, seed=0, dis_metric="ours", lr_net=0.01,
                          batch_train=256, kernel="loop" if compiled else case["kernel"], method=base,
                          precision=case.get("precision", "fp32"), compile=compiled)
    sampler = (ClusterSampler(_uneven_clusters(data), seed=2) if method == "BS"
               else ClassSampler(data.indices_class, seed=2))
    net = build_model("ConvNet", data.channel, data.num_classes, data.im_size).to(device)
    image_syn = torch.randn(10 * ipc, data.channel, *data.im_size, device=device, requires_grad=True)
    label_syn = torch.arange(10, device=device).repeat_interleave(ipc)
    opt = torch.optim.SGD([image_syn], lr=1.0 if base == "DM" else 0.1, momentum=0.5)
    dsa_param = ParamDiffAug()
    step = cd.STEPS[base]
    names = [n for n, _ in net.named_parameters()]
    state = {"it": 0}

    def parts(fns: dict, outer: int) -> tuple[dict, int]:
        for fn in fns.values():                       # what the parts update, for tests
            fn.net, fn.image_syn = net, image_syn
        return fns, outer

    def one_step():
        ctx = cd.StepContext(cfg, data, sampler, ClassSampler(data.indices_class, 3), 0, state["it"], device,
                             dsa_param, cd.Diagnostics(names))
        state["it"] += 1
        step(net, image_syn, label_syn, opt, ctx)

    outer, inner = cd.get_loops(ipc) if base != "DM" else (1, 0)
    if outer == 1:
        return parts({"iter": one_step}, 1)
    # ipc >= 10: one matching step (loops patched to (1, 1)) and one inner loop, composed

    def match():
        real_get_loops = cd.get_loops
        cd.get_loops = lambda _ipc: (1, 1)
        try:
            one_step()
        finally:
            cd.get_loops = real_get_loops

    opt_net = torch.optim.SGD(net.parameters(), lr=0.01)
    crit = torch.nn.CrossEntropyLoss()
    g = torch.Generator().manual_seed(0)

    def inner_loop():
        cd.train_on_synthetic(net, opt_net, crit, image_syn, label_syn, cfg, inner, g, dsa_param)
    return parts({"match": match, "inner": inner_loop}, outer)


def _evaluation_fn(case, data, device):
    import torch
    from dcbs.augment import ParamDiffAug
    from dcbs.evaluate import eval_settings_for, minibatches, test_accuracy, train_and_test
    from networks import build_model
    method, ipc, kind = case["method"], case["ipc"], case["kind"]
    net = build_model("ConvNet", data.channel, 10, data.im_size).to(device)
    if kind == "test_pass":
        if case["kernel"] == "loop":       # the reference: batch 256 under no_grad
            def fn():
                with torch.no_grad():
                    net.eval()
                    for xb, yb in minibatches(data.images_test, data.labels_test, 256):
                        (net(xb)[0].argmax(1) == yb).sum().item()
        else:
            compiled = case["kernel"] == "compiled"

            def fn():
                test_accuracy(net, data.images_test, data.labels_test, compiled=compiled)
        return fn
    dsa = "color_crop_cutout_flip_scale_rotate" if method == "DSA" else "none"
    s = eval_settings_for("ConvNet", case["shape"], "ConvNet", ipc, dsa, 0.01, 256, None)
    x = torch.randn(10 * ipc, data.channel, *data.im_size, device=device)
    y = torch.arange(10, device=device).repeat_interleave(ipc)

    def fn():
        m = build_model("ConvNet", data.channel, 10, data.im_size).to(device)
        train_and_test(m, x, y, data.images_test, data.labels_test, s, torch.Generator().manual_seed(0),
                       ParamDiffAug())
    return fn


# --------------------------------------------------------------------------- parent side
def ceiling_gflops(device_name: str, n: int = 2048, repeats: int = 10) -> float:
    import torch
    device = torch.device(device_name)
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    return _gemm_rate(lambda: a @ b, device, n, repeats)


def _gemm_rate(product, device, n: int, repeats: int) -> float:
    """GFLOP/s of ``product``, an n x n x n matrix product: median of ``repeats`` timed calls."""
    return 2 * n ** 3 / statistics.median(_timed(product, device, repeats)) / 1e9


def onednn_gemm_gflops(n: int = 2048, repeats: int = 10) -> float:
    """fp32 rate of an n x n x n matrix product run by oneDNN (as a 1x1 convolution over n pixels), CPU.

    The ceiling the speed targets use is ``ceiling_gflops``: torch.matmul, i.e. MKL's sgemm. On the
    2-core AMD Zen 5 VM (family 26) MKL reads 169-202 GFLOP/s while this reads 318-394 and oneDNN's
    3x3 convolutions reach 250-430 in our passes, so there the matmul ceiling understates the
    machine (docs/performance.md); both are printed and saved."""
    import torch
    x = torch.randn(1, n, 32, n // 32)
    w = torch.randn(n, n, 1, 1)
    return _gemm_rate(lambda: torch.nn.functional.conv2d(x, w), torch.device("cpu"), n, repeats)


def ceiling_probe(device_name: str, n: int = 2048, calls: int = 5):
    """A callable that runs ``calls`` fp32 n x n matmuls, and their FLOPs: timed in turn with the
    work (``interleaved``), it reads the matmul ceiling in the machine state the work sees."""
    import torch
    device = torch.device(device_name)
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)

    def probe():
        for _ in range(calls):
            a @ b
    return probe, calls * 2.0 * n ** 3


def plan(args) -> list[dict]:
    # a path is kernel/layers[/bf16]; bf16 (--precision bf16) applies to DC/DSA/BS iterations only
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
    for c in cases:
        c.update(device=args.device, num_threads=args.num_threads,
                 repeats=args.repeats if c["kind"] != "eval" else max(1, args.repeats // 2))
    return cases


def merge_rounds(a: dict, b: dict) -> dict:
    """One case's results of two rounds: all timed repetitions, the larger peak memory."""
    if "error" in a or "error" in b:
        return a if "error" in a else b
    out = {**a, "times": a["times"] + b["times"], "peak_mb": max(a["peak_mb"], b["peak_mb"])}
    if "ceiling_gflops" in a and "ceiling_gflops" in b:          # --interleave: each round's own reading
        out["ceiling_gflops"] = (a["ceiling_gflops"] + b["ceiling_gflops"]) / 2
    return out


def path_of(case: dict) -> str:
    return f"{case['kernel']}/{case['ops']}" + ("/bf16" if case.get("precision") == "bf16" else "")


def run_child(cases: list[dict], timeout: int) -> list[dict]:
    """The cases in a child process of their own: one alone (``run_case``), several interleaved
    (``run_group``)."""
    arg = cases[0] if len(cases) == 1 else cases
    r = subprocess.run([sys.executable, os.path.abspath(__file__), "--_case", json.dumps(arg)],
                       capture_output=True, text=True, timeout=timeout * len(cases), cwd=ROOT)
    if r.returncode != 0:
        err = r.stderr.strip().splitlines()[-1] if r.stderr.strip() else f"exit {r.returncode}"
        return [{**c, "error": err} for c in cases]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    return out if isinstance(out, list) else [out]


def units(cases: list[dict], interleave: bool) -> list[list[int]]:
    """Indices of the cases each child process runs: one case each, or with ``interleave`` all paths
    of one (kind, method, shape, ipc) together, in plan order."""
    if not interleave:
        return [[i] for i in range(len(cases))]
    groups = {}
    for i, c in enumerate(cases):
        groups.setdefault((c["kind"], c["method"], c["shape"], c["ipc"]), []).append(i)
    return list(groups.values())


def summarise(results: list[dict], ceiling: float) -> list[dict]:
    """One row per case; ``speedup`` is the straightforward path's median over this one's
    (for evaluation, whose kernel is "-": the plain layers' median)."""
    base = {}
    for r in results:
        if "error" not in r and (path_of(r) == STRAIGHTFORWARD or (r["kernel"] == "-" and r["ops"] == "plain")):
            base[(r["kind"], r["method"], r["shape"], r["ipc"])] = statistics.median(r["times"])
    rows = []
    for r in results:
        row = {k: r[k] for k in ("kind", "method", "shape", "ipc", "kernel", "ops")}
        row["precision"] = r.get("precision", "fp32")
        row["path"] = path_of(r)
        if "error" in r:
            rows.append({**row, "error": r["error"]})
            continue
        med = statistics.median(r["times"])
        gflops = r["flops"] / med / 1e9 if r["flops"] else float("nan")
        key = (r["kind"], r["method"], r["shape"], r["ipc"])
        ref = REFERENCE_S.get(key)
        rows.append({**row, "median_s": med, "min_s": min(r["times"]), "max_s": max(r["times"]),
                     "n": len(r["times"]), "gflop": r["flops"] / 1e9, "gflops_per_s": gflops,
                     "pct_ceiling": 100 * gflops / r.get("ceiling_gflops", ceiling) if ceiling else float("nan"),
                     "ceiling_gflops": r.get("ceiling_gflops", ceiling),
                     "peak_mb": r["peak_mb"], "peak_shared": r.get("peak_shared", False), "threads": r["threads"],
                     "speedup": base[key] / med if key in base else float("nan"),
                     "reference_s": ref})
    return rows


def print_table(rows, ceiling):
    print(f"\nfp32 matmul ceiling: {ceiling:.0f} GFLOP/s; speed-up over {STRAIGHTFORWARD}; "
          f"ref s: the public reference code on a 2-core AMD EPYC Zen 4 VM")
    head = (f"{'what':<10}{'method':<7}{'shape':<13}{'ipc':>4} {'path':<14}{'median s':>9} {'min-max':>15}"
            f"{'GFLOP/s':>9}{'%ceil':>6}{'peak MB':>9}{'speedup':>8}{'ref s':>7}")
    print(head)
    print("-" * len(head))
    for r in rows:
        lead = f"{r['kind']:<10}{r['method']:<7}{r['shape']:<13}{r['ipc']:>4} {r['path']:<14}"
        if "error" in r:
            print(lead + f"  error: {r['error']}")
            continue
        ref = f"{r['reference_s']:.1f}" if r["reference_s"] else "-"
        peak = f"{r['peak_mb']:.0f}" + ("*" if r.get("peak_shared") else "")
        print(lead + f"{r['median_s']:>9.3f} {r['min_s']:>7.2f}-{r['max_s']:<7.2f}{r['gflops_per_s']:>9.1f}"
              f"{r['pct_ceiling']:>6.0f}{peak:>9}{r['speedup']:>8.2f}{ref:>7}")
    if any(r.get("peak_shared") for r in rows):
        print("* --interleave: one process ran all paths of the row's method/shape/ipc; its peak memory is theirs "
              "together (run without --interleave for each path's own), and its %ceil uses the ceiling read "
              "between their repetitions")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--shapes", nargs="+", default=["FashionMNIST", "CIFAR10"], choices=list(SHAPES))
    p.add_argument("--methods", nargs="+", default=["DC", "DSA", "DM", "BS"], choices=["DC", "DSA", "DM", "BS"])
    p.add_argument("--ipcs", nargs="+", type=int, default=[1, 10])
    p.add_argument("--paths", nargs="+", default=None, choices=PATHS,
                   help=f"kernel/layers[/bf16] combinations; speed-ups are over {STRAIGHTFORWARD}, the straightforward "
                        f"path (default: {' '.join(DEFAULT_PATHS['cpu'])} on the CPU, where the batched kernel is 2-4x "
                        f"slower, and also batched/fast on CUDA); /bf16: --precision bf16, DC/DSA/BS iterations only")
    p.add_argument("--repeats", type=int, default=3, help="timed repetitions per case (after one warm-up)")
    p.add_argument("--rounds", type=int, default=1,
                   help="run the whole list of cases this many times in turn and pool each case's repetitions, "
                        "so that a machine whose speed drifts (a shared VM) slows every path alike")
    p.add_argument("--interleave", action="store_true",
                   help="run the paths of each (method, shape, ipc) in one process with their repetitions "
                        "interleaved (path a, path b, ..., a, ...); peak memory is then shared by those paths")
    p.add_argument("--num_threads", type=int, default=None)
    p.add_argument("--no_eval", action="store_true", help="skip the evaluation cases")
    p.add_argument("--compile", "--compile_test", dest="compile", action="store_true",
                   help="also time the test pass and DM iterations with the scripts' --compile (path compiled/fast; "
                        "needs the evaluation or DM)")
    p.add_argument("--quick", action="store_true", help="FashionMNIST shape, ipc 1, DC and DM, 1 repeat, no eval")
    p.add_argument("--timeout", type=int, default=1800, help="seconds per case")
    p.add_argument("--out", default=os.path.join("results", "bench", "speed.json"))
    p.add_argument("--_case", help=argparse.SUPPRESS)
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args._case:
        case = json.loads(args._case)
        print(json.dumps(run_group(case) if isinstance(case, list) else run_case(case)))
        return 0
    if args.quick:
        args.shapes, args.ipcs, args.methods, args.repeats, args.no_eval = ["FashionMNIST"], [1], ["DC", "DM"], 1, True
    if args.device == "cuda":
        import torch
        if not torch.cuda.is_available():
            print("error: --device cuda but CUDA is not available", file=sys.stderr)
            return 2
    if args.rounds < 1 or args.repeats < 1:
        print("error: --rounds and --repeats must be >= 1", file=sys.stderr)
        return 2
    if args.compile and args.no_eval and "DM" not in args.methods:
        print("error: --compile times the test pass and DM iterations, and --no_eval (or --quick) skips the "
              "test pass: drop --no_eval or add DM to --methods", file=sys.stderr)
        return 2
    cases = plan(args)
    t0 = time.time()
    ceiling = ceiling_gflops(args.device)
    onednn = onednn_gemm_gflops() if args.device == "cpu" else None
    print(f"{len(cases)} cases on {args.device}; fp32 ceiling {ceiling:.0f} GFLOP/s (torch.matmul)"
          + (f"; oneDNN's GEMM {onednn:.0f} GFLOP/s" if onednn else ""), flush=True)
    results = [None] * len(cases)
    for rnd in range(args.rounds):
        for unit in units(cases, args.interleave):
            for i, r in zip(unit, run_child([cases[i] for i in unit], args.timeout)):
                c = cases[i]
                results[i] = r if results[i] is None else merge_rounds(results[i], r)
                msg = r.get("error") or f"median {statistics.median(r['times']):.3f} s"
                print(f"[round {rnd + 1}/{args.rounds}, {i + 1}/{len(cases)}] {c['kind']} {c['method']} {c['shape']} "
                      f"ipc {c['ipc']} {path_of(c)}: {msg}", flush=True)
    rows = summarise(results, ceiling)
    print_table(rows, ceiling)
    import torch
    write_report(args.out, t0, {"rows": rows, "raw": results}, device=args.device, rounds=args.rounds,
                 interleave=args.interleave,
                 gpu=torch.cuda.get_device_name() if args.device == "cuda" else None, ceiling_gflops=ceiling,
                 onednn_gemm_gflops=onednn, argv=sys.argv[1:])
    return 0


if __name__ == "__main__":
    sys.exit(main())
