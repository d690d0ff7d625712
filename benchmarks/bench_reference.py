"""Our straightforward path against the public reference code, in one process.

Times one DC, DSA and DM iteration at ipc 1 and 10 (``--ipcs``), the evaluation's test
pass (TEST) and one whole evaluation at ipc 1 (EVAL: 300 epochs on 10 images, then the
test pass) on FashionMNIST-shaped random data (1x28x28, 10 classes, 6000 images per
class, 10,000 test images, ConvNet) two ways, interleaved (ours, reference, ours,
reference, ...) so that both see the same machine state. A DC/DSA iteration at ipc 10
(10 synthetic updates with a 50-epoch inner loop between each two: 4-5 minutes on the
reference on a 2-core CPU) is timed in its two parts, one synthetic update and one inner loop, each
side's parts interleaved with the other's, and each repetition composed as
``10 x update + 9 x inner loop`` (bench_speed's ``compose``, paired); the parts' figures are
reported too.

* ours: the ``loop`` kernel through ``dcbs.condense``'s step, driven as
  ``bench_speed.py`` drives one iteration (a network built once, a fresh
  ``StepContext`` per iteration), with the fast layers (``--ops fast``, the
  scripts' default) or torch's own (``--ops plain``: our straightforward path); with
  ``--bf16`` also our DC/DSA iterations under ``--precision bf16`` (side ``bf16``), and with
  ``--compile`` our test pass and DM iterations with the scripts' ``--compile`` (side ``compiled``);
* reference: the loop body of the public DC/DSA/DM code
  (https://github.com/VICO-UoE/DatasetCondensation), re-created in a few lines
  that call its own ``utils`` (get_network, match_loss, DiffAugment,
  ParamDiffAug, epoch) exactly as its ``main.py`` does for one iteration at ipc 1
  (outer loop 1, so no inner network training) or for one outer step and one
  inner loop at ipc 10, and ``main_DM.py`` for one DM iteration; for TEST and EVAL
  its ``epoch('test', ...)`` and ``evaluate_synset`` with a test loader as its
  ``main.py`` builds one. At ipc 1 its per-iteration ``get_network`` call is part
  of that body and is timed with it (milliseconds); its clock-based seeds are
  kept. Its DSA calls need two small adaptations to run on torch 2.x with
  one-channel images (``reference_iteration``'s ``siamese`` says which and why).

The reference code is not part of this repository: pass a clone with
``--reference_dir``. DSA and DM use ``--dsa_strategy`` on both sides (the
reference main_DM.py's default; main.py needs it given for DSA).

Both sides run with the same thread count and the allocator setting of
``dcbs.perf.tune_allocator`` (process-wide, as bench_speed.py's cases). Each side
gets one untimed warm-up, the run that counts its FLOPs (bench_speed's
``_flops``, ``torch.utils.flop_counter``; the compiled test pass one more, outside the
counter: bench_speed's ``flops_and_warm_up``), then ``--repeats`` timed runs. The
fp32 matmul ceiling is read at the start (bench_speed's ``ceiling_gflops``) and, for each
row, by five 2048x2048 matmuls timed in turn with the sides (``ceiling_probe``): the row's
"% of ceiling" uses the median of those readings, so it sees the machine state the row saw
(one start reading moved it by 30 % between runs here).
``--profile`` also runs ``torch.profiler`` on one more iteration of each side and
prints the top ops by self CPU time side by side.

    git clone https://github.com/VICO-UoE/DatasetCondensation ../DatasetCondensation
    python benchmarks/bench_reference.py --reference_dir ../DatasetCondensation
    python benchmarks/bench_reference.py --reference_dir ../DatasetCondensation --methods DC --profile
    python benchmarks/bench_reference.py --reference_dir ../DatasetCondensation --ops plain
    python benchmarks/bench_reference.py --reference_dir ../DatasetCondensation --methods DC DSA DM --ipcs 10
    python benchmarks/bench_reference.py --reference_dir ../DatasetCondensation --methods DC DSA --bf16

On a 2-core CPU, DC, DSA, DM at ipc 1 and 10 and TEST with 5 repetitions took 19 minutes;
the default run adds EVAL (a few minutes more).

The figures mean something only on an otherwise idle machine.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import time
import warnings
from types import SimpleNamespace

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))   # bench_speed, beside this file
from bench_speed import (_data, case_fns, ceiling_gflops, ceiling_probe, compose, flops_and_warm_up,  # noqa: E402
                         interleaved, onednn_gemm_gflops, write_report)   # bench_speed's rules and helpers; it puts the repository on sys.path

CLONE = "git clone https://github.com/VICO-UoE/DatasetCondensation"
SHAPE = "FashionMNIST"
IPC = 1
TOP_OPS = 15


# --------------------------------------------------------------------------- the two sides
def load_reference(reference_dir: str):
    """The reference's ``utils`` module, imported from ``reference_dir``.

    The reference's ``utils.py`` and ``networks.py`` share their names with our
    top-level modules, so ours are set aside in ``sys.modules`` while it imports
    (its ``utils`` binds its own ``networks``) and put back afterwards.
    """
    names = ("utils", "networks")
    ours = {n: sys.modules.pop(n) for n in names if n in sys.modules}
    sys.path.insert(0, reference_dir)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # scipy.ndimage.interpolation
            import utils as ref
    finally:
        sys.path.remove(reference_dir)
        for n in names:
            sys.modules.pop(n, None)
        sys.modules.update(ours)
    if os.path.dirname(os.path.realpath(ref.__file__)) != os.path.realpath(reference_dir):
        raise ImportError(f"imported {ref.__file__}, not the reference's utils.py")
    return ref


def ours_iteration(method: str, data, device, dsa_strategy: str, ipc: int = IPC, layers: str = "fast",
                   precision: str = "fp32", compiled: bool = False) -> dict:
    """Our step with the ``loop`` kernel, built by bench_speed.py's ``case_fns`` (a network built
    once, a fresh ``StepContext`` per iteration): ``{"iter": fn}`` (one whole iteration: ipc 1, and
    DM at any ipc) or, for DC/DSA at ipc > 1, the two parts an iteration is made of, ``{"match": one
    synthetic update, "inner": one inner loop}`` (see ``compose``): the step with its loops set to
    (1, 1), and ``condense.train_on_synthetic``, the step's own inner loop. DSA and DM augment with
    ``dsa_strategy``; ``precision`` is the scripts' ``--precision``, ``compiled`` their ``--compile``."""
    case = dict(kind="iter", method=method, shape=SHAPE, ipc=ipc, kernel="compiled" if compiled else "loop",
                ops=layers, precision=precision,
                dsa_strategy=dsa_strategy if method != "DC" else "none")
    return case_fns(case, data, device)[0]


