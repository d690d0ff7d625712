"""The documentation stays a user's document: short, runnable as written, about the project only.

- README.md fits in 15,000 bytes;
- every ``python <script>.py ...`` line in README's fenced blocks parses with that script's own
  parser (the flags exist, the values fit their choices), and every ``--flag`` README names exists;
- so do the commands docs/performance.md and results/README.md give for their figures;
- the relative links of README.md, docs/ and results/README.md lead to files of the repository;
- no tracked text file speaks about how the project was made (work rounds, issue numbers, the
  paper called by another name, paths outside the repository).
"""
from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
MAX_README_BYTES = 15_000
TEST_COMMAND = "python -m pytest -q -n auto tests"     # .ci/run runs exactly this


def _read(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


def _fenced_blocks(text: str) -> list[str]:
    return re.findall(r"^```[^\n]*\n(.*?)^```", text, flags=re.S | re.M)


def _commands(block: str) -> list[list[str]]:
    """Shell words of each command in a fenced block: continuations joined, comments dropped,
    ``a && b`` / ``a; b`` split, leading ``VAR=value`` assignments dropped."""
    joined = re.sub(r"\\\n", " ", block)
    out = []
    for line in joined.splitlines():
        words = shlex.split(line, comments=True)
        cmd: list[str] = []
        for w in words + ["&&"]:
            if w in ("&&", ";", "||", "|"):
                while cmd and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", cmd[0]):
                    cmd.pop(0)
                if cmd:
                    out.append(cmd)
                cmd = []
            else:
                cmd.append(w)
    return out


def _python_commands(text: str) -> list[list[str]]:
    """``[script, arg, ...]`` of every ``python <script>.py ...`` command in the fenced blocks."""
    cmds = []
    for block in _fenced_blocks(text):
        for words in _commands(block):
            if words[0] in ("python", "python3") and len(words) > 1 and words[1].endswith(".py"):
                cmds.append(words[1:])
    return cmds


# --------------------------------------------------------------------------- the scripts' parsers
def _parse_main(argv, default_sampler):
    from dcbs.config import ConfigError, build_parser, resolve
    ns = build_parser(default_sampler).parse_args(argv)
    try:
        resolve(ns, default_sampler)
    except ConfigError as e:
        raise AssertionError(f"refused by the configuration: {e}") from None


def _parse_cluster(argv):
    from dcbs import cluster_cli as main_cluster
    main_cluster.build_parser().parse_args(argv)


def _parse_plot_runs(argv):
    from dcbs import plot_cli as plot_runs
    plot_runs.build_parser().parse_args(argv)


def _parse_reproduce(argv):
    from dcbs import reproduce_cli as reproduce
    from dcbs.config import build_parser
    extra = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1:]
    if argv[:1] == ["aggregate"]:
        assert not extra, "aggregate takes no flags after '--'"
        reproduce.build_aggregate_parser().parse_args(argv[1:])
    elif argv[:1] == ["figures"]:
        assert not extra, "figures takes no flags after '--'"
        reproduce.build_figures_parser().parse_args(argv[1:])
    elif argv[:1] == ["demo"]:
        assert not extra, "demo takes no flags after '--'"
        reproduce.build_demo_parser().parse_args(argv[1:])
    elif argv[:1] == ["study"]:
        assert not extra, "study takes no flags after '--'"
        reproduce.build_study_parser().parse_args(argv[1:])
    else:
        reproduce.check_args(reproduce.build_parser().parse_args(argv))
        for default_sampler in ("class", "cluster"):           # flags after '--' go to main.py and main_BS.py runs
            build_parser(default_sampler).parse_args(extra)


def _benchmark(name):
    import importlib.util
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "benchmarks", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _bench_speed():
    return _benchmark("bench_speed")


class _Parsed(BaseException):
    """Raised right after a script's own parse_args, so that its main() does no work."""


def _parse_with_main(name):
    """For benchmarks that build their parser inside main(): run main() up to its parse_args."""
    def parse(argv):
        import argparse
        from unittest import mock
        real = argparse.ArgumentParser.parse_args

        def parse_then_stop(self, args=None, namespace=None):
            real(self, args, namespace)
            raise _Parsed
        with mock.patch.object(argparse.ArgumentParser, "parse_args", parse_then_stop):
            try:
                _benchmark(name).main(argv)
            except _Parsed:
                return
        raise AssertionError(f"benchmarks/{name}.py main() returned without parsing its arguments")
    return parse


PARSERS = {
    "main.py": lambda argv: _parse_main(argv, "class"),
    "main_BS.py": lambda argv: _parse_main(argv, "cluster"),
    "main_cluster.py": _parse_cluster,
    "reproduce.py": _parse_reproduce,
    "plot_runs.py": _parse_plot_runs,
    "benchmarks/bench_speed.py": lambda argv: _bench_speed().build_parser().parse_args(argv),
    "benchmarks/bench_reference.py": _parse_with_main("bench_reference"),
    "benchmarks/bench_eval.py": _parse_with_main("bench_eval"),
}


def _refused(cmds) -> list[str]:
    """The commands (``[script, arg, ...]``) that their script's parser refuses, with its message."""
    bad = []
    for script, *argv in cmds:
        shown = " ".join(["python", script, *argv])
        if script not in PARSERS:
            bad.append(f"{shown}\n    no parser known for {script}: add it to PARSERS in tests/test_docs.py")
            continue
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                PARSERS[script](argv)
        except SystemExit as e:
            if e.code not in (0, None):
                said = err.getvalue().strip().splitlines()
                bad.append(f"{shown}\n    {said[-1] if said else f'exit {e.code}'}")
        except Exception as e:      # check_args' SweepError, the configuration's refusals
            bad.append(f"{shown}\n    {type(e).__name__}: {e}")
    return bad


