"""Training a network on a (synthetic) set and testing it: the evaluation protocol.

``evaluate_synset`` keeps the paper's meaning (one model): SGD lr ``lr_net``,
momentum 0.9, weight decay 5e-4, batch ``batch_train``, ``epoch_eval_train``
epochs (+1, as the reference runs Epoch+1 epochs), learning rate x0.1 once half
the epochs are done with a fresh optimizer (the momentum restarts, as in the
reference), then accuracy on the whole test set without augmentation.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn as nn

from .fast_ops import build_model
from .config import ConfigError
from .augment import DiffAugment, ParamDiffAug, augment, get_daparam
from .precision import upcast
from .seeding import derive_seed, seeded

__all__ = ["EvalSettings", "epoch", "evaluate_synset", "train_and_test", "test_accuracy", "minibatches",
           "get_eval_pool", "check_compile", "compiled_forward", "embed_no_grad", "eval_settings_for", "build_eval_model"]

EVAL_POOLS = {
    "M": ["MLP", "ConvNet", "LeNet", "AlexNet", "VGG11", "ResNet18"],
    "W": ["ConvNetW32", "ConvNetW64", "ConvNetW128", "ConvNetW256"],
    "D": ["ConvNetD1", "ConvNetD2", "ConvNetD3", "ConvNetD4"],
    "A": ["ConvNetAS", "ConvNetAR", "ConvNetAL"],
    "P": ["ConvNetNP", "ConvNetMP", "ConvNetAP"],
    "N": ["ConvNetNN", "ConvNetBN", "ConvNetLN", "ConvNetIN", "ConvNetGN"],
}


def get_eval_pool(eval_mode: str, model: str, model_eval: str | None = None) -> list[str]:
    """Architectures to evaluate on (the reference's meanings of --eval_mode)."""
    if eval_mode == "S":
        return [model]
    if eval_mode == "SS":
        return [model_eval or model]
    if eval_mode in EVAL_POOLS:
        return list(EVAL_POOLS[eval_mode])
    raise ValueError(f"unknown eval_mode {eval_mode!r}; choose S, M, W, D, A, P or N")


@dataclass(frozen=True)
class EvalSettings:
    """How one architecture is trained on a synthetic set."""
    epochs: int
    lr: float
    batch_train: int
    dsa_strategy: str          # 'none' unless DSA augmentation is used in evaluation
    dc_aug: dict | None        # DC augmentation parameters (get_daparam) or None
    compile_test: bool = False  # test pass through torch.compile (--compile)

    @property
    def augmented(self) -> bool:
        return self.dsa_strategy != "none" or bool(self.dc_aug and self.dc_aug["strategy"] != "none")


def eval_settings_for(model_eval: str, dataset: str, model: str, ipc: int, dsa_strategy: str,
                      lr_net: float, batch_train: int, epoch_eval_train: int | None,
                      compile_test: bool = False) -> EvalSettings:
    """The protocol's evaluation settings for one architecture.

    DSA strategy 'none' -> DC augmentation from ``get_daparam`` (MNIST, ConvNetBN);
    epochs: ``epoch_eval_train`` when given, else 1000 with augmentation and 300 without.
    """
    dc_aug = None if dsa_strategy != "none" else get_daparam(dataset, model, model_eval, ipc)
    s = EvalSettings(0, lr_net, batch_train, dsa_strategy, dc_aug)
    epochs = epoch_eval_train if epoch_eval_train is not None else (1000 if s.augmented else 300)
    return EvalSettings(epochs, lr_net, batch_train, dsa_strategy, dc_aug, bool(compile_test))


def build_eval_model(name, channel, num_classes, im_size, seed: int, *purpose, ops: str = "fast"):
    """Model ``name`` with weights drawn from the derived seed (same init on every device), ``ops`` layers."""
    with seeded(seed, *purpose):
        return build_model(name, channel, num_classes, im_size, ops=ops)


def minibatches(images, labels, batch_size: int, generator: torch.Generator | None = None):
    """Shuffled (generator given) or ordered minibatches of a tensor dataset."""
    n = images.shape[0]
    order = torch.randperm(n, generator=generator).to(images.device) if generator is not None else None
    for i in range(0, n, batch_size):
        if order is None:
            yield images[i:i + batch_size], labels[i:i + batch_size]
        else:
            sel = order[i:i + batch_size]
            yield images[sel], labels[sel]


def _augment_fn(settings: EvalSettings, dsa_param: ParamDiffAug, generator):
    if settings.dsa_strategy != "none":
        return lambda x: DiffAugment(x, settings.dsa_strategy, seed=-1, param=dsa_param, generator=generator)
    if settings.dc_aug and settings.dc_aug["strategy"] != "none":
        return lambda x: augment(x, settings.dc_aug, generator=generator)
    return None


def epoch(mode, batches, net, optimizer, criterion, aug=None, amp=contextlib.nullcontext):
    """One pass over ``batches`` ((images, labels) pairs). mode 'train' updates ``net``. The
    forward passes run in ``amp()`` (the condensation's inner loop under ``--precision bf16``:
    bf16 autocast), the loss at full precision (``precision.upcast``: fp32, or float64 in a
    float64 run).

    Returns (mean loss, accuracy); sums stay on the device until the end (one sync).
    """
    train = mode == "train"
    net.train(train)
    loss_sum = correct = None
    count = 0
    with torch.set_grad_enabled(train):
        for img, lab in batches:
            if aug is not None and train:
                img = aug(img)
            with amp():
                out = net(img)[0]
            loss = criterion(upcast(out), lab)
            if train:
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            n_b = lab.shape[0]
            l, c = loss.detach() * n_b, (out.argmax(1) == lab).sum()
            loss_sum = l if loss_sum is None else loss_sum + l
            correct = c if correct is None else correct + c
            count += n_b
    if count == 0:
        return 0.0, 0.0
    return float(loss_sum) / count, float(correct) / count


def compiled_forward(net: nn.Module):
    """``net`` under ``torch.compile`` for gradient-free passes (``--compile``).

    Static shapes: a test set makes two batch shapes (256 and the remainder), each compiled
    once per process and architecture; later models of the same architecture reuse the code
    (0.2 s instead of 5-15 s on the 2-core CPU; ``test_accuracy`` leaves room for 64 variants). Inductor needs a C++ compiler on the CPU and
    triton on CUDA (``check_compile`` says so before a run starts)."""
    return torch.compile(net, dynamic=False)


def _embed(net, x):
    return net.embed(x)


_compiled_embed = None


def embed_no_grad(net: nn.Module, x: torch.Tensor, compiled: bool = False) -> torch.Tensor:
    """``net.embed(x)`` without a graph (DM's real images); ``compiled`` runs it through
    ``torch.compile`` (``--compile``).

    One compiled function for all networks: the network is an argument, its parameters graph
    inputs, so DM's fresh network of every iteration reuses the code compiled at the first (ad-hoc
    check: four new ConvNets, one graph). Measured on the 2-core AVX-512 EPYC (2 threads,
    FashionMNIST shape, one DM iteration at ipc 1, 7 interleaved rounds): 1.51 s eager, 1.30 s
    compiled before the first block's pooling was folded in (``dcbs.fast_ops.conv_instance_norm_pool2x2``).
    """
    global _compiled_embed
    with torch.no_grad():
        if not compiled:
            return net.embed(x)
        if _compiled_embed is None:
            _compiled_embed = torch.compile(_embed, dynamic=False)
        return _call_compiled(_compiled_embed, net, x)


def _room_to_recompile():
    """torch's recompile limit (8 per forward code) raised to 64 for the compiled test pass: the
    ConvNet variants of --eval_mode W/D/A/P/N and LeNet/AlexNet/VGG11 share one ``forward``
    (``_Blocks``) and make two batch shapes each, so with 8 the later ones would run eagerly."""
    cfg = torch._dynamo.config
    name = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"  # older torch
    return cfg.patch(**{name: max(64, getattr(cfg, name))})


def _call_compiled(fn, *args):
    """``fn(*args)`` for a compiled ``fn``, with room to recompile; a compiler failure becomes the
    one-line ConfigError of ``_compile_failed``."""
    with _room_to_recompile():
        try:
            return fn(*args)
        except Exception as e:  # inductor raises many kinds (BackendCompilerFailed, CalledProcessError, ...)
            raise _compile_failed(e) from e


def _compile_failed(e: Exception) -> ConfigError:
    first = next((line.strip() for line in str(e).splitlines() if line.strip()), "")[:300]  # one line, no hints
    return ConfigError(f"--compile: torch.compile failed ({type(e).__name__}: {first}). "
                       "It needs a C++ compiler on the CPU and triton on CUDA: install them, or run without "
                       "--compile (a stopped run resumes with --no-compile)")


def check_compile(device) -> None:
    """Compiles and runs a tiny convolution block on ``device``; ConfigError if torch.compile cannot."""
    net = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.GroupNorm(2, 2), nn.ReLU()).to(device).eval()
    with torch.inference_mode():
        _call_compiled(compiled_forward(net), torch.zeros(1, 1, 4, 4, device=device))


