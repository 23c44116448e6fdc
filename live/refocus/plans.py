"""The plan a job refocuses onto: its DPMs, where they came from, the checks on them."""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from engine.dpm import DPMError, FocusLock, VolumePlan
from engine.metadata import Modality
from engine.runtime import DEFAULT_MODEL, Precision
from live.refocus.errors import RefocusError
from live.refocus.inputs import RawInput, malformed
from live.refocus.tasks import cached_sha256

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ChosenPlan:
    """The DPMs to refocus onto, where they came from, and the focus lock they follow, if any."""

    plan: VolumePlan
    source: str
    focus_lock: tuple[float, float] | None = None
    """(reference focus µm, stage z sign) of ``planes.focus_lock_um``, or None."""
    allow_extrapolation: bool = False
    """The config's ``engine.allow_extrapolation``: the live run took the same planes then."""


def _lock_of(planes: Any) -> tuple[float, float] | None:
    """Return the focus lock of a validated `PlanesConfig`, or None when it has none."""
    if planes.focus_lock_um is None:
        return None
    return float(planes.focus_lock_um), float(planes.stage_z_sign)


def plan_from_planes(
    planes: Sequence[float] | None,
    scope: Any,
    raw: RawInput,
    stored: Any | None = None,
) -> ChosenPlan:
    """Build the plan from --planes, --scope, the run's stored config or its planes; say which.

    `stored` is the run's ``[planes]`` config as `stored_planes` validated it (validated once
    per job by the caller: a broken one is said once).
    """
    shape = raw.frame_shape
    if planes is not None:
        if len(planes) == 0:
            raise RefocusError("--planes needs at least one z value (µm)")
        return ChosenPlan(VolumePlan.from_z([float(z) for z in planes], shape), "--planes")
    if scope is not None:
        plan = scope.planes.build(shape, float(scope.source.pixel_size_um))
        allow = bool(scope.engine.allow_extrapolation)
        return ChosenPlan(plan, "the scope config", _lock_of(scope.planes), allow)
    run = raw.run or {}
    config = run.get("config")
    if isinstance(config, dict) and stored is not None:
        try:
            pixel = raw.pixel_size_um or float(config.get("source", {}).get("pixel_size_um", 1.0))
            engine = config.get("engine")
            allow = isinstance(engine, dict) and engine.get("allow_extrapolation") is True
            plan = _recorded_surfaces(raw, stored) or stored.build(shape, pixel)
            return ChosenPlan(plan, "the recording's config", _lock_of(stored), allow)
        except (ValueError, OSError) as exc:
            log.warning("the recording's stored planes cannot be rebuilt (%s)", exc)
    if run.get("planes_um"):
        with malformed(raw.spec.path, "run metadata ('deepz' planes_um)"):
            plan = VolumePlan.from_z(run["planes_um"], shape)
        return ChosenPlan(plan, "the recording's planes")
    raise RefocusError(
        f"{raw.spec.path}: the recording does not say which planes it was refocused onto: "
        "give --planes Z1 Z2 ... (µm) or --scope config.toml"
    )


def stored_planes(raw: RawInput) -> Any | None:
    """Return the run's stored ``[planes]`` config, validated (a `PlanesConfig`), or None.

    None when the recording stored none (older runs, other stores) or one that does not
    validate (said: the recorded planes are used instead).
    """
    config = (raw.run or {}).get("config")
    if not isinstance(config, dict) or not isinstance(config.get("planes"), dict):
        return None
    from live.config import PlanesConfig

    try:
        return PlanesConfig.model_validate(config["planes"])
    except ValueError as exc:
        log.warning("the recording's stored planes cannot be rebuilt (%s)", exc)
        return None


