"""Does a volume network see the worm's body apart from its nuclei? A glow head on its features.

    python -m engine.body_probe train [--weights engine/weights/deepz-volume.pt]
                                      [--config configs/train_volume_v31.toml] [--samples 160]
                                      [--minutes 30] [--steps N] [--threads 1]
                                      [--out runs/body-probe]
    python -m engine.body_probe glow [--head runs/body-probe/head.pt] [--psf vectorial|pupil]
                                     [--seeds 121 122 123 124] [--out runs/body-probe]

Session 27 (`engine.oracle_fit`) found that a fit told where each crowded nucleus lies places
64 % of them within 1 µm from one frame when it knows the body's glow at focus to 1 e⁻ per
pixel, and 49 % (the shipped model's level) when it knows it to 3 e⁻; the glow the shipped
model's faint density gives is 5-8 e⁻ off. Is that the read-out's fault or the network's? A
probe answers it the usual way: freeze the network, train only a small head on its
full-resolution features (and the frame) to give the body's glow at focus, and ask how well
the glow can be read from what the network already computes.

`train` draws samples as training does (`engine.train_volume.draw_imaging`: worm, mixed and
bead samples, the config's brightness, background, optics and focus ranges), images the body
alone beside each frame (`simulate_volume_pair(body_glow=True)`), and fits the head to it (mean
squared error in the frame's normalised units; the last eighth of the samples are held back
and scored in e⁻ per pixel). It stops after ``--minutes`` and resumes from its checkpoint.

`glow` measures the head on the hold-out's ganglion frames (`engine.heldout`: crowded nuclei in
a body made of overlapping spheres, through a vectorial or pupil PSF the network never saw), in
e⁻ per pixel against the true glow (`engine.oracle_fit.true_body_glow_e`): raw, and after the
best brightness and smooth quadratic surface, which a fit absorbs. The shipped model's own
faint-density glow (`oracle_fit.model_body_glow`) is scored beside it. It writes the glow images
for ``engine.oracle_fit --body model --body-glow``, a JSON and a picture. ``--head`` may also
name a body model's weights (`engine.train_volume` with ``body = true``: a network trained
with its own body head), scored the same way.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from engine import heldout as ho
from engine.files import atomic_write, out_dir_problem
from engine.metadata import ModelMetadataError, normalize_images, weights_that_fit
from engine.model import DeepZ, load_model, metadata_path, read_checkpoint

__all__ = ["BodyHead", "ProbeFrames", "glow_error", "main", "predict_glow", "probe_samples"]

HIDDEN = 32
"""Channels of the head's hidden layers."""
DILATIONS = (1, 2, 4, 8)
"""Dilations of the head's 3x3 layers: 31 px of its own context over the network's features."""
PROBE_SEED = 7_000_000
"""First seed of the probe's samples: far from those the network trained on."""
KIND_WEIGHTS = {"worm": 0.5, "mixed": 0.3, "beads": 0.2}
"""Sample kinds the head sees: mostly bodies, some frames with none (the glow is then zero)."""
PATCH = 128
BATCH = 8


