"""Our code beside the public reference DC/DSA/DM code, timed in one process.

Times one DC, DSA and DM iteration at ipc 1 and 10 (``--ipcs``), the evaluation's test pass over
10,000 images (TEST) and one whole evaluation at ipc 1 (EVAL: 300 epochs on 10 images, then the
test pass), on FashionMNIST-shaped random data (1x28x28, 10 classes, 6000 images per class,
ConvNet), ours and the reference's in turn (ours, reference, ours, ...) after one untimed warm-up
each, so that both see the same machine state. A DC/DSA iteration at ipc 10 is timed in its two
parts, one synthetic update and one 50-epoch inner loop, and composed repetition by repetition
as ``10 x update + 9 x inner loop``.

* ours: bench_speed.py's cases (the ``loop`` kernel; TEST: ``test_accuracy``) with ``--ops fast`` (the scripts' default)
  or ``--ops plain`` (torch's layers: our straightforward path); ``--bf16`` adds our DC/DSA under
  ``--precision bf16``, ``--compile`` our DM, TEST and EVAL under the scripts' ``--compile``;
* reference: the loop body of its ``main.py`` / ``main_DM.py`` for one iteration, and its
  ``epoch('test', ...)`` / ``evaluate_synset``, re-created in a few lines that call its own
  ``utils`` (imported from ``--reference_dir``, never copied), its clock-based seeds kept.

    git clone https://github.com/VICO-UoE/DatasetCondensation ../DatasetCondensation
    python benchmarks/bench_reference.py --reference_dir ../DatasetCondensation
    python benchmarks/bench_reference.py --reference_dir ../DatasetCondensation --ops plain --ipcs 1

Prints medians (min-max) and the speed-ups over the reference, and writes them as JSON
(``--out``). Run it on an otherwise idle machine.
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

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))   # bench_speed, which puts the repository on sys.path
from bench_speed import _data, case_fns, compose, interleaved, write_report  # noqa: E402

CLONE = "git clone https://github.com/VICO-UoE/DatasetCondensation"
SHAPE = "FashionMNIST"
IPC = 1
METHODS = ("DC", "DSA", "DM", "TEST", "EVAL")
# a row's sides: their name in the output, and the key of their median over the reference's
SIDES = {"ours": ("ours", "ratio"), "ours_bf16": ("bf16", "ratio_bf16"),
         "ours_compiled": ("compiled", "ratio_compiled"), "reference": ("reference", None)}


# --------------------------------------------------------------------------- the two sides
def load_reference(reference_dir: str):
    """The reference's ``utils`` module, imported from ``reference_dir``. Its ``utils`` and
    ``networks`` share their names with our top-level modules: ours are set aside in
    ``sys.modules`` while it imports and put back afterwards."""
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


def ours_side(method: str, data, device, dsa_strategy: str, ipc: int = IPC, layers: str = "fast",
              precision: str = "fp32", compiled: bool = False) -> dict:
    """Our side of a row, as bench_speed.py times it: ``{"iter": fn}`` or, for DC/DSA at ipc > 1,
    ``{"match": one synthetic update, "inner": one inner loop}``. TEST is ``test_accuracy``; EVAL a DC
    evaluation at ipc 1 (300 epochs, no augmentation for FashionMNIST, then the test pass)."""
    kind = {"TEST": "test_pass", "EVAL": "eval"}.get(method, "iter")
    kernel = "compiled" if compiled else {"iter": "loop", "test_pass": "batched", "eval": "-"}[kind]
    case = dict(kind=kind, method="DC" if kind == "eval" else method, shape=SHAPE, ipc=ipc, kernel=kernel, ops=layers,
                precision=precision, dsa_strategy=dsa_strategy if method in ("DSA", "DM") else "none")
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
    """The reference loop body, calling its ``utils``, in the parts ``ours_side`` returns.

    DC/DSA: main.py's body of one iteration: at ipc 1 all of it (outer_loop 1: it stops after the
    synthetic update; its ``get_network`` call is timed with it); at ipc > 1 one pass of its outer
    loop (``match``, on a network built once) and one inner loop (``inner``: its deepcopy,
    ``TensorDataset``, shuffled ``DataLoader`` and ``epoch('train', ...)`` calls). DM: main_DM.py's
    ConvNet branch. Real images as its ``get_images`` draws them. DSA through ``siamese`` below.
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
        """The reference's DSA call pair, with the two adaptations it needs on torch 2.x for one-channel
        images: 1. at ipc 1 its siamese broadcast ``t[:] = t[0]`` on a one-image batch (a no-op) is
        refused ("... refer to a single memory location"), so the synthetic call gets a ParamDiffAug
        whose Siamese flag stays False (same seed: it draws what the real batch's first sample draws);
        2. its crop returns channels-last strides, which make its ConvNet's ``out.view(...)`` fail, so
        the batches get row-major strides back (the inner loop's call: ``_row_major_diffaugment``)."""
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


