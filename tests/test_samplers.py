"""The sampler registry: what each real-batch sampler draws, its prepare hook, its files, resume."""
import math
import os
import signal

import numpy as np
import pytest
import torch

from conftest import run_cli, run_main
from dcbs import clusters as cl
from dcbs import selection as sel
from dcbs.samplers import (SAMPLERS, ClassSampler, PrunedSampler, RepresentativeSampler, StratifiedSampler,
                           SystematicSampler, method_label)
from test_batch_sampling import chunks, write_clusters


def _shuffled_clusters(indices_class, k, seed=0):
    """Each class split into k clusters of random members (not consecutive runs of indices)."""
    g = torch.Generator().manual_seed(seed)
    return [[t.sort().values for t in torch.tensor_split(ix[torch.randperm(len(ix), generator=g)], k)]
            for ix in indices_class]


CLASSES = [torch.arange(0, 100), torch.arange(100, 260)]


# --------------------------------------------------------------------------- #
# the registry
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("script,default", [("main.py", "class"), ("main_BS.py", "cluster")])
def test_help_lists_every_sampler_and_the_scripts_default(script, default):
    r = run_cli(script, "-h")
    assert r.returncode == 0
    text = " ".join(r.stdout.split())
    assert "--sampler {" + ",".join(SAMPLERS) + "}" in text
    assert f"default --sampler {default}" in text
    assert "(default: None)" not in text          # each default said once, in the help text


def test_tags_name_methods_and_result_files():
    assert [method_label("DC", s) for s in SAMPLERS] == ["DC", "BS(DC)", "STRAT(DC)", "DREAM(DC)", "PRUNE(DC)",
                                                                "SYS(DC)"]


# --------------------------------------------------------------------------- #
# stratified
# --------------------------------------------------------------------------- #
def test_stratified_takes_one_image_from_every_cluster_and_varies():
    clusters = _shuffled_clusters(CLASSES, 10)
    s = StratifiedSampler(clusters, seed=0)
    for c in range(2):
        draws = [s.sample(c, 10) for _ in range(20)]
        for d in draws:
            hits = [sum(int(i) in set(t.tolist()) for i in d) for t in clusters[c]]
            assert hits == [1] * 10                       # exactly one per cluster, every cluster used
        assert len({tuple(sorted(d.tolist())) for d in draws}) > 15   # batches differ between draws
    # fewer than k asked: distinct clusters, still at most one image each
    d = s.sample(1, 4)
    assert len(d) == 4 and sorted(sum(int(i) in set(t.tolist()) for i in d) for t in clusters[1]).count(1) == 4


def test_stratified_draws_every_member_eventually():
    clusters = _shuffled_clusters(CLASSES, 5)
    s = StratifiedSampler(clusters, seed=1)
    seen = set()
    for _ in range(400):
        seen |= set(s.sample(0, 5).tolist())
    assert seen == set(CLASSES[0].tolist())


# --------------------------------------------------------------------------- #
# systematic
# --------------------------------------------------------------------------- #
SIZES = [1, 1, 2, 30, 50, 116]      # class 0 (N = 200): two singletons (outliers), a pair, three big clusters


def _uneven_clusters():
    """Class 0: indices 100..299 in random order cut into clusters of SIZES; class 1: 0..99 in two halves."""
    g = torch.Generator().manual_seed(0)
    members = (100 + torch.randperm(200, generator=g)).split(SIZES)
    return [[t.sort().values for t in members], [torch.arange(0, 50), torch.arange(50, 100)]]


