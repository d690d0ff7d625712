"""The command line shared by main.py (DC/DSA/DM) and main_BS.py (Batch Sampling).

Both scripts call ``main(argv, batch_sampling)``; the only difference is the
real-batch sampler handed to the one condensation loop.
"""
from __future__ import annotations

import logging
import os
import sys
import time

import numpy as np
import torch

from networks import set_ops

from .clusters import ClusterFileError
from .condense import Condenser, Interrupted, NonFiniteError
from .config import BS_DEFAULTS, DEFAULTS, ConfigError, build_parser, resolve
from .data import DataError, load_data
from .evaluate import check_compile, eval_settings_for, get_eval_pool
from .io import FileFormatError, file_sha256, safe_load
from .precision import check as check_precision
from .rundir import RunDir, RunDirError, git_revision, setup_logging
from .samplers import ClassSampler, ClusterSampler
from .seeding import derive_seed

log = logging.getLogger("dcbs")

# settings that may differ on --resume without changing the result
RESUME_FREE = {"device", "num_threads", "ckpt_every", "resume", "save_path", "explicit", "run_name"}
# eval_batch, ops and compile change results only by floating-point rounding, so they may change on resume too
RESUME_FREE |= {"eval_batch", "ops", "compile"}
# settings saved under an older name: {old: new}
RENAMED = {"compile_test": "compile"}
ERRORS = (ConfigError, DataError, FileFormatError, RunDirError, NonFiniteError, Interrupted, ClusterFileError)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {name} requested but CUDA is not available; use --device cpu")
    return torch.device(name)


def method_label(cfg) -> str:
    return f"BS({cfg.method})" if cfg.batch_sampling else cfg.method


def default_run_name(cfg) -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    if cfg.batch_sampling:
        m = f"BS-{cfg.method}_k{cfg.num_cluster}_l{cfg.layer_idx}{'_norm' if cfg.norm else ''}"
    else:
        m = cfg.method
    return f"{m}_{cfg.dataset}_{cfg.model}_ipc{cfg.ipc}_{stamp}"


# --------------------------------------------------------------------------- #
# samplers
# --------------------------------------------------------------------------- #
def cluster_source(cfg, data):
    """Loads and validates the cluster file for Batch Sampling; returns (clusters, info for config)."""
    from .clusters import cluster_command, cluster_file_name, load_clusters
    cmd = cluster_command(cfg.dataset, cfg.data_path, cfg.num_cluster, cfg.layer_idx, cfg.norm,
                          model=cfg.cluster_model, margin=cfg.margin,
                          cluster_path=None if cfg.cluster_path == "checkpoints" else cfg.cluster_path)
    if cfg.cluster_file:
        path = cfg.cluster_file
        keys = {"num_cluster": "k", "layer_idx": "layer_idx", "norm": "norm", "cluster_model": "model",
                "margin": "margin"}
        expect = {v: getattr(cfg, k) for k, v in keys.items() if k in cfg.explicit}
    else:
        path = os.path.join(cfg.cluster_path, cluster_file_name(cfg.dataset, cfg.num_cluster, cfg.layer_idx,
                                                                cfg.norm, model=cfg.cluster_model, margin=cfg.margin))
        expect = {"k": cfg.num_cluster, "layer_idx": cfg.layer_idx, "norm": cfg.norm, "model": cfg.cluster_model,
                  "margin": cfg.margin}
    expect["dataset"] = cfg.dataset
    if cfg.cluster_file:
        cmd += " (then pass the file it writes to --cluster_file, or drop --cluster_file)"
    if not os.path.isfile(path):
        raise ClusterFileError(f"cluster file {path} not found; make it with: {cmd}")
    clusters, meta = load_clusters(path, data, expect=expect, fix_command=cmd)
    info = {"cluster_file": os.path.abspath(path), "cluster_file_sha256": file_sha256(path),
            "cluster_k": meta.get("k"), "cluster_layer": meta.get("layer_idx"), "cluster_norm": meta.get("norm")}
    return clusters, info


