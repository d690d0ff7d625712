"""main_cluster.py, dcbs.clusters and dcbs.extractor on small data (CPU, one thread)."""
from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
torch.set_num_threads(1)

from dcbs import cluster_cli as mc  # noqa: E402
from dcbs import clusters as cl  # noqa: E402
from dcbs import extractor as ex  # noqa: E402
from dcbs.data import RealData, data_fingerprint, denormalize, load_data  # noqa: E402
from dcbs.io import FileFormatError  # noqa: E402

TINY = "ConvNetW32"      # a small extractor keeps every run within seconds


# --------------------------------------------------------------------------- #
# fixtures
# --------------------------------------------------------------------------- #
@pytest.fixture(scope="module")
def digits():
    return load_data("digits")


@pytest.fixture(scope="module")
def bare_ckpt(tmp_path_factory, digits):
    """A bare state_dict (like the paper's resnet18_cifar.pt) of an untrained tiny extractor."""
    path = tmp_path_factory.mktemp("ext") / "tiny.pt"
    net = ex.build_extractor(TINY, digits.channel, digits.num_classes, digits.im_size, seed=3)
    torch.save(net.state_dict(), path)
    return str(path)


def _cli(tmp_path, *extra, extractor=None, k=4, layer=2, norm=True, margin=10):
    argv = ["--dataset", "digits", "--model", TINY, "--layer_idx", str(layer), "--num_cluster", str(k),
            "--cluster_path", str(tmp_path / "ck"), "--results_path", str(tmp_path / "res"), "--device", "cpu"]
    if norm:
        argv += ["--norm", "--margin", str(margin)]
    if extractor:
        argv += ["--extractor", extractor]
    return argv + list(extra)


def _toy(n_per_class=(40, 35, 45), d=6, seed=0):
    """Shuffled labels, features with a few blobs per class."""
    rng = np.random.RandomState(seed)
    labels = rng.permutation(np.repeat(np.arange(len(n_per_class)), n_per_class))
    feats = rng.randn(len(labels), d).astype(np.float32) + 4 * rng.randint(0, 3, (len(labels), 1))
    # indices in no particular order: the clusters must still come out ascending
    indices_class = [torch.from_numpy(rng.permutation(np.nonzero(labels == c)[0])) for c in range(len(n_per_class))]
    return feats, indices_class


def _walk(x, path="meta"):
    """Yields (path, value) of every leaf."""
    if isinstance(x, dict):
        for k, v in x.items():
            yield from _walk(v, f"{path}.{k}")
    elif isinstance(x, list):
        for i, v in enumerate(x):
            yield from _walk(v, f"{path}[{i}]")
    else:
        yield path, x


# --------------------------------------------------------------------------- #
# clusters: partition, bounds, names
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("norm", [False, True])
def test_clusters_partition_each_class(norm):
    feats, idx = _toy()
    clusters, info = cl.cluster_dataset(feats, idx, k=4, norm=norm, margin=3, seed=0, progress=False)
    assert cl.check_partition(clusters, idx) is None
    for c, per in enumerate(clusters):
        assert len(per) == 4 and all(t.numel() > 0 for t in per)
        allc = torch.cat(per)
        assert allc.numel() == len(idx[c]) == torch.unique(allc).numel()     # no index twice
        assert set(allc.tolist()) == set(idx[c].tolist())                    # exactly the class
        for t in per:
            assert t.dtype == torch.long and torch.equal(t, torch.sort(t).values)
        assert info["sizes"][c] == [len(t) for t in per]
        assert tuple(info["centers"][c].shape) == (4, feats.shape[1])


def test_check_partition_catches_moved_and_duplicated_indices():
    feats, idx = _toy()
    clusters, _ = cl.cluster_dataset(feats, idx, k=3, norm=False, margin=0, seed=0, progress=False)
    moved = [[t.clone() for t in per] for per in clusters]
    moved[1][0] = torch.sort(torch.cat([moved[1][0], moved[0][0][:1]])).values   # class-0 index into class 1
    moved[0][0] = moved[0][0][1:]
    assert "class 0" in cl.check_partition(moved, idx)
    dup = [[t.clone() for t in per] for per in clusters]
    dup[2][1] = torch.sort(torch.cat([dup[2][1][:-1], dup[2][0][:1]])).values       # one index in two clusters
    assert "duplicates: 1" in cl.check_partition(dup, idx)


