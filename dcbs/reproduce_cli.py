"""reproduce.py's command line: the sweep of the paper's tables and its subcommands (aggregate, figures, study,
demo).

``main`` dispatches on the first word and returns the exit code (0; 1 when a job failed; 2 on a bad setting;
130 when interrupted). The usage text is reproduce.py's docstring; the grids and executors are dcbs/sweep.py's.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

from dcbs.cmdline import Parser, print_paths
from dcbs import sweep
from dcbs.sweep import SweepError

WHAT = ["table1", "table2", "table3", "all", "samplers"]
SLURM_FLAGS = ("slurm_partition", "slurm_time", "slurm_gpus_per_node", "slurm_cpus_per_task", "slurm_mem_gb",
               "slurm_array_parallelism", "slurm_account", "slurm_qos", "slurm_constraint", "slurm_setup")


def build_parser() -> argparse.ArgumentParser:
    from dcbs.config import PRESETS
    from dcbs.data import DATASETS
    p = Parser(prog="reproduce.py",
                description="Run the paper's Tables 1-3 (cells shared between tables run once), or "
                            "aggregate finished runs into results/tables.md. Flags after '--' go to every "
                            "main.py / main_BS.py run and name it (a hash suffix), except --ckpt_every.")
    a = p.add_argument
    a("what", choices=WHAT, help="table1: DC, DSA, BS(DC) k=20 layer 3; table2: BS k 5-25 layer 2 + DC; "
                                 "table3: BS layer 0-3 k=20 + DC; all: the three; samplers: DC with every real-batch "
                                 "sampler (class, cluster, stratified, representative, pruned, systematic; "
                                 "results/samplers.md) "
                                 "(also: 'aggregate', 'figures', 'study' and 'demo', each with its own -h)")
    a("--dataset", choices=list(DATASETS), default=None,
      help="dataset (default CIFAR10, or the preset's own dataset: digits for demo and smoke)")
    a("--data_path", default="data", help="torchvision root or ImageFolder tree, passed to every run")
    a("--save_path", default=os.path.join("results", "sweep"), help="run directories and sweep.json go here")
    a("--cluster_path", default="checkpoints", help="cluster files and the feature extractor")
    a("--cluster_model", default=sweep.DEFAULT_CLUSTER_MODEL, choices=["ResNet18", "ResNet18BN", "ConvNet"],
      help="feature extractor: main_cluster.py --model and main_BS.py --cluster_model")
    a("--margin", type=int, default=sweep.BS_NORM_MARGIN,
      help="size margin of the --norm clusters (the paper's 50; small datasets such as digits need less)")
    a("--preset", default="none", choices=list(PRESETS) + ["none"],
      help="reduced protocol passed to every run; none = the published protocol")
    a("--seed", type=int, nargs="+", default=[0], help="--seed of the condensation runs, one run per seed and cell "
                                                        "(clusters: main_cluster.py's seed 0)")
    a("--ipc", type=int, nargs="+", help="only these ipc (of 1 10 50)")
    a("--k", type=int, nargs="+", help="only Batch Sampling cells with these k")
    a("--layers", type=int, nargs="+", help="only Batch Sampling cells with these feature layers")
    a("--methods", nargs="+", choices=["DC", "DSA", "BS", "STRAT", "DREAM", "PRUNE", "SYS"],
      help="only these methods (BS = BS(DC); STRAT, DREAM, PRUNE, SYS: the samplers grid)")
    a("--num_threads", type=int, help="--num_threads of every condensation run")
    a("--device", help="--device of every run (auto, cpu, cuda, cuda:N)")
    a("--train_extractor", action="store_true",
      help="when the extractor checkpoint is missing, the first clustering job trains it (the others wait)")
    a("--extractor_args", default="", help="extra main_cluster.py flags for the job that trains the extractor, "
                                           "e.g. '--pretrained imagenet --extractor_epochs 30' (one string)")
    a("--cluster_args", default="", help="extra main_cluster.py flags for every clustering job (one string)")
    a("--executor", default="inline", choices=["inline", "local", "slurm"],
      help="inline: one subprocess after another; local: submitit LocalExecutor, --jobs at once; "
           "slurm: submitit SlurmExecutor, each wave one job array")
    a("--jobs", type=int, default=1, help="local: jobs at once (GPUs, when present, are shared round-robin)")
    a("--dry_run", action="store_true", help="print the jobs (and the SLURM parameters) and run nothing")
    s = p.add_argument_group("SLURM (--executor slurm)")
    s.add_argument("--slurm_partition", help="partition")
    s.add_argument("--slurm_time", type=int, help="time limit per job, minutes (default 2880)")
    s.add_argument("--slurm_gpus_per_node", type=int, help="GPUs per job (default 1)")
    s.add_argument("--slurm_cpus_per_task", type=int, help="CPUs per job (default 8)")
    s.add_argument("--slurm_mem_gb", type=int, help="memory per job in GB (default: the partition's)")
    s.add_argument("--slurm_array_parallelism", type=int, help="jobs of one array running at once (default 32)")
    s.add_argument("--slurm_account", help="account")
    s.add_argument("--slurm_qos", help="quality of service")
    s.add_argument("--slurm_constraint", help="node constraint")
    s.add_argument("--slurm_setup", action="append", help="shell line run before each job (repeatable), "
                                                          "e.g. 'source ~/venv/bin/activate'")
    return p


def build_aggregate_parser() -> argparse.ArgumentParser:
    from dcbs.data import DATASETS
    p = Parser(prog="reproduce.py aggregate",
                description="Tables 1-3 from finished run directories, next to the published numbers.")
    p.add_argument("--save_path", nargs="+", default=[os.path.join("results", "sweep")],
                   help="folders of run directories")
    p.add_argument("--out", default=os.path.join("results", "tables.md"), help="markdown file written (atomically)")
    p.add_argument("--dataset", nargs="+", choices=list(DATASETS),
                   help="datasets to tabulate (default: those of the runs found, else CIFAR10)")
    return p


def build_figures_parser() -> argparse.ArgumentParser:
    from dcbs.data import DATASETS
    p = Parser(prog="reproduce.py figures",
                description="Figures 5-8 from finished run directories: synthetic images (5), gradient norms "
                            "and loss by k (6) and by layer (7), one class's feature distribution (8). One set "
                            "per dataset, ipc, preset and seed.")
    p.add_argument("--save_path", nargs="+", default=[os.path.join("results", "sweep")],
                   help="folders of run directories")
    p.add_argument("--out", default=os.path.join("results", "figures"), help="folder of the PNG files")
    p.add_argument("--dataset", nargs="+", choices=list(DATASETS), help="only these datasets")
    p.add_argument("--features", default=os.path.join("checkpoints", "ConvNet_{dataset}.pt"),
                   help="Figure 8's network trained on the whole training set ({dataset} is filled in); "
                        "Figure 8 is skipped, with the command that makes it, when the file is missing")
    p.add_argument("--feature_class", help="Figure 8's class, index or name (default: cat, as the paper)")
    p.add_argument("--feature_real", type=int, default=1000, help="real images of that class in Figure 8")
    p.add_argument("--smooth", type=int, default=5, help="moving average of the curves over N iterations")
    p.add_argument("--device", default="cpu", help="device of Figure 8's feature pass")
    return p


def run_figures(argv) -> int:
    from dcbs.figures import make_figures
    from dcbs.plots import PlotError
    args = build_figures_parser().parse_args(argv)
    return print_paths(lambda: make_figures(args.save_path, args.out, args.features, args.feature_class,
                                            args.feature_real, args.dataset, args.smooth, args.device,
                                            log=lambda m: print(m, file=sys.stderr)), PlotError)


def build_study_parser() -> argparse.ArgumentParser:
    p = Parser(prog="reproduce.py study",
                description="The sampler study (results/samplers.md) from run directories: per dataset, ipc and "
                            "preset each sampler's accuracy over seeds and its paired difference with DC, seed by "
                            "seed; accuracy per evaluation iteration; cost per iteration. Prints the markdown.")
    p.add_argument("--save_path", nargs="+", default=[os.path.join("results", "real", "samplers")],
                   help="folders of run directories")
    p.add_argument("--out", help="also write the markdown to this file (atomically)")
    p.add_argument("--figures", metavar="DIR", help="folder of the PNG files: accuracy against iteration and "
                                                    "against condensation time, one per dataset and ipc; real and "
                                                    "synthetic gradient norms per layer (Figures 6 and 7), one "
                                                    "bar or line per sampler, one pair per seed")
    return p


def run_study(argv) -> int:
    from dcbs.io import atomic_write_text
    from dcbs.study import collect, plot, render_markdown
    args = build_study_parser().parse_args(argv)
    missing = [p for p in args.save_path if not os.path.isdir(p)]
    if len(missing) == len(args.save_path):
        raise SweepError(f"--save_path {' '.join(missing)}: no such folder")
    records = collect(args.save_path)
    figures = plot(records, args.figures) if args.figures else []
    md = render_markdown(records, args.save_path, figures=figures)
    print(md)
    if args.out:
        atomic_write_text(args.out, md)
    done = sum(r.done for r in records)
    for path in [args.out] * bool(args.out) + figures:
        print(path, file=sys.stderr)
    print(f"{done} finished and {len(records) - done} unfinished run(s) read from {', '.join(args.save_path)}",
          file=sys.stderr)
    return 0


def build_demo_parser() -> argparse.ArgumentParser:
    p = Parser(prog="reproduce.py demo",
                description="The whole method on scikit-learn's digits in a few minutes on a CPU: main_cluster.py "
                            "(a small ConvNet extractor, k clusters per class, Figure 2 view), main.py (DC) and "
                            "main_BS.py (BS(DC)) under the same reduced protocol, plot_runs.py (gradient norms per "
                            "layer), then the table. The same command again reuses what is finished.")
    p.add_argument("--save_path", default=os.path.join("results", "demo"), help="the demo's folder")
    p.add_argument("--num_cluster", type=int, default=5, help="k, clusters per class (digits: about 125 per class)")
    p.add_argument("--seed", type=int, default=0, help="--seed of every step")
    p.add_argument("--num_threads", type=int, default=1, help="torch threads of each process (two run at once)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="--device of every step")
    p.add_argument("--smoke", action="store_true", help="seconds instead of minutes: --preset smoke and a "
                                                        "two-step extractor (a test of the pipeline, not a result)")
    return p


def run_demo(argv) -> int:
    from dcbs.demo import DemoError, DemoSettings, run_demo as demo
    args = build_demo_parser().parse_args(argv)
    try:
        return demo(DemoSettings(**vars(args)))
    except DemoError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def slurm_parameters(args) -> dict:
    """The submitit SlurmExecutor parameters of every job of this sweep (nothing is submitted)."""
    given = {k: getattr(args, f"slurm_{k}") for k in ("partition", "time", "gpus_per_node", "cpus_per_task",
                                                      "mem_gb", "array_parallelism", "account", "qos", "constraint",
                                                      "setup")}
    given = {k: v for k, v in given.items() if v is not None}
    if "time" in given:
        given["time_min"] = given.pop("time")
    return sweep.slurm_parameters(**given)


def settings_from_args(args, extra) -> sweep.Settings:
    import shlex
    from dcbs.config import PRESETS
    preset = None if args.preset == "none" else args.preset
    dataset = args.dataset or (PRESETS[preset].get("dataset") if preset else None) or "CIFAR10"
    return sweep.Settings(dataset=dataset, data_path=args.data_path, save_path=args.save_path,
                          cluster_path=args.cluster_path, cluster_model=args.cluster_model, margin=args.margin,
                          preset=preset, seed=args.seed[0], num_threads=args.num_threads, device=args.device,
                          extra=tuple(extra),
                          cluster_args=tuple(shlex.split(args.cluster_args)), train_extractor=args.train_extractor,
                          extractor_args=tuple(shlex.split(args.extractor_args)))


def check_args(args) -> None:
    if args.jobs < 1:
        raise SweepError(f"--jobs must be at least 1 (got {args.jobs})")
    if args.jobs > 1 and args.executor != "local":
        raise SweepError("--jobs applies to --executor local; add --executor local or drop --jobs")
    given = [f"--{f}" for f in SLURM_FLAGS if getattr(args, f) is not None]
    if given and args.executor != "slurm":
        raise SweepError(f"{' '.join(given)} apply to --executor slurm; add it or drop them")
    for f in ("slurm_time", "slurm_gpus_per_node", "slurm_cpus_per_task", "slurm_mem_gb", "slurm_array_parallelism"):
        v = getattr(args, f)
        if v is not None and v < (0 if f == "slurm_gpus_per_node" else 1):
            raise SweepError(f"--{f} must be {'>= 0' if f == 'slurm_gpus_per_node' else 'at least 1'} (got {v})")
    if args.extractor_args and not args.train_extractor:
        raise SweepError("--extractor_args apply with --train_extractor; add it or drop --extractor_args")
    if args.margin < 0:
        raise SweepError(f"--margin must be >= 0 (got {args.margin})")
    if args.num_threads is not None and args.num_threads < 1:
        raise SweepError(f"--num_threads must be at least 1 (got {args.num_threads})")
    if args.device and args.device not in ("auto", "cpu") and not args.device.startswith("cuda"):
        raise SweepError(f"--device must be auto, cpu, cuda or cuda:N (got {args.device!r})")


def run_sweep(argv, extra) -> int:
    args = build_parser().parse_args(argv)
    check_args(args)
    s = settings_from_args(args, extra)
    tables = list(sweep.PAPER_TABLES) if args.what == "all" else [args.what]
    plan = sweep.make_plan(tables, s, args.ipc, args.k, args.layers, args.methods, seeds=args.seed)
    for line in sweep.describe(plan):
        print(line)
    params = slurm_parameters(args) if args.executor == "slurm" else None
    if params is not None:
        import json
        print("SLURM parameters (submitit SlurmExecutor.update_parameters): " + json.dumps(params, sort_keys=True))
    if args.dry_run:
        print("dry run: nothing was run")
        return 0
    if not plan.waves:
        print(f"nothing to run: every job is finished. Tables: python reproduce.py aggregate --save_path {s.save_path}")
        return 0
    entry = sweep.manifest_entry(plan, ["reproduce.py", *argv, *(["--", *extra] if extra else [])], args.executor)
    manifest = sweep.write_manifest(s.save_path, entry)
    print(f"sweep manifest: {manifest}")
    runner = sweep.Runner(args.executor, args.jobs, folder=os.path.join(s.save_path, ".submitit"),
                          slurm_params=params)

    def record(results):
        for j in entry["jobs"]:
            if j["name"] in results:
                rc = results[j["name"]]
                j["result"] = "finished" if rc == 0 else ("not run or lost" if rc is None else f"failed (exit {rc})")
        sweep.write_manifest(s.save_path, entry)

    try:
        results = runner.run(plan, on_wave_end=record)
    except KeyboardInterrupt:
        print("interrupted: run the same command again to continue (finished runs are skipped, "
              "unfinished ones resume from their checkpoints)", file=sys.stderr)
        return 130
    entry["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    record(results)
    bad = [n for n, rc in results.items() if rc != 0]
    if bad:
        print(f"{len(bad)} of {len(results)} job(s) did not finish: {', '.join(bad)}. Their logs: the run "
              f"directories' log.txt, {os.path.join(s.save_path, 'clusters')} for clustering"
              f"{', ' + os.path.join(s.save_path, '.submitit') if args.executor != 'inline' else ''}. "
              f"Run the same command again to retry them.", file=sys.stderr)
        return 1
    print(f"all {len(results)} job(s) finished. Tables: python reproduce.py aggregate --save_path {s.save_path}")
    return 0


def run_aggregate(argv) -> int:
    from dcbs.tables import write_tables
    args = build_aggregate_parser().parse_args(argv)
    out, runs = write_tables(args.save_path, args.out, args.dataset)
    done = sum(r.done for r in runs)
    print(f"{out}: {done} finished and {len(runs) - done} unfinished run(s) read from {', '.join(args.save_path)}")
    return 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1:]
    subcommands = {"aggregate": run_aggregate, "demo": run_demo, "figures": run_figures, "study": run_study}
    try:
        if argv[:1] and argv[0] in subcommands:
            if extra:
                raise SweepError(f"{argv[0]} takes no flags after '--'")
            return subcommands[argv[0]](argv[1:])
        return run_sweep(argv, extra)
    except SweepError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

