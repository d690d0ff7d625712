"""Command-line flags, their defaults per method, presets and validation.

One defaults block. The flags keep the public DC/DSA/DM code's names. Layering,
lowest first: protocol defaults < method defaults (DM has its own) < ``--preset``
< values given on the command line, which are always respected. The parsed
arguments are never mutated afterwards: ``resolve`` returns a new namespace and
derived values get their own names.
"""
from __future__ import annotations

import argparse
import math
import os
from types import SimpleNamespace

from networks import model_names
from .cmdline import ConfigError, Parser
from .data import DATASETS
from .matching import get_loops
from .fast_ops import OPS
from .precision import PRECISIONS

__all__ = ["build_parser", "resolve", "upgrade_config", "load_run_config", "ConfigError", "PRESETS", "METHOD_DEFAULTS",
           "default_eval_its"]


DEFAULTS = dict(
    method="DC", dataset="CIFAR10", model="ConvNet", ipc=1, eval_mode="S", num_exp=5, num_eval=20,
    epoch_eval_train=None, Iteration=1000, lr_img=0.1, lr_net=0.01, batch_real=256, batch_train=256,
    init="noise", dsa_strategy=None, data_path="data", save_path="results", dis_metric="ours",
    seed=0, device="auto", eval_it=None, eval_every=500, run_name=None, ckpt_every=50, num_threads=None,
    kernel="loop", ops="fast", resume=None, load_syn=None, eval_batch=None, compile=False, precision="fp32",
    outer_loop=None, inner_loop=None,
)
# real-batch samplers (dcbs.samplers): main.py defaults to "class", main_BS.py to "cluster"
SAMPLER_DEFAULTS = dict(
    sampler="class", layer_idx=3, num_cluster=20, norm=False, margin=50, cluster_model="ResNet18",
    cluster_path="checkpoints", cluster_file=None, cluster_weighting="uniform", mix=False, mix_after=300,
    rep_embed="features", rep_partitions=20, candidates=None, interval=10, prune_hard=0.2,
)
DEFAULTS.update(SAMPLER_DEFAULTS)
REP_CANDIDATES = 1024   # --rep_embed features: images per K-Means pool when --candidates is not given

METHOD_DEFAULTS = {
    "DC": {},
    "DSA": {},
    "DM": dict(lr_img=1.0, init="real", Iteration=20000, eval_every=2000),
}

PRESETS = {
    # the README's two-command demo: embedded digits, a few minutes on a CPU
    "demo": dict(dataset="digits", Iteration=20, num_exp=1, num_eval=3, eval_every=20, epoch_eval_train=150),
    # reduced protocol for CPU tries on real data: 200 iterations, 10 models at 0/100/200
    "cpu": dict(Iteration=200, num_exp=1, num_eval=10, eval_every=100),
    # the sampler study (results/samplers.md), pinned before any seed ran: ipc 1 and its ipc-10 follow-up
    "study": dict(Iteration=200, num_exp=1, num_eval=10, eval_it=[50, 100, 200]),
    "study10": dict(Iteration=100, num_exp=1, num_eval=10, eval_it=[25, 50, 100]),
    # smoke test: seconds at any ipc (one outer and one inner step per iteration)
    "smoke": dict(dataset="digits", Iteration=2, num_exp=1, num_eval=1, eval_every=1, epoch_eval_train=2,
                  outer_loop=1, inner_loop=1),
}