def test_too_few_distinct_points_is_an_error_not_an_empty_cluster():
    feats = np.repeat(np.eye(2, 3), 5, axis=0)              # 10 points, 2 distinct
    with pytest.warns(Warning):
        with pytest.raises(cl.ClusterConfigError, match="empty"):
            cl.cluster_dataset(feats, [torch.arange(10)], k=3, norm=False, margin=0, seed=0, progress=False)


def test_norm_sizes_within_bounds_where_plain_kmeans_is_not():
    rng = np.random.RandomState(1)
    # one dense blob of 80 points and 20 scattered ones: plain K-Means makes very uneven clusters
    feats = np.concatenate([rng.randn(80, 2) * 0.1, rng.randn(20, 2) * 0.1 + [[8, 0]] * 1 + rng.randint(0, 2, (20, 1)) * [[0, 8]]])
    n, k, m = len(feats), 4, 5
    lo, hi = cl.size_bounds(n, k, m)
    plain = np.bincount(cl.cluster_features(feats, k, False, m, seed=0)[0], minlength=k)
    assert plain.min() < lo or plain.max() > hi          # the constraint matters on this data
    labels, centers, inertia = cl.cluster_features(feats, k, True, m, seed=0)
    sizes = np.bincount(labels, minlength=k)
    assert sizes.sum() == n and ((sizes >= lo) & (sizes <= hi)).all(), (sizes, lo, hi)
    assert centers.shape == (k, 2) and isinstance(inertia, float)


def test_infeasible_settings_message_says_which_values_work():
    # small classes no longer refuse a large margin: it is narrowed per class (test_cluster_margin.py)
    cl.check_feasible([124, 127, 122], 4, True, 50)
    with pytest.raises(cl.ClusterConfigError):
        cl.check_feasible([124, 127, 122], 4, True, -1)
    with pytest.raises(cl.ClusterConfigError, match="--num_cluster 3 or less"):
        cl.check_feasible([3, 10], k=4, norm=False, margin=0)
    cl.check_feasible([5000] * 10, 20, True, 50)   # the paper's CIFAR10 setting


def test_cluster_file_name_matches_the_seed_and_never_collides():
    assert cl.cluster_file_name("CIFAR10", 20, 3, True) == "class_idx_cifar10_k20_3_True.pt"
    assert cl.cluster_file_name("CIFAR10", 20, 1, False, extractor="ck/ResNet18_CIFAR10.pt") == \
        "class_idx_cifar10_k20_1_False.pt"
    names = {cl.cluster_file_name("CIFAR10", 20, 3, True, model=m, margin=g, extractor=e)
             for m in ("ResNet18", "ConvNet") for g in (30, 50)
             for e in (None, "x/resnet18_cifar.pt")}
    assert len(names) == 8
    # without --norm the margin is unused and does not change the name
    assert cl.cluster_file_name("CIFAR10", 20, 3, False, margin=30) == "class_idx_cifar10_k20_3_False.pt"


def test_cluster_command_round_trips_through_the_parser():
    cmd = cl.cluster_command("CIFAR10", "/data/cifar10", 20, 3, True)
    assert cmd == ("python main_cluster.py --dataset CIFAR10 --data_path /data/cifar10 "
                   "--layer_idx 3 --num_cluster 20 --norm")
    cmd = cl.cluster_command("CIFAR100", "my data", 10, 1, True, model="ConvNet", margin=30)
    a = mc.build_parser().parse_args(shlex.split(cmd)[2:])
    assert (a.dataset, a.data_path, a.num_cluster, a.layer_idx, a.norm, a.model, a.margin) == \
        ("CIFAR100", "my data", 10, 1, True, "ConvNet", 30)


# --------------------------------------------------------------------------- #
# the file: content, determinism, refusal
# --------------------------------------------------------------------------- #
@pytest.fixture(scope="module")
def made(tmp_path_factory, bare_ckpt):
    """Two runs with the same seed (different output folders), one with another seed."""
    out = {}
    for tag, seed in (("a", 0), ("b", 0), ("c", 1)):
        tmp = tmp_path_factory.mktemp(f"run_{tag}")
        argv = _cli(tmp, "--seed", str(seed), "--embedding", "pca", extractor=bare_ckpt)
        assert mc.main(argv) == 0
        out[tag] = (tmp, str(tmp / "ck" / cl.cluster_file_name("digits", 4, 2, True, TINY, 10, bare_ckpt)))
    return out