@pytest.mark.parametrize("n", [20, 30])
def test_systematic_keeps_dcs_inclusion_odds_and_allocates_in_proportion(n):
    clusters = _uneven_clusters()
    s = SystematicSampler(clusters, seed=0)
    rng = torch.get_rng_state()
    big_n, p, draws = 200, n / 200, 4000
    counts = torch.zeros(300, dtype=torch.long)
    previous = None
    for _ in range(draws):
        d = s.sample(0, n)
        assert d.dtype == torch.long and len(d) == n and len(set(d.tolist())) == n       # distinct
        assert ((d >= 100) & (d < 300)).all()                                             # all of class 0
        for t, m in zip(clusters[0], SIZES):                  # every draw: floor or ceil of m n / N per cluster
            assert int(torch.isin(d, t).sum()) in (m * n // big_n, -(-m * n // big_n))
        assert previous is None or set(d.tolist()) != previous                          # draws differ
        previous = set(d.tolist())
        counts[d] += 1
    se = math.sqrt(p * (1 - p) / draws)
    freq = counts[100:].double() / draws
    assert (freq - p).abs().max() < 4.5 * se, (freq - p).abs().max() / se   # every image n / N, singletons too
    assert torch.equal(torch.get_rng_state(), rng)                            # its own generator only
    # the contrast: stratified (one image per cluster) has every singleton in every batch
    st = StratifiedSampler(clusters, seed=0)
    singletons = torch.cat([t for t in clusters[0] if len(t) == 1])
    assert all(torch.isin(singletons, st.sample(0, len(SIZES))).all() for _ in range(50))


def test_systematic_returns_the_whole_class_when_asked_for_as_many():
    clusters = _uneven_clusters()
    s = SystematicSampler(clusters, seed=1)
    for c, n in ((0, 200), (0, 500), (1, 100), (1, 256)):
        d = s.sample(c, n)
        assert sorted(d.tolist()) == torch.cat(clusters[c]).sort().values.tolist()
    d = s.sample(1, 10)                       # class 1: 5 from each half, every draw
    assert int((d < 50).sum()) == 5 and ((d >= 0) & (d < 100)).all()


def _systematic_cfg(tmp_path, *flags):
    from dcbs.config import build_parser, resolve
    argv = ["--dataset", "digits", "--sampler", "systematic", "--cluster_path", str(tmp_path), *map(str, flags)]
    return resolve(build_parser().parse_args(argv))


def test_systematic_reads_any_k_and_norm_files(tmp_path, digits):
    # default: the stratified file (plain K-Means, k = --batch_real); --num_cluster / --norm: another file, any k
    write_clusters(tmp_path / cl.cluster_file_name("digits", 16, 3, False), digits, chunks(digits, 16))
    write_clusters(tmp_path / cl.cluster_file_name("digits", 3, 3, True), digits, chunks(digits, 3), norm=True)
    for flags, k, norm in ((["--batch_real", 16], 16, False), (["--batch_real", 500, "--num_cluster", 3, "--norm"],
                                                                3, True)):
        cfg = _systematic_cfg(tmp_path, *flags)
        make, info = SystematicSampler.setup(cfg, digits)
        assert (info["cluster_k"], info["cluster_norm"]) == (k, norm)
        s = make(0)
        for c, ix in enumerate(digits.indices_class):
            d = s.sample(c, cfg.batch_real)
            assert set(d.tolist()) <= set(ix.tolist()) and len(d) == min(cfg.batch_real, len(ix))


def test_systematic_refuses_stray_flags_and_names_the_file_it_needs(tmp_path):
    base = ["--preset", "smoke", "--save_path", tmp_path / "out", "--cluster_path", tmp_path, "--batch_real", 16,
            "--sampler", "systematic"]
    line = _error(run_main("main.py", *base))
    assert "main_cluster.py --dataset digits" in line and "--num_cluster 16" in line and "--norm" not in line
    assert "class_idx_digits_k16_3_False.pt" in line                         # the file stratified reads
    line = _error(run_main("main.py", *base, "--num_cluster", 7, "--norm"))
    assert "--num_cluster 7 --norm" in line and "class_idx_digits_k7_3_True.pt" in line
    for flags in (["--cluster_weighting", "size"], ["--prune_hard", 0.1], ["--rep_embed", "net"]):
        line = _error(run_main("main.py", *base, *flags))
        assert f"{flags[0]} does not apply to --sampler systematic" in line
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- #
# representative
# --------------------------------------------------------------------------- #
def _blobs(k=4, per=12, seed=0):
    """k tight blobs far apart; the last row of each blob sits exactly at its mean (its K-Means centre)."""
    rng = np.random.RandomState(seed)
    pts = []
    for j in range(k):
        centre = np.array([100.0 * j, -70.0 * j])
        off = rng.randn(per - 1, 2)
        pts.append(np.vstack([centre + off - off.mean(0), centre]))
    return np.vstack(pts).astype(np.float32)


def test_nearest_to_centres_returns_the_point_at_each_centre():
    x = _blobs()
    perm = np.random.RandomState(3).permutation(len(x))
    got = sel.nearest_to_centres(x[perm], 4, seed=0)
    centres = {tuple(x[i]) for i in range(len(x)) if i % 12 == 11}
    assert {tuple(x[perm][i]) for i in got} == centres


class _EmbedNet(torch.nn.Module):
    """embed(x) reads the first two pixels: the images carry a hand-made embedding."""

    def __init__(self):
        super().__init__()
        self.bn = torch.nn.BatchNorm1d(2)
        self.calls = 0

    def embed(self, x):
        self.calls += 1
        return self.bn(x.flatten(1)[:, :2])


def test_representative_net_mode_picks_the_centre_images_and_keeps_state_clean():
    x = _blobs()
    n = len(x)
    images = torch.zeros(n, 1, 2, 2)
    images.view(n, -1)[:, :2] = torch.from_numpy(x)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    images = images[perm]                                    # training order shuffled
    centre_rows = {int(i) for i in torch.nonzero(torch.isin(perm, torch.arange(11, n, 12))).flatten()}
    net = _EmbedNet().train()
    bn_before = {k: v.clone() for k, v in net.bn.state_dict().items()}
    rng_before = torch.get_rng_state()
    s = RepresentativeSampler(seed=0, indices_class=[torch.arange(n)], images=images, k=4, interval=3)
    s.prepare(net, 0, 0)
    assert set(s.sample(0, 4).tolist()) == centre_rows
    assert torch.equal(torch.get_rng_state(), rng_before)              # global RNG untouched
    assert all(torch.equal(v, net.bn.state_dict()[k]) for k, v in bn_before.items())   # BN statistics too
    assert net.training and net.bn.training                               # modes restored
    calls = net.calls
    for it in (1, 2):
        s.prepare(net, it, 0)
    assert net.calls == calls                                # within --interval: no new clustering
    s.prepare(net, 3, 0)
    assert net.calls > calls


def test_representative_features_mode_draws_whole_partition_rows(digits):
    feats = torch.randn(len(digits.labels_train), 4, generator=torch.Generator().manual_seed(0))
    reps = sel.make_partitions(feats, digits.indices_class, k=8, partitions=3, candidates=40, seed=0,
                               progress=False)
    s = RepresentativeSampler(seed=0, partitions=reps)
    for c in range(digits.num_classes):
        assert reps[c].shape == (3, 8)
        rows = {tuple(r.tolist()) for r in reps[c]}
        draws = {tuple(s.sample(c, 8).tolist()) for _ in range(30)}
        assert draws == rows                                     # every partition drawn, nothing else
        assert set(reps[c].flatten().tolist()) <= set(digits.indices_class[c].tolist())


class _Spy(ClassSampler):
    calls = []

    def prepare(self, net, it, outer_step):
        _Spy.calls.append((it, outer_step))


def test_prepare_runs_once_per_outer_step(digits):
    from dcbs.augment import ParamDiffAug
    from dcbs.condense import Diagnostics, StepContext, gradient_matching_step, init_synthetic
    from dcbs.config import build_parser, resolve
    from networks import build_model
    cfg = resolve(build_parser().parse_args(["--dataset", "digits", "--ipc", "10", "--batch_real", "8",
                                             "--batch_train", "256", "--model", "MLP"]))
    net = build_model("MLP", digits.channel, digits.num_classes, digits.im_size)
    img, lab = init_synthetic(digits, 10, "real", 0, 0, "cpu")
    opt = torch.optim.SGD([img], lr=0.1, momentum=0.5)
    _Spy.calls = []
    for it in range(2):
        ctx = StepContext(cfg, digits, _Spy(digits.indices_class, 0), ClassSampler(digits.indices_class, 1), 0, it,
                          torch.device("cpu"), ParamDiffAug(), Diagnostics([n for n, _ in net.named_parameters()]))
        gradient_matching_step(net, img, lab, opt, ctx)
    assert _Spy.calls == [(it, ol) for it in range(2) for ol in range(10)]     # ipc 10: outer_loop 10


# --------------------------------------------------------------------------- #
# pruned
# --------------------------------------------------------------------------- #
def test_pruned_never_draws_the_hardest_fraction():
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(260, generator=g)
    scores[[3, 7, 150]] = 10.0                  # some hardest images sit at low indices
    for f in (0.2, 0.5):
        s = PrunedSampler(CLASSES, scores, f, seed=0)
        for c, ix in enumerate(CLASSES):
            drop = math.ceil(f * len(ix))
            hardest = set(ix[torch.argsort(scores[ix], descending=True)[:drop]].tolist())
            seen = set()
            for _ in range(200):
                seen |= set(s.sample(c, 16).tolist())
            assert not seen & hardest
            assert seen == set(ix.tolist()) - hardest          # the rest is all still drawn


def test_pruned_ties_count_the_lower_index_as_harder():
    kept = sel.keep_easy(torch.arange(10), torch.tensor([1.0] * 10), 0.3)
    assert kept.tolist() == list(range(3, 10))


# --------------------------------------------------------------------------- #
# files: refused with the command that makes the right one
# --------------------------------------------------------------------------- #
def _error(r):
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    return lines[0]


def test_stratified_refuses_a_k_other_than_batch_real_and_norm(tmp_path, digits):
    # the first through main.py itself, the others in this process (main.py only calls dcbs.cli.main)
    write_clusters(tmp_path / cl.cluster_file_name("digits", 5, 3, False), digits, chunks(digits, 5))
    base = ["--preset", "smoke", "--save_path", tmp_path / "out", "--sampler", "stratified",
            "--cluster_path", tmp_path, "--batch_real", 16]
    line = _error(run_cli("main.py", *base, "--num_cluster", 5))
    assert "k = --batch_real 16" in line and "--num_cluster 16" in line
    assert "--norm" in _error(run_main("main.py", *base, "--norm"))
    assert "lower --batch_real" in _error(run_main("main.py", *base[:-1], 500))
    assert not (tmp_path / "out").exists()


def test_missing_sampler_files_name_the_command(tmp_path):
    # the first through main.py itself, the others in this process (main.py only calls dcbs.cli.main)
    base = ["--preset", "smoke", "--save_path", tmp_path / "out", "--cluster_path", tmp_path, "--batch_real", 16]
    line = _error(run_cli("main.py", *base, "--sampler", "representative"))
    assert "main_cluster.py --dataset digits" in line and "--representative" in line and "--num_cluster 16" in line
    line = _error(run_main("main.py", *base, "--sampler", "pruned"))
    assert "main_cluster.py --dataset digits" in line and "--scores" in line
    line = _error(run_main("main.py", "--preset", "smoke", "--save_path", tmp_path / "out", "--prune_hard", 0.1))
    assert "--prune_hard" in line and "does not apply" in line


# --------------------------------------------------------------------------- #
# kill -9 and resume: the same run
# --------------------------------------------------------------------------- #
RUN = ["--preset", "smoke", "--model", "ConvNetW32", "--batch_real", 16, "--Iteration", 4, "--eval_it", 4,
       "--ckpt_every", 1, "--num_threads", 1]
SAMPLER_ARGS = {
    "stratified": ["--sampler", "stratified"],
    "systematic": ["--sampler", "systematic"],
    "representative": ["--sampler", "representative", "--rep_partitions", 3, "--candidates", 64],
    "representative_net": ["--sampler", "representative", "--rep_embed", "net", "--interval", 3, "--candidates", 48],
    "pruned": ["--sampler", "pruned", "--prune_hard", 0.3],
}


@pytest.fixture(scope="module")
def sampler_files(tmp_path_factory, digits):
    d = tmp_path_factory.mktemp("samplerfiles")
    write_clusters(d / cl.cluster_file_name("digits", 16, 3, False), digits, chunks(digits, 16))
    common = {"dataset": "digits", "fingerprint": digits.fingerprint, "model": cl.DEFAULT_MODEL, "seed": 0,
              "extractor_sha256": "", "source": digits.source}
    feats = torch.randn(len(digits.labels_train), 4, generator=torch.Generator().manual_seed(0))
    reps = sel.make_partitions(feats, digits.indices_class, 16, 3, 64, 0, progress=False)
    sel.save_partitions(str(d / sel.partition_file_name("digits", 16, 3, 3, 64)), reps,
                        {**common, "layer_idx": 3, "k": 16, "partitions": 3, "candidates": 64})
    sel.save_scores(str(d / sel.score_file_name("digits")), torch.rand(len(digits.labels_train)), common)
    return d


@pytest.mark.parametrize("which", list(SAMPLER_ARGS))
def test_killed_and_resumed_run_equals_the_run_left_alone(which, tmp_path, sampler_files):
    from test_resume import assert_same, outputs, wait_for_checkpoint
    import subprocess
    import sys
    from conftest import ROOT
    args = [*RUN, *SAMPLER_ARGS[which], "--cluster_path", sampler_files, "--num_exp", 2]
    r = run_cli("main.py", *args, "--save_path", tmp_path, "--run_name", "alone")
    assert r.returncode == 0, r.stderr
    env = dict(os.environ, OMP_NUM_THREADS="1", DCBS_NO_DOWNLOAD="1")
    p = subprocess.Popen([sys.executable, os.path.join(ROOT, "main.py"), *map(str, args), "--save_path",
                          str(tmp_path), "--run_name", "killed"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    wait_for_checkpoint(tmp_path / "killed", 0, 2, p)
    p.send_signal(signal.SIGKILL)
    p.wait()
    r = run_cli("main.py", "--resume", tmp_path / "killed")
    assert r.returncode == 0, r.stderr
    assert_same(outputs(tmp_path / "killed"), outputs(tmp_path / "alone"))
    tag = SAMPLERS[SAMPLER_ARGS[which][1]].tag
    assert os.path.exists(tmp_path / "alone" / f"res_{tag}DC_digits_ConvNetW32_1ipc.pt")
    if which == "systematic":           # the run records the k it read (--batch_real's), not --num_cluster's default
        import json
        cfg = json.load(open(tmp_path / "alone" / "config.json"))
        assert (cfg["num_cluster"], cfg["cluster_k"], cfg["label"]) == (16, 16, "SYS(DC)")