def reference_evaluation(ref, kind: str, data):
    """``{"iter": fn}``: the reference's ``evaluate_synset`` (``EVAL``: 300 epochs, then its test pass) or
    its test pass alone (``TEST``: ``epoch('test', ...)``, gradients enabled as it leaves them), with
    its test loader as its ``main.py`` makes it (batch 256, no shuffling, no workers)."""
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
        return {"iter": lambda: ref.epoch("test", testloader, net, None, nn.CrossEntropyLoss(), args, aug=False)}
    x, y = data.images_train[:: data.images_train.shape[0] // 10][:10], torch.arange(10)

    def one_eval():
        net = ref.get_network("ConvNet", data.channel, data.num_classes, data.im_size)
        with contextlib.redirect_stdout(io.StringIO()):     # its one result line per call
            ref.evaluate_synset(0, net, x, y, testloader, args)
    return {"iter": one_eval}


# --------------------------------------------------------------------------- measuring
def summary(times: list) -> dict:
    return {"times": times, "median_s": statistics.median(times), "min_s": min(times), "max_s": max(times)}


def jobs(methods: list, ipcs: list) -> list:
    """(method, ipc) pairs to time: DC, DSA and DM at every ipc; TEST and EVAL (ipc 1) once."""
    return ([(m, ipc) for ipc in ipcs for m in methods if m in ("DC", "DSA", "DM")]
            + [(m, 1) for m in methods if m in ("TEST", "EVAL")])


def git_revision(path: str) -> str | None:
    try:
        return subprocess.run(["git", "-C", path, "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def sides_of(method: str, ipc: int, args, ref, data, device) -> dict:
    """{side: {part: fn}} of one row: ours, the reference, and the optional sides asked for."""
    sides = {"ours": ours_side(method, data, device, args.dsa_strategy, ipc, args.ops)}
    if args.bf16 and method in ("DC", "DSA"):
        sides["ours_bf16"] = ours_side(method, data, device, args.dsa_strategy, ipc, args.ops, "bf16")
    if args.compile and method in ("DM", "TEST", "EVAL"):
        sides["ours_compiled"] = ours_side(method, data, device, args.dsa_strategy, ipc, args.ops, compiled=True)
    sides["reference"] = (reference_evaluation(ref, method, data) if method in ("TEST", "EVAL")
                          else reference_iteration(ref, method, data, args.dsa_strategy, ipc))
    return sides


# --------------------------------------------------------------------------- main
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reference_dir", help=f"a clone of the public reference code ({CLONE})")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS,
                   help="condensation iterations (DC, DSA, DM), the test pass over 10,000 images (TEST), one "
                        "whole evaluation, 300 epochs + test pass (EVAL)")
    p.add_argument("--ipcs", nargs="+", type=int, default=[1, 10],
                   help="images per class of the DC, DSA and DM iterations (TEST and EVAL: ipc 1)")
    p.add_argument("--repeats", type=int, default=5, help="timed repetitions per side (after one warm-up)")
    p.add_argument("--num_threads", type=int, default=2)
    p.add_argument("--dsa_strategy", default="color_crop_cutout_flip_scale_rotate",
                   help="DSA transforms of the DSA and DM iterations, both sides")
    p.add_argument("--ops", choices=["fast", "plain"], default="fast",
                   help="our side's layers: fast (the scripts' default) or plain (torch's, as the reference)")
    p.add_argument("--compile", action="store_true",
                   help="DM, TEST and EVAL: also time ours with the scripts' --compile (side compiled)")
    p.add_argument("--bf16", action="store_true",
                   help="DC and DSA: also time ours with --precision bf16 (side bf16; faster than fp32 only on a CPU "
                        "with avx512_bf16 or AMX)")
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
    import dcbs.condense  # noqa: F401  (binds our `networks` before the reference's is imported)
    from dcbs.matching import get_loops
    from dcbs.perf import tune_allocator

    tune_allocator()
    torch.set_num_threads(args.num_threads)
    ref = load_reference(ref_dir)
    for msg in ("torch.meshgrid", "Default grid_sample", "Default upsampling"):
        warnings.filterwarnings("ignore", message=msg)     # the reference's DiffAugment, every call
    device, t0 = torch.device("cpu"), time.time()
    data = _data(SHAPE, device)
    print(f"reference: {ref.__file__}; ours with --ops {args.ops}; {torch.get_num_threads()} threads", flush=True)

    rows = []
    for method, ipc in jobs(args.methods, args.ipcs):
        sides = sides_of(method, ipc, args, ref, data, device)
        fns = {(side, part): fn for side, parts in sides.items() for part, fn in parts.items()}
        for fn in fns.values():
            fn()                                            # warm-up: allocator, oneDNN primitives, compilation
        times = interleaved(fns, device, args.repeats)
        row = {"method": method, "ipc": ipc, "shape": SHAPE,
               "dsa_strategy": args.dsa_strategy if method in ("DSA", "DM") else "none"}
        for side, parts in sides.items():
            if "iter" in parts:
                row[side] = summary(times[side, "iter"])
            else:
                outer = get_loops(ipc)[0]
                row[side] = {**summary(compose({p: times[side, p] for p in parts}, outer)),
                             "composed": f"{outer} x match + {outer - 1} x inner",
                             "parts": {p: summary(times[side, p]) for p in parts}}
        for side, (name, key) in SIDES.items():
            if key and side in row:
                row[key] = row[side]["median_s"] / row["reference"]["median_s"]
        rows.append(row)
        print(f"{method} ipc {ipc}: " + ", ".join(
            f"{SIDES[s][0]} {row[s]['median_s']:.3f} s ({row[s]['min_s']:.2f}-{row[s]['max_s']:.2f})" for s in sides)
            + "; speed-up over the reference: "
            + ", ".join(f"{SIDES[s][0]} {1 / row[SIDES[s][1]]:.2f}x" for s in sides if SIDES[s][1]), flush=True)

    write_report(args.out, t0, {"rows": rows}, ops=args.ops, compile=args.compile, bf16=args.bf16,
                 threads=torch.get_num_threads(), repeats=args.repeats, warmup=1, interleaved=True,
                 reference_dir=ref_dir, reference_revision=git_revision(ref_dir),
                 argv=sys.argv[1:] if argv is None else list(argv))
    print(f"\nwritten {args.out} ({time.time() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
