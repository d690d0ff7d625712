"""Batch Sampling (main_BS.py): the cluster sampler, cluster files, the run's records, the figures.

Cluster files are made here from known partitions (each class's sorted indices cut
into chunks) with dcbs.clusters.save_clusters, so no extractor is trained.
"""
import csv
import json
import os

import pytest
import torch

from conftest import run_cli
from dcbs import clusters as cl
from dcbs.io import file_sha256
from dcbs.samplers import ClassSampler, ClusterSampler

SMOKE = ("--preset", "smoke", "--num_eval", 1, "--eval_it", 3, "--Iteration", 3)


# --------------------------------------------------------------------------- #
# helpers
# --------------------------------------------------------------------------- #
def chunks(data, k):
    """Each class's sorted training indices cut into k nearly equal consecutive chunks."""
    return [[t.clone() for t in torch.tensor_split(torch.as_tensor(ix).sort().values, k)]
            for ix in data.indices_class]


def write_clusters(path, data, clusters, layer_idx=3, norm=False, model=cl.DEFAULT_MODEL,
                   margin=cl.DEFAULT_MARGIN, fingerprint=None):
    """A cluster file with the meta load_clusters checks, as main_cluster.py would write it."""
    k = len(clusters[0])
    meta = {"format": cl.FORMAT, "created_by": "tests/test_batch_sampling.py", "dataset": data.name,
            "source": data.source, "num_train": int(len(data.labels_train)),
            "class_counts": [int(c) for c in data.class_counts],
            "fingerprint": fingerprint or data.fingerprint, "model": model, "layer_idx": layer_idx,
            "k": k, "norm": norm, "margin": margin, "seed": 0, "sizes": [[len(t) for t in per] for per in clusters],
            "centers": [torch.zeros(k, 2) for _ in clusters], "inertia": [0.0] * len(clusters),
            "extractor_name": "none (consecutive chunks)", "extractor_sha256": "", "extractor_test_acc": None}
    cl.save_clusters(str(path), clusters, meta)
    return str(path)


def which_cluster(idx, per_class):
    """Indices of the clusters of ``per_class`` that ``idx`` touches."""
    s = set(idx.tolist())
    return [j for j, t in enumerate(per_class) if s & set(t.tolist())]


def error_line(stderr):
    lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    return lines[0]


@pytest.fixture(scope="module")
def cluster_dir(tmp_path_factory, digits):
    """k=1 (layer 3) and k=10 (layer 2) files under their default names."""
    d = tmp_path_factory.mktemp("clusters")
    write_clusters(d / cl.cluster_file_name("digits", 1, 3, False), digits, chunks(digits, 1), layer_idx=3)
    write_clusters(d / cl.cluster_file_name("digits", 10, 2, False), digits, chunks(digits, 10), layer_idx=2)
    return d


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """run(name, script, *args) -> run directory; each run happens once per module."""
    root = tmp_path_factory.mktemp("runs")
    done = {}

    def run(name, script, *args):
        if name not in done:
            r = run_cli(script, *args, "--save_path", root, "--run_name", name)
            assert r.returncode == 0, r.stderr
            done[name] = os.path.join(root, name)
        return done[name]
    return run


@pytest.fixture(scope="module")
def bs_run(runs, cluster_dir):
    """BS(DC), k=10 clusters of ~12 images from layer 2, whole-class batches after iteration 1."""
    return runs("bs10", "main_BS.py", *SMOKE, "--num_cluster", 10, "--layer_idx", 2, "--cluster_path",
                cluster_dir, "--batch_real", 64, "--mix", "--mix_after", 1, "--seed", 7)


def dc_run(runs, method="DC", seed=7):
    # real batches of 16: the runs it is compared with draw the same 16
    return runs(f"{method}_main", "main.py", *SMOKE, "--method", method, "--batch_real", 16, "--seed", seed)


