"""The same computations on an accelerator as on the CPU.

Skipped where the device is missing, so CI (no GPU) skips them; a machine with a GPU runs them
through ``benchmarks/gpu_check.sh``. ``DCBS_TEST_DEVICE`` names the device (default ``cuda``);
``DCBS_TEST_DEVICE=cpu`` runs the same code on the CPU, which checks the tests themselves.

cuDNN computes convolutions in TF32 by default on Ampere and newer cards (torch's default, which
the reference code also runs with): about 1e-3 relative error, enough to hide a wrong pairing of
classes and gradients. The comparisons here switch TF32 off; the command-line runs keep the
defaults a user gets.
"""
import json
import os

import pytest
import torch
import torch.nn.functional as F

from conftest import run_cli
from dcbs.cli import pick_device
from dcbs.config import ConfigError
from dcbs.fast_ops import AvgPool2x2, build_model
from dcbs.samplers import ClassSampler
from test_batch_sampling import chunks, write_clusters
from test_evaluate import alone_and_together
from test_kernels import _step, assert_same_update
from test_precision import assert_bf16_moves_as_fp32, matching_step_updates

DEVICE = os.environ.get("DCBS_TEST_DEVICE", "cuda")


def _available(name: str) -> bool:
    try:
        pick_device(name)              # the scripts' own rule for --device
        return True
    except ConfigError:
        return False


pytestmark = pytest.mark.skipif(not _available(DEVICE), reason=f"device {DEVICE!r} not available "
                                                               "(set DCBS_TEST_DEVICE; GPU checks: benchmarks/gpu_check.sh)")


@pytest.fixture(autouse=True)
def no_tf32():
    if not DEVICE.startswith("cuda"):
        yield
        return
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before


@pytest.mark.parametrize("model", ["ConvNet", "ConvNetBN"])
def test_layers_on_the_device_compute_what_they_compute_on_the_cpu(model):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 128, 9, 10, generator=g)
    torch.testing.assert_close(AvgPool2x2()(x.to(DEVICE)).cpu(), F.avg_pool2d(x, 2, 2))
    torch.manual_seed(0)
    net = build_model(model, 3, 10, (32, 32))
    xs, ys = torch.randn(8, 3, 32, 32, generator=g), torch.arange(8)
    ref = torch.autograd.grad(F.cross_entropy(net(xs)[0], ys), list(net.parameters()))
    dev = build_model(model, 3, 10, (32, 32)).to(DEVICE)
    dev.load_state_dict(net.state_dict())
    out = torch.autograd.grad(F.cross_entropy(dev(xs.to(DEVICE))[0], ys.to(DEVICE)), list(dev.parameters()))
    for (name, _), a, b in zip(net.named_parameters(), ref, out):   # cuDNN may pick another algorithm
        assert (b.cpu() - a).norm() <= 1e-4 * a.norm() + 1e-7, name


@pytest.mark.parametrize("model,method,ipc", [("ConvNet", "DC", 1), ("ConvNet", "DSA", 2), ("ConvNet", "DM", 2),
                                              ("ConvNetBN", "DC", 1)])
def test_a_step_on_the_device_makes_the_update_it_makes_on_the_cpu(digits, model, method, ipc):
    """Same seeds, same real batches (drawn on the CPU), same DSA transforms (drawn on the CPU)."""
    sampler = ClassSampler(digits.indices_class, 11)
    row_c, syn_c, start = _step("loop", model, method, digits, sampler, ipc)
    row_d, syn_d, start_d = _step("loop", model, method, digits, sampler, ipc, device=DEVICE)
    assert torch.equal(start, start_d) and not torch.equal(syn_c, start)
    assert_same_update(syn_d, syn_c, start)
    assert row_d["loss"] == pytest.approx(row_c["loss"], rel=1e-4)


@pytest.mark.parametrize("method", ["DC", "DM"])
def test_batched_kernel_on_the_device_makes_the_loops_update(digits, method):
    sampler = ClassSampler(digits.indices_class, 13)
    row_l, syn_l, start = _step("loop", "ConvNet", method, digits, sampler, 2, device=DEVICE)
    row_b, syn_b, _ = _step("batched", "ConvNet", method, digits, sampler, 2, device=DEVICE)
    assert_same_update(syn_b, syn_l, start)
    assert row_b["loss"] == pytest.approx(row_l["loss"], rel=1e-4)


def test_bf16_step_on_the_device_moves_the_images_as_fp32_does(digits):
    """--precision bf16 on the device: autocast on its own device type, within bf16 tolerance."""
    from dcbs.precision import check
    try:
        check("bf16", torch.device(DEVICE))
    except ValueError as e:
        pytest.skip(str(e))
    assert_bf16_moves_as_fp32(matching_step_updates(digits, DEVICE, loops=(2, 2)))


def test_models_trained_together_on_the_device_end_as_trained_alone():
    _, alone, (params, _, acc_test) = alone_and_together("color_crop_cutout_scale_rotate", DEVICE)
    for i, (net, _, acc) in enumerate(alone):
        assert abs(acc_test[i] - acc) <= 1 / 60 + 1e-9     # at most one test image on a rounding tie
        for k, v in net.state_dict().items():
            torch.testing.assert_close(params[k][i], v, rtol=1e-4, atol=1e-5, msg=k)


def test_main_and_main_bs_run_on_the_device(tmp_path, digits):
    common = ["--preset", "smoke", "--device", DEVICE, "--num_eval", 2, "--save_path", tmp_path]
    r = run_cli("main.py", *common, "--run_name", "dc")
    assert r.returncode == 0, r.stderr[-3000:]
    cfg = json.load(open(tmp_path / "dc" / "config.json"))
    assert cfg["device_used"].startswith(DEVICE.split(":")[0])
    acc = json.load(open(tmp_path / "dc" / "accuracies.json"))
    assert len(acc["0"]["2"]["ConvNet"]) == 2 and all(0.0 <= a <= 1.0 for a in acc["0"]["2"]["ConvNet"])
    from dcbs import clusters as cl
    write_clusters(tmp_path / cl.cluster_file_name("digits", 10, 2, False), digits, chunks(digits, 10), layer_idx=2)
    r = run_cli("main_BS.py", *common, "--run_name", "bs", "--num_cluster", 10, "--layer_idx", 2,
                "--cluster_path", tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "bs" / "DONE").is_file()