@torch.inference_mode()
def test_accuracy(net, images, labels, batch_size: int = 256, compiled: bool = False) -> float:
    """Accuracy on a whole test set, eval mode, no augmentation.

    Batches of 256 (the reference's; on the 2-core CPU 16-256 measured the same). ``compiled``
    runs the forward through ``torch.compile`` (same predictions up to rounding; the norm,
    activation and pooling fuse into one pass per block); the test pass is timed in
    ``benchmarks/bench_reference.py`` and ``benchmarks/bench_speed.py``."""
    net.eval()
    fwd = compiled_forward(net) if compiled else net
    correct = None
    for img, lab in minibatches(images, labels, batch_size):
        out = (_call_compiled(fwd, img) if compiled else fwd(img))[0]
        c = (out.argmax(1) == lab).sum()
        correct = c if correct is None else correct + c
    return float(correct) / images.shape[0]


def train_and_test(net, images_train, labels_train, images_test, labels_test, settings: EvalSettings,
                   generator: torch.Generator, dsa_param: ParamDiffAug | None = None):
    """Trains ``net`` on (images_train, labels_train) by the protocol; returns (net, acc_train, acc_test)."""
    dsa_param = dsa_param or ParamDiffAug()
    criterion = nn.CrossEntropyLoss()
    lr = settings.lr
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9, weight_decay=0.0005)
    aug = _augment_fn(settings, dsa_param, generator)
    images_train, labels_train = images_train.detach(), labels_train.detach()
    acc_train = 0.0
    for ep in range(settings.epochs + 1):
        _, acc_train = epoch("train", minibatches(images_train, labels_train, settings.batch_train, generator),
                             net, opt, criterion, aug)
        if ep == settings.epochs // 2 + 1:
            lr *= 0.1
            opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9, weight_decay=0.0005)
    acc_test = test_accuracy(net, images_test, labels_test, compiled=settings.compile_test)
    return net, acc_train, acc_test


