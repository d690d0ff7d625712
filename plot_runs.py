"""Figures from run directories: per-layer gradient L2 norms and matching-loss curves (seed Figs. 6, 7).

    python plot_runs.py results/DC_run results/BS-DC_k20_l3_run --name k20 --smooth 10

writes ``<out>/<name>_grad_norms.png`` (grouped bars: mean real / synthetic gradient
norm per weight tensor, one bar per run), ``<out>/<name>_grad_norms_iter.png`` (the
same over iterations) and ``<out>/<name>_loss.png`` (matching loss, one line per run),
and prints their paths. DM runs have no gradient norms: they are in the loss figure only.
"""
import argparse
import sys

from dcbs.plots import PlotError, plot_runs


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(2, f"error: {message} (see {self.prog} -h)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(description="Plot gradient L2 norms and matching loss of main.py / main_BS.py runs",
                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories (config.json + diagnostics.csv)")
    p.add_argument("--out", default="results/figures", help="folder of the PNG files")
    p.add_argument("--name", default="runs", help="file name prefix: <out>/<name>_loss.png, ...")
    p.add_argument("--exp", type=int, default=0, help="which experiment of each run")
    p.add_argument("--smooth", type=int, default=1, help="moving average over N iterations (1: none)")
    p.add_argument("--all_params", action="store_true",
                   help="also plot 1-D tensors (biases, normalisation parameters)")
    p.add_argument("--no_lines", action="store_true", help="skip the gradient-norm-over-iterations figure")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        paths = plot_runs(args.runs, out=args.out, name=args.name, exp=args.exp, smooth=args.smooth,
                          all_params=args.all_params, lines=not args.no_lines)
    except PlotError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for path in paths:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
