"""dcbs.cmdline's small shared pieces, as the entry scripts use them."""
import pytest

from dcbs.cluster_cli import resolve_view_class
from dcbs.cmdline import ConfigError, print_paths, resolve_class

NAMES = ["airplane", "Ship", "cat"]


def test_resolve_class_by_index_name_and_default():
    assert resolve_view_class(None, NAMES) == 1                  # the paper's view class, ship
    assert resolve_view_class(None, ["a", "b"]) == 0              # no ship: class 0
    assert resolve_view_class("2", NAMES) == 2 and resolve_view_class("SHIP", NAMES) == 1
    with pytest.raises(ConfigError, match=r"--view_class 3 is out of range: the dataset has classes 0-2"):
        resolve_view_class("3", NAMES)
    with pytest.raises(ConfigError, match=r"--view_class 'dog' is not a class; use an index or one of: airplane"):
        resolve_view_class("dog", NAMES)
    with pytest.raises(KeyError, match="--x -1"):
        resolve_class("-1", NAMES, "cat", "--x", KeyError)


def test_print_paths_prints_each_path_or_one_error_line(capsys):
    assert print_paths(lambda: ["a.png", "b.png"], ValueError) == 0
    assert capsys.readouterr().out == "a.png\nb.png\n"

    def broken():
        raise ValueError("no runs under results/x")
    assert print_paths(broken, ValueError) == 2
    assert capsys.readouterr().err == "error: no runs under results/x\n"
