"""Our code beside the public reference DC/DSA/DM code, timed in one process, sides in turn.

Rows: a DC, DSA and DM iteration at each ``--ipcs``, the 10,000-image test pass (TEST) and one
evaluation at ipc 1 (EVAL) on FashionMNIST-shaped random data. Ours is bench_speed.py's case; the
reference's is its main.py / main_DM.py loop body, ``epoch('test', ...)`` and ``evaluate_synset``,
re-created around its own ``utils`` from ``--reference_dir``. Figures: docs/performance.md.

    git clone https://github.com/VICO-UoE/DatasetCondensation ../DatasetCondensation
    python benchmarks/bench_reference.py --reference_dir ../DatasetCondensation --bf16 --compile
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import subprocess
import sys
import time
import warnings
from types import SimpleNamespace
from unittest import mock

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))   # bench_speed, which puts the repository on sys.path
from bench_speed import (DSA_STRATEGY, _data, case_fns, compose, interleaved, setup_torch, summary,  # noqa: E402
                         write_report)

CLONE = "git clone https://github.com/VICO-UoE/DatasetCondensation"
SHAPE = "FashionMNIST"
IPC = 1
METHODS = ("DC", "DSA", "DM", "TEST", "EVAL")
RATIO = {"ours": "ratio", "ours_bf16": "ratio_bf16", "ours_compiled": "ratio_compiled"}  # side: its / reference's


# --------------------------------------------------------------------------- the two sides
def load_reference(reference_dir: str):
    """The reference's ``utils``, imported from ``reference_dir`` with our same-named top-level
    modules (``utils``, ``networks``) set aside in ``sys.modules`` meanwhile."""
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
    """Our side of a row, bench_speed.py's case: TEST is ``test_accuracy``, EVAL a DC evaluation at ipc 1."""
    kind = {"TEST": "test_pass", "EVAL": "eval"}.get(method, "iter")
    kernel = "compiled" if compiled else {"iter": "loop", "test_pass": "batched", "eval": "-"}[kind]
    case = dict(kind=kind, method="DC" if kind == "eval" else method, shape=SHAPE, ipc=ipc, kernel=kernel, ops=layers,
                precision=precision, dsa_strategy=dsa_strategy if method in ("DSA", "DM") else "none")
    return case_fns(case, data, device)[0]


def _plain_strides(x):
    """``x`` with row-major strides (exactly: ``contiguous()`` ignores a one-channel dimension's stride)."""
    import torch
    want = tuple(math.prod(x.shape[i + 1:]) for i in range(x.dim()))
    return x if x.stride() == want else x.clone(memory_format=torch.contiguous_format)


def reference_iteration(ref, method: str, data, dsa_strategy: str, ipc: int = IPC) -> dict:
    """The reference's loop body around its ``utils``, in the parts ``ours_side`` returns: main.py's
    whole iteration at ipc 1 (``get_network`` included), else one outer-loop pass (``match``) and one
    inner loop (``inner``); main_DM.py's ConvNet branch for DM."""
    import copy
    import numpy as np
    import torch
    import torch.nn as nn

    channel, im_size, num_classes = data.channel, data.im_size, data.num_classes
    images_all = data.images_train
    indices_class = [(data.labels_train == c).nonzero().flatten().tolist() for c in range(num_classes)]
    args = SimpleNamespace(device="cpu", dis_metric="ours", batch_real=256, batch_train=256, lr_net=0.01, ipc=ipc,
                           dsa_param=ref.ParamDiffAug(),
                           dsa=method != "DC" and dsa_strategy not in ("none", "None"),
                           dsa_strategy=dsa_strategy if method != "DC" else "None")
    args.outer_loop, args.inner_loop = ref.get_loops(ipc)

    def get_images(c, n):
        idx_shuffle = np.random.permutation(indices_class[c])[:n]
        return images_all[idx_shuffle]

    class OneImageParam(ref.ParamDiffAug):               # Siamese stays False: on one image it changes nothing
        Siamese = property(lambda self: False, lambda self, value: None)
    syn_param = OneImageParam() if ipc == 1 else args.dsa_param

    def siamese(img_real, img_syn):
        """The reference's DSA call pair, adapted for one-channel images on torch 2.x: its siamese
        ``t[:] = t[0]`` on a one-image batch is refused (hence ``syn_param``), and its crop's
        channels-last strides break its ConvNet's ``out.view`` (hence ``_plain_strides``)."""
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
        net.requires_grad_(False)                        # its loop over net.parameters()
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
    real_diff_augment = ref.DiffAugment
    row_major = lambda *a, **k: _plain_strides(real_diff_augment(*a, **k))

    def inner_loop():                                     # main.py, "update network", between two outer steps
        image_syn_train, label_syn_train = copy.deepcopy(image_syn.detach()), copy.deepcopy(label_syn.detach())
        dst_syn_train = torch.utils.data.TensorDataset(image_syn_train, label_syn_train)
        trainloader = torch.utils.data.DataLoader(dst_syn_train, batch_size=args.batch_train, shuffle=True,
                                                  num_workers=0)
        with mock.patch.object(ref, "DiffAugment", row_major):   # its epoch calls DiffAugment by name
            for il in range(args.inner_loop):
                ref.epoch("train", trainloader, net, optimizer_net, criterion, args, aug=True if args.dsa else False)

    return {"match": lambda: update_synthetic(net, net_parameters), "inner": inner_loop}


