"""The benchmark scripts run and write what they print (their figures are not asserted: speed
targets live in the scripts' output, not in tests)."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_bench(name: str = "bench_speed"):
    """benchmarks/<name>.py as a module (benchmarks/ is not a package), for its plan and parser."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "benchmarks", f"{name}.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_bench_reference_compiles_outside_the_flop_counter():
    """The compiled test pass must be warmed up by a call outside the FLOP counter's dispatch mode,
    or its compilation is timed as the first repetition."""
    from torch.utils._python_dispatch import _get_current_dispatch_mode
    calls = {"ours": [], "ours_compiled": []}
    fns = {k: (lambda k=k: calls[k].append(_get_current_dispatch_mode() is None)) for k in calls}
    flops = load_bench("bench_reference").flops_and_warm_up(fns, compiled=lambda k: k == "ours_compiled")
    assert set(flops) == {"ours", "ours_compiled"}
    assert calls == {"ours": [False], "ours_compiled": [False, True]}


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
    # bad counts are refused before anything is imported or timed
    (tmp_path / "utils.py").write_text("raise SystemExit('imported')\n")
    r = subprocess.run([sys.executable, "benchmarks/bench_reference.py", "--reference_dir", str(tmp_path),
                        "--ipcs", "1", "0", "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--ipcs" in r.stderr and "imported" not in r.stderr
    assert not out.exists()


def test_bench_speed_counts_the_flops_torchs_flop_counter_counts():
    """bench_speed counts FLOPs with its own dispatch mode over torch.utils.flop_counter's formulas
    (FlopCounterMode's module tracker made the counted call's peak memory erratic): the totals must
    be FlopCounterMode's, for a training step (the fused first block, a double backward) and for a
    gradient-free pass under inference_mode (conv2d is decomposed there before it is counted)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode
    from networks import build_model, ops
    bench = load_bench()
    x = torch.randn(6, 1, 28, 28, requires_grad=True)
    y = torch.arange(6) % 4
    with ops("fast"):
        net = build_model("ConvNet", 1, 4, (28, 28))

    def step():
        gw = torch.autograd.grad(torch.nn.functional.cross_entropy(net(x)[0], y), list(net.parameters()),
                                 create_graph=True)
        sum((g ** 2).sum() for g in gw).backward()       # as a DC step updates its images

    def test_pass():
        with torch.inference_mode():
            net(x.detach())

    for fn in (step, test_pass):
        with FlopCounterMode(display=False) as fc:
            fn()
        assert fc.get_total_flops() > 0
        assert bench._flops(fn) == fc.get_total_flops()


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
    meta = json.loads(out.read_text())["meta"]
    assert meta["ceiling_gflops"] > 0 and meta["onednn_gemm_gflops"] > 0     # both GEMM rates, printed too
    assert "oneDNN's GEMM" in r.stdout


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


def test_gpu_check_script_lists_commands_that_parse(tmp_path):
    """benchmarks/gpu_check.sh waits for a session with a GPU: its commands must still parse with
    today's flags (a renamed flag would only show on the GPU machine, its 15 minutes wasted)."""
    import shlex
    from dcbs.config import build_parser
    bench = load_bench()
    for quick in ("0", "1"):
        env = dict(os.environ, GPU_CHECK_DRY="1", GPU_CHECK_QUICK=quick)
        r = subprocess.run(["bash", "benchmarks/gpu_check.sh", str(tmp_path / "out")], cwd=ROOT, env=env,
                           stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        cmds = dict(line[4:].split(": ", 1) for line in r.stdout.splitlines() if line.startswith("=== "))
        assert list(cmds) == ["machine", "tests", "speed", "condense", "speed_more"]
        tests = shlex.split(cmds["tests"])
        assert "DCBS_TEST_DEVICE=cuda" in tests
        assert all(os.path.isfile(os.path.join(ROOT, t)) for t in tests if t.startswith("tests/")), tests
        plans = {}
        for name in ("speed", "speed_more"):
            argv = shlex.split(cmds[name])
            assert argv[1] == "benchmarks/bench_speed.py"
            plans[name] = bench.plan(bench.build_parser().parse_args(argv[2:]))
            assert plans[name] and all(c["device"] == "cuda" for c in plans[name])
        argv = shlex.split(cmds["condense"])
        assert argv[1] == "main.py"
        assert build_parser().parse_args(argv[2:]).device == "cuda"
        if quick == "0":   # the GPU target comes first: DC at ipc 10 on CIFAR10-shaped data
            assert {(c["method"], c["shape"], c["ipc"]) for c in plans["speed"]} == {("DC", "CIFAR10", 10)}
            assert {bench.path_of(c) for c in plans["speed"]} >= {"loop/plain", "batched/fast"}
            assert ("test_pass", "compiled/fast") in {(c["kind"], bench.path_of(c)) for c in plans["speed_more"]}
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())   # a dry run writes nothing


def test_bench_speed_default_paths_leave_the_batched_kernel_to_cuda():
    bench = load_bench()
    paths = lambda argv: {bench.path_of(c) for c in bench.plan(bench.build_parser().parse_args(argv))
                          if c["kind"] == "iter"}
    assert paths([]) == {"loop/plain", "loop/fast"}
    assert paths(["--device", "cuda"]) == {"loop/plain", "loop/fast", "batched/fast"}
    assert paths(["--paths", "loop/plain", "batched/fast"]) == {"loop/plain", "batched/fast"}


def test_bench_speed_compile_adds_a_compiled_test_pass_and_dm_iteration():
    bench = load_bench()
    argv = ["--shapes", "FashionMNIST", "--ipcs", "2", "--paths", "loop/plain", "loop/fast"]
    paths = lambda extra, kind, method="DM": [
        bench.path_of(c) for c in bench.plan(bench.build_parser().parse_args(argv + ["--methods", method] + extra))
        if c["kind"] == kind]
    assert paths([], "test_pass") == paths([], "iter") == ["loop/plain", "loop/fast"]
    for flag in ("--compile", "--compile_test"):                 # its older name
        assert paths([flag], "test_pass") == paths([flag], "iter") == ["loop/plain", "loop/fast", "compiled/fast"]
    assert paths(["--compile"], "iter", "DC") == ["loop/plain", "loop/fast"]   # DC/DSA: nothing compiled
    assert paths(["--compile", "--no_eval"], "iter") == ["loop/plain", "loop/fast", "compiled/fast"]
    r = subprocess.run([sys.executable, "benchmarks/bench_speed.py", *argv, "--methods", "DC", "--compile",
                        "--no_eval"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--compile" in r.stderr and "--no_eval" in r.stderr


def _small_data(per_class: int = 12):
    import torch
    from dcbs.data import RealData
    g = torch.Generator().manual_seed(0)
    return RealData(name="FashionMNIST", source="random", channel=1, im_size=(28, 28), num_classes=10,
                    class_names=[str(c) for c in range(10)], mean=[0.0], std=[1.0],
                    images_train=torch.randn(10 * per_class, 1, 28, 28, generator=g),
                    labels_train=torch.arange(10).repeat_interleave(per_class),
                    images_test=torch.randn(20, 1, 28, 28, generator=g), labels_test=torch.arange(10).repeat(2),
                    fingerprint="random")


def test_bench_reference_composes_an_ipc10_iteration_from_its_parts():
    compose = load_bench("bench_reference").compose
    times, flops = compose({"match": ([1.0, 2.0], 10.0), "inner": ([0.5, 0.25], 4.0)}, outer=10)
    assert times == [10 * 1.0 + 9 * 0.5, 10 * 2.0 + 9 * 0.25]    # repetition by repetition
    assert flops == 10 * 10.0 + 9 * 4.0
    import pytest
    with pytest.raises(ValueError, match="same rounds"):
        compose({"match": ([1.0, 2.0], 1.0), "inner": ([0.5], 1.0)}, outer=10)
    jobs = load_bench("bench_reference").jobs
    assert jobs(["TEST", "DC", "DM", "EVAL"], [1, 10]) == [("DC", 1), ("DM", 1), ("DC", 10), ("DM", 10),
                                                            ("TEST", 1), ("EVAL", 1)]


def test_bench_reference_ipc10_parts_are_one_synthetic_update_and_one_inner_loop(monkeypatch):
    """Our side of an ipc-10 DC/DSA iteration in two parts: ``match`` changes the synthetic images
    (one update) and not the network, ``inner`` trains the network on them and leaves them alone;
    the step's loop schedule is back to normal after ``match``."""
    import torch
    import dcbs.condense as cd
    bench = load_bench("bench_reference")
    real_get_loops = cd.get_loops
    monkeypatch.setattr(cd, "get_loops", lambda ipc: (10, 2) if ipc == 10 else real_get_loops(ipc))
    data = _small_data()
    for method in ("DC", "DSA"):
        parts = bench.ours_iteration(method, data, torch.device("cpu"), "color_crop_cutout_flip_scale_rotate", ipc=10)
        assert set(parts) == {"match", "inner"}
        net, image_syn = parts["match"].net, parts["match"].image_syn
        assert parts["inner"].net is net and parts["inner"].image_syn is image_syn
        w0, x0 = [p.detach().clone() for p in net.parameters()], image_syn.detach().clone()
        parts["match"]()
        assert cd.get_loops(10) == (10, 2)
        assert all(torch.equal(a, b) for a, b in zip(w0, net.parameters()))
        assert not torch.equal(x0, image_syn)
        x1 = image_syn.detach().clone()
        parts["inner"]()
        assert torch.equal(x1, image_syn)
        assert not all(torch.equal(a, b) for a, b in zip(w0, net.parameters()))
    # DM and ipc 1 stay one whole iteration
    assert set(bench.ours_iteration("DM", data, torch.device("cpu"), "none", ipc=10)) == {"iter"}
    assert set(bench.ours_iteration("DC", data, torch.device("cpu"), "none", ipc=1)) == {"iter"}


def test_bench_reference_runs_the_reference_parts_on_a_clone(monkeypatch):
    """With a clone of the reference code (DCBS_REFERENCE_DIR; not available in CI), its side's parts
    run at ipc 1 and 10, the DSA inner loop included (the adaptations in ``siamese``)."""
    import pytest
    import torch
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
            parts = bench.reference_iteration(ref, method, data, "color_crop_cutout_flip_scale_rotate", ipc)
            assert set(parts) == ({"match", "inner"} if ipc == 10 and method != "DM" else {"iter"})
            for fn in parts.values():
                fn()
    assert ref.DiffAugment.__module__ == ref.__name__          # the inner loop's wrapper is taken off
    assert torch.get_default_dtype() == torch.float32


def test_bench_speed_interleave_runs_the_paths_of_a_case_in_one_process(tmp_path):
    bench = load_bench()
    args = bench.build_parser().parse_args(["--shapes", "FashionMNIST", "--methods", "DC", "DM", "--ipcs", "1",
                                            "--paths", "loop/plain", "loop/fast"])
    cases = bench.plan(args)
    groups = bench.units(cases, interleave=True)
    assert [[(cases[i]["method"], bench.path_of(cases[i])) for i in g] for g in groups[:2]] == [
        [("DC", "loop/plain"), ("DC", "loop/fast")], [("DM", "loop/plain"), ("DM", "loop/fast")]]
    assert all(len({(cases[i]["kind"], cases[i]["method"], cases[i]["ipc"]) for i in g}) == 1 for g in groups)
    assert all(len({bench.path_of(cases[i]) for i in g}) == len(g) for g in groups)
    assert sorted(i for g in groups for i in g) == list(range(len(cases)))
    assert bench.units(cases, interleave=False) == [[i] for i in range(len(cases))]
    # a composed iteration: every match repetition with the inner loop's median (unpaired compose)
    assert bench.compose({"match": ([1.0, 3.0], 2.0), "inner": ([0.5, 0.6, 0.7], 1.0)}, 2, paired=False) == (
        [2 * 1.0 + 0.6, 2 * 3.0 + 0.6], 2 * 2.0 + 1.0)
    r = bench.case_result({"method": "DC"}, {"match": [1.0, 2.0, 3.0], "inner": [0.5, 0.7]},
                          {"match": 10.0, "inner": 4.0}, outer=10)
    assert r["times"] == [10 * m + 9 * 0.6 for m in (1.0, 2.0, 3.0)] and r["flops"] == 10 * 10.0 + 9 * 4.0
    out = tmp_path / "speed.json"
    p = subprocess.run([sys.executable, "benchmarks/bench_speed.py", "--shapes", "FashionMNIST", "--methods", "DM",
                        "--ipcs", "1", "--repeats", "2", "--no_eval", "--num_threads", "1", "--interleave",
                        "--paths", "loop/plain", "loop/fast", "--out", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr
    report = json.loads(out.read_text())
    rows = report["rows"]
    assert [row["path"] for row in rows] == ["loop/plain", "loop/fast"] and [row["n"] for row in rows] == [2, 2]
    assert all(row["peak_shared"] for row in rows) and rows[0]["peak_mb"] == rows[1]["peak_mb"]
    # the ceiling read between the group's repetitions, shared by its rows and used for their %ceil
    assert rows[0]["ceiling_gflops"] == rows[1]["ceiling_gflops"] > 0
    assert abs(rows[0]["pct_ceiling"] - 100 * rows[0]["gflops_per_s"] / rows[0]["ceiling_gflops"]) < 1e-9
    assert report["meta"]["interleave"] is True and "--interleave: one process" in p.stdout


def test_bf16_paths_time_gradient_matching_only_and_run_in_bf16():
    """bench_speed's /bf16 paths and bench_reference's bf16 side: DC/DSA/BS iterations under
    --precision bf16 (DM, evaluation and the test pass have none), and the step they time really
    runs its real batches' convolutions in bf16."""
    import torch
    bench = load_bench()
    cases = bench.plan(bench.build_parser().parse_args(["--shapes", "FashionMNIST", "--ipcs", "1",
                                                        "--paths", "loop/fast", "loop/fast/bf16"]))
    iters = {(c["method"], bench.path_of(c)) for c in cases if c["kind"] == "iter"}
    assert {("DC", "loop/fast/bf16"), ("DSA", "loop/fast/bf16"), ("BS", "loop/fast/bf16")} <= iters
    assert ("DM", "loop/fast/bf16") not in iters and ("DM", "loop/fast") in iters
    assert all(c["precision"] == ("bf16" if bench.path_of(c).endswith("/bf16") else "fp32")
               for c in cases if c["kind"] == "iter")
    assert [bench.path_of(c) for c in cases if c["kind"] == "test_pass"] == ["loop/fast"]
    assert [c["ops"] for c in cases if c["kind"] == "eval" and c["method"] == "DC"] == ["fast"]
    ref = load_bench("bench_reference")
    data = _small_data()
    for precision in ("fp32", "bf16"):
        fn = ref.ours_iteration("DC", data, torch.device("cpu"), "none", ipc=1, precision=precision)["iter"]
        seen = set()
        for m in fn.net.modules():
            if isinstance(m, torch.nn.Conv2d):
                m.register_forward_hook(lambda mod, inp, out: seen.add((out.shape[0], out.dtype)))
        fn()
        real = {d for n, d in seen if n > 1}          # the real batches (the synthetic image is one per class)
        assert real == {torch.bfloat16 if precision == "bf16" else torch.float32}
        assert {d for n, d in seen if n == 1} == {torch.float32}