# --------------------------------------------------------------------------- #
# resume
# --------------------------------------------------------------------------- #
def resume_config(ns, batch_sampling):
    """Saved configuration of --resume RUN_DIR, with the flags that may change applied."""
    run = RunDir.open_for_resume(ns.resume)
    saved = run.read_config()
    for old, new in RENAMED.items():
        if old in saved:
            saved.setdefault(new, saved.pop(old))
    given = {k: v for k, v in vars(ns).items() if v is not None and k != "resume"}
    fresh = vars(resolve(ns.__class__(**{**{k: None for k in vars(ns)}, **given}), batch_sampling))
    # a setting absent from the saved run did not exist yet: the run had its default
    defaults = {**DEFAULTS, **BS_DEFAULTS}
    before = lambda k: saved.get(k, defaults.get(k))
    diffs = [f"--{k} {fresh[k]!r} (run has {before(k)!r})" for k in given
             if k not in RESUME_FREE and k != "preset" and fresh.get(k) != before(k)]
    if given.get("preset") and given["preset"] != saved.get("preset"):
        diffs.append(f"--preset {given['preset']!r} (run has {saved.get('preset')!r})")
    if saved.get("batch_sampling") != batch_sampling:
        diffs.append("script: " + ("main_BS.py" if saved.get("batch_sampling") else "main.py") + " made this run")
    if diffs:
        raise ConfigError(f"--resume {ns.resume}: these settings differ from the run and would change its result: "
                          + "; ".join(diffs) + ". Drop them, or start a new run.")
    cfg = dict(saved)
    for k in RESUME_FREE & set(given):
        cfg[k] = given[k]
        if k == "device" and given[k] != saved.get("device_used"):
            log.warning("resuming on device %s (was %s): results are no longer bit-for-bit those of an "
                        "uninterrupted run", given[k], saved.get("device_used"))
    cfg["resume"] = ns.resume
    return run, cfg


# --------------------------------------------------------------------------- #
# main
# --------------------------------------------------------------------------- #
def main(argv=None, batch_sampling: bool = False) -> int:
    from .perf import tune_allocator
    tune_allocator()
    parser = build_parser(batch_sampling)
    ns = parser.parse_args(argv)
    try:
        return _main(ns, batch_sampling)
    except ERRORS as e:
        for h in logging.getLogger().handlers:  # keep the reason in the run's log.txt too
            if isinstance(h, logging.FileHandler):
                h.emit(logging.makeLogRecord({"msg": f"error: {e}", "levelno": logging.ERROR}))
        print(f"error: {e}", file=sys.stderr)
        return 130 if isinstance(e, Interrupted) else 2


def _main(ns, batch_sampling) -> int:
    from types import SimpleNamespace
    script = "main_BS.py" if batch_sampling else "main.py"
    if ns.resume:
        run, cfgd = resume_config(ns, batch_sampling)
        cfg = SimpleNamespace(**cfgd)
    else:
        cfg = resolve(ns, batch_sampling)
        run = None
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    set_ops(getattr(cfg, "ops", "fast"))  # runs saved before --ops existed resume with the default
    device = pick_device(cfg.device)
    try:
        precision_warning = check_precision(getattr(cfg, "precision", "fp32"), device)   # absent in older runs
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if getattr(cfg, "compile", False):
        check_compile(device)  # fail now, not at the first evaluation hours in
    if getattr(cfg, "load_syn", None):
        return evaluate_saved(cfg, device)

    data = load_data(cfg.dataset, cfg.data_path)
    if cfg.init == "real" and cfg.ipc > min(data.class_counts):
        raise ConfigError(f"--init real needs ipc <= the smallest class ({min(data.class_counts)} images); "
                          f"lower --ipc or use --init noise")
    cluster_info, make_sampler = {}, None
    if batch_sampling:
        clusters, cluster_info = cluster_source(cfg, data)
        if cfg.cluster_file:  # the file's own k / layer / norm are the effective settings
            cfg = SimpleNamespace(**{**vars(cfg), "num_cluster": cluster_info["cluster_k"],
                                     "layer_idx": cluster_info["cluster_layer"], "norm": cluster_info["cluster_norm"]})
        mix_after = cfg.mix_after if cfg.mix else None
        make_sampler = lambda exp: ClusterSampler(clusters, derive_seed(cfg.seed, "sampler", exp),
                                                  cfg.cluster_weighting, mix_after)
    else:
        make_sampler = lambda exp: ClassSampler(data.indices_class, derive_seed(cfg.seed, "sampler", exp))

    resume_state = None
    if run is None:
        run = RunDir.create(cfg.save_path, cfg.run_name, default_run_name(cfg))
        config = dict(vars(cfg))
        config.update(cluster_info)
        config.update({"script": script, "label": method_label(cfg), "argv": sys.argv, "git_revision": git_revision(),
                       "torch_version": str(torch.__version__), "device_used": str(device),
                       "num_threads_used": torch.get_num_threads(),
                       "data_source": data.source, "data_fingerprint": data.fingerprint,
                       "train_size": int(data.labels_train.numel()), "class_counts": data.class_counts,
                       "mean": data.mean, "std": data.std, "run_dir": run.path,
                       "eval_epochs": {a: eval_settings_for(a, cfg.dataset, cfg.model, cfg.ipc, cfg.dsa_strategy,
                                                            cfg.lr_net, cfg.batch_train, cfg.epoch_eval_train).epochs
                                       for a in get_eval_pool(cfg.eval_mode, cfg.model)}})
        run.write_config(config)
    else:
        config = run.read_config()
        if data.fingerprint != config.get("data_fingerprint"):
            raise ConfigError(f"--resume {run.path}: the dataset differs from the run's "
                              f"({data.source} vs {config.get('data_source')}); point --data_path at the same data")
        if cluster_info and cluster_info["cluster_file_sha256"] != config.get("cluster_file_sha256"):
            raise ConfigError(f"--resume {run.path}: the cluster file {cluster_info['cluster_file']} changed "
                              f"since the run started; restore it or start a new run")
        resume_state = run.load_checkpoint()
    setup_logging(run.file("log.txt"))
    log.info("%s %s on %s (%s), run directory %s", script, method_label(cfg), cfg.dataset, data.source, run.path)
    if precision_warning:
        log.warning(precision_warning)
    if cfg.preset:
        log.info("preset %s: a REDUCED protocol (%d iterations, %d experiments x %d models)", cfg.preset,
                 cfg.Iteration, cfg.num_exp, cfg.num_eval)
    data.to(device)
    condenser = Condenser(cfg, data, make_sampler, run, device, method_label(cfg))
    t0 = time.time()
    final = condenser.run_all(config, resume_state)
    lines = [f"{method_label(cfg)} {cfg.dataset} {cfg.model} ipc {cfg.ipc}, iteration {cfg.Iteration}"
             + (f" (preset {cfg.preset}: reduced protocol)" if cfg.preset else "")]
    for arch, accs in final.items():
        lines.append(f"{arch}: {100 * np.mean(accs):.2f} ± {100 * np.std(accs):.2f} over {len(accs)} models")
    log.info("finished in %.1f s", time.time() - t0)
    for line in lines:
        log.info(line)
    run.mark_done("\n".join(lines))
    if os.path.exists(run.file("checkpoint.pt")):
        os.replace(run.file("checkpoint.pt"), run.file("checkpoint_final.pt"))
    print(lines[-1] if len(lines) == 2 else "\n".join(lines[1:]))
    return 0


