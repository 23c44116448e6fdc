"""`deepz-live view RUN`: the layers a recording opens as, lined up and at their true depth.

These checks need no napari (`layer_specs` is napari-free); `tests/test_napari.py` opens the
same layers in napari's `ViewerModel` when the view extra is installed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from live.recorder import Recorder
from live.recording_view import RecordingError, layer_specs
from tests.test_recorder import _frame, _recorder, _stack

PLANES = [-4.0, -2.0, 0.0, 2.0, 4.0]


def _record(path: Path, **kwargs: object) -> Path:
    rec: Recorder = _recorder(path, **kwargs)
    planes = kwargs.get("planes_um", PLANES)
    for seq in range(3):
        rec.put_frame(_frame(seq))
        rec.put_stack(_stack(seq, planes if isinstance(planes, list) else PLANES))
    assert rec.close(timeout_s=30).error is None
    return path


def test_raw_frames_sit_at_the_focal_plane_and_stacks_at_their_depth(tmp_path: Path) -> None:
    specs = {s.role: s for s in layer_specs(_record(tmp_path / "run.ome.zarr", planes_um=PLANES))}
    raw, stacks = specs["raw"], specs["stacks"]
    # raw gets the stacks' z axis (length 1), so t lines up with t and z with z in napari
    assert raw.shape == (3, 1, 64, 80) and stacks.shape == (3, 5, 64, 80)
    assert raw.axis_labels == stacks.axis_labels == ("t", "z", "y", "x")
    assert raw.units == stacks.units == ("second", "micrometer", "micrometer", "micrometer")
    np.testing.assert_allclose(stacks.scale, [0.05, 2.0, 0.5, 0.5])  # 20 Hz, 2 µm, 0.5 µm px
    np.testing.assert_allclose(stacks.translate, [0.0, -4.0, 0.0, 0.0])  # planes at -4 … 4 µm
    np.testing.assert_allclose(raw.scale, stacks.scale)
    np.testing.assert_allclose(raw.translate, [0.0, 0.0, 0.0, 0.0])  # a raw frame: z = 0 µm
    assert PLANES.index(raw.translate[1]) == 2  # it shares the stacks' plane at focus
    lo, hi = raw.contrast_limits or (0, 0)
    assert 0 <= lo < hi <= 1002  # the store's window, not 0 … 65535
    assert np.asarray(raw.array[1]).max() == 1001  # the store's own array, unchanged


@pytest.mark.parametrize(("planes", "index"), [([-3.0, 0.0, 1.0], 1), ([-3.0, -0.5, 1.0], 1)])
def test_uneven_planes_keep_index_positions_with_raw_at_the_plane_nearest_focus(
    tmp_path: Path, planes: list[float], index: int
) -> None:
    specs = {s.role: s for s in layer_specs(_record(tmp_path / "run.ome.zarr", planes_um=planes))}
    raw, stacks = specs["raw"], specs["stacks"]
    assert stacks.axis_labels[1] == "plane" and stacks.units[1] is None  # no invented µm
    assert stacks.scale[1] == 1.0 and stacks.translate[1] == 0.0
    assert raw.translate[1] == index  # the plane nearest 0 µm


def test_a_path_that_is_not_a_recording_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(RecordingError, match="not a deepz-live recording"):
        layer_specs(tmp_path / "missing.ome.zarr")
    store = _record(tmp_path / "run.ome.zarr", planes_um=PLANES)
    import zarr

    group = zarr.open_group(store / "1", mode="r+")
    intact = dict(group.attrs["ome"])
    group.attrs["ome"] = {"version": "0.5", "multiscales": []}  # a damaged image
    with pytest.raises(RecordingError, match="IndexError"):
        layer_specs(store)
    group.attrs["ome"] = {"version": "0.5", "multiscales": [{"datasets": ["0"]}]}  # not a dict
    with pytest.raises(RecordingError, match="not a deepz-live recording"):
        layer_specs(store)
    group.attrs["ome"] = {**intact, "omero": "x"}  # a field of another kind
    with pytest.raises(RecordingError, match="AttributeError"):
        layer_specs(store)


def test_view_command_refuses_a_missing_recording_with_exit_2(tmp_path: Path, capsys) -> None:
    from live.display import main

    assert main([str(tmp_path / "nope.ome.zarr")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nope.ome.zarr" in err[0]
