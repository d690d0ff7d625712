"""Batch Sampling: DC (or DSA) whose real batch per class comes from one random cluster.

    python main_cluster.py --dataset CIFAR10 --layer_idx 3 --num_cluster 20   # the clusters first
    python main_BS.py --ipc 10 --layer_idx 3 --num_cluster 20

The gradient-matching loop is the one main.py uses; only the sampler differs.
"""
import sys

from dcbs.cli import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], default_sampler="cluster"))
