"""Figure 8: where the synthetic images of one class sit among the real ones, DC vs Batch Sampling.

The paper embeds the real and the condensed images of one CIFAR-10 class (cat) in the
feature space of a ConvNet trained on the whole training set and shows, per method, the
synthetic points over the cloud of real points. Here:

* the features are the trained network's pre-classifier embedding (``net.embed``: the
  flattened output of the last block, 2048-d for ConvNet on 32x32), in eval mode;
* the real points are ``n_real`` images of the class drawn with a seeded generator (all of
  them when the class has fewer); the synthetic points are every run's ``syn_exp<exp>.pt``
  images of the class;
* one 2-D embedding (t-SNE or PCA) is fitted to real and all runs' synthetic features
  together, so the panels share their coordinates and can be compared;
* next to the figure, ``<name>_features_<class>.json`` holds the numbers behind it, in the
  full feature space: for each run, the distance of its synthetic features to the real
  class mean relative to the real images' own mean distance to it, and the nearest real
  neighbour distance relative to the real images' median nearest-neighbour distance.
"""
from __future__ import annotations

import os

import numpy as np
import torch

from .clusters import embed_2d
from .cmdline import resolve_class as _resolve_class
from .io import atomic_write_json
from .plots import PlotError, _pyplot, _save, _suffix
from .seeding import generator

__all__ = ["load_synthetic", "embed_features", "feature_stats", "feature_figure", "resolve_class", "figure8"]


def load_synthetic(run_path: str, exp: int = 0) -> dict:
    """``syn_exp<exp>.pt`` of a run: normalised images, labels, class names and where it came from."""
    f = os.path.join(run_path, f"syn_exp{exp}.pt")
    if not os.path.isfile(f):
        raise PlotError(f"{run_path} has no syn_exp{exp}.pt (the run has not finished experiment {exp}); "
                        f"Figure 8 needs each run's final synthetic set")
    d = torch.load(f, weights_only=True)
    images, labels = d["data"][0][0].float(), d["data"][0][1].long()
    if not d.get("normalized", True):
        mean = torch.tensor(d["mean"]).view(1, -1, 1, 1)
        std = torch.tensor(d["std"]).view(1, -1, 1, 1)
        images = (images - mean) / std
    return {"images": images, "labels": labels, "dataset": d.get("dataset"), "iteration": d.get("iteration"),
            "ipc": d.get("ipc"), "class_names": d.get("class_names")}


@torch.no_grad()
def embed_features(net: torch.nn.Module, images: torch.Tensor, batch_size: int = 500, device="cpu") -> np.ndarray:
    """(N, d) float64 pre-classifier features of ``images`` (eval mode)."""
    was = net.training
    net.eval()
    out = [net.embed(images[i:i + batch_size].to(device)).double().cpu() for i in range(0, len(images), batch_size)]
    net.train(was)
    return torch.cat(out).numpy() if out else np.zeros((0, 0))


def _nn_dist(a: np.ndarray, b: np.ndarray, same: bool = False) -> np.ndarray:
    """For each row of a, the Euclidean distance to its nearest row of b (itself excluded when same)."""
    d2 = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T
    if same:
        np.fill_diagonal(d2, np.inf)
    return np.sqrt(np.maximum(d2.min(1), 0.0))


def feature_stats(real: np.ndarray, syn: np.ndarray) -> dict:
    """Where ``syn`` sits relative to the cloud ``real`` (rows are feature vectors).

    ``centre_ratio``: mean distance of the synthetic points to the real mean divided by the
    real points' mean distance to it (1: as central as a typical real image; < 1: nearer the
    class centre). ``nn_ratio``: mean distance of a synthetic point to its nearest real point
    divided by the median real-to-real nearest-neighbour distance (about 1: lies in the cloud).
    """
    centre = real.mean(0)
    r_c = np.linalg.norm(real - centre, axis=1).mean()
    s_c = np.linalg.norm(syn - centre, axis=1)
    r_nn = np.median(_nn_dist(real, real, same=True)) if len(real) > 1 else float("nan")
    s_nn = _nn_dist(syn, real)
    return {"n_syn": int(len(syn)), "centre_ratio": float(s_c.mean() / r_c), "nn_ratio": float(s_nn.mean() / r_nn),
            "real_centre_dist": float(r_c), "real_nn_median": float(r_nn)}


