"""main_cluster.py's pipeline: flags, checks, extractor, features, clusters (or partitions, or scores), views.

``main`` is the command line (exit 0, 2 on a bad setting or file, 130 when interrupted); ``run`` is the
pipeline on parsed flags. The usage text is main_cluster.py's docstring.
"""
from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
import time

import numpy as np
import torch

from dcbs import clusters as cl
from dcbs.cmdline import ConfigError, Parser, pick_device, resolve_class, setup_logging
from dcbs import extractor as ex
from dcbs import selection as sel
from dcbs.data import DATASETS, DataError, load_data
from dcbs.io import FileFormatError, atomic_write_json

LOG = logging.getLogger("main_cluster")     # the script's name: its log lines read as they always have


def build_parser() -> argparse.ArgumentParser:
    p = Parser(description="Per-class K-Means clusters of extractor features (Batch Sampling).")
    p.add_argument("--dataset", default="CIFAR10", choices=list(DATASETS))
    p.add_argument("--data_path", default="data", help="dataset root or ImageFolder tree (train/, test/)")
    p.add_argument("--model", default="ResNet18", choices=ex.EXTRACTOR_MODELS, metavar="MODEL",
                   help="feature extractor (the seed clustered with ResNet18 and ConvNet): ResNet18, ResNet18BN "
                        "or a ConvNet variant (ConvNet, ConvNetBN, ConvNetW32, ...)")
    p.add_argument("--layer_idx", type=int, default=3, help="stage whose map is clustered: 0-3 ResNet18, 0-2 ConvNet")
    p.add_argument("--num_cluster", type=int, default=20, help="k, clusters per class")
    p.add_argument("--norm", action="store_true", help="size-constrained K-Means (k-means-constrained)")
    p.add_argument("--representative", action="store_true",
                   help="write the partition file of --sampler representative instead: per class --rep_partitions "
                        "K-Means runs (k = --num_cluster, i.e. the run's --batch_real) on random pools of --candidates "
                        "images, keeping the image nearest each centre")
    p.add_argument("--rep_partitions", type=int, default=20, help="with --representative: partitions per class")
    p.add_argument("--candidates", type=int, default=1024, help="with --representative: images per K-Means pool")
    p.add_argument("--scores", action="store_true",
                   help="write the hardness scores of --sampler pruned instead: the extractor's cross-entropy on "
                        "every training image (eval mode, no augmentation)")
    p.add_argument("--margin", type=int, default=cl.DEFAULT_MARGIN,
                   help="with --norm, cluster sizes stay within n_c // k +- margin")
    p.add_argument("--n_init", type=int, default=cl.KMEANS_N_INIT, help="K-Means restarts per class")
    p.add_argument("--cluster_path", default="checkpoints", help="where the cluster file and extractor live")
    p.add_argument("--results_path", default="results", help="figures, log and configuration JSON")
    p.add_argument("--seed", type=int, default=0, help="every random source derives from it")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--num_threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--extract_batch", type=int, default=500, help="batch size of feature extraction")
    p.add_argument("--no_feature_cache", action="store_true",
                   help="always recompute the features (default: reuse <cluster_path>/features_<extractor>_l<layer>.pt "
                        "when the same extractor, layer and data made it)")
    g = p.add_argument_group("feature extractor")
    g.add_argument("--extractor", default=None,
                   help="extractor checkpoint (ours or a bare state_dict); default <cluster_path>/<model>_<dataset>.pt")
    g.add_argument("--train_extractor", action="store_true",
                   help="train the extractor first, then cluster (done anyway when the default checkpoint is missing)")
    g.add_argument("--pretrained", default="none", choices=["none", "imagenet"],
                   help="imagenet: initialise ResNet18BN from torchvision's ImageNet ResNet18")
    g.add_argument("--extractor_epochs", type=int, default=30)
    g.add_argument("--extractor_lr", type=float, default=0.05, help="peak LR, cosine to 0 per step")
    g.add_argument("--extractor_batch", type=int, default=128)
    g.add_argument("--weight_decay", type=float, default=5e-4)
    g.add_argument("--train_subset", type=int, default=None, help="train on this many random images (smoke runs)")
    g.add_argument("--max_steps", type=int, default=None, help="stop extractor training after this many steps")
    g.add_argument("--resume", action="store_true", help="continue an interrupted extractor training")
    g.add_argument("--overwrite", action="store_true", help="retrain over an existing extractor checkpoint")
    v = p.add_argument_group("views")
    v.add_argument("--view_class", default=None,
                   help="class (index or name) of the Figure 2 views; default ship when present, else 0")
    v.add_argument("--view_samples", type=int, default=10, help="images per cluster row in the grid")
    v.add_argument("--embedding", default="tsne", choices=["tsne", "pca", "none"])
    v.add_argument("--no_figures", action="store_true", help="write no figures")
    return p


