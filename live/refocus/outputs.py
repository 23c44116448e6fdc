"""The output image: its store, lock, metadata, identity, manifest and presence."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.dpm import VolumePlan
from live.refocus.errors import RefocusError
from live.refocus.inputs import (
    RawInput,
    frames_sha256,
    is_run_attrs,
    is_url,
    live_stacks_present,
    local_path,
    malformed,
)
from live.refocus.plans import lock_attrs
from live.refocus.tasks import MANIFEST, NOT_DONE, manifest_entry, seq_runs
from live.store_lock import StoreLocked, write_lock

if TYPE_CHECKING:
    from live.store import XmlImage


log = logging.getLogger(__name__)


DEFAULT_IMAGE = "stacks_offline"
"""Name of the offline stacks image written beside ``raw`` in a run store."""
FILL_IMAGE = "stacks"
"""Group of the live stacks image in stores before the collection layout, and where
``fill_gaps`` creates one when the run kept no stacks (otherwise it completes the run's own
stacks image, wherever `live.store.image_groups` says it is)."""
OUT_IMAGE = "stacks"
"""Name of the stacks image in a new store (``out``)."""

IMAGE_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_.-]{0,63}")
"""What ``--name`` may be: a letter, then up to 63 letters, digits, ``_``, ``.`` or ``-``.

