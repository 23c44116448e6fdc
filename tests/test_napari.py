"""napari + napari-ome-zarr open a real run store at its root (issue 13).

The store is written by the real `Recorder`. The layers are checked on napari's
`ViewerModel`, which is the model that `napari.Viewer` opens files into, and which needs
neither Qt nor OpenGL. The screenshot is taken in a child process, in a window on an X
server: napari draws with OpenGL, and Qt's ``offscreen`` platform gives it no context here
(the canvas comes back black). The child process means a Qt abort fails one test, not the
whole run. What napari-ome-zarr does not show yet is written down as strict xfails, so a
fixed plugin or napari turns them into failures that ask for the marker to go.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import zarr

from live.protocol import decode, encode_frame, encode_stack
from live.recorder import Recorder
from live.store import image_groups

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")  # no Qt app here may reach for a display
napari = pytest.importorskip("napari", reason="napari is not installed: pip install '.[view]'")
pytest.importorskip(
    "napari_ome_zarr", reason="napari-ome-zarr is not installed: pip install '.[view]'"
)

REPO = Path(__file__).resolve().parents[1]
SHAPE = (48, 64)
PLANES = [-4.0, -2.0, 0.0, 2.0, 4.0]
PIXEL_UM = 0.3
NAMES = {"raw": "raw: raw frames", "stacks": "stacks: refocused stacks"}
"""Layer names napari-ome-zarr gives: ``<multiscales name>: <omero channel label>``."""
DROPS_TRANSLATION = (
    "napari-ome-zarr 0.9-0.10 (ome_zarr_reader.Multiscales.metadata) uses only "
    "datasets[0].coordinateTransformations[0], the scale, and drops the NGFF translation that "
    "puts the first plane at -4 µm (0.7-0.8 applied it, but name no axes); `deepz-live view` "
    "shows it right (test_deepz_live_view_lines_up_raw_and_stacks_at_depth)"
)
RIGHT_ALIGNED = (
    "napari aligns layers by trailing axes: the raw (t, y, x) image lands on the stacks' "
    "(z, y, x), so raw's t (0.5 s steps) shares the z slider with the 2 µm planes; no "
    "OME-Zarr 0.5 metadata aligns images of different dimensionality (`deepz-live view` does)"
)


def _record(path: Path) -> Path:
    """Record 3 frames (200-399 counts, one hot pixel) and their 5-plane stacks, then close."""
    rng = np.random.default_rng(0)
    recorder = Recorder(
        path,
        frame_shape=SHAPE,
        pixel_size_um=PIXEL_UM,
        rate_hz=2.0,
        planes_um=PLANES,
        config={"source": {"kind": "test"}},
    )
    for seq in range(3):
        frame = rng.integers(200, 400, SHAPE, dtype=np.uint16)
        frame[0, 0] = 60000  # the window must come from the data, not this pixel
        stack = rng.normal(10.0, 1.0, (len(PLANES), *SHAPE)).astype(np.float32)
        recorder.put_frame(decode(encode_frame(frame, seq=seq, timestamp_s=seq / 2)))
        recorder.put_stack(
            decode(encode_stack(stack, seq=seq, timestamp_s=seq / 2, focus_um=0.0, latency_ms=1.0))
        )
    assert recorder.close(timeout_s=30).error is None
    return path


def _windows(store: Path) -> dict[str, tuple[float, float]]:
    """Return each image's omero display window (start, end) as the store records it."""
    root = zarr.open_group(store, mode="r")
    windows = {}
    for role, group in image_groups(root.attrs["deepz"]).items():
        window = root[group].attrs["ome"]["omero"]["channels"][0]["window"]
        windows[role] = (window["start"], window["end"])
    return windows


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _record(tmp_path_factory.mktemp("napari") / "run.ome.zarr")


@pytest.fixture(scope="module")
def viewer(store: Path) -> napari.components.ViewerModel:
    """A viewer model with the store opened at its root by napari-ome-zarr."""
    import npe2

    npe2.PluginManager.instance().discover()  # what napari.Viewer() does on start
    model = napari.components.ViewerModel()
    model.open(str(store), plugin="napari-ome-zarr")
    return model


