"""The paper's study from one command: its tables' grids as runs, then the tables.

    python reproduce.py table1 --preset cpu --ipc 1            # DC, DSA, BS(DC) k=20 layer 3
    python reproduce.py all --executor local --jobs 4           # Tables 1-3, shared cells once
    python reproduce.py all --executor slurm --slurm_partition gpu --dry_run
    python reproduce.py aggregate                               # results/tables.md
    python reproduce.py figures --features checkpoints/ConvNet_CIFAR10.pt   # Figures 5-8

Each cell is a main.py / main_BS.py / main_cluster.py command line run as a
subprocess (see dcbs/sweep.py for the grids, the waves and the executors, and
dcbs/tables.py for the aggregation). Flags after ``--`` go to every main.py /
main_BS.py run. Running the same command again skips what is finished and
continues what is not.
"""
import sys

from dcbs.reproduce_cli import main

if __name__ == "__main__":
    sys.exit(main())
