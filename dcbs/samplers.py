"""Where each class's real batch comes from: the sampler registry.

The gradient-matching loop asks a sampler for the real images of class ``c``;
samplers differ only there. The contract:

* ``sample(c, n, it) -> LongTensor`` of training indices of class ``c``, drawn
  with the sampler's own generator (never the global RNG);
* ``prepare(net, it, outer_step)``: called by the matching step after the network
  is built (and its BatchNorm frozen) and before the per-class gradients of every
  outer step, and once per DM step; the base class does nothing;
* ``state_dict()`` / ``load_state_dict()``: everything a resumed run needs to draw
  exactly the batches an uninterrupted run draws.

A sampler is built by ``setup(cfg, data) -> (make(exp), info)``: ``make`` gives
experiment ``exp`` its sampler, ``info`` (file paths and hashes) goes into the
run's config.json. ``tag`` names runs and result files (``BS`` -> ``BS(DC)``,
``res_BSDC_...``); the plain ``class`` sampler has none.

| name | tag | real batch of class c |
|---|---|---|
| class | | ``n`` random images of the class (DC, DSA, DM) |
| cluster | BS | ``n`` random images of one random cluster (the paper's Batch Sampling) |
| stratified | STRAT | one random image of each of ``batch_real`` K-Means clusters |
| representative | DREAM | the image nearest each of ``batch_real`` K-Means centres (DREAM) |
| pruned | PRUNE | ``n`` random images of the class without its hardest fraction |
| systematic | SYS | ``n`` images at a random start and step ``N / n`` through the class, cluster by cluster |
"""
from __future__ import annotations

import torch

from .cmdline import ConfigError
from .seeding import derive_seed

__all__ = ["Sampler", "ClassSampler", "ClusterSampler", "StratifiedSampler", "RepresentativeSampler",
           "PrunedSampler", "SystematicSampler", "SAMPLERS", "SamplerError", "sampler_tag", "method_label"]


class SamplerError(ConfigError):
    """Sampler settings or files that cannot work; the message says what to change."""


def _draw(pool: torch.Tensor, n: int, g: torch.Generator) -> torch.Tensor:
    """``min(n, len(pool))`` elements of ``pool`` without replacement, in random order."""
    return pool[torch.randperm(len(pool), generator=g)[:n]]


def _sorted(ix) -> torch.Tensor:
    return torch.as_tensor(ix, dtype=torch.long).cpu().sort().values


def _packed(per_class) -> tuple:
    """One class's clusters as (members cluster by cluster, each sorted; cluster sizes)."""
    per = [_sorted(ix) for ix in per_class]
    return torch.cat(per), torch.tensor([len(t) for t in per], dtype=torch.long)


class Sampler:
    """Base: a generator of its own, no preparation."""

    name = ""
    tag = ""

    def __init__(self, seed: int):
        self.generator = torch.Generator().manual_seed(int(seed))

    def sample(self, c: int, n: int, it: int = 0) -> torch.Tensor:
        raise NotImplementedError

    def prepare(self, net, it: int, outer_step: int) -> None:
        pass

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])

    @classmethod
    def setup(cls, cfg, data):
        raise NotImplementedError


def _seed(cfg, exp: int) -> int:
    return derive_seed(cfg.seed, "sampler", exp)


class ClassSampler(Sampler):
    """Random images of the requested class (the reference's ``get_images``)."""

    name = "class"

    def __init__(self, indices_class, seed: int):
        super().__init__(seed)
        self.indices_class = [_sorted(ix) for ix in indices_class]

    def sample(self, c: int, n: int, it: int = 0) -> torch.Tensor:
        return _draw(self.indices_class[c], n, self.generator)

    @classmethod
    def setup(cls, cfg, data):
        return (lambda exp: cls(data.indices_class, _seed(cfg, exp))), {}


class ClusterSampler(ClassSampler):
    """One random cluster of the class per call (Batch Sampling).

    weighting "uniform": every cluster equally likely (the paper); "size": in
    proportion to its size. With ``mix_after`` set, iterations ``it > mix_after``
    draw from the whole class again (the paper's ``--mix``).
    """

    name, tag = "cluster", "BS"

    def __init__(self, clusters, seed: int, weighting: str = "uniform", mix_after: int | None = None):
        if weighting not in ("uniform", "size"):
            raise ValueError(f"cluster weighting must be 'uniform' or 'size', got {weighting!r}")
        self.clusters = [[_sorted(ix) for ix in per_class] for per_class in clusters]
        super().__init__([torch.cat(per_class) for per_class in self.clusters], seed)
        self.weighting = weighting
        self.mix_after = mix_after
        self._weights = [torch.tensor([float(len(ix)) for ix in per_class]) for per_class in self.clusters]

    def pick_cluster(self, c: int) -> int:
        if len(self.clusters[c]) == 1:  # nothing to pick: draw exactly as ClassSampler does
            return 0
        if self.weighting == "size":
            return int(torch.multinomial(self._weights[c], 1, generator=self.generator))
        return int(torch.randint(len(self.clusters[c]), (1,), generator=self.generator))

    def sample(self, c: int, n: int, it: int = 0) -> torch.Tensor:
        if self.mix_after is not None and it > self.mix_after:
            return super().sample(c, n, it)
        return _draw(self.clusters[c][self.pick_cluster(c)], n, self.generator)

    @classmethod
    def setup(cls, cfg, data):
        from .sampler_files import cluster_source
        clusters, info = cluster_source(cfg, data, k=cfg.num_cluster, norm=cfg.norm)
        mix_after = cfg.mix_after if cfg.mix else None
        return (lambda exp: cls(clusters, _seed(cfg, exp), cfg.cluster_weighting, mix_after)), info