def test_file_is_weights_only_with_plain_content(made, digits):
    path = made["a"][1]
    obj = torch.load(path, weights_only=True)
    assert set(obj) == {"clusters", "meta"}
    meta = obj["meta"]
    for _, v in _walk(obj):
        assert v is None or isinstance(v, (torch.Tensor, bool, int, float, str)), type(v)
    assert meta["fingerprint"] == digits.fingerprint and meta["dataset"] == "digits"
    assert meta["class_counts"] == digits.class_counts and meta["num_train"] == len(digits.labels_train)
    assert meta["extractor_name"] == "tiny.pt" and len(meta["extractor_sha256"]) == 64
    assert meta["extractor_test_acc"] is None                         # a bare state_dict carries none
    assert (meta["model"], meta["layer_idx"], meta["k"], meta["norm"], meta["margin"]) == (TINY, 2, 4, True, 10)
    assert isinstance(meta["centers"][0], torch.Tensor) and tuple(meta["centers"][0].shape) == (4, 32)
    assert all(isinstance(x, float) for x in meta["inertia"])
    for c, sizes in enumerate(meta["sizes"]):
        lo, hi = cl.size_bounds(digits.class_counts[c], 4, 10)
        assert sum(sizes) == digits.class_counts[c] and all(lo <= s <= hi for s in sizes)
    clusters, _ = cl.load_clusters(path, data=digits, expect={"k": 4, "layer_idx": 2, "norm": True,
                                                               "model": TINY, "margin": 10, "dataset": "digits"})
    assert cl.check_partition(clusters, digits.indices_class) is None


def test_same_seed_same_clusters_and_meta(made):
    (_, pa), (_, pb), (_, pc) = made["a"], made["b"], made["c"]
    a, b, c = (torch.load(p, weights_only=True) for p in (pa, pb, pc))
    assert all(torch.equal(x, y) for pa_, pb_ in zip(a["clusters"], b["clusters"]) for x, y in zip(pa_, pb_))
    leaves_a, leaves_b = dict(_walk(a["meta"])), dict(_walk(b["meta"]))
    assert leaves_a.keys() == leaves_b.keys()
    for key, va in leaves_a.items():
        vb = leaves_b[key]
        assert (torch.equal(va, vb) if isinstance(va, torch.Tensor) else va == vb), key
    assert c["meta"]["seed"] == 1
    assert any(not torch.equal(x, y) for pa_, pc_ in zip(a["clusters"], c["clusters"]) for x, y in zip(pa_, pc_))


def test_file_made_on_other_data_is_refused(made, digits):
    path = made["a"][1]
    # the same images in another order (as the CIFAR-10 PNG tree is to torchvision's arrays)
    perm = torch.randperm(len(digits.labels_train), generator=torch.Generator().manual_seed(0))
    u8 = (denormalize(digits.images_train, digits.mean, digits.std) * 255).round().to(torch.uint8)
    assert data_fingerprint(u8, digits.labels_train) == digits.fingerprint
    other = RealData(name="digits", source="reordered copy", channel=1, im_size=(28, 28), num_classes=10,
                     class_names=digits.class_names, mean=digits.mean, std=digits.std,
                     images_train=digits.images_train[perm], labels_train=digits.labels_train[perm],
                     images_test=digits.images_test, labels_test=digits.labels_test,
                     fingerprint=data_fingerprint(u8[perm], digits.labels_train[perm]))
    fix = cl.cluster_command("digits", "data", 4, 2, True, TINY, 10)
    with pytest.raises(cl.ClusterFileError) as e:
        cl.load_clusters(path, data=other, fix_command=fix)
    msg = str(e.value)
    assert "other data" in msg and digits.fingerprint[:16] in msg and other.fingerprint[:16] in msg
    assert "reordered copy" in msg and msg.endswith(fix)


def test_expect_disagreements_are_listed(made):
    with pytest.raises(cl.ClusterFileError) as e:
        cl.load_clusters(made["a"][1], expect={"k": 20, "layer_idx": 3, "norm": True}, fix_command="FIX")
    msg = str(e.value)
    assert "k: file 4, wanted 20" in msg and "layer_idx: file 2, wanted 3" in msg and "norm" not in msg
    assert msg.endswith("FIX")


