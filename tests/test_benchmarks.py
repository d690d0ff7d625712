"""The benchmark scripts time what they say and write what they print (their figures are never asserted)."""
import json
import os
import shlex
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DSA = "color_crop_cutout_flip_scale_rotate"


def load_bench(name: str = "bench_speed"):
    """benchmarks/<name>.py as a module (benchmarks/ is not a package)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "benchmarks", f"{name}.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def run(script: str, *argv, timeout: int = 600):
    return subprocess.run([sys.executable, f"benchmarks/{script}", *argv], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def plan(*argv):
    bench = load_bench()
    return [(c["kind"], c["method"], bench.path_of(c)) for c in bench.plan(bench.build_parser().parse_args(argv))]


def _small_data(per_class: int = 12):
    from dcbs.data import RealData
    g = torch.Generator().manual_seed(0)
    return RealData(name="FashionMNIST", source="random", channel=1, im_size=(28, 28), num_classes=10,
                    class_names=[str(c) for c in range(10)], mean=[0.0], std=[1.0],
                    images_train=torch.randn(10 * per_class, 1, 28, 28, generator=g),
                    labels_train=torch.arange(10).repeat_interleave(per_class),
                    images_test=torch.randn(20, 1, 28, 28, generator=g), labels_test=torch.arange(10).repeat(2),
                    fingerprint="random")


@pytest.fixture
def short_ipc10(monkeypatch):
    """DC's ipc-10 schedule shortened to 3 synthetic updates with 2-epoch inner loops."""
    import dcbs.matching
    real = dcbs.matching.get_loops
    monkeypatch.setattr(dcbs.matching, "get_loops", lambda ipc: (3, 2) if ipc == 10 else real(ipc))