# --------------------------------------------------------------------------- #
# the sampler
# --------------------------------------------------------------------------- #
def test_each_draw_comes_from_one_cluster_of_the_class_and_every_cluster_is_used(digits):
    clusters = chunks(digits, 10)
    s = ClusterSampler(clusters, seed=1)
    for c in range(digits.num_classes):
        used = set()
        for _ in range(200):
            idx = s.sample(c, 5)
            assert idx.dtype == torch.long and len(idx) == 5 and len(set(idx.tolist())) == 5
            hit = which_cluster(idx, clusters[c])
            assert len(hit) == 1 and set(idx.tolist()) <= set(clusters[c][hit[0]].tolist())
            used.add(hit[0])
        assert used == set(range(10)), f"class {c}: clusters {sorted(used)} used"


def _pick_frequencies(digits, weighting, draws=3000):
    """Class 0 cut into clusters of 10, 30 and the rest; how often each is drawn."""
    ix = torch.as_tensor(digits.indices_class[0]).sort().values
    parts = [ix[:10], ix[10:40], ix[40:]]
    clusters = [parts] + chunks(digits, 3)[1:]
    s = ClusterSampler(clusters, seed=2, weighting=weighting)
    counts = [0, 0, 0]
    for _ in range(draws):
        counts[which_cluster(s.sample(0, 4), parts)[0]] += 1
    sizes = torch.tensor([len(p) for p in parts], dtype=torch.float)
    return torch.tensor(counts, dtype=torch.float) / draws, sizes / sizes.sum()


def test_size_weighting_picks_big_clusters_more_often(digits):
    freq, share = _pick_frequencies(digits, "size")
    assert freq[0] < freq[1] < freq[2]
    assert (freq - share).abs().max() < 0.04, (freq, share)        # 3000 draws: sd <= 0.009
    freq, _ = _pick_frequencies(digits, "uniform")
    assert (freq - 1 / 3).abs().max() < 0.04, freq


def test_unknown_weighting_is_refused(digits):
    with pytest.raises(ValueError, match="uniform"):
        ClusterSampler(chunks(digits, 2), seed=0, weighting="biggest")


def test_cluster_smaller_than_n_gives_all_its_images(digits):
    ix = torch.as_tensor(digits.indices_class[3]).sort().values
    parts = [ix[:7], ix[7:]]
    s = ClusterSampler([parts if c == 3 else [torch.as_tensor(t)] for c, t in enumerate(digits.indices_class)],
                       seed=3)
    seen_small = seen_big = False
    for _ in range(40):
        idx = s.sample(3, 50)
        if which_cluster(idx, parts) == [0]:
            assert sorted(idx.tolist()) == parts[0].tolist()        # all 7, each once
            seen_small = True
        else:
            assert len(idx) == 50 and which_cluster(idx, parts) == [1]
            seen_big = True
    assert seen_small and seen_big


def test_mix_switches_to_whole_class_batches_after_mix_after(digits):
    clusters = chunks(digits, 10)
    s = ClusterSampler(clusters, seed=4, mix_after=5)
    for it in range(0, 6):                       # the paper's `it > 300`: mix_after itself still clusters
        for c in range(digits.num_classes):
            assert len(which_cluster(s.sample(c, 30, it), clusters[c])) == 1
    for it in range(6, 10):
        for c in range(digits.num_classes):
            idx = s.sample(c, 30, it)
            assert set(idx.tolist()) <= set(torch.as_tensor(digits.indices_class[c]).tolist())
            assert len(which_cluster(idx, clusters[c])) > 1
    plain = ClusterSampler(clusters, seed=4)     # without mix_after: clusters at every iteration
    assert all(len(which_cluster(plain.sample(0, 30, it), clusters[0])) == 1 for it in (0, 500, 10 ** 6))


def test_state_dict_restores_the_draws(digits):
    a = ClusterSampler(chunks(digits, 10), seed=5, weighting="size")
    for c in range(10):
        a.sample(c, 8)
    state = a.state_dict()
    want = [a.sample(c, 8).tolist() for c in range(10)]
    b = ClusterSampler(chunks(digits, 10), seed=99, weighting="size")
    b.load_state_dict(state)
    assert [b.sample(c, 8).tolist() for c in range(10)] == want