def _one_image_param(ref):
    """A reference ParamDiffAug for a one-image batch: ``Siamese`` reads False whatever DiffAugment sets
    (broadcasting sample 0's draw to a batch of one changes nothing)."""
    class OneImageParam(ref.ParamDiffAug):
        Siamese = property(lambda self: False, lambda self, value: None)
    return OneImageParam()


def _plain_strides(x):
    """``x`` with row-major (NCHW) strides: a copy when its strides differ, ``x`` itself otherwise."""
    import torch
    want, acc = [], 1
    for size in reversed(x.shape):
        want.insert(0, acc)
        acc *= size
    return x if list(x.stride()) == want else x.clone(memory_format=torch.contiguous_format)


@contextlib.contextmanager
def _row_major_diffaugment(ref):
    """The reference's ``epoch`` calls its module's ``DiffAugment`` by name; while this is active that
    name returns row-major batches (``siamese``'s second adaptation, for the inner loop's call)."""
    real = ref.DiffAugment
    ref.DiffAugment = lambda *a, **k: _plain_strides(real(*a, **k))
    try:
        yield
    finally:
        ref.DiffAugment = real


def reference_iteration(ref, method: str, data, dsa_strategy: str, ipc: int = IPC) -> dict:
    """The reference loop body, calling its ``utils``, in the parts ``ours_iteration`` returns.

    DC/DSA: main.py's body for iteration ``it``: at ipc 1 the whole iteration (outer_loop 1: the
    loop breaks after the synthetic update, no inner network training; its ``get_network`` call is
    timed with it); at ipc > 1 one pass of its outer loop (``match``, on a network built once, as
    the iteration builds it once for all its outer steps) and one inner loop (``inner``: its
    ``copy.deepcopy``, ``TensorDataset``, shuffled ``DataLoader`` and ``inner_loop`` calls of its
    ``epoch('train', ...)``, DSA-augmented for DSA). DM: main_DM.py's ConvNet branch. ConvNet
    (instance norm) has no BatchNorm, so main.py's BatchNorm freezing never runs. Real images:
    ``images_all[np.random.permutation(indices_class[c])[:n]]`` with ``indices_class`` a list of
    Python ints, as the reference's ``get_images``. DSA goes through ``siamese`` below (two
    adaptations to torch 2.x, said there).
    """
    import copy
    import numpy as np
    import torch
    import torch.nn as nn

    channel, im_size, num_classes = data.channel, data.im_size, data.num_classes
    images_all = data.images_train
    indices_class = [[] for _ in range(num_classes)]
    for i, lab in enumerate(data.labels_train.tolist()):
        indices_class[lab].append(i)
    args = SimpleNamespace(device="cpu", dis_metric="ours", batch_real=256, batch_train=256, lr_net=0.01, ipc=ipc,
                           dsa_param=ref.ParamDiffAug(),
                           dsa=method != "DC" and dsa_strategy not in ("none", "None"),
                           dsa_strategy=dsa_strategy if method != "DC" else "None")
    args.outer_loop, args.inner_loop = ref.get_loops(ipc)

    def get_images(c, n):
        idx_shuffle = np.random.permutation(indices_class[c])[:n]
        return images_all[idx_shuffle]

    syn_param = _one_image_param(ref) if ipc == 1 else args.dsa_param

    def siamese(img_real, img_syn):
        """The reference's DSA call pair, with two adaptations without which it fails on torch 2.x
        for a one-channel dataset (the reference's code is used as it is):
        1. at ipc 1, its siamese broadcast ``t[:] = t[0]`` on the one-image synthetic batch (a no-op)
           is refused when ``t`` has one element ("... refer to a single memory location": crop,
           cutout, flip, colour); the synthetic call gets a ParamDiffAug whose Siamese flag stays
           False; it reseeds from the same seed, so it draws what the real batch's first sample
           draws (at ipc > 1 both calls share ``args.dsa_param``, as in main.py);
        2. its crop returns [N, 1, H, W] with channels-last strides, which ``.contiguous()`` keeps
           (one channel: both layouts count as contiguous); the convolutions then return channels-last
           maps and its ConvNet's ``out.view(out.size(0), -1)`` fails; the batches get row-major
           strides back, the layout the rest of the batches (and ours) have. The inner loop's call
           inside its ``epoch`` gets the same (``_row_major_diffaugment``).
        """
        seed = int(time.time() * 1000) % 100000
        img_real = ref.DiffAugment(img_real, args.dsa_strategy, seed=seed, param=args.dsa_param)
        img_syn = ref.DiffAugment(img_syn, args.dsa_strategy, seed=seed, param=syn_param)
        return _plain_strides(img_real), _plain_strides(img_syn)

    image_syn = torch.randn(size=(num_classes * ipc, channel, im_size[0], im_size[1]), dtype=torch.float,
                            requires_grad=True)
    label_syn = torch.tensor(np.array([np.ones(ipc) * i for i in range(num_classes)]), dtype=torch.long).view(-1)
    optimizer_img = torch.optim.SGD([image_syn], lr=1.0 if method == "DM" else 0.1, momentum=0.5)
    optimizer_img.zero_grad()
    criterion = nn.CrossEntropyLoss()

    def update_synthetic(net, net_parameters):           # main.py, one pass of the outer loop
        loss = torch.tensor(0.0).to(args.device)
        for c in range(num_classes):
            img_real = get_images(c, args.batch_real)
            lab_real = torch.ones((img_real.shape[0],), device=args.device, dtype=torch.long) * c
            img_syn = image_syn[c * ipc:(c + 1) * ipc].reshape((ipc, channel, im_size[0], im_size[1]))
            lab_syn = torch.ones((ipc,), device=args.device, dtype=torch.long) * c
            if args.dsa:
                img_real, img_syn = siamese(img_real, img_syn)
            gw_real = torch.autograd.grad(criterion(net(img_real), lab_real), net_parameters)
            gw_real = list((_.detach().clone() for _ in gw_real))
            gw_syn = torch.autograd.grad(criterion(net(img_syn), lab_syn), net_parameters, create_graph=True)
            loss += ref.match_loss(gw_syn, gw_real, args)
        optimizer_img.zero_grad()
        loss.backward()
        optimizer_img.step()
        return loss.item() / num_classes

    def gm_iteration():                                   # main.py, one iteration, outer_loop = 1
        net = ref.get_network("ConvNet", channel, num_classes, im_size)
        net.train()
        optimizer_net = torch.optim.SGD(net.parameters(), lr=args.lr_net)
        optimizer_net.zero_grad()
        return update_synthetic(net, list(net.parameters()))

    def dm_iteration():                                   # main_DM.py, one iteration, ConvNet branch
        net = ref.get_network("ConvNet", channel, num_classes, im_size)
        net.train()
        for param in list(net.parameters()):
            param.requires_grad = False
        embed = net.embed
        loss = torch.tensor(0.0).to(args.device)
        for c in range(num_classes):
            img_real = get_images(c, args.batch_real)
            img_syn = image_syn[c * ipc:(c + 1) * ipc].reshape((ipc, channel, im_size[0], im_size[1]))
            if args.dsa:
                img_real, img_syn = siamese(img_real, img_syn)
            output_real = embed(img_real).detach()
            output_syn = embed(img_syn)
            loss += torch.sum((torch.mean(output_real, dim=0) - torch.mean(output_syn, dim=0)) ** 2)
        optimizer_img.zero_grad()
        loss.backward()
        optimizer_img.step()
        return loss.item() / num_classes

    if method == "DM":
        return {"iter": dm_iteration}
    if args.outer_loop == 1:
        return {"iter": gm_iteration}
    net = ref.get_network("ConvNet", channel, num_classes, im_size)
    net.train()
    net_parameters = list(net.parameters())
    optimizer_net = torch.optim.SGD(net.parameters(), lr=args.lr_net)
    optimizer_net.zero_grad()
    args.dc_aug_param = None                              # main.py mutes DC augmentation in the inner loop

    def inner_loop():                                     # main.py, "update network", between two outer steps
        image_syn_train, label_syn_train = copy.deepcopy(image_syn.detach()), copy.deepcopy(label_syn.detach())
        dst_syn_train = torch.utils.data.TensorDataset(image_syn_train, label_syn_train)
        trainloader = torch.utils.data.DataLoader(dst_syn_train, batch_size=args.batch_train, shuffle=True,
                                                  num_workers=0)
        with _row_major_diffaugment(ref):
            for il in range(args.inner_loop):
                ref.epoch("train", trainloader, net, optimizer_net, criterion, args, aug=True if args.dsa else False)

    return {"match": lambda: update_synthetic(net, net_parameters), "inner": inner_loop}


