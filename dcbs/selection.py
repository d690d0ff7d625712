"""Files that choose real images for the class-spreading samplers: partitions and hardness scores.

* A **partition file** (``representative`` sampler, DREAM's rule on fixed features):
  per class, ``R`` partitions, each K-Means of a fresh random pool of
  ``candidates`` images of the class into ``k`` clusters; what is stored is the
  training index of the member nearest each cluster centre, a ``[R, k]`` LongTensor
  per class. ``main_cluster.py --representative`` writes it.
* A **score file** (``pruned`` sampler): the cross-entropy of the trained extractor
  (eval mode, no augmentation) on every training image, in training-set order.
  ``main_cluster.py --scores`` writes it.

Both carry the data fingerprint and the extractor's sha256, load with
``weights_only=True`` and are refused on other data, like cluster files.
"""
from __future__ import annotations

import math
import os
import shlex

import numpy as np
import torch
import torch.nn.functional as F

from .clusters import DEFAULT_MODEL, ClusterFileError, _plain, default_extractor_stem
from .io import FileFormatError, atomic_save, safe_load
from .seeding import derive_seed

__all__ = ["PARTITION_FORMAT", "SCORE_FORMAT", "REP_KMEANS_ITER", "partition_file_name", "score_file_name",
           "selection_command", "nearest_to_centres", "make_partitions", "save_partitions", "load_partitions",
           "compute_scores", "save_scores", "load_scores", "keep_easy"]

PARTITION_FORMAT = "dcbs.partitions/1"
SCORE_FORMAT = "dcbs.scores/1"
REP_KMEANS_ITER = 50    # a pool of ~4 images per cluster converges in a few dozen Lloyd steps


def _suffix(model: str, dataset: str, extractor: str | None) -> str:
    s = f"_{model}" if model != DEFAULT_MODEL else ""
    if extractor:
        stem = os.path.splitext(os.path.basename(extractor))[0]
        if stem != default_extractor_stem(model, dataset):
            s += f"_{stem}"
    return s


def partition_file_name(dataset: str, k: int, layer_idx: int, partitions: int, candidates: int,
                        model: str = DEFAULT_MODEL, extractor: str | None = None) -> str:
    return (f"rep_idx_{dataset.lower()}_k{int(k)}_{int(layer_idx)}_R{int(partitions)}_c{int(candidates)}"
            f"{_suffix(model, dataset, extractor)}.pt")


def score_file_name(dataset: str, model: str = DEFAULT_MODEL, extractor: str | None = None) -> str:
    return f"scores_{dataset.lower()}{_suffix(model, dataset, extractor)}.pt"


def selection_command(kind: str, dataset: str, data_path: str | None, model: str = DEFAULT_MODEL,
                      cluster_path: str | None = None, k: int | None = None, layer_idx: int | None = None,
                      partitions: int | None = None, candidates: int | None = None) -> str:
    """The main_cluster.py command that writes the partition (kind 'representative') or score file."""
    parts = ["python", "main_cluster.py", "--dataset", dataset]
    if data_path:
        parts += ["--data_path", data_path]
    if model != DEFAULT_MODEL:
        parts += ["--model", model]
    if kind == "representative":
        parts += ["--layer_idx", str(layer_idx), "--num_cluster", str(k), "--representative",
                  "--rep_partitions", str(partitions), "--candidates", str(candidates)]
    else:
        parts.append("--scores")
    if cluster_path:
        parts += ["--cluster_path", cluster_path]
    return shlex.join(parts)


# --------------------------------------------------------------------------- #
# representatives
# --------------------------------------------------------------------------- #
def nearest_to_centres(x: np.ndarray, k: int, seed: int, max_iter: int = REP_KMEANS_ITER) -> np.ndarray:
    """Row positions of the member of each K-Means cluster nearest its centre (k distinct rows)."""
    from sklearn.cluster import KMeans
    x = np.ascontiguousarray(x, dtype=np.float32)
    if len(x) < k:
        raise ValueError(f"{len(x)} points cannot fill {k} clusters")
    km = KMeans(n_clusters=k, n_init=1, max_iter=max_iter, random_state=int(seed) % (2 ** 32)).fit(x)
    d = ((x - km.cluster_centers_[km.labels_]) ** 2).sum(1)
    out = np.empty(k, dtype=np.int64)
    for j in range(k):
        members = np.flatnonzero(km.labels_ == j)
        if members.size == 0:   # sklearn relocates empty clusters, so this only guards odd inputs
            raise ValueError(f"K-Means left cluster {j} of {k} empty (too few distinct points)")
        out[j] = members[np.argmin(d[members])]
    return out


def make_partitions(features, indices_class, k: int, partitions: int, candidates: int, seed: int,
                    progress: bool = True):
    """Per class a [partitions, k] LongTensor of training indices (see the module docstring)."""
    feats = features.numpy() if isinstance(features, torch.Tensor) else np.asarray(features)
    out = []
    classes = range(len(indices_class))
    if progress:
        from tqdm import tqdm
        classes = tqdm(classes, desc=f"representatives k={k}", unit="class")
    for c in classes:
        ix = torch.as_tensor(indices_class[c], dtype=torch.long).sort().values
        rows = []
        for r in range(partitions):
            g = torch.Generator().manual_seed(derive_seed(seed, "rep_pool", c, r))
            pool = ix[torch.randperm(len(ix), generator=g)[:candidates]]
            rows.append(pool[nearest_to_centres(feats[pool.numpy()], k, derive_seed(seed, "rep_kmeans", c, r))])
        out.append(torch.stack(rows))
    return out