def check_fill_plan(raw: RawInput, chosen: ChosenPlan, stored: Any | None) -> None:
    """Refuse a --fill-gaps plan that is not the live run's: other DPMs or another focus lock.

    The filled stacks go into the live image beside the live ones, so they must be the same
    planes: every DPM value is compared with the run's (the DPMs stored beside its stacks for
    surfaces, else its recorded plane offsets; the plan digest the daemon's workers check is
    not stored in the run), and the focus lock with the one in its stored config.
    """
    run = raw.run or {}
    plan, shape = chosen.plan, raw.frame_shape
    live: VolumePlan | None = None
    dpms = _kept_dpms(raw) if isinstance(run.get("surfaces"), list) else None
    if dpms is not None:
        try:
            live = VolumePlan.from_dpms(list(dpms), run["surfaces"])
        except DPMError:
            live = None
    elif isinstance(run.get("planes_um"), list):  # a run records planes_um or surfaces
        with malformed(raw.spec.path, "run metadata ('deepz' planes_um)"):
            live = VolumePlan.from_z([float(z) for z in run["planes_um"]], shape)
    same = True
    if live is not None:
        same = live.dpms_um.shape == plan.dpms_um.shape and bool(
            np.allclose(live.dpms_um, plan.dpms_um, rtol=0.0, atol=1e-5)
        )
    elif isinstance(run.get("surfaces"), list):  # surfaces whose DPMs the run did not keep
        same = plan.z_um is None and list(plan.labels) == [str(n) for n in run["surfaces"]]
    if not same:
        was = ", ".join(live.labels if live is not None else map(str, run["surfaces"]))
        raise RefocusError(
            f"{raw.spec.path}: the live run refocused onto {was}, but this plan is "
            f"{', '.join(plan.labels)} (from {chosen.source}): --fill-gaps needs the live run's "
            "planes (drop --planes / --scope)"
        )
    lock = _lock_of(stored) if stored is not None else None
    if chosen.focus_lock != lock:
        raise RefocusError(
            f"{raw.spec.path}: the live run had {_lock_said(lock)}, but this plan has "
            f"{_lock_said(chosen.focus_lock)} (from {chosen.source}): --fill-gaps needs the "
            "live run's planes and focus lock (drop --planes / --scope)"
        )


def _lock_said(lock: tuple[float, float] | None) -> str:
    """Say in words whether planes are fixed or follow the stage focus (and from where)."""
    if lock is None:
        return "fixed planes"
    return f"planes locked to the stage focus (reference {lock[0]} µm, stage z sign {lock[1]})"


def _recorded_surfaces(raw: RawInput, stored: Any) -> VolumePlan | None:
    """Return the surfaces a run refocused onto live, as its store holds them (None: not kept).

    A surface from a file is rebuilt from that file only when the run kept no stacks: the
    file may have changed since (the DPMs the live stacks were made with are beside them).
    """
    if stored.surfaces is None:
        return None
    names = [s.name for s in stored.surfaces]
    dpms = _kept_dpms(raw)
    if dpms is None or dpms.shape != (len(names), *raw.frame_shape):
        return None
    return VolumePlan.from_dpms(list(dpms.astype(np.float32)), names)


def _kept_dpms(raw: RawInput) -> np.ndarray | None:
    """Return the DPMs a surface run's live stacks were made with, as its store keeps them.

    None when the run kept no stacks or no DPMs beside them (or they cannot be read).
    """
    import zarr

    from live.store import DPMS_ARRAY, image_groups

    group = image_groups(raw.run or {}).get("stacks")
    if group is None:
        return None
    try:
        path = f"{group}/{DPMS_ARRAY}"
        return np.asarray(zarr.open_array(store=raw.spec.path, path=path, mode="r")[...])
    except (FileNotFoundError, KeyError, ValueError):
        return None


def load_scope(path: str | Path) -> Any:
    """Read a scope config (live.config, imported only for --scope), as `RefocusError`."""
    from live.config import ConfigError, load_config

    try:
        return load_config(path)
    except ConfigError as exc:
        raise RefocusError(str(exc)) from None


