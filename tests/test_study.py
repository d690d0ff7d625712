"""The sampler study's report (dcbs/study.py, reproduce.py study) on hand-made run directories."""
from __future__ import annotations

import math
import os
import sys

import pytest

from conftest import ROOT, run_cli

sys.path.insert(0, ROOT)
from dcbs import study  # noqa: E402
from dcbs.rundir import RunDir  # noqa: E402

ITS = (50, 100, 200)


def write_run(root, name, accs, seed, sampler="class", done=True, seconds=None, sample=None, rows=200, grads=None,
              batch=None, **cfg):
    """A run directory written by the run's own writers: accs is iteration -> model accuracies (fractions);
    grads: tensor -> function of the iteration giving its real gradient norm; batch: (mean, min) per row."""
    path = os.path.join(root, name)
    os.makedirs(path)
    rd = RunDir(path, lock=False)
    rd.write_config(dict(method="DC", dataset="CIFAR10", model="ConvNet", ipc=1, preset="study", seed=seed,
                         sampler=sampler, Iteration=200, eval_it=list(ITS), num_eval=2, num_exp=1,
                         git_revision="0123456789abcdef", **cfg))
    rd.write_accuracies({"0": {str(it): {"ConvNet": a} for it, a in accs.items()}})
    diag = []
    for it in range(rows):
        row = {"exp": 0, "it": it, "loss": 1.0}
        if sample is not None:
            row["sample_seconds"] = sample
        if seconds is not None:
            row["seconds"] = seconds
        if batch is not None:
            row["batch_real_mean"], row["batch_real_min"] = batch(it)
        for t, f in (grads or {}).items():
            row[f"gw_real:{t}"], row[f"gw_syn:{t}"] = f(it), 1.0
        diag.append(row)
    rd.write_diagnostics(diag)
    if done:
        rd.mark_done("ConvNet: done")
    return path


BS20 = dict(num_cluster=20, layer_idx=3, norm=True, cluster_model="ResNet18BN")
# ConvNet's tensors as diagnostics.csv names them: 4-D convolution, 1-D norm scale and bias, 2-D classifier
CONV, NORM, BIAS, FC = "blocks.0.0.weight", "blocks.0.1.weight", "blocks.0.0.bias", "classifier.weight"