def test_one_cluster_per_class_draws_exactly_as_the_class_sampler(digits):
    """What makes main_BS.py with k=1 reproduce main.py: no extra draw from the generator."""
    cs = ClassSampler(digits.indices_class, seed=6)
    bs = ClusterSampler(chunks(digits, 1), seed=6, weighting="uniform")
    bw = ClusterSampler(chunks(digits, 1), seed=6, weighting="size")
    for _ in range(3):
        for c in range(digits.num_classes):
            want = cs.sample(c, 32)
            assert torch.equal(bs.sample(c, 32), want) and torch.equal(bw.sample(c, 32), want)


# --------------------------------------------------------------------------- #
# main_BS.py: one loop, the sampler is the only difference
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("method", ["DC", "DSA"])
def test_one_cluster_per_class_reproduces_main_py_bit_for_bit(runs, cluster_dir, method):
    base = dc_run(runs, method)
    bs = runs(f"{method}_bs1", "main_BS.py", *SMOKE, "--method", method, "--batch_real", 16, "--seed", 7,
              "--num_cluster", 1, "--layer_idx", 3, "--cluster_path", cluster_dir)
    a = torch.load(os.path.join(base, "syn_exp0.pt"), weights_only=True)["data"][0][0]
    b = torch.load(os.path.join(bs, "syn_exp0.pt"), weights_only=True)["data"][0][0]
    assert torch.equal(a, b)
    loss = [[r["loss"] for r in csv.DictReader(open(os.path.join(d, "diagnostics.csv")))] for d in (base, bs)]
    assert loss[0] == loss[1] and len(loss[0]) == 3
    acc = [json.load(open(os.path.join(d, "accuracies.json"))) for d in (base, bs)]
    assert acc[0] == acc[1]
    labels = [json.load(open(os.path.join(d, "config.json")))["label"] for d in (base, bs)]
    assert labels == [method, f"BS({method})"]


def test_run_records_the_cluster_file_and_uses_the_reference_names(bs_run, cluster_dir):
    cfg = json.load(open(os.path.join(bs_run, "config.json")))
    path = os.path.join(cluster_dir, cl.cluster_file_name("digits", 10, 2, False))
    assert cfg["cluster_file"] == os.path.abspath(path)
    assert cfg["cluster_file_sha256"] == file_sha256(path)
    assert (cfg["cluster_k"], cfg["cluster_layer"], cfg["cluster_norm"]) == (10, 2, False)
    assert cfg["label"] == "BS(DC)" and cfg["script"] == "main_BS.py" and cfg["sampler"] == "cluster"
    assert (cfg["mix"], cfg["mix_after"], cfg["cluster_weighting"]) == (True, 1, "uniform")
    assert os.path.isfile(os.path.join(bs_run, "res_BSDC_digits_ConvNet_1ipc.pt"))
    assert not os.path.exists(os.path.join(bs_run, "res_DC_digits_ConvNet_1ipc.pt"))
    res = torch.load(os.path.join(bs_run, "res_BSDC_digits_ConvNet_1ipc.pt"), weights_only=True)
    assert res["method"] == "BS(DC)" and res["data"][0][0].shape == (10, 1, 28, 28)


def test_diagnostics_rows_gradient_columns_and_cluster_sized_batches(bs_run, digits):
    from networks import build_model
    rows = list(csv.DictReader(open(os.path.join(bs_run, "diagnostics.csv"))))
    assert [(int(r["exp"]), int(r["it"])) for r in rows] == [(0, 0), (0, 1), (0, 2)]
    names = [n for n, _ in build_model("ConvNet", 1, 10, (28, 28)).named_parameters()]
    cols = list(rows[0])
    assert [c for c in cols if c.startswith("gw_real:")] == [f"gw_real:{n}" for n in names]
    assert [c for c in cols if c.startswith("gw_syn:")] == [f"gw_syn:{n}" for n in names]
    assert all(float(r[f"gw_real:{n}"]) > 0 for r in rows for n in names if n.endswith("weight"))
    # iterations 0 and 1 draw one cluster of ~12 images per class (batch_real 64); iteration 2 (> mix_after)
    # draws 64 of the whole class
    sizes = [len(t) for per in chunks(digits, 10) for t in per]
    for r in rows[:2]:
        assert min(sizes) <= int(r["batch_real_min"]) <= float(r["batch_real_mean"]) <= max(sizes)
    assert int(rows[2]["batch_real_min"]) == 64 and float(rows[2]["batch_real_mean"]) == 64.0


