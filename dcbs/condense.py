"""The condensation loop, written once for DC, DSA, DM and Batch Sampling.

``Condenser`` runs experiments and iterations: evaluation points, checkpoints,
diagnostics, interruption and the non-finite guard. What one iteration does is
a *step* chosen by method (``gradient_matching_step`` for DC/DSA,
``distribution_matching_step`` for DM); where the real images come from is the
*sampler* passed in (``dcbs.samplers``: ``class`` for the baselines, ``cluster``
for Batch Sampling, ...). main.py and main_BS.py differ only in the default sampler.

Random sources (all derived from ``cfg.seed``, see ``seeding``): the synthetic
initialisation ("init", exp), the network of each iteration ("net", exp, it),
the DSA siamese seed ("dsa", exp, it, outer step, class), the inner-loop data
order and augmentation ("inner", exp, it, outer step), the BatchNorm statistics
batch ("bn", exp), evaluation models ("eval", exp, it, arch, i), and the sampler's
own generator ("sampler", exp), which is the only RNG state carried across
iterations (checkpointed).
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn

from . import precision
from .augment import DiffAugment, ParamDiffAug
from .cmdline import StopFlag
from .data import RealData, denormalize
from .evaluate import (auto_eval_batch, batchable, build_eval_model, embed_no_grad, epoch, eval_settings_for,
                       get_eval_pool, has_batchnorm, minibatches, train_and_test, train_and_test_batched)
from .fast_ops import build_model
from .kernels import KERNELS
from .samplers import ClassSampler, sampler_tag
from .seeding import derive_seed, generator, seeded

__all__ = ["Condenser", "gradient_matching_step", "distribution_matching_step", "train_on_synthetic", "STEPS",
           "init_synthetic", "NonFiniteError", "Interrupted", "Diagnostics"]

log = logging.getLogger("dcbs")


def rng_state(device) -> dict:
    """Global RNG states (torch, CUDA, numpy, Python). The loop itself draws only from derived
    seeds and the sampler's generator; these are saved for code that uses the globals."""
    import random
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if device.type == "cuda" else [],
            "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *map(float, np_state[2:])],
            "python": [list(x) if isinstance(x, tuple) else x for x in random.getstate()]}


def set_rng_state(state: dict, device) -> None:
    import random
    if not state:
        return
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and state.get("cuda"):
        torch.cuda.set_rng_state_all(state["cuda"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), float(cached)))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


class NonFiniteError(RuntimeError):
    pass


class Interrupted(RuntimeError):
    pass


def init_synthetic(data: RealData, ipc: int, init: str, seed: int, exp: int, device):
    """Synthetic images (noise or random real images of each class) and their labels."""
    g = generator(seed, "init", exp)
    shape = (data.num_classes * ipc, data.channel, *data.im_size)
    images = torch.randn(shape, generator=g)
    if init == "real":
        for c, ix in enumerate(data.indices_class):
            pick = ix[torch.randperm(len(ix), generator=g)[:ipc]]
            images[c * ipc:(c + 1) * ipc] = data.images_train[pick.to(data.images_train.device)].cpu()
    labels = torch.arange(data.num_classes).repeat_interleave(ipc)
    return images.to(device).requires_grad_(True), labels.to(device)


