"""--precision bf16: opt-in, confined to the real-data gradients and the inner loop, and
within a bf16 tolerance of fp32 where it applies."""
import contextlib
import copy
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from dcbs import precision
from dcbs.augment import ParamDiffAug
from dcbs.condense import Diagnostics, train_on_synthetic
from dcbs.config import ConfigError, build_parser, resolve
from dcbs.fast_ops import build_model, conv_instance_norm
from dcbs.kernels import loop_kernel, per_class_grads
from dcbs.samplers import ClassSampler

BF16 = precision.autocast("cpu", "bf16")


def conv_output_dtypes(net):
    """Records the dtype of every Conv2d output of ``net``, call by call, as (batch size, dtype)."""
    seen = []
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            m.register_forward_hook(lambda mod, inp, out: seen.append((out.shape[0], out.dtype)))
    return seen


def digit_batches(digits, n=32):
    """Real images of each class (structured data: on noise the gradient of a random network is
    mostly cancellation, which no rounding test should be made of)."""
    return [(digits.images_train[ix[:n]], torch.full((min(n, len(ix)),), c)) for c, ix in enumerate(digits.indices_class)]


def test_fp32_is_the_default_and_a_no_op():
    assert resolve(build_parser().parse_args([])).precision == "fp32"
    assert precision.autocast("cpu", "fp32") is contextlib.nullcontext
    with pytest.raises(ValueError, match="choose one of"):
        precision.autocast("cpu", "fp16")


def test_losses_are_taken_at_full_precision_and_float64_stays_float64():
    """Autocast's bf16 logits are upcast to fp32 for the loss; a float64 run is never cast down."""
    for dtype, expected in ((torch.bfloat16, torch.float32), (torch.float32, torch.float32),
                            (torch.float64, torch.float64)):
        assert precision.upcast(torch.zeros(2, dtype=dtype)).dtype == expected
    t = torch.zeros(2)
    assert precision.upcast(t) is t


def test_bf16_is_refused_for_dm_with_a_message_that_says_what_to_do():
    with pytest.raises(ConfigError, match="drop --precision"):
        resolve(build_parser().parse_args(["--method", "DM", "--precision", "bf16"]))
    assert resolve(build_parser().parse_args(["--method", "DSA", "--precision", "bf16"])).precision == "bf16"


def test_check_refuses_a_gpu_without_bf16_and_warns_on_an_emulating_cpu(monkeypatch):
    assert precision.check("fp32", torch.device("cpu")) is None
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)
    assert "slower than fp32" in precision.check("bf16", torch.device("cpu"))
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
    assert precision.check("bf16", torch.device("cpu")) is None
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "Tesla V100")
    with pytest.raises(ValueError, match="V100 has no bf16.*--precision fp32"):
        precision.check("bf16", torch.device("cuda"))


@pytest.mark.parametrize("layers", ["fast", "plain"])
def test_bf16_real_gradient_is_within_bf16_tolerance_of_fp32(digits, layers):
    torch.manual_seed(0)
    net = build_model("ConvNet", digits.channel, digits.num_classes, digits.im_size, ops=layers)
    params = list(net.parameters())
    dtypes = conv_output_dtypes(net)
    for x, y in digit_batches(digits)[:3]:
        g32 = torch.autograd.grad(F.cross_entropy(net(x)[0], y), params)
        with BF16():
            out = net(x)[0]
        g16 = torch.autograd.grad(F.cross_entropy(out.float(), y), params)
        for (name, p), a, b in zip(net.named_parameters(), g32, g16):
            assert b.dtype == torch.float32 and b.shape == p.shape       # gradients land on the fp32 weights
            if p.dim() > 1:                                              # what eq. 1 compares
                assert (a - b).norm() <= 0.03 * a.norm(), name
                rows = F.cosine_similarity(a.flatten(1), b.flatten(1), dim=1)     # per output unit, as eq. 1
                assert rows.median() > 0.999 and rows.min() > 0.95, name     # small rows carry more rounding
    # the convolutions really ran in bf16 (and in fp32 without autocast)
    assert {d for _, d in dtypes} == {torch.float32, torch.bfloat16}


