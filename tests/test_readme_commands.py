"""The README's two commands: `make run` runs the shipped daemon, `make test` is what CI runs.

`make test` on a clean clone is CI itself (`.ci/run`). Here we check that the README, the
Makefile and `.ci/run` agree, and run the exact main-job command of `make run` (the shipped
`config.toml`, the shipped model, the simulated scope) for a few seconds, reading the store back.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import zarr

from tests.live_helpers import run_array

REPO = Path(__file__).resolve().parents[1]


def _make_recipe(target: str) -> list[str]:
    """Return the commands `make -n <target>` would run (venv already present or not)."""
    out = subprocess.run(
        ["make", "-n", "-W", "pyproject.toml", target],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.splitlines()


def test_readme_opens_with_the_two_commands_and_ci_runs_the_test_one():
    readme = (REPO / "README.md").read_text()
    first_block = re.search(r"```bash\n(.*?)```", readme, re.S)
    assert first_block is not None
    commands = [line.split("#")[0].strip() for line in first_block.group(1).splitlines()]
    assert [c for c in commands if c] == ["make run", "make test"]
    ci = (REPO / ".ci" / "run").read_text()
    assert re.search(r"^make test$", ci, re.M)
    run_recipe = _make_recipe("run")
    assert any("-m venv" in line for line in run_recipe)  # sets the venv up when missing
    assert any("-m live.run --scope config.toml --duration" in line for line in run_recipe)
    test_recipe = _make_recipe("test")
    assert any("pytest" in line for line in test_recipe)
    assert any("ruff check" in line for line in test_recipe)
    assert any("mypy" in line for line in test_recipe)


def test_main_job_runs_the_shipped_scope_and_records_every_frame(tmp_path: Path):
    out_path = tmp_path / "main-job.ome.zarr"
    command = ["-m", "live.run", "--scope", "config.toml", "--duration", "6"]
    proc = subprocess.run(
        [sys.executable, *command, "--output", str(out_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text
    # the shipped config prefers openvino (installed by both commands), then onnxruntime
    expected = "openvino" if importlib.util.find_spec("openvino") else "onnxruntime"
    assert f"backend: {expected} chosen" in text
    assert "pre-flight:" in text
    assert "summary (duration reached: 6 s)" in text
    assert str(out_path) in text
    attrs = dict(zarr.open_group(str(out_path), mode="r").attrs["deepz"])
    n = attrs["run_summary"]["frames_in"]
    assert n > 0
    assert attrs["raw_present"] == [[0, n]]
    assert attrs["stacks_present"] == [[0, n]]  # every_frame: a stack for every raw frame
    assert f"raw frames recorded {n}" in text
    raw, stacks = run_array(out_path, "raw"), run_array(out_path, "stacks")
    assert raw.shape == (n, 256, 256) and raw.dtype == np.uint16
    assert stacks.shape == (n, 9, 256, 256)
    assert np.isfinite(np.asarray(stacks[n - 1])).all()