# --------------------------------------------------------------------------- #
# cluster files that do not fit are refused with the command that makes the right one
# --------------------------------------------------------------------------- #
def _refused(capsys, tmp_path, *argv):
    from dcbs.cli import main
    save = tmp_path / "out"
    rc = main(["--preset", "smoke", "--save_path", str(save), *map(str, argv)], default_sampler="cluster")
    err = capsys.readouterr().err
    assert rc == 2
    assert not save.exists() or not os.listdir(save)          # refused before any run directory
    return error_line(err)


def test_missing_cluster_file_names_the_command(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)                               # default --cluster_path checkpoints: empty here
    line = _refused(capsys, tmp_path, "--num_cluster", 10, "--layer_idx", 2)
    assert os.path.join("checkpoints", cl.cluster_file_name("digits", 10, 2, False)) in line
    assert cl.cluster_command("digits", "data", 10, 2, False) in line


def test_missing_cluster_file_from_the_command_line(tmp_path):
    r = run_cli("main_BS.py", "--preset", "smoke", "--save_path", tmp_path / "out", "--num_cluster", 10,
                "--layer_idx", 2, "--cluster_path", tmp_path / "nowhere")
    assert r.returncode == 2
    line = error_line(r.stderr)
    assert "not found" in line and cl.cluster_command("digits", "data", 10, 2, False) in line


def test_missing_cluster_file_command_writes_where_main_BS_looks(tmp_path, capsys):
    where = tmp_path / "elsewhere"
    line = _refused(capsys, tmp_path, "--num_cluster", 10, "--layer_idx", 2, "--cluster_path", where)
    assert cl.cluster_command("digits", "data", 10, 2, False, cluster_path=str(where)) in line


def test_cluster_file_of_other_data_is_refused(tmp_path, capsys, digits):
    d = tmp_path / "ck"
    write_clusters(d / cl.cluster_file_name("digits", 10, 2, False), digits, chunks(digits, 10), layer_idx=2,
                   fingerprint="0" * 64)
    line = _refused(capsys, tmp_path, "--num_cluster", 10, "--layer_idx", 2, "--cluster_path", d)
    assert "other data" in line and "fingerprint" in line
    assert cl.cluster_command("digits", "data", 10, 2, False) in line


def test_cluster_file_with_other_k_and_layer_is_refused(tmp_path, capsys, cluster_dir):
    path = os.path.join(cluster_dir, cl.cluster_file_name("digits", 10, 2, False))
    line = _refused(capsys, tmp_path, "--cluster_file", path, "--num_cluster", 4, "--layer_idx", 3)
    assert "k: file 10, wanted 4" in line and "layer_idx: file 2, wanted 3" in line
    assert cl.cluster_command("digits", "data", 4, 3, False) in line


def test_cluster_file_renamed_to_other_settings_is_refused(tmp_path, capsys, cluster_dir, digits):
    d = tmp_path / "ck"
    d.mkdir()
    src = os.path.join(cluster_dir, cl.cluster_file_name("digits", 10, 2, False))
    dst = d / cl.cluster_file_name("digits", 10, 3, False)            # a k=10 layer-2 file named as layer 3
    dst.write_bytes(open(src, "rb").read())
    line = _refused(capsys, tmp_path, "--num_cluster", 10, "--layer_idx", 3, "--cluster_path", d)
    assert "layer_idx: file 2, wanted 3" in line
    assert cl.cluster_command("digits", "data", 10, 3, False) in line