def test_fused_first_block_keeps_its_statistics_in_fp32_under_autocast():
    """Under autocast the block's statistics stay fp32 and its last matmul runs in bf16: the map is
    bf16, within bf16 rounding of the fp32 block, and normalised to bf16 precision."""
    torch.manual_seed(1)
    conv, norm = nn.Conv2d(3, 16, 3, padding=1), nn.GroupNorm(16, 16)
    x = torch.randn(4, 3, 12, 12) * 3 + 5             # a large mean: cancellation in the centred patches
    ref = conv_instance_norm(x, conv, norm)
    with BF16():
        out = conv_instance_norm(x, conv, norm)
    assert out.dtype == torch.bfloat16
    err = (out.float() - ref).abs().max() / ref.abs().max()
    assert err < 2 ** -7
    # the statistics themselves: every channel of the bf16 map has mean 0 and variance 1 to bf16 precision
    o = out.float().flatten(2)
    assert o.mean(-1).abs().max() < 2e-2 and (o.var(-1, unbiased=False) - 1).abs().max() < 2e-2


def test_loop_kernel_runs_only_the_real_side_in_bf16(digits):
    # real batches of 8 (emulated bf16 is slow): within 3e-2 of fp32 in norm, as batches of 20 are within 2e-2
    torch.manual_seed(0)
    net = build_model("ConvNet", digits.channel, digits.num_classes, digits.im_size)
    dtypes = conv_output_dtypes(net)
    batches = digit_batches(digits, 8)
    syn = torch.randn(digits.num_classes, digits.channel, *digits.im_size, requires_grad=True)

    def batch(c):
        x, y = batches[c]
        return x, y, syn[c:c + 1], torch.tensor([c])

    losses, grads = {}, {}
    for name, amp in (("fp32", contextlib.nullcontext), ("bf16", BF16)):
        dtypes.clear()
        diag = Diagnostics([n for n, _ in net.named_parameters()])
        loss = loop_kernel(net, batch, digits.num_classes, "ours", diag, amp)
        grads[name], = torch.autograd.grad(loss, syn)
        losses[name] = loss.item()
        assert loss.dtype == torch.float32
        real = {d for n, d in dtypes if n == 8}
        synthetic = {d for n, d in dtypes if n == 1}
        assert real == ({torch.bfloat16} if name == "bf16" else {torch.float32})
        assert synthetic == {torch.float32}                # the synthetic side never runs in bf16
    assert losses["bf16"] == pytest.approx(losses["fp32"], rel=1e-2)
    a, b = grads["fp32"], grads["bf16"]
    assert F.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 0.99
    assert (a - b).norm() <= 0.1 * a.norm()


def test_per_class_grads_under_bf16_agree_with_the_loop_under_bf16(digits):
    """The batched kernel's vmapped real side under autocast: the same bf16 computation per class."""
    torch.manual_seed(0)
    net = build_model("ConvNet", digits.channel, digits.num_classes, digits.im_size)
    batches = digit_batches(digits, 12)[:4]
    batches[1] = (batches[1][0][:5], batches[1][1][:5])              # uneven, as Batch Sampling's
    batched = per_class_grads(net, [x for x, _ in batches], [y for _, y in batches], BF16)
    for c, (x, y) in enumerate(batches):
        with BF16():
            out = net(x)[0]
        loop = torch.autograd.grad(F.cross_entropy(out.float(), y), list(net.parameters()))
        for (name, p), ref in zip(net.named_parameters(), loop):
            if p.dim() > 1:
                assert (batched[name][c] - ref).norm() <= 0.03 * ref.norm(), (name, c)


