"""Per-class clusters of the training set: K-Means on extractor features, the cluster file.

Section 3.1 / 3.4.1 of the paper: every training image of a class is mapped
to a feature vector (a global-average-pooled stage output of a trained
extractor) and the class is split into ``k`` clusters, with ``KMeans`` or, with
``norm``, with ``KMeansConstrained`` whose cluster sizes stay within
``n_c // k +- margin``. ``main_BS.py`` then draws each real batch from one
cluster. A class too small for the margin (``n_c // k - margin < 1``) gets the
largest margin that fits it (``fitted_size_bounds``); the file keeps the
requested margin in its name and ``meta['margin']``, the bounds used per class
in ``meta['size_bounds']``.

The cluster file (``cluster_file_name``) holds::

    {'clusters': [[LongTensor (ascending training-set indices), ... k] per class],
     'meta': {...}}

with only tensors and Python scalars / strings / lists / dicts inside, so it
loads with ``torch.load(..., weights_only=True)``. ``meta['fingerprint']`` is
the data fingerprint (``dcbs.data.data_fingerprint``) of the training set the
indices refer to; ``load_clusters`` refuses the file on any other copy or
ordering of the dataset.
"""
from __future__ import annotations

import os
import shlex

import numpy as np
import torch

from dcbs.cmdline import ConfigError
from dcbs.io import FileFormatError, atomic_save, safe_load
from dcbs.seeding import derive_seed

__all__ = ["ClusterFileError", "ClusterConfigError", "FORMAT", "DEFAULT_MODEL", "DEFAULT_MARGIN",
           "cluster_file_name", "cluster_command", "size_bounds", "fitted_size_bounds", "margin_notes",
           "check_feasible",
           "cluster_features", "cluster_dataset", "save_clusters", "load_clusters",
           "check_partition", "size_summary", "save_cluster_grid", "embed_2d", "save_embedding"]

FORMAT = "dcbs.clusters/1"
DEFAULT_MODEL = "ResNet18"
DEFAULT_MARGIN = 50          # the paper's KMeansConstrained bounds: n_c // k +- 50
KMEANS_N_INIT = 5
KMEANS_MAX_ITER = 300

# keys every meta must have (load_clusters checks them)
REQUIRED_META = ("format", "dataset", "source", "num_train", "class_counts", "fingerprint", "model",
                 "layer_idx", "k", "norm", "margin", "seed", "sizes", "centers", "inertia",
                 "extractor_name", "extractor_sha256", "extractor_test_acc")
EXPECT_KEYS = ("k", "layer_idx", "norm", "model", "margin", "dataset")


class ClusterFileError(RuntimeError):
    """A cluster file is missing, unreadable, or does not belong to this data / these settings."""


class ClusterConfigError(ConfigError):
    """Clustering settings that cannot work (k too large, size bounds that cannot be met)."""


# --------------------------------------------------------------------------- #
# names and commands
# --------------------------------------------------------------------------- #
def default_extractor_stem(model: str, dataset: str) -> str:
    """Stem of the extractor checkpoint main_cluster.py trains: ``<model>_<dataset>``."""
    return f"{model}_{dataset}"


def cluster_file_name(dataset: str, k: int, layer_idx: int, norm: bool, model: str = DEFAULT_MODEL,
                      margin: int = DEFAULT_MARGIN, extractor: str | None = None) -> str:
    """The paper's ``class_idx_<dataset>_k<k>_<layer>_<True|False>.pt``, with suffixes for non-defaults.

    Suffixes (in this order, before ``.pt``): ``_<model>`` when the model is not
    ResNet18; ``_m<margin>`` when ``norm`` and the margin is not 50 (without
    ``norm`` the margin is unused and never named); ``_<extractor stem>`` when
    ``extractor`` (a checkpoint path or name) is not the default
    ``<model>_<dataset>.pt``. So two different clusterings never share a name.
    """
    name = f"class_idx_{dataset.lower()}_k{int(k)}_{int(layer_idx)}_{bool(norm)}"
    if model != DEFAULT_MODEL:
        name += f"_{model}"
    if norm and int(margin) != DEFAULT_MARGIN:
        name += f"_m{int(margin)}"
    if extractor:
        stem = os.path.splitext(os.path.basename(extractor))[0]
        if stem != default_extractor_stem(model, dataset):
            name += f"_{stem}"
    return name + ".pt"


