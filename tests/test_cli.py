"""live.cli: the ``deepz-live`` command dispatches to each tool's own ``main``."""

from __future__ import annotations

import importlib.util
import tomllib
from pathlib import Path

import pytest

from live.cli import COMMANDS, main

REPO = Path(__file__).resolve().parents[1]


def test_the_console_script_is_declared_and_every_command_has_a_module() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert project["scripts"] == {"deepz-live": "live.cli:main"}
    assert list(COMMANDS) == [
        "run",
        "refocus",
        "train",
        "evaluate",
        "export",
        "keys",
        "view",
        "status",
    ]
    for module, _, example in COMMANDS.values():
        assert importlib.util.find_spec(module) is not None, module
        assert example.startswith("deepz-live ")


def test_help_lists_each_command_with_an_example(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name, (_, what, example) in COMMANDS.items():
        assert f"  {name}" in out and what in out and example in out
    assert main([]) == 2 and "usage: deepz-live COMMAND" in capsys.readouterr().err
    assert main(["frobnicate"]) == 2
    assert "unknown command 'frobnicate'" in capsys.readouterr().err


def test_commands_run_the_tools_with_their_arguments(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["keys", str(tmp_path / "keys"), "--client", "viewer"]) == 0
    assert "wrote" in capsys.readouterr().out and (tmp_path / "keys").is_dir()
    assert main(["refocus", str(tmp_path / "nope.ome.zarr"), "--no-progress"]) == 2
    assert "no such recording" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["run", "--help"])
    assert exc.value.code == 0 and "--scope" in capsys.readouterr().out
