"""The command line shared by main.py (DC/DSA/DM) and main_BS.py (Batch Sampling).

Both scripts call ``main(argv, default_sampler)`` with one parser; they differ only
in the default ``--sampler`` (class / cluster) handed to the one condensation loop.
"""
from __future__ import annotations

import logging
import os
import sys
import time

import numpy as np
import torch


from .clusters import ClusterFileError
from .condense import Condenser, Interrupted, NonFiniteError
from .cmdline import pick_device
from .config import ConfigError, build_parser, resolve, upgrade_config
from .data import DataError, load_data
from .evaluate import check_compile, check_synthetic_set, eval_settings_for, get_eval_pool
from .io import FileFormatError, file_sha256, safe_load
from .precision import check as check_precision
from .rundir import RunDir, RunDirError, git_revision, machine_info, setup_logging
from .samplers import SAMPLERS, SamplerError, method_label

log = logging.getLogger("dcbs")

# settings that may differ on --resume without changing the result
RESUME_FREE = {"device", "num_threads", "ckpt_every", "resume", "save_path", "explicit", "run_name"}
# eval_batch, ops and compile change results only by floating-point rounding, so they may change on resume too
RESUME_FREE |= {"eval_batch", "ops", "compile"}
ERRORS = (ConfigError, DataError, FileFormatError, RunDirError, NonFiniteError, Interrupted, ClusterFileError,
          SamplerError)
SCRIPTS = {"class": "main.py", "cluster": "main_BS.py"}   # the script whose default each sampler is


def label(cfg) -> str:
    return method_label(cfg.method, cfg.sampler)


def default_run_name(cfg) -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    tag = SAMPLERS[cfg.sampler].tag
    m = f"{tag}-{cfg.method}" if tag else cfg.method
    if cfg.sampler in ("cluster", "systematic"):
        m += f"_k{cfg.num_cluster}_l{cfg.layer_idx}{'_norm' if cfg.norm else ''}"
    elif cfg.sampler == "pruned":
        m += f"_f{cfg.prune_hard:g}"
    elif cfg.sampler == "representative":
        m += f"_{cfg.rep_embed}"
    return f"{m}_{cfg.dataset}_{cfg.model}_ipc{cfg.ipc}_{stamp}"


# --------------------------------------------------------------------------- #
# resume
# --------------------------------------------------------------------------- #
def resume_config(ns, default_sampler):
    """Saved configuration of --resume RUN_DIR, with the flags that may change applied."""
    run = RunDir.open_for_resume(ns.resume)
    saved = upgrade_config(run.read_config())
    script = SCRIPTS.get(default_sampler, "main.py")
    if saved.get("script", script) != script:
        raise ConfigError(f"--resume {ns.resume}: {saved['script']} (--sampler {saved['sampler']}) made this run; "
                          f"continue it with: python {saved['script']} --resume {ns.resume}")
    given = {k: v for k, v in vars(ns).items() if v is not None and k != "resume"}
    fresh = vars(resolve(ns.__class__(**{**{k: None for k in vars(ns)}, **given, "sampler":
                                         given.get("sampler", saved["sampler"])}), default_sampler))
    diffs = [f"--{k} {fresh[k]!r} (run has {saved.get(k)!r})" for k in given
             if k not in RESUME_FREE and k != "preset" and fresh.get(k) != saved.get(k)]
    if given.get("preset") and given["preset"] != saved.get("preset"):
        diffs.append(f"--preset {given['preset']!r} (run has {saved.get('preset')!r})")
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
def main(argv=None, default_sampler: str = "class") -> int:
    from .perf import tune_allocator
    tune_allocator()
    parser = build_parser(default_sampler)
    ns = parser.parse_args(argv)
    try:
        return _main(ns, default_sampler)
    except ERRORS as e:
        for h in logging.getLogger().handlers:  # keep the reason in the run's log.txt too
            if isinstance(h, logging.FileHandler):
                h.emit(logging.makeLogRecord({"msg": f"error: {e}", "levelno": logging.ERROR}))
        print(f"error: {e}", file=sys.stderr)
        return 130 if isinstance(e, Interrupted) else 2


