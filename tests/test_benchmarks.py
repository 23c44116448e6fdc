"""benchmarks.host_path runs end to end and writes its JSON (timings are not asserted)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import host_path


def test_host_path_benchmark_writes_every_case(tmp_path: Path) -> None:
    assert host_path.main(["--repeats", "1", "--results", str(tmp_path / "host_path.json")]) == 0
    record = json.loads((tmp_path / "host_path.json").read_text())
    cases = {(c["planes"], c["side"], c["dpms"]) for c in record["cases"]}
    assert cases == {(p, s, d) for p, s in ((9, 256), (41, 512)) for d in ("writable", "frozen")}
    assert all(c["median_ms"] > 0 for c in record["cases"])


@pytest.mark.parametrize("accumulation", [1, 2])
def test_train_step_benchmark_times_every_phase(tmp_path: Path, accumulation: int) -> None:
    """Each phase is timed, also when a step runs several batches before its optimiser."""
    pytest.importorskip("torch", reason="training extra not installed")
    from benchmarks import train_step
    from engine.train_volume import PHASES

    config = tmp_path / "tiny.toml"
    config.write_text(
        f"batch_size = 2\ngrad_accumulation = {accumulation}\npatch_size = 32\n"
        "channels = [4, 4, 8, 8]\n[data]\nstack_shape = [64, 64]\nframes_per_sample = 1\n"
    )
    out = tmp_path / "train_step.json"
    args = ["--config", str(config), "--steps", "2", "--threads", "1", "--precisions", "fp32"]
    assert train_step.main([*args, "--results", str(out)]) == 0
    record = json.loads(out.read_text())
    (row,) = record["rows"]
    assert set(row["ms"]) == set(PHASES) and row["batch_size"] == 2
    assert row["grad_accumulation"] == accumulation
    assert all(v >= 0 for v in row["ms"].values()) and row["step_ms"] > 0
    assert record["sample_s"] > 0


@pytest.mark.cuda
def test_gpu_volume_benchmark_times_network_and_render(tmp_path: Path) -> None:
    from benchmarks import gpu_volume

    out = tmp_path / "gpu_volume.json"
    args = ["--sizes", "64", "--precisions", "bf16", "--repeats", "2", "--results", str(out)]
    assert gpu_volume.main(args) == 0
    (row,) = json.loads(out.read_text())["rows"]
    assert row["side"] == 64 and row["planes"] == 41
    assert row["network_ms"] > 0 and row["render_ms"] > 0 and row["frames_per_s"] > 0


def test_results_are_written_whole_and_a_failed_run_never_replaces_them(tmp_path: Path) -> None:
    """`benchmarks.machine.write_results`: the code measured is recorded, NaN becomes null (a
    strict JSON parser reads the file), and a run that measured nothing or failed goes beside
    the results as NAME.failed.json instead of over them."""
    from benchmarks.machine import write_results

    path = tmp_path / "x.json"
    write_results(path, {"rows": [{"ms": 1.5, "slope": float("nan")}]})
    good = path.read_text()
    record = json.loads(good, parse_constant=lambda name: pytest.fail(f"{name} in the JSON"))
    assert record["rows"] == [{"ms": 1.5, "slope": None}]
    assert set(record["code"]) == {"commit", "dirty"}
    failed = write_results(path, {"rows": []}, measured=False)
    assert failed == tmp_path / "x.failed.json" and path.read_text() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.failed.json", "x.json"]
    fresh = tmp_path / "new.json"  # nothing to protect yet: written where asked
    assert write_results(fresh, {"rows": []}, measured=False) == fresh
    # a long run records the code it started with, not what HEAD is when it ends
    began = {"commit": "0" * 40, "dirty": False}
    write_results(tmp_path / "long.json", {"rows": [1]}, code=began)
    assert json.loads((tmp_path / "long.json").read_text())["code"] == began