def test_broken_or_foreign_files_are_refused(tmp_path, made):
    good = torch.load(made["a"][1], weights_only=True)
    trunc = tmp_path / "trunc.pt"
    trunc.write_bytes(Path(made["a"][1]).read_bytes()[:500])
    with pytest.raises(cl.ClusterFileError, match="trunc.pt"):
        cl.load_clusters(str(trunc))
    legacy = tmp_path / "legacy.pt"
    torch.save(good["clusters"], legacy)                   # the paper's format: no meta
    with pytest.raises(cl.ClusterFileError, match="not a dcbs cluster file"):
        cl.load_clusters(str(legacy))
    unsorted = tmp_path / "unsorted.pt"
    bad = {"clusters": [list(per) for per in good["clusters"]], "meta": good["meta"]}
    bad["clusters"][0][0] = bad["clusters"][0][0].flip(0)
    torch.save(bad, unsorted)
    with pytest.raises(cl.ClusterFileError, match="ascending"):
        cl.load_clusters(str(unsorted))
    with pytest.raises(cl.ClusterFileError, match="does not exist"):
        cl.load_clusters(str(tmp_path / "missing.pt"))


def test_figures_are_written(made):
    tmp, path = made["a"]
    stem = Path(path).stem
    from PIL import Image
    grid = tmp / "res" / f"{stem}_class0_clusters.png"
    emb = tmp / "res" / f"{stem}_class0_pca.png"
    with Image.open(grid) as im:
        # 4 cluster rows x 10 images of 28 px with 2 px padding
        assert im.size == (2 + 10 * 30, 2 + 4 * 30)
    with Image.open(emb) as im:
        assert im.size[0] > 100
    log = (tmp / "res" / f"{stem}.log").read_text()
    assert "min" in log and "median" in log and "max" in log and "cluster file written" in log
    cfg = json.loads((tmp / "res" / f"{stem}_config.json").read_text())
    assert cfg["args"]["num_cluster"] == 4 and cfg["fingerprint"]


