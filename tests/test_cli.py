"""End-to-end runs through the command line on the embedded digits data (seconds each)."""
import csv
import hashlib
import json
import os

import pytest
import torch

from conftest import needs_cxx, run_cli, run_main

# real batches of 16 instead of the whole ~125-image class: what these tests check does not depend on it
SMALL = ("--batch_real", 16)
OUTPUTS = ["config.json", "log.txt", "syn_exp0.pt", "accuracies.json", "diagnostics.csv", "DONE",
           "grid_exp0_it0.png", "grid_exp0_it2.png"]


def run_dir(save, name):
    return os.path.join(save, name)


@pytest.mark.parametrize("method", ["DC", "DSA", "DM"])
def test_each_method_writes_every_output(tmp_path, method):
    r = run_cli("main.py", "--method", method, "--preset", "smoke", "--save_path", tmp_path, "--run_name", "r",
                "--num_eval", 2, *SMALL)
    assert r.returncode == 0, r.stderr
    d = run_dir(tmp_path, "r")
    for f in OUTPUTS + [f"res_{method}_digits_ConvNet_1ipc.pt"]:
        assert os.path.isfile(os.path.join(d, f)), f
    cfg = json.load(open(os.path.join(d, "config.json")))
    assert cfg["method"] == method and cfg["preset"] == "smoke" and cfg["git_revision"]
    assert cfg["dsa_strategy"] == ("none" if method == "DC" else "color_crop_cutout_scale_rotate")
    if method == "DM":
        assert cfg["lr_img"] == 1.0 and cfg["init"] == "real"
    acc = json.load(open(os.path.join(d, "accuracies.json")))
    assert sorted(acc["0"]) == ["0", "1", "2"] and len(acc["0"]["2"]["ConvNet"]) == 2
    rows = list(csv.DictReader(open(os.path.join(d, "diagnostics.csv"))))
    assert [int(r["it"]) for r in rows] == [0, 1]
    if method != "DM":
        assert any(k.startswith("gw_real:") for k in rows[0]) and any(k.startswith("gw_syn:") for k in rows[0])
    # the reference-compatible file, readable without unpickling code
    res = torch.load(os.path.join(d, f"res_{method}_digits_ConvNet_1ipc.pt"), weights_only=True)
    images, labels = res["data"][0]
    assert images.shape == (10, 1, 28, 28) and labels.tolist() == list(range(10))
    assert res["normalized"] is True and len(res["mean"]) == 1
    assert all(isinstance(a, float) for a in res["accs_all_exps"]["ConvNet"])
    syn = torch.load(os.path.join(d, "syn_exp0.pt"), weights_only=True)
    assert torch.equal(syn["data"][0][0], images)
    assert "over 2 models" in r.stdout.strip().splitlines()[-1] and "±" in r.stdout


def test_ipc_above_fifty_and_grid_rows(tmp_path):
    r = run_cli("main.py", "--preset", "smoke", "--ipc", 3, "--Iteration", 1, "--save_path", tmp_path,
                "--run_name", "r", "--num_eval", 1, "--init", "real", *SMALL)
    assert r.returncode == 0, r.stderr
    from PIL import Image
    w, h = Image.open(os.path.join(tmp_path, "r", "grid_exp0_it1.png")).size
    assert w > h / 10 * 2  # 3 images per row (nrow = ipc), 10 rows


def test_same_seed_same_synthetic_set_and_other_seed_differs(tmp_path):
    """Three iterations, then one evaluation: the same seed in another process gives the same set and accuracy."""
    sets = {}
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        r = run_cli("main.py", "--method", "DSA", "--preset", "smoke", "--seed", seed, "--save_path", tmp_path,
                    "--run_name", name, "--num_eval", 1, "--Iteration", 3, "--eval_it", 3, "--ipc", 2, *SMALL,
                    "--model", "ConvNetW32")       # the seeding does not depend on the width; a quarter of the cost
        assert r.returncode == 0, r.stderr
        sets[name] = torch.load(os.path.join(tmp_path, name, "syn_exp0.pt"), weights_only=True)["data"][0][0]
        acc = json.load(open(os.path.join(tmp_path, name, "accuracies.json")))
        sets[name + "acc"] = acc
    assert torch.equal(sets["a"], sets["b"]) and sets["aacc"] == sets["bacc"]
    assert not torch.equal(sets["a"], sets["c"])


