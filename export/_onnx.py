"""Torch → ONNX export with dynamic planes / height / width, metadata inside, and a parity check.

Order follows timm: torch forward → `torch.onnx.export` → `onnx.checker.check_model(full_check)`
→ ONNX Runtime (with the runtime's own session options) → compare. The export fails when ONNX
Runtime and torch disagree beyond float32 tolerance.
"""

from __future__ import annotations

import json
import logging
import platform
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch.export import Dim

from engine.files import atomic_write, atomic_write_bytes
from engine.metadata import ONNX_METADATA_KEY, ModelMetadata, normalize_images, prepare_inputs
from engine.model import DeepZ, load_model
from engine.runtime import INPUT_NAME, OUTPUT_NAME, session_options
from engine.volume import model_psf_bank

log = logging.getLogger(__name__)

OPSET = 18
EXPORT_INFO_KEY = "deepz_export"
"""metadata_props key of the JSON export record (versions, opset, parity figures)."""
PARITY_RTOL = 1e-4
"""Allowed max |onnx - torch| as a fraction of max |torch| (float32 reorderings stay ~1e-6)."""
PARITY_ATOL = 1e-5
"""Absolute floor of the allowed error, for outputs near zero."""


def random_shapes(size_multiple: int) -> tuple[tuple[int, int, int], ...]:
    """(planes, height, width) of the random parity cases, sides multiples of the network's.

    Non-square and of several sizes to exercise the dynamic axes: (1, 32, 32), (3, 64, 96)
    and (2, 96, 64) for the shipped networks' 32.
    """
    m = size_multiple
    return ((1, m, m), (3, 2 * m, 3 * m), (2, 3 * m, 2 * m))


class ParityError(RuntimeError):
    """The exported model disagrees with torch beyond float32 tolerance."""


@dataclass(frozen=True)
class ParityCase:
    """Error of ONNX Runtime against torch on one input."""

    name: str
    shape: tuple[int, ...]
    max_abs: float
    max_rel: float
    """max |onnx - torch| / max |torch|."""
    ok: bool


