"""The benchmark scripts run and write what they print (their figures are not asserted: speed
targets live in the scripts' output, not in tests)."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_eval_writes_per_model_times_and_the_paths_agree(tmp_path):
    out = tmp_path / "eval.json"
    r = subprocess.run([sys.executable, "benchmarks/bench_eval.py", "--ipcs", "1", "--models", "2", "--epochs", "1",
                        "--test_images", "64", "--num_threads", "1", "--out", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    rows = json.loads(out.read_text())["rows"]
    assert [row["ipc"] for row in rows] == [1]
    assert rows[0]["sequential_s_per_model"] > 0 and rows[0]["batched_s_per_model"] > 0
    assert rows[0]["max_acc_diff"] < 1e-6        # the same models, trained two ways
    assert "1 epochs" in r.stdout


def test_bench_eval_rejects_a_single_model(tmp_path):
    r = subprocess.run([sys.executable, "benchmarks/bench_eval.py", "--models", "1", "--out", str(tmp_path / "x.json")],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--models must be >= 2" in r.stderr
    assert not (tmp_path / "x.json").exists()


def test_bench_reference_refuses_to_run_without_the_reference_code(tmp_path):
    out = tmp_path / "reference.json"
    r = subprocess.run([sys.executable, "benchmarks/bench_reference.py", "--methods", "DC", "--out", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "--reference_dir" in lines[0]
    assert "git clone https://github.com/VICO-UoE/DatasetCondensation" in lines[0]
    assert not out.exists()
    # a folder that is not a clone is refused the same way
    r = subprocess.run([sys.executable, "benchmarks/bench_reference.py", "--reference_dir", str(tmp_path)],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "no utils.py" in r.stderr and "git clone" in r.stderr


def test_bench_speed_times_the_straightforward_and_the_fast_path(tmp_path):
    out = tmp_path / "speed.json"
    r = subprocess.run([sys.executable, "benchmarks/bench_speed.py", "--shapes", "FashionMNIST", "--methods", "DM",
                        "--ipcs", "1", "--repeats", "1", "--rounds", "2", "--no_eval", "--num_threads", "1",
                        "--paths", "loop/plain", "loop/fast", "--out", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr
    rows = json.loads(out.read_text())["rows"]
    assert [row["path"] for row in rows] == ["loop/plain", "loop/fast"]
    assert [row["ops"] for row in json.loads(out.read_text())["raw"]] == ["plain", "fast"]
    assert rows[0]["speedup"] == 1.0 and rows[1]["speedup"] > 0
    assert [row["n"] for row in rows] == [2, 2]              # one repetition in each of two rounds
    assert all(row["gflop"] > 0 and row["peak_mb"] > 0 for row in rows)
    assert "speed-up over loop/plain" in r.stdout


def test_bench_ops_times_plain_and_fast_layers(tmp_path):
    out = tmp_path / "ops.json"
    r = subprocess.run([sys.executable, "benchmarks/bench_ops.py", "--batch", "8",
                        "--repeats", "1", "--num_threads", "1", "--out", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    rows = json.loads(out.read_text())["rows"]
    assert [row["what"] for row in rows] == ["pool forward 128x32x32", "pool backward 128x32x32"] + [
        f"ConvNet {shape} {what}" for shape in ("FashionMNIST", "CIFAR10")
        for what in ("real-data gradient", "inference forward")]
    assert all(row["plain"]["median_s"] > 0 and row["fast"]["median_s"] > 0 for row in rows)