def engine_choice(
    model: str | Path | None,
    backend: str | None,
    scope: Any,
    raw: RawInput,
    psf_bank: str | Path | None = None,
    fill_gaps: bool = False,
) -> tuple[Path, tuple[str, ...] | None, int, Precision, Modality | None, Path | None]:
    """Model file, backend preference, max_batch, precision, render modality and PSF bank.

    Explicit arguments first, then the scope config, then the run's stored config (so the
    default reproduces the live run's model, backend and measured PSF bank), then the shipped
    model and "auto". A configured model that is not here falls back to the shipped model,
    said, except for `fill_gaps`: its stacks go into the run's live image beside the live
    run's, so another model there is refused (``--model`` chooses one deliberately).
    """
    stored: dict[str, Any] = {}
    run_config = (raw.run or {}).get("config")
    if isinstance(run_config, dict) and isinstance(run_config.get("engine"), dict):
        stored = run_config["engine"]
    if scope is not None:
        stored = scope.engine.model_dump(mode="json")
        stored["model_path"] = str(scope.engine.resolved_model_path())
    path: Path
    if model is not None:
        path = Path(model)
    elif stored.get("model_path"):
        path = Path(stored["model_path"])
        whose = "the scope config's" if scope is not None else "the recording's"
        if not path.is_file() and fill_gaps:
            raise RefocusError(
                f"{path}: {whose} model is not here, and --fill-gaps does not fill the live "
                "stacks with another model silently: pass --model to choose one"
            )
        if not path.is_file():
            log.warning("%s model %s is not here: using the shipped model", whose, path)
            path = DEFAULT_MODEL
    else:
        path = DEFAULT_MODEL
    prefer: tuple[str, ...] | None
    if backend is not None:
        prefer = (backend,)
    elif stored.get("backends"):
        prefer = tuple(str(b) for b in stored["backends"])
    else:
        prefer = None
    precision = stored.get("precision", "fp32")
    if precision not in ("auto", "fp32", "bf16", "fp16", "int8"):
        precision = "fp32"
    modality = stored.get("render_modality")
    if modality not in ("widefield", "confocal"):
        modality = None
    bank: Path | None = None
    if psf_bank is not None:
        bank = Path(psf_bank)
    elif isinstance(stored.get("psf_bank"), str):
        bank = Path(stored["psf_bank"])  # a missing one is refused by the caller
    return path, prefer, int(stored.get("max_batch") or 64), precision, modality, bank


def _recorded_sha256(raw: RawInput, role: str, path: Path | None) -> str | None:
    """Return the SHA-256 the live run recorded for its `role` file at `path` (or None).

    `role` is "model" or "psf_bank"; None when the run recorded none (older runs, other stores)
    or another path (`path` None: wherever it lay). The attrs come from disk, so every level
    is checked for its type.
    """
    files = (raw.run or {}).get("engine_files")
    entry = files.get(role) if isinstance(files, dict) else None
    if not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str):
        return None
    if re.fullmatch(r"[0-9a-f]{64}", entry["sha256"]) is None:  # not a hash: nothing to check
        return None
    if not isinstance(entry.get("path"), str):
        return None
    if path is not None and Path(entry["path"]) != path:
        return None
    return str(entry["sha256"])


def check_recorded(
    raw: RawInput, model: Path | None, bank: Path | None, fill_gaps: bool = False
) -> None:
    """Refuse a run's PSF bank that changed since the run; warn of a changed model.

    A bank changed in place would put this refocus's planes through another PSF than the live
    stacks', silently; pass ``--psf-bank`` to mean it. A changed model is a common, deliberate
    choice (a newer model at the same path), so it is only said; but `fill_gaps` writes beside
    the live stacks, which that model did not make, so there it is refused (``--model``).
    """
    if bank is not None and (want := _recorded_sha256(raw, "psf_bank", bank)) is not None:
        have = cached_sha256(bank)
        if have != want:
            raise RefocusError(
                f"{bank}: this PSF bank changed since the run was recorded through it (sha256 "
                f"{have[:12]}, recorded {want[:12]}); pass --psf-bank {bank} to refocus through "
                "it as it is now"
            )
    if model is not None and (want := _recorded_sha256(raw, "model", model)) is not None:
        have = cached_sha256(model)
        if have != want and fill_gaps:
            raise RefocusError(
                f"{model}: this model changed since the run was recorded with it (sha256 "
                f"{have[:12]}, recorded {want[:12]}), and --fill-gaps does not fill the live "
                f"stacks with another model silently: pass --model {model} to choose it"
            )
        if have != want:
            log.warning("%s changed since the run was recorded with it: refocusing with it", model)


