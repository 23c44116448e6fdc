"""Evaluate a trained Deep-Z model on held-out simulated focal stacks and write a report.

``python -m engine.evaluate [--weights engine/weights/deepz-slim.pt] [--out docs/evaluation]
[--quick]``

For every Δz in the range: PSNR, SSIM and Pearson of the refocused plane against the true
noise-free plane, beside two baselines: the unrefocused input and a classical Wiener refocus
with the known PSF (the sample is taken as a thin layer in the input's focal plane: the input
is deconvolved with the in-focus OTF and re-blurred with the OTF Δz away). Then: lateral FWHM
of refocused beads against the true plane, and neuron axial localisation from a virtual stack
built from one frame. Writes ``report.md``, ``metrics.json`` and PNG plots.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engine.files import out_dir_problem
from engine.metadata import (
    ModelMetadata,
    ModelMetadataError,
    denormalize_images,
    prepare_inputs,
)
from engine.metrics import gaussian_fwhm_2d, pearson, psnr, ssim
from engine.model import DeepZ, load_model

__all__ = [
    "EVAL_SEEDS",
    "EvalSettings",
    "evaluate",
    "main",
    "refocus",
    "simulate_eval_stack",
    "wiener_refocus",
]

DEFAULT_WEIGHTS = Path(__file__).parent / "weights" / "deepz-slim.pt"
EVAL_SEEDS: dict[str, tuple[int, ...]] = {
    "worm": (11, 12, 13),
    "beads": (21, 22),
    "mixed": (31,),
}
"""Held-out simulator seeds (training uses seeds >= 1_000_000, validation 900_000+)."""


@dataclass
class EvalSettings:
    """How much to evaluate: stacks, input planes, Δz grid and virtual-stack spacing."""

    seeds: dict[str, tuple[int, ...]] = field(default_factory=lambda: dict(EVAL_SEEDS))
    shape: tuple[int, int] = (256, 256)
    z_step_um: float = 0.5
    z_half_range_um: float = 16.0
    input_z_um: tuple[float, ...] = (-4.0, 0.0, 4.0)
    dz_um: tuple[float, ...] = tuple(float(v) for v in range(-10, 11))
    localisation_step_um: float = 0.25

    @classmethod
    def quick(cls) -> EvalSettings:
        """Return a smaller set for a fast check (one stack per kind, fewer planes)."""
        return cls(
            seeds={"worm": (11,), "beads": (21,)},
            input_z_um=(0.0,),
            dz_um=tuple(float(v) for v in range(-10, 11, 2)),
            localisation_step_um=0.5,
        )


@dataclass
class _EvalStack:
    """One held-out focal stack: noisy frames, noise-free planes, plane z and object truth."""

    kind: str
    seed: int
    images: np.ndarray
    clean: np.ndarray
    z_um: np.ndarray
    objects: Any
    pixel_size_um: float


def _optics_of(metadata: ModelMetadata) -> Any:
    """Return the simulator's `OpticsConfig` for the optics a model was trained with."""
    from engine.optics import OpticsConfig

    return OpticsConfig(
        na=metadata.na,
        wavelength_um=metadata.wavelength_um,
        immersion_index=metadata.immersion_index,
        sample_index=metadata.sample_index,
        pixel_size_um=metadata.pixel_size_um,
    )


def simulate_eval_stack(kind: str, seed: int, s: EvalSettings, metadata: ModelMetadata) -> Any:
    """Simulate a held-out focal stack with the optics recorded in the model's metadata."""
    from engine.optics import simulate_focal_stack

    optics = _optics_of(metadata)
    n = round(s.z_half_range_um / s.z_step_um)
    z = np.arange(-n, n + 1) * s.z_step_um
    return simulate_focal_stack(kind, shape=s.shape, z_um=z, optics=optics, seed=seed)  # type: ignore[arg-type]


