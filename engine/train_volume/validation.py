"""Validation during training: bead depth and width read from the density."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from engine.model import DeepZ
from engine.optics import WormConfig
from engine.train_volume.config import VALIDATION_SEED_OFFSET, VolumeTrainConfig
from engine.train_volume.data import Sample

VALIDATION_PIXEL_UM = 0.3
"""Pixel size of the validation frames (µm): the simulator's default, as the configs train."""


def _scored_beads(
    shape: tuple[int, ...], depth_um: np.ndarray, objects: Any, focus_um: float, margin_px: int
) -> list[tuple[float, int, int]]:
    """(depth from focus in µm, row, col) of the beads validation scores.

    Beads at least `margin_px` inside the frame and within the depth grid (less half a step).
    """
    h, w = shape[-2:]
    px = VALIDATION_PIXEL_UM
    out = []
    for i in np.flatnonzero(objects.kind == "bead"):
        z = float(objects.z_um[i]) - focus_um
        y, x = round(objects.y_um[i] / px), round(objects.x_um[i] / px)
        if margin_px <= y < h - margin_px and margin_px <= x < w - margin_px:
            if abs(z) <= depth_um[-1] - 0.5:
                out.append((z, int(y), int(x)))
    return out


def _column_peak(density: np.ndarray, y: int, x: int) -> tuple[np.ndarray, int | None]:
    """Return the 3x3 density column at (y, x) summed per depth, and its peak (None: empty)."""
    profile = density[:, y - 1 : y + 2, x - 1 : x + 2].sum(axis=(1, 2))
    k = int(np.argmax(profile))
    return profile, (k if profile[k] > 0 else None)


def bead_depth_errors(
    density: np.ndarray, depth_um: np.ndarray, objects: Any, focus_um: float, margin_px: int = 8
) -> tuple[np.ndarray, np.ndarray]:
    """Per-bead depth errors (µm) from a predicted (D, H, W) density, and the beads' depths.

    Returns the errors (NaN: nothing there) and each scored bead's true depth from focus (µm).
    The depth of a bead is where the density in a 3x3 window at its true xy peaks along the
    grid, refined by a parabola through the peak and its neighbours.
    """
    d = density.shape[0]
    errs, depths = [], []
    for z, y, x in _scored_beads(density.shape, depth_um, objects, focus_um, margin_px):
        depths.append(z)
        profile, k = _column_peak(density, y, x)
        if k is None:
            errs.append(np.nan)
            continue
        frac = 0.0
        if 0 < k < d - 1:
            a, b, c = profile[k - 1], profile[k], profile[k + 1]
            den = a - 2 * b + c
            frac = float(np.clip(0.5 * (a - c) / den, -0.5, 0.5)) if den < 0 else 0.0
        est = depth_um[0] + (k + frac) * (depth_um[1] - depth_um[0])
        errs.append(abs(est - z))
    return np.asarray(errs, dtype=np.float64), np.asarray(depths, dtype=np.float64)


def bead_density_fwhm(
    density: np.ndarray, depth_um: np.ndarray, objects: Any, focus_um: float, margin_px: int = 8
) -> np.ndarray:
    """Lateral FWHM (µm) of the density of each found bead, at its peak depth (NaN: not found).

    The beads of `bead_depth_errors`; an isotropic Gaussian fitted in a 13x13 window at the
    bead's true xy (`engine.metrics.gaussian_fwhm_2d`), on the depth where its 3x3 column
    peaks. Rendered beads are as wide as this width and the PSF's together, so this says,
    during training, whether the density is as sharp as the truth's (tri-linear points:
    about 0.2 µm; `engine.probes`).
    """
    from engine.metrics import gaussian_fwhm_2d

    out = []
    for _, y, x in _scored_beads(density.shape, depth_um, objects, focus_um, margin_px):
        _, k = _column_peak(density, y, x)
        if k is None:
            out.append(np.nan)
            continue
        window = density[k, y - 6 : y + 7, x - 6 : x + 7]
        out.append(gaussian_fwhm_2d(window, VALIDATION_PIXEL_UM, centered=True))
    return np.asarray(out, dtype=np.float64)