def _all_option_strings() -> set[str]:
    from dcbs import cluster_cli as main_cluster
    from dcbs import plot_cli as plot_runs
    from dcbs import reproduce_cli as reproduce
    from dcbs.config import build_parser
    parsers = [build_parser(False), build_parser(True), main_cluster.build_parser(), plot_runs.build_parser(),
               reproduce.build_parser(), reproduce.build_aggregate_parser(), reproduce.build_figures_parser(),
               reproduce.build_study_parser(),
               _bench_speed().build_parser()]
    return {s for p in parsers for a in p._actions for s in a.option_strings}


# --------------------------------------------------------------------------- README
def test_readme_is_short():
    size = os.path.getsize(README)
    assert size <= MAX_README_BYTES, (f"README.md is {size} bytes, more than {MAX_README_BYTES}: move measurements "
                                      f"to docs/performance.md or results/README.md")


def test_readme_keeps_the_ci_test_command():
    lines = [" ".join(w) for b in _fenced_blocks(_read(README)) for w in _commands(b)]
    assert TEST_COMMAND in lines, f"README's set-up must show `{TEST_COMMAND}` (.ci/run runs it)"


def test_readme_commands_parse():
    cmds = _python_commands(_read(README))
    assert len(cmds) >= 5, "README shows the user's commands in fenced blocks"
    bad = _refused(cmds)
    assert not bad, "README commands that today's parsers refuse:\n" + "\n".join(bad)


@pytest.mark.parametrize("rel", ["docs/performance.md", "results/README.md"])
def test_recorded_commands_parse(rel):
    """The commands that reproduce a recorded figure still run (shell loops with $variables aside)."""
    path = os.path.join(ROOT, rel)
    if not os.path.exists(path):
        pytest.skip(f"{rel} does not exist")
    cmds = [c for c in _python_commands(_read(path)) if not any("$" in w for w in c)]
    bad = _refused(cmds)
    assert not bad, f"{rel}: commands that today's parsers refuse:\n" + "\n".join(bad)


def test_readme_names_only_existing_flags():
    text = _read(README)
    named = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9_]*(?:-[a-z0-9_]+)*", text))
    unknown = sorted(named - _all_option_strings() - {"--help"})
    assert not unknown, f"README names flags no parser has: {unknown}"


def test_readme_stays_inside_the_repository():
    text = _read(README)
    outside = [m.group(0) for m in re.finditer(r"(?<![\w.])\.\./\S*|(?<![\w.])/work\b\S*", text)]
    assert not outside, f"README points outside the repository: {outside}"


# --------------------------------------------------------------------------- links
def _markdown_files() -> list[str]:
    paths = [README, os.path.join(ROOT, "results", "README.md"), os.path.join(ROOT, "checkpoints", "README.md")]
    docs = os.path.join(ROOT, "docs")
    if os.path.isdir(docs):
        paths += [os.path.join(docs, f) for f in sorted(os.listdir(docs)) if f.endswith(".md")]
    return [p for p in paths if os.path.exists(p)]


@pytest.mark.parametrize("path", _markdown_files(), ids=lambda p: os.path.relpath(p, ROOT))
def test_relative_links_resolve(path):
    text = _read(path)
    bad = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        target = target.split("#", 1)[0]
        if not target or re.match(r"[a-z]+:", target):
            continue
        full = os.path.normpath(os.path.join(os.path.dirname(path), target))
        if not full.startswith(ROOT + os.sep) or not os.path.exists(full):
            bad.append(target)
    assert not bad, f"{os.path.relpath(path, ROOT)} links to what the repository does not hold: {bad}"


# --------------------------------------------------------------------------- words about the making
# Each pattern is written so that it does not match its own text in this file.
MAKING = [
    r"\bsee[d] paper\b",
    r"\b(?:elevent[h]|tent[h]|nint[h]|eighth|seventh|sixth|fifth|fourth|third|second|first)[ -]roun[d]s?\b",
    r"\bthis sessio[n]\b",
    r"(?<![\"'])\bsessio[n]s?\b",          # not pytest's scope="session"
    r"\bissu[e] \d+",
    r"\ble[n]t\b",
    r"\bdevic[e] tool\b",
    r"\.\./shared",
]
MAKING_MD = MAKING + [r"\bthe see[d]'s\b", r"\bthe see[d] (?:paper|did|does|reports|used|uses)\b",
                      r"\bas the see[d]\b"]


def _tracked_text_files() -> list[str]:
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout: the tracked files cannot be listed")
    files = [f for f in out.decode().split("\0") if f]
    return [f for f in files if f.endswith((".md", ".py", ".sh"))
            and not f.startswith(("results/real/", "results/bench/")) and os.path.exists(os.path.join(ROOT, f))]


def test_no_words_about_how_the_project_was_made():
    hits = []
    for rel in _tracked_text_files():
        patterns = [re.compile(p, re.I) for p in (MAKING_MD if rel.endswith(".md") else MAKING)]
        for n, line in enumerate(_read(os.path.join(ROOT, rel)).splitlines(), 1):
            if any(p.search(line) for p in patterns):
                hits.append(f"{rel}:{n}: {line.strip()[:140]}")
    assert not hits, ("say 'the paper', cite results by file, and keep paths inside the repository:\n"
                      + "\n".join(hits))
