"""Batch Sampling, step 1 (the paper, 3.1 and 3.4.1): per-class clusters of extractor features.

    python main_cluster.py --dataset CIFAR10 --layer_idx 3 --num_cluster 20 [--norm]

1. loads the training set (no augmentation) and checks the settings against it;
2. loads the feature extractor ``<cluster_path>/<model>_<dataset>.pt`` (or
   ``--extractor PATH``, e.g. the paper's ``resnet18_cifar.pt``), or trains it
   first with ``--train_extractor`` (``--pretrained imagenet`` for the paper's
   ImageNet-initialised ResNet18BN; ``--resume`` continues an interrupted training);
3. maps every training image to the global-average-pooled output of stage
   ``--layer_idx`` and clusters each class with K-Means, or with
   size-constrained K-Means (``--norm``: sizes within n_c // k +- ``--margin``);
4. writes the cluster file ``main_BS.py`` reads (``dcbs.clusters.cluster_file_name``)
   and, under ``--results_path``, the views of the paper's Figure 2: a grid of
   each cluster's images for one class, a t-SNE/PCA of its features coloured by
   cluster, the log, and the resolved configuration (JSON).
"""
import sys

from dcbs.cluster_cli import main

if __name__ == "__main__":
    sys.exit(main())