def cluster_command(dataset: str, data_path: str | None, k: int, layer_idx: int, norm: bool,
                    model: str = DEFAULT_MODEL, margin: int = DEFAULT_MARGIN,
                    extractor: str | None = None, cluster_path: str | None = None) -> str:
    """The main_cluster.py command line that makes the cluster file for these settings."""
    parts = ["python", "main_cluster.py", "--dataset", dataset]
    if data_path:
        parts += ["--data_path", data_path]
    if model != DEFAULT_MODEL:
        parts += ["--model", model]
    parts += ["--layer_idx", str(int(layer_idx)), "--num_cluster", str(int(k))]
    if norm:
        parts.append("--norm")
        if int(margin) != DEFAULT_MARGIN:
            parts += ["--margin", str(int(margin))]
    if extractor:
        parts += ["--extractor", extractor]
    if cluster_path:
        parts += ["--cluster_path", cluster_path]
    return shlex.join(parts)


def _fail(msg: str, fix_command: str | None):
    if fix_command:
        msg = f"{msg.rstrip('.')}. Make the right file with: {fix_command}"
    raise ClusterFileError(msg)


# --------------------------------------------------------------------------- #
# size bounds
# --------------------------------------------------------------------------- #
def size_bounds(n: int, k: int, margin: int) -> tuple[int, int]:
    """The paper's KMeansConstrained bounds for a class of ``n`` images: ``n // k -+ margin``."""
    base = int(n) // int(k)
    return base - int(margin), base + int(margin)