def _positive(args, *names):
    for n in names:
        val = getattr(args, n)
        if val is not None and val < 1:
            raise ConfigError(f"--{n} must be >= 1, got {val}")


def resolve_view_class(spec: str | None, class_names) -> int:
    return resolve_class(spec, class_names, "ship", "--view_class")


def run(args: argparse.Namespace, argv: list[str]) -> str:
    """The whole pipeline; returns the cluster file path. ``args`` is never modified."""
    t_start = time.time()
    # ---- checks that need no data ------------------------------------------------------------
    try:
        ex.check_layer(args.model, args.layer_idx)
    except ex.ExtractorError as e:
        raise ConfigError(str(e)) from None
    _positive(args, "num_cluster", "n_init", "extract_batch", "extractor_epochs", "extractor_batch",
              "train_subset", "max_steps", "view_samples", "rep_partitions", "candidates", "num_threads")
    if args.representative and args.scores:
        raise ConfigError("--representative and --scores write different files: run them one at a time")
    if (args.representative or args.scores) and args.norm:
        raise ConfigError("--norm applies to cluster files; drop it with --representative / --scores")
    if args.margin < 0:
        raise ConfigError(f"--margin must be >= 0, got {args.margin}")
    if args.pretrained == "imagenet" and args.model != "ResNet18BN":
        raise ConfigError("--pretrained imagenet needs --model ResNet18BN (torchvision's ImageNet weights are "
                          f"BatchNorm weights), not {args.model}")
    device = str(pick_device(args.device))
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    data = load_data(args.dataset, args.data_path)      # the data first: every later hint assumes it is there
    ext_path = args.extractor or ex.default_checkpoint_path(args.cluster_path, args.model, args.dataset)
    default_ext = args.extractor is None
    train = args.train_extractor or (default_ext and not os.path.isfile(ext_path))
    if not train:
        only = [f for f, on in (("--resume", args.resume), ("--overwrite", args.overwrite),
                                ("--pretrained imagenet", args.pretrained != "none")) if on]
        if only:
            raise ConfigError(f"{', '.join(only)} only apply when the extractor is trained (--train_extractor)")
    fix = cl.cluster_command(args.dataset, args.data_path, args.num_cluster, args.layer_idx, args.norm, args.model,
                             args.margin, None if default_ext else args.extractor,
                             None if args.cluster_path == "checkpoints" else args.cluster_path)
    if not train and not os.path.isfile(ext_path):
        part = ex.partial_path(ext_path)
        hint = (f"; an unfinished training is in {part}, continue it with: {fix} --train_extractor --resume"
                if os.path.exists(part) else "")
        paper = ("; --model ResNet18BN --pretrained imagenet starts from ImageNet weights as the paper did"
                 if args.model == "ResNet18" else "")
        raise ex.ExtractorError(
            f"extractor checkpoint {ext_path} not found{hint}. Train it with: {fix} --train_extractor"
            f"{' --pretrained imagenet' if args.model == 'ResNet18BN' else ''} "
            f"(or pass --extractor PATH to an existing checkpoint, e.g. the paper's resnet18_cifar.pt{paper})")
    if train and os.path.isfile(ext_path) and not args.overwrite:
        raise ex.ExtractorError(f"extractor checkpoint {ext_path} already exists; drop --train_extractor to use "
                                f"it, or add --overwrite to retrain over it")

    if args.scores:
        name = sel.score_file_name(args.dataset, args.model, ext_path)
    elif args.representative:
        name = sel.partition_file_name(args.dataset, args.num_cluster, args.layer_idx, args.rep_partitions,
                                       args.candidates, args.model, ext_path)
    else:
        name = cl.cluster_file_name(args.dataset, args.num_cluster, args.layer_idx, args.norm, args.model,
                                    args.margin, ext_path)
    out_path = os.path.join(args.cluster_path, name)
    stem = os.path.splitext(name)[0]
    os.makedirs(os.path.abspath(args.results_path), exist_ok=True)
    handlers = setup_logging(os.path.join(args.results_path, f"{stem}.log"), stream=sys.stdout, logger=LOG.name,
                             fmt="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    try:
        return _run_logged(args, argv, data, train, device, ext_path, out_path, stem, fix, t_start)
    finally:
        for h in handlers:
            LOG.removeHandler(h)
            h.close()


def _run_logged(args, argv, data, train, device, ext_path, out_path, stem, fix, t_start) -> str:
    log = LOG.info
    log(f"main_cluster.py {' '.join(shlex.quote(a) for a in argv)}")
    # ---- settings that need the data -----------------------------------------------------------
    counts = data.class_counts
    log(f"{data.name}: {len(data.labels_train)} training images from {data.source}, per class {counts}, "
        f"fingerprint {data.fingerprint[:16]}...")
    if args.representative and min(counts) < args.candidates:
        raise ConfigError(f"--candidates {args.candidates} is more than the smallest class holds ({min(counts)}); "
                          f"lower --candidates")
    if args.representative and args.candidates < args.num_cluster:
        raise ConfigError(f"--candidates {args.candidates} < --num_cluster {args.num_cluster}: each K-Means pool "
                          f"needs at least one image per cluster")
    if not args.scores:
        cl.check_feasible(counts, args.num_cluster, args.norm, args.margin, data.class_names)
        for line in cl.margin_notes(counts, args.num_cluster, args.norm, args.margin, data.class_names):
            log(line)
    view_class = resolve_view_class(args.view_class, data.class_names)

    # ---- extractor -----------------------------------------------------------------------------
    if train:
        cfg = ex.TrainConfig(model=args.model, dataset=args.dataset, epochs=args.extractor_epochs,
                             lr=args.extractor_lr, batch_size=args.extractor_batch,
                             weight_decay=args.weight_decay, pretrained=args.pretrained, seed=args.seed,
                             train_subset=args.train_subset, max_steps=args.max_steps,
                             flip="flip" in DATASETS[args.dataset].dsa_strategy)
        resume_cmd = "python main_cluster.py " + " ".join(shlex.quote(a) for a in argv)
        if not args.resume:
            resume_cmd += " --resume" if args.train_extractor else " --train_extractor --resume"
        if not args.train_extractor:
            init = ", from ImageNet weights" if args.pretrained == "imagenet" else ""
            log(f"no extractor checkpoint {ext_path}: training {args.model} on {data.name} first "
                f"({args.extractor_epochs} epochs{init}); "
                f"it is saved there, and an interrupted training continues with: {resume_cmd}")
        t0 = time.time()
        ex.train_extractor(cfg, data, ext_path, device=device, resume=args.resume, overwrite=args.overwrite,
                           log=log, resume_command=resume_cmd, stop=ex.StopFlag(log))
        log(f"extractor training: {time.time() - t0:.1f}s")
    net, info = ex.load_extractor(ext_path, args.model, data, device, log=log)
    acc = "unknown (bare state_dict)" if info["test_acc"] is None else f"{info['test_acc']:.4f}"
    log(f"extractor {ext_path}: sha256 {info['sha256'][:16]}..., test acc {acc}")

    common = {"dataset": data.name, "source": data.source, "num_train": int(len(data.labels_train)),
              "class_counts": [int(c) for c in counts], "fingerprint": data.fingerprint,
              "extractor_name": info["name"], "extractor_sha256": info["sha256"],
              "extractor_test_acc": info["test_acc"], "model": args.model, "seed": args.seed,
              "created_by": "main_cluster.py", "argv": list(argv)}
    if args.scores:
        t0 = time.time()
        scores = sel.compute_scores(net, data.images_train, data.labels_train, args.extract_batch, device)
        sel.save_scores(out_path, scores, {**common, "score": "cross-entropy, eval mode, no augmentation"})
        sel.load_scores(out_path, data)
        log(f"scores: mean {scores.mean():.4f}, median {scores.median():.4f}, max {scores.max():.4f} "
            f"({time.time() - t0:.1f}s); written: {out_path}")
        return out_path

    # ---- features and clusters -----------------------------------------------------------------
    t0 = time.time()
    if args.no_feature_cache:
        feats, hit = ex.extract_features(net, data.images_train, args.layer_idx, args.extract_batch, device), False
    else:
        cache = ex.feature_cache_path(args.cluster_path, ext_path, args.layer_idx)
        feats, hit = ex.cached_features(cache, net, data.images_train, args.layer_idx, info["sha256"],
                                        data.fingerprint, args.extract_batch, device, log=log)
    log(f"features: layer {args.layer_idx}, {tuple(feats.shape)}{' from the cache ' + cache if hit else ''} "
        f"({time.time() - t0:.1f}s)")
    if args.representative:
        t0 = time.time()
        reps = sel.make_partitions(feats, data.indices_class, args.num_cluster, args.rep_partitions,
                                   args.candidates, args.seed)
        seeds = "dcbs.seeding.derive_seed(seed, 'rep_pool'/'rep_kmeans', c, r)"
        sel.save_partitions(out_path, reps, {**common, "layer_idx": args.layer_idx, "k": args.num_cluster,
                                             "partitions": args.rep_partitions, "candidates": args.candidates,
                                             "kmeans_max_iter": sel.REP_KMEANS_ITER, "class_seeds": seeds})
        sel.load_partitions(out_path, data)
        log(f"representatives: {args.rep_partitions} partitions x {args.num_cluster} images per class from pools "
            f"of {args.candidates} ({time.time() - t0:.1f}s); written: {out_path}")
        return out_path
    t0 = time.time()
    clusters, cinfo = cl.cluster_dataset(feats, data.indices_class, args.num_cluster, args.norm, args.margin,
                                         args.seed, n_init=args.n_init, class_names=data.class_names)
    log(f"clustering: {time.time() - t0:.1f}s; cluster sizes per class (min / median / max):")
    for line, nm in zip(cl.size_summary(cinfo["sizes"]), data.class_names):
        log(f"  {line} [{nm}]")

    config = {k: v for k, v in vars(args).items() if k not in ("cluster_path", "results_path")}
    config.update(device_resolved=device, extractor_file=os.path.basename(ext_path))
    meta = {
        "format": cl.FORMAT, "created_by": "main_cluster.py",
        "dataset": data.name, "source": data.source, "num_train": int(len(data.labels_train)),
        "class_counts": [int(c) for c in counts], "class_names": [str(n) for n in data.class_names],
        "fingerprint": data.fingerprint,
        "extractor_name": info["name"], "extractor_sha256": info["sha256"], "extractor_test_acc": info["test_acc"],
        "extractor_pretrained": (info["meta"].get("config") or {}).get("pretrained"),
        "model": args.model, "layer_idx": args.layer_idx, "feature_dim": int(feats.shape[1]),
        "features": "global-average-pooled stage output, eval mode",
        "k": args.num_cluster, "norm": bool(args.norm), "margin": args.margin,
        "size_bounds": cinfo["size_bounds"], "margin_clamped": cinfo["margin_clamped"],
        "n_init": args.n_init, "max_iter": cl.KMEANS_MAX_ITER,
        "seed": args.seed, "class_seeds": "dcbs.seeding.derive_seed(seed, 'kmeans', c)",
        "sizes": cinfo["sizes"], "centers": cinfo["centers"], "inertia": cinfo["inertia"],
        "indices": "training-set indices in loader order, ascending within each cluster",
        "config": config,
    }
    if os.path.exists(out_path):
        log(f"replacing existing cluster file {out_path}")
    cl.save_clusters(out_path, clusters, meta)
    cl.load_clusters(out_path, data=data, fix_command=fix)   # what main_BS.py will do
    log(f"cluster file written: {out_path}")

    # ---- views ---------------------------------------------------------------------------------
    figures = []
    if not args.no_figures:
        t0 = time.time()
        cname = data.class_names[view_class]
        grid = os.path.join(args.results_path, f"{stem}_class{view_class}_clusters.png")
        cl.save_cluster_grid(grid, data.images_train, clusters[view_class], args.view_samples, data.mean,
                             data.std, args.seed, tag=f"{stem}/{view_class}")
        figures.append(grid)
        log(f"Figure 2 view: {grid} (class {view_class} '{cname}', one row per cluster, layer {args.layer_idx}, "
            f"denormalised)")
        if args.embedding != "none":
            idx = data.indices_class[view_class]
            lab = np.empty(len(idx), dtype=np.int64)
            pos = {int(i): p for p, i in enumerate(idx.tolist())}
            for j, t in enumerate(clusters[view_class]):
                lab[[pos[int(i)] for i in t.tolist()]] = j
            emb = os.path.join(args.results_path, f"{stem}_class{view_class}_{args.embedding}.png")
            cl.save_embedding(emb, feats[idx].numpy(), lab, args.embedding, args.seed,
                              f"{data.name} class '{cname}': {args.model} layer {args.layer_idx} features, "
                              f"{args.embedding.upper()}, k={args.num_cluster}{' (norm)' if args.norm else ''}")
            figures.append(emb)
            log(f"embedding: {emb}")
        log(f"figures: {time.time() - t0:.1f}s")

    atomic_write_json(os.path.join(args.results_path, f"{stem}_config.json"), {
        "args": vars(args), "argv": argv, "device": device, "cluster_file": out_path, "extractor": ext_path,
        "extractor_sha256": info["sha256"], "extractor_test_acc": info["test_acc"], "fingerprint": data.fingerprint,
        "figures": figures, "sizes_summary": cl.size_summary(cinfo["sizes"]),
        "torch": str(torch.__version__), "wall_s": round(time.time() - t_start, 1)})
    log(f"done in {time.time() - t_start:.1f}s")
    return out_path


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    from dcbs.perf import tune_allocator
    tune_allocator()
    try:
        run(args, argv)
    except ex.TrainingInterrupted as e:
        print(f"interrupted: {e}", file=sys.stderr)
        return 130
    except (ConfigError, cl.ClusterConfigError, cl.ClusterFileError, ex.ExtractorError, DataError,
            FileFormatError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0

