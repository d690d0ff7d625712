"""The batched gradient-matching kernel computes what the per-class loop computes."""
import copy
import dataclasses
import json
import os
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from conftest import needs_cxx, run_cli, run_main
from dcbs.matching import get_loops
from dcbs.augment import ParamDiffAug
from dcbs.condense import Diagnostics, StepContext, distribution_matching_step, gradient_matching_step
from dcbs.evaluate import has_batchnorm
from dcbs.fast_ops import build_model
from dcbs.kernels import per_class_grads
from dcbs.matching import match_loss, match_loss_batched
from dcbs.samplers import ClassSampler, ClusterSampler


def stacked_grads(seed, classes=4):
    g = torch.Generator().manual_seed(seed)
    shapes = [(8, 3, 3, 3), (8,), (4, 2, 5), (10, 32), (10,)]
    return [torch.randn(classes, *s, generator=g) for s in shapes]


@pytest.mark.parametrize("metric", ["ours", "mse", "cos"])
def test_batched_distance_is_the_sum_of_per_class_distances(metric):
    gs, gr = stacked_grads(0), stacked_grads(1)
    per_class = sum(match_loss([t[c] for t in gs], [t[c] for t in gr], metric) for c in range(4))
    assert match_loss_batched(gs, gr, metric).item() == pytest.approx(per_class.item(), rel=1e-5)


def test_batched_distance_rejects_unknown_metric():
    with pytest.raises(ValueError, match="choose one of"):
        match_loss_batched(stacked_grads(0), stacked_grads(1), "l1")


@pytest.mark.parametrize("model", ["ConvNet", "ConvNetBN", "ConvNetLN", "ConvNetNN"])
def test_per_class_grads_equal_the_loop_with_uneven_batches(model):
    torch.manual_seed(0)
    net = build_model(model, 1, 10, (28, 28))
    if has_batchnorm(net):               # the loop freezes BatchNorm before matching
        net(torch.randn(32, 1, 28, 28))
        net.eval()
    sizes = [7, 3, 12, 1]                 # Batch Sampling: clusters of different sizes
    xs = [torch.randn(n, 1, 28, 28) for n in sizes]
    ys = [torch.full((n,), c) for c, n in enumerate(sizes)]
    batched = per_class_grads(net, xs, ys)
    for c in range(len(sizes)):
        loop = torch.autograd.grad(F.cross_entropy(net(xs[c])[0], ys[c]), list(net.parameters()))
        for (name, _), ref in zip(net.named_parameters(), loop):
            torch.testing.assert_close(batched[name][c], ref, rtol=1e-4, atol=1e-6, msg=f"{model} {name} class {c}")


def _step(kernel, model, method, digits, sampler, ipc=2, seed=3, dtype=torch.float32, ops="fast", device="cpu",
          precision="fp32", compile=False, loops=None, batch_real=24):
    """One full iteration of the shared loop on ``device`` (the real data stays on the CPU, as
    ``StepContext.real_batch`` moves each batch); returns the loss row and the synthetic images
    after and before the step, on the CPU."""
    if dtype != torch.float32:
        digits = dataclasses.replace(digits, images_train=digits.images_train.to(dtype))
    dsa = "color_crop_cutout_flip_scale_rotate" if method == "DSA" else "none"
    cfg = SimpleNamespace(ipc=ipc, batch_real=batch_real, dsa_strategy=dsa, seed=seed, dis_metric="ours", lr_net=0.01,
                          batch_train=256, kernel=kernel, method=method, precision=precision,
                          compile=compile, outer_loop=(loops or get_loops(ipc))[0],
                          inner_loop=(loops or get_loops(ipc))[1])
    torch.manual_seed(seed)
    device = torch.device(device)
    net = build_model(model, digits.channel, digits.num_classes, digits.im_size, ops=ops).to(device, dtype)
    g = torch.Generator().manual_seed(seed)
    image_syn = torch.randn(digits.num_classes * ipc, digits.channel, *digits.im_size, generator=g,
                            dtype=dtype).to(device).requires_grad_(True)
    label_syn = torch.arange(digits.num_classes).repeat_interleave(ipc).to(device)
    opt = torch.optim.SGD([image_syn], lr=0.1, momentum=0.5)
    diag = Diagnostics([n for n, _ in net.named_parameters()])
    ctx = StepContext(cfg, digits, copy.deepcopy(sampler), ClassSampler(digits.indices_class, 5), 0, 0,
                      device, ParamDiffAug(), diag)
    start = image_syn.detach().clone().cpu()
    step = distribution_matching_step if method == "DM" else gradient_matching_step
    step(net, image_syn, label_syn, opt, ctx)
    return diag.row(0, 0), image_syn.detach().cpu(), start