def build_parser(default_sampler: str = "class") -> argparse.ArgumentParser:
    """The parser of main.py and main_BS.py; they differ only in the default ``--sampler``."""
    from .samplers import SAMPLERS
    p = Parser(
        description=("Batch Sampling: DC/DSA whose real batches come from one feature cluster of the class"
                     if default_sampler == "cluster" else "Dataset condensation: DC, DSA, DM")
        + f" (default --sampler {default_sampler})", argument_default=None)
    a = p.add_argument
    a("--method", choices=["DC", "DSA", "DM"], help="condensation method (default DC)")
    a("--dataset", choices=list(DATASETS), help="dataset (default CIFAR10; 'digits' is embedded and offline)")
    a("--model", choices=model_names(), help="network used for condensation (default ConvNet)")
    a("--ipc", type=int, help="images per class (default 1)")
    a("--eval_mode", choices=["S", "SS", "M", "W", "D", "A", "P", "N"],
      help="S: the training model; M: ConvNet, MLP, LeNet, AlexNet, VGG11, ResNet18; W/D/A/P/N: ConvNet ablations")
    a("--num_exp", type=int, help="experiments, each a new synthetic set (default 5)")
    a("--num_eval", type=int, help="models trained per evaluation (default 20)")
    a("--eval_batch", type=int, help="evaluation models trained together with torch.func.vmap (default: all "
                                     "--num_eval at once on CUDA, one by one on the CPU, where vmap measured slower); "
                                     "models with BatchNorm are always trained one by one")
    a("--compile", action=argparse.BooleanOptionalAction, default=None,
      help="run the gradient-free forward passes through torch.compile: the evaluation's test pass (models "
           "trained one by one only, see --eval_batch) and DM's real-image embeddings (opt-in: seconds of "
           "compilation once per process and architecture; needs a C++ compiler on the CPU, triton on CUDA; same "
           "results up to rounding; --no-compile turns it off, e.g. on --resume)")
    a("--epoch_eval_train", type=int, help="evaluation epochs (default 300; 1000 when evaluation augments)")
    a("--Iteration", type=int, help="condensation iterations (default 1000; DM 20000)")
    a("--lr_img", type=float, help="learning rate of the synthetic images (default 0.1; DM 1.0)")
    a("--lr_net", type=float, help="learning rate of the networks (default 0.01)")
    a("--outer_loop", type=int, help="synthetic updates per iteration (default: DC's schedule for the ipc, "
                                     "1 at ipc 1, 10 at ipc 10, 50 at ipc 50)")
    a("--inner_loop", type=int, help="network epochs on the synthetic set between two of them (default: DC's "
                                     "schedule, 1 / 50 / 10)")
    a("--batch_real", type=int, help="real images per class per matching step (default 256)")
    a("--batch_train", type=int, help="batch size when training on the synthetic set (default 256)")
    a("--init", choices=["noise", "real"], help="synthetic initialisation (default noise; DM real)")
    a("--dsa_strategy", help="DSA transforms joined by '_' (default: the dataset's for DSA/DM, none for DC)")
    a("--data_path", help="torchvision root, or a folder with train/ and test/ class folders (default data)")
    a("--save_path", help="where run directories go (default results)")
    a("--dis_metric", choices=["ours", "mse", "cos"], help="gradient distance (default ours, eq. 1)")
    a("--seed", type=int, help="seed of every random source (default 0)")
    a("--device", help="auto (cuda when available), cpu, cuda or cuda:N (default auto)")
    a("--eval_it", type=int, nargs="+", help="iterations at which to evaluate (default every eval_every, and the last)")
    a("--eval_every", type=int, help="evaluation period when --eval_it is not given (default 500; DM 2000)")
    a("--run_name", help="run directory name under save_path (default method_dataset_model_ipcN_timestamp)")
    a("--preset", choices=list(PRESETS), help="reduced protocol: " + "; ".join(
        f"{k}: {', '.join(f'{kk}={vv}' for kk, vv in v.items())}" for k, v in PRESETS.items()))
    a("--ckpt_every", type=int, help="checkpoint every N iterations (default 50; also at every evaluation)")
    a("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last checkpoint")
    a("--num_threads", type=int, help="torch CPU threads (default: torch's choice)")
    a("--kernel", choices=["loop", "batched"],
      help="per-class gradients: loop (one class at a time, as the protocol reads; default) or batched "
           "(all classes in one vmapped pass; same result up to rounding)")
    a("--ops", choices=list(OPS),
      help="layers with a faster CPU equivalent (ConvNet's 2x2 average pooling, its first block as one matmul "
           "per sample, later blocks channels-last where no gradient is needed): fast (default) or plain "
           "(torch's modules, as the reference code; same result up to rounding)")
    a("--precision", choices=list(PRECISIONS),
      help="fp32 (default) or bf16: the real-data gradients and the inner loop's network updates of DC/DSA "
           "under bf16 autocast (the synthetic images, their gradient, the matching loss and evaluation stay "
           "fp32; opt-in: needs a CPU with avx512_bf16/AMX or a bf16 GPU, results differ from fp32 by more "
           "than rounding)")
    a("--load_syn", metavar="FILE", help="evaluate a saved synthetic set (.pt) instead of condensing")
    g = p.add_argument_group("real-batch sampler (dcbs/samplers.py)")
    a = g.add_argument
    a("--sampler", choices=list(SAMPLERS),
      help=f"where each class's real batch comes from (default {default_sampler}): "
      "class = random images of the class (DC); cluster = one random feature cluster (Batch Sampling); "
      "stratified = one image from each of batch_real K-Means clusters; representative = the image nearest "
      "each of batch_real K-Means centres (DREAM); pruned = the class without its hardest images; "
      "systematic = DC's odds per image, spread over the clusters in proportion to their sizes")
    a("--layer_idx", type=int, help="feature layer of the cluster / partition file (default 3)")
    a("--num_cluster", type=int, help="clusters per class, k, of --sampler cluster (default 20; stratified, "
                                      "systematic: --batch_real)")
    a("--norm", action="store_true", default=None, help="clusters from size-constrained K-Means")
    a("--margin", type=int, help="size margin of --norm clusters (default 50)")
    a("--cluster_model", choices=["ResNet18", "ResNet18BN", "ConvNet"], help="feature extractor (default ResNet18)")
    a("--cluster_path", help="folder of cluster, partition and score files (default checkpoints)")
    a("--cluster_file", help="explicit cluster, partition or score file (overrides the name built from the flags)")
    a("--cluster_weighting", choices=["uniform", "size"], help="cluster: how a cluster is picked (default uniform)")
    a("--mix", action="store_true", default=None, help="cluster: after --mix_after iterations draw class batches")
    a("--mix_after", type=int, help="iteration after which --mix switches to class batches (default 300)")
    a("--rep_embed", choices=["features", "net"], help="representative: K-Means on precomputed extractor features "
                                                       "(default) or on the matching network's embedding")
    a("--rep_partitions", type=int, help="representative, features: partitions per class in the file (default 20)")
    a("--candidates", type=int, help=f"representative: images clustered per class (default {REP_CANDIDATES} for "
                                     "features, the whole class for net)")
    a("--interval", type=int, help="representative, net: outer steps between two clusterings (default 10)")
    a("--prune_hard", type=float, help="pruned: fraction of each class dropped, hardest first (default 0.2)")
    return p


