"""Records the golden runs of tests/test_golden.py: DC (main.py) and Batch Sampling (main_BS.py) on digits.

    python tests/golden/record.py OUT_DIR

Each run keeps what the test compares: the synthetic set, the accuracies, the
diagnostics without their timing columns, and the result file's name and data.
The cluster file is the one the test makes (each class's sorted indices cut into
five chunks), so no extractor is needed.
"""
import csv
import json
import os
import shutil
import subprocess
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(HERE))

FLAGS = ["--dataset", "digits", "--Iteration", "2", "--num_eval", "1", "--epoch_eval_train", "2", "--eval_it", "2",
         "--ops", "plain", "--num_threads", "1", "--num_exp", "1", "--seed", "0", "--batch_real", "32"]
BS_FLAGS = ["--num_cluster", "5", "--layer_idx", "3"]
RUNS = {f"{name}_ipc{ipc}": (script, ["--ipc", str(ipc)] + extra)
        for ipc in (1, 10) for name, script, extra in (("class", "main.py", []), ("cluster", "main_BS.py", BS_FLAGS))}
TIMING = ("seconds", "sample_seconds")


def write_cluster_file(folder):
    from dcbs import clusters as cl
    from dcbs.data import load_data
    from test_batch_sampling import chunks, write_clusters
    data = load_data("digits")
    os.makedirs(folder, exist_ok=True)
    write_clusters(os.path.join(folder, cl.cluster_file_name("digits", 5, 3, False)), data, chunks(data, 5))
    return folder


def run(name, save, cluster_dir, extra_env=None):
    script, argv = RUNS[name]
    cmd = [sys.executable, os.path.join(ROOT, script), *FLAGS, *argv, "--save_path", save, "--run_name", name]
    if script == "main_BS.py":
        cmd += ["--cluster_path", cluster_dir]
    env = dict(os.environ, OMP_NUM_THREADS="1", DCBS_NO_DOWNLOAD="1", PYTHONHASHSEED="0", **(extra_env or {}))
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{r.stderr}")
    return os.path.join(save, name)


def summary(run_dir):
    """What the golden test compares, from one run directory."""
    syn = torch.load(os.path.join(run_dir, "syn_exp0.pt"), weights_only=False)
    res = [f for f in os.listdir(run_dir) if f.startswith("res_")]
    with open(os.path.join(run_dir, "diagnostics.csv")) as f:
        rows = [{k: v for k, v in r.items() if k not in TIMING} for r in csv.DictReader(f)]
    with open(os.path.join(run_dir, "accuracies.json")) as f:
        acc = json.load(f)
    resdata = torch.load(os.path.join(run_dir, res[0]), weights_only=False)["data"]
    return {"syn_data": syn["data"], "res_name": res, "res_data": resdata, "diagnostics": rows, "accuracies": acc}


def main(out):
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        cdir = write_cluster_file(os.path.join(tmp, "clusters"))
        for name in RUNS:
            d = run(name, os.path.join(tmp, "runs"), cdir)
            s = summary(d)
            torch.save(s, os.path.join(out, f"{name}.pt"))
            print(name, s["res_name"], s["accuracies"])


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else HERE)