def ours_evaluation(kind: str, data, device, compile_test: bool = False):
    """One evaluation of ours: ``EVAL`` trains a fresh ConvNet on a 10-image set by the protocol (300
    epochs, no augmentation for FashionMNIST, as ``eval_settings_for`` says) and tests it on the
    10,000 test images; ``TEST`` is the test pass alone (``test_accuracy``) of one network."""
    import torch
    from dcbs.evaluate import eval_settings_for, test_accuracy, train_and_test
    from networks import build_model

    if kind == "TEST":
        net = build_model("ConvNet", data.channel, data.num_classes, data.im_size).to(device)
        return lambda: test_accuracy(net, data.images_test, data.labels_test, compiled=compile_test)
    x, y = data.images_train[:: data.images_train.shape[0] // 10][:10], torch.arange(10, device=device)
    s = eval_settings_for("ConvNet", SHAPE, "ConvNet", IPC, "none", 0.01, 256, None, compile_test)
    state = {"i": 0}

    def one_eval():
        state["i"] += 1
        net = build_model("ConvNet", data.channel, data.num_classes, data.im_size).to(device)
        train_and_test(net, x, y, data.images_test, data.labels_test, s,
                       torch.Generator(device=device).manual_seed(state["i"]))
    return one_eval


def reference_evaluation(ref, kind: str, data):
    """The reference's ``evaluate_synset`` (``EVAL``: 300 epochs, then its test pass) or its test
    pass alone (``TEST``: ``epoch('test', ...)``, gradients enabled as the reference leaves them),
    with its test loader as its ``main.py`` makes it (batch 256, no shuffling, no workers)."""
    import contextlib
    import io
    import torch
    import torch.nn as nn

    args = SimpleNamespace(device="cpu", lr_net=0.01, batch_train=256, epoch_eval_train=300, dsa=False,
                           dsa_strategy="None", dsa_param=ref.ParamDiffAug(),
                           dc_aug_param=ref.get_daparam(SHAPE, "ConvNet", "ConvNet", IPC))
    testloader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(data.images_test, data.labels_test),
                                             batch_size=256, shuffle=False, num_workers=0)
    if kind == "TEST":
        net = ref.get_network("ConvNet", data.channel, data.num_classes, data.im_size)
        return lambda: ref.epoch("test", testloader, net, None, nn.CrossEntropyLoss(), args, aug=False)
    x, y = data.images_train[:: data.images_train.shape[0] // 10][:10], torch.arange(10)

    def one_eval():
        net = ref.get_network("ConvNet", data.channel, data.num_classes, data.im_size)
        with contextlib.redirect_stdout(io.StringIO()):     # its one result line per call
            ref.evaluate_synset(0, net, x, y, testloader, args)
    return one_eval


# --------------------------------------------------------------------------- measuring
def top_ops(fn, n: int = TOP_OPS) -> dict:
    """One call under torch.profiler: the n ops with the most self CPU time, and the total."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    return {"total_self_s": sum(e.self_cpu_time_total for e in events) / 1e6,
            "ops": [{"op": e.key, "self_s": e.self_cpu_time_total / 1e6, "calls": e.count} for e in events[:n]]}


def summary(times: list, flops: float, ceiling: float) -> dict:
    med = statistics.median(times)
    gflops = flops / med / 1e9
    return {"times": times, "median_s": med, "min_s": min(times), "max_s": max(times), "gflop": flops / 1e9,
            "gflops_per_s": gflops, "pct_ceiling": 100 * gflops / ceiling if ceiling else float("nan")}


def print_table(rows, ceiling, threads, repeats):
    print(f"\n{SHAPE} shape, ConvNet; {threads} threads; {repeats} timed repeats per side "
          f"(+1 warm-up), interleaved; fp32 matmul ceiling {ceiling:.0f} GFLOP/s at the start, and per row "
          f"(ceil) read between its repetitions, which %ceil uses")
    head = (f"{'method':<7}{'ipc':>4} {'side':<10}{'median s':>9} {'min-max':>17}{'GFLOP':>9}{'GFLOP/s':>9}{'%ceil':>6}"
            f"{'ceil':>6}{'ours/ref':>9}{'speed-up':>9}")
    print(head)
    print("-" * len(head))
    for r in rows:
        for side in [k for k in ("ours", *EXTRA_SIDES, "reference") if k in r]:
            s = r[side]
            q = r.get("ratio" if side == "ours" else EXTRA_SIDES.get(side, (None, ""))[1])
            ratio = f"{q:>9.2f}{1 / q:>8.2f}x" if q else ""
            name = EXTRA_SIDES.get(side, (side,))[0]
            print(f"{r['method']:<7}{r['ipc']:>4} {name:<10}{s['median_s']:>9.3f} {s['min_s']:>8.2f}-{s['max_s']:<8.2f}"
                  f"{s['gflop']:>9.1f}{s['gflops_per_s']:>9.1f}{s['pct_ceiling']:>6.0f}{r['ceiling_gflops']:>6.0f}{ratio}")
            for part, ps in s.get("parts", {}).items():
                print(f"{'':<12}{'  ' + part:<10}{ps['median_s']:>9.3f} {ps['min_s']:>8.2f}-{ps['max_s']:<8.2f}"
                      f"{ps['gflop']:>9.1f}{ps['gflops_per_s']:>9.1f}{ps['pct_ceiling']:>6.0f}")
    if any("parts" in r["ours"] for r in rows):
        print("ipc > 1 (DC/DSA): one iteration composed of its parts' repetitions (outer_loop x match + "
              "(outer_loop - 1) x inner), as main.py runs them")


# our optional sides: their name in the table and their ratio's key in a row
EXTRA_SIDES = {"ours_compiled": ("compiled", "ratio_compiled"), "ours_bf16": ("bf16", "ratio_bf16")}


def jobs(methods: list, ipcs: list) -> list:
    """(method, ipc) pairs to time: DC, DSA and DM at every ipc; TEST and EVAL (ipc 1) once."""
    return ([(m, ipc) for ipc in ipcs for m in methods if m in ("DC", "DSA", "DM")]
            + [(m, 1) for m in methods if m in ("TEST", "EVAL")])


def print_profile(method: str, prof: dict):
    a, b = prof["ours"], prof["reference"]
    w = 44
    print(f"\nprofile {method}: one iteration each, top {TOP_OPS} ops by self CPU time "
          f"(total self CPU: ours {a['total_self_s']:.2f} s, reference {b['total_self_s']:.2f} s)")
    print(f"   {'ours':<{w}}{'s':>7}{'calls':>7} | {'reference':<{w}}{'s':>7}{'calls':>7}")
    for i in range(max(len(a["ops"]), len(b["ops"]))):
        cells = []
        for side in (a, b):
            if i < len(side["ops"]):
                o = side["ops"][i]
                cells.append(f"{o['op'][:w - 1]:<{w}}{o['self_s']:>7.3f}{o['calls']:>7}")
            else:
                cells.append(" " * (w + 14))
        print(f"{i + 1:>2} {cells[0]} | {cells[1]}")


def git_revision(path: str) -> str | None:
    try:
        r = subprocess.run(["git", "-C", path, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        return (r.stdout.strip() or None) if r.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


# --------------------------------------------------------------------------- main
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reference_dir", help=f"a clone of the public reference code ({CLONE})")
    p.add_argument("--methods", nargs="+", default=["DC", "DSA", "DM", "TEST", "EVAL"],
                   choices=["DC", "DSA", "DM", "TEST", "EVAL"],
                   help="condensation iterations (DC, DSA, DM), the evaluation's test pass over 10,000 images "
                        "(TEST) and one whole evaluation, 300 epochs + test pass (EVAL)")
    p.add_argument("--ipcs", nargs="+", type=int, default=[1, 10],
                   help="images per class of the DC, DSA and DM iterations (TEST and EVAL: ipc 1)")
    p.add_argument("--repeats", type=int, default=5, help="timed repetitions per side (after one warm-up)")
    p.add_argument("--num_threads", type=int, default=2)
    p.add_argument("--dsa_strategy", default="color_crop_cutout_flip_scale_rotate",
                   help="DSA transforms of the DSA and DM iterations, both sides")
    p.add_argument("--ops", choices=["fast", "plain"], default="fast",
                   help="our side's layers: fast (the scripts' default) or plain (torch's, as the reference)")
    p.add_argument("--compile", "--compile_test", dest="compile", action="store_true",
                   help="DM, TEST and EVAL: also time ours with the scripts' --compile (the test pass and DM's real-"
                        "image embeddings through torch.compile), interleaved as a third side")
    p.add_argument("--bf16", action="store_true",
                   help="also time our DC/DSA iterations with --precision bf16 (side bf16; needs a CPU with "
                        "avx512_bf16 or AMX to be faster than fp32)")
    p.add_argument("--profile", action="store_true", help="also profile one iteration of each side")
    p.add_argument("--out", default=os.path.join("results", "bench", "reference.json"))
    args = p.parse_args(argv)
    if not args.reference_dir:
        print(f"error: --reference_dir is required: the reference code is not part of this repository; "
              f"get it with `{CLONE}` and pass --reference_dir PATH", file=sys.stderr)
        return 2
    ref_dir = os.path.abspath(args.reference_dir)
    if not os.path.isfile(os.path.join(ref_dir, "utils.py")):
        print(f"error: no utils.py in {ref_dir}; --reference_dir must be a clone made with `{CLONE}`",
              file=sys.stderr)
        return 2
    if args.repeats < 1 or args.num_threads < 1 or min(args.ipcs) < 1:
        print("error: --ipcs, --repeats and --num_threads must be >= 1", file=sys.stderr)
        return 2

    import torch
    from dcbs.perf import tune_allocator
    import dcbs.condense  # noqa: F401  (binds our `networks` before the reference's is imported)
    from dcbs.matching import get_loops

    from networks import set_ops
    tune_allocator()
    torch.set_num_threads(args.num_threads)
    set_ops(args.ops)                    # our models only: the reference builds its own layers
    ref = load_reference(ref_dir)
    for msg in ("torch.meshgrid", "Default grid_sample", "Default upsampling"):
        warnings.filterwarnings("ignore", message=msg)     # the reference's DiffAugment, every call
    device = torch.device("cpu")
    t0 = time.time()
    ceiling = start_ceiling = ceiling_gflops("cpu")
    probe, probe_flops = ceiling_probe("cpu")
    data = _data(SHAPE, device)
    onednn = onednn_gemm_gflops()
    print(f"reference: {ref.__file__}; ours with --ops {args.ops}"
          f"{' (and with --compile)' if args.compile else ''}; {torch.get_num_threads()} threads; "
          f"ceiling {ceiling:.0f} GFLOP/s (torch.matmul); oneDNN's GEMM {onednn:.0f} GFLOP/s", flush=True)

    rows, profiles = [], {}
    for method, ipc in jobs(args.methods, args.ipcs):
        if method in ("TEST", "EVAL"):
            sides = {"ours": {"iter": ours_evaluation(method, data, device)},
                     "reference": {"iter": reference_evaluation(ref, method, data)}}
            if args.compile:
                sides["ours_compiled"] = {"iter": ours_evaluation(method, data, device, compile_test=True)}
        else:
            sides = {"ours": ours_iteration(method, data, device, args.dsa_strategy, ipc, args.ops),
                     "reference": reference_iteration(ref, method, data, args.dsa_strategy, ipc)}
            if args.bf16 and method != "DM":
                sides["ours_bf16"] = ours_iteration(method, data, device, args.dsa_strategy, ipc, args.ops, "bf16")
            if args.compile and method == "DM":
                sides["ours_compiled"] = ours_iteration(method, data, device, args.dsa_strategy, ipc, args.ops,
                                                        compiled=True)
        fns = {(side, part): fn for side, parts in sides.items() for part, fn in parts.items()}
        fns["ceiling", "probe"] = probe
        flops = flops_and_warm_up(fns, compiled=lambda key: key[0] == "ours_compiled")
        times = interleaved(fns, device, args.repeats)
        readings = [probe_flops / t / 1e9 for t in times["ceiling", "probe"]]
        ceiling = statistics.median(readings)       # this row's, read between its repetitions
        row = {"method": method, "ipc": ipc, "shape": SHAPE,
               "dsa_strategy": args.dsa_strategy if method in ("DSA", "DM") else "none",
               "ceiling_gflops": ceiling, "ceiling_readings": readings}
        for side, parts in sides.items():
            if "iter" in parts:
                row[side] = summary(times[side, "iter"], flops[side, "iter"], ceiling)
            else:
                outer = get_loops(ipc)[0]
                t, f = compose({p: (times[side, p], flops[side, p]) for p in parts}, outer)
                row[side] = {**summary(t, f, ceiling), "composed": f"{outer} x match + {outer - 1} x inner",
                             "parts": {p: summary(times[side, p], flops[side, p], ceiling) for p in parts}}
        row["ratio"] = row["ours"]["median_s"] / row["reference"]["median_s"]
        for side, (name, key) in EXTRA_SIDES.items():
            if side in row:
                row[key] = row[side]["median_s"] / row["reference"]["median_s"]
        rows.append(row)
        print(f"{method} ipc {ipc}: ours {row['ours']['median_s']:.3f} s, reference {row['reference']['median_s']:.3f} s "
              f"(ours/reference {row['ratio']:.2f})"
              + "".join(f"; {name} {row[side]['median_s']:.3f} s ({row[key]:.2f})"
                        for side, (name, key) in EXTRA_SIDES.items() if side in row), flush=True)
        if args.profile:
            profiles[f"{method} ipc {ipc}"] = {side: top_ops(parts.get("iter") or parts["match"])
                                               for side, parts in sides.items()}

    print_table(rows, start_ceiling, torch.get_num_threads(), args.repeats)
    for method, prof in profiles.items():
        print_profile(method, prof)
    write_report(args.out, t0, {"rows": rows, "profile": profiles}, ops=args.ops, compile=args.compile,
                 bf16=args.bf16,
                 threads=torch.get_num_threads(),
                 repeats=args.repeats, warmup=1, interleaved=True, ceiling_gflops=start_ceiling,
                 onednn_gemm_gflops=onednn, reference_dir=ref_dir,
                 reference_revision=git_revision(ref_dir), argv=sys.argv[1:] if argv is None else list(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