def evaluate_saved(cfg, device) -> int:
    """--load_syn FILE: evaluate every synthetic set in FILE (ours or the reference's .pt)."""
    obj = safe_load(cfg.load_syn, "synthetic set")
    if not isinstance(obj, dict) or "data" not in obj or not obj["data"]:
        raise FileFormatError(f"synthetic set {cfg.load_syn} has no 'data' list of [images, labels] "
                              f"(expected a syn_exp*.pt or res_*.pt file)")
    dataset = obj.get("dataset", cfg.dataset)
    data = load_data(dataset, cfg.data_path)
    sets = []
    for pair in obj["data"]:
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and torch.is_tensor(pair[0])):
            raise FileFormatError(f"synthetic set {cfg.load_syn}: entries of 'data' must be [images, labels]")
        x, y = pair[0].float(), pair[1].long()
        if x.shape[1:] != (data.channel, *data.im_size):
            raise FileFormatError(f"synthetic set {cfg.load_syn}: images of shape {tuple(x.shape[1:])} do not fit "
                                  f"{dataset} ({data.channel}x{data.im_size[0]}x{data.im_size[1]}); pass --dataset")
        if obj.get("normalized", True) is False:
            m = torch.tensor(data.mean).view(1, -1, 1, 1)
            s = torch.tensor(data.std).view(1, -1, 1, 1)
            x = (x - m) / s
        sets.append((x, y))
    cfg.dataset, cfg.ipc = dataset, int(obj.get("ipc", sets[0][1].numel() // data.num_classes))
    run = RunDir.create(cfg.save_path, cfg.run_name,
                        f"eval_{os.path.splitext(os.path.basename(cfg.load_syn))[0]}_{time.strftime('%Y%m%d-%H%M%S')}")
    setup_logging(run.file("log.txt"))
    run.write_config(dict(vars(cfg), git_revision=git_revision(), data_fingerprint=data.fingerprint,
                          torch_version=str(torch.__version__)))
    data.to(device)
    ev = Condenser(cfg, data, None, run, device, f"eval {os.path.basename(cfg.load_syn)}")
    acc = {}
    for e, (x, y) in enumerate(sets):
        acc[str(e)] = {"loaded": ev.evaluate(x.to(device), y.to(device), e, "loaded")}
    run.write_accuracies(acc)
    lines = []
    for arch in get_eval_pool(cfg.eval_mode, cfg.model):
        accs = [a for e in acc.values() for a in e["loaded"][arch]]
        lines.append(f"{arch}: {100 * np.mean(accs):.2f} ± {100 * np.std(accs):.2f} over {len(accs)} models")
    run.mark_done("\n".join(lines))
    print("\n".join(lines))
    return 0
