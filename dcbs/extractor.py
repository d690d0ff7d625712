"""The feature extractor of Batch Sampling: training it, loading it, extracting features.

The paper fine-tunes an ImageNet-pretrained ResNet18 on CIFAR10
(``resnet18_cifar.pt``) and clusters the global-average-pooled output of one of
its four stages. Here:

* ``train_extractor`` trains ``<model>`` on a dataset (random crop + flip, SGD
  with Nesterov momentum 0.9, weight decay 5e-4, cosine LR per step), writes
  ``<model>_<dataset>.partial.pt`` atomically every epoch and on Ctrl-C/SIGTERM
  (model, optimizer, scheduler, epoch, step, RNG states), resumes from it, and
  finally writes ``<model>_<dataset>.pt`` = ``{'state_dict', 'meta'}`` atomically;
* ``imagenet_init`` maps torchvision's ImageNet ResNet18 weights onto
  ``ResNet18BN`` (CIFAR-style 3x3 stem and classifier re-initialised);
* ``load_extractor`` accepts our checkpoints and bare state_dicts (the paper's file);
* ``extract_features``: eval mode, no gradients, batched, stage map -> GAP vector.
"""
from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from dcbs.cmdline import StopFlag
from dcbs.io import FileFormatError, atomic_save, file_sha256, safe_load
from dcbs.seeding import generator, seeded
from networks import build_model, model_names, num_feature_layers

__all__ = ["ExtractorError", "TrainingInterrupted", "EXTRACTOR_MODELS", "TrainConfig",
           "default_checkpoint_path", "partial_path", "check_layer", "random_crop_flip",
           "imagenet_state_dict", "imagenet_init", "build_extractor", "load_extractor",
           "extract_features", "evaluate", "train_extractor", "StopFlag", "CKPT_KIND", "PARTIAL_KIND"]

CKPT_KIND = "dcbs.extractor/1"
PARTIAL_KIND = "dcbs.extractor.partial/1"
# models whose forward returns per-stage feature maps suitable for clustering
EXTRACTOR_MODELS = [m for m in model_names() if m.startswith(("ResNet18", "ConvNet"))]
IMAGENET_FILE = "resnet18-f37072fd.pth"   # torchvision ResNet18_Weights.IMAGENET1K_V1


class ExtractorError(RuntimeError):
    """The extractor checkpoint is missing, does not fit, or cannot be (re)trained as asked."""


class TrainingInterrupted(RuntimeError):
    """Training stopped on SIGINT/SIGTERM after saving; the message says how to resume."""


# --------------------------------------------------------------------------- #
# names and checks
# --------------------------------------------------------------------------- #
def default_checkpoint_path(cluster_path: str, model: str, dataset: str) -> str:
    return os.path.join(cluster_path, f"{model}_{dataset}.pt")


def partial_path(path: str) -> str:
    """``x/ResNet18_CIFAR10.pt`` -> ``x/ResNet18_CIFAR10.partial.pt``."""
    root, ext = os.path.splitext(path)
    return f"{root}.partial{ext or '.pt'}"


def check_layer(model: str, layer_idx: int) -> None:
    n = num_feature_layers(model)
    if not 0 <= layer_idx < n:
        raise ExtractorError(f"--layer_idx {layer_idx} is out of range for {model}, which has {n} feature "
                             f"layers: use 0-{n - 1}")


# --------------------------------------------------------------------------- #
# model construction and ImageNet initialisation
# --------------------------------------------------------------------------- #
def build_extractor(model: str, channel: int, num_classes: int, im_size, seed: int) -> nn.Module:
    """``model`` with weights drawn from ``derive_seed(seed, "extractor_init")``."""
    with seeded(seed, "extractor_init"):
        return build_model(model, channel, num_classes, im_size)