@dataclass
class ParityReport:
    """All parity cases of one export; `ok` when every case is within tolerance."""

    cases: list[ParityCase] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when every case passed."""
        return all(c.ok for c in self.cases)

    @property
    def max_abs(self) -> float:
        """Worst absolute error over all cases."""
        return max((c.max_abs for c in self.cases), default=0.0)

    @property
    def max_rel(self) -> float:
        """Worst relative error over all cases."""
        return max((c.max_rel for c in self.cases), default=0.0)

    def table(self) -> str:
        """One line per case, for the CLI."""
        lines = [f"{'case':<22} {'shape':<20} {'max abs':>10} {'max rel':>10}  ok"]
        for c in self.cases:
            lines.append(
                f"{c.name:<22} {c.shape!s:<20} {c.max_abs:>10.2e} {c.max_rel:>10.2e}  {c.ok}"
            )
        return "\n".join(lines)


def _rename_dims(model: onnx.ModelProto) -> None:
    """Give the dynamic axes readable names: planes, height, width (exporter writes '32*h')."""
    names = {0: "planes", 2: "height", 3: "width"}
    for value in (*model.graph.input, *model.graph.output):
        for axis, dim in enumerate(value.type.tensor_type.shape.dim):
            if dim.HasField("dim_param") and axis in names:
                dim.dim_param = names[axis]


def to_onnx_proto(model: DeepZ, opset: int = OPSET) -> onnx.ModelProto:
    """Trace `model` to an ONNX model with dynamic planes, height and width (multiples of pools)."""
    if opset < 17:
        raise ValueError(f"opset must be >= 17, not {opset}")
    model = model.eval().float().cpu()
    m = model.size_multiple
    example = torch.zeros(2, int(model.architecture["in_channels"]), 2 * m, 3 * m)
    dynamic = {"x": {0: Dim("planes", min=1, max=4096), 2: m * Dim("h"), 3: m * Dim("w")}}
    with warnings.catch_warnings():  # the exporter's own deprecation chatter
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        program = _export(model, example, dynamic, opset)
    if program is None:  # pragma: no cover - dynamo export always returns a program
        raise RuntimeError("torch.onnx.export returned no program")
    proto: onnx.ModelProto = program.model_proto
    # the exporter falls back to the opset it can write, logging it and carrying on (asked
    # for 30, it wrote 18): a model of another opset than asked is refused, not recorded as
    # the one asked for
    written = max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    if written != opset:
        raise ValueError(
            f"opset {opset}: the exporter wrote opset {written} (torch {torch.__version__} "
            f"exports up to what its onnxscript converts; {OPSET} is the default)"
        )
    _rename_dims(proto)
    return proto


def _export(model: DeepZ, example: torch.Tensor, dynamic: dict[str, Any], opset: int) -> Any:
    """Call the dynamo ONNX exporter quietly; return its ONNXProgram."""
    return torch.onnx.export(
        model,
        (example,),
        None,
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
        opset_version=opset,
        dynamo=True,
        dynamic_shapes=dynamic,
        optimize=True,
        verbose=False,
    )


def add_metadata(proto: onnx.ModelProto, metadata: ModelMetadata, info: dict[str, Any]) -> None:
    """Store the model metadata and the export record in `metadata_props` (replacing old ones)."""
    props = {p.key: p.value for p in proto.metadata_props}
    props[ONNX_METADATA_KEY] = metadata.to_json()
    props[EXPORT_INFO_KEY] = json.dumps(info, sort_keys=True)
    del proto.metadata_props[:]
    for key, value in props.items():
        proto.metadata_props.add(key=key, value=value)
    proto.producer_name = "deepz-live export"
    if metadata.volume is None:
        proto.doc_string = f"Deep-Z {metadata.name}: (N, 2, H, W) image + DPM -> (N, 1, H, W)"
    else:
        depths = len(metadata.volume.depth_um)
        proto.doc_string = f"Volume Deep-Z {metadata.name}: (N, 1, H, W) -> (N, {depths}, H, W)"


def _compare(name: str, ref: np.ndarray, got: np.ndarray) -> ParityCase:
    """Max absolute and relative error of `got` against `ref`, and whether within tolerance.

    Outputs of different shapes never agree, whatever broadcasting would make of them.
    """
    if got.shape != ref.shape:
        return ParityCase(name, tuple(ref.shape), float("inf"), float("inf"), False)
    err = float(np.max(np.abs(got.astype(np.float64) - ref)))
    scale = float(np.max(np.abs(ref)))
    ok = bool(np.isfinite(got).all()) and err <= PARITY_ATOL + PARITY_RTOL * scale
    return ParityCase(name, tuple(ref.shape), err, err / max(scale, 1e-30), ok)


def random_inputs(
    metadata: ModelMetadata, shape: tuple[int, int, int], seed: int = 0
) -> np.ndarray:
    """Random network input: normal image channel (and DPM channel within the Δz range)."""
    rng = np.random.default_rng(seed)
    n, h, w = shape
    lo, hi = metadata.dz_range_um
    channels = int(metadata.architecture.get("in_channels", 2))
    x = np.empty((n, channels, h, w), dtype=np.float32)
    x[:, 0] = rng.standard_normal((n, h, w))
    if channels == 2:
        x[:, 1] = rng.uniform(lo, hi, (n, 1, 1)) / metadata.dpm_scale_um
    return x


def simulated_inputs(metadata: ModelMetadata, side: int | None = None) -> np.ndarray:
    """Network input from the optics simulator: one worm frame, 5 planes across the Δz range.

    `side` defaults to the smallest multiple of the network's `size_multiple` from 64 px.
    """
    from engine.optics import OpticsConfig, simulate_focal_stack

    if side is None:
        m = metadata.size_multiple
        side = m * -(-64 // m)

    optics = OpticsConfig(
        na=min(metadata.na, 1.5),
        wavelength_um=metadata.wavelength_um,
        immersion_index=metadata.immersion_index,
        sample_index=metadata.sample_index,
        pixel_size_um=metadata.pixel_size_um,
    )
    stack = simulate_focal_stack("worm", shape=(side, side), z_um=np.zeros(1), optics=optics)
    frame = np.asarray(stack.images[0])
    lo, hi = metadata.dz_range_um
    dz = np.linspace(lo, hi, 5, dtype=np.float32)
    if metadata.volume is not None:
        return normalize_images(frame[None])[0][:, None]
    dpms = np.broadcast_to(dz[:, None, None], (dz.size, *frame.shape))
    x, _, _ = prepare_inputs(frame, dpms, metadata)
    return x


def check_parity(
    onnx_path: Path,
    model: DeepZ,
    metadata: ModelMetadata,
    shapes: Sequence[tuple[int, int, int]] | None = None,
) -> ParityReport:
    """Compare ONNX Runtime (runtime session options) with torch on random and simulated inputs.

    `shapes` default to `random_shapes` of the model's `size_multiple`.
    """
    if shapes is None:
        shapes = random_shapes(metadata.size_multiple)
    session = ort.InferenceSession(
        str(onnx_path), sess_options=session_options(1), providers=["CPUExecutionProvider"]
    )
    cases: list[tuple[str, np.ndarray]] = [
        (f"random {n}x{h}x{w}", random_inputs(metadata, (n, h, w), seed=i))
        for i, (n, h, w) in enumerate(shapes)
    ]
    cases.append(("simulated worm", simulated_inputs(metadata)))
    report = ParityReport()
    model = model.eval().float().cpu()
    for name, x in cases:
        with torch.inference_mode():
            ref = model(torch.from_numpy(x)).numpy().astype(np.float64)
        (got,) = session.run([OUTPUT_NAME], {INPUT_NAME: x})
        report.cases.append(_compare(name, ref, np.asarray(got)))
    return report


def export_onnx(
    model: DeepZ,
    metadata: ModelMetadata,
    out: str | Path,
    *,
    opset: int = OPSET,
    source: str = "",
    before_replacing: Callable[[], None] | None = None,
) -> ParityReport:
    """Export `model` to `out` with `metadata` inside, check it, and verify parity with torch.

    Raises `ParityError` when ONNX Runtime disagrees with torch beyond float32 tolerance,
    `onnx.checker.ValidationError` when the graph is invalid, `ValueError` when `out` is not
    an ``.onnx`` path or the exporter wrote another opset than `opset`; in each case `out` is
    left as it was (the model is written beside it and moved over it only once it passed).
    ``before_replacing`` runs once the new model passed, before it replaces `out` (the
    volume model's PSF bank is written there): when it raises, `out` is left as it was too.
    """
    out = Path(out)
    if out.suffix.lower() != ".onnx":
        raise ValueError(f"{out}: the output must be an .onnx file")
    out.parent.mkdir(parents=True, exist_ok=True)
    # written, checked and parity-tested beside `out`, then moved over it in one step: a failed
    # export leaves the model it was to replace as it was, and a reader never sees half a file

    def write(tmp: Path) -> ParityReport:
        checked = _export_checked(model, metadata, tmp, opset=opset, source=source)
        if before_replacing is not None:
            before_replacing()
        return checked

    report = atomic_write(out, write)
    log.info("exported %s (max abs %.2e, max rel %.2e)", out, report.max_abs, report.max_rel)
    return report


def _export_checked(
    model: DeepZ, metadata: ModelMetadata, out: Path, *, opset: int, source: str
) -> ParityReport:
    """`export_onnx`'s work on the file `out` itself: export, check, parity, final metadata."""
    proto = to_onnx_proto(model, opset)
    info: dict[str, Any] = {
        "source": source,
        "opset": opset,
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "python": platform.python_version(),
    }
    add_metadata(proto, metadata, info)
    onnx.save_model(proto, str(out))
    onnx.checker.check_model(str(out), full_check=True)
    report = check_parity(out, model, metadata)
    if not report.ok:
        raise ParityError(f"ONNX disagrees with torch:\n{report.table()}")
    info["parity"] = {"max_abs": report.max_abs, "max_rel": report.max_rel}
    info["parity_cases"] = [asdict(c) for c in report.cases]
    add_metadata(proto, metadata, info)
    onnx.save_model(proto, str(out))
    return report


def export_weights(weights: str | Path, out: str | Path, *, opset: int = OPSET) -> ParityReport:
    """Export trained `.pt` weights (with their `.json` metadata beside them) to ONNX.

    A volume model's PSF bank is copied beside the ONNX file when it is written elsewhere.
    """
    if Path(out).resolve() == Path(weights).resolve():
        raise ValueError(f"{out}: the output would overwrite the weights it is made from")
    model, metadata = load_model(weights)
    bank: tuple[Path, Path] | None = None  # (from, to)
    if metadata.volume is not None:
        # the bank is checked before the ONNX replaces `out`: a missing or broken bank leaves
        # the model there as it was, not a new model beside an old (or no) bank
        name = metadata.volume.psf_file
        bank = (Path(weights).parent / name, Path(out).parent / name)
        model_psf_bank(weights, metadata.volume)
    copy = None
    if bank is not None and bank[0].resolve() != bank[1].resolve():
        source_bank, target_bank = bank

        def copy() -> None:
            # once the new model passed and before it replaces `out`: a bank that cannot be
            # written leaves the model there as it was too; whole or not at all, a copy cut
            # short (a full disk) would leave a bank no loader reads
            try:
                atomic_write_bytes(target_bank, source_bank.read_bytes())
            except OSError as exc:
                raise OSError(
                    f"{target_bank}: cannot write the PSF bank beside the model "
                    f"({exc.strerror or exc}); {out} left as it was"
                ) from None

    return export_onnx(
        model, metadata, out, opset=opset, source=str(weights), before_replacing=copy
    )