def _layer(viewer: napari.components.ViewerModel, role: str) -> napari.layers.Image:
    return viewer.layers[NAMES[role]]


def test_napari_opens_a_recording_at_its_root_as_raw_and_stacks(viewer, store) -> None:
    assert [layer.name for layer in viewer.layers] == [NAMES["raw"], NAMES["stacks"]]
    raw, stacks = _layer(viewer, "raw"), _layer(viewer, "stacks")
    assert raw.data.shape == (3, *SHAPE) and stacks.data.shape == (3, len(PLANES), *SHAPE)
    assert raw.axis_labels == ("t", "y", "x") and stacks.axis_labels == ("t", "z", "y", "x")
    assert [str(unit) for unit in stacks.units[1:]] == ["micrometer"] * 3
    np.testing.assert_allclose(raw.scale, [0.5, PIXEL_UM, PIXEL_UM])  # 2 Hz, 0.3 µm pixels
    np.testing.assert_allclose(stacks.scale, [0.5, PLANES[1] - PLANES[0], PIXEL_UM, PIXEL_UM])


def test_each_layer_opens_with_the_stores_display_window(viewer, store) -> None:
    windows = _windows(store)
    assert 200 <= windows["raw"][0] < 210 and 390 < windows["raw"][1] < 400  # not 0-65535
    for role, window in windows.items():
        np.testing.assert_allclose(_layer(viewer, role).contrast_limits, window)


@pytest.mark.xfail(strict=True, reason=DROPS_TRANSLATION)
def test_the_stacks_planes_sit_at_their_z_offsets_from_focus(viewer) -> None:
    stacks = _layer(viewer, "stacks")
    z = [stacks.data_to_world((0, i, 0, 0))[1] for i in range(len(PLANES))]
    np.testing.assert_allclose(z, PLANES)  # µm about focus; napari shows 0 ... 8


@pytest.mark.xfail(strict=True, reason=RIGHT_ALIGNED)
def test_the_z_slider_steps_through_the_planes(viewer) -> None:
    z_axis = viewer.dims.axis_labels.index("z")
    assert viewer.dims.range[z_axis].step == PLANES[1] - PLANES[0]


def test_deepz_live_view_lines_up_raw_and_stacks_at_depth(store) -> None:
    """What the plugin misses (the xfails above), `live.recording_view` gets right."""
    from live.recording_view import open_recording

    model = napari.components.ViewerModel()
    raw, stacks = open_recording(model, store)
    assert model.dims.axis_labels == ("t", "z", "y", "x")
    z_axis = model.dims.axis_labels.index("z")
    assert model.dims.range[z_axis].step == PLANES[1] - PLANES[0]  # z steps through planes
    z = [stacks.data_to_world((0, i, 0, 0))[1] for i in range(len(PLANES))]
    np.testing.assert_allclose(z, PLANES)
    assert raw.data_to_world((0, 0, 0, 0))[1] == 0.0  # raw frames: the focal plane
    t_axis = model.dims.axis_labels.index("t")
    assert model.dims.range[t_axis].step == 0.5  # time is its own slider (2 Hz)
    windows = _windows(store)
    np.testing.assert_allclose(raw.contrast_limits, windows["raw"])
    np.testing.assert_allclose(stacks.contrast_limits, windows["stacks"])


@pytest.fixture(scope="module")
def x_display() -> Iterator[str]:
    """The X display to draw on: $DISPLAY, else a private Xvfb for this module."""
    if os.environ.get("DISPLAY"):
        yield os.environ["DISPLAY"]
        return
    xvfb = shutil.which("Xvfb")
    if xvfb is None:
        pytest.skip(
            "no X server for napari's OpenGL canvas (Qt's offscreen platform has no GL "
            "context): install Xvfb (apt-get install xvfb) or set DISPLAY"
        )
    read, write = os.pipe()
    server = subprocess.Popen(
        [xvfb, "-displayfd", str(write), "-screen", "0", "1024x768x24", "-nolisten", "tcp"],
        pass_fds=(write,),
        stderr=subprocess.DEVNULL,
    )
    os.close(write)
    with os.fdopen(read) as ready:
        number = ready.readline().strip()  # Xvfb writes its display number once it listens
    try:
        if not number:
            pytest.fail(f"Xvfb exited with {server.wait(5)} before it was ready")
        yield f":{number}"
    finally:
        server.terminate()
        server.wait(10)