def feature_figure(runs, net: torch.nn.Module, data, class_idx: int, path: str, n_real: int = 1000,
                   method: str = "tsne", seed: int = 0, exp: int = 0, extractor: dict | None = None,
                   device="cpu") -> tuple[str, str]:
    """Writes Figure 8 for ``runs`` (``RunData`` of plots.load_runs) and its JSON; returns both paths.

    ``data`` is the runs' dataset (``dcbs.data.RealData``, normalised as the synthetic sets are),
    ``net`` the trained network whose ``embed`` defines the feature space."""
    if not runs:
        raise PlotError("no run directories given")
    if not 0 <= class_idx < data.num_classes:
        raise PlotError(f"class {class_idx} is out of range: {data.name} has classes 0-{data.num_classes - 1}")
    if n_real < 2:
        raise PlotError(f"--feature_real must be at least 2, got {n_real}")
    syns = []
    for r in runs:
        s = load_synthetic(r.path, exp)
        if s["dataset"] not in (None, data.name):
            raise PlotError(f"{r.path} condensed {s['dataset']}, not {data.name}: plot runs of one dataset together")
        if tuple(s["images"].shape[1:]) != (data.channel, *data.im_size):
            raise PlotError(f"{r.path}: synthetic images of shape {tuple(s['images'].shape[1:])} do not fit "
                            f"{data.name} ({data.channel}x{data.im_size[0]}x{data.im_size[1]})")
        mine = s["images"][s["labels"] == class_idx]
        if len(mine) == 0:
            raise PlotError(f"{r.path}: the synthetic set has no image of class {class_idx}")
        syns.append((r, s, mine))

    idx = data.indices_class[class_idx]
    idx = torch.as_tensor(idx)
    if len(idx) > n_real:
        g = generator(seed, "figure8_real", class_idx)
        idx = idx[torch.randperm(len(idx), generator=g)[:n_real]].sort().values
    real = embed_features(net, data.images_train[idx], device=device)
    feats = [embed_features(net, mine, device=device) for _, _, mine in syns]
    stats = [feature_stats(real, f) for f in feats]

    xy = embed_2d(np.concatenate([real, *feats]).astype(np.float32), method, seed)
    xy_real, pos, xy_syn = xy[:len(real)], len(real), []
    for f in feats:
        xy_syn.append(xy[pos:pos + len(f)])
        pos += len(f)

    plt = _pyplot()
    cname = str(data.class_names[class_idx])
    fig, axes = plt.subplots(1, len(runs), figsize=(4.2 * len(runs), 4.4), squeeze=False, sharex=True, sharey=True)
    colors = ["tab:red", "tab:blue", "tab:green", "tab:orange", "tab:purple", "tab:brown"]
    for j, (ax, (r, s, _), p, st) in enumerate(zip(axes[0], syns, xy_syn, stats)):
        ax.scatter(xy_real[:, 0], xy_real[:, 1], s=4, color="0.72", label=f"real ({len(real)})", rasterized=True)
        ax.scatter(p[:, 0], p[:, 1], s=90, marker="*", color=colors[j % len(colors)], edgecolor="black",
                   linewidth=0.5, label=f"synthetic ({len(p)})", zorder=3)
        ax.set_title(f"{r.label}, it {s['iteration']}\ncentre ratio {st['centre_ratio']:.2f}, "
                     f"NN ratio {st['nn_ratio']:.2f}", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.legend(fontsize=7, loc="best")
    ext = f", {extractor['name']}" if extractor else ""
    fig.suptitle(f"Figure 8: class '{cname}' in {type(net).__name__}{ext} features ({method.upper()}), "
                 f"{_suffix(runs)}", fontsize=9)
    png = _save(fig, path)
    meta = {"figure": os.path.basename(png), "dataset": data.name, "class": class_idx, "class_name": cname,
            "embedding": method, "seed": seed, "n_real": int(len(real)), "exp": exp,
            "features": "net.embed (pre-classifier), eval mode",
            "extractor": {k: v for k, v in (extractor or {}).items() if k in ("name", "sha256", "test_acc")},
            "runs": [{"path": r.path, "label": r.label, "iteration": s["iteration"], "ipc": s["ipc"],
                      "preset": r.config.get("preset"), **st} for (r, s, _), st in zip(syns, stats)]}
    js = os.path.splitext(png)[0] + ".json"
    atomic_write_json(js, meta)
    return png, js


def resolve_class(spec, class_names) -> int:
    """A class index from an index or a name; None gives the paper's class, cat (else class 0)."""
    return _resolve_class(spec, class_names, "cat", "--feature_class", PlotError)


def figure8(runs, checkpoint: str, out: str, name: str, class_spec=None, n_real: int = 1000, method: str = "tsne",
            seed: int = 0, exp: int = 0, data_path: str | None = None, model: str | None = None,
            device: str = "cpu", log=print) -> tuple[str, str]:
    """Loads the runs' dataset and the trained network ``checkpoint``, then ``feature_figure``.

    ``model`` defaults to the architecture recorded in the checkpoint (ConvNet for a bare
    state_dict); ``data_path`` to the first run's. Writes ``<out>/<name>_features_<class>.png``."""
    from .data import DataError, load_data
    from .extractor import ExtractorError, load_extractor
    from .io import FileFormatError, safe_load
    datasets = {r.config.get("dataset") for r in runs}
    if len(datasets) != 1 or None in datasets:
        raise PlotError(f"Figure 8 needs runs of one dataset; got {sorted(map(str, datasets))}")
    dataset = datasets.pop()
    data_path = data_path or runs[0].config.get("data_path") or "data"
    if not os.path.isfile(checkpoint):
        raise PlotError(f"trained network {checkpoint} not found; train a ConvNet on the whole training set with: "
                        f"python main_cluster.py --dataset {dataset} --data_path {data_path} --model ConvNet "
                        f"--train_extractor --layer_idx 2 --no_figures")
    try:
        if model is None:
            ck = safe_load(checkpoint, what="trained network", weights_only=True)
            model = ((ck.get("meta") or {}).get("architecture") if isinstance(ck, dict) else None) or "ConvNet"
        data = load_data(dataset, data_path)
        net, info = load_extractor(checkpoint, model, data, device, log=log)
    except (DataError, ExtractorError, FileFormatError) as e:
        raise PlotError(str(e)) from None
    c = resolve_class(class_spec, data.class_names)
    acc = "unknown" if info["test_acc"] is None else f"{100 * info['test_acc']:.1f} %"
    log(f"Figure 8: {model} {checkpoint} (test accuracy {acc}), class {c} '{data.class_names[c]}', "
        f"{min(n_real, len(data.indices_class[c]))} real images, {method}")
    cname = "".join(ch if ch.isalnum() else "_" for ch in str(data.class_names[c]))
    return feature_figure(runs, net, data, c, os.path.join(out, f"{name}_features_{cname}.png"), n_real, method,
                          seed, exp, info, device)
