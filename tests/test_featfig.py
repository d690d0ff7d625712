"""Figure 8 (dcbs/featfig.py, plot_runs.py --features): one class's real and synthetic images in the
feature space of a trained network. Runs are faked (config, diagnostics, syn_exp0.pt) so that
where their synthetic images lie is known exactly."""
import csv
import json
import os

import numpy as np
import pytest
import torch

from conftest import run_cli
from dcbs import featfig
from dcbs.extractor import build_extractor
from dcbs.plots import PlotError, load_runs


def fake_run(path, data, images, label="DC", **config):
    """A run directory whose synthetic set is ``images`` (one per class, class-major, normalised)."""
    os.makedirs(path)
    cfg = {"dataset": data.name, "model": "ConvNet", "ipc": 1, "method": "DC", "label": label, "preset": "smoke",
           "data_path": "data", **config}
    json.dump(cfg, open(os.path.join(path, "config.json"), "w"))
    with open(os.path.join(path, "diagnostics.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["exp", "it", "loss"])
        w.writeheader()
        w.writerows([{"exp": 0, "it": i, "loss": 1.0 / (i + 1)} for i in range(3)])
    labels = torch.arange(data.num_classes)
    torch.save({"data": [[images.clone(), labels]], "normalized": True, "mean": list(data.mean),
                "std": list(data.std), "dataset": data.name, "ipc": 1, "iteration": 2,
                "class_names": list(data.class_names)}, os.path.join(path, "syn_exp0.pt"))
    return str(path)


def first_of_each_class(data):
    return torch.stack([data.images_train[ix[0]] for ix in data.indices_class])


def test_feature_stats_on_known_points():
    real = np.array([[1.0, 0], [-1, 0], [0, 1], [0, -1]])     # centre 0, every point at distance 1
    s = featfig.feature_stats(real, np.array([[2.0, 0.0]]))
    assert s["centre_ratio"] == pytest.approx(2.0)                # twice as far out as a real point
    assert s["nn_ratio"] == pytest.approx(1.0 / np.sqrt(2.0))     # 1 from (1,0); real NN distance sqrt(2)
    s = featfig.feature_stats(real, np.array([[0.0, 0.0], [0.0, 1.0]]))
    assert s["n_syn"] == 2 and s["centre_ratio"] == pytest.approx(0.5)
    assert s["nn_ratio"] == pytest.approx((1.0 + 0.0) / 2 / np.sqrt(2.0))


def test_synthetic_points_land_where_their_images_are(digits, tmp_path):
    """A synthetic set made of real images of the class has nearest-neighbour distance 0 in the real
    cloud; shifted copies do not. A wrong class, a missing normalisation or features from another
    image would all break the first."""
    net = build_extractor("ConvNet", digits.channel, digits.num_classes, digits.im_size, seed=0)
    exact = fake_run(tmp_path / "exact", digits, first_of_each_class(digits), label="DC")
    shifted = fake_run(tmp_path / "shift", digits, first_of_each_class(digits) + 1.5, label="BS(DC)",
                       batch_sampling=True, num_cluster=5, layer_idx=2)
    runs = load_runs([exact, shifted])
    c = 3
    png, js = featfig.feature_figure(runs, net, digits, c, str(tmp_path / "f" / "x_features_3.png"),
                                     n_real=10_000, method="pca")
    meta = json.load(open(js))
    assert os.path.isfile(png) and meta["class"] == c and meta["n_real"] == len(digits.indices_class[c])
    a, b = meta["runs"]
    assert a["label"] == "DC" and a["n_syn"] == 1 and a["nn_ratio"] < 1e-3
    assert b["label"] == "BS(DC) k=5 L2" and b["nn_ratio"] > 0.1
    # the same seed draws the same real subset; another seed another one
    sub = featfig.feature_figure(runs, net, digits, c, str(tmp_path / "g" / "a.png"), n_real=50, method="pca")[1]
    again = featfig.feature_figure(runs, net, digits, c, str(tmp_path / "g" / "b.png"), n_real=50, method="pca")[1]
    other = featfig.feature_figure(runs, net, digits, c, str(tmp_path / "g" / "c.png"), n_real=50, method="pca",
                                   seed=1)[1]
    m1, m2, m3 = (json.load(open(p)) for p in (sub, again, other))
    assert m1["n_real"] == 50 and m1["runs"] == m2["runs"] and m1["runs"] != m3["runs"]


def test_refuses_runs_it_cannot_draw(digits, tmp_path):
    net = build_extractor("ConvNet", digits.channel, digits.num_classes, digits.im_size, seed=0)
    ok = fake_run(tmp_path / "ok", digits, first_of_each_class(digits))
    other = fake_run(tmp_path / "other", digits, first_of_each_class(digits))
    os.remove(os.path.join(other, "syn_exp0.pt"))
    with pytest.raises(PlotError, match="no syn_exp0.pt"):
        featfig.feature_figure(load_runs([ok, other]), net, digits, 0, str(tmp_path / "x.png"))
    with pytest.raises(PlotError, match="out of range"):
        featfig.feature_figure(load_runs([ok]), net, digits, 10, str(tmp_path / "x.png"))
    assert featfig.resolve_class(None, ["airplane", "cat"]) == 1 and featfig.resolve_class(None, ["0", "1"]) == 0
    assert featfig.resolve_class("CAT", ["airplane", "cat"]) == 1
    with pytest.raises(PlotError, match="one of: airplane, cat"):
        featfig.resolve_class("dog", ["airplane", "cat"])


def test_plot_command_draws_figure8_from_a_checkpoint(digits, tmp_path, capsys):
    from PIL import Image
    net = build_extractor("ConvNet", digits.channel, digits.num_classes, digits.im_size, seed=0)
    ck = tmp_path / "ConvNet_digits.pt"
    torch.save({"state_dict": net.state_dict(), "meta": {"architecture": "ConvNet", "dataset": "digits",
                                                          "test_acc": 0.5}}, ck)
    dc = fake_run(tmp_path / "dc", digits, first_of_each_class(digits))
    bs = fake_run(tmp_path / "bs", digits, first_of_each_class(digits) * 0.5, label="BS(DC)", batch_sampling=True,
                  num_cluster=5, layer_idx=2)
    out = tmp_path / "figs"
    r = run_cli("plot_runs.py", dc, bs, "--out", out, "--name", "cmp", "--features", ck, "--feature_class", "7",
                "--feature_real", 1000, "--embedding", "tsne")
    assert r.returncode == 0, r.stderr
    printed = r.stdout.strip().splitlines()
    png, js = os.path.join(out, "cmp_features_7.png"), os.path.join(out, "cmp_features_7.json")
    assert png in printed and js in printed
    w, h = Image.open(png).size
    assert w > 500 and h > 300
    meta = json.load(open(js))
    assert meta["n_real"] == len(digits.indices_class[7]) and meta["class"] == 7 and [x["label"] for x in meta["runs"]] == ["DC", "BS(DC) k=5 L2"]
    assert meta["runs"][0]["nn_ratio"] < 1e-3 and meta["extractor"]["name"] == "ConvNet_digits.pt"
    # a missing network names the command that trains it; Figure 8 flags without --features are refused
    # (in this process: plot_runs.py only calls plot_cli.main)
    from dcbs.plot_cli import main as plot_main
    capsys.readouterr()
    rc = plot_main([str(dc), "--out", str(out), "--features", str(tmp_path / "none.pt")])
    err = capsys.readouterr().err
    assert rc == 2 and "main_cluster.py --dataset digits" in err and "--model ConvNet" in err
    rc = plot_main([str(dc), "--out", str(out), "--feature_class", "cat"])
    err = capsys.readouterr().err
    assert rc == 2 and "--features" in err


# --------------------------------------------------------------------------- #
# reproduce.py figures: Figures 5-8 from the finished runs of the tables
# --------------------------------------------------------------------------- #
GW = ["blocks.0.0.weight", "classifier.weight"]


def table_run(root, digits, name, method="DC", k=None, layer=None, preset="smoke", done=True):
    """A run as the sweep leaves it: config, diagnostics with gradient norms, synthetic set, accuracies, DONE."""
    bs = k is not None
    cfg = dict(method=method, batch_sampling=bs, label=f"BS({method})" if bs else method, seed=0, preset=preset)
    if bs:
        cfg.update(num_cluster=k, layer_idx=layer, norm=True, margin=5, cluster_model="ResNet18")
    path = fake_run(os.path.join(root, name), digits, first_of_each_class(digits) * (1 + (k or 0) / 10), **cfg)
    with open(os.path.join(path, "diagnostics.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["exp", "it", "loss", *[f"gw_{s}:{n}" for s in ("real", "syn") for n in GW]])
        w.writeheader()
        w.writerows([{"exp": 0, "it": i, "loss": 2.0 - i / 10 + (k or 0) / 100,
                      **{f"gw_{s}:{n}": 1.0 + i + (k or 0) for s in ("real", "syn") for n in GW}} for i in range(4)])
    json.dump({"0": {"3": {"ConvNet": [0.5, 0.6]}}}, open(os.path.join(path, "accuracies.json"), "w"))
    if done:
        open(os.path.join(path, "DONE"), "w").write("finished\n")
    return path


def test_reproduce_figures_draws_each_figure_from_its_tables_runs(digits, tmp_path):
    save, out = tmp_path / "sweep", tmp_path / "figs"
    table_run(save, digits, "DC_s")
    table_run(save, digits, "DSA_s", method="DSA")
    table_run(save, digits, "BS_k20_l3_s", k=20, layer=3)
    table_run(save, digits, "BS_k5_l2_s", k=5, layer=2)
    table_run(save, digits, "BS_k20_l2_s", k=20, layer=2)
    table_run(save, digits, "BS_k10_l2_unfinished", k=10, layer=2, done=False)
    table_run(save, digits, "BS_k20_l3_cpu", k=20, layer=3, preset="cpu")       # no DC under this preset
    net = build_extractor("ConvNet", digits.channel, digits.num_classes, digits.im_size, seed=0)
    torch.save({"state_dict": net.state_dict(), "meta": {"architecture": "ConvNet", "dataset": "digits"}},
               tmp_path / "ConvNet_digits.pt")
    r = run_cli("reproduce.py", "figures", "--save_path", save, "--out", out,
                "--features", str(tmp_path / "ConvNet_{dataset}.pt"), "--smooth", 2)
    assert r.returncode == 0, r.stderr
    g = "digits_ipc1_smoke_s0"
    want = [f"fig5_{g}_synthetic.png", *[f"fig{n}_{g}_{w}.png" for n in (6, 7)
                                         for w in ("grad_norms", "grad_norms_iter", "loss")],
            f"fig8_{g}_features_0.png", f"fig8_{g}_features_0.json"]
    assert sorted(r.stdout.split()) == sorted(os.path.join(out, w) for w in want)
    notes = r.stderr
    # Figure 6 is drawn from DC and the finished layer-2 runs, and says which k were not run
    line6 = next(ln for ln in notes.splitlines() if ln.startswith(f"fig6 {g}:"))
    assert "DC_s, BS_k5_l2_s, BS_k20_l2_s" in line6 and "BS k=10 L2" in line6 and "unfinished" not in line6
    line7 = next(ln for ln in notes.splitlines() if ln.startswith(f"fig7 {g}:"))
    assert "DC_s, BS_k20_l2_s, BS_k20_l3_s" in line7 and "BS k=20 L0" in line7
    # the cpu-preset run is never mixed into the smoke figures: its own group is skipped for want of DC
    assert "fig5 digits_ipc1_cpu_s0: skipped" in notes and "BS_k20_l3_cpu" not in line6 + line7
    meta = json.load(open(os.path.join(out, f"fig8_{g}_features_0.json")))
    assert [x["label"] for x in meta["runs"]] == ["DC", "BS(DC) k=20 L3 norm"]
    # without the trained network Figure 8 is skipped with the command that makes it; the rest is drawn
    r = run_cli("reproduce.py", "figures", "--save_path", save, "--out", tmp_path / "figs2",
                "--features", tmp_path / "missing.pt")
    assert r.returncode == 0, r.stderr
    assert "fig8" not in r.stdout and f"fig5_{g}_synthetic.png" in r.stdout
    assert "main_cluster.py --dataset digits --model ConvNet --train_extractor" in r.stderr