def default_eval_its(iterations: int, every: int) -> list[int]:
    its = list(range(0, iterations + 1, max(1, every)))
    if its[-1] != iterations:
        its.append(iterations)
    return its


def resolve(ns: argparse.Namespace, default_sampler: str = "class") -> SimpleNamespace:
    """Layers defaults, method defaults, preset and explicit flags; validates; returns a new namespace."""
    explicit = {k: v for k, v in vars(ns).items() if v is not None}
    method = explicit.get("method", DEFAULTS["method"])
    cfg = dict(DEFAULTS, sampler=default_sampler)
    cfg.update(METHOD_DEFAULTS[method])
    if explicit.get("preset"):
        cfg.update(PRESETS[explicit["preset"]])
    cfg.update(explicit)
    cfg["preset"] = explicit.get("preset")
    cfg["explicit"] = sorted(explicit)
    schedule = get_loops(cfg["ipc"]) if cfg["ipc"] >= 1 else (1, 1)
    cfg["outer_loop"] = schedule[0] if cfg["outer_loop"] is None else cfg["outer_loop"]
    cfg["inner_loop"] = schedule[1] if cfg["inner_loop"] is None else cfg["inner_loop"]
    if cfg["sampler"] == "representative" and cfg["rep_embed"] == "features" and cfg["candidates"] is None:
        cfg["candidates"] = REP_CANDIDATES
    spec = DATASETS.get(cfg["dataset"])
    if cfg["dsa_strategy"] is None:
        cfg["dsa_strategy"] = spec.dsa_strategy if method in ("DSA", "DM") else "none"
    elif method == "DC" and cfg["dsa_strategy"] not in ("none", "None", ""):
        raise ConfigError("--dsa_strategy applies to DSA and DM; use --method DSA, or drop --dsa_strategy")
    if method in ("DSA", "DM") and cfg["dsa_strategy"] in ("none", "None", ""):
        cfg["dsa_strategy"] = "none"
    if cfg["eval_it"] is None:
        cfg["eval_it"] = default_eval_its(cfg["Iteration"], cfg["eval_every"])
    cfg["eval_it"] = sorted(set(int(i) for i in cfg["eval_it"]))
    validate(cfg)
    return SimpleNamespace(**cfg)


