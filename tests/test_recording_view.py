"""`deepz-live view RUN`: the layers a recording opens as, lined up and at their true depth.

These checks need no napari (`layer_specs` is napari-free); `tests/test_napari.py` opens the
same layers in napari's `ViewerModel` when the view extra is installed.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zarr

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


def test_raw_sits_on_the_plane_nearest_focus_when_the_planes_skip_0(tmp_path: Path) -> None:
    """Planes -3, -1, 1, 3 µm: raw at 0 µm lay between two slider steps and showed on both
    (review 73); it sits on one of the stacks' planes, the one nearest focus."""
    planes = [-3.0, -1.0, 1.0, 3.0]
    specs = {s.role: s for s in layer_specs(_record(tmp_path / "run.ome.zarr", planes_um=planes))}
    raw, stacks = specs["raw"], specs["stacks"]
    assert stacks.axis_labels[1] == "z" and stacks.scale[1] == 2.0
    assert raw.translate[1] in planes and abs(raw.translate[1]) == 1.0


def test_a_long_recording_is_read_in_a_bounded_number_of_chunks() -> None:
    """A frame a chunk over 10^6 frames is read in at most `MAX_LAYER_CHUNKS` chunks, several
    frames each (a dask graph of 10^6 chunks took 1 GB before the window opened)."""
    from live.recording_view import MAX_LAYER_CHUNKS, _layer_chunks

    raw = zarr.create_array({}, shape=(10**6, 512, 512), chunks=(1, 512, 512), dtype="uint16")
    chunks = _layer_chunks(raw)
    assert chunks[1:] == (512, 512) and 10**6 / chunks[0] <= MAX_LAYER_CHUNKS
    tiled = zarr.create_array(
        {}, shape=(10**6, 41, 512, 512), chunks=(1, 41, 256, 256), dtype="float16"
    )
    chunks = _layer_chunks(tiled)
    assert chunks[1:] == (41, 256, 256) and 4 * 10**6 / chunks[0] <= MAX_LAYER_CHUNKS
    short = zarr.create_array({}, shape=(30, 64, 80), chunks=(1, 64, 80), dtype="uint16")
    assert _layer_chunks(short) == (1, 64, 80)  # a short run keeps its own chunks


def test_a_path_that_is_not_a_recording_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(RecordingError, match="not a deepz-live recording"):
        layer_specs(tmp_path / "missing.ome.zarr")
    store = _record(tmp_path / "run.ome.zarr", planes_um=PLANES)
    group = zarr.open_group(store / "1", mode="r+")
    intact: dict[str, Any] = json.loads(json.dumps(group.attrs["ome"]))
    group.attrs["ome"] = {"version": "0.5", "multiscales": []}  # a damaged image
    with pytest.raises(RecordingError, match="IndexError"):
        layer_specs(store)
    group.attrs["ome"] = {"version": "0.5", "multiscales": [{"datasets": ["0"]}]}  # not a dict
    with pytest.raises(RecordingError, match="not a deepz-live recording"):
        layer_specs(store)
    group.attrs["ome"] = {**intact, "omero": "x"}  # a field of another kind
    with pytest.raises(RecordingError, match="AttributeError"):
        layer_specs(store)


@pytest.mark.parametrize(
    ("change", "kind"),
    [
        (lambda o: o["omero"]["channels"][0].update(window={"start": 10**400, "end": 1}), "Overf"),
        (lambda o: _transform(o, "scale", [0.05, 10**400, 0.5, 0.5]), "OverflowError"),
    ],
)
def test_numbers_beyond_a_float_in_the_attributes_are_one_line(
    tmp_path: Path, change: Callable[[dict[str, Any]], None], kind: str
) -> None:
    store = _record(tmp_path / "run.ome.zarr", planes_um=PLANES)
    _set_ome(store, "1", change)
    with pytest.raises(RecordingError, match=f"not a deepz-live recording \\({kind}"):
        layer_specs(store)


def test_a_store_whose_metadata_cannot_be_read_is_one_line(tmp_path: Path) -> None:
    # A folder where the root's zarr.json should be (a damaged copy; unlike a file without
    # permissions it cannot be read as root either): the store's fault, said in one line.
    store = _record(tmp_path / "run.ome.zarr", planes_um=PLANES)
    (store / "zarr.json").unlink()
    (store / "zarr.json").mkdir()
    with pytest.raises(RecordingError, match="not a deepz-live recording") as exc:
        layer_specs(store)
    assert "\n" not in str(exc.value)