def check_fill_files(raw: RawInput, files: dict[str, Path | None]) -> None:
    """Refuse to fill a run's live stacks through another model or bank than made them.

    For ``--fill-gaps --scope``: the scope config names its files by path, and those may not
    be the ones the run recorded (another model, a bank measured since). Compared by SHA-256
    wherever the files lie; ``--model`` / ``--psf-bank`` choose others deliberately (review 74:
    the volume model filled a slim model's run without a word). `files` maps the roles to
    check, "model" and "psf_bank", to the files chosen (None: no bank).
    """
    for role, path in files.items():
        flag = "--model" if role == "model" else "--psf-bank"
        want = _recorded_sha256(raw, role, None)
        if want is None:
            continue
        have = cached_sha256(path) if path is not None else None
        if have != want:
            what = "no PSF bank" if path is None else f"{path} (sha256 {have[:12] if have else ''})"
            raise RefocusError(
                f"--fill-gaps: the scope config's {role.replace('_', ' ')} is {what}, not the "
                f"one the live stacks came from (sha256 {want[:12]}): the filled stacks would "
                f"sit beside them made another way; pass {flag} to choose it deliberately"
            )


def lock_offsets(
    chosen: ChosenPlan,
    raw: RawInput,
    limits_um: tuple[float, float],
) -> np.ndarray | None:
    """Each time point's DPM offset (µm) when the plan follows the stage focus, else None.

    The live worker's `engine.dpm.FocusLock`, built the same way (clamped to the DPM values
    the model serves, `engine.runtime.depth_limits`), applied to the focus recorded with each
    frame, so a focus-locked run refocuses offline onto the planes it had live. A frame with
    no recorded focus gets NaN (no planes, as live).
    """
    if chosen.focus_lock is None:
        return None
    if raw.focus_um is None:
        raise RefocusError(
            f"{raw.spec.path}: the planes follow the stage focus (planes.focus_lock_um) but the "
            "recording holds no focus per frame: give --planes Z1 Z2 ... (µm) to refocus "
            "without the lock"
        )
    reference, sign = chosen.focus_lock
    lock = FocusLock.for_plan(chosen.plan, reference, sign, limits_um)
    offsets = np.zeros(raw.n_t, dtype=np.float64)
    unknown, clamped, worst = [], [], 0.0
    for t in raw.present:
        focus = float(raw.focus_um[t]) if t < raw.focus_um.size else math.nan
        if math.isfinite(focus):
            offsets[t], excess = lock.offset_um(focus)
            if excess:  # as the live worker: planes held at the trained depths, said
                clamped.append(t)
                worst = max(worst, abs(excess))
        else:  # the scope did not say: no planes for it, as live (the worker rejected it)
            offsets[t] = math.nan
            unknown.append(t)
    if clamped:  # review 84: the offline path dropped the excess unsaid
        from live.metrics import format_seqs

        log.warning(
            "%d frames (time points %s) were taken up to %.2f µm beyond the focus lock's range: "
            "their planes are clamped to the model's trained depths, as the live run's were",
            len(clamped),
            format_seqs(clamped),
            worst,
        )
    if unknown and len(unknown) == len(raw.present):
        raise RefocusError(
            f"{raw.spec.path}: the planes follow the stage focus (planes.focus_lock_um) but no "
            "frame has a recorded focus: give --planes Z1 Z2 ... (µm) to refocus without the lock"
        )
    if unknown:
        from live.metrics import format_seqs

        log.warning(
            "%d frames (%s) have no recorded focus, which focus-locked planes need: their planes "
            "are left NaN (--planes Z1 Z2 ... refocuses without the lock)",
            len(unknown),
            format_seqs(unknown),
        )
    return offsets


def lock_attrs(lock: tuple[float, float] | None) -> dict[str, float] | None:
    """Return the focus lock as stored in the output's attributes (None: fixed planes)."""
    if lock is None:
        return None
    return {"reference_um": lock[0], "stage_z_sign": lock[1]}