def validate(cfg: dict) -> None:
    """Refuses values that cannot work, before any heavy work."""
    def need(cond, msg):
        if not cond:
            raise ConfigError(msg)
    need(cfg["ipc"] >= 1, f"--ipc must be at least 1 (got {cfg['ipc']})")
    for k in ("num_exp", "num_eval", "batch_real", "batch_train", "ckpt_every", "eval_batch"):
        need(cfg[k] is None and k == "eval_batch" or cfg[k] >= 1, f"--{k} must be at least 1 (got {cfg[k]})")
    need(cfg["Iteration"] >= 0, f"--Iteration must be >= 0 (got {cfg['Iteration']})")
    need(cfg["outer_loop"] >= 1 and cfg["inner_loop"] >= 0, "--outer_loop must be at least 1, --inner_loop at least 0")
    for k in ("lr_img", "lr_net"):
        need(math.isfinite(cfg[k]) and cfg[k] > 0, f"--{k} must be a positive finite number (got {cfg[k]})")
    if cfg["epoch_eval_train"] is not None:
        need(cfg["epoch_eval_train"] >= 1, f"--epoch_eval_train must be at least 1 (got {cfg['epoch_eval_train']}): "
                                           f"with 0 the result would be an untrained model's accuracy")
    neg = [i for i in cfg["eval_it"] if i < 0]
    need(not neg, f"--eval_it {neg}: iterations count from 0; give iterations in 0..{cfg['Iteration']}")
    bad = [i for i in cfg["eval_it"] if i > cfg["Iteration"]]
    need(not bad, f"--eval_it {bad} beyond --Iteration {cfg['Iteration']}: lower them or raise --Iteration")
    if cfg["method"] == "DM":
        need(cfg["dis_metric"] == "ours" or "dis_metric" not in cfg["explicit"],
             "--dis_metric does not apply to DM (it matches mean embeddings)")
        need(cfg["precision"] == "fp32", "--precision bf16 applies to DC/DSA gradient matching; DM runs in fp32: "
                                         "drop --precision")
    sampler = cfg["sampler"]
    need(cfg["num_cluster"] >= 1, f"--num_cluster must be at least 1 (got {cfg['num_cluster']})")
    need(cfg["margin"] >= 0, f"--margin must be >= 0 (got {cfg['margin']})")
    need(cfg["mix_after"] >= 0, f"--mix_after must be >= 0 (got {cfg['mix_after']})")
    need(cfg["rep_partitions"] >= 1 and cfg["interval"] >= 1, "--rep_partitions and --interval must be at least 1")
    need(cfg["candidates"] is None or cfg["candidates"] >= 1, "--candidates must be at least 1")
    need(0 <= cfg["prune_hard"] < 1, f"--prune_hard must be in [0, 1) (got {cfg['prune_hard']})")
    files = {"cluster_model", "cluster_path", "cluster_file"}
    owners = {"cluster": files | {"layer_idx", "num_cluster", "norm", "margin", "cluster_weighting", "mix",
                                  "mix_after"},
              "stratified": files | {"layer_idx", "num_cluster"},
              "representative": files | {"layer_idx", "rep_embed", "rep_partitions", "candidates", "interval"},
              "pruned": files | {"prune_hard"},
              "systematic": files | {"layer_idx", "num_cluster", "norm", "margin"}}
    stray = sorted(k for k in set().union(*owners.values()) - owners.get(sampler, set()) if k in cfg["explicit"])
    one = len(stray) == 1
    need(not stray, f"--{', --'.join(stray)} {'does' if one else 'do'} not apply to --sampler {sampler}: drop "
                    f"{'it' if one else 'them'}, or pick the sampler "
                    f"{'it belongs' if one else 'they belong'} to (see -h)")
    if "mix_after" in cfg["explicit"]:
        need(cfg["mix"], "--mix_after has no effect without --mix: add --mix or drop --mix_after")
    if cfg["mix"]:
        need(cfg["mix_after"] < cfg["Iteration"],
             f"--mix_after {cfg['mix_after']} >= --Iteration {cfg['Iteration']}: --mix would never switch")
    if cfg["run_name"] is not None:
        from .rundir import RunDirError, check_run_name
        try:
            check_run_name(cfg["run_name"])
        except RunDirError as e:
            raise ConfigError(str(e)) from None
    if cfg["device"] not in ("auto", "cpu") and not str(cfg["device"]).startswith("cuda"):
        raise ConfigError(f"--device must be auto, cpu, cuda or cuda:N (got {cfg['device']!r})")
    if cfg["resume"] is None and cfg["save_path"]:
        need(_writable(cfg["save_path"]), f"--save_path {cfg['save_path']} is not writable: choose another folder")