class StratifiedSampler(Sampler):
    """One random image from every cluster of the class: a batch that covers the whole class.

    The clusters are plain K-Means with k = ``batch_real`` per class; ``n`` below k
    keeps a random subset of the clusters.
    """

    name, tag = "stratified", "STRAT"

    def __init__(self, clusters, seed: int):
        super().__init__(seed)
        self.members, self.offsets, self.sizes = [], [], []
        for per_class in clusters:
            members, sizes = _packed(per_class)
            self.members.append(members)
            self.sizes.append(sizes)
            self.offsets.append(torch.cumsum(sizes, 0) - sizes)

    def sample(self, c: int, n: int, it: int = 0) -> torch.Tensor:
        sizes = self.sizes[c]
        u = torch.rand(len(sizes), generator=self.generator, dtype=torch.float64)
        pos = self.offsets[c] + torch.minimum((u * sizes).long(), sizes - 1)
        pick = self.members[c][pos]
        return pick if n >= len(pick) else pick[torch.randperm(len(pick), generator=self.generator)[:n]]

    @classmethod
    def setup(cls, cfg, data):
        from .sampler_files import cluster_source
        k = cfg.num_cluster if "num_cluster" in cfg.explicit or cfg.cluster_file else cfg.batch_real
        small = [c for c, n in enumerate(data.class_counts) if n < cfg.batch_real]
        if small:
            raise SamplerError(f"--sampler stratified takes one image from each of --batch_real {cfg.batch_real} "
                               f"clusters, but class(es) {small} hold fewer images (smallest "
                               f"{min(data.class_counts)}); lower --batch_real")
        if cfg.norm:
            raise SamplerError("--sampler stratified uses plain K-Means clusters (k = --batch_real); drop --norm")
        clusters, info = cluster_source(cfg, data, k=cfg.batch_real, norm=False, found_k=k)
        return (lambda exp: cls(clusters, _seed(cfg, exp))), info


class RepresentativeSampler(Sampler):
    """DREAM's rule: the image nearest each of ``batch_real`` K-Means centres of the class.

    ``embed="features"``: precomputed partitions of fixed extractor features (one
    drawn per call). ``embed="net"``: K-Means on the current matching network's
    embedding, redone every ``interval`` outer steps (``prepare``), the chosen
    indices kept until the next clustering.
    """

    name, tag = "representative", "DREAM"

    def __init__(self, seed: int, partitions=None, indices_class=None, images=None, k: int = 0,
                 candidates: int | None = None, interval: int = 10, outer_loop: int = 1):
        super().__init__(seed)
        self.partitions = partitions
        self.indices_class = [_sorted(ix) for ix in indices_class] if indices_class is not None else None
        self.images, self.k, self.candidates = images, k, candidates
        self.interval, self.outer_loop = interval, outer_loop
        self.chosen = None          # per class LongTensor (net mode)
        self.clustered_at = None    # outer step (it * outer_loop + step) of the last clustering (net mode)

    def sample(self, c: int, n: int, it: int = 0) -> torch.Tensor:
        if self.partitions is not None:
            reps = self.partitions[c]
            row = reps[int(torch.randint(len(reps), (1,), generator=self.generator))]
        else:
            if self.chosen is None:
                raise RuntimeError("RepresentativeSampler(embed='net'): prepare() was not called before sample()")
            row = self.chosen[c]
        return row if n >= len(row) else row[:n]

    def prepare(self, net, it: int, outer_step: int) -> None:
        if self.partitions is not None:
            return
        step = it * self.outer_loop + outer_step
        if self.chosen is not None and step - self.clustered_at < self.interval:
            return
        from .selection import nearest_to_centres
        chosen = []
        was = [m.training for m in net.modules()]
        net.eval()     # no BatchNorm statistic moves, no augmentation
        try:
            with torch.no_grad():
                for ix in self.indices_class:
                    pool = ix
                    if self.candidates is not None and self.candidates < len(ix):
                        pool = ix[torch.randperm(len(ix), generator=self.generator)[:self.candidates]].sort().values
                    emb = torch.cat([net.embed(self.images[pool[i:i + 512].to(self.images.device)].float())
                                     for i in range(0, len(pool), 512)])
                    seed = int(torch.randint(2 ** 31 - 1, (1,), generator=self.generator))
                    chosen.append(pool[torch.from_numpy(nearest_to_centres(emb.float().cpu().numpy(), self.k, seed))])
        finally:
            for m, t in zip(net.modules(), was):
                m.training = t
        self.chosen, self.clustered_at = chosen, step

    def state_dict(self) -> dict:
        return {**super().state_dict(), "chosen": self.chosen, "clustered_at": self.clustered_at}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.chosen, self.clustered_at = state.get("chosen"), state.get("clustered_at")

    @classmethod
    def setup(cls, cfg, data):
        small = [c for c, n in enumerate(data.class_counts) if n < cfg.batch_real]
        if small:
            raise SamplerError(f"--sampler representative picks --batch_real {cfg.batch_real} images per class, but "
                               f"class(es) {small} hold fewer; lower --batch_real")
        if cfg.rep_embed == "net":
            outer = cfg.outer_loop if cfg.method != "DM" else 1
            if cfg.candidates is not None and cfg.candidates < cfg.batch_real:
                raise SamplerError(f"--candidates {cfg.candidates} < --batch_real {cfg.batch_real}: K-Means needs at "
                                   f"least one candidate per cluster")

            return (lambda exp: cls(_seed(cfg, exp), indices_class=data.indices_class, images=data.images_train,
                                    k=cfg.batch_real, candidates=cfg.candidates, interval=cfg.interval,
                                    outer_loop=outer)), {}
        from .sampler_files import partition_source
        reps, info = partition_source(cfg, data)
        return (lambda exp: cls(_seed(cfg, exp), partitions=reps)), info