@pytest.fixture
def runs(tmp_path):
    root = str(tmp_path / "samplers")
    # DC: seed means 26, 29, 25 at iteration 200; 21 at iteration 100 for seed 0
    # DC seeds 0 and 1 with gradient norms: conv norm = iteration (mean 99.5 over 0..199) and 1.0 + seed,
    # classifier 2.0; every draw 256 images
    dc_grads = {0: {CONV: float, NORM: lambda it: 7.0, BIAS: lambda it: 9.0, FC: lambda it: 2.0},
                1: {CONV: lambda it: 1.0, NORM: lambda it: 7.0, BIAS: lambda it: 9.0, FC: lambda it: 2.0}}
    write_run(root, "DC_CIFAR10_ipc1_study_s0", {50: [0.1, 0.1], 100: [0.20, 0.22], 200: [0.25, 0.27]}, 0,
              seconds=2.0, sample=0.1, grads=dc_grads[0], batch=lambda it: (256.0, 256))
    write_run(root, "DC_CIFAR10_ipc1_study_s1", {50: [0.1, 0.1], 100: [0.2, 0.2], 200: [0.28, 0.30]}, 1,
              seconds=2.0, sample=0.1, grads=dc_grads[1], batch=lambda it: (256.0, 256))
    write_run(root, "DC_CIFAR10_ipc1_study_s2", {50: [0.1, 0.1], 100: [0.2, 0.2], 200: [0.24, 0.26]}, 2,
              seconds=2.0, sample=0.1)
    # a second finished DC run of seed 0: it sorts after the first one and is not counted
    write_run(root, "DC_CIFAR10_ipc1_study_s0_1", {200: [0.8, 0.8]}, 0, seconds=2.0, sample=0.1)
    # stratified: seed means 28, 31, 28 (d = +2, +2, +3); 23 at iteration 100 for seed 0 (d = +2)
    for s, (a100, a200) in enumerate([([0.22, 0.24], [0.27, 0.29]), ([0.2, 0.2], [0.30, 0.32]),
                                      ([0.2, 0.2], [0.27, 0.29])]):
        write_run(root, f"STRAT-DC_l3_ResNet18BN_CIFAR10_ipc1_study_s{s}", {50: [0.1, 0.1], 100: a100, 200: a200},
                  s, sampler="stratified", seconds=3.0 + s, sample=0.5, layer_idx=3, cluster_model="ResNet18BN")
    # cluster k=20: seeds 0, 1 finished (d = -1, +1), seed 2 running, seed 3 without a DC partner;
    # no timing columns, as in runs written before they existed. Seed 0: draws of 250 and 200 images
    # (smallest cluster 200), conv norm 30
    write_run(root, "BS-DC_k20_l3_norm_ResNet18BN_CIFAR10_ipc1_study_s0", {200: [0.24, 0.26]}, 0,
              sampler="cluster", grads={CONV: lambda it: 30.0, FC: lambda it: 4.0},
              batch=lambda it: (250.0, 200) if it % 2 else (200.0, 200), **BS20)
    write_run(root, "BS-DC_k20_l3_norm_ResNet18BN_CIFAR10_ipc1_study_s1", {200: [0.30, 0.30]}, 1,
              sampler="cluster", **BS20)
    write_run(root, "BS-DC_k20_l3_norm_ResNet18BN_CIFAR10_ipc1_study_s2", {50: [0.9, 0.9]}, 2,
              sampler="cluster", done=False, **BS20)
    write_run(root, "BS-DC_k20_l3_norm_ResNet18BN_CIFAR10_ipc1_study_s3", {200: [0.5, 0.5]}, 3,
              sampler="cluster", **BS20)
    # cluster k=10, one seed: d = 27 - 26 = +1, no SE
    write_run(root, "BS-DC_k10_l3_norm_ResNet18BN_CIFAR10_ipc1_study_s0", {200: [0.26, 0.28]}, 0,
              sampler="cluster", **dict(BS20, num_cluster=10))
    os.makedirs(os.path.join(root, "extractor"))   # not a run directory
    return root


def the_group(records):
    groups = study.paired(records)
    assert [g.key for g in groups] == [("CIFAR10", 1, "study")]
    return groups[0]


def test_collect_reads_labels_accuracies_and_timing(runs):
    recs = {r.name: r for r in study.collect([runs])}
    assert len(recs) == 12     # 4 DC (one a duplicate), 3 STRAT, 4 BS k=20 (one running), 1 BS k=10
    dc = recs["DC_CIFAR10_ipc1_study_s0"]
    assert (dc.label, dc.dataset, dc.ipc, dc.preset, dc.seed, dc.done) == ("DC", "CIFAR10", 1, "study", 0, True)
    assert dc.accs == {50: pytest.approx([10.0, 10.0]), 100: pytest.approx([20.0, 22.0]),
                       200: pytest.approx([25.0, 27.0])}
    assert dc.sec_per_it == pytest.approx(2.0) and dc.sample_sec_per_it == pytest.approx(0.1)
    # `seconds` is one iteration's; the time before evaluating iteration t is the sum over iterations 0..t-1
    assert dc.cum_seconds == {50: pytest.approx(100.0), 100: pytest.approx(200.0), 200: pytest.approx(400.0)}
    assert recs["STRAT-DC_l3_ResNet18BN_CIFAR10_ipc1_study_s2"].label == "STRAT(DC)"
    # cluster runs differ in k only: k names them, nothing else
    assert recs["BS-DC_k20_l3_norm_ResNet18BN_CIFAR10_ipc1_study_s0"].label == "BS(DC) k=20"
    assert recs["BS-DC_k10_l3_norm_ResNet18BN_CIFAR10_ipc1_study_s0"].label == "BS(DC) k=10"
    old = recs["BS-DC_k20_l3_norm_ResNet18BN_CIFAR10_ipc1_study_s1"]
    assert old.sec_per_it is None and old.sample_sec_per_it is None and old.cum_seconds == {}
    running = recs["BS-DC_k20_l3_norm_ResNet18BN_CIFAR10_ipc1_study_s2"]
    assert not running.done and running.last_it == 50