# --------------------------------------------------------------------------- bench_speed.py
def test_bench_speed_times_the_plain_and_the_fast_path_side_by_side(tmp_path, monkeypatch, capsys):
    bench = load_bench()
    monkeypatch.setitem(bench.SHAPES, "FashionMNIST", (1, (28, 28), 12, 40))      # tiny data, same shapes
    out, threads = tmp_path / "speed.json", torch.get_num_threads()
    try:
        assert bench.main(["--shapes", "FashionMNIST", "--methods", "DC", "DM", "--ipcs", "1", "--repeats", "2",
                           "--no_eval", "--num_threads", "1", "--paths", "loop/plain", "loop/fast",
                           "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    report = json.loads(out.read_text())
    rows = report["rows"]
    assert [(r["kind"], r["method"], r["path"], r["ops"], r["n"]) for r in rows] == [
        ("iter", "DC", "loop/plain", "plain", 2), ("iter", "DC", "loop/fast", "fast", 2),
        ("iter", "DM", "loop/plain", "plain", 2), ("iter", "DM", "loop/fast", "fast", 2)]
    assert [r["speedup"] for r in rows[::2]] == [1.0, 1.0] and all(r["speedup"] > 0 for r in rows)
    assert all(len(r["times"]) == r["n"] and r["min_s"] <= r["median_s"] <= r["max_s"] for r in rows)
    assert report["meta"]["device"] == "cpu" and report["meta"]["cpu_capability"]      # the instruction set torch uses
    printed = capsys.readouterr().out
    assert "speed-up over loop/plain" in printed and printed.count("loop/fast") == 2


def test_bench_speed_composes_an_ipc10_iteration_from_its_parts(short_ipc10):
    """At ipc 10 a DC iteration is timed as one synthetic update (which leaves the network alone)
    and one inner loop (which leaves the images alone), composed repetition by repetition."""
    bench = load_bench()
    assert bench.compose({"match": [1.0, 2.0], "inner": [0.5, 0.25]}, outer=10) == [10 * 1.0 + 9 * 0.5,
                                                                                   10 * 2.0 + 9 * 0.25]
    with pytest.raises(ValueError):
        bench.compose({"match": [1.0, 2.0], "inner": [0.5]}, outer=10)
    data = _small_data(4)
    case = dict(kind="iter", method="DC", shape="FashionMNIST", ipc=10, kernel="loop", ops="fast")
    parts, outer = bench.case_fns(case, data, torch.device("cpu"))
    assert set(parts) == {"match", "inner"} and outer == 3
    net, image_syn = parts["match"].net, parts["match"].image_syn
    w0, x0 = [p.detach().clone() for p in net.parameters()], image_syn.detach().clone()
    parts["match"]()
    assert all(torch.equal(a, b) for a, b in zip(w0, net.parameters())) and not torch.equal(x0, image_syn)
    x1 = image_syn.detach().clone()
    parts["inner"]()
    assert torch.equal(x1, image_syn) and not all(torch.equal(a, b) for a, b in zip(w0, net.parameters()))
    (row,) = bench.run_group([case], data, torch.device("cpu"), repeats=1)
    assert row["path"] == "loop/fast" and row["times"] == [3 * row["match_s"] + 2 * row["inner_loop_s"]]


def test_bench_speed_groups_the_paths_of_each_case():
    bench = load_bench()
    cases = bench.plan(bench.build_parser().parse_args(["--shapes", "FashionMNIST", "--methods", "DC", "DM",
                                                        "--ipcs", "1", "--paths", "loop/plain", "loop/fast"]))
    groups = bench.groups(cases)
    assert [[(c["method"], bench.path_of(c)) for c in g] for g in groups[:2]] == [
        [("DC", "loop/plain"), ("DC", "loop/fast")], [("DM", "loop/plain"), ("DM", "loop/fast")]]
    assert all(len({(c["kind"], c["method"], c["ipc"]) for c in g}) == 1 for g in groups)
    assert sum(len(g) for g in groups) == len(cases)
    assert [[(c["kind"], bench.path_of(c)) for c in g] for g in groups[-3:]] == [
        [("eval", "-/plain"), ("eval", "-/fast")], [("eval", "-/plain"), ("eval", "-/fast")],
        [("test_pass", "loop/plain"), ("test_pass", "loop/fast")]]
    for c in groups[-1]:                  # the test pass as the reference runs it: batches of 256 under no_grad
        bench.case_fns(c, _small_data(), torch.device("cpu"))[0]["iter"]()
    bs = dict(kind="iter", method="BS", shape="FashionMNIST", ipc=1, kernel="loop", ops="fast")
    bench.case_fns(bs, _small_data(200), torch.device("cpu"))[0]["iter"]()        # Batch Sampling, uneven clusters


def test_bench_speed_default_paths_leave_the_batched_kernel_to_cuda():
    paths = lambda *argv: {p for kind, _, p in plan(*argv) if kind == "iter"}
    assert paths() == {"loop/plain", "loop/fast"}
    assert paths("--device", "cuda") == {"loop/plain", "loop/fast", "batched/fast"}
    assert paths("--paths", "loop/plain", "batched/fast") == {"loop/plain", "batched/fast"}


def test_bench_speed_compile_adds_a_compiled_test_pass_and_dm_iteration():
    argv = ["--shapes", "FashionMNIST", "--ipcs", "2", "--paths", "loop/plain", "loop/fast"]
    paths = lambda kind, method, *extra: [p for k, _, p in plan(*argv, "--methods", method, *extra) if k == kind]
    assert paths("test_pass", "DM") == paths("iter", "DM") == ["loop/plain", "loop/fast"]
    assert paths("test_pass", "DM", "--compile") == paths("iter", "DM", "--compile") == [
        "loop/plain", "loop/fast", "compiled/fast"]
    assert paths("iter", "DC", "--compile") == ["loop/plain", "loop/fast"]          # DC/DSA: nothing compiled
    r = run("bench_speed.py", *argv, "--methods", "DC", "--compile", "--no_eval", timeout=120)
    assert r.returncode == 2 and "--compile" in r.stderr and "--no_eval" in r.stderr


def test_bf16_paths_time_gradient_matching_only_and_run_in_bf16():
    """The /bf16 paths (and bench_reference's bf16 side): DC/DSA/BS iterations under --precision bf16,
    whose real batches really run their convolutions in bf16."""
    cases = plan("--shapes", "FashionMNIST", "--ipcs", "1", "--paths", "loop/fast", "loop/fast/bf16")
    iters = {(m, p) for kind, m, p in cases if kind == "iter"}
    assert {("DC", "loop/fast/bf16"), ("DSA", "loop/fast/bf16"), ("BS", "loop/fast/bf16")} <= iters
    assert ("DM", "loop/fast/bf16") not in iters and ("DM", "loop/fast") in iters
    assert [p for kind, _, p in cases if kind == "test_pass"] == ["loop/fast"]
    ref = load_bench("bench_reference")
    for precision in ("fp32", "bf16"):
        fn = ref.ours_side("DC", _small_data(4), torch.device("cpu"), "none", ipc=1, precision=precision)["iter"]
        seen = set()
        for m in fn.net.modules():
            if isinstance(m, torch.nn.Conv2d):
                m.register_forward_hook(lambda mod, inp, out: seen.add((out.shape[0], out.dtype)))
        fn()
        assert {d for n, d in seen if n > 1} == {torch.bfloat16 if precision == "bf16" else torch.float32}
        assert {d for n, d in seen if n == 1} == {torch.float32}          # the one synthetic image per class


# --------------------------------------------------------------------------- bench_reference.py
def test_bench_reference_refuses_to_run_without_the_reference_code(tmp_path):
    out = tmp_path / "reference.json"
    r = run("bench_reference.py", "--methods", "DC", "--out", str(out), timeout=120)
    assert r.returncode == 2
    assert "--reference_dir" in r.stderr and "git clone https://github.com/VICO-UoE/DatasetCondensation" in r.stderr
    r = run("bench_reference.py", "--reference_dir", str(tmp_path), timeout=120)     # not a clone
    assert r.returncode == 2 and "no utils.py" in r.stderr and "git clone" in r.stderr
    (tmp_path / "utils.py").write_text("raise SystemExit('imported')\n")
    r = run("bench_reference.py", "--reference_dir", str(tmp_path), "--ipcs", "1", "0", "--out", str(out),
            timeout=120)
    assert r.returncode == 2 and "--ipcs" in r.stderr and "imported" not in r.stderr    # refused before the import
    assert not out.exists()


def test_bench_reference_our_side_is_bench_speeds_case(short_ipc10):
    bench = load_bench("bench_reference")
    assert bench.jobs(["TEST", "DC", "DM", "EVAL"], [1, 10]) == [("DC", 1), ("DM", 1), ("DC", 10), ("DM", 10),
                                                                  ("TEST", 1), ("EVAL", 1)]
    data, cpu = _small_data(), torch.device("cpu")
    assert set(bench.ours_side("DSA", data, cpu, DSA, ipc=10)) == {"match", "inner"}
    assert set(bench.ours_side("DM", data, cpu, DSA, ipc=10)) == {"iter"}
    assert set(bench.ours_side("DC", data, cpu, "none", ipc=1)) == {"iter"}
    assert set(bench.ours_side("EVAL", data, cpu, "none", compiled=True)) == {"iter"}
    for method in ("TEST", "DM"):
        bench.ours_side(method, data, cpu, DSA, layers="plain")["iter"]()


def test_bench_reference_writes_each_side_and_its_ratio_to_the_reference(tmp_path, monkeypatch):
    """main() end to end on tiny data, with a stand-in for the reference code (its real parts need a clone)."""
    from types import SimpleNamespace
    bench = load_bench("bench_reference")
    monkeypatch.setitem(sys.modules["bench_speed"].SHAPES, "FashionMNIST", (1, (28, 28), 12, 40))
    monkeypatch.setattr(bench, "load_reference", lambda d: SimpleNamespace(__file__=os.path.join(d, "utils.py")))
    instant = lambda *a: {"iter": lambda: None}
    monkeypatch.setattr(bench, "reference_iteration", instant)
    monkeypatch.setattr(bench, "reference_evaluation", instant)
    (tmp_path / "utils.py").write_text("")
    out, threads = tmp_path / "reference.json", torch.get_num_threads()
    try:
        assert bench.main(["--reference_dir", str(tmp_path), "--methods", "DC", "TEST", "--ipcs", "1", "--repeats", "2",
                           "--num_threads", "1", "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    rows = json.loads(out.read_text())["rows"]
    assert [(r["method"], r["ipc"]) for r in rows] == [("DC", 1), ("TEST", 1)]
    assert all({"ours", "reference", "ratio"} <= set(r) and "ours_bf16" not in r for r in rows)
    assert all(len(r["ours"]["times"]) == 2 and r["ratio"] == r["ours"]["median_s"] / r["reference"]["median_s"]
               for r in rows)


def test_bench_reference_runs_the_reference_parts_on_a_clone(monkeypatch):
    """With a clone of the reference code (DCBS_REFERENCE_DIR; not available in CI), its side's parts
    run at ipc 1 and 10, the DSA inner loop included (the adaptations in ``siamese``)."""
    ref_dir = os.environ.get("DCBS_REFERENCE_DIR")
    if not ref_dir or not os.path.isfile(os.path.join(ref_dir, "utils.py")):
        pytest.skip("set DCBS_REFERENCE_DIR to a clone of https://github.com/VICO-UoE/DatasetCondensation")
    import dcbs.condense  # noqa: F401  (binds our `networks` first, as bench_reference's main does)
    bench = load_bench("bench_reference")
    ref = bench.load_reference(ref_dir)
    monkeypatch.setattr(ref, "get_loops", lambda ipc: (10, 2) if ipc == 10 else (1, 0))
    data = _small_data()
    for method in ("DC", "DSA", "DM"):
        for ipc in (1, 10):
            parts = bench.reference_iteration(ref, method, data, DSA, ipc)
            assert set(parts) == ({"match", "inner"} if ipc == 10 and method != "DM" else {"iter"})
            for fn in parts.values():
                fn()
    bench.reference_evaluation(ref, "TEST", data)["iter"]()
    assert ref.DiffAugment.__module__ == ref.__name__          # the inner loop's wrapper is taken off
    assert torch.get_default_dtype() == torch.float32


# --------------------------------------------------------------------------- bench_eval.py, gpu_check.sh
def test_bench_eval_writes_per_model_times_and_the_paths_agree(tmp_path):
    out = tmp_path / "eval.json"
    r = run("bench_eval.py", "--ipcs", "1", "--models", "2", "--epochs", "1", "--test_images", "64",
            "--num_threads", "1", "--out", str(out))
    assert r.returncode == 0, r.stderr
    rows = json.loads(out.read_text())["rows"]
    assert [row["ipc"] for row in rows] == [1]
    assert rows[0]["sequential_s_per_model"] > 0 and rows[0]["batched_s_per_model"] > 0
    assert rows[0]["max_acc_diff"] < 1e-6        # the same models, trained two ways
    assert "1 epochs" in r.stdout
    r = run("bench_eval.py", "--models", "1", "--out", str(tmp_path / "x.json"), timeout=120)
    assert r.returncode == 2 and "--models must be >= 2" in r.stderr and not (tmp_path / "x.json").exists()


def test_gpu_check_script_lists_commands_that_parse(tmp_path):
    """gpu_check.sh runs only on a CUDA machine: its commands must parse with today's flags there."""
    from dcbs.config import build_parser
    bench = load_bench()
    for quick in ("0", "1"):
        env = dict(os.environ, GPU_CHECK_DRY="1", GPU_CHECK_QUICK=quick)
        r = subprocess.run(["bash", "benchmarks/gpu_check.sh", str(tmp_path / "out")], cwd=ROOT, env=env,
                           stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        cmds = {k: shlex.split(v) for k, v in (line[4:].split(": ", 1) for line in r.stdout.splitlines()
                                               if line.startswith("=== "))}
        assert list(cmds) == ["machine", "tests", "speed", "condense", "speed_more"]
        assert "DCBS_TEST_DEVICE=cuda" in cmds["tests"]
        assert all(os.path.isfile(os.path.join(ROOT, t)) for t in cmds["tests"] if t.startswith("tests/"))
        plans = {}
        for name in ("speed", "speed_more"):
            argv = cmds[name][cmds[name].index("benchmarks/bench_speed.py") + 1:]
            plans[name] = bench.plan(bench.build_parser().parse_args(argv))
            assert plans[name] and "--device" in argv and argv[argv.index("--device") + 1] == "cuda"
        assert cmds["condense"][1] == "main.py" and build_parser().parse_args(cmds["condense"][2:]).device == "cuda"
        if quick == "0":   # the main GPU target comes first: DC at ipc 10 on CIFAR10-shaped data
            assert {(c["method"], c["shape"], c["ipc"]) for c in plans["speed"]} == {("DC", "CIFAR10", 10)}
            assert {bench.path_of(c) for c in plans["speed"]} >= {"loop/plain", "batched/fast"}
            assert ("test_pass", "compiled/fast") in {(c["kind"], bench.path_of(c)) for c in plans["speed_more"]}
    assert not (tmp_path / "out").exists()          # a dry run writes nothing
