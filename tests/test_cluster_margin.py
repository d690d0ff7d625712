"""--norm on classes too small for the margin: per-class clamped size bounds, and one cluster file name
for main_cluster.py and main_BS.py."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
torch.set_num_threads(1)

from dcbs import cluster_cli as mc  # noqa: E402
from dcbs import clusters as cl  # noqa: E402
from dcbs import extractor as ex  # noqa: E402
from conftest import run_cli  # noqa: E402


def test_fitted_bounds_are_the_requested_ones_when_they_fit_else_the_nearest_that_do():
    for k in range(1, 26):
        for n in range(k, 320, 7):
            base = n // k
            for margin in (0, 1, 2, 5, 29, 50, 51):
                lo, hi = cl.fitted_size_bounds(n, k, margin)
                assert 1 <= lo and k * lo <= n <= k * hi, (n, k, margin, lo, hi)
                want_lo, want_hi = cl.size_bounds(n, k, margin)
                if want_lo >= 1 and k * want_hi >= n:           # the paper's bounds work: kept as they are
                    assert (lo, hi) == (want_lo, want_hi)
                    continue
                fits = [m for m in range(margin + 1) if base - m >= 1 and k * (base + m) >= n]
                if fits:                                        # the largest margin <= the requested one
                    assert (lo, hi) == (base - max(fits), base + max(fits)), (n, k, margin)
                else:                                           # widened just enough
                    assert (lo, hi) == (base - min(margin, base - 1), -(-n // k)), (n, k, margin)
    with pytest.raises(cl.ClusterConfigError, match="--margin"):
        cl.check_feasible([100], 4, True, -1)


def test_margin_50_on_digits_sized_classes_is_clamped_per_class_and_said(digits):
    counts = digits.class_counts                                # 122..128 images, n_c // 20 = 6
    cl.check_feasible(counts, 20, True, 50, digits.class_names)  # no longer refused
    notes = cl.margin_notes(counts, 20, True, 50, digits.class_names)
    assert len(notes) == 1 and "--margin 50" in notes[0] and "10 of 10 classes" in notes[0] \
        and "1..11" in notes[0]
    assert cl.margin_notes([5000] * 10, 20, True, 50) == []     # the paper's CIFAR10 setting: untouched
    assert cl.margin_notes(counts, 20, False, 50) == []         # without --norm there are no bounds
    feats = digits.images_train.flatten(1)
    logged = []
    clusters, info = cl.cluster_dataset(feats, digits.indices_class, 20, True, 50, seed=0, n_init=1,
                                        progress=False, log=logged.append)
    assert cl.check_partition(clusters, digits.indices_class) is None
    assert info["margin_clamped"] == list(range(10)) and notes[0] in logged
    for c, (sizes, (lo, hi)) in enumerate(zip(info["sizes"], info["size_bounds"])):
        assert (lo, hi) == cl.fitted_size_bounds(counts[c], 20, 50) == (1, 11)
        assert len(sizes) == 20 and all(lo <= s <= hi for s in sizes)


def test_main_cluster_and_main_bs_agree_on_the_file_whatever_the_margin(tmp_path, digits, capsys):
    """main_cluster.py writes the file; main_BS.py with the same flags finds it, accepts it and runs on it."""
    ck = tmp_path / "ck"
    ck.mkdir()
    net = ex.build_extractor("ConvNet", digits.channel, digits.num_classes, digits.im_size, seed=3)
    torch.save(net.state_dict(), ck / "ConvNet_digits.pt")      # the default extractor path, a bare state_dict
    for k, margin, suffix in ((20, 50, ""), (10, 5, "_m5")):
        flags = ["--dataset", "digits", "--layer_idx", "2", "--num_cluster", str(k), "--norm"] \
            + ([] if margin == cl.DEFAULT_MARGIN else ["--margin", str(margin)])
        argv = flags + ["--model", "ConvNet", "--cluster_path", str(ck), "--results_path", str(tmp_path / "res"),
                        "--device", "cpu", "--n_init", "1", "--no_figures"]
        assert mc.main(argv) == 0, capsys.readouterr().err
        written = ck / f"class_idx_digits_k{k}_2_True_ConvNet{suffix}.pt"
        assert written.is_file()
        meta = torch.load(written, weights_only=True)["meta"]
        assert meta["margin"] == margin                          # the requested margin, as named
        for c, n in enumerate(digits.class_counts):
            assert list(meta["size_bounds"][c]) == list(cl.fitted_size_bounds(n, k, margin))
            lo, hi = meta["size_bounds"][c]
            assert all(lo <= s <= hi for s in meta["sizes"][c])
        r = run_cli("main_BS.py", *flags, "--cluster_model", "ConvNet", "--cluster_path", ck, "--preset", "smoke",
                    "--Iteration", 1, "--eval_it", 1, "--save_path", tmp_path / "runs", "--run_name", f"m{margin}",
                    "--device", "cpu")
        assert r.returncode == 0, r.stderr[-2000:]
        with open(tmp_path / "runs" / f"m{margin}" / "config.json") as f:
            assert json.load(f)["cluster_file"] == os.path.abspath(written)