def reference_evaluation(ref, kind: str, data):
    """``{"iter": fn}``: its ``evaluate_synset`` (EVAL) or ``epoch('test', ...)`` (TEST, gradients enabled as
    it leaves them), on a test loader as its main.py makes it."""
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
def jobs(methods: list, ipcs: list) -> list:
    """(method, ipc) pairs to time: DC, DSA and DM at every ipc; TEST and EVAL (ipc 1) once."""
    return ([(m, ipc) for ipc in ipcs for m in methods if m in ("DC", "DSA", "DM")]
            + [(m, 1) for m in methods if m in ("TEST", "EVAL")])


def git_revision(path: str) -> str | None:
    try:
        out = subprocess.run(["git", "-C", path, "rev-parse", "HEAD"], capture_output=True, text=True).stdout
    except OSError:                                       # no git on this machine
        return None
    return out.strip() or None


def sides_of(method: str, ipc: int, args, ref, data, device) -> dict:
    """{side: {part: fn}} of one row: ours, the optional sides asked for, the reference."""
    sides = {"ours": ours_side(method, data, device, DSA_STRATEGY, ipc, args.ops)}
    if args.bf16 and method in ("DC", "DSA"):
        sides["ours_bf16"] = ours_side(method, data, device, DSA_STRATEGY, ipc, args.ops, "bf16")
    if args.compile and method in ("DM", "TEST", "EVAL"):
        sides["ours_compiled"] = ours_side(method, data, device, DSA_STRATEGY, ipc, args.ops, compiled=True)
    sides["reference"] = (reference_evaluation(ref, method, data) if method in ("TEST", "EVAL")
                          else reference_iteration(ref, method, data, DSA_STRATEGY, ipc))
    return sides


# --------------------------------------------------------------------------- main
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reference_dir", help=f"a clone of the public reference code ({CLONE})")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS,
                   help="iterations (DC, DSA, DM), the test pass (TEST), one evaluation at ipc 1 (EVAL)")
    p.add_argument("--ipcs", nargs="+", type=int, default=[1, 10], help="images per class of the iterations")
    p.add_argument("--repeats", type=int, default=5, help="timed repetitions per side (after one warm-up)")
    p.add_argument("--num_threads", type=int, default=2)
    p.add_argument("--ops", choices=["fast", "plain"], default="fast",
                   help="our side's layers: fast (the scripts' default) or plain (torch's, as the reference)")
    p.add_argument("--compile", action="store_true", help="DM, TEST and EVAL: also ours under --compile")
    p.add_argument("--bf16", action="store_true", help="DC and DSA: also ours under --precision bf16")
    p.add_argument("--out", default=os.path.join("results", "bench", "reference.json"))
    args = p.parse_args(argv)
    if not args.reference_dir:
        p.error(f"--reference_dir is required: the reference code is not part of this repository; get it "
                f"with `{CLONE}` and pass --reference_dir PATH")
    ref_dir = os.path.abspath(args.reference_dir)
    if not os.path.isfile(os.path.join(ref_dir, "utils.py")):
        p.error(f"no utils.py in {ref_dir}; --reference_dir must be a clone made with `{CLONE}`")
    if args.repeats < 1 or args.num_threads < 1 or min(args.ipcs) < 1:
        p.error("--ipcs, --repeats and --num_threads must be >= 1")

    import torch
    import dcbs.condense  # noqa: F401  (binds our `networks` before the reference's is imported)
    from dcbs.matching import get_loops

    device, t0 = setup_torch(p, "cpu", args.num_threads), time.time()
    ref = load_reference(ref_dir)
    for msg in ("torch.meshgrid", "Default grid_sample", "Default upsampling"):
        warnings.filterwarnings("ignore", message=msg)     # the reference's DiffAugment, every call
    data = _data(SHAPE, device)
    print(f"reference: {ref.__file__}; ours with --ops {args.ops}; {torch.get_num_threads()} threads", flush=True)

    rows = []
    for method, ipc in jobs(args.methods, args.ipcs):
        sides = sides_of(method, ipc, args, ref, data, device)
        fns = {(side, part): fn for side, parts in sides.items() for part, fn in parts.items()}
        times = interleaved(fns, device, args.repeats)
        row = {"method": method, "ipc": ipc, "shape": SHAPE,
               "dsa_strategy": DSA_STRATEGY if method in ("DSA", "DM") else "none"}
        for side, parts in sides.items():
            if "iter" in parts:
                row[side] = summary(times[side, "iter"])
            else:
                outer = get_loops(ipc)[0]
                row[side] = {**summary(compose({p: times[side, p] for p in parts}, outer)),
                             "composed": f"{outer} x match + {outer - 1} x inner",
                             "parts": {p: summary(times[side, p]) for p in parts}}
        row.update({RATIO[s]: row[s]["median_s"] / row["reference"]["median_s"] for s in sides if s in RATIO})
        rows.append(row)
        print(f"{method} ipc {ipc}: " + ", ".join(
            f"{s} {row[s]['median_s']:.3f} s ({row[s]['min_s']:.2f}-{row[s]['max_s']:.2f})" for s in sides)
            + "; speed-up over the reference: " + ", ".join(f"{s} {1 / row[RATIO[s]]:.2f}x" for s in RATIO if s in sides),
            flush=True)

    write_report(args.out, t0, {"rows": rows}, ops=args.ops, compile=args.compile, bf16=args.bf16,
                 threads=torch.get_num_threads(), repeats=args.repeats, warmup=1, interleaved=True,
                 reference_dir=ref_dir, reference_revision=git_revision(ref_dir), argv=argv)
    print(f"\nwritten {args.out} ({time.time() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
