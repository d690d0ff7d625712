"""Sources of real batches for the gradient-matching loop.

The contract: ``sample(c, n, it) -> LongTensor`` of dataset indices of class ``c``
for iteration ``it``, drawn with the sampler's own generator; ``state_dict()`` /
``load_state_dict()`` save and restore that generator (resume). Index lists the
samplers hold are kept in ascending dataset order.

* ``ClassSampler`` (DC/DSA/DM): ``n`` random images of the whole class.
* ``ClusterSampler`` (Batch Sampling, the seed's ``get_batches``): one of the
  class's clusters at random, then ``n`` random images of that cluster; a
  cluster smaller than ``n`` gives all of its images.
"""
from __future__ import annotations

import torch

__all__ = ["ClassSampler", "ClusterSampler"]


def _draw(pool: torch.Tensor, n: int, g: torch.Generator) -> torch.Tensor:
    """``min(n, len(pool))`` elements of ``pool`` without replacement, in random order."""
    return pool[torch.randperm(len(pool), generator=g)[:n]]


class ClassSampler:
    """Random images of the requested class (the reference's ``get_images``)."""

    name = "class"

    def __init__(self, indices_class, seed: int):
        self.indices_class = [torch.as_tensor(ix, dtype=torch.long).sort().values for ix in indices_class]
        self.generator = torch.Generator().manual_seed(int(seed))

    def sample(self, c: int, n: int, it: int = 0) -> torch.Tensor:
        return _draw(self.indices_class[c], n, self.generator)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])


class ClusterSampler(ClassSampler):
    """One random cluster of the class per call (Batch Sampling).

    weighting "uniform": every cluster equally likely (the seed); "size": in
    proportion to its size. With ``mix_after`` set, iterations ``it > mix_after``
    draw from the whole class again (the seed's ``--mix``).
    """

    name = "cluster"

    def __init__(self, clusters, seed: int, weighting: str = "uniform", mix_after: int | None = None):
        if weighting not in ("uniform", "size"):
            raise ValueError(f"cluster weighting must be 'uniform' or 'size', got {weighting!r}")
        self.clusters = [[torch.as_tensor(ix, dtype=torch.long).sort().values for ix in per_class]
                         for per_class in clusters]
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
