"""No thread dies silently: a fault injected into each long-lived daemon thread stops the run
with exit code 1, names the thread in the summary and leaves a store that says it is incomplete
and why, with a truthful record of what it holds."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zarr

from live.recorder import missing_seqs
from live.run import EXIT_FAILED, run
from live.supervisor import Supervisor
from tests.live_helpers import live_config, run_array

# component name in the summary -> (object path to patch, calls before the fault)
FAULTS: dict[str, tuple[str, int]] = {
    "router": ("live.router.Router._route", 6),
    "collector": ("live.router.Collector._collect", 3),
    "recorder writer": ("live.recorder.Recorder._write", 4),
    "status publisher": ("live.metrics.StatusPublisher.publish", 2),
    "source": ("live.hook.FrameSender.send", 5),
}


def _faulty(original: Callable[..., Any], after: int) -> Callable[..., Any]:
    """Wrap `original` so that call number `after` + 1 and later raise."""
    calls = [0]

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        if calls[0] > after:
            raise RuntimeError("injected fault")
        return original(*args, **kwargs)

    return wrapper


@pytest.mark.parametrize("component", list(FAULTS))
def test_a_failing_thread_stops_the_run_non_zero_with_a_truthful_store(
    component: str,
    tmp_path: Path,
    tiny_model_files,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    target, after = FAULTS[component]
    module_path, cls_name, method = target.rsplit(".", 2)
    module = __import__(module_path, fromlist=[cls_name])
    cls = getattr(module, cls_name)
    monkeypatch.setattr(cls, method, _faulty(getattr(cls, method), after))
    config = live_config(tmp_path, tiny_model_files["onnx"], rate_hz=10.0)
    store = tmp_path / "run.ome.zarr"

    code = run(config, duration_s=60.0, output=store, workers=1)  # the fault ends it early

    out = capsys.readouterr().out
    reason = f"{component} thread failed: RuntimeError: injected fault"
    assert code == EXIT_FAILED
    assert f"summary (failed: {reason})" in out and f"FAILED            {reason}" in out
    root = zarr.open_group(store, mode="r")
    deepz = root.attrs["deepz"]
    assert deepz["complete"] is False and deepz["run_error"] == reason
    summary = deepz["summary"]
    present = [s for start, stop in deepz["raw_present"] for s in range(start, stop)]
    assert len(present) == summary["raw_frames"]  # the record matches the arrays
    gaps = [s for a, b in summary["raw_gaps"] for s in range(a, b)]
    assert gaps == missing_seqs(deepz["raw_present"])
    assert run_array(store, "raw").shape[0] == (present[-1] + 1 if present else 0)
    if component == "recorder writer":  # nothing after the fault was written, and it says so
        assert deepz["error"].startswith("the writer thread failed: RuntimeError")
        assert summary["raw_frames"] + summary["stacks"] <= after
    for seq in present:
        assert np.asarray(run_array(store, "raw")[seq]).any()  # a present seq holds a real frame


def test_the_supervisor_reports_each_failure_once_with_its_component() -> None:
    seen = []
    supervisor = Supervisor(on_failure=seen.append)
    with supervisor.watch("router"):
        raise ValueError("bad\nthing")
    with supervisor.watch("collector"):
        pass
    assert [f.reason() for f in seen] == ["router thread failed: ValueError: bad thing"]
    assert supervisor.failures == seen