def _main(ns, default_sampler) -> int:
    from types import SimpleNamespace
    script = SCRIPTS.get(default_sampler, "main.py")
    if ns.resume:
        run, cfgd = resume_config(ns, default_sampler)
        cfg = SimpleNamespace(**cfgd)
    else:
        cfg = resolve(ns, default_sampler)
        run = None
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    device = pick_device(cfg.device)
    try:
        precision_warning = check_precision(cfg.precision, device)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if cfg.compile:
        check_compile(device)  # fail now, not at the first evaluation hours in
    if cfg.load_syn:
        return evaluate_saved(cfg, device)

    data = load_data(cfg.dataset, cfg.data_path)
    if cfg.init == "real" and cfg.ipc > min(data.class_counts):
        raise ConfigError(f"--init real needs ipc <= the smallest class ({min(data.class_counts)} images); "
                          f"lower --ipc or use --init noise")
    make_sampler, cluster_info = SAMPLERS[cfg.sampler].setup(cfg, data)
    if cfg.sampler == "cluster" and cfg.cluster_file or cfg.sampler == "systematic":
        # the file's own k / layer / norm are the effective settings (systematic: k = --batch_real by default)
        cfg = SimpleNamespace(**{**vars(cfg), "num_cluster": cluster_info["cluster_k"],
                                 "layer_idx": cluster_info["cluster_layer"], "norm": cluster_info["cluster_norm"]})

    resume_state = None
    if run is None:
        run = RunDir.create(cfg.save_path, cfg.run_name, default_run_name(cfg))
        config = dict(vars(cfg))
        config.update(cluster_info)
        config.update({"script": script, "label": label(cfg), "argv": sys.argv, "git_revision": git_revision(),
                       "torch_version": str(torch.__version__), "device_used": str(device),
                       "machine": machine_info(), "num_threads_used": torch.get_num_threads(),
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
        if cluster_info.get("cluster_file_sha256") != config.get("cluster_file_sha256"):
            raise ConfigError(f"--resume {run.path}: the cluster file {cluster_info['cluster_file']} changed "
                              f"since the run started; restore it or start a new run")
        resume_state = run.load_checkpoint()
    setup_logging(run.file("log.txt"))
    log.info("%s %s on %s (%s), run directory %s", script, label(cfg), cfg.dataset, data.source, run.path)
    if precision_warning:
        log.warning(precision_warning)
    if resume_state is not None:
        here, started = machine_info(), config.get("machine")
        if started and started != here:
            log.warning("resuming on %s (started on %s): other vector units round fp32 differently, so from here "
                        "the run matches one left alone only approximately", _machine_str(here), _machine_str(started))
    if cfg.preset:
        log.info("preset %s: a REDUCED protocol (%d iterations, %d experiments x %d models, outer_loop %d, "
                 "inner_loop %d)", cfg.preset, cfg.Iteration, cfg.num_exp, cfg.num_eval, cfg.outer_loop, cfg.inner_loop)
    data.to(device)
    condenser = Condenser(cfg, data, make_sampler, run, device, label(cfg))
    t0 = time.time()
    final = condenser.run_all(config, resume_state)
    lines = [f"{label(cfg)} {cfg.dataset} {cfg.model} ipc {cfg.ipc}, iteration {cfg.Iteration}"
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


def _machine_str(m: dict) -> str:
    return m.get("gpu") or f"{m.get('cpu')} [{' '.join(m.get('cpu_flags') or []) or 'no avx2'}]"


def evaluate_saved(cfg, device) -> int:
    """--load_syn FILE: evaluate every synthetic set in FILE (ours or the reference's .pt)."""
    obj = safe_load(cfg.load_syn, "synthetic set")
    if not isinstance(obj, dict) or "data" not in obj or not obj["data"]:
        raise FileFormatError(f"synthetic set {cfg.load_syn} has no 'data' list of [images, labels] "
                              f"(expected a syn_exp*.pt or res_*.pt file)")
    dataset = obj.get("dataset", cfg.dataset)
    data = load_data(dataset, cfg.data_path)
    sets = []
    for i, pair in enumerate(obj["data"]):
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
        check_synthetic_set(x, y, data.num_classes, f"synthetic set {cfg.load_syn}, entry {i}")
        sets.append((x, y))
    cfg.dataset, cfg.ipc = dataset, int(obj.get("ipc", sets[0][1].numel() // data.num_classes))
    run = RunDir.create(cfg.save_path, cfg.run_name,
                        f"eval_{os.path.splitext(os.path.basename(cfg.load_syn))[0]}_{time.strftime('%Y%m%d-%H%M%S')}")
    setup_logging(run.file("log.txt"))
    run.write_config(dict(vars(cfg), git_revision=git_revision(), data_fingerprint=data.fingerprint,
                          torch_version=str(torch.__version__), machine=machine_info()))
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