def evaluate_synset(it_eval, net, images_train, labels_train, testloader, args, generator=None):
    """The paper's ``evaluate_synset``: train ``net`` on the set, return (net, acc_train, acc_test).

    ``testloader`` may be a DataLoader or an (images, labels) pair. ``args`` needs
    lr_net, batch_train, epoch_eval_train and optionally dsa_strategy / dc_aug_param /
    dsa_param; it is only read. ``generator`` drives data order and augmentation
    (default: seeded from ``it_eval``).
    """
    dsa = getattr(args, "dsa_strategy", "none") if getattr(args, "dsa", True) else "none"
    settings = EvalSettings(int(args.epoch_eval_train), float(args.lr_net), int(args.batch_train),
                            dsa or "none", getattr(args, "dc_aug_param", None))
    if isinstance(testloader, (tuple, list)):
        images_test, labels_test = testloader
    else:
        xs, ys = zip(*[(x, y) for x, y in testloader])
        images_test, labels_test = torch.cat(xs), torch.cat(ys)
    dev = next(net.parameters()).device
    g = generator if generator is not None else torch.Generator().manual_seed(derive_seed(0, "eval", it_eval))
    return train_and_test(net, images_train.to(dev), labels_train.to(dev), images_test.to(dev),
                          labels_test.to(dev), settings, g, getattr(args, "dsa_param", None))


# --------------------------------------------------------------------------- #
# many models at once (torch.func): the same protocol, model i as if trained alone
# --------------------------------------------------------------------------- #
def has_batchnorm(net: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules())


def auto_eval_batch(eval_batch: int | None, device, num_eval: int) -> int:
    """Models trained together: ``eval_batch`` when given; else all ``num_eval`` on CUDA (one small
    ConvNet leaves a GPU mostly idle) and 1 on the CPU, where the vmap path measured 1.6x slower
    per model (README, performance notes)."""
    if eval_batch is not None:
        return max(1, int(eval_batch))
    return max(1, int(num_eval)) if str(device).startswith("cuda") else 1


def batchable(net: nn.Module) -> bool:
    """Models without BatchNorm (running statistics) can be trained together with vmap."""
    return not has_batchnorm(net)