def refocus(
    model: DeepZ,
    metadata: ModelMetadata,
    image: np.ndarray,
    dpms_um: np.ndarray,
    batch: int = 8,
) -> np.ndarray:
    """Refocus one (H, W) frame onto N DPMs (N, H, W) µm; return (N, H, W) float32 counts.

    Inputs go through `engine.metadata.prepare_inputs` and outputs through
    `denormalize_images`, exactly as the runtime backends do.
    """
    h, w = image.shape
    dpms = np.asarray(dpms_um, dtype=np.float32)
    if dpms.ndim == 2:
        dpms = dpms[None]
    out = np.empty((dpms.shape[0], h, w), dtype=np.float32)
    device = next(model.parameters()).device
    for i in range(0, dpms.shape[0], batch):
        x, mean, std = prepare_inputs(image, dpms[i : i + batch], metadata)
        with torch.no_grad():
            y = model(torch.from_numpy(x).to(device))[:, 0, :h, :w].cpu().numpy()
        out[i : i + batch] = denormalize_images(y, mean, std)
    return out


def _otf(metadata: ModelMetadata, dz_um: Sequence[float], shape: tuple[int, int]) -> np.ndarray:
    """Return OTFs (len(dz), H, W) of the known wide-field PSF at defocus values dz (µm)."""
    from engine.optics import make_psf

    optics = _optics_of(metadata)
    size = min(127, (min(shape) // 2) * 2 - 1)
    psf = make_psf(optics, np.asarray(dz_um, dtype=np.float64), size_px=size)
    full = np.zeros((len(dz_um), *shape), dtype=np.float64)
    full[:, :size, :size] = psf
    full = np.roll(full, (-(size // 2), -(size // 2)), axis=(1, 2))
    otf: np.ndarray = np.fft.rfft2(full)
    return otf


def wiener_refocus(
    image: np.ndarray, dz_um: Sequence[float], metadata: ModelMetadata, snr: float = 100.0
) -> np.ndarray:
    """Classical refocus: Wiener-deconvolve with the in-focus OTF, re-blur with the Δz OTF.

    The frame's background (its 5th percentile) is removed first and restored afterwards;
    the thin-sample assumption makes this exact only for objects in the input's focal plane.
    """
    img = np.asarray(image, dtype=np.float64)
    bg = float(np.percentile(img, 5))
    spec = np.fft.rfft2(img - bg)
    otfs = _otf(metadata, [0.0, *dz_um], img.shape)  # type: ignore[arg-type]
    h0 = otfs[0]
    inv = np.conj(h0) / (np.abs(h0) ** 2 + 1.0 / snr)
    planes = np.fft.irfft2(spec[None] * inv[None] * otfs[1:], s=img.shape) + bg
    out: np.ndarray = planes.astype(np.float32)
    return out


def _plane_index(stack: Any, z: float) -> int:
    """Index of the stack plane at focal position z (must exist on the grid)."""
    i = int(np.argmin(np.abs(stack.z_um - z)))
    if abs(stack.z_um[i] - z) > 1e-6:
        raise ValueError(f"no plane at z = {z} µm in the evaluation stack")
    return i


def _image_metrics(
    model: DeepZ, meta: ModelMetadata, stacks: list[Any], s: EvalSettings
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Per (stack, input plane, Δz) metrics of Deep-Z, input and Wiener, plus example panels."""
    from tqdm import tqdm

    rows: list[dict[str, Any]] = []
    examples: list[dict[str, Any]] = []
    bar = tqdm(total=len(stacks) * len(s.input_z_um), desc="refocus", unit="frame")
    for stack in stacks:
        for z0 in s.input_z_um:
            bar.update(1)
            i = _plane_index(stack, z0)
            frame = stack.images[i]
            dz = [d for d in s.dz_um if np.any(np.abs(stack.z_um - (z0 + d)) < 1e-6)]
            dpms = np.broadcast_to(np.asarray(dz, np.float32)[:, None, None], (len(dz), *s.shape))
            deepz = refocus(model, meta, frame, dpms)
            wien = wiener_refocus(frame, dz, meta)
            for k, d in enumerate(dz):
                truth = stack.clean[_plane_index(stack, z0 + d)]
                row: dict[str, Any] = {"kind": stack.kind, "seed": stack.seed, "z_in": z0, "dz": d}
                for name, img in (("deepz", deepz[k]), ("input", frame), ("wiener", wien[k])):
                    row[f"psnr_{name}"] = psnr(img, truth)
                    row[f"ssim_{name}"] = ssim(img, truth)
                    row[f"pearson_{name}"] = pearson(img, truth)
                rows.append(row)
                if z0 == 0.0 and stack is stacks[0] and d in (-10.0, -4.0, 0.0, 6.0, 10.0):
                    examples.append(
                        {
                            "dz": d,
                            "input": frame,
                            "deepz": deepz[k],
                            "wiener": wien[k],
                            "truth": truth,
                        }
                    )
    bar.close()
    return rows, examples


_MIN_SPOT_SNR = 3.0
"""A refocused bead is resolved when its fitted amplitude is >= 3x the fit's residual noise."""


def _bead_fwhm(model: DeepZ, meta: ModelMetadata, stacks: list[Any]) -> dict[str, Any]:
    """Lateral FWHM of isolated beads refocused from the z = 0 frame vs the true plane."""
    half = 6
    ratios, ratios_in, per = [], [], []
    for stack in stacks:
        obj = stack.objects
        sel = np.flatnonzero(np.asarray(obj.kind) == "bead")
        px = stack.pixel_size_um
        i0 = _plane_index(stack, 0.0)
        frame = stack.images[i0]
        h, w = frame.shape
        cache: dict[float, np.ndarray] = {}
        xs, ys = np.asarray(obj.x_um)[sel], np.asarray(obj.y_um)[sel]
        for j, b in enumerate(sel):
            col, row = round(float(obj.x_um[b]) / px), round(float(obj.y_um[b]) / px)
            zb = float(obj.z_um[b])
            near = np.hypot(xs - xs[j], ys - ys[j])
            if np.sum(near < 3.0) > 1 or not (half <= row < h - half and half <= col < w - half):
                continue
            zt = float(stack.z_um[int(np.argmin(np.abs(stack.z_um - zb)))])
            if abs(zt) > meta.dz_range_um[1] or zt < meta.dz_range_um[0]:
                continue
            truth = stack.clean[_plane_index(stack, zt)]
            if zt not in cache:
                cache[zt] = refocus(model, meta, frame, np.full((1, h, w), zt, np.float32))[0]
            out = cache[zt]
            win = np.s_[row - half : row + half + 1, col - half : col + half + 1]
            f_true = gaussian_fwhm_2d(truth[win], px, centered=True)
            if not np.isfinite(f_true):
                continue
            f_dz = gaussian_fwhm_2d(out[win], px, centered=True, min_snr=_MIN_SPOT_SNR)
            f_in = gaussian_fwhm_2d(
                frame[win].astype(np.float64), px, centered=True, min_snr=_MIN_SPOT_SNR
            )
            # a bead with no spot left to fit counts as infinitely wide: a failure, not a skip
            ratios.append(f_dz / f_true if np.isfinite(f_dz) else np.inf)
            ratios_in.append(f_in / f_true if np.isfinite(f_in) else np.inf)
            per.append(
                {"z_um": zt, "fwhm_true_um": f_true, "fwhm_deepz_um": f_dz, "fwhm_input_um": f_in}
            )
    r, r_in = np.asarray(ratios), np.asarray(ratios_in)
    nan = float("nan")
    return {
        "n_beads": len(ratios),
        "median_ratio_deepz": float(np.median(r)) if r.size else nan,
        "median_abs_error_deepz": float(np.median(np.abs(r - 1))) if r.size else nan,
        "fraction_within_15pct": float(np.mean(np.abs(r - 1) <= 0.15)) if r.size else nan,
        "unresolved_deepz": int(np.sum(~np.isfinite(r))),
        "median_ratio_input": float(np.median(r_in)) if r_in.size else nan,
        "fraction_within_15pct_input": float(np.mean(np.abs(r_in - 1) <= 0.15))
        if r_in.size
        else nan,
        "unresolved_input": int(np.sum(~np.isfinite(r_in))),
        "min_spot_snr": _MIN_SPOT_SNR,
        "beads": per,
    }


def _peak_z(profile: np.ndarray, dz: np.ndarray) -> float:
    """Return the z of a profile's maximum, refined by a parabola through its neighbours."""
    k = int(np.argmax(profile))
    if 0 < k < profile.size - 1:
        a, b, c = profile[k - 1], profile[k], profile[k + 1]
        den = a - 2 * b + c
        if den < 0:
            return float(dz[k] + 0.5 * (a - c) / den * (dz[1] - dz[0]))
    return float(dz[k])


def _localisation(
    model: DeepZ, meta: ModelMetadata, stacks: list[Any], s: EvalSettings
) -> dict[str, Any]:
    """Neuron axial localisation from a virtual stack built from the z = 0 frame alone."""
    lo, hi = meta.dz_range_um
    dz = np.arange(lo, hi + 1e-6, s.localisation_step_um, dtype=np.float32)
    errors, errors_clean, per = [], [], []
    for stack in stacks:
        obj = stack.objects
        sel = np.flatnonzero(np.asarray(obj.kind) == "nucleus")
        if sel.size == 0:
            continue
        i0 = _plane_index(stack, 0.0)
        frame = stack.images[i0]
        h, w = frame.shape
        vol = refocus(model, meta, frame, np.broadcast_to(dz[:, None, None], (dz.size, h, w)))
        grid = np.arange(lo, hi + 1e-6, s.z_step_um)
        clean = stack.clean[[_plane_index(stack, float(z)) for z in grid]]
        for b in sel:
            col = round(float(obj.x_um[b]) / stack.pixel_size_um)
            row = round(float(obj.y_um[b]) / stack.pixel_size_um)
            zt = float(obj.z_um[b])
            if not (2 <= row < h - 2 and 2 <= col < w - 2) or not lo + 1 <= zt <= hi - 1:
                continue
            win = np.s_[:, row - 1 : row + 2, col - 1 : col + 2]
            z_dz = _peak_z(vol[win].mean(axis=(1, 2)), dz)
            z_cl = _peak_z(clean[win].mean(axis=(1, 2)), grid)
            errors.append(abs(z_dz - zt))
            errors_clean.append(abs(z_cl - zt))
            per.append({"z_true_um": zt, "z_deepz_um": z_dz, "z_clean_stack_um": z_cl})
    e, ec = np.asarray(errors), np.asarray(errors_clean)
    return {
        "n_neurons": int(e.size),
        "median_error_um": float(np.median(e)) if e.size else float("nan"),
        "p90_error_um": float(np.percentile(e, 90)) if e.size else float("nan"),
        "clean_stack_median_error_um": float(np.median(ec)) if ec.size else float("nan"),
        "clean_stack_p90_error_um": float(np.percentile(ec, 90)) if ec.size else float("nan"),
        "virtual_stack_step_um": s.localisation_step_um,
        "neurons": per,
    }


def _summarise(rows: list[dict[str, Any]], dz_max: float) -> dict[str, Any]:
    """Medians over |Δz| <= dz_max, and per-Δz medians, of every image metric."""
    keys = [k for k in rows[0] if k.split("_")[0] in ("psnr", "ssim", "pearson")]
    inside = [r for r in rows if abs(r["dz"]) <= dz_max]
    overall = {k: float(np.median([r[k] for r in inside])) for k in keys}
    per_dz: dict[str, dict[str, float]] = {}
    for d in sorted({r["dz"] for r in rows}):
        sub = [r for r in rows if r["dz"] == d]
        per_dz[f"{d:g}"] = {k: float(np.median([r[k] for r in sub])) for k in keys}
    return {"median": overall, "per_dz": per_dz, "n_pairs": len(inside)}


def _plots(
    out: Path, summary: dict[str, Any], examples: list[dict[str, Any]], loc: dict[str, Any]
) -> None:
    """Write metric_vs_dz.png, examples.png and axial_localisation.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dzs = [float(k) for k in summary["per_dz"]]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, metric in zip(axes, ("psnr", "ssim", "pearson"), strict=True):
        for name, label in (("deepz", "Deep-Z"), ("input", "input"), ("wiener", "Wiener")):
            ax.plot(
                dzs, [v[f"{metric}_{name}"] for v in summary["per_dz"].values()], "o-", label=label
            )
        ax.set_xlabel("Δz (µm)")
        ax.set_title(metric.upper() if metric != "pearson" else "Pearson r")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(out / "metric_vs_dz.png", dpi=90)
    plt.close(fig)
    if examples:
        cols = ("input", "deepz", "wiener", "truth")
        fig, axes = plt.subplots(len(examples), 4, figsize=(10, 2.6 * len(examples)), squeeze=False)
        for r, ex in enumerate(examples):
            lo, hi = np.percentile(ex["truth"], [0.5, 99.8])
            for c, key in enumerate(cols):
                axes[r, c].imshow(ex[key], cmap="gray", vmin=lo, vmax=hi)
                axes[r, c].set_xticks([])
                axes[r, c].set_yticks([])
                if r == 0:
                    axes[r, c].set_title({"deepz": "Deep-Z", "wiener": "Wiener"}.get(key, key))
            axes[r, 0].set_ylabel(f"Δz = {ex['dz']:+g} µm")
        fig.tight_layout()
        fig.savefig(out / "examples.png", dpi=80)
        plt.close(fig)
    if loc["neurons"]:
        fig, ax = plt.subplots(figsize=(4.2, 4))
        zt = [n["z_true_um"] for n in loc["neurons"]]
        ax.plot(zt, [n["z_deepz_um"] for n in loc["neurons"]], ".", label="Deep-Z virtual stack")
        ax.plot(zt, [n["z_clean_stack_um"] for n in loc["neurons"]], "x", ms=3, label="true stack")
        ax.plot([-10, 10], [-10, 10], "k--", lw=0.8)
        ax.set_xlabel("true neuron z (µm)")
        ax.set_ylabel("z of peak intensity (µm)")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "axial_localisation.png", dpi=90)
        plt.close(fig)


REPORT_FILES = (
    "metrics.json",
    "report.md",
    "metric_vs_dz.png",
    "examples.png",
    "axial_localisation.png",
)
"""What `evaluate` writes into its report folder."""


def evaluate(
    weights: str | Path = DEFAULT_WEIGHTS,
    out: str | Path | None = None,
    settings: EvalSettings | None = None,
) -> dict[str, Any]:
    """Run the whole evaluation; write the report into `out` (unless None); return metrics.

    Per-plane (DPM-input) models only; volume models and the object-level read-outs on the
    independent held-out set are in `engine.fidelity`.
    """
    t0 = time.monotonic()
    s = settings or EvalSettings()
    torch.set_num_threads(2)
    model, meta = load_model(weights)
    if meta.volume is not None:
        raise ModelMetadataError(
            f"{weights}: a volume model; evaluate it with python -m engine.fidelity"
        )
    stacks = []
    for kind, seeds in s.seeds.items():
        for seed in seeds:
            fs = simulate_eval_stack(kind, seed, s, meta)
            stacks.append(
                _EvalStack(kind, seed, fs.images, fs.clean, fs.z_um, fs.objects, fs.pixel_size_um)
            )
    rows, examples = _image_metrics(model, meta, stacks, s)
    summary = _summarise(rows, max(abs(meta.dz_range_um[0]), abs(meta.dz_range_um[1])))
    beads = _bead_fwhm(model, meta, [st for st in stacks if st.kind in ("beads", "mixed")])
    loc = _localisation(model, meta, [st for st in stacks if st.kind in ("worm", "mixed")], s)
    med = summary["median"]
    targets = {
        "median_ssim_ge_0.85": med["ssim_deepz"] >= 0.85,
        "median_psnr_gain_ge_6dB": med["psnr_deepz"] - med["psnr_input"] >= 6.0,
        "axial_median_error_le_1um": loc["median_error_um"] <= 1.0,
        "bead_fwhm_within_15pct": beads["median_abs_error_deepz"] <= 0.15,
    }
    result: dict[str, Any] = {
        "weights": _display_path(weights),
        "model": meta.name,
        "parameters": model.count_parameters(),
        "flops_per_pixel": model.flops_per_pixel(),
        "settings": {k: (dict(v) if isinstance(v, dict) else v) for k, v in vars(s).items()},
        "image_metrics": summary,
        "bead_fwhm": beads,
        "axial_localisation": loc,
        "targets_met": targets,
        "wall_time_s": round(time.monotonic() - t0, 1),
        "machine": f"{platform.machine()} {platform.system()}, torch CPU threads 2",
    }
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        _plots(out, summary, examples, loc)
        (out / "metrics.json").write_text(
            json.dumps(result, indent=2, default=_json_default) + "\n"
        )
        (out / "report.md").write_text(_report(result, meta))
    return result


def _display_path(path: str | Path) -> str:
    """Return `path` relative to the working directory when it lies below it."""
    p = Path(path).resolve()
    try:
        return str(p.relative_to(Path.cwd()))
    except ValueError:
        return str(p)


def _json_default(o: Any) -> Any:
    """JSON fallback for numpy scalars and tuples."""
    if isinstance(o, np.generic):
        return o.item()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def _report(r: dict[str, Any], meta: ModelMetadata) -> str:
    """Render the Markdown report."""
    med = r["image_metrics"]["median"]
    b, loc = r["bead_fwhm"], r["axial_localisation"]
    ok = {True: "met", False: "**not met**"}
    t = r["targets_met"]
    lines = [
        f"# Deep-Z evaluation: `{meta.name}`",
        "",
        f"Weights `{r['weights']}` ({r['parameters']:,} parameters, "
        f"{r['flops_per_pixel'] * 256 * 256 / 1e9:.2f} GFLOP per 256² plane), trained on: "
        f"{meta.trained_on}. Command: `{meta.training_command}`.",
        "",
        "Held-out simulated stacks (seeds never used in training): "
        + ", ".join(f"{k} {list(v)}" for k, v in r["settings"]["seeds"].items())
        + f"; {r['settings']['shape'][0]}² px, input planes z = "
        f"{list(r['settings']['input_z_um'])} µm,"
        f" Δz = {min(r['settings']['dz_um']):g} … {max(r['settings']['dz_um']):g} µm. "
        "The reference is the simulator's noise-free plane. Evaluated with "
        f"`python -m engine.evaluate` in {r['wall_time_s']} s ({r['machine']}).",
        "",
        "## Image metrics (median over all pairs, |Δz| ≤ 10 µm)",
        "",
        "| method | PSNR (dB) | SSIM | Pearson r |",
        "|---|---|---|---|",
    ]
    for name, label in (
        ("deepz", "Deep-Z"),
        ("input", "unrefocused input"),
        ("wiener", "Wiener refocus"),
    ):
        lines.append(
            f"| {label} | {med[f'psnr_{name}']:.2f} | {med[f'ssim_{name}']:.3f} | "
            f"{med[f'pearson_{name}']:.3f} |"
        )
    lines += [
        "",
        "The classical baseline is a Wiener refocus with the known PSF (the simulator's): the "
        "frame is deconvolved with the in-focus OTF and re-blurred with the OTF at Δz. With one "
        "intensity image and no phase, this is the best linear refocus available, but it is exact "
        "only for a thin sample in the input's focal plane; out-of-plane objects stay blurred.",
        "",
        "![metrics vs dz](metric_vs_dz.png)",
        "",
        "## Per Δz (medians)",
        "",
        "| Δz (µm) | PSNR Deep-Z | PSNR input | PSNR Wiener "
        "| SSIM Deep-Z | SSIM input | SSIM Wiener |",
        "|---|---|---|---|---|---|---|",
    ]
    for d, v in r["image_metrics"]["per_dz"].items():
        lines.append(
            f"| {d} | {v['psnr_deepz']:.2f} | {v['psnr_input']:.2f} | {v['psnr_wiener']:.2f} | "
            f"{v['ssim_deepz']:.3f} | {v['ssim_input']:.3f} | {v['ssim_wiener']:.3f} |"
        )
    lines += [
        "",
        "![examples](examples.png)",
        "",
        "## Beads: lateral FWHM",
        "",
        f"{b['n_beads']} isolated beads refocused from the z = 0 frame to their own plane; "
        "2-D Gaussian fits on 13×13 px windows centred on each bead's true position (the fit's "
        "centre may move 2 px). A bead whose fitted amplitude is below "
        f"{b['min_spot_snr']:g}× the fit's residual noise is *unresolved* and counts as "
        "infinitely wide (a failure).",
        "",
        "| | median FWHM / truth | median abs(ratio − 1) | within 15 % | unresolved |",
        "|---|---|---|---|---|",
        f"| Deep-Z | {b['median_ratio_deepz']:.3f} | {b['median_abs_error_deepz']:.3f} | "
        f"{b['fraction_within_15pct']:.0%} | {b['unresolved_deepz']} |",
        f"| unrefocused input | {b['median_ratio_input']:.3f} | – | "
        f"{b['fraction_within_15pct_input']:.0%} | {b['unresolved_input']} |",
        "",
        "## Neurons: axial localisation",
        "",
        f"Virtual stack from the z = 0 frame alone (Δz step {loc['virtual_stack_step_um']} µm); "
        "each neuron's z is the peak of the 3×3-px mean intensity through the stack. "
        f"{loc['n_neurons']} neurons: median error {loc['median_error_um']:.2f} µm, 90th "
        f"percentile {loc['p90_error_um']:.2f} µm. The same read-out on the true noise-free "
        f"stack (0.5 µm planes): median {loc['clean_stack_median_error_um']:.2f} µm, 90th "
        f"percentile {loc['clean_stack_p90_error_um']:.2f} µm (neighbouring neurons and the "
        "method's own limit).",
        "",
        "![axial](axial_localisation.png)",
        "",
        "## Targets",
        "",
        f"- median SSIM ≥ 0.85: {med['ssim_deepz']:.3f}, {ok[t['median_ssim_ge_0.85']]}",
        f"- median PSNR ≥ input + 6 dB: {med['psnr_deepz'] - med['psnr_input']:+.2f} dB, "
        f"{ok[t['median_psnr_gain_ge_6dB']]}",
        f"- axial localisation median error ≤ 1 µm: {loc['median_error_um']:.2f} µm, "
        f"{ok[t['axial_median_error_le_1um']]}",
        f"- bead FWHM within 15 %: median |ratio − 1| {b['median_abs_error_deepz']:.3f}, "
        f"{ok[t['bead_fwhm_within_15pct']]}",
        "",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point."""
    p = argparse.ArgumentParser(
        prog="python -m engine.evaluate", description=__doc__.split("\n")[0]
    )
    p.add_argument("--weights", type=Path, default=DEFAULT_WEIGHTS, help="state_dict .pt")
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="report folder (default: a new runs/evaluate-<time>; the shipped report is "
        "docs/evaluation, written only when named here)",
    )
    p.add_argument("--quick", action="store_true", help="one stack per kind, fewer Δz")
    args = p.parse_args(argv)
    args.out = args.out or Path("runs") / time.strftime("evaluate-%Y%m%d-%H%M%S")
    problem = out_dir_problem(args.out, REPORT_FILES)
    if problem is not None:  # before the work: the report was written only at its end
        print(f"error: --out: {problem}", file=sys.stderr)
        return 2
    try:
        r = evaluate(args.weights, args.out, EvalSettings.quick() if args.quick else None)
    except (FileNotFoundError, ModelMetadataError) as exc:  # the model given: one line
        print(f"error: {exc}", file=sys.stderr)
        return 2
    med = r["image_metrics"]["median"]
    loc, beads = r["axial_localisation"], r["bead_fwhm"]
    print(
        f"median SSIM {med['ssim_deepz']:.3f} (input {med['ssim_input']:.3f}, Wiener "
        f"{med['ssim_wiener']:.3f}); PSNR {med['psnr_deepz']:.2f} dB (input "
        f"{med['psnr_input']:.2f}, Wiener {med['psnr_wiener']:.2f}); axial median "
        f"{loc['median_error_um']:.2f} µm (p90 {loc['p90_error_um']:.2f}); bead FWHM ratio "
        f"{beads['median_ratio_deepz']:.3f}; {r['wall_time_s']} s -> {args.out}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