def test_paired_differences_by_hand(runs):
    g = the_group(study.collect([runs]))
    assert list(g.stats) == ["DC", "BS(DC) k=10", "BS(DC) k=20", "STRAT(DC)"]    # baseline, then by sampler
    dc = g.stats["DC"]
    assert dc.seeds == [0, 1, 2] and dc.final_it == 200
    assert dc.seed_means == pytest.approx({0: 26.0, 1: 29.0, 2: 25.0})
    assert dc.mean == pytest.approx(80 / 3)
    assert dc.sd == pytest.approx(math.sqrt(13 / 3))            # squares 4/9 + 49/9 + 25/9 = 26/3, over n - 1 = 2
    assert dc.model_mean == pytest.approx(80 / 3) and dc.n_models == 6
    assert dc.model_sd == pytest.approx(math.sqrt(35) / 3)      # squares sum to 70/3, over n = 6
    assert dc.sec_per_it == pytest.approx(2.0) and dc.sample_sec_per_it == pytest.approx(0.1)

    st = g.comparisons["STRAT(DC)"]                             # d = +2, +2, +3
    assert st.d == pytest.approx({0: 2.0, 1: 2.0, 2: 3.0}) and st.n == 3 and not st.unpaired
    assert st.mean_d == pytest.approx(7 / 3)
    assert st.sd_d == pytest.approx(math.sqrt(1 / 3))           # squares 1/9 + 1/9 + 4/9 = 2/3, over 2
    assert st.se == pytest.approx(1 / 3)
    assert st.gain                                              # 2.33 >= 1 and 2.33 > 2 x 0.33
    assert st.d_by_it[100] == pytest.approx({0: 2.0, 1: 0.0, 2: 0.0})
    assert st.d_by_it[50] == pytest.approx({0: 0.0, 1: 0.0, 2: 0.0})
    assert g.stats["STRAT(DC)"].sec_per_it == pytest.approx(4.0)    # 3, 4, 5 s over the seeds

    bs = g.comparisons["BS(DC) k=20"]                           # seed 3 has no DC run; seed 2 is running
    assert g.stats["BS(DC) k=20"].seeds == [0, 1, 3]
    assert bs.d == pytest.approx({0: -1.0, 1: 1.0}) and bs.n == 2
    assert list(bs.unpaired) == [3]
    assert bs.mean_d == pytest.approx(0.0) and bs.sd_d == pytest.approx(math.sqrt(2)) and bs.se == pytest.approx(1.0)
    assert not bs.gain
    assert g.stats["BS(DC) k=20"].sec_per_it is None

    one = g.comparisons["BS(DC) k=10"]
    assert one.d == pytest.approx({0: 1.0}) and one.se is None and one.sd_d is None and not one.gain

    assert [r.name for r in g.unfinished] == ["BS-DC_k20_l3_norm_ResNet18BN_CIFAR10_ipc1_study_s2"]
    assert [r.name for r, _ in g.not_counted] == ["DC_CIFAR10_ipc1_study_s0_1"]


def test_gain_rule_needs_one_point_and_two_standard_errors():
    c = study.Comparison("X", 200, d={0: 1.0, 1: 1.0, 2: 1.0}, mean_d=1.0, sd_d=0.0, se=0.0)
    assert c.gain
    assert not study.Comparison("X", 200, mean_d=0.99, sd_d=0.0, se=0.0).gain
    assert not study.Comparison("X", 200, mean_d=2.0, sd_d=1.8, se=1.0).gain
    assert not study.Comparison("X", 200, mean_d=5.0).gain     # one seed: no SE, no call


def row(md, label):
    for line in md.splitlines():
        if line.startswith(f"| {label} |"):
            return [c.strip() for c in line.strip("|").split("|")][1:]
    raise AssertionError(f"no row {label}")