class Diagnostics:
    """Per-iteration sums kept on the device; ``row`` synchronises once.

    Columns: loss (the reference's loss_avg: summed loss / (classes x outer steps)),
    real batch size mean/min over classes, and for gradient matching the L2 norm of
    the real and synthetic gradient of every named parameter tensor, averaged over
    classes and outer steps (the paper's gw_real_sums / gw_syn_sums).
    """

    def __init__(self, param_names=None):
        self.names = list(param_names or [])
        self.loss = None
        self.n_loss = 0
        self.gw_real = self.gw_syn = None
        self.n_grads = 0
        self.batch_sizes = []
        self.sample_seconds = 0.0

    def add_loss(self, loss: torch.Tensor, count: int):
        l = loss.detach()
        self.loss = l if self.loss is None else self.loss + l
        self.n_loss += count

    def add_grads(self, gw_real, gw_syn):
        """One class's gradients (one tensor per parameter)."""
        self.add_grads_batched([g[None] for g in gw_real], [g[None] for g in gw_syn])

    def add_grads_batched(self, gw_real, gw_syn):
        """Every class's gradients, stacked as [classes, *shape]: each parameter's norm per class, summed."""
        r = torch.stack([g.detach().flatten(1).norm(dim=1).sum() for g in gw_real])
        s = torch.stack([g.detach().flatten(1).norm(dim=1).sum() for g in gw_syn])
        self.gw_real = r if self.gw_real is None else self.gw_real + r
        self.gw_syn = s if self.gw_syn is None else self.gw_syn + s
        self.n_grads += gw_real[0].shape[0]

    def add_batch(self, n: int):
        self.batch_sizes.append(n)

    def add_sample_time(self, seconds: float):
        self.sample_seconds += seconds

    def row(self, exp: int, it: int) -> dict:
        loss = float(self.loss) / max(1, self.n_loss) if self.loss is not None else float("nan")
        row = {"exp": exp, "it": it, "loss": loss,
               "batch_real_mean": float(np.mean(self.batch_sizes)) if self.batch_sizes else 0.0,
               "batch_real_min": int(min(self.batch_sizes)) if self.batch_sizes else 0,
               "sample_seconds": self.sample_seconds}
        if self.gw_real is not None:
            r = (self.gw_real / self.n_grads).tolist()
            s = (self.gw_syn / self.n_grads).tolist()
            row.update({f"gw_real:{n}": v for n, v in zip(self.names, r)})
            row.update({f"gw_syn:{n}": v for n, v in zip(self.names, s)})
        return row


@dataclass
class StepContext:
    """What a step needs besides the network and the synthetic set."""
    cfg: object
    data: RealData
    sampler: object
    bn_sampler: ClassSampler
    exp: int
    it: int
    device: torch.device
    dsa_param: ParamDiffAug
    diag: Diagnostics

    def real_batch(self, c: int, n: int) -> torch.Tensor:
        t0 = time.perf_counter()
        idx = self.sampler.sample(c, n, self.it)
        self.diag.add_sample_time(time.perf_counter() - t0)
        self.diag.add_batch(len(idx))
        return self.data.images_train[idx.to(self.data.images_train.device)].to(self.device)

    def prepare_sampler(self, net, outer_step: int) -> None:
        t0 = time.perf_counter()
        self.sampler.prepare(net, self.it, outer_step)
        self.diag.add_sample_time(time.perf_counter() - t0)

    def siamese(self, img_real, img_syn, *where):
        """DSA with the same transform on both batches (no-op when the strategy is 'none')."""
        strategy = self.cfg.dsa_strategy
        if strategy == "none":
            return img_real, img_syn
        s = derive_seed(self.cfg.seed, "dsa", self.exp, self.it, *where)
        return (DiffAugment(img_real, strategy, seed=s, param=self.dsa_param),
                DiffAugment(img_syn, strategy, seed=s, param=self.dsa_param))


def _freeze_bn(net, ctx: StepContext):
    """BatchNorm nets: 16 real images per class through in train mode, then fix the statistics."""
    imgs = torch.cat([ctx.data.images_train[ctx.bn_sampler.sample(c, 16).to(ctx.data.images_train.device)]
                      for c in range(ctx.data.num_classes)]).to(ctx.device)
    net.train()
    with torch.no_grad():
        net(imgs)
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