@needs_cxx
@pytest.mark.parametrize("model", ["ConvNet", "ConvNetBN"])
def test_compiled_real_embeddings_make_the_same_dm_update(digits, model):
    """--compile runs DM's real-image embeddings through torch.compile: the same update as eager."""
    sampler = ClassSampler(digits.indices_class, 11)
    row_e, syn_e, start = _step("loop", model, "DM", digits, sampler, 2)
    row_c, syn_c, _ = _step("loop", model, "DM", digits, sampler, 2, compile=True)
    assert not torch.equal(syn_e, start)
    assert_same_update(syn_c, syn_e, start)
    assert row_c["loss"] == pytest.approx(row_e["loss"], rel=1e-4)


def assert_same_update(syn_b, syn_l, start):
    """The two kernels move the synthetic images the same way, up to rounding. Measured as the
    norm of the difference of the updates: the cosine distance divides by gradient-row norms,
    some of which are tiny, so single pixels can carry ~1e-3 relative rounding noise (seen
    with DSA), while pairing a class with the wrong gradients would give an O(1) difference."""
    u_l, u_b = syn_l - start, syn_b - start
    assert (u_b - u_l).norm() <= 1e-3 * u_l.norm()
    per_image = (u_b - u_l).flatten(1).norm(dim=1) / u_l.flatten(1).norm(dim=1)
    assert per_image.max() <= 1e-2


@pytest.mark.parametrize("model,method,ipc", [("ConvNet", "DC", 1), ("ConvNet", "DSA", 2), ("ConvNetBN", "DC", 1),
                                              ("ConvNet", "DM", 2), ("ConvNetBN", "DM", 2)])
def test_batched_kernel_makes_the_same_update_as_the_loop(digits, model, method, ipc):
    sampler = ClassSampler(digits.indices_class, 11)
    row_l, syn_l, start = _step("loop", model, method, digits, sampler, ipc)
    row_b, syn_b, _ = _step("batched", model, method, digits, sampler, ipc)
    assert not torch.equal(syn_l, start)                   # the step did something
    assert_same_update(syn_b, syn_l, start)
    assert row_b["loss"] == pytest.approx(row_l["loss"], rel=1e-4)
    assert row_b.keys() == row_l.keys()
    for k in row_l:
        if k.startswith("gw_"):
            assert row_b[k] == pytest.approx(row_l[k], rel=1e-4, abs=1e-6), k  # biases before a norm: ~0
    assert row_b["batch_real_mean"] == row_l["batch_real_mean"]