def test_markdown_holds_the_numbers(runs):
    md = study.render_markdown(study.collect([runs]), [runs])
    assert "## CIFAR10, ipc 1, preset study" in md
    assert "a gain counts when mean d ≥ 1 point and mean d > 2 SE" in md
    assert "preset `study` (a reduced protocol); 200 iterations; evaluation at iterations 50, 100, 200" in md
    assert "num_eval × num_exp = 2 × 1" in md
    dc = row(md, "DC")   # the first match: the main table (the per-iteration table comes after it)
    assert dc == ["0, 1, 2", f"26.67 ± {math.sqrt(13 / 3):.2f} [models 26.67 ± {math.sqrt(35) / 3:.2f}, n=6], it 200",
                  "baseline", "–", "2.00", "0.100"]
    assert row(md, "STRAT(DC)") == ["0, 1, 2", "29.00 ± 1.73 [models 29.00 ± 1.73, n=6], it 200",
                                    "+2.33 ± 0.33 (n=3) **gain**", "s0: +2.00; s1: +2.00; s2: +3.00", "4.00",
                                    "0.500"]
    bs = row(md, "BS(DC) k=20")
    assert bs[0] == "0, 1, 3" and bs[2] == "+0.00 ± 1.00 (n=2)"
    assert bs[3] == "s0: -1.00; s1: +1.00; s3: unpaired (no finished DC run of seed 3)"
    assert bs[4:] == ["–", "–"]
    assert row(md, "BS(DC) k=10")[2] == "+1.00 (n=1, no SE)"
    # accuracy per evaluation iteration: the second table
    per_it = md.split("Accuracy at each evaluation iteration")[1]
    assert "| sampler | it 50 | it 100 | it 200 |" in per_it
    assert row(per_it, "STRAT(DC)") == ["10.00 (+0.00)", "21.00 (+0.67)", "29.00 (+2.33)"]
    assert row(per_it, "DC") == ["10.00", "20.33", "26.67"]
    assert row(per_it, "BS(DC) k=20") == ["–", "–", "35.00 (+0.00)"]
    # the running run and the duplicate are named, never averaged
    counted, running = md.split("Running / not finished")
    assert "`BS-DC_k20_l3_norm_ResNet18BN_CIFAR10_ipc1_study_s2` (BS(DC) k=20, seed 2): " \
           "iteration 50: 90.00 ± 0.00 (2 models)" in running
    assert "`DC_CIFAR10_ipc1_study_s0_1` (DC, seed 0): second finished run of seed 0" in md
    assert "90.00" not in counted and "80.00" not in md


def test_a_group_with_only_running_runs_says_so_once(tmp_path):
    root = str(tmp_path / "samplers")
    write_run(root, "DC_CIFAR10_ipc1_study_s0", {50: [0.35, 0.36]}, 0, done=False)
    md = study.render_markdown(study.collect([root]), [root])
    assert md.count("No finished run") == 1 and "No finished run in this group." in md
    assert "`DC_CIFAR10_ipc1_study_s0` (DC, seed 0): iteration 50: 35.50 ± 0.50 (2 models)" in md


def test_settings_of_one_sampler_sort_by_their_numbers(tmp_path):
    # Table 2's cells: k=5 must come before k=10 and k=25 (a string sort puts it last)
    root = str(tmp_path / "samplers")
    write_run(root, "DC_CIFAR10_ipc1_study_s0", {200: [0.26, 0.26]}, 0)
    for k in (25, 5, 10):
        write_run(root, f"BS-DC_k{k}_l2_norm_ResNet18BN_CIFAR10_ipc1_study_s0", {200: [0.25, 0.25]}, 0,
                  sampler="cluster", **dict(BS20, num_cluster=k, layer_idx=2))
    md = study.render_markdown(study.collect([root]), [root])
    main_table = md.split("Accuracy at each evaluation iteration")[0]
    labels = [line.split("|")[1].strip() for line in main_table.splitlines() if line.startswith("| BS(DC)")]
    assert labels == ["BS(DC) k=5", "BS(DC) k=10", "BS(DC) k=25"]


def test_batches_and_gradient_norms_per_sampler(runs):
    recs = {r.name: r for r in study.collect([runs])}
    bs = recs["BS-DC_k20_l3_norm_ResNet18BN_CIFAR10_ipc1_study_s0"]
    assert (bs.batch_mean, bs.batch_min) == (pytest.approx(225.0), 200)
    assert bs.gw_real == {CONV: pytest.approx(30.0), FC: pytest.approx(4.0)}
    assert recs["DC_CIFAR10_ipc1_study_s0"].gw_real[CONV] == pytest.approx(99.5)    # mean of 0..199
    g = the_group(list(recs.values()))
    dc = g.stats["DC"]
    assert dc.gw_real[CONV] == pytest.approx((99.5 + 1.0) / 2)     # over the seeds that have the column
    assert (dc.batch_mean, dc.batch_min) == (pytest.approx(256.0), 256)
    md = study.render_markdown(list(recs.values()), [runs])
    table = md.split("Real batches and real gradients")[1]
    # 4-D and 2-D weights only: the norm scale and the bias are 1-D
    assert f"| sampler | real batch | `{CONV}` | `{FC}` |" in table and NORM not in table and BIAS not in table
    assert row(table, "DC") == ["256.0 (256)", "50.250", "2.000"]
    assert row(table, "BS(DC) k=20") == ["225.0 (200)", "30.000", "4.000"]
    assert "| STRAT(DC) |" not in table                               # its files have neither column