def gradient_matching_step(net, image_syn, label_syn, opt_img, ctx: StepContext) -> None:
    """One DC/DSA iteration: outer_loop synthetic updates, inner_loop network updates between them."""
    cfg, ipc, nc = ctx.cfg, ctx.cfg.ipc, ctx.data.num_classes
    outer_loop, inner_loop = cfg.outer_loop, cfg.inner_loop
    criterion = nn.CrossEntropyLoss()
    opt_net = torch.optim.SGD(net.parameters(), lr=cfg.lr_net)
    bn = has_batchnorm(net)
    kernel = KERNELS[cfg.kernel]
    amp = precision.autocast(ctx.device, cfg.precision)
    for ol in range(outer_loop):
        if bn:
            _freeze_bn(net, ctx)
        ctx.prepare_sampler(net, ol)

        def batch(c, ol=ol):
            img_real = ctx.real_batch(c, cfg.batch_real)
            lab_real = torch.full((img_real.shape[0],), c, device=ctx.device, dtype=torch.long)
            img_real, img_syn = ctx.siamese(img_real, image_syn[c * ipc:(c + 1) * ipc], ol, c)
            return img_real, lab_real, img_syn, label_syn[c * ipc:(c + 1) * ipc]

        loss = kernel(net, batch, nc, cfg.dis_metric, ctx.diag, amp)
        opt_img.zero_grad(set_to_none=True)
        loss.backward()
        opt_img.step()
        ctx.diag.add_loss(loss, nc)
        if ol == outer_loop - 1:
            break
        train_on_synthetic(net, opt_net, criterion, image_syn, label_syn, cfg, inner_loop,
                           generator(cfg.seed, "inner", ctx.exp, ctx.it, ol), ctx.dsa_param)


def train_on_synthetic(net, opt_net, criterion, image_syn, label_syn, cfg, epochs: int, g, dsa_param) -> None:
    """The inner loop between two synthetic updates: ``epochs`` epochs of the network on a copy of the
    current synthetic set, in batches of ``cfg.batch_train`` shuffled by ``g``; DSA draws its
    augmentation per sample from the same ``g``. The forward passes run under bf16 autocast for
    ``--precision bf16`` (``precision.autocast``)."""
    amp = precision.autocast(image_syn.device, getattr(cfg, "precision", "fp32"))
    syn_x, syn_y = image_syn.detach().clone(), label_syn.detach().clone()
    aug = None
    if cfg.dsa_strategy != "none":
        aug = lambda x: DiffAugment(x, cfg.dsa_strategy, seed=-1, param=dsa_param, generator=g)
    for _ in range(epochs):
        epoch("train", minibatches(syn_x, syn_y, cfg.batch_train, g), net, opt_net, criterion, aug, amp)


def distribution_matching_step(net, image_syn, label_syn, opt_img, ctx: StepContext) -> None:
    """One DM iteration: match mean embeddings of real and synthetic images per class."""
    cfg, ipc, nc = ctx.cfg, ctx.cfg.ipc, ctx.data.num_classes
    for p in net.parameters():
        p.requires_grad_(False)
    net.train()
    ctx.prepare_sampler(net, 0)
    loss = image_syn.new_zeros(())
    compiled = cfg.compile
    if not has_batchnorm(net) and cfg.kernel == "loop":
        for c in range(nc):
            img_real, img_syn = ctx.siamese(ctx.real_batch(c, cfg.batch_real), image_syn[c * ipc:(c + 1) * ipc], c)
            emb_real = embed_no_grad(net, img_real, compiled)
            loss = loss + ((emb_real.mean(0) - net.embed(img_syn).mean(0)) ** 2).sum()
    else:  # BatchNorm (all classes through together, as the reference does) or --kernel batched
        reals, syns = zip(*[ctx.siamese(ctx.real_batch(c, cfg.batch_real), image_syn[c * ipc:(c + 1) * ipc], c)
                            for c in range(nc)])
        sizes = [r.shape[0] for r in reals]
        emb_real = embed_no_grad(net, torch.cat(reals), compiled).split(sizes)
        emb_syn = net.embed(torch.cat(syns)).split(ipc)
        for r, s in zip(emb_real, emb_syn):
            loss = loss + ((r.mean(0) - s.mean(0)) ** 2).sum()
    opt_img.zero_grad(set_to_none=True)
    loss.backward()
    opt_img.step()
    ctx.diag.add_loss(loss, nc)