def test_batched_kernel_over_several_outer_steps_in_float64(digits):
    """ipc 10: outer steps with network training between them. In fp32 the two kernels' rounding
    differences grow through the inner SGD steps (~5e-3 relative after 3 outer steps with 2 inner steps), which would
    hide a real error, so this runs in float64, where the same computation agrees to ~1e-12 (a 32-channel
    ConvNet and real batches of 8, as float64 is slow: the kernels are the same code at any width and batch)."""
    sampler = ClassSampler(digits.indices_class, 17)     # loops (2, 1): the protocol's (10, 50) takes minutes
    row_l, syn_l, start = _step("loop", "ConvNetW32", "DC", digits, sampler, 10, dtype=torch.float64, loops=(2, 1),
                                batch_real=8)
    row_b, syn_b, _ = _step("batched", "ConvNetW32", "DC", digits, sampler, 10, dtype=torch.float64, loops=(2, 1),
                            batch_real=8)
    u_l, u_b = syn_l - start, syn_b - start
    assert u_l.norm() > 0
    assert (u_b - u_l).norm() <= 1e-9 * u_l.norm()
    assert row_b["loss"] == pytest.approx(row_l["loss"], rel=1e-9)


def test_batched_kernel_with_uneven_cluster_batches(digits):
    # clusters of 3..20 images: every class's batch is a whole, differently sized cluster
    g = torch.Generator().manual_seed(0)
    clusters = []
    for ix in digits.indices_class:
        ix = torch.as_tensor(ix)[torch.randperm(len(ix), generator=g)]
        clusters.append([ix[:3].sort().values, ix[3:20].sort().values, ix[20:].sort().values])
    sampler = ClusterSampler(clusters, seed=4)
    row_l, syn_l, start = _step("loop", "ConvNet", "DC", digits, sampler)
    row_b, syn_b, _ = _step("batched", "ConvNet", "DC", digits, sampler)
    assert row_l["batch_real_min"] < row_l["batch_real_mean"]     # the batches really were uneven
    assert_same_update(syn_b, syn_l, start)
    assert row_b["loss"] == pytest.approx(row_l["loss"], rel=1e-4)


def check_flag_through_the_command_line(tmp_path, flag, values, ipc):
    """Runs main.py once per value of ``--flag``: each run records it in config.json, the synthetic
    sets agree to rounding, and an unknown value is refused by argparse (in this process: main.py
    only calls dcbs.cli.main). Evaluated once, at the end: the sets are what is compared."""
    # a 32-channel ConvNet: the flags reach the same code at any width, at a quarter of the cost
    args = ["--dataset", "digits", "--preset", "smoke", "--model", "ConvNetW32", "--ipc", ipc, "--batch_real", 32,
            "--seed", 5, "--eval_it", 2, "--save_path", tmp_path]
    out = {}
    for value in values:
        r = run_cli("main.py", *args, "--run_name", value, f"--{flag}", value)
        assert r.returncode == 0, r.stderr
        out[value] = torch.load(os.path.join(tmp_path, value, "syn_exp0.pt"), weights_only=True)["data"][0][0]
        assert json.load(open(os.path.join(tmp_path, value, "config.json")))[flag] == value
    # as a whole set: single pixels carry ~3e-3 of rounding on some CPUs (see assert_same_update)
    a, b = out[values[1]], out[values[0]]
    assert a.shape == b.shape and (a - b).norm() <= 1e-3 * b.norm()
    r = run_main("main.py", *args, "--run_name", "bad", f"--{flag}", "fused")
    assert r.returncode == 2 and "invalid choice" in r.stderr


def test_kernel_flag_through_the_command_line(tmp_path):
    check_flag_through_the_command_line(tmp_path, "kernel", ("loop", "batched"), ipc=2)


def test_batched_kernel_in_chunks_of_classes_equals_the_loop(digits, monkeypatch):
    import dcbs.kernels as k
    monkeypatch.setattr(k, "CLASSES_PER_PASS", 3)          # 10 classes: passes of 3, 3, 3 and 1
    sampler = ClassSampler(digits.indices_class, 13)
    row_l, syn_l, start = _step("loop", "ConvNet", "DC", digits, sampler)
    row_b, syn_b, _ = _step("batched", "ConvNet", "DC", digits, sampler)
    assert_same_update(syn_b, syn_l, start)
    assert row_b["loss"] == pytest.approx(row_l["loss"], rel=1e-4)