def test_inner_loop_trains_in_bf16_with_fp32_weights(digits):
    torch.manual_seed(0)
    net0 = build_model("ConvNet", digits.channel, digits.num_classes, digits.im_size)
    x = torch.cat([b[0][:3] for b in digit_batches(digits, 3)])
    y = torch.arange(digits.num_classes).repeat_interleave(3)
    after = {}
    for name in ("fp32", "bf16"):
        net = copy.deepcopy(net0)
        dtypes = conv_output_dtypes(net)
        cfg = SimpleNamespace(dsa_strategy="none", batch_train=256, precision=name)
        opt = torch.optim.SGD(net.parameters(), lr=0.01)
        train_on_synthetic(net, opt, nn.CrossEntropyLoss(), x, y, cfg, 5, torch.Generator().manual_seed(0),
                           ParamDiffAug())
        assert {d for _, d in dtypes} == {torch.bfloat16 if name == "bf16" else torch.float32}
        assert all(p.dtype == torch.float32 for p in net.parameters())
        after[name] = torch.cat([p.detach().flatten() for p in net.parameters()])
    before = torch.cat([p.detach().flatten() for p in net0.parameters()])
    step32, step16 = after["fp32"] - before, after["bf16"] - before
    assert step32.norm() > 0
    # five steps amplify rounding (fp32 plain layers land 1.3 % from float64 here): bf16 lands
    # 4.3 % (plain layers) to 5.0 % (fast layers, before and after the channels-last training
    # blocks, which leave bf16 untouched) from fp32; a bf16 bug moves it by O(1)
    assert (step16 - step32).norm() <= 0.06 * step32.norm()


def matching_step_updates(digits, device="cpu", loops=None, batch_real=24):
    """The synthetic images' update and the loss of one DC step (test_kernels' ``_step``, ipc 2) in fp32
    and bf16 on ``device`` (same seeds, same real batches drawn on the CPU)."""
    from test_kernels import _step
    sampler = ClassSampler(digits.indices_class, 11)
    moved = {}
    for name in ("fp32", "bf16"):
        row, syn, start = _step("loop", "ConvNet", "DC", digits, sampler, ipc=2, device=device, precision=name,
                                loops=loops, batch_real=batch_real)
        assert syn.dtype == torch.float32
        moved[name] = (syn - start, row["loss"])
    return moved


def assert_bf16_moves_as_fp32(moved):
    (u32, l32), (u16, l16) = moved["fp32"], moved["bf16"]
    assert u32.norm() > 0
    assert l16 == pytest.approx(l32, rel=2e-2)
    assert F.cosine_similarity(u32.flatten(), u16.flatten(), dim=0) > 0.98


def test_gradient_matching_step_in_bf16_moves_the_images_as_fp32_does(digits):
    """A whole step with two outer updates and an inner loop between them (loops (2, 2)). Real batches
    of 8, as emulated bf16 is slow: loss within 4e-4 and cosine 0.9993, as with batches of 24."""
    assert_bf16_moves_as_fp32(matching_step_updates(digits, loops=(2, 2), batch_real=8))


def test_resume_compares_a_setting_the_run_predates_with_its_default(monkeypatch):
    """Runs saved before --precision existed ran in fp32: resuming them with --precision fp32 is
    the same run, with bf16 it is refused as a change."""
    import dcbs.cli as cli
    saved = {**vars(resolve(build_parser().parse_args(["--preset", "smoke"]))), "batch_sampling": False}
    del saved["precision"]
    fake = SimpleNamespace(read_config=lambda: dict(saved))
    monkeypatch.setattr(cli.RunDir, "open_for_resume", staticmethod(lambda path: fake))
    cli.resume_config(build_parser().parse_args(["--resume", "somewhere", "--precision", "fp32"]), "class")
    with pytest.raises(cli.ConfigError, match="--precision 'bf16' \\(run has 'fp32'\\)"):
        cli.resume_config(build_parser().parse_args(["--resume", "somewhere", "--precision", "bf16"]), "class")
