"""DC / DSA / DM baselines: condense a dataset and evaluate the synthetic set.

    python main.py --method DSA --dataset CIFAR10 --ipc 10
    python main.py --preset demo            # embedded digits, a few minutes on a CPU

See README.md for every flag; ``python main.py -h`` lists them with defaults.
"""
import sys

from dcbs.cli import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], default_sampler="class"))