# --------------------------------------------------------------------------- #
# command line: refusals before any work
# --------------------------------------------------------------------------- #
@pytest.fixture
def no_work(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("work was started")
    monkeypatch.setattr(ex, "load_extractor", boom)
    monkeypatch.setattr(ex, "train_extractor", boom)
    monkeypatch.setattr(ex, "extract_features", boom)
    return monkeypatch


@pytest.mark.parametrize("model,layer,valid", [("ResNet18", 4, "0-3"), ("ConvNet", 3, "0-2"), ("ConvNet", -1, "0-2")])
def test_layer_out_of_range_rejected_before_any_work(tmp_path, capsys, no_work, model, layer, valid):
    no_work.setattr(mc, "load_data", lambda *a, **k: (_ for _ in ()).throw(AssertionError("data loaded")))
    argv = ["--dataset", "digits", "--model", model, "--layer_idx", str(layer),
            "--cluster_path", str(tmp_path / "ck"), "--results_path", str(tmp_path / "res")]
    assert mc.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and f"use {valid}" in err
    assert not (tmp_path / "res").exists() and not (tmp_path / "ck").exists()


def test_infeasible_k_rejected_before_extraction(tmp_path, capsys, no_work, bare_ckpt):
    assert mc.main(_cli(tmp_path, extractor=bare_ckpt, k=500)) == 2
    err = capsys.readouterr().err
    assert "--num_cluster" in err and "or less" in err
    assert not (tmp_path / "ck").exists()


def test_missing_explicit_extractor_gives_the_command_to_create_it(tmp_path, capsys, no_work):
    argv = _cli(tmp_path, extractor=str(tmp_path / "ck" / "mine.pt"))
    assert mc.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "mine.pt not found" in err and "--train_extractor" in err
    cmd = err.split("Train it with: ")[1].split(" (or pass")[0]
    parts = shlex.split(cmd)
    assert parts[:2] == ["python", "main_cluster.py"]
    given, suggested = mc.build_parser().parse_args(argv), mc.build_parser().parse_args(parts[2:])
    assert suggested.train_extractor
    for key in ("dataset", "model", "layer_idx", "num_cluster", "norm", "margin", "cluster_path", "extractor"):
        assert getattr(suggested, key) == getattr(given, key), key


def test_missing_default_extractor_is_trained_first(tmp_path, capsys, monkeypatch):
    trained = []
    real = ex.train_extractor

    def spy(cfg, data, out_path, **kw):
        trained.append(out_path)
        return real(cfg, data, out_path, **kw)
    monkeypatch.setattr(ex, "train_extractor", spy)
    argv = _cli(tmp_path, "--max_steps", "2", "--extractor_epochs", "1", "--no_figures", "--num_threads", "1")
    assert mc.main(argv) == 0
    out = capsys.readouterr().out
    ckpt = str(tmp_path / "ck" / f"{TINY}_digits.pt")
    assert trained == [ckpt] and os.path.isfile(ckpt)
    line = [ln for ln in out.splitlines() if "no extractor checkpoint" in ln]
    assert len(line) == 1 and ckpt in line[0] and "--train_extractor --resume" in line[0]
    assert mc.main(argv) == 0 and len(trained) == 1           # the second time it is used, not retrained


def test_extractor_flags_without_train_extractor_are_refused(tmp_path, capsys, no_work, bare_ckpt):
    assert mc.main(_cli(tmp_path, "--resume", extractor=bare_ckpt)) == 2
    assert "--resume only apply when the extractor is trained (--train_extractor)" in capsys.readouterr().err


def test_sigterm_saves_and_says_how_to_resume(tmp_path):
    """A real signal to a real run: finishes the step, writes the partial checkpoint, exits non-zero."""
    argv = _cli(tmp_path, "--train_extractor", "--extractor_epochs", "1000", "--train_subset", "32",
                "--extractor_batch", "16", "--no_figures")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "main_cluster.py", *argv], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        for line in proc.stdout:                 # wait until the first epoch is done and logged
            if "extractor epoch 1/1000" in line:
                break
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err[-2000:]
    part = tmp_path / "ck" / f"{TINY}_digits.partial.pt"
    assert part.exists() and not (tmp_path / "ck" / f"{TINY}_digits.pt").exists()
    assert "SIGTERM" in err and str(part) in err
    resume = err.split("resume with: ")[1].strip()
    assert shlex.split(resume)[2:] == argv + ["--resume"]
    ck = torch.load(part, weights_only=True)
    assert ck["epoch"] >= 1 and set(ck) >= {"model", "optimizer", "scheduler", "gen_state", "torch_rng"}


def test_unreadable_extractor_is_named(tmp_path, capsys):
    bad = tmp_path / "junk.pt"
    bad.write_bytes(os.urandom(2048))
    assert mc.main(_cli(tmp_path, "--no_figures", extractor=str(bad))) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "cannot be read" in err


def test_extractor_of_another_architecture_is_refused(tmp_path, capsys, digits):
    path = tmp_path / "other.pt"
    net = ex.build_extractor("ConvNet", 1, 10, (28, 28), seed=0)
    torch.save({"state_dict": net.state_dict(), "meta": {"architecture": "ConvNet", "dataset": "digits"}}, path)
    assert mc.main(_cli(tmp_path, "--no_figures", extractor=str(path))) == 2
    assert "pass --model ConvNet" in capsys.readouterr().err


# --------------------------------------------------------------------------- #
# extractor: ImageNet mapping, training, resume
# --------------------------------------------------------------------------- #
def test_imagenet_weights_map_onto_resnet18bn(tmp_path, monkeypatch):
    import torchvision
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "_hub_dir", None, raising=False)
    torch.manual_seed(123)
    tv = torchvision.models.resnet18()
    with torch.no_grad():
        for name, buf in tv.named_buffers():
            if "running" in name:
                buf.uniform_(0.5, 1.5)      # distinguishable from a fresh BatchNorm
    tv_sd = tv.state_dict()
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(tv_sd, tmp_path / "hub" / "checkpoints" / ex.IMAGENET_FILE)

    net = ex.build_extractor("ResNet18BN", 3, 10, (32, 32), seed=0)
    fresh = {k: v.clone() for k, v in net.state_dict().items()}
    copied = ex.imagenet_init(net)
    sd = net.state_dict()
    assert torch.equal(sd["layer1.0.conv1.weight"], tv_sd["layer1.0.conv1.weight"])
    assert torch.equal(sd["layer3.1.bn2.running_var"], tv_sd["layer3.1.bn2.running_var"])
    assert torch.equal(sd["layer2.0.shortcut.0.weight"], tv_sd["layer2.0.downsample.0.weight"])
    assert torch.equal(sd["layer4.0.shortcut.1.running_mean"], tv_sd["layer4.0.downsample.1.running_mean"])
    for key in ("conv1.weight", "bn1.weight", "bn1.running_var", "fc.weight", "fc.bias"):
        assert torch.equal(sd[key], fresh[key]), key                  # stem and classifier re-initialised
    assert sd["conv1.weight"].shape == (64, 3, 3, 3)
    expected = [k for k in sd if not k.startswith(("conv1.", "bn1.", "fc."))]
    assert sorted(copied) == sorted(expected)