def imagenet_state_dict() -> dict:
    """torchvision's ImageNet ResNet18 weights from the torch hub cache, downloading when possible."""
    from torchvision.models import ResNet18_Weights
    url = ResNet18_Weights.IMAGENET1K_V1.url
    cached = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(url))
    try:
        if os.environ.get("DCBS_NO_DOWNLOAD") and not os.path.isfile(cached):
            raise RuntimeError("downloads disabled by DCBS_NO_DOWNLOAD")
        return torch.hub.load_state_dict_from_url(url, map_location="cpu", progress=True, check_hash=True,
                                                  weights_only=True)
    except Exception as e:   # offline, blocked, truncated file ...
        msg = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        raise ExtractorError(
            f"ImageNet ResNet18 weights are not in the torch hub cache ({cached}) and could not be "
            f"downloaded ({type(e).__name__}: {msg}); put {os.path.basename(url)} from {url} there "
            f"(TORCH_HOME moves the cache), or train from scratch with --pretrained none") from None


def _is_stem_or_head(key: str) -> bool:
    return key.startswith(("conv1.", "bn1.", "fc."))


def imagenet_init(net: nn.Module, state_dict: dict | None = None) -> list[str]:
    """Copies torchvision ImageNet ResNet18 weights into a ``ResNet18BN`` (in place).

    The 7x7 stem (``conv1``, ``bn1``) and the classifier (``fc``) keep their fresh
    initialisation (CIFAR-style 3x3 stem, our number of classes); every other
    parameter and BatchNorm buffer is mapped, ``downsample`` -> ``shortcut``.
    Returns the keys copied.
    """
    sd = imagenet_state_dict() if state_dict is None else state_dict
    own = net.state_dict()
    new = {}
    for key, value in sd.items():
        if _is_stem_or_head(key):
            continue
        ours = key.replace(".downsample.", ".shortcut.")
        if ours not in own:
            raise ExtractorError(f"ImageNet ResNet18 weight {key} has no counterpart {ours} in the model "
                                 f"(is it a ResNet18BN?)")
        if own[ours].shape != value.shape:
            raise ExtractorError(f"ImageNet ResNet18 weight {key} has shape {tuple(value.shape)}, the model's "
                                 f"{ours} has {tuple(own[ours].shape)}")
        new[ours] = value.to(own[ours].dtype)
    missing = sorted(k for k in own if not _is_stem_or_head(k) and k not in new)
    if missing:
        raise ExtractorError(f"the ImageNet weights do not cover {len(missing)} model entries, e.g. "
                             f"{', '.join(missing[:4])}")
    net.load_state_dict(new, strict=False)
    return sorted(new)


# --------------------------------------------------------------------------- #
# loading and feature extraction
# --------------------------------------------------------------------------- #
def _unwrap_state_dict(obj, path: str):
    if isinstance(obj, dict) and obj.get("kind") == PARTIAL_KIND:
        raise ExtractorError(f"{path} is an unfinished extractor training (epoch {obj.get('epoch')}); "
                             f"finish it with --train_extractor --resume")
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        return obj["state_dict"], dict(obj.get("meta") or {})
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj, {}          # a bare state_dict, e.g. the paper's resnet18_cifar.pt
    raise ExtractorError(f"{path} is neither an extractor checkpoint ({{'state_dict', 'meta'}}) nor a "
                         f"state_dict")


