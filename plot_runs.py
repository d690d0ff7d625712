"""Figures from run directories: per-layer gradient L2 norms and matching-loss curves (the paper's Figs. 6, 7).

    python plot_runs.py results/DC_run results/BS-DC_k20_l3_run --name k20 --smooth 10

writes ``<out>/<name>_grad_norms.png`` (grouped bars: mean real / synthetic gradient
norm per weight tensor, one bar per run), ``<out>/<name>_grad_norms_iter.png`` (the
same over iterations) and ``<out>/<name>_loss.png`` (matching loss, one line per run),
and prints their paths. DM runs have no gradient norms: they are in the loss figure only.
When the runs saved their synthetic sets, ``<out>/<name>_synthetic.png`` shows them side by
side (Figure 5).

With ``--features CKPT`` (a network trained on the whole training set, e.g. the ConvNet of
``main_cluster.py --model ConvNet --train_extractor``) it also draws Figure 8: one class's
real and synthetic images in that network's feature space, one panel per run, one shared
t-SNE (``<out>/<name>_features_<class>.png`` and a JSON of distances beside it):

    python plot_runs.py results/DC_run results/BS_run --name DC_vs_BS --features checkpoints/ConvNet_CIFAR10.pt
"""
import sys

from dcbs.plot_cli import main

if __name__ == "__main__":
    sys.exit(main())