def test_imagenet_weights_unavailable_fail_with_message(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "_hub_dir", None, raising=False)

    def offline(*a, **k):
        raise OSError("network is unreachable")
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    net = ex.build_extractor("ResNet18BN", 3, 10, (32, 32), seed=0)
    with pytest.raises(ex.ExtractorError) as e:
        ex.imagenet_init(net)
    msg = str(e.value)
    assert "could not be downloaded" in msg and str(tmp_path) in msg and ex.IMAGENET_FILE in msg


def test_pretrained_imagenet_needs_resnet18bn(tmp_path, capsys, no_work):
    assert mc.main(_cli(tmp_path, "--train_extractor", "--pretrained", "imagenet")) == 2
    assert "needs --model ResNet18BN" in capsys.readouterr().err


def test_stop_flag_catches_sigterm():
    with ex.StopFlag() as s:
        os.kill(os.getpid(), signal.SIGTERM)
        assert s.stop and s.signame == "SIGTERM"
    assert signal.getsignal(signal.SIGTERM) is not s._handler


def test_training_interrupt_resume_equals_uninterrupted(tmp_path, digits):
    cfg = ex.TrainConfig(model=TINY, dataset="digits", epochs=2, lr=0.05, batch_size=16, seed=0,
                         train_subset=64, flip=False)
    quiet = dict(log=lambda *_: None, progress=False)
    full = tmp_path / "full" / "e.pt"
    ex.train_extractor(cfg, digits, str(full), **quiet)
    ref = torch.load(full, weights_only=True)

    out = tmp_path / "run" / "e.pt"
    part = Path(ex.partial_path(str(out)))

    def stop_at_3(step, flag):
        if step == 3:
            flag.stop = True
    with pytest.raises(ex.TrainingInterrupted) as e:
        ex.train_extractor(cfg, digits, str(out), resume_command="CMD --resume", on_step=stop_at_3, **quiet)
    assert str(part) in str(e.value) and str(e.value).endswith("CMD --resume") and "3/8 steps" in str(e.value)
    assert part.exists() and not out.exists()
    with pytest.raises(ex.ExtractorError, match="--resume"):              # not silently restarted
        ex.train_extractor(cfg, digits, str(out), **quiet)
    with pytest.raises(ex.ExtractorError, match="settings differ.*lr"):
        ex.train_extractor(ex.TrainConfig(**{**cfg.to_dict(), "lr": 0.1}), digits, str(out), resume=True, **quiet)
    meta = ex.train_extractor(cfg, digits, str(out), resume=True, **quiet)
    assert out.exists() and not part.exists()
    got = torch.load(out, weights_only=True)
    for key, value in ref["state_dict"].items():
        assert torch.equal(value, got["state_dict"][key]), key
    assert meta["steps"] == 8 and meta["test_acc"] == ref["meta"]["test_acc"]
    assert [h["loss"] for h in meta["history"]] == [h["loss"] for h in ref["meta"]["history"]]
    for key in ("architecture", "dataset", "epochs", "test_acc", "seed"):
        assert key in got["meta"]
    with pytest.raises(ex.ExtractorError, match="already exists.*--overwrite"):
        ex.train_extractor(cfg, digits, str(out), **quiet)


def test_truncated_partial_checkpoint_is_named(tmp_path, digits):
    out = tmp_path / "e.pt"
    part = Path(ex.partial_path(str(out)))
    part.write_bytes(b"PK\x03\x04" + os.urandom(300))
    cfg = ex.TrainConfig(model=TINY, dataset="digits", epochs=1, batch_size=16, train_subset=32)
    with pytest.raises(FileFormatError, match=str(part)):
        ex.train_extractor(cfg, digits, str(out), resume=True, log=lambda *_: None, progress=False)