STEPS = {"DC": gradient_matching_step, "DSA": gradient_matching_step, "DM": distribution_matching_step}


class Condenser:
    """Runs ``cfg.num_exp`` experiments of ``cfg.Iteration`` iterations with a given sampler factory.

    ``make_sampler(exp) -> sampler`` builds the real-batch source of an experiment;
    ``run`` is the RunDir results go to; ``on_checkpoint`` hooks are for tests.
    """

    def __init__(self, cfg, data: RealData, make_sampler, run, device, label: str):
        self.cfg, self.data, self.make_sampler, self.run, self.device = cfg, data, make_sampler, run, device
        self.label = label
        self.step = STEPS[cfg.method]
        self.dsa_param = ParamDiffAug()
        self.eval_pool = get_eval_pool(cfg.eval_mode, cfg.model)
        self.accuracies: dict = {}
        self.diagnostics: list[dict] = []
        self.data_save: list = []
        self.stop = StopFlag(log=log.warning)
        self._warned_compile = False

    @property
    def stop_requested(self) -> bool:
        return self.stop.stop

    # ------------------------------------------------------------------ evaluation
    def eval_settings(self, arch):
        c = self.cfg
        return eval_settings_for(arch, c.dataset, c.model, c.ipc, c.dsa_strategy, c.lr_net, c.batch_train,
                                 c.epoch_eval_train, c.compile)

    def evaluate(self, images, labels, exp: int, it: int) -> dict | None:
        """Trains num_eval models of every evaluation architecture; None if interrupted."""
        from tqdm import tqdm
        c, d = self.cfg, self.data
        out = {}
        for arch in self.eval_pool:
            s = self.eval_settings(arch)
            accs, t0 = [], time.time()
            group = auto_eval_batch(c.eval_batch, self.device, c.num_eval)
            if s.compile_test and group > 1 and not self._warned_compile:
                self._warned_compile = True
                log.warning("--compile compiles the test pass of models trained one by one; %d are trained together "
                            "here (vmap, its own test pass): add --eval_batch 1 to compile the test pass", group)
            bar = tqdm(total=c.num_eval, desc=f"eval {arch} it {it}", leave=False, disable=None)
            for start in range(0, c.num_eval, group):
                ids = range(start, min(start + group, c.num_eval))
                nets = [build_eval_model(arch, d.channel, d.num_classes, d.im_size, c.seed, "eval", exp, it, arch, i,
                                         ops=c.ops).to(self.device) for i in ids]
                gens = [generator(c.seed, "evaltrain", exp, it, arch, i) for i in ids]
                if len(nets) > 1 and batchable(nets[0]):
                    accs += train_and_test_batched(nets, images, labels, d.images_test, d.labels_test, s, gens,
                                                   self.dsa_param)[2]
                else:
                    accs += [train_and_test(net, images, labels, d.images_test, d.labels_test, s, g,
                                            self.dsa_param)[2] for net, g in zip(nets, gens)]
                bar.update(len(nets))
                if self.stop_requested:
                    bar.close()
                    return None
            bar.close()
            out[arch] = accs
            log.info("%s exp %d it %s: %s %d epochs%s: %.2f%% ± %.2f over %d models (%.1f s)", self.label, exp, it,
                     arch, s.epochs, " (augmented)" if s.augmented else "", 100 * np.mean(accs),
                     100 * np.std(accs), len(accs), time.time() - t0)
        return out

    # ------------------------------------------------------------------ state
    def state(self, exp, next_it, image_syn, label_syn, opt_img, sampler, config) -> dict:
        return {
            "exp": exp, "next_it": next_it,
            "image_syn": image_syn.detach().cpu(), "label_syn": label_syn.cpu(),
            "opt_img": opt_img.state_dict(), "sampler": sampler.state_dict(),
            "rng": rng_state(self.device),
            "accuracies": self.accuracies, "diagnostics": self.diagnostics,
            "data_save": self.data_save, "config": config,
        }

    def _syn_file(self, image_syn, label_syn, exp, it):
        d = self.data
        return {"data": [[image_syn.detach().cpu(), label_syn.cpu()]], "normalized": True,
                "mean": list(d.mean), "std": list(d.std), "dataset": d.name, "method": self.label,
                "model": self.cfg.model, "ipc": self.cfg.ipc, "exp": exp, "iteration": it,
                "channel": d.channel, "im_size": list(d.im_size), "class_names": list(d.class_names)}

    def _res_file(self):
        c = self.cfg
        final = self.final_accuracies()
        return {"data": self.data_save, "accs_all_exps": {k: [float(a) for a in v] for k, v in final.items()},
                "normalized": True, "mean": list(self.data.mean), "std": list(self.data.std),
                "dataset": c.dataset, "method": self.label, "model": c.model, "ipc": c.ipc}

    def final_accuracies(self) -> dict:
        """Accuracies at the last iteration over all finished experiments, by architecture."""
        out = {arch: [] for arch in self.eval_pool}
        last = str(self.cfg.Iteration)
        for exp_acc in self.accuracies.values():
            for arch, accs in exp_acc.get(last, {}).items():
                out.setdefault(arch, []).extend(accs)
        return out

    # ------------------------------------------------------------------ the loop
    def run_all(self, config: dict, resume_state: dict | None = None) -> dict:
        from tqdm import tqdm
        c, d = self.cfg, self.data
        with self.stop:
            start_exp = 0
            if resume_state is not None:
                self.accuracies = resume_state["accuracies"]
                self.diagnostics = resume_state["diagnostics"]
                self.data_save = resume_state["data_save"]
                start_exp = resume_state["exp"]
            for exp in range(start_exp, c.num_exp):
                sampler = self.make_sampler(exp)
                bn_sampler = ClassSampler(d.indices_class, derive_seed(c.seed, "bn", exp))
                image_syn, label_syn = init_synthetic(d, c.ipc, c.init, c.seed, exp, self.device)
                opt_img = torch.optim.SGD([image_syn], lr=c.lr_img, momentum=0.5)
                start_it = 0
                if resume_state is not None and resume_state["exp"] == exp and not resume_state.get("fresh_exp"):
                    with torch.no_grad():
                        image_syn.copy_(resume_state["image_syn"].to(self.device))
                    opt_img.load_state_dict(resume_state["opt_img"])
                    sampler.load_state_dict(resume_state["sampler"])
                    set_rng_state(resume_state["rng"], self.device)
                    start_it = resume_state["next_it"]
                    log.info("resumed experiment %d at iteration %d", exp, start_it)
                self.accuracies.setdefault(str(exp), {})
                self._run_experiment(exp, start_it, sampler, bn_sampler, image_syn, label_syn, opt_img, config, tqdm)
            return self.final_accuracies()

    def _checkpoint(self, exp, next_it, image_syn, label_syn, opt_img, sampler, config):
        self.run.save_checkpoint(self.state(exp, next_it, image_syn, label_syn, opt_img, sampler, config))
        self.run.write_diagnostics(self.diagnostics)

    def _run_experiment(self, exp, start_it, sampler, bn_sampler, image_syn, label_syn, opt_img, config, tqdm):
        c, d = self.cfg, self.data
        eval_its = set(c.eval_it)
        t_cond = t_eval = 0.0
        bar = tqdm(range(start_it, c.Iteration + 1), desc=f"{self.label} exp {exp}", disable=None)
        for it in bar:
            if it in eval_its and str(it) not in self.accuracies[str(exp)]:
                t0 = time.time()
                acc = self.evaluate(image_syn.detach().clone(), label_syn, exp, it)
                t_eval += time.time() - t0
                if acc is None:
                    self._stop(exp, it, image_syn, label_syn, opt_img, sampler, config)
                self.accuracies[str(exp)][str(it)] = acc
                self.run.write_accuracies(self.accuracies)
                self.run.save_grid(denormalize(image_syn.detach().cpu(), d.mean, d.std), exp, it, nrow=c.ipc)
                self._checkpoint(exp, it, image_syn, label_syn, opt_img, sampler, config)
            if it == c.Iteration:
                break
            t0 = time.time()
            with seeded(c.seed, "net", exp, it):
                net = build_model(c.model, d.channel, d.num_classes, d.im_size, ops=c.ops)
            net = net.to(self.device)
            net.train()
            diag = Diagnostics([n for n, _ in net.named_parameters()] if c.method != "DM" else None)
            ctx = StepContext(c, d, sampler, bn_sampler, exp, it, self.device, self.dsa_param, diag)
            self.step(net, image_syn, label_syn, opt_img, ctx)
            row = diag.row(exp, it)
            t_cond += time.time() - t0
            row["seconds"] = round(time.time() - t0, 4)
            if not math.isfinite(row["loss"]) or not bool(torch.isfinite(image_syn).all()):
                self.run.write_diagnostics(self.diagnostics + [row])
                raise NonFiniteError(
                    f"non-finite {'loss' if not math.isfinite(row['loss']) else 'synthetic image'} at experiment "
                    f"{exp} iteration {it} (lr_img {c.lr_img} may be too high, try a tenth of it); the last finite "
                    f"checkpoint is kept in {self.run.path}")
            self.diagnostics.append(row)
            bar.set_postfix(loss=f"{row['loss']:.4f}")
            if it % 10 == 0:
                log.info("%s exp %d iter %04d loss %.4f (%.2f s)", self.label, exp, it, row["loss"], row["seconds"])
            if self.stop_requested:
                self._stop(exp, it + 1, image_syn, label_syn, opt_img, sampler, config)
            if (it + 1) % c.ckpt_every == 0 and (it + 1) not in eval_its:
                self._checkpoint(exp, it + 1, image_syn, label_syn, opt_img, sampler, config)
        log.info("%s exp %d done: condensation %.1f s, evaluation %.1f s (this process)", self.label, exp,
                 t_cond, t_eval)
        self.data_save.append([image_syn.detach().cpu(), label_syn.cpu()])
        self.run.save(self._syn_file(image_syn, label_syn, exp, c.Iteration), f"syn_exp{exp}.pt")
        self.run.save(self._res_file(), f"res_{sampler_tag(c.sampler)}{c.method}_{c.dataset}_{c.model}_{c.ipc}ipc.pt")
        self.run.write_diagnostics(self.diagnostics)
        if exp + 1 < c.num_exp:  # the next experiment starts from scratch: checkpoint its start
            self.run.save_checkpoint(self._next_exp_state(exp + 1, config))

    def _next_exp_state(self, exp, config):
        return {"exp": exp, "next_it": 0, "image_syn": None, "label_syn": None, "opt_img": None, "sampler": None,
                "rng": {}, "accuracies": self.accuracies, "diagnostics": self.diagnostics,
                "data_save": self.data_save, "config": config, "fresh_exp": True}

    def _stop(self, exp, next_it, image_syn, label_syn, opt_img, sampler, config):
        self._checkpoint(exp, next_it, image_syn, label_syn, opt_img, sampler, config)
        raise Interrupted(f"interrupted at experiment {exp} iteration {next_it}; checkpoint saved. "
                          f"Continue with: python {config.get('script', 'main.py')} --resume {self.run.path}")
