"""plot_runs.py's command line: Figures 5-7 from run directories, and Figure 8 with ``--features``.

``main`` returns the exit code (0, or 2 on a bad flag combination or run directory); the usage text is
plot_runs.py's docstring, the drawing is dcbs/plots.py's and dcbs/featfig.py's.
"""
import argparse
import sys

from dcbs.cmdline import Parser, print_paths
from dcbs.plots import PlotError, plot_runs


def build_parser() -> argparse.ArgumentParser:
    p = Parser(description="Plot gradient L2 norms and matching loss of main.py / main_BS.py runs")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories (config.json + diagnostics.csv)")
    p.add_argument("--out", default="results/figures", help="folder of the PNG files")
    p.add_argument("--name", default="runs", help="file name prefix: <out>/<name>_loss.png, ...")
    p.add_argument("--exp", type=int, default=0, help="which experiment of each run")
    p.add_argument("--smooth", type=int, default=1, help="moving average over N iterations (1: none)")
    p.add_argument("--all_params", action="store_true",
                   help="also plot 1-D tensors (biases, normalisation parameters)")
    p.add_argument("--no_lines", action="store_true", help="skip the gradient-norm-over-iterations figure")
    f = p.add_argument_group("Figure 8 (feature distribution of one class)")
    f.add_argument("--features", metavar="CKPT", help="network trained on the whole training set whose "
                   "pre-classifier features are embedded; enables Figure 8")
    f.add_argument("--feature_model", help="its architecture (default: recorded in the checkpoint, else ConvNet)")
    f.add_argument("--feature_class", help="class index or name (default: cat, the paper's, else class 0)")
    f.add_argument("--feature_real", type=int, default=1000, help="real images of the class drawn (seeded)")
    f.add_argument("--embedding", default="tsne", choices=["tsne", "pca"], help="2-D embedding")
    f.add_argument("--data_path", help="the runs' dataset (default: the first run's --data_path)")
    f.add_argument("--seed", type=int, default=0, help="seed of the real-image draw and of t-SNE")
    f.add_argument("--device", default="cpu", help="cpu or cuda")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    given = [f"--{k}" for k in ("feature_model", "feature_class", "data_path") if getattr(args, k) is not None]
    if given and not args.features:
        print(f"error: {', '.join(given)} apply to Figure 8; add --features CKPT or drop them", file=sys.stderr)
        return 2
    def make():
        paths = plot_runs(args.runs, out=args.out, name=args.name, exp=args.exp, smooth=args.smooth,
                          all_params=args.all_params, lines=not args.no_lines)
        if args.features:
            from dcbs.featfig import figure8
            from dcbs.plots import load_runs
            paths += figure8(load_runs(args.runs, args.exp), args.features, args.out, args.name,
                             args.feature_class, args.feature_real, args.embedding, args.seed, args.exp,
                             args.data_path, args.feature_model, args.device, log=lambda m: print(m, file=sys.stderr))
        return paths
    return print_paths(make, PlotError)