def load_extractor(path: str, model: str, data, device="cpu", log=None):
    """Builds ``model`` for ``data`` and loads ``path`` into it, in eval mode on ``device``.

    Returns ``(net, info)`` with info = {name, sha256, test_acc, meta}.
    A truncated or foreign file fails with a message naming it.
    """
    obj = safe_load(path, what="extractor checkpoint", weights_only=True)
    sd, meta = _unwrap_state_dict(obj, path)
    if any(k.startswith("module.") for k in sd):
        sd = {k[len("module."):] if k.startswith("module.") else k: v for k, v in sd.items()}
    arch = meta.get("architecture")
    if arch is not None and arch != model:
        raise ExtractorError(f"extractor checkpoint {path} holds a {arch}, but --model is {model}; "
                             f"pass --model {arch}")
    ds = meta.get("dataset")
    if ds is not None and ds != data.name:
        raise ExtractorError(f"extractor checkpoint {path} was trained on {ds}, not {data.name}")
    net = build_extractor(model, data.channel, data.num_classes, data.im_size, seed=0)
    try:
        net.load_state_dict(sd)
    except RuntimeError as e:
        first = " ".join(str(e).split())[:300]
        raise ExtractorError(f"extractor checkpoint {path} does not fit {model} for {data.name} "
                             f"({data.channel} channels, {data.num_classes} classes, "
                             f"{data.im_size[0]}x{data.im_size[1]}): {first}") from None
    fp = meta.get("fingerprint")
    if fp is not None and fp != data.fingerprint and log is not None:
        log(f"note: extractor {os.path.basename(path)} was trained on another copy/order of {data.name} "
            f"(fingerprint {fp[:12]}... vs {data.fingerprint[:12]}...); features are still valid")
    info = {"name": os.path.basename(path), "sha256": file_sha256(path),
            "test_acc": None if meta.get("test_acc") is None else float(meta["test_acc"]), "meta": meta}
    return net.to(device).eval(), info


@torch.no_grad()
def extract_features(net: nn.Module, images: torch.Tensor, layer_idx: int, batch_size: int = 500,
                     device="cpu", progress: bool = True) -> torch.Tensor:
    """(N, d) float32 CPU features: stage ``layer_idx``'s map, global-average-pooled (seed 3.4.1)."""
    from tqdm import tqdm
    was_training = net.training
    net.eval()
    out = []
    starts = range(0, images.shape[0], batch_size)
    for i in tqdm(starts, desc=f"features (layer {layer_idx})", unit="batch", disable=not progress):
        _, feats = net(images[i:i + batch_size].to(device))
        f = feats[layer_idx]
        f = F.adaptive_avg_pool2d(f, 1).flatten(1) if f.dim() == 4 else f.flatten(1)
        out.append(f.float().cpu())
    net.train(was_training)
    return torch.cat(out) if out else torch.empty(0)


FEATURE_KIND = "dcbs-features-v1"


def feature_cache_path(cluster_path: str, extractor_path: str, layer_idx: int) -> str:
    stem = os.path.splitext(os.path.basename(extractor_path))[0]
    return os.path.join(cluster_path, f"features_{stem}_l{int(layer_idx)}.pt")


def cached_features(path: str, net: nn.Module, images: torch.Tensor, layer_idx: int, extractor_sha256: str,
                    fingerprint: str, batch_size: int = 500, device="cpu", log=print):
    """``extract_features`` through a cache file: reused only when it was made by the same
    extractor (sha256), layer and data (fingerprint); otherwise recomputed and written atomically.
    Returns (features, whether they came from the cache)."""
    key = {"extractor_sha256": extractor_sha256, "layer_idx": int(layer_idx), "fingerprint": fingerprint}
    if os.path.isfile(path):
        try:
            ck = safe_load(path, what="feature cache", weights_only=True)
        except FileFormatError as e:
            log(f"feature cache {path} unreadable ({e}); recomputing")
            ck = None
        if (isinstance(ck, dict) and ck.get("kind") == FEATURE_KIND and all(ck.get(k) == v for k, v in key.items())
                and tuple(ck["features"].shape[:1]) == (images.shape[0],)):
            return ck["features"], True
        if ck is not None:
            log(f"feature cache {path} was made by another extractor, layer or dataset; recomputing")
    feats = extract_features(net, images, layer_idx, batch_size, device)
    atomic_save({"kind": FEATURE_KIND, **key, "features": feats}, path)
    return feats, False


@torch.no_grad()
def evaluate(net: nn.Module, images: torch.Tensor, labels: torch.Tensor, device="cpu",
             batch_size: int = 500) -> float:
    """Top-1 accuracy in eval mode."""
    was_training = net.training
    net.eval()
    correct = 0
    for i in range(0, images.shape[0], batch_size):
        logits, _ = net(images[i:i + batch_size].to(device))
        correct += int((logits.argmax(1).cpu() == labels[i:i + batch_size].cpu()).sum())
    net.train(was_training)
    return correct / max(1, images.shape[0])