def _screenshots(store: str, out: str) -> None:
    """Child process: show the store in a napari window and save a screenshot of each layer."""
    viewer = napari.Viewer(show=True)  # a shown window: the canvas draws only then
    try:
        layers = viewer.open(store, plugin="napari-ome-zarr")
        shots = {}
        for shown in layers:
            for layer in layers:
                layer.visible = layer is shown
            shots[shown.name] = viewer.screenshot(canvas_only=True, flash=False)
        np.savez(out, **shots)
    finally:
        viewer.close()


def _view_screenshots(store: str, out: str) -> None:
    """Child process: `deepz-live view`'s layers, each alone, at z = 0 µm and z = -4 µm."""
    from live.recording_view import open_recording

    viewer = napari.Viewer(show=True)
    try:
        layers = open_recording(viewer, store)
        z_axis = viewer.dims.axis_labels.index("z")
        shots = {}
        for z in (0.0, -4.0):
            viewer.dims.set_point(z_axis, z)
            for shown in layers:
                for layer in layers:
                    layer.visible = layer is shown
                shots[f"{shown.name} @ {z:g}"] = viewer.screenshot(canvas_only=True, flash=False)
        np.savez(out, **shots)
    finally:
        viewer.close()


def _run_child(function: str, store: Path, out: Path, x_display: str, tmp_path: Path) -> None:
    """Run `function` of this module in a child process drawing on `x_display`."""
    env = os.environ | {
        "DISPLAY": x_display,
        "QT_QPA_PLATFORM": "xcb",
        "NAPARI_CONFIG": str(tmp_path / "napari.yaml"),
    }
    code = f"import sys; from tests.test_napari import {function}; {function}(*sys.argv[1:])"
    child = subprocess.run(
        [sys.executable, "-c", code, str(store), str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,  # napari and Qt import slowly on a loaded CI machine
        check=False,
    )
    if 'Could not load the Qt platform plugin "xcb"' in child.stderr:
        lines = [line for line in child.stderr.splitlines() if "xcb" in line]
        pytest.skip(f"Qt cannot draw on X here: {' '.join(lines[:2])}")
    assert child.returncode == 0, child.stderr[-3000:]


def _shows_pixels(shot: np.ndarray) -> bool:
    """Whether a canvas screenshot shows an image (not one flat colour)."""
    return bool(shot[..., :3].astype(np.float64).std() > 10)


def test_deepz_live_view_shows_raw_only_at_the_focal_plane(store, x_display, tmp_path) -> None:
    out = tmp_path / "view.npz"
    _run_child("_view_screenshots", store, out, x_display, tmp_path)
    shots = dict(np.load(out))
    raw, stacks = "raw: raw frames", "stacks: refocused stacks"
    assert _shows_pixels(shots[f"{raw} @ 0"])  # the raw frame is the focal plane
    assert not _shows_pixels(shots[f"{raw} @ -4"])  # and nowhere else in z
    assert _shows_pixels(shots[f"{stacks} @ 0"]) and _shows_pixels(shots[f"{stacks} @ -4"])


def test_a_screenshot_of_each_layer_shows_its_pixels(store, x_display, tmp_path) -> None:
    out = tmp_path / "shots.npz"
    _run_child("_screenshots", store, out, x_display, tmp_path)
    shots = dict(np.load(out))
    assert sorted(shots) == sorted(NAMES.values())
    for name, shot in shots.items():
        assert shot.ndim == 3 and shot.shape[2] == 4 and shot.dtype == np.uint8, name
        rgb = shot[..., :3].astype(np.float64)
        background = np.all(shot == shot[0, 0], axis=-1)
        assert rgb.std() > 10, f"{name}: a flat canvas, {json.dumps(shot[0, 0].tolist())}"
        assert (~background).mean() > 0.2, f"{name}: the image covers too little of the canvas"
        assert rgb[~background].mean() > 40, f"{name}: too dark for its display window"