class BodyHead(nn.Module):
    """(N, C + 1, H, W) features and frame -> (N, 1, H, W) body glow at focus (normalised units).

    Dilated 3x3 layers: the glow is smooth and wide, so the head looks further than a plain 3x3
    stack of the same cost would.
    """

    def __init__(self, features: int) -> None:
        super().__init__()
        self.features = int(features)
        layers: list[nn.Module] = []
        cin = features + 1
        for d in DILATIONS:
            layers += [nn.Conv2d(cin, HIDDEN, 3, padding=d, dilation=d), nn.ELU()]
            cin = HIDDEN
        layers.append(nn.Conv2d(HIDDEN, 1, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return the glow for the head's inputs (`_inputs`)."""
        out: torch.Tensor = self.net(x)
        return out


def _inputs(model: DeepZ, x: np.ndarray) -> torch.Tensor:
    """(N, H, W) normalised frames -> the head's float16 inputs (N, C + 1, H, W), frozen."""
    out = []
    with torch.no_grad():
        for i in range(0, len(x), 2):
            t = torch.from_numpy(x[i : i + 2, None])
            out.append(torch.cat([model._features(t), t], dim=1).half())
    return torch.cat(out)


class ProbeFrames(NamedTuple):
    """Simulated frames for the probe, F of them (`probe_samples`)."""

    inputs: np.ndarray
    """(F, H, W) float32 frames in their normalised units (what the network reads)."""
    glow: np.ndarray
    """(F, H, W) float32 the body's glow alone, in the same normalised units."""
    e_per_unit: np.ndarray
    """(F,) the e⁻ one normalised unit holds in each frame (its std over the camera gain)."""
    gain: np.ndarray
    """(F,) each frame's camera gain (counts per e⁻)."""
    frames: np.ndarray
    """(F, H, W) uint16 the camera frames themselves."""


def probe_samples(
    config: Path,
    count: int,
    first_seed: int = PROBE_SEED,
    kind_weights: dict[str, float] | None = None,
) -> ProbeFrames:
    """Simulate `count` training-like samples with their bodies imaged alone (`ProbeFrames`).

    `kind_weights` default: `KIND_WEIGHTS`.
    """
    from engine.optics import simulate_volume_pair
    from engine.train_volume import draw_imaging, load_config

    cfg = load_config(config)
    wanted = KIND_WEIGHTS if kind_weights is None else kind_weights
    weights = [wanted.get(k, 0.0) for k in cfg.data.kinds]
    frames, glows, e_per_unit, gains, raw = [], [], [], [], []
    for seed in tqdm(range(first_seed, first_seed + count), desc="simulating", unit="sample"):
        kind, optics, camera, focus = draw_imaging(cfg, seed, weights)
        pair = simulate_volume_pair(
            kind,
            shape=cfg.data.stack_shape,
            focus_um=focus,
            depth_um=np.zeros(1),
            optics=optics,
            camera=camera,
            seed=seed,
            worm=cfg.data.worm,
            body_glow=True,
        )
        assert pair.body_counts is not None
        x, _, std = normalize_images(pair.frames)
        frames.append(x)
        glows.append(pair.body_counts / std)
        e_per_unit.append(std.ravel() / camera.gain_counts_per_e)
        gains.append(np.full(len(x), camera.gain_counts_per_e))
        raw.append(pair.frames)
    return ProbeFrames(
        inputs=np.concatenate(frames).astype(np.float32),
        glow=np.concatenate(glows).astype(np.float32),
        e_per_unit=np.concatenate(e_per_unit).astype(np.float64),
        gain=np.concatenate(gains).astype(np.float64),
        frames=np.concatenate(raw),
    )


def train(
    weights: Path,
    config: Path,
    samples: int,
    minutes: float,
    out: Path,
    seed: int = 0,
    steps: int | None = None,
) -> Path:
    """Fit a `BodyHead` on `weights`' frozen features; resume from ``out/head.pt``; return it.

    Stops after `minutes` of training or at step `steps`, whichever comes first (a step count
    compares heads trained on a busy machine).
    """
    model, _ = load_model(weights)
    model.eval()
    ckpt_path = out / "head.pt"
    head = BodyHead(int(model.architecture["channels"][1]))
    opt = torch.optim.Adam(head.parameters(), lr=1e-3)
    state: dict[str, Any] = {"step": 0, "history": []}
    if ckpt_path.is_file():
        saved = _head_checkpoint(ckpt_path)
        with weights_that_fit(f"{ckpt_path}: does not fit {weights}'s features"):
            head.load_state_dict(saved["head"])
            opt.load_state_dict(saved["optimiser"])
        state = {"step": saved["step"], "history": saved["history"]}
        print(f"resuming {ckpt_path} at step {state['step']}")
    x, glow, e_unit, _, _ = probe_samples(config, samples)
    frames = len(x)
    # the last samples' frames: scored, never trained on (at least one frame left to train)
    held = min(max(2, frames // 8), frames - 1)
    print(f"features of {frames} frames ({held} held back) ...", flush=True)
    feats = _inputs(model, x)
    target = torch.from_numpy(glow[:, None])
    rng = np.random.default_rng(seed + state["step"])
    h, w = x.shape[-2:]
    deadline = time.monotonic() + 60 * minutes
    last_save = time.monotonic()
    bar = tqdm(desc="training the head", unit="step", initial=state["step"], mininterval=10)

    def running() -> bool:
        return time.monotonic() < deadline and (steps is None or state["step"] < steps)

    while running():
        idx = rng.integers(0, frames - held, BATCH)
        ys, xs = rng.integers(0, h - PATCH + 1, BATCH), rng.integers(0, w - PATCH + 1, BATCH)
        inp = torch.stack(
            [feats[i, :, a : a + PATCH, b : b + PATCH] for i, a, b in zip(idx, ys, xs, strict=True)]
        ).float()
        tgt = torch.stack(
            [
                target[i, :, a : a + PATCH, b : b + PATCH]
                for i, a, b in zip(idx, ys, xs, strict=True)
            ]
        )
        loss = nn.functional.mse_loss(head(inp), tgt)
        opt.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        opt.step()
        state["step"] += 1
        bar.update()
        if state["step"] % 200 == 0 or not running():
            with torch.no_grad():
                pred = torch.cat(
                    [head(feats[i : i + 2].float()) for i in range(frames - held, frames, 2)]
                )
            err = (pred[:, 0].numpy() - glow[frames - held :]) * e_unit[frames - held :, None, None]
            rms = float(np.sqrt(np.mean(err**2)))
            state["history"].append({"step": state["step"], "loss": loss.item(), "held_rms_e": rms})
            bar.set_postfix(loss=f"{loss.item():.4f}", held_rms_e=f"{rms:.2f}")
        if time.monotonic() - last_save > 120 or not running():
            _save(ckpt_path, head, opt, state, weights, config)
            last_save = time.monotonic()
    bar.close()
    _save(ckpt_path, head, opt, state, weights, config)
    return ckpt_path


def _save(
    path: Path,
    head: BodyHead,
    opt: torch.optim.Optimizer,
    state: dict[str, Any],
    weights: Path,
    config: Path,
) -> None:
    """Write the head's checkpoint atomically (a killed run leaves the last whole one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    checkpoint = {
        "head": head.state_dict(),
        "optimiser": opt.state_dict(),
        "weights": str(weights),
        "config": str(config),
        "features": head.features,
        **state,
    }
    atomic_write(path, lambda tmp: torch.save(checkpoint, tmp))


def predict_glow(model: DeepZ, head: BodyHead | None, frame: np.ndarray) -> np.ndarray:
    """Return the body glow at focus (H, W) in camera counts above offset for one frame.

    From the probe's `head` on the frozen `model`, or (`head` None) from a body model's own
    head (`DeepZ` with ``body``, trained with it: `engine.train_volume` ``body = true``).
    """
    x, _, std = normalize_images(frame[None].astype(np.float32))
    with torch.no_grad():
        if head is not None:
            pred = head(_inputs(model, x).float())[0, 0].numpy()
        else:
            _, _, body = model.outputs(torch.from_numpy(x[:, None]))
            if body is None:
                raise ValueError("the model has no body head and no probe head was given")
            pred = body[0, 0].numpy()
    out: np.ndarray = pred.astype(np.float64) * float(std.ravel()[0])
    return out


def glow_error(estimate_e: np.ndarray, truth_e: np.ndarray) -> dict[str, float]:
    """Score a glow estimate against the true glow, both (H, W) in e⁻ per pixel.

    RMS errors: raw, after the best brightness, and after the best brightness plus a quadratic
    surface (what `engine.oracle_fit`'s fit absorbs); the truth's mean and peak; correlation.
    """
    h, w = truth_e.shape
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    est, true = estimate_e.ravel(), truth_e.ravel()
    scale = float(est @ true / max(est @ est, 1e-12))
    surface = np.column_stack(
        [
            est,
            np.ones(h * w),
            xx.ravel(),
            yy.ravel(),
            xx.ravel() ** 2,
            (xx * yy).ravel(),
            yy.ravel() ** 2,
        ]
    )
    coef, *_ = np.linalg.lstsq(surface, true, rcond=None)
    return {
        "rms_e": float(np.sqrt(np.mean((est - true) ** 2))),
        "scaled_rms_e": float(np.sqrt(np.mean((scale * est - true) ** 2))),
        "scale": scale,
        "surface_rms_e": float(np.sqrt(np.mean((surface @ coef - true) ** 2))),
        "truth_mean_e": float(true.mean()),
        "truth_max_e": float(true.max()),
        "correlation": float(np.corrcoef(est, true)[0, 1]) if est.std() > 0 else 0.0,
    }


def measure_simulator(
    head_path: Path, config: Path, count: int, density_model: Path
) -> dict[str, dict[str, float]]:
    """Return the median glow errors of the head and of the model's faint density on worms.

    `count` fresh worm samples of `config` (neither trained on nor held back in training): the
    same scores on the training simulator's own bodies, beside the hold-out's.
    """
    from engine.runtime import load_backend

    model, head, _ = _load_head(head_path)
    return _score_simulator(model, head, load_backend(density_model), config, count)


def _score_simulator(
    model: DeepZ, head: BodyHead | None, backend: Any, config: Path, count: int
) -> dict[str, dict[str, float]]:
    """`measure_simulator` with the network, head and density model already loaded."""
    from engine.oracle_fit import model_body_glow

    sim = probe_samples(config, count, PROBE_SEED + 100_000, {"worm": 1.0})
    rows: dict[str, list[dict[str, float]]] = {"head": [], "model_density": []}
    for f, raw in enumerate(sim.frames):
        truth = sim.glow[f].astype(np.float64) * sim.e_per_unit[f]
        mine = predict_glow(model, head, raw)
        rows["head"].append(glow_error(mine / sim.gain[f], truth))
        rows["model_density"].append(glow_error(model_body_glow(backend, raw) / sim.gain[f], truth))
    return {
        who: {k: float(np.median([r[k] for r in rs])) for k in rs[0]} for who, rs in rows.items()
    }


def _load_head(path: Path) -> tuple[DeepZ, BodyHead | None, dict[str, Any]]:
    """Return the network, the probe's head (None for a body model's own) and a record.

    `path` is a probe checkpoint (``train``'s head.pt) or a body model's weights (a volume
    .pt with its JSON, trained with ``body = true``); both come back in eval mode.
    """
    if metadata_path(path).is_file():
        model, meta = load_model(path)
        if not meta.architecture.get("body"):
            raise ModelMetadataError(f"{path}: a volume model without a body head (body = true)")
        config = meta.extra.get("train_config", {}).get("name", "")
        return (
            model.eval(),
            None,
            {"weights": str(path), "step": meta.extra.get("steps"), "config_name": config},
        )
    saved = _head_checkpoint(path)
    model, _ = load_model(saved["weights"])
    head = BodyHead(int(saved["features"]))
    with weights_that_fit(f"{path}: its head does not load", (RuntimeError,)):
        head.load_state_dict(saved["head"])
    return model.eval(), head.eval(), saved


HEAD_KEYS = ("head", "optimiser", "weights", "features", "step", "history")
"""What a probe head's checkpoint holds (`_save` writes them all)."""


def _head_checkpoint(path: Path) -> dict[str, Any]:
    """Read a probe head's checkpoint (`train`'s head.pt); refuse any other file, naming it."""
    saved = read_checkpoint(path)
    missing = [k for k in HEAD_KEYS if not isinstance(saved, dict) or k not in saved]
    if missing:
        raise ModelMetadataError(f"{path}: not a probe head's checkpoint (no {', '.join(missing)})")
    return dict(saved)


def measure(
    head_path: Path,
    psf: Literal["vectorial", "pupil"],
    seeds: Sequence[int],
    out: Path,
    density_model: Path,
    simulator_samples: int = 0,
) -> dict[str, Any]:
    """Score the head (and the model's faint density) on ganglion frames; write npz, JSON, png.

    With `simulator_samples` > 0, also on that many fresh samples of the head's own training
    config (`measure_simulator`).
    """
    from engine.oracle_fit import model_body_glow, true_body_glow_e
    from engine.runtime import load_backend

    model, head, saved = _load_head(head_path)
    backend = load_backend(density_model)
    config = Path(saved.get("config", "configs/train_volume_v31.toml"))
    if simulator_samples > 0:  # read at the end, after the frames: checked now
        from engine.train_volume import load_config

        load_config(config)
    optics = ho.IndependentOptics(psf_model=psf)
    cam = ho.HeldoutCamera()
    glows: dict[str, np.ndarray] = {}
    rows: list[dict[str, Any]] = []
    shown: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    for seed in tqdm(seeds, desc=f"ganglion frames ({psf})", unit="frame"):
        sample = ho.independent_sample("ganglion", seed, optics=optics)
        truth = true_body_glow_e(sample, optics, cam)
        mine = predict_glow(model, head, sample.frame)
        theirs = model_body_glow(backend, sample.frame)
        glows[f"seed_{seed}"] = mine.astype(np.float32)
        row = {
            "seed": seed,
            "head": glow_error(mine / cam.gain_counts_per_e, truth),
            "model_density": glow_error(theirs / cam.gain_counts_per_e, truth),
        }
        rows.append(row)
        shown.append((truth, mine / cam.gain_counts_per_e, theirs / cam.gain_counts_per_e))
        mh, md = row["head"], row["model_density"]
        tqdm.write(
            f"seed {seed}: glow mean {mh['truth_mean_e']:.1f} e⁻/px; head RMS {mh['rms_e']:.2f} "
            f"(scaled {mh['scaled_rms_e']:.2f}, with a surface {mh['surface_rms_e']:.2f}); "
            f"model density {md['rms_e']:.2f} ({md['scaled_rms_e']:.2f}, "
            f"{md['surface_rms_e']:.2f})"
        )
    out.mkdir(parents=True, exist_ok=True)
    stem = f"body_glow_{psf}"
    np.savez_compressed(out / f"{stem}.npz", **glows)  # type: ignore[arg-type]
    record = {
        "head": str(head_path),
        "weights": saved["weights"],
        "head_steps": saved["step"],
        "psf_model": psf,
        "frames": rows,
        "median": {
            who: {k: float(np.median([r[who][k] for r in rows])) for k in rows[0][who]}
            for who in ("head", "model_density")
        },
    }
    if simulator_samples > 0:
        record["simulator"] = {
            "config": str(config),
            "samples": simulator_samples,
            **_score_simulator(model, head, backend, config, simulator_samples),
        }
    (out / f"{stem}.json").write_text(json.dumps(record, indent=2) + "\n")
    _plot(shown, [r["seed"] for r in rows], out / f"{stem}.png")
    return record


def _plot(
    shown: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]], seeds: Sequence[int], path: Path
) -> None:
    """One row per frame: the true glow, the head's, the model density's, and both errors."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(shown), 5, figsize=(15, 3 * len(shown)), squeeze=False)
    titles = (
        "true glow (e⁻/px)",
        "head",
        "model's faint density",
        "head − truth",
        "density − truth",
    )
    for row, (seed, (truth, mine, theirs)) in enumerate(zip(seeds, shown, strict=True)):
        top = float(truth.max()) or 1.0
        err = max(float(np.abs(mine - truth).max()), float(np.abs(theirs - truth).max()), 1.0)
        for col, (img, cmap, lim) in enumerate(
            (
                (truth, "magma", (0, top)),
                (mine, "magma", (0, top)),
                (theirs, "magma", (0, top)),
                (mine - truth, "RdBu_r", (-err, err)),
                (theirs - truth, "RdBu_r", (-err, err)),
            )
        ):
            ax = axes[row, col]
            im = ax.imshow(img, cmap=cmap, vmin=lim[0], vmax=lim[1])
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"seed {seed}: {titles[col]}" if col == 0 else titles[col], fontsize=9)
            fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    """Train the glow head, or measure it on the ganglion frames."""
    parser = argparse.ArgumentParser(prog="python -m engine.body_probe", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="fit the head on the frozen network's features")
    t.add_argument("--weights", type=Path, default=Path("engine/weights/deepz-volume.pt"))
    t.add_argument("--config", type=Path, default=Path("configs/train_volume_v31.toml"))
    t.add_argument("--samples", type=int, default=160)
    t.add_argument("--minutes", type=float, default=30.0)
    t.add_argument("--steps", type=int, help="stop at this step (default: only --minutes)")
    t.add_argument("--threads", type=int, default=1)
    t.add_argument("--out", type=Path, default=Path("runs/body-probe"))
    g = sub.add_parser("glow", help="score the head on the ganglion frames; write their glows")
    g.add_argument(
        "--head",
        type=Path,
        default=Path("runs/body-probe/head.pt"),
        help="a probe head (`train`'s head.pt) or a body model's weights (a volume .pt trained "
        "with body = true: its own head)",
    )
    g.add_argument("--psf", choices=("vectorial", "pupil"), default="vectorial")
    g.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=[121, 122, 123, 124],
        help="ganglion seeds (the fidelity --large report's vectorial set; its pupil set "
        "draws seeds + 1000 since session 48)",
    )
    g.add_argument("--density-model", type=Path, default=Path("engine/weights/deepz-volume.onnx"))
    g.add_argument("--out", type=Path, default=Path("runs/body-probe"))
    g.add_argument(
        "--simulator-samples",
        type=int,
        default=4,
        help="also score this many fresh worm samples of the head's training config (0: none)",
    )
    args = parser.parse_args(argv)
    from engine.runtime import BackendError
    from engine.train import TrainConfigError

    if args.command == "train":
        if args.samples < 2 or args.minutes <= 0 or args.threads < 1 or (args.steps or 1) < 1:
            parser.error("--samples must be >= 2, --minutes > 0, --steps and --threads >= 1")
        if not args.weights.is_file() or not args.config.is_file():
            parser.error(f"{args.weights} or {args.config}: not found")
        problem = out_dir_problem(args.out, ["head.pt"])
        if problem is not None:
            parser.error(f"--out: {problem}")
        torch.set_num_threads(args.threads)
        try:
            path = train(
                args.weights, args.config, args.samples, args.minutes, args.out, steps=args.steps
            )
        except (ModelMetadataError, TrainConfigError, OSError) as exc:  # a file given
            print(f"error: {exc}", file=sys.stderr)
            return 2
        print(f"wrote {path}")
        return 0
    if not args.head.is_file():
        parser.error(f"--head {args.head}: not found (run `python -m engine.body_probe train`)")
    stem = f"body_glow_{args.psf}"
    problem = out_dir_problem(args.out, [f"{stem}.npz", f"{stem}.json", f"{stem}.png"])
    if problem is not None:
        parser.error(f"--out: {problem}")
    try:
        record = measure(
            args.head, args.psf, args.seeds, args.out, args.density_model, args.simulator_samples
        )
    except (ModelMetadataError, TrainConfigError, BackendError, OSError) as exc:  # a file given
        print(f"error: {exc}", file=sys.stderr)
        return 2
    med = record["median"]
    print(
        f"{args.psf} ganglion frames, median over {len(args.seeds)}: head RMS "
        f"{med['head']['rms_e']:.2f} e⁻/px (after brightness and surface "
        f"{med['head']['surface_rms_e']:.2f}); the model's faint density "
        f"{med['model_density']['rms_e']:.2f} ({med['model_density']['surface_rms_e']:.2f}); "
        f"the true glow's mean {med['head']['truth_mean_e']:.1f} e⁻/px"
    )
    if "simulator" in record:
        sim = record["simulator"]
        print(
            f"the training simulator's worms ({sim['samples']} samples of {sim['config']}): head "
            f"RMS {sim['head']['rms_e']:.2f} e⁻/px ({sim['head']['surface_rms_e']:.2f}); the "
            f"model's faint density {sim['model_density']['rms_e']:.2f} "
            f"({sim['model_density']['surface_rms_e']:.2f}); the true glow's mean "
            f"{sim['head']['truth_mean_e']:.1f} e⁻/px"
        )
    print(f"wrote {args.out}/body_glow_{args.psf}.{{npz,json,png}}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