# --------------------------------------------------------------------------- #
# training
# --------------------------------------------------------------------------- #
def random_crop_flip(x: torch.Tensor, pad: int, flip: bool, g: torch.Generator) -> torch.Tensor:
    """Per-sample random crop after zero padding by ``pad`` and (optionally) horizontal flip.

    Random numbers come from the CPU generator ``g`` whatever ``x.device``.
    """
    n, c, h, w = x.shape
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=g).to(x.device)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=g).to(x.device)
    xp = F.pad(x, [pad, pad, pad, pad])
    rows = (torch.arange(h, device=x.device).view(1, h) + dy.view(n, 1))           # (n, h)
    cols = (torch.arange(w, device=x.device).view(1, w) + dx.view(n, 1))           # (n, w)
    xp = xp.gather(2, rows.view(n, 1, h, 1).expand(n, c, h, w + 2 * pad))
    out = xp.gather(3, cols.view(n, 1, 1, w).expand(n, c, h, w))
    if flip:
        f = (torch.rand(n, generator=g) < 0.5).to(x.device).view(n, 1, 1, 1)
        out = torch.where(f, out.flip(3), out)
    return out


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines the trained extractor (resume refuses any change)."""
    model: str
    dataset: str
    epochs: int = 30
    lr: float = 0.05
    batch_size: int = 128
    momentum: float = 0.9
    weight_decay: float = 5e-4
    pretrained: str = "none"          # "none" | "imagenet"
    seed: int = 0
    train_subset: int | None = None   # train on this many random training images (smoke tests)
    max_steps: int | None = None      # stop after this many optimizer steps in total
    crop_pad: int = 4
    flip: bool = True

    def to_dict(self):
        return asdict(self)


def _subset(cfg: TrainConfig, n: int) -> torch.Tensor:
    if cfg.train_subset is None or cfg.train_subset >= n:
        return torch.arange(n)
    return torch.sort(torch.randperm(n, generator=generator(cfg.seed, "extractor", "subset"))[:cfg.train_subset]).values


def _config_diff(saved: dict, cfg: TrainConfig) -> list[str]:
    now = cfg.to_dict()
    return [f"{k}: saved {saved.get(k)!r}, now {now[k]!r}" for k in now if saved.get(k) != now[k]]


def _layout(model: str) -> torch.memory_format:
    """channels_last for BatchNorm ResNets: one ResNet18BN step of 128 CIFAR images took 3.3-3.7 s
    instead of 4.0-4.7 s on the 2-core CPU; the GroupNorm (instance-norm) models were not faster."""
    return torch.channels_last if model.endswith("BN") else torch.contiguous_format


def train_extractor(cfg: TrainConfig, data, out_path: str, device="cpu", resume: bool = False,
                    overwrite: bool = False, log=print, resume_command: str | None = None,
                    stop: StopFlag | None = None, on_step=None, progress: bool = True) -> dict:
    """Trains the extractor and writes ``out_path`` = {'kind', 'state_dict', 'meta'} atomically.

    ``out_path`` existing is refused unless ``overwrite``. Progress is saved to
    ``partial_path(out_path)`` every epoch and when ``stop`` is raised (SIGINT /
    SIGTERM while training); an existing partial file is continued with
    ``resume`` (its settings and the data fingerprint must match), replaced with
    ``overwrite``, and otherwise refused. ``on_step(global_step, stop_flag)``
    is called after every optimizer step (tests use it to interrupt). Returns the meta.
    """
    from tqdm import tqdm
    part = partial_path(out_path)
    if os.path.exists(out_path) and not overwrite:
        raise ExtractorError(f"extractor checkpoint {out_path} already exists; use it (drop "
                             f"--train_extractor) or retrain over it with --overwrite")
    if cfg.pretrained == "imagenet" and cfg.model != "ResNet18BN":
        raise ExtractorError(f"--pretrained imagenet needs --model ResNet18BN (torchvision's ImageNet "
                             f"weights are BatchNorm weights), not {cfg.model}")
    idx_train = _subset(cfg, data.images_train.shape[0])
    n = idx_train.numel()
    bs = min(cfg.batch_size, n)
    steps_per_epoch = n // bs                       # drop the last incomplete batch (BatchNorm)
    total_steps = cfg.epochs * steps_per_epoch
    if cfg.max_steps is not None:
        total_steps = min(total_steps, cfg.max_steps)

    net = build_extractor(cfg.model, data.channel, data.num_classes, data.im_size, cfg.seed)
    if cfg.pretrained == "imagenet":
        copied = imagenet_init(net)
        log(f"initialised {cfg.model} from ImageNet ResNet18 ({len(copied)} entries; stem and classifier fresh)")
    net = net.to(device)
    layout = _layout(cfg.model)
    net = net.to(memory_format=layout)
    opt = torch.optim.SGD(net.parameters(), lr=cfg.lr, momentum=cfg.momentum, nesterov=True,
                          weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, total_steps))
    start_epoch, start_step, global_step, history = 0, 0, 0, []
    gen_state, loss_sum, correct, seen = None, 0.0, 0, 0

    if os.path.exists(part):
        if resume:
            ck = safe_load(part, what="partial extractor checkpoint", weights_only=True)
            if not isinstance(ck, dict) or ck.get("kind") != PARTIAL_KIND:
                raise ExtractorError(f"{part} is not a partial extractor checkpoint; delete it or pass --overwrite")
            diffs = _config_diff(ck["config"], cfg)
            if ck.get("fingerprint") != data.fingerprint:
                diffs.append(f"data fingerprint: saved {str(ck.get('fingerprint'))[:12]}..., "
                             f"now {data.fingerprint[:12]}...")
            if diffs:
                raise ExtractorError(f"cannot resume {part}: settings differ ({'; '.join(diffs)}); rerun with "
                                     f"the saved settings, or start over with --overwrite")
            net.load_state_dict(ck["model"])
            opt.load_state_dict(ck["optimizer"])
            sched.load_state_dict(ck["scheduler"])
            torch.set_rng_state(ck["torch_rng"])
            start_epoch, start_step, global_step = ck["epoch"], ck["step_in_epoch"], ck["global_step"]
            gen_state, history = ck["gen_state"], list(ck["history"])
            loss_sum, correct, seen = ck["loss_sum"], ck["correct"], ck["seen"]
            log(f"resuming {part}: epoch {start_epoch + 1}/{cfg.epochs}, step {start_step}/{steps_per_epoch}, "
                f"{global_step} steps done")
        elif overwrite:
            log(f"--overwrite: discarding the unfinished training in {part}")
        else:
            ck = safe_load(part, what="partial extractor checkpoint", weights_only=True)
            ep = ck.get("epoch") if isinstance(ck, dict) else "?"
            raise ExtractorError(f"{part} holds an unfinished extractor training (stopped in epoch "
                                 f"{ep + 1 if isinstance(ep, int) else ep}); continue it with --resume, "
                                 f"or start over with --overwrite")
    elif resume:
        log(f"--resume: no unfinished training at {part}; starting from scratch")

    def save_partial(epoch, step_in_epoch, g):
        atomic_save({"kind": PARTIAL_KIND, "config": cfg.to_dict(), "fingerprint": data.fingerprint,
                     "epoch": epoch, "step_in_epoch": step_in_epoch, "global_step": global_step,
                     "model": net.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                     "gen_state": g.get_state() if g is not None else torch.empty(0, dtype=torch.uint8),
                     "torch_rng": torch.get_rng_state(), "history": history,
                     "loss_sum": loss_sum, "correct": correct, "seen": seen}, part)

    log(f"training extractor {cfg.model} on {data.name}: {n} images, batch {bs}, {steps_per_epoch} steps/epoch, "
        f"{cfg.epochs} epochs ({total_steps} steps), lr {cfg.lr} cosine, SGD nesterov wd {cfg.weight_decay}, "
        f"pretrained {cfg.pretrained}, seed {cfg.seed}, device {device}")
    t0 = time.time()
    stop = stop or StopFlag()
    criterion = nn.CrossEntropyLoss()
    net.train()
    epoch = start_epoch
    with stop:
        while epoch < cfg.epochs and global_step < total_steps:
            g = generator(cfg.seed, "extractor", "epoch", epoch)
            perm = idx_train[torch.randperm(n, generator=g)]
            first = 0
            if epoch == start_epoch and gen_state is not None and start_step > 0:
                g.set_state(gen_state)      # continue mid-epoch exactly where it stopped
                first = start_step
            else:
                loss_sum, correct, seen = 0.0, 0, 0
            bar = tqdm(range(first, steps_per_epoch), desc=f"extractor epoch {epoch + 1}/{cfg.epochs}",
                       unit="step", disable=not progress, leave=False)
            stopped = False
            for s in bar:
                if global_step >= total_steps:
                    break
                ix = perm[s * bs:(s + 1) * bs]
                x = data.images_train[ix].to(device)
                y = data.labels_train[ix].to(device)
                x = random_crop_flip(x, cfg.crop_pad, cfg.flip, g).contiguous(memory_format=layout)
                logits, _ = net(x)
                loss = criterion(logits, y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                global_step += 1
                loss_sum += loss.item() * len(ix)
                correct += int((logits.argmax(1) == y).sum())
                seen += len(ix)
                bar.set_postfix(loss=f"{loss_sum / seen:.3f}", lr=f"{sched.get_last_lr()[0]:.4f}")
                if on_step is not None:
                    on_step(global_step, stop)
                if stop.stop:
                    save_partial(epoch, s + 1, g)
                    stopped = True
                    break
            bar.close()
            if stopped:
                cmd = resume_command or "the same command with --resume"
                raise TrainingInterrupted(
                    f"extractor training interrupted ({stop.signame or 'stop requested'}) in epoch "
                    f"{epoch + 1}/{cfg.epochs} after {global_step}/{total_steps} steps; progress saved to {part}; "
                    f"resume with: {cmd}")
            test_acc = evaluate(net, data.images_test, data.labels_test, device)
            history.append({"epoch": epoch + 1, "steps": global_step, "loss": loss_sum / max(1, seen),
                            "train_acc": correct / max(1, seen), "test_acc": test_acc})
            log(f"extractor epoch {epoch + 1}/{cfg.epochs}: loss {loss_sum / max(1, seen):.4f}, train acc "
                f"{correct / max(1, seen):.4f}, test acc {test_acc:.4f}, {time.time() - t0:.0f}s")
            epoch += 1
            gen_state, loss_sum, correct, seen = None, 0.0, 0, 0
            save_partial(epoch, 0, None)

    test_acc = history[-1]["test_acc"] if history else evaluate(net, data.images_test, data.labels_test, device)
    meta = {"architecture": cfg.model, "dataset": data.name, "source": data.source,
            "fingerprint": data.fingerprint, "epochs": cfg.epochs, "epochs_done": len(history),
            "steps": global_step, "test_acc": float(test_acc), "seed": cfg.seed, "config": cfg.to_dict(),
            "history": history, "channel": data.channel, "num_classes": data.num_classes,
            "im_size": list(data.im_size), "normalised_inputs": True, "mean": list(data.mean),
            "std": list(data.std)}
    atomic_save({"kind": CKPT_KIND, "state_dict": {k: v.detach().cpu() for k, v in net.state_dict().items()},
                 "meta": meta}, out_path)
    if os.path.exists(part):
        os.unlink(part)
    log(f"extractor written to {out_path}: test acc {test_acc:.4f} after {global_step} steps "
        f"({time.time() - t0:.0f}s)")
    return meta