def fitted_size_bounds(n: int, k: int, margin: int) -> tuple[int, int]:
    """The bounds ``--norm`` uses for a class of ``n >= k`` images: ``size_bounds`` when they fit it.

    They fit when every cluster keeps >= 1 image and k clusters can hold the class
    (``n // k - margin >= 1``, ``k * (n // k + margin) >= n``). A class too small for
    the margin gets the largest margin <= ``margin`` that fits; where none does
    (``n < 2k`` with ``n % k != 0``, or ``margin`` 0 with ``n % k != 0``) the upper
    bound is widened just enough, to ``ceil(n / k)``.
    """
    n, k, margin = int(n), int(k), int(margin)
    base = n // k
    m = min(margin, base - 1)                 # the lower bound stays >= 1
    return base - m, max(base + m, -(-n // k))


def margin_notes(class_counts, k: int, norm: bool, margin: int, class_names=None) -> list[str]:
    """One log line when ``--margin`` was narrowed (or widened) for some classes, else none."""
    if not norm:
        return []
    counts = [int(c) for c in class_counts]
    names = list(class_names) if class_names is not None else [str(i) for i in range(len(counts))]
    groups: dict[tuple, list] = {}
    for c, n in enumerate(counts):
        used = fitted_size_bounds(n, k, margin)
        if used != size_bounds(n, k, margin):
            groups.setdefault(used, []).append((names[c], n))
    if not groups:
        return []
    n_changed = sum(len(v) for v in groups.values())
    parts = []
    for (lo, hi), members in sorted(groups.items()):
        ns = [n for _, n in members]
        listed = ", ".join(str(nm) for nm, _ in members[:5]) + (" ..." if len(members) > 5 else "")
        parts.append(f"sizes {lo}..{hi} for {len(members)} class(es) of {min(ns)}-{max(ns)} images ({listed})")
    return [f"--margin {margin} does not fit {n_changed} of {len(counts)} classes with --num_cluster {k} "
            f"(n_c // k - {margin} < 1 or k * (n_c // k + {margin}) < n_c): {'; '.join(parts)}; the file keeps "
            f"margin {margin} in its name and meta, the bounds used are in meta['size_bounds']"]


def check_feasible(class_counts, k: int, norm: bool, margin: int, class_names=None) -> None:
    """Raises ClusterConfigError unless every class can be split as asked.

    Every class needs at least ``k`` images; with ``norm`` the margin must be
    >= 0 (a class too small for it gets ``fitted_size_bounds``; see ``margin_notes``).
    """
    counts = [int(c) for c in class_counts]
    names = list(class_names) if class_names is not None else [str(i) for i in range(len(counts))]
    if k < 1:
        raise ClusterConfigError(f"--num_cluster must be >= 1, got {k}")
    small = [(names[c], n) for c, n in enumerate(counts) if n < k]
    if small:
        listed = ", ".join(f"{nm} ({n})" for nm, n in small[:5])
        raise ClusterConfigError(f"--num_cluster {k} is larger than the number of images of class "
                                 f"{listed}; use --num_cluster {min(counts)} or less")
    if norm and margin < 0:
        raise ClusterConfigError(f"--margin must be >= 0, got {margin}")


# --------------------------------------------------------------------------- #
# clustering
# --------------------------------------------------------------------------- #
def cluster_features(features: np.ndarray, k: int, norm: bool, margin: int, seed: int,
                     n_init: int = KMEANS_N_INIT, max_iter: int = KMEANS_MAX_ITER):
    """K-Means (or size-constrained K-Means with ``norm``) of one class's features.

    Returns ``(labels (n,) int64, centers (k, d) float32, inertia float)``.
    ``seed`` is used as ``random_state`` (reduced to 32 bits).
    """
    x = np.ascontiguousarray(np.asarray(features, dtype=np.float64))
    n = x.shape[0]
    check_feasible([n], k, norm, margin)
    rs = int(seed) % (2 ** 32)
    if norm:
        from k_means_constrained import KMeansConstrained
        smin, smax = fitted_size_bounds(n, k, margin)
        clf = KMeansConstrained(n_clusters=k, size_min=smin, size_max=smax, n_init=n_init,
                                max_iter=max_iter, random_state=rs)
        clf.fit(x)
    else:
        from sklearn.cluster import KMeans
        clf = KMeans(n_clusters=k, n_init=n_init, max_iter=max_iter, random_state=rs).fit(x)
    labels = np.asarray(clf.labels_, dtype=np.int64)
    return labels, np.asarray(clf.cluster_centers_, dtype=np.float32), float(clf.inertia_)


def cluster_dataset(features, indices_class, k: int, norm: bool, margin: int, seed: int,
                    n_init: int = KMEANS_N_INIT, max_iter: int = KMEANS_MAX_ITER, progress: bool = True,
                    class_names=None, log=None):
    """Clusters every class of a dataset.

    ``features``: (N, d) array/tensor in training-set order; ``indices_class[c]``:
    the training indices of class c. Class c's seed is
    ``derive_seed(seed, "kmeans", c)``. Returns ``(clusters, info)``:
    ``clusters[c][j]`` is the ascending LongTensor of training indices of
    cluster j of class c; ``info`` has ``sizes``, ``centers`` (list of (k, d)
    float tensors), ``inertia`` (floats), ``size_bounds`` (the bounds used per
    class, ``fitted_size_bounds``; None without ``norm``) and ``margin_clamped``
    (the classes whose bounds are not ``n_c // k +- margin``). ``log`` also gets
    ``margin_notes``.
    """
    feats = features.detach().cpu().numpy() if isinstance(features, torch.Tensor) else np.asarray(features)
    counts = [len(ix) for ix in indices_class]
    check_feasible(counts, k, norm, margin, class_names)
    if log is not None:
        for line in margin_notes(counts, k, norm, margin, class_names):
            log(line)
    clusters, sizes, centers, inertia, bounds = [], [], [], [], []
    rng = range(len(indices_class))
    if progress:
        from tqdm import tqdm
        rng = tqdm(rng, desc=f"{'KMeansConstrained' if norm else 'KMeans'} k={k}", unit="class")
    for c in rng:
        idx = torch.as_tensor(indices_class[c], dtype=torch.long).cpu()
        labels, cen, inert = cluster_features(feats[idx.numpy()], k, norm, margin,
                                              derive_seed(seed, "kmeans", c), n_init, max_iter)
        lab = torch.from_numpy(labels)
        per = [torch.sort(idx[lab == j]).values.clone() for j in range(k)]
        if any(p.numel() == 0 for p in per):   # K-Means on fewer distinct points than k
            nm = class_names[c] if class_names is not None else str(c)
            raise ClusterConfigError(f"class {nm}: K-Means left {sum(p.numel() == 0 for p in per)} of {k} "
                                     f"clusters empty (too few distinct feature vectors); use a smaller "
                                     f"--num_cluster or --norm")
        clusters.append(per)
        sizes.append([len(p) for p in per])
        centers.append(torch.from_numpy(cen).clone())
        inertia.append(inert)
        bounds.append(list(fitted_size_bounds(len(idx), k, margin)) if norm else None)
        if log is not None:
            nm = class_names[c] if class_names is not None else str(c)
            log(f"class {c} ({nm}): {len(idx)} images, cluster sizes min {min(sizes[-1])} / "
                f"median {int(np.median(sizes[-1]))} / max {max(sizes[-1])}, inertia {inert:.4g}")
    clamped = [c for c, n in enumerate(counts)
               if norm and fitted_size_bounds(n, k, margin) != size_bounds(n, k, margin)]
    return clusters, {"sizes": sizes, "centers": centers, "inertia": inertia,
                      "size_bounds": bounds if norm else None, "margin_clamped": clamped}


def size_summary(sizes) -> list[str]:
    """One line per class: min / median / max cluster size."""
    return [f"class {c}: min {min(s)} / median {float(np.median(s)):g} / max {max(s)} (k={len(s)}, n={sum(s)})"
            for c, s in enumerate(sizes)]


# --------------------------------------------------------------------------- #
# the file
# --------------------------------------------------------------------------- #
def save_clusters(path: str, clusters, meta: dict) -> None:
    """Writes ``{'clusters', 'meta'}`` atomically; refuses content that weights_only cannot load."""
    obj = {"clusters": [[torch.as_tensor(t, dtype=torch.long).cpu().contiguous() for t in per]
                        for per in clusters],
           "meta": _plain(meta)}
    atomic_save(obj, path)


def _plain(x):
    """numpy scalars/arrays -> Python scalars / tensors, recursively (weights_only-safe content)."""
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if isinstance(x, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(x))
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, torch.Tensor):
        return x.detach().cpu()
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    raise TypeError(f"cluster meta value of type {type(x).__name__} is not allowed (use tensors, "
                    f"Python scalars, strings, lists, dicts)")


def check_partition(clusters, indices_class) -> str | None:
    """None when every class's clusters partition exactly that class's indices, else the problem."""
    if len(clusters) != len(indices_class):
        return f"it has {len(clusters)} classes, the data has {len(indices_class)}"
    for c, (per, ix) in enumerate(zip(clusters, indices_class)):
        want = torch.sort(torch.as_tensor(ix, dtype=torch.long).cpu()).values
        if len(per) == 0:
            return f"class {c} has no clusters"
        got = torch.cat([t.view(-1) for t in per]) if per else torch.empty(0, dtype=torch.long)
        if got.numel() != want.numel():
            return (f"class {c}: clusters hold {got.numel()} indices, the class has {want.numel()} "
                    f"training images")
        if not torch.equal(torch.sort(got).values, want):
            extra = sorted(set(got.tolist()) - set(want.tolist()))[:5]
            missing = sorted(set(want.tolist()) - set(got.tolist()))[:5]
            dup = got.numel() - torch.unique(got).numel()
            return (f"class {c}: clusters are not a partition of the class (not in the class: {extra}, "
                    f"missing: {missing}, duplicates: {dup})")
    return None


def load_clusters(path: str, data=None, expect: dict | None = None, fix_command: str | None = None):
    """Loads a cluster file (weights_only) and checks it; returns ``(clusters, meta)``.

    * structure: ``clusters[c][j]`` are 1-D ascending int64 tensors, ``k`` non-empty per class;
    * ``data`` (a RealData): the data fingerprint must match (another copy or
      ordering of the dataset is refused) and each class's clusters must
      partition ``data.indices_class[c]``;
    * ``expect``: keys among k, layer_idx, norm, model, margin, dataset; any
      disagreement is refused, listing all of them (margin only counts with norm).

    Every error is a ClusterFileError naming the file; ``fix_command`` is
    appended to its message.
    """
    try:
        obj = safe_load(path, what="cluster file", weights_only=True)
    except FileFormatError as e:
        _fail(str(e), fix_command)
    if not isinstance(obj, dict) or "clusters" not in obj or "meta" not in obj:
        kind = type(obj).__name__
        _fail(f"cluster file {path} is not a dcbs cluster file (a {kind} without 'clusters' and 'meta'; "
              f"files of the paper's script carry no metadata and cannot be checked against the data)",
              fix_command)
    clusters, meta = obj["clusters"], obj["meta"]
    if not isinstance(meta, dict):
        _fail(f"cluster file {path}: 'meta' is a {type(meta).__name__}, not a dict", fix_command)
    missing = [key for key in REQUIRED_META if key not in meta]
    if missing:
        _fail(f"cluster file {path}: meta lacks {', '.join(missing)} (made by an older version?)", fix_command)
    if meta["format"] != FORMAT:
        _fail(f"cluster file {path} has format {meta['format']!r}, this code reads {FORMAT!r}", fix_command)
    k = int(meta["k"])
    if not isinstance(clusters, list) or not clusters:
        _fail(f"cluster file {path}: 'clusters' is not a non-empty list", fix_command)
    for c, per in enumerate(clusters):
        if not isinstance(per, list) or len(per) != k:
            _fail(f"cluster file {path}: class {c} has "
                  f"{len(per) if isinstance(per, list) else type(per).__name__} clusters, meta says k={k}",
                  fix_command)
        for j, t in enumerate(per):
            if not isinstance(t, torch.Tensor) or t.dtype != torch.long or t.dim() != 1:
                _fail(f"cluster file {path}: cluster {j} of class {c} is not a 1-D int64 tensor", fix_command)
            if t.numel() == 0:
                _fail(f"cluster file {path}: cluster {j} of class {c} is empty", fix_command)
            if t.numel() > 1 and not bool((t[1:] > t[:-1]).all()):
                _fail(f"cluster file {path}: cluster {j} of class {c} is not in strictly ascending order",
                      fix_command)
    if expect:
        unknown = set(expect) - set(EXPECT_KEYS)
        if unknown:
            raise ValueError(f"load_clusters: unknown expect keys {sorted(unknown)}; use {EXPECT_KEYS}")
        diffs = []
        for key in EXPECT_KEYS:
            if key not in expect:
                continue
            if key == "margin" and not bool(expect.get("norm", meta["norm"])):
                continue
            have, want = meta[key], expect[key]
            if key == "norm":
                have, want = bool(have), bool(want)
            if have != want:
                diffs.append(f"{key}: file {have!r}, wanted {want!r}")
        if diffs:
            _fail(f"cluster file {path} was made with other settings ({'; '.join(diffs)})", fix_command)
    if data is not None:
        if meta["fingerprint"] != data.fingerprint:
            _fail(f"cluster file {path} was made on other data: its fingerprint {meta['fingerprint'][:16]}... "
                  f"({meta['dataset']}, {meta['source']}) differs from the loaded data's "
                  f"{data.fingerprint[:16]}... ({data.name}, {data.source}); the indices would point at "
                  f"other images (another copy or ordering of the dataset)", fix_command)
        problem = check_partition(clusters, data.indices_class)
        if problem:
            _fail(f"cluster file {path} does not partition the training set: {problem}", fix_command)
    return clusters, meta


# --------------------------------------------------------------------------- #
# views (Figure 2 of the paper)
# --------------------------------------------------------------------------- #
def save_cluster_grid(path: str, images: torch.Tensor, clusters_c, per_row: int, mean, std, seed: int,
                      tag: str = "") -> None:
    """One row per cluster of one class, ``per_row`` random members each (blank when fewer).

    ``images`` are the normalised training images; the grid is denormalised and
    clamped to [0, 1] before saving (a PNG of viewable pixels).
    """
    from torchvision.utils import save_image
    from dcbs.data import denormalize
    from dcbs.io import atomic_write
    from dcbs.seeding import generator
    rows = []
    blank = torch.full((1, *images.shape[1:]), 1.0)
    for j, idx in enumerate(clusters_c):
        g = generator(seed, "view", tag, j)
        pick = idx[torch.randperm(idx.numel(), generator=g)[:per_row]]
        row = denormalize(images[pick].float().cpu(), mean, std)
        if row.shape[0] < per_row:
            row = torch.cat([row, blank.expand(per_row - row.shape[0], *blank.shape[1:])])
        rows.append(row)
    grid = torch.cat(rows)
    atomic_write(path, lambda tmp: save_image(grid, tmp, nrow=per_row, padding=2, pad_value=1.0))


def embed_2d(features: np.ndarray, method: str, seed: int) -> np.ndarray:
    """2-D embedding of one class's features: t-SNE (scikit-learn) or PCA."""
    x = np.asarray(features, dtype=np.float32)
    if method == "pca":
        from sklearn.decomposition import PCA
        return PCA(n_components=2, random_state=int(seed) % (2 ** 32)).fit_transform(x)
    if method == "tsne":
        from sklearn.manifold import TSNE
        perplexity = float(min(30.0, max(2.0, (x.shape[0] - 1) / 3.0)))
        return TSNE(n_components=2, perplexity=perplexity, init="pca",
                    random_state=int(seed) % (2 ** 32)).fit_transform(x)
    raise ValueError(f"unknown embedding {method!r}; use 'tsne' or 'pca'")


def save_embedding(path: str, features: np.ndarray, labels: np.ndarray, method: str, seed: int,
                   title: str) -> None:
    """Scatter of the 2-D embedding of one class's features, coloured by cluster."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from dcbs.io import atomic_write
    xy = embed_2d(features, method, seed)
    k = int(labels.max()) + 1 if labels.size else 1
    fig, ax = plt.subplots(figsize=(6, 6))
    cmap = plt.get_cmap("tab20" if k > 10 else "tab10")
    for j in range(k):
        m = labels == j
        ax.scatter(xy[m, 0], xy[m, 1], s=6, color=cmap(j % cmap.N), label=f"{j} ({int(m.sum())})")
    ax.set_title(title, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    if k <= 25:
        ax.legend(fontsize=6, markerscale=2, loc="center left", bbox_to_anchor=(1.0, 0.5), title="cluster (n)",
                  title_fontsize=7)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120))
    plt.close(fig)
