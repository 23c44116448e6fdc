"""benchmarks.host_path runs end to end and writes its JSON (timings are not asserted)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import host_path


def test_host_path_benchmark_writes_every_case(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(host_path, "RESULTS", tmp_path)
    assert host_path.main(["--repeats", "1"]) == 0
    record = json.loads((tmp_path / "host_path.json").read_text())
    cases = {(c["planes"], c["side"], c["dpms"]) for c in record["cases"]}
    assert cases == {(p, s, d) for p, s in ((9, 256), (41, 512)) for d in ("writable", "frozen")}
    assert all(c["median_ms"] > 0 for c in record["cases"])