def save_partitions(path: str, reps, meta: dict) -> None:
    atomic_save({"representatives": [r.to(torch.long).contiguous() for r in reps],
                 "meta": _plain({"format": PARTITION_FORMAT, **meta})}, path)


def _load(path: str, what: str, fmt: str, data, expect: dict, fix_command: str | None):
    def fail(msg):
        raise ClusterFileError(msg + (f". Make the right file with: {fix_command}" if fix_command else ""))
    try:
        obj = safe_load(path, what=what, weights_only=True)
    except FileFormatError as e:
        fail(str(e))
    if not isinstance(obj, dict) or not isinstance(obj.get("meta"), dict) or obj["meta"].get("format") != fmt:
        fail(f"{path} is not a {what} (format {fmt})")
    meta = obj["meta"]
    diffs = [f"{k}: file {meta.get(k)!r}, wanted {v!r}" for k, v in expect.items() if meta.get(k) != v]
    if diffs:
        fail(f"{what} {path} was made with other settings ({'; '.join(diffs)})")
    if data is not None and meta.get("fingerprint") != data.fingerprint:
        fail(f"{what} {path} was made on other data (fingerprint {str(meta.get('fingerprint'))[:16]}... vs "
             f"{data.fingerprint[:16]}...); its indices would point at other images")
    return obj, meta, fail


def load_partitions(path: str, data=None, expect: dict | None = None, fix_command: str | None = None):
    """Returns (per-class [R, k] index tensors, meta); each row must be k distinct images of its class."""
    obj, meta, fail = _load(path, "partition file", PARTITION_FORMAT, data, expect or {}, fix_command)
    reps = obj.get("representatives")
    k = int(meta["k"])
    if not isinstance(reps, list) or (data is not None and len(reps) != data.num_classes):
        fail(f"partition file {path} does not hold one entry per class")
    for c, r in enumerate(reps):
        if not (torch.is_tensor(r) and r.dtype == torch.long and r.dim() == 2 and r.shape[1] == k and len(r)):
            fail(f"partition file {path}: class {c} is not a [partitions, {k}] int64 tensor")
        if any(len(set(row.tolist())) != k for row in r):
            fail(f"partition file {path}: class {c} repeats an image within a partition")
        if data is not None and not bool(torch.isin(r, data.indices_class[c].cpu()).all()):
            fail(f"partition file {path}: class {c} names images of other classes")
    return reps, meta


# --------------------------------------------------------------------------- #
# hardness scores
# --------------------------------------------------------------------------- #
@torch.no_grad()
def compute_scores(net, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 500, device="cpu",
                   progress: bool = True) -> torch.Tensor:
    """Per-image cross-entropy of ``net`` (eval mode, no augmentation), float32 on the CPU."""
    from tqdm import tqdm
    was_training = net.training
    net.eval()
    out = []
    for i in tqdm(range(0, len(images), batch_size), desc="scores", unit="batch", disable=not progress):
        logits = net(images[i:i + batch_size].to(device))
        logits = logits[0] if isinstance(logits, tuple) else logits
        out.append(F.cross_entropy(logits.float(), labels[i:i + batch_size].to(device), reduction="none").cpu())
    net.train(was_training)
    return torch.cat(out)


def save_scores(path: str, scores: torch.Tensor, meta: dict) -> None:
    atomic_save({"scores": scores.float().contiguous(), "meta": _plain({"format": SCORE_FORMAT, **meta})}, path)


def load_scores(path: str, data=None, expect: dict | None = None, fix_command: str | None = None):
    obj, meta, fail = _load(path, "score file", SCORE_FORMAT, data, expect or {}, fix_command)
    s = obj.get("scores")
    if not (torch.is_tensor(s) and s.dim() == 1 and s.is_floating_point()):
        fail(f"score file {path}: 'scores' is not a 1-D float tensor")
    if data is not None and len(s) != len(data.labels_train):
        fail(f"score file {path} holds {len(s)} scores, the training set has {len(data.labels_train)} images")
    if not bool(torch.isfinite(s).all()):
        fail(f"score file {path} holds non-finite scores")
    return s, meta


def keep_easy(indices: torch.Tensor, scores: torch.Tensor, fraction: float) -> torch.Tensor:
    """``indices`` without its ``ceil(fraction * n)`` highest-scoring (hardest) members, ascending.

    Ties are broken by index: of two equal scores the lower index counts as harder.
    """
    ix = torch.as_tensor(indices, dtype=torch.long).sort().values
    drop = math.ceil(fraction * len(ix) - 1e-9)
    # stable sort of ascending indices by descending score: equal scores keep the lower index first
    order = torch.sort(-scores[ix].double(), stable=True).indices
    return ix[order[drop:]].sort().values