def train_and_test_batched(nets, images_train, labels_train, images_test, labels_test, settings: EvalSettings,
                           generators, dsa_param: ParamDiffAug | None = None, test_batch: int = 2048):
    """Trains ``nets`` together (``torch.func.vmap``) by the protocol of ``train_and_test``.

    Model i draws its data order and augmentation from ``generators[i]`` in the same
    sequence as ``train_and_test(nets[i], ..., generators[i])``, and its SGD (momentum
    0.9, weight decay 5e-4, lr x0.1 with a fresh momentum after epoch Epoch//2+1) is
    the same arithmetic, so model i ends as it would alone, up to floating-point
    rounding. Returns (stacked final parameters, [acc_train], [acc_test]).
    """
    import copy
    from torch.func import functional_call, grad, stack_module_state, vmap
    if not all(batchable(n) for n in nets):
        raise ValueError("train_and_test_batched needs models without BatchNorm; use train_and_test")
    dsa_param = dsa_param or ParamDiffAug()
    params, buffers = stack_module_state(list(nets))
    params = {k: v.detach().clone() for k, v in params.items()}
    base = copy.deepcopy(nets[0]).to("meta")

    def loss_fn(p, b, x, y):
        out = functional_call(base, (p, b), (x,))[0]
        return nn.functional.cross_entropy(out, y), out

    step = vmap(grad(loss_fn, has_aux=True))
    augs = [_augment_fn(settings, dsa_param, g) for g in generators]
    images_train, labels_train = images_train.detach(), labels_train.detach()
    n, dev, lr, bufs = images_train.shape[0], images_train.device, settings.lr, None
    correct = [0] * len(nets)
    for ep in range(settings.epochs + 1):
        orders = [torch.randperm(n, generator=g).to(dev) for g in generators]
        hits = None
        for i in range(0, n, settings.batch_train):
            xs, ys = [], []
            for order, aug in zip(orders, augs):
                sel = order[i:i + settings.batch_train]
                x = images_train[sel]
                xs.append(aug(x) if aug is not None else x)
                ys.append(labels_train[sel])
            X, Y = torch.stack(xs), torch.stack(ys)
            grads, out = step(params, buffers, X, Y)
            with torch.no_grad():
                h = (out.argmax(-1) == Y).sum(1)
                hits = h if hits is None else hits + h
                new_bufs = {}
                for k, p in params.items():
                    d_p = grads[k].add(p, alpha=0.0005)
                    buf = d_p.clone() if bufs is None else bufs[k].mul_(0.9).add_(d_p)
                    new_bufs[k] = buf
                    p.add_(buf, alpha=-lr)
                bufs = new_bufs
        correct = hits.tolist()
        if ep == settings.epochs // 2 + 1:
            lr *= 0.1
            bufs = None  # the reference builds a new optimizer: momentum restarts
    acc_train = [c / n for c in correct]

    fwd = vmap(lambda p, b, x: functional_call(base, (p, b), (x,))[0], in_dims=(0, 0, None))
    chunk = max(64, test_batch // len(nets))
    hits = None
    with torch.inference_mode():
        for img, lab in minibatches(images_test, labels_test, chunk):
            h = (fwd(params, buffers, img).argmax(-1) == lab).sum(1)
            hits = h if hits is None else hits + h
    acc_test = [c / images_test.shape[0] for c in hits.tolist()]
    return params, acc_train, acc_test


def check_synthetic_set(images: torch.Tensor, labels: torch.Tensor, num_classes: int, where: str) -> None:
    """Refuses a synthetic set no model can be trained on: NaN/inf pixels, labels outside 0..num_classes-1.

    Raises ``dcbs.io.FileFormatError`` (the command lines print it as one ``error:`` line); ``where``
    names the set, e.g. ``"synthetic set FILE, entry 0"``.
    """
    from .io import FileFormatError
    if not (torch.is_tensor(images) and images.is_floating_point() and images.dim() == 4):
        raise FileFormatError(f"{where}: images must be a float tensor (N, C, H, W), got "
                              f"{tuple(images.shape) if torch.is_tensor(images) else type(images).__name__}")
    if not (torch.is_tensor(labels) and labels.dim() == 1 and not labels.is_floating_point()
            and not labels.is_complex() and labels.dtype != torch.bool):
        raise FileFormatError(f"{where}: labels must be a 1-D integer tensor of class indices, got "
                              f"{labels.dtype if torch.is_tensor(labels) else type(labels).__name__}"
                              f"{' ' + str(tuple(labels.shape)) if torch.is_tensor(labels) else ''}")
    if labels.numel() != images.shape[0]:
        raise FileFormatError(f"{where}: {images.shape[0]} images but {labels.numel()} labels")
    bad = ~torch.isfinite(images.detach())
    if bool(bad.any()):
        per_image = bad.flatten(1).any(1)
        n_nan, n_inf = int(torch.isnan(images).sum()), int(torch.isinf(images).sum())
        raise FileFormatError(f"{where}: {int(per_image.sum())} of {images.shape[0]} images hold non-finite "
                              f"pixels ({n_nan} NaN, {n_inf} inf; first image {int(per_image.nonzero()[0])}); "
                              f"the set diverged when it was made: use an earlier checkpoint or make it again "
                              f"(e.g. with a lower --lr_img)")
    out = (labels < 0) | (labels >= num_classes)
    if bool(out.any()):
        values = sorted(set(labels[out].tolist()))
        raise FileFormatError(f"{where}: labels {values[:5]}{' ...' if len(values) > 5 else ''} fall outside "
                              f"0..{num_classes - 1} ({num_classes} classes); the set was made for another "
                              f"dataset: pass its --dataset")