class Validation:
    """Fixed full frames (never trained on): losses and the bead depth error of the model."""

    def __init__(self, cfg: VolumeTrainConfig) -> None:
        # the original worm and the three original kinds whatever the recipe's (`data.worm`,
        # `data.kinds`): every recipe validates on the same samples, so its figures compare
        # across recipes; they are imaged with the recipe's own settings (camera ranges, PSF
        # models, `frame_points`), so a recipe that images frames otherwise reads them so
        even = [1.0, 1.0, 1.0]
        data = cfg.data.model_copy(
            update={
                "worm": WormConfig(),
                "kinds": ["beads", "worm", "mixed"],
                "kind_weights": even,
                "start_kind_weights": even,
            }
        )
        cfg = cfg.model_copy(update={"data": data})
        self.samples = [
            Sample(cfg, VALIDATION_SEED_OFFSET + i, w)
            for i, w in enumerate([[1, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]])
        ]
        # the same read-out on the truth's own density (frame 0 of each pair): the goal
        widths = [
            bead_density_fwhm(s.targets[0], cfg.depth_um, s.objects, s.focus_um[0])
            for s in self.samples
            if s.kind != "worm"
        ]
        truth = np.concatenate(widths) if widths else np.zeros(0)
        self.truth_fwhm_um = float(np.nanmedian(truth)) if np.isfinite(truth).any() else np.nan

    def run(
        self, cfg: VolumeTrainConfig, model: DeepZ, bf16: bool, device: torch.device
    ) -> dict[str, float]:
        """Score `model` on the validation frames: bead depth, recall and width, and more.

        Also the depth channels it uses and, for a body model, its glow's error.
        """
        errs: list[np.ndarray] = []
        depths: list[np.ndarray] = []
        widths: list[np.ndarray] = []
        mass = np.zeros(cfg.depth_um.size)
        body_err, body_power = 0.0, 0.0
        for s in self.samples:
            x = torch.from_numpy(s.inputs[:1, None]).to(device)
            with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                out, _, body = model.outputs(x)
                pred = out.float()[0].cpu().numpy()
            mass += pred.sum(axis=(1, 2))
            if body is not None and s.body is not None and s.kind != "beads":
                glow = body.float()[0, 0].cpu().numpy()
                body_err += float(((glow - s.body[0]) ** 2).sum())
                body_power += float((s.body[0] ** 2).sum())
            if s.kind != "worm":
                e, z = bead_depth_errors(pred, cfg.depth_um, s.objects, s.focus_um[0])
                errs.append(e)
                depths.append(z)
                widths.append(bead_density_fwhm(pred, cfg.depth_um, s.objects, s.focus_um[0]))
        e = np.concatenate(errs) if errs else np.zeros(0)
        far = np.abs(np.concatenate(depths)) > 6.0 if depths else np.zeros(0, dtype=bool)
        hits = np.nan_to_num(e, nan=np.inf) <= 1.0
        found = e[np.isfinite(e)]
        share = mass / max(float(mass.sum()), 1e-30)
        fwhm = np.concatenate(widths) if widths else np.zeros(0)
        fwhm = fwhm[np.isfinite(fwhm)]
        # a body model's glow on the worm frames, RMS error over the glow's RMS
        body_row = {"val_body_relative_rms": (body_err / body_power) ** 0.5} if body_power else {}
        return body_row | {
            # depth channels holding at least a fifth of an even share of the density: a model
            # that gathers mass on a comb of preferred depths uses few (depth is quantised)
            "val_depth_channels_used": float(np.mean(share >= 0.2 / share.size)),
            # over all beads, a bead with no density in its column counting as a miss
            "val_bead_found": float(found.size / e.size) if e.size else 0.0,
            "val_bead_recall_1um": float(np.mean(hits)) if e.size else 0.0,
            # the same for beads more than 6 µm from focus (faint rings: where models fail)
            "val_far_recall_1um": float(np.mean(hits[far])) if far.any() else 0.0,
            "val_bead_depth_median_um": float(np.median(found)) if found.size else float("nan"),
            "val_bead_depth_p90_um": (
                float(np.percentile(found, 90)) if found.size else float("nan")
            ),
            "val_bead_within_1um": float(np.mean(found <= 1.0)) if found.size else 0.0,
            "val_beads": float(e.size),
            # found beads' density width at their peak depth, against the truth's (the
            # rendered bead FWHM follows it: sessions 10-11)
            "val_density_fwhm_um": float(np.median(fwhm)) if fwhm.size else float("nan"),
            "val_truth_density_fwhm_um": self.truth_fwhm_um,
        }