def test_plot_writes_accuracy_and_per_seed_gradient_figures(runs, tmp_path):
    out = tmp_path / "figs"
    paths = study.plot(study.collect([runs]), str(out))
    stem = "study_CIFAR10_ipc1_study"
    names = ["study_CIFAR10_ipc1.png", f"{stem}_s0_grad_norms.png", f"{stem}_s0_grad_norms_iter.png",
             f"{stem}_s1_grad_norms.png", f"{stem}_s1_grad_norms_iter.png"]   # seed 2: no run has norms
    assert paths == [str(out / n) for n in names]
    for p in paths:
        with open(p, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert sorted(os.listdir(out)) == sorted(names)    # no temporary file left


def test_cli_prints_and_writes_the_report(runs, tmp_path):
    out, figs = tmp_path / "report" / "samplers_table.md", tmp_path / "figs"
    p = run_cli("reproduce.py", "study", "--save_path", runs, "--out", out, "--figures", figs, timeout=300)
    assert p.returncode == 0, p.stderr
    text = out.read_text(encoding="utf-8")
    assert text.strip() == p.stdout.strip()
    assert "+2.33 ± 0.33 (n=3) **gain**" in text and str(figs / "study_CIFAR10_ipc1.png") in text
    assert (figs / "study_CIFAR10_ipc1.png").is_file()
    assert "11 finished and 1 unfinished run(s)" in p.stderr


def test_cli_refuses_a_missing_folder(tmp_path, capsys):
    from dcbs import reproduce_cli
    assert reproduce_cli.main(["study", "--save_path", str(tmp_path / "nowhere")]) == 2
    assert "no such folder" in capsys.readouterr().err
    assert reproduce_cli.main(["study", "--save_path", str(tmp_path), "--", "--seed", "1"]) == 2


def test_one_suspended_iteration_does_not_move_the_cost(tmp_path):
    root = str(tmp_path / "r")
    path = write_run(root, "DC_CIFAR10_ipc1_study_s0", {5: [0.25, 0.27]}, 0, seconds=2.0, sample=0.1, rows=5)
    rd = RunDir(path, lock=False)
    rows = [{"exp": 0, "it": it, "loss": 1.0, "seconds": 2000.0 if it == 2 else 2.0, "sample_seconds": 0.1}
            for it in range(5)]
    rd.write_diagnostics(rows)
    (rec,) = study.collect([root])
    assert rec.sec_per_it == pytest.approx(2.0)          # a mean would say 401.6
    assert rec.cum_seconds[5] == pytest.approx(2008.0)  # wall time keeps what was spent


def test_a_sampler_that_reclusters_every_tenth_iteration_pays_for_it(tmp_path):
    root = str(tmp_path / "r")
    path = write_run(root, "DREAM-DC_CIFAR10_ipc1_study_s0", {20: [0.25, 0.27]}, 0, sampler="representative",
                     rows=20)
    # 300 s of clustering at iterations 0 and 10, inside their `seconds`; 2 s for every step's matching
    rows = [{"exp": 0, "it": it, "loss": 1.0, "sample_seconds": 300.0 if it % 10 == 0 else 0.01,
             "seconds": 2.0 + (300.0 if it % 10 == 0 else 0.01)} for it in range(20)]
    RunDir(path, lock=False).write_diagnostics(rows)
    (rec,) = study.collect([root])
    assert rec.sample_sec_per_it == pytest.approx((600 + 18 * 0.01) / 20)   # a median would say 0.01
    assert rec.sec_per_it == pytest.approx(2.0 + (600 + 18 * 0.01) / 20)   # a median would say 2.01