def test_random_crop_flip_shifts_and_flips():
    x = torch.arange(2 * 1 * 6 * 6, dtype=torch.float32).view(2, 1, 6, 6) + 1
    g = torch.Generator().manual_seed(0)
    y = ex.random_crop_flip(x, pad=2, flip=True, g=g)
    assert y.shape == x.shape
    for i in range(2):
        # every output is a shifted (and possibly mirrored) window of the zero-padded input
        xp = torch.nn.functional.pad(x[i], [2, 2, 2, 2])
        windows = [xp[:, r:r + 6, c:c + 6] for r in range(5) for c in range(5)]
        assert any(torch.equal(y[i], w) or torch.equal(y[i], w.flip(2)) for w in windows)
    assert torch.equal(ex.random_crop_flip(x, 0, False, g), x)


# --------------------------------------------------------------------------- #
# end to end through the command line
# --------------------------------------------------------------------------- #
def test_end_to_end_command_line(tmp_path, digits):
    argv = _cli(tmp_path, "--train_extractor", "--extractor_epochs", "1", "--train_subset", "128",
                "--extractor_batch", "32", "--view_class", "3", "--seed", "5")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "main_cluster.py", *argv], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    ext_file = tmp_path / "ck" / f"{TINY}_digits.pt"
    name = cl.cluster_file_name("digits", 4, 2, True, TINY, 10)
    assert name == f"class_idx_digits_k4_2_True_{TINY}_m10.pt"
    ck = torch.load(ext_file, weights_only=True)
    assert ck["meta"]["architecture"] == TINY and ck["meta"]["epochs"] == 1 and ck["meta"]["seed"] == 5
    assert 0.0 <= ck["meta"]["test_acc"] <= 1.0 and "test acc" in r.stdout
    clusters, meta = cl.load_clusters(str(tmp_path / "ck" / name), data=digits,
                                      expect={"k": 4, "layer_idx": 2, "norm": True, "model": TINY, "margin": 10})
    assert meta["extractor_test_acc"] == ck["meta"]["test_acc"]
    assert meta["extractor_name"] == ext_file.name
    assert (tmp_path / "ck" / f"features_{TINY}_digits_l2.pt").is_file()   # reused by the next clustering
    stem = Path(name).stem
    for fig in (f"{stem}_class3_clusters.png", f"{stem}_class3_tsne.png", f"{stem}.log", f"{stem}_config.json"):
        assert (tmp_path / "res" / fig).stat().st_size > 0, fig
    # a second run with --train_extractor refuses to overwrite the finished extractor
    r2 = subprocess.run([sys.executable, "main_cluster.py", *argv], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=120)
    assert r2.returncode == 2 and "already exists" in r2.stderr and "--overwrite" in r2.stderr


def test_feature_cache_is_reused_only_for_the_same_extractor_layer_and_data(tmp_path, digits):
    net = ex.build_extractor(TINY, 1, 10, (28, 28), seed=0)
    images = digits.images_train[:64]
    path = str(tmp_path / "features.pt")
    logs = []
    f1, hit1 = ex.cached_features(path, net, images, 1, "sha-a", "fp", batch_size=32, log=logs.append)
    f2, hit2 = ex.cached_features(path, net, images, 1, "sha-a", "fp", batch_size=32, log=logs.append)
    assert (hit1, hit2) == (False, True) and torch.equal(f1, f2)
    assert torch.equal(f1, ex.extract_features(net, images, 1, 32, progress=False))
    for sha, layer, fp in (("sha-b", 1, "fp"), ("sha-b", 0, "fp"), ("sha-b", 0, "other")):
        f, hit = ex.cached_features(path, net, images, layer, sha, fp, batch_size=32, log=logs.append)
        assert not hit and torch.equal(f, ex.extract_features(net, images, layer, 32, progress=False))
    assert sum("recomputing" in m for m in logs) == 3
    open(path, "wb").write(b"truncated")
    f, hit = ex.cached_features(path, net, images, 0, "sha-b", "other", batch_size=32, log=logs.append)
    assert not hit and "unreadable" in logs[-1]