def tree_hash(path):
    h = hashlib.sha256()
    for root, _, files in sorted(os.walk(path)):
        for f in sorted(files):
            h.update(f.encode())
            h.update(open(os.path.join(root, f), "rb").read())
    return h.hexdigest()


def test_bad_input_fails_with_one_line_and_touches_nothing(tmp_path):
    r = run_cli("main.py", "--preset", "smoke", "--save_path", tmp_path, "--run_name", "first", "--num_eval", 1,
                "--Iteration", 1, *SMALL)
    assert r.returncode == 0, r.stderr
    before = tree_hash(tmp_path)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(os.urandom(300))
    cases = [
        ["--dataset", "ImageNet"],
        ["--ipc", 0],
        ["--dataset", "CIFAR10", "--data_path", tmp_path / "missing"],
        ["--load_syn", junk],
        ["--load_syn", tmp_path / "nope.pt"],
        ["--run_name", "first"],                      # an existing run is never overwritten
        ["--eval_it", 0, 99],                         # beyond --Iteration
        ["--method", "DC", "--dsa_strategy", "crop"],  # DSA strategy without DSA
    ]
    for i, extra in enumerate(cases):
        # the first through the script, the others in this process (main.py only calls dcbs.cli.main)
        r = (run_cli if i == 0 else run_main)("main.py", "--preset", "smoke", "--save_path", tmp_path, *extra)
        assert r.returncode != 0, extra
        lines = [l for l in r.stderr.strip().splitlines() if l.startswith("error:")]
        assert len(lines) == 1 and "Traceback" not in r.stderr, (extra, r.stderr)
    junk.unlink()
    assert tree_hash(tmp_path) == before


def test_load_syn_evaluates_a_saved_set(tmp_path):
    r = run_cli("main.py", "--preset", "smoke", "--save_path", tmp_path, "--run_name", "r", "--num_eval", 1,
                "--Iteration", 1, "--eval_it", 1, *SMALL)
    assert r.returncode == 0, r.stderr
    r = run_cli("main.py", "--load_syn", tmp_path / "r" / "res_DC_digits_ConvNet_1ipc.pt", "--num_eval", 2,
                "--epoch_eval_train", 3, "--save_path", tmp_path, "--run_name", "ev")
    assert r.returncode == 0, r.stderr
    acc = json.load(open(tmp_path / "ev" / "accuracies.json"))
    assert len(acc["0"]["loaded"]["ConvNet"]) == 2 and os.path.exists(tmp_path / "ev" / "DONE")
    # the per-architecture line is logged (it once failed to format the iteration "loaded")
    assert "Logging error" not in r.stderr
    assert "it loaded: ConvNet 3 epochs" in open(tmp_path / "ev" / "log.txt").read()


@needs_cxx
def test_compile_gives_the_same_accuracies_and_fails_early_without_a_compiler(tmp_path):
    accs = {}
    for name, extra in (("eager", []), ("compiled", ["--compile"])):
        r = run_cli("main.py", "--preset", "smoke", "--save_path", tmp_path, "--run_name", name, "--num_eval", 2,
                    "--Iteration", 1, *SMALL, *extra)
        assert r.returncode == 0, r.stderr
        accs[name] = json.load(open(tmp_path / name / "accuracies.json"))
        assert json.load(open(tmp_path / name / "config.json"))["compile"] is bool(extra)
    n_test = 540  # digits' test split: one image is 1/540 of accuracy
    flat = {k: [a for it in v["0"].values() for a in it["ConvNet"]] for k, v in accs.items()}
    assert len(flat["eager"]) == 4 and flat["eager"] == pytest.approx(flat["compiled"], abs=1.5 / n_test)
    # no working compiler: one error line before anything is written (fresh inductor cache, so none is reused)
    before = tree_hash(tmp_path)
    r = run_cli("main.py", "--preset", "smoke", "--save_path", tmp_path, "--run_name", "nocxx", "--compile",
                env={"CXX": str(tmp_path / "no-such-c++"), "TORCHINDUCTOR_CACHE_DIR": str(tmp_path.parent / "ind")})
    assert r.returncode == 2
    lines = [l for l in r.stderr.strip().splitlines() if l.startswith("error:")]
    assert len(lines) == 1 and "--compile" in lines[0] and "Traceback" not in r.stderr, r.stderr   # older name too
    assert tree_hash(tmp_path) == before and not (tmp_path / "nocxx").exists()