def test_view_command_refuses_a_missing_recording_with_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from live.display import main

    assert main([str(tmp_path / "nope.ome.zarr")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nope.ome.zarr" in err[0]


def _set_ome(store: Path, group: str, change: Callable[[dict[str, Any]], None]) -> None:
    node = zarr.open_group(store / group, mode="r+")
    ome = json.loads(json.dumps(node.attrs["ome"]))  # a deep copy
    change(ome)
    node.attrs["ome"] = ome


def _transform(ome: dict[str, Any], kind: str, values: list[float]) -> None:
    dataset = ome["multiscales"][0]["datasets"][0]
    dataset["coordinateTransformations"] = [
        t for t in dataset["coordinateTransformations"] if t["type"] != kind
    ] + [{"type": kind, kind: values}]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda o: _transform(o, "scale", [0.05, 0.0, 0.5, 0.5]), "scale [0.05, 0.0, 0.5, 0.5]"),
        (lambda o: _transform(o, "scale", [0.05, 2.0, -0.5, 0.5]), "is not all finite and > 0"),
        (lambda o: _transform(o, "scale", [1.0, 1.0]), "scale has 2 entries for a 4-D array"),
        (lambda o: _transform(o, "translation", [0.0, -4.0]), "translation has 2 entries"),
        (
            lambda o: o["omero"]["channels"][0].update(window={"start": 5, "end": 1}),
            "display window [5.0, 1.0] is not finite start < end",
        ),
        (
            lambda o: o["omero"]["channels"][0].update(window={"start": 2, "end": 2}),
            "display window [2.0, 2.0]",
        ),
        (lambda o: o["multiscales"][0]["datasets"][0].update(path=""), "is not an array"),
    ],
)
def test_values_napari_would_refuse_are_one_line_before_a_window_opens(
    tmp_path: Path, change: Callable[[dict[str, Any]], None], message: str
) -> None:
    store = _record(tmp_path / "run.ome.zarr", planes_um=PLANES)
    _set_ome(store, "1", change)  # the stacks image
    with pytest.raises(RecordingError) as exc:
        layer_specs(store)
    assert message in str(exc.value) and "\n" not in str(exc.value)
    assert str(exc.value).startswith(f"{store}: not a deepz-live recording (ValueError: image '1'")


def test_raw_frames_take_the_z_axis_of_offline_stacks_when_the_run_kept_no_live_ones(
    tmp_path: Path,
) -> None:
    # `live.refocus RUN` of a run that kept only raw frames writes role stacks_offline.
    store = _record(tmp_path / "run.ome.zarr", planes_um=[-3.0, -0.5, 1.0])  # uneven: index axis
    root = zarr.open_group(store, mode="r+")
    deepz: dict[str, Any] = json.loads(json.dumps(root.attrs["deepz"]))
    deepz["images"] = {"raw": "0", "stacks_offline": "1"}
    deepz["planes_um"] = None  # the live run's planes: the offline image says its own
    root.attrs["deepz"] = deepz
    specs = {s.role: s for s in layer_specs(store)}
    raw, offline = specs["raw"], specs["stacks_offline"]
    assert raw.shape == (3, 1, 64, 80) and raw.insert_axis == 1
    assert raw.axis_labels == offline.axis_labels == ("t", "plane", "y", "x")
    assert raw.translate[1] == 1  # the offline stacks' plane nearest 0 µm (-0.5)
    np.testing.assert_allclose(raw.scale, offline.scale)


def test_unreadable_pixels_are_one_line_and_exit_2_from_the_view_command(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")  # no Qt app here may reach for one
    napari = pytest.importorskip("napari", reason="napari is not installed: pip install '.[view]'")
    from live.recording_view import show

    closed: list[bool] = []

    class Window(napari.components.ViewerModel):  # type: ignore[misc, name-defined]
        """A napari window without Qt: the viewer's model, and a close that is recorded."""

        def __init__(self, title: str) -> None:
            super().__init__(title=title)

        def close(self) -> None:
            closed.append(True)

    monkeypatch.setattr(napari, "Viewer", Window)
    monkeypatch.setattr(napari, "run", lambda: None)
    assert show(_record(tmp_path / "intact.ome.zarr", planes_um=PLANES)) == 0 and not closed
    capsys.readouterr()
    store = _record(tmp_path / "run.ome.zarr", planes_um=PLANES)  # not one napari has cached
    for chunk in (store / "1" / "0").rglob("*"):
        if chunk.is_file() and chunk.name != "zarr.json":
            chunk.write_bytes(b"garbage")  # every chunk of the stacks corrupt
    assert show(store) == 2 and closed == [True]
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {store}: cannot show the recording (")