The name is a key of the store's ``deepz.images`` and may be a group of the store itself (an
offline image from before images were listed), so it must be one plain path segment: no
``/``, ``..`` or empty name (zarr refuses those only after the store was created), and not
a number (numbered groups are the store's collection, where another image may already be).
"""


def check_image_name(name: str | None, *, fill_gaps: bool = False) -> None:
    """Refuse an output image name before any store is created or changed.

    None is the default name. With `fill_gaps` no name may be given: the job completes the
    run's own stacks image, so a name would be ignored.

    Raises
    ------
    RefocusError
        The name is not an `IMAGE_NAME`, or is given with `fill_gaps`; one line.
    """
    if name is None:
        return
    if fill_gaps:
        raise RefocusError(
            f"--name {name!r} with --fill-gaps: the gaps are filled in the run's own stacks "
            "image; drop --name"
        )
    if not IMAGE_NAME.fullmatch(name):
        raise RefocusError(
            f"--name {name!r} is not an image name: a letter, then at most 63 letters, digits, "
            "'_', '.' or '-' (one name in the store, not a path)"
        )


# ----------------------------------------------------------------------------- output lock


@contextlib.contextmanager
def output_lock(store: str, job: str) -> Iterator[None]:
    """Hold the output store's lock (`live.store_lock`) while the job writes it.

    The driver holds it from before the output is opened until its presence is written; the
    file names the `job` token, which each chunk task, in whatever process or cluster, reads
    before it writes (`live.store_lock.held_by`): one still running after its job has ended
    writes nothing. A second job is refused in one line naming the holder. A store behind a
    URL has no lock files (object stores have no locks): said, and not guarded.
    """
    if is_url(store):
        log.warning(
            "%s: a store behind a URL cannot be locked: another job writing it is not refused",
            store,
        )
        yield
        return
    with contextlib.ExitStack() as held:
        try:
            held.enter_context(write_lock(store, job=job))
        except StoreLocked as exc:
            raise RefocusError(str(exc)) from None
        _drop_left_reserve(Path(store))
        yield


def _drop_left_reserve(store: Path) -> None:
    """Delete the disk reserve a killed live recorder left in `store` (its lock is ours now).

    The recorder holds back a few MB (`live.recorder.RESERVE_NAME`) for its final metadata
    and deletes it at close; a daemon killed with SIGKILL or a power cut cannot. Whoever next
    holds the store's lock is its only writer, so the file is nobody's: said and removed.
    """
    from live.recorder import RESERVE_NAME
    from live.store import OME_GROUP

    reserve = store / OME_GROUP / RESERVE_NAME
    try:
        size = reserve.stat().st_size
        reserve.unlink()
    except FileNotFoundError:
        return
    except OSError as exc:  # not ours to fail the job over
        log.warning("%s: could not remove the reserve file a killed recorder left: %s", store, exc)
        return
    log.warning(
        "%s: removed the %.1f MB reserve file left by a live recorder that was killed",
        store,
        size / 2**20,
    )


# ----------------------------------------------------------------------------- outputs


def _stacks_metadata(
    name: str, plan: VolumePlan, raw: RawInput, dtype: str
) -> tuple[dict[str, Any], list[str], XmlImage]:
    """NGFF ``ome`` attribute, dimension names and OME-XML entry of an offline stacks image.

    Built as the live recorder builds its stacks image (`live.store.StackAxis`): evenly spaced
    planes are a ``z`` axis in µm from the first plane, uneven planes and surfaces a custom
    axis with no unit, never invented z positions. A source without a rate or pixel size (a
    TIFF) gets 1 s and 1 µm, as NGFF's default scale.
    """
    from live.store import StackAxis, XmlImage, image_axes, ngff_image

    axis = StackAxis.from_plan(plan.z_um, plan.labels, plan.dpms_um)
    dt = 1.0 / raw.rate_hz if raw.rate_hz else 1.0
    px = raw.pixel_size_um or 1.0
    axes = image_axes("stacks", axis)
    scale, translation = axis.transform(dt, px)
    xml = XmlImage(
        name=name,
        dtype=dtype,
        size_t=raw.n_t,
        size_z=len(plan),
        size_y=raw.frame_shape[0],
        size_x=raw.frame_shape[1],
        pixel_size_um=px,
        interval_s=dt,
        z_step_um=scale[1] if axis.uniform else None,
    )
    return ngff_image(name, axes, scale, translation), [a["name"] for a in axes], xml


IN_STORE = "."
"""A job identity's ``source`` when the input is the output store itself (`job_identity`)."""


def job_identity(
    raw: RawInput,
    plan: VolumePlan,
    model: dict[str, str],
    backend: str,
    chunk: int,
    focus_lock: tuple[float, float] | None,
    store: str,
) -> dict[str, Any]:
    """Describe what must match for a rerun to resume an existing output image.

    What defines the stacks: the input, the plan's DPMs, the model's and PSF bank's hashes,
    the backend, the chunking. Not where the directories happen to be: an input that is the
    output `store` itself (a run's offline image, fill-gaps) is `IN_STORE`, so a run store
    moved, renamed or copied whole resumes its jobs. Another input (a TIFF, another store) is
    named by its absolute path and its frames' fingerprint (`frames_sha256`, a few frames
    read): moved, it resumes (`_as_now`); rewritten in place with other frames, it is refused.
    """
    in_store = raw.spec.path == store
    identity: dict[str, Any] = {
        "source": IN_STORE if in_store else raw.spec.path,
        "source_image": raw.spec.array_path,
        "n_t": raw.n_t,
        "frame_shape": list(raw.frame_shape),
        "plan_sha256": hashlib.sha256(plan.dpms_um.tobytes()).hexdigest(),
        "model_sha256": model["sha256"],
        "backend": backend,
        "chunk_t": chunk,
    }
    if not in_store and (fingerprint := frames_sha256(raw)) is not None:
        identity["source_frames_sha256"] = fingerprint
    if focus_lock is not None:  # only then: images written before the lock existed still resume
        identity["focus_lock"] = lock_attrs(focus_lock)
    # The same network through another PSF bank makes other planes: a resume must not mix
    # them. Only when not the default, so images written before these keys still resume.
    if model.get("render_modality", "widefield") != "widefield":
        identity["render_modality"] = model["render_modality"]
    if "psf_bank_sha256" in model:
        identity["psf_bank_sha256"] = model["psf_bank_sha256"]
    if "point_fit" in model:  # beads refitted: other planes again
        identity["point_fit"] = model["point_fit"]
    return identity


def _as_now(old: Any, store: str, new: dict[str, Any]) -> Any:
    """Return a recorded job identity in today's terms, so outputs written before resume.

    - Before `IN_STORE`, an input that was the output store itself was named by its absolute
      path: that path, where the store still is, is `IN_STORE` now. Such an output moved since
      is refused (its old path cannot tell its own store from another input): --overwrite.
    - An input at the recorded path is compared by its fingerprint (``source_frames_sha256``)
      only where both identities hold one: an image begun before the fingerprint, or when
      the input's sampled bytes could not be read, is known by the path alone (and recorded
      with the fingerprint once there is one).
    - An input at another path with the recorded fingerprint is the same recording, moved:
      said, and resumed (its new path recorded).
    """
    if not isinstance(old, dict):
        return old
    if old.get("source") == store:
        old = {**old, "source": IN_STORE}
    key = "source_frames_sha256"
    if old.get("source") == new.get("source"):
        if key not in old or key not in new:
            old = {k: v for k, v in old.items() if k != key}
            if key in new:
                old[key] = new[key]
    elif key in new and old.get(key) == new[key]:
        log.warning(
            "%s: the input was %s when this image was begun; the same recording (sha256 %s...): "
            "resuming",
            new["source"],
            old.get("source"),
            new[key][:12],
        )
        old = {**old, "source": new["source"]}
    return old


def _differs(old: Any, new: dict[str, Any]) -> list[str]:
    """Return the keys in which a recorded job identity (any JSON, or None) differs from `new`."""
    before: dict[str, Any] = old if isinstance(old, dict) else {}
    return sorted(k for k in set(before) | set(new) if before.get(k) != new.get(k))


def _compressors() -> list[Any]:
    """Output codecs: Blosc-LZ4 with bit shuffle (the shipped config's recorder codec).

    For a 9 × 256² float32 stack it wrote in 2.4 ms and kept 64 % of the bytes, where zstd
    level 1 took 3.8 ms and kept 81 % (measured on the development machine).
    """
    from zarr.codecs import BloscCodec, BloscShuffle

    return [BloscCodec(cname="lz4", clevel=3, shuffle=BloscShuffle.bitshuffle)]


@dataclass
class _Output:
    """The opened output: store, image group name, array and manifest paths, chunk size."""

    store: str
    image: str
    chunk: int
    n_blocks: int
    fill: bool
    group: Any = None
    name: str = ""
    """The image's name (its role in the store's ``deepz.images``); `image` is its group."""

    @property
    def array_path(self) -> str:
        """The (t, z, y, x) array."""
        return f"{self.image}/0"

    @property
    def manifest_path(self) -> str:
        """The per-chunk completion array."""
        return f"{self.image}/{MANIFEST}"


def _create_manifest(group: Any, n_blocks: int) -> None:
    """Create the per-chunk completion array: one int64 per chunk, one object each."""
    group.create_array(
        MANIFEST,
        shape=(n_blocks,),
        chunks=(1,),
        dtype="int64",
        fill_value=NOT_DONE,
        compressors=None,
        overwrite=True,
    )


def output_store(raw: RawInput, out: str | Path | None) -> str:
    """Return the store a job writes, one spelling of it: `out`, else the run store itself.

    Raises
    ------
    RefocusError
        The input is not a run of this project and no `out` was given.
    """
    if out is None:
        if not raw.is_run:
            raise RefocusError(
                f"{raw.spec.path} is not a run of this project, so the stacks need their own "
                "store: give --out NEW.ome.zarr"
            )
        return raw.spec.path
    store = local_path(out)
    return store if is_url(store) else str(Path(store).resolve())


def prepare_output(
    raw: RawInput,
    plan: VolumePlan,
    *,
    store: str,
    out: str | Path | None,
    name: str | None,
    fill_gaps: bool,
    chunk: int,
    overwrite: bool,
    identity: dict[str, Any],
    deepz: dict[str, Any],
    stack_dtype: str = "float32",
    chunk_given: bool = True,
    wanted: Sequence[int] = (),
) -> _Output:
    """Create (or reopen and check, to resume) the stacks image and its manifest.

    Without a given chunk, a resumed image keeps its own (``identity`` is updated), so an
    image written with another default still resumes. `name` is checked first
    (`check_image_name`).
    """
    import zarr

    from live.store import (
        FRAMES_GROUP,
        OME_GROUP,
        image_group,
        image_groups,
        register_image,
        reserved_names,
    )

    check_image_name(name, fill_gaps=fill_gaps)  # before the store is opened, let alone made
    shape = (raw.n_t, len(plan), *raw.frame_shape)
    root: Any
    if fill_gaps:
        root = zarr.open_group(store=store, mode="r+")
        return _prepare_fill(root, raw, plan, identity, deepz, wanted, overwrite)
    if out is not None:
        try:
            root = zarr.open_group(store=store, mode="a", zarr_format=3)
        except Exception as exc:
            raise RefocusError(f"{store}: cannot open or create the output store: {exc}") from None
        name = name or OUT_IMAGE
    else:
        root = zarr.open_group(store=store, mode="r+")
        name = name or DEFAULT_IMAGE
    target = root.attrs.get("deepz")  # any run's store, the source's or another (--out)
    if name == "raw" or (is_run_attrs(target) and name in reserved_names(target)):
        raise RefocusError(
            f"the output image {name!r} would overwrite the run's own data in {store}: choose "
            "another --name"
        )
    ome, dimensions, xml = _stacks_metadata(name, plan, raw, stack_dtype)
    # its group: where a rerun finds it (the images listed in the store, or a group of that
    # name from before images were listed); a new image gets its group when it is created
    # only a store this project wrote lists images (a run, or an earlier --out job): a foreign
    # store's groups are never taken for ours, whatever their names (review 74)
    ours = isinstance(target, dict) and (
        is_run_attrs(target) or isinstance(target.get("images"), Mapping)
    )
    known = image_groups(target) if ours else {}
    image = known.get(name) or _earlier_image(root, name, known, store)
    protected = {OME_GROUP, FRAMES_GROUP} | (
        reserved_names(target) if is_run_attrs(target) else set()
    )
    if image in protected:  # a forged list mapping the name onto the run's own data
        raise RefocusError(
            f"{store}: its image list puts {name!r} in group {image!r}, which holds the run's "
            "own data: the store's metadata is damaged, nothing was written"
        )
    n_blocks = math.ceil(raw.n_t / chunk)
    group: Any
    if image is not None and image in root and not overwrite:
        group = root[image]
        stored = dict(group.attrs.get("deepz", {}))
        old = _as_now(stored.get("job"), store, identity)
        # an image written before the job recorded its render modality: the model's says it
        modality = dict(stored.get("model") or {}).get("render_modality", "widefield")
        if isinstance(old, dict) and "render_modality" not in old and modality != "widefield":
            old = {**old, "render_modality": modality}
        if not chunk_given and isinstance(old, dict) and isinstance(old.get("chunk_t"), int):
            chunk = max(1, old["chunk_t"])
            identity["chunk_t"] = chunk
            n_blocks = math.ceil(raw.n_t / chunk)
        if old != identity:
            raise RefocusError(
                f"{store}/{image} ({name}) exists from another refocusing (differs in "
                f"{', '.join(_differs(old, identity))}): pass --overwrite to replace it, or "
                "--name / --out for a new image"
            )
        if "0" not in group or MANIFEST not in group or group["0"].shape[0] != raw.n_t:
            raise RefocusError(
                f"{store}/{image} ({name}) is incomplete or damaged: pass --overwrite"
            )
        if stored.get("job") != identity:  # recorded in today's terms: it resumes when moved
            group.attrs["deepz"] = {**stored, "job": identity}
        register_image(root, _xml_store(store), name, xml)  # an image from before: listed now
        return _Output(store, image, chunk, n_blocks, False, group, name)
    # the group and its array first, then listed: a job cut off in between leaves an unlisted
    # group (skipped by the next one), never a listed image without its data
    image = image_group(root, name)
    try:
        if out is not None and "deepz" not in root.attrs:  # checked: now it is ours
            root.attrs["deepz"] = {
                "source": raw.spec.path,
                "source_image": raw.spec.array_path,
                "time_index": "the source's time index (camera sequence number for runs)",
            }
        group = root.create_group(image, overwrite=True)
        group.attrs["ome"] = ome
        group.attrs["deepz"] = {**deepz, "job": identity, "present": [], "complete": False}
        group.create_array(
            "0",
            shape=shape,
            chunks=(chunk, *shape[1:]),
            dtype=stack_dtype,
            fill_value=0.0,
            compressors=_compressors(),
            dimension_names=dimensions,
        )
        _create_manifest(group, n_blocks)
        register_image(root, _xml_store(store), name, xml, group=image)
    except OSError as exc:  # a full or read-only disk, a vanished mount
        raise RefocusError(
            f"{store}/{image} ({name}): cannot write the output image: {type(exc).__name__}: {exc}"
        ) from None
    return _Output(store, image, chunk, n_blocks, False, group, name)


def _earlier_image(root: Any, name: str, known: dict[str, str], store: str) -> str | None:
    """Return the group of an offline image `name` written before images were listed, if any.

    Only a group this project's refocusing wrote (it records its ``job``) is one: anything
    else of that name in an ``--out`` store is someone else's data, never replaced.
    """
    import zarr

    if name not in root or name in known.values():
        return None
    node = root[name]
    deepz = node.attrs.get("deepz") if isinstance(node, zarr.Group) else None
    if isinstance(deepz, dict) and "job" in deepz:
        return name
    raise RefocusError(
        f"{store}/{name} exists and is not an image of this project's refocusing: choose "
        "another --name (it is left as it is)"
    )


def _xml_store(store: str) -> Path | str:
    """Return where an added image's XML entry goes: the local store's folder, or its URL."""
    return store if is_url(store) else Path(store)


def _prepare_fill(
    root: Any,
    raw: RawInput,
    plan: VolumePlan,
    identity: dict[str, Any],
    deepz: dict[str, Any],
    wanted: Sequence[int],
    overwrite: bool,
) -> _Output:
    """Open (or create) the live stacks image for fill-gaps and check it fits the plan.

    The fill's identity (`job_identity`: model, PSF bank, point fit, modality, plan, focus lock,
    backend) is recorded beside its manifest (``fill_job``): a fill resumes only the chunks a
    fill of the same identity marked (`_fill_manifest_resumes`).
    """
    from live.store import STACK_DTYPES, image_groups

    shape = (raw.n_t, len(plan), *raw.frame_shape)
    store = raw.spec.path
    image = image_groups(raw.run or {}).get("stacks", FILL_IMAGE)
    group: Any
    if image in root:
        group = root[image]
        with malformed(store, f"live stacks image ({image!r} holds no array '0')"):
            array = group["0"]
        if str(array.dtype) not in STACK_DTYPES:  # the recorder's; another is not its image
            raise RefocusError(
                f"{store}/{image}/0 holds {array.dtype} stacks, not the recorder's "
                f"({' or '.join(STACK_DTYPES)}): not a live stacks image to fill"
            )
        if tuple(array.shape[1:]) != shape[1:]:
            raise RefocusError(
                f"{store}/{image}/0 holds stacks of shape {list(array.shape[1:])} (planes, y, x), "
                f"but this plan gives {list(shape[1:])}: --fill-gaps needs the live run's planes"
            )
        # One task per file: a sharded array's tasks must not share a shard (each write
        # rewrites the whole shard file, so two tasks in one shard would lose each other's).
        chunk = int((array.shards or array.chunks)[0])
        identity["chunk_t"] = chunk  # the live image's, whatever was asked
        n_blocks = math.ceil(raw.n_t / chunk)
        resumes = _fill_manifest_resumes(
            group, identity, wanted, n_blocks, overwrite, store, f"{store}/{image}"
        )
        if array.shape[0] < raw.n_t:
            array.resize(shape)
    else:  # the live run kept no stacks: create the image as the recorder would have
        from live.store import image_group, register_image

        chunk = 1
        identity["chunk_t"] = chunk
        n_blocks = raw.n_t
        resumes = False
        ome, dimensions, xml = _stacks_metadata("stacks", plan, raw, "float32")
        image = image_group(root, "stacks")
        group = root.create_group(image)
        group.attrs["ome"] = ome
        group.create_array(
            "0",
            shape=shape,
            chunks=(1, *shape[1:]),
            dtype="float32",
            fill_value=0.0,
            compressors=_compressors(),
            dimension_names=dimensions,
        )
        register_image(root, _xml_store(store), "stacks", xml, group=image)
    if not resumes:
        _create_manifest(group, n_blocks)
    attrs = dict(group.attrs.get("deepz", {}))
    attrs.setdefault("planes_um", list(plan.z_um) if plan.z_um is not None else None)
    attrs["fill_job"] = {**deepz, "job": identity}
    group.attrs["deepz"] = attrs
    return _Output(store, image, chunk, n_blocks, True, group, "stacks")


def _fill_manifest_resumes(
    group: Any,
    identity: dict[str, Any],
    wanted: Sequence[int],
    n_blocks: int,
    overwrite: bool,
    store: str,
    where: str,
) -> bool:
    """Whether an earlier fill's manifest may be resumed (False: it is to be made afresh).

    Its marks are trusted only under the identity recorded beside them (``fill_job``): an
    interrupted fill resumed with another model (or bank, plan, lock ...) would otherwise keep
    the first model's rows and record the second's name. With marks on chunks this fill wants
    that is refused unless `overwrite` (then they are computed again); marks on no wanted
    chunk are dropped, so every mark in the manifest belongs to the recorded identity.
    """
    from live.metrics import format_seqs

    if MANIFEST not in group or group[MANIFEST].shape != (n_blocks,):
        return False
    previous = dict(group.attrs.get("deepz", {})).get("fill_job")
    old = _as_now(previous.get("job") if isinstance(previous, dict) else None, store, identity)
    if old == identity:
        return True
    chunk = int(identity["chunk_t"])
    manifest = group[MANIFEST]
    blocks = {t // chunk for t in wanted}
    marked = {b for b in blocks if manifest_entry(manifest, b) != NOT_DONE}
    if marked and not overwrite:
        seqs = [t for t in wanted if t // chunk in marked]
        raise RefocusError(
            f"{where}: an earlier --fill-gaps wrote the stacks of seqs {format_seqs(seqs)} "
            f"with another model or plan (differs in {', '.join(_differs(old, identity))}): "
            "pass --overwrite to compute them again with this one"
        )
    return False


def finish_output(
    output: _Output, raw: RawInput, done: set[int], wanted: set[int], model: dict[str, str]
) -> None:
    """Write presence (and for fill-gaps the run's root attributes) once tasks are over.

    Each fill is listed in the run's ``filled_offline`` with its seqs, date and `model` (the
    identity `refocus_recording` records): the live stacks may then come from two models.
    """
    import zarr

    from live.recorder import gap_ranges

    if output.fill:
        root: Any = zarr.open_group(store=output.store, mode="r+")
        deepz = dict(root.attrs["deepz"])
        present = live_stacks_present(deepz, raw.n_t, output.store) | done
        deepz["stacks_present"] = seq_runs(present)
        if isinstance(deepz.get("summary"), dict):
            summary = dict(deepz["summary"])
            summary["stacks"] = len(present)
            summary["stacks_gaps"] = [list(g) for g in gap_ranges(seq_runs(present))]
            summary.pop("stacks_missing", None)  # stores before session 33 listed every seq
            deepz["summary"] = summary
        filled = list(deepz.get("filled_offline", []))
        if done:
            filled.append({"seqs": seq_runs(done), "date": utc_now(), "model": model})
        deepz["filled_offline"] = filled
        root.attrs["deepz"] = deepz
        return
    group: Any = zarr.open_group(store=output.store, path=output.image, mode="r+")
    attrs = dict(group.attrs["deepz"])
    attrs["present"] = seq_runs(done)
    attrs["complete"] = wanted <= done
    attrs["updated"] = utc_now()
    group.attrs["deepz"] = attrs


def utc_now() -> str:
    """UTC time, ISO 8601, seconds."""
    return datetime.now(UTC).isoformat(timespec="seconds")
