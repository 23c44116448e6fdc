"""benchmarks.write runs end to end through the real Recorder and writes its JSON.

Timings are not asserted; the item counts are fixed by ``--max-gb`` (the time limit is far
away), so what is checked is exact: every case records every item it fed, the shards hold
``rate_hz × 1 s`` items, and sharding makes fewer files.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import write


def test_write_benchmark_records_every_case_and_shards_make_fewer_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(write, "RESULTS", tmp_path)
    argv = ["--synthetic", "--shape", "32", "--planes", "3", "--seconds", "120"]
    argv += ["--max-gb", "0.0007", "--rate-hz", "10", "--dir", str(tmp_path)]
    assert write.main(argv) == 0
    record = json.loads((tmp_path / "write.json").read_text())
    assert record["cpu"] and record["date"] and record["shape"] == [32, 32]
    rows = {(r["stack_dtype"], r["shard_s"]): r for r in record["rows"]}
    assert set(rows) == {(d, s) for d in ("float32", "float16") for s in (0.0, 1.0)}
    for (dtype, shard_s), row in rows.items():
        item_bytes = 32 * 32 * 2 + 3 * 32 * 32 * (2 if dtype == "float16" else 4)
        fed = -(-0.0007e9 // item_bytes)  # the feeder stops at max_gb
        assert row["frames"] == row["stacks"] == fed and row["error"] is None
        assert row["shard_frames"] == ({"raw": 10, "stacks": 10} if shard_s else
                                       {"raw": 1, "stacks": 1})  # fmt: skip
        assert row["gb_per_s"] > 0 and row["files"] > 0
    for dtype in ("float32", "float16"):
        plain, sharded = rows[dtype, 0.0], rows[dtype, 1.0]
        assert sharded["files"] < plain["files"] - 1.5 * plain["frames"]
    assert rows["float16", 1.0]["frames"] > rows["float32", 1.0]["frames"]  # half the bytes
    errors = {str(e["frame"]): e for e in record["dtype_error"]}
    assert list(errors) == ["0", "1", *write.BRIGHT]
    for name in ("0", "1"):  # in range: rounding only, at most half a float16 step
        assert errors[name]["float16_max_rel"] <= 2.0**-11
        assert errors[name]["float16_saturated"] == errors[name]["uint16_clipped"] == 0
    overexposed = errors["0 overexposed 4x"]  # synthetic planes reach 1.5 × 65535 counts
    assert overexposed["max_counts"] > 65504 and overexposed["float16_saturated"] > 0
    assert not list(tmp_path.glob("deepz-write-*"))  # the stores are gone
