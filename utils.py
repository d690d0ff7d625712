"""The names the paper's listings call, in one place.

Each concern lives in its own module of the ``dcbs`` package; this file
re-exports them under the reference code's names so that code written against
the public DC/DSA/DM ``utils.py`` (and the paper's listings) keeps working:

    datasets ............ dcbs/data.py       get_dataset, load_data, data_fingerprint, denormalize
    networks ............ networks.py        get_network
    real batches ........ dcbs/samplers.py   get_images, ClassSampler, ClusterSampler
    matching loss ....... dcbs/matching.py   match_loss, distance_wb, get_loops
    augmentation ........ dcbs/augment.py    ParamDiffAug, DiffAugment, get_daparam, augment
    training/evaluation . dcbs/evaluate.py   epoch, evaluate_synset, get_eval_pool
    the loop ............ dcbs/condense.py   Condenser, gradient_matching_step, distribution_matching_step
    seeds ............... dcbs/seeding.py    derive_seed
    files ............... dcbs/io.py, dcbs/rundir.py
"""
import time

import torch

from dcbs.fast_ops import build_model
from dcbs.augment import DiffAugment, ParamDiffAug, augment, get_daparam
from dcbs.condense import Condenser, distribution_matching_step, gradient_matching_step
from dcbs.data import data_fingerprint, denormalize, get_dataset, load_data
from dcbs.evaluate import epoch, evaluate_synset, get_eval_pool
from dcbs.matching import distance_wb, get_loops, match_loss
from dcbs.samplers import ClassSampler, ClusterSampler
from dcbs.seeding import derive_seed

__all__ = ["get_dataset", "load_data", "data_fingerprint", "denormalize", "get_network", "get_images",
           "ClassSampler", "ClusterSampler", "match_loss", "distance_wb", "get_loops", "ParamDiffAug",
           "DiffAugment", "get_daparam", "augment", "epoch", "evaluate_synset", "get_eval_pool", "Condenser",
           "gradient_matching_step", "distribution_matching_step", "derive_seed", "get_time"]


def get_network(model, channel, num_classes, im_size=(32, 32)):
    """Model by name (see networks.MODELS); seed torch first for a fixed initialisation."""
    return build_model(model, channel, num_classes, im_size)


def get_images(images_all, indices_class, c, n, generator=None):
    """``n`` random images of class ``c`` (the paper's ``get_images``)."""
    ix = torch.as_tensor(indices_class[c])
    pick = ix[torch.randperm(len(ix), generator=generator)[:n]]
    return images_all[pick.to(images_all.device)]


def get_time():
    return time.strftime("[%Y-%m-%d %H:%M:%S]", time.localtime())
