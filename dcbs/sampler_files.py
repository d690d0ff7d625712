"""Finding and checking the file a sampler reads: cluster, partition or score file.

Each ``*_source(cfg, data)`` resolves the file name that ``main_cluster.py`` writes
for the same flags (or ``--cluster_file``), refuses a missing or mismatched file with
the command that makes the right one, and returns the content and the
``info`` recorded in the run's config.json (path and sha256, so resume can refuse a
file that changed).
"""
from __future__ import annotations

import os

from .clusters import ClusterFileError, cluster_command, cluster_file_name, load_clusters
from .io import file_sha256
from .selection import (load_partitions, load_scores, partition_file_name, score_file_name,
                        selection_command)

__all__ = ["cluster_source", "partition_source", "score_source"]


def _cluster_path_flag(cfg):
    return None if cfg.cluster_path == "checkpoints" else cfg.cluster_path


def _file_info(path: str) -> dict:
    return {"cluster_file": os.path.abspath(path), "cluster_file_sha256": file_sha256(path)}


def _missing(what: str, path: str, cmd: str, explicit: bool):
    if explicit:
        cmd += " (then pass the file it writes to --cluster_file, or drop --cluster_file)"
    raise ClusterFileError(f"{what} {path} not found; make it with: {cmd}")


def cluster_source(cfg, data, k: int, norm: bool, found_k: int | None = None):
    """A per-class cluster file with ``k`` clusters (``found_k``: the k the flags name, if they differ)."""
    cmd = cluster_command(cfg.dataset, cfg.data_path, k, cfg.layer_idx, norm, model=cfg.cluster_model,
                          margin=cfg.margin, cluster_path=_cluster_path_flag(cfg))
    if cfg.cluster_file:
        path = cfg.cluster_file
        keys = {"num_cluster": "k", "layer_idx": "layer_idx", "norm": "norm", "cluster_model": "model",
                "margin": "margin"}
        expect = {v: getattr(cfg, key) for key, v in keys.items() if key in cfg.explicit}
    else:
        path = os.path.join(cfg.cluster_path, cluster_file_name(cfg.dataset, found_k or k, cfg.layer_idx, norm,
                                                                model=cfg.cluster_model, margin=cfg.margin))
        expect = {"k": found_k or k, "layer_idx": cfg.layer_idx, "norm": norm, "model": cfg.cluster_model,
                  "margin": cfg.margin}
    expect["dataset"] = cfg.dataset
    if not os.path.isfile(path):
        _missing("cluster file", path, cmd, bool(cfg.cluster_file))
    clusters, meta = load_clusters(path, data, expect=expect, fix_command=cmd)
    if found_k is not None and (int(meta["k"]) != k or bool(meta["norm"]) != norm):
        raise ClusterFileError(f"--sampler {cfg.sampler} needs plain K-Means clusters with k = --batch_real "
                               f"{k}, but {path} has k = {meta['k']}{' (--norm)' if meta['norm'] else ''}; "
                               f"make the right file with: {cmd}")
    info = {**_file_info(path), "cluster_k": meta.get("k"), "cluster_layer": meta.get("layer_idx"),
            "cluster_norm": meta.get("norm")}
    return clusters, info


def partition_source(cfg, data):
    """The representative sampler's partition file for k = --batch_real."""
    k = cfg.batch_real
    cmd = selection_command("representative", cfg.dataset, cfg.data_path, cfg.cluster_model,
                            _cluster_path_flag(cfg), k=k, layer_idx=cfg.layer_idx, partitions=cfg.rep_partitions,
                            candidates=cfg.candidates)
    path = cfg.cluster_file or os.path.join(cfg.cluster_path, partition_file_name(
        cfg.dataset, k, cfg.layer_idx, cfg.rep_partitions, cfg.candidates, cfg.cluster_model))
    if not os.path.isfile(path):
        _missing("partition file", path, cmd, bool(cfg.cluster_file))
    expect = {"k": k, "layer_idx": cfg.layer_idx, "model": cfg.cluster_model}
    if not cfg.cluster_file:
        expect.update(partitions=cfg.rep_partitions, candidates=cfg.candidates)
    reps, meta = load_partitions(path, data, expect=expect, fix_command=cmd)
    return reps, {**_file_info(path), "rep_partitions_found": int(meta["partitions"])}


def score_source(cfg, data):
    """The pruned sampler's hardness scores."""
    cmd = selection_command("pruned", cfg.dataset, cfg.data_path, cfg.cluster_model, _cluster_path_flag(cfg))
    path = cfg.cluster_file or os.path.join(cfg.cluster_path, score_file_name(cfg.dataset, cfg.cluster_model))
    if not os.path.isfile(path):
        _missing("score file", path, cmd, bool(cfg.cluster_file))
    scores, _ = load_scores(path, data, expect={"model": cfg.cluster_model}, fix_command=cmd)
    return scores, _file_info(path)