# --------------------------------------------------------------------------- #
# plot_runs.py
# --------------------------------------------------------------------------- #
def test_plot_command_writes_both_figures(runs, bs_run, tmp_path):
    from PIL import Image
    dc = dc_run(runs)
    out = tmp_path / "figs"
    r = run_cli("plot_runs.py", dc, bs_run, "--out", out, "--name", "cmp", "--smooth", 2)
    assert r.returncode == 0, r.stderr
    printed = r.stdout.strip().splitlines()
    for name in ("cmp_grad_norms.png", "cmp_loss.png", "cmp_synthetic.png"):   # Figures 6/7, loss, 5
        path = os.path.join(out, name)
        assert path in printed
        w, h = Image.open(path).size
        assert w > 300 and h > 200
    assert not [f for f in os.listdir(out) if f.startswith(".")]     # no temporary files left


def test_plot_command_refuses_a_folder_without_diagnostics(tmp_path, capsys):
    from dcbs.plot_cli import main         # in this process: plot_runs.py only calls it
    (tmp_path / "empty").mkdir()
    capsys.readouterr()
    rc = main([str(tmp_path / "empty"), "--out", str(tmp_path / "figs")])
    out, err = capsys.readouterr()
    assert rc == 2 and out == ""
    line = error_line(err)
    assert "diagnostics.csv" in line and str(tmp_path / "empty") in line
    assert not (tmp_path / "figs").exists()


def _fake_run(path, config, rows):
    os.makedirs(path)
    json.dump(config, open(os.path.join(path, "config.json"), "w"))
    with open(os.path.join(path, "diagnostics.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return str(path)


def test_plots_labels_layers_and_dm_runs(tmp_path):
    from dcbs import plots
    names = ["blocks.0.0.weight", "blocks.0.0.bias", "blocks.0.1.weight", "classifier.weight", "classifier.bias"]
    base = {"dataset": "digits", "model": "ConvNet", "ipc": 1, "mean": [0.5], "class_counts": [1] * 10}
    grad_rows = [{"exp": 0, "it": i, "loss": 10.0 - i, **{f"gw_real:{n}": 1.0 + i for n in names},
                  **{f"gw_syn:{n}": 2.0 for n in names}} for i in range(4)]
    bs = _fake_run(tmp_path / "bs", dict(base, method="DC", label="BS(DC)", batch_sampling=True, num_cluster=20,
                                         layer_idx=3, norm=False, preset="smoke"), grad_rows)
    dc = _fake_run(tmp_path / "dc", dict(base, method="DC", label="DC", preset=None), grad_rows)
    dm = _fake_run(tmp_path / "dm", dict(base, method="DM", label="DM", preset=None),
                   [{"exp": 0, "it": i, "loss": 1.0} for i in range(4)])
    runs = plots.load_runs([bs, dc, dm])
    assert [r.label for r in runs] == ["BS(DC) k=20 L3", "DC", "DM"]
    assert not runs[2].has_grads and runs[0].gw_real["classifier.weight"].tolist() == [1.0, 2.0, 3.0, 4.0]
    # 1-D tensors (biases, the norm layer's scale) are skipped unless asked for
    assert plots.weight_params(runs) == ["blocks.0.0.weight", "classifier.weight"]
    assert plots.weight_params(runs, all_params=True) == names
    assert plots.moving_average([1, 3, 5, 7], 2).tolist() == [1.0, 2.0, 4.0, 6.0]
    notes = []
    paths = plots.plot_runs([bs, dc, dm], out=str(tmp_path / "f"), name="x", log=notes.append)
    assert [os.path.basename(p) for p in paths] == ["x_grad_norms.png", "x_grad_norms_iter.png", "x_loss.png"]
    assert len(notes) == 1 and "DM" in notes[0] and "loss figure only" in notes[0]
    notes.clear()
    paths = plots.plot_runs([dm], out=str(tmp_path / "g"), name="y", log=notes.append)
    assert [os.path.basename(p) for p in paths] == ["y_loss.png"] and "no gradient figure" in notes[-1]
    with pytest.raises(plots.PlotError, match="experiment 3"):
        plots.load_run(dc, exp=3)