def _writable(path: str) -> bool:
    """Whether files can be created at ``path`` (or in its nearest existing parent), tried for real."""
    import tempfile
    p = os.path.abspath(path)
    while not os.path.exists(p):
        p = os.path.dirname(p)
    if not os.path.isdir(p):
        return False
    try:
        tempfile.TemporaryFile(dir=p).close()
        return True
    except OSError:
        return False


# settings saved under an older name: {old: new}
RENAMED = {"compile_test": "compile"}


def upgrade_config(saved: dict) -> dict:
    """A run's saved config.json in today's terms: resume, tables, plots and the sweep read runs through it.

    Runs made before the sampler registry carry ``batch_sampling`` (True: main_BS.py's
    cluster sampler); a setting absent from a saved run did not exist yet, so the run
    had its default.
    """
    cfg = dict(saved)
    for old, new in RENAMED.items():
        if old in cfg:
            cfg.setdefault(new, cfg.pop(old))
    if "outer_loop" not in cfg and "ipc" in cfg:   # runs before --outer_loop: DC's schedule
        cfg["outer_loop"], cfg["inner_loop"] = get_loops(cfg["ipc"])
    if "batch_sampling" in cfg:
        cfg.setdefault("sampler", "cluster" if cfg.pop("batch_sampling") else "class")
    method = cfg.get("method", DEFAULTS["method"])
    layered = {**DEFAULTS, **METHOD_DEFAULTS.get(method, {}), **PRESETS.get(cfg.get("preset") or "", {})}
    for k, v in layered.items():
        cfg.setdefault(k, v)
    return cfg


def load_run_config(run_dir: str) -> dict | None:
    """``run_dir/config.json`` upgraded to today's settings (``upgrade_config``); None when unreadable."""
    import json
    try:
        with open(os.path.join(run_dir, "config.json"), encoding="utf-8") as f:
            return upgrade_config(json.load(f))
    except (OSError, json.JSONDecodeError):
        return None