class PrunedSampler(ClassSampler):
    """DC's uniform draw from the class without its hardest ``ceil(f * n_c)`` images (by extractor loss)."""

    name, tag = "pruned", "PRUNE"

    def __init__(self, indices_class, scores: torch.Tensor, fraction: float, seed: int):
        from .selection import keep_easy
        super().__init__([keep_easy(ix, scores, fraction) for ix in indices_class], seed)

    @classmethod
    def setup(cls, cfg, data):
        from .sampler_files import score_source
        scores, info = score_source(cfg, data)
        if min(len(ix) for ix in cls(data.indices_class, scores, cfg.prune_hard, 0).indices_class) < 1:
            raise SamplerError(f"--prune_hard {cfg.prune_hard} leaves a class without images; lower it")
        return (lambda exp: cls(data.indices_class, scores, cfg.prune_hard, _seed(cfg, exp))), info


class SystematicSampler(Sampler):
    """DC's inclusion probability, spread over the clusters: survey sampling's systematic sample.

    Per call the class's ``N`` images are listed cluster by cluster (the clusters in
    random order, the members of each in random order) and ``n`` of them taken at
    positions ``floor(u + j * N / n)``, ``u`` uniform in ``[0, N / n)``. Every image is
    in the batch with probability ``n / N``, as in DC (no outlier cluster is always
    in), and a cluster of ``m`` images gets ``floor(m n / N)`` or ``ceil(m n / N)`` of
    them in every draw (proportional allocation). Any partition works: plain
    K-Means with k = ``batch_real`` by default (the file ``stratified`` reads).
    """

    name, tag = "systematic", "SYS"

    def __init__(self, clusters, seed: int):
        super().__init__(seed)
        self.members, self.labels, self.counts = [], [], []
        for per_class in clusters:
            members, sizes = _packed(per_class)
            self.members.append(members)
            self.labels.append(torch.repeat_interleave(torch.arange(len(sizes)), sizes))
            self.counts.append(len(sizes))

    def frame(self, c: int) -> torch.Tensor:
        """The class's images, cluster by cluster: clusters and members each in a random order."""
        members, n_all = self.members[c], len(self.members[c])
        rank = torch.randperm(self.counts[c], generator=self.generator)
        key = rank[self.labels[c]] * n_all + torch.randperm(n_all, generator=self.generator)
        return members[torch.argsort(key)]

    def sample(self, c: int, n: int, it: int = 0) -> torch.Tensor:
        frame = self.frame(c)
        n_all = len(frame)
        if n >= n_all:
            return frame
        step = n_all / n
        u = float(torch.rand(1, generator=self.generator, dtype=torch.float64)) * step
        pos = torch.floor(u + torch.arange(n, dtype=torch.float64) * step).long().clamp_(max=n_all - 1)
        return frame[pos]

    @classmethod
    def setup(cls, cfg, data):
        from .sampler_files import cluster_source
        k = cfg.num_cluster if "num_cluster" in cfg.explicit else cfg.batch_real
        clusters, info = cluster_source(cfg, data, k=k, norm=cfg.norm)
        return (lambda exp: cls(clusters, _seed(cfg, exp))), info


SAMPLERS = {s.name: s for s in (ClassSampler, ClusterSampler, StratifiedSampler, RepresentativeSampler,
                                PrunedSampler, SystematicSampler)}


def sampler_tag(name: str) -> str:
    return SAMPLERS[name].tag


def method_label(method: str, sampler: str) -> str:
    """``DC``, ``BS(DC)``, ``STRAT(DSA)``, ...: how runs, tables and plots name a method and sampler."""
    tag = sampler_tag(sampler)
    return f"{tag}({method})" if tag else method
