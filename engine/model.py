"""The Deep-Z generator (a residual U-Net) and its discriminator, as plain torch modules.

The generator takes two channels, the normalised image and the normalised DPM (see
`engine.metadata`), and returns one linear channel: the refocused image in the input image's
normalised scale. Only Conv, ConvTranspose, MaxPool, Relu, Concat, Add and Pad are used (and,
with a matched-filter primer, AveragePool and a nearest Resize), so the network exports to ONNX
(opset 17+) and TensorRT. No training logic lives here.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from engine.detection import DETECTION_CHANNELS, DETECTION_HIDDEN, P_BIAS, Detections, decode, splat
from engine.files import atomic_write, atomic_write_text
from engine.metadata import (
    ModelMetadata,
    ModelMetadataError,
    architecture_size_multiple,
    file_sha256,
    nonfinite_weights,
)

__all__ = [
    "PRESETS",
    "WEIGHTS_SHA256",
    "DeepZ",
    "Discriminator",
    "MatchedFilterPrimer",
    "build_model",
    "load_model",
    "metadata_path",
    "read_checkpoint",
    "save_model",
    "write_checkpoint",
]

BODY_HIDDEN = 32
"""Channels of the body head's hidden layers (`DeepZ` with ``body``)."""

PRESETS: dict[str, dict[str, Any]] = {
    # The authors' released layout: a 2->25 stem, 6 levels (48 ... 1536) and 5 max-pools.
    "paper": {"channels": (25, 48, 96, 192, 384, 768, 1536), "global_skip": False},
    # Real-time default: an 8-channel stem, 6 levels (8 ... 256), 5 pools, about 2.2 M params.
    "slim": {"channels": (8, 8, 16, 32, 64, 128, 256), "global_skip": True},
    # Volume Deep-Z: one frame in, the non-negative object density on 41 depths (-10 ... +10 µm,
    # 0.5 µm) out, in one pass; planes and surfaces are rendered from it (`engine.volume`).
    "volume": {
        "in_channels": 1,
        "channels": (24, 24, 32, 64, 96, 128, 192),
        "out_channels": 41,
        "global_skip": False,
        "nonnegative": True,
    },
}
"""Named architectures: keyword arguments of `DeepZ` (``in_channels`` defaults to 2)."""


def _conv3(cin: int, cout: int) -> nn.Conv2d:
    """Return a 3x3 'same' convolution with bias."""
    return nn.Conv2d(cin, cout, kernel_size=3, padding=1)


def _pad_channels(x: torch.Tensor, extra: int) -> torch.Tensor:
    """Append `extra` zero channels to an (N, C, H, W) tensor (a static ONNX Pad)."""
    if extra == 0:
        return x
    return F.pad(x, (0, 0, 0, 0, 0, extra))


class MatchedFilterPrimer(nn.Module):
    """Physics-primed input channels: the frame correlated with the PSF at chosen defoci.

    A bead far from focus is a faint ring in the frame; correlating the frame with the
    (zero-mean, unit-norm) PSF at that defocus is the classical detector of it, and the one that
    places beads 6-10 µm from focus where the volume network leaves them out (issue 9). The
    correlation runs on the frame binned ``bin`` x ``bin`` (far rings are smooth, so this costs
    about 300 FLOP per pixel for 16 defoci, against about 10^5 for the network) and is brought
    back to full size by nearest upsampling. The kernels are a buffer, so they travel in the
    weights file and need no optics at load time; they are made by the training code from the
    model's optics. The response is scaled by ``bin``: unit-variance white noise then gives a
    unit-variance response, so a channel reads as a matched-filter SNR in the normalised frame.
    """

    kernels: torch.Tensor  # (D, 1, kernel, kernel), a buffer

    def __init__(self, depths_um: Sequence[float], bin: int, kernel: int) -> None:
        super().__init__()
        if not depths_um or bin < 1 or kernel < 1 or kernel % 2 == 0:
            raise ValueError(
                f"primer needs >= 1 depth, bin >= 1 and an odd kernel; got {list(depths_um)}, "
                f"bin {bin}, kernel {kernel}"
            )
        self.depths_um = [float(d) for d in depths_um]
        self.bin = int(bin)
        self.register_buffer("kernels", torch.zeros(len(self.depths_um), 1, kernel, kernel))

    @property
    def channels(self) -> int:
        """Number of channels the primer adds."""
        return len(self.depths_um)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """(N, 1, H, W) normalised frames -> (N, D, H, W) matched-filter responses."""
        kernels = self.kernels
        small = F.avg_pool2d(image, self.bin) if self.bin > 1 else image
        r = F.conv2d(small, kernels.to(small.dtype), padding=kernels.shape[-1] // 2)
        if self.bin > 1:
            r = F.interpolate(r, scale_factor=float(self.bin), mode="nearest")
        return r * float(self.bin)


class _DownBlock(nn.Module):
    """Two 3x3 conv + ReLU; the input, zero-padded to the output channels, is added back."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        if cout < cin:
            raise ValueError(f"down block needs cout >= cin for the residual, got {cin}->{cout}")
        self.extra = cout - cin
        self.conv1 = _conv3(cin, cout)
        self.conv2 = _conv3(cout, cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the block to (N, cin, H, W), returning (N, cout, H, W)."""
        y = F.relu(self.conv2(F.relu(self.conv1(x))))
        return y + _pad_channels(x, self.extra)


class _UpBlock(nn.Module):
    """Stride-2 transposed conv, concat with the skip, two 3x3 conv + ReLU, plus a residual."""

    def __init__(self, cin: int, cskip: int, cout: int) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(cin, cout, 3, stride=2, padding=1, output_padding=1)
        self.conv1 = _conv3(cout + cskip, cout)
        self.conv2 = _conv3(cout, cout)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        """Upsample (N, cin, h, w) to (N, cout, 2h, 2w) and merge the skip features."""
        u = F.relu(self.up(x))
        y = F.relu(self.conv2(F.relu(self.conv1(torch.cat([u, skip], dim=1)))))
        return y + u


class DeepZ(nn.Module):
    """Deep-Z generator: (N, 2, H, W) image + DPM -> (N, 1, H, W) refocused image.

    Parameters
    ----------
    in_channels
        Input channels: 2 (normalised image, normalised DPM).
    channels
        Stem width followed by the width of each U-Net level, e.g. the paper's
        ``(25, 48, 96, 192, 384, 768, 1536)``; the number of max-pools is ``len(channels) - 2``
        and frame sides must be multiples of ``2 ** pools`` (`size_multiple`).
    out_channels
        Output channels (1: the refocused plane).
    global_skip
        Add the input image channel to the output, so the network predicts a correction; this
        makes the identity (Δz = 0) free and training much faster.
    nonnegative
        End with a ReLU: the output is a density (the volume model's object planes). With
        ``train_leak`` > 0 the ReLU leaks while training (inference: plain ReLU), so an output
        channel whose values all went negative still gets a gradient and comes back: with a
        plain ReLU such depth channels die for good and the density gathers on a comb of
        preferred depths. Off by default (the shipped model trained without it).
    primer
        Optional ``{"depths_um": [...], "bin": 4, "kernel": 17}``: `MatchedFilterPrimer`
        channels computed from the image inside the network and fed to the stem beside it.
        The model's inputs do not change (``in_channels`` counts only what the caller feeds).
    detection
        Optional ``{"z_first_um": -10, "z_step_um": 0.5, "brightness_scale": 100}`` (volume
        models only): a second head gives DECODE-style point-source detections
        (`engine.detection`), which `forward` splats onto the depth grid and adds to the
        density, so the output is one density volume either way; `detect` returns both.
        An optional ``"serve_min_p"`` splats, when served (eval mode), only the detections
        whose 3 x 3 neighbourhood holds that much p (`engine.detection.splat`).
    body
        Volume models only: a second head gives the worm body's diffuse glow at focus, (N, 1,
        H, W) in the frame's normalised units (`outputs`), trained against the simulator's
        body imaged alone, so the network must tell the body's light from the nuclei's
        (session 28). The served output (`forward`, the ONNX graph) stays the density.
    """

    def __init__(
        self,
        *,
        in_channels: int = 2,
        channels: Sequence[int],
        out_channels: int = 1,
        global_skip: bool = True,
        nonnegative: bool = False,
        primer: dict[str, Any] | None = None,
        detection: dict[str, float] | None = None,
        body: bool = False,
    ) -> None:
        super().__init__()
        chans = [int(c) for c in channels]
        if len(chans) < 2 or any(c < 1 for c in chans):
            raise ValueError(
                f"channels must be a stem width plus >= 1 level width, all >= 1; got {chans}"
            )
        if any(b < a for a, b in itertools.pairwise(chans[1:])):
            raise ValueError(f"level widths must not decrease, got {chans[1:]}")
        if in_channels < 1 or out_channels < 1:
            raise ValueError(
                f"in_channels and out_channels must be >= 1, got {in_channels}, {out_channels}"
            )
        self.architecture: dict[str, Any] = {
            "in_channels": int(in_channels),
            "channels": chans,
            "out_channels": int(out_channels),
            "global_skip": bool(global_skip),
        }
        if nonnegative:  # only when set, so older models' metadata rebuilds unchanged
            self.architecture["nonnegative"] = True
        self.primer: MatchedFilterPrimer | None = None
        if primer is not None:  # likewise: only models with a primer record one
            try:
                self.primer = MatchedFilterPrimer(**primer)
            except TypeError as exc:
                raise ValueError(f"primer {primer}: {exc}") from exc
            self.architecture["primer"] = {
                "depths_um": self.primer.depths_um,
                "bin": self.primer.bin,
                "kernel": int(self.primer.kernels.shape[-1]),
            }
        self.detection: dict[str, float] | None = None
        if detection is not None:  # likewise: only detection models record it
            needed = {"z_first_um", "z_step_um", "brightness_scale"}
            if not nonnegative or not needed <= set(detection) <= needed | {"serve_min_p"}:
                raise ValueError(
                    "detection needs a non-negative (volume) model, z_first_um, z_step_um and "
                    f"brightness_scale, and optionally serve_min_p; got {detection}"
                )
            self.detection = {k: float(v) for k, v in detection.items()}
            self.architecture["detection"] = dict(self.detection)
        if body:  # likewise: only body models record it
            if not nonnegative:
                raise ValueError("a body head needs a non-negative (volume) model")
            self.architecture["body"] = True
        self.global_skip = bool(global_skip)
        self.nonnegative = bool(nonnegative)
        self.train_leak = 0.0
        self.pools = len(chans) - 2
        # the primer bins the frame, so sides must also be multiples of its bin
        multiple = architecture_size_multiple(self.architecture)
        assert multiple is not None  # channels are recorded above
        self.size_multiple = multiple
        levels = chans[1:]
        primed = self.primer.channels if self.primer is not None else 0
        self.stem = _conv3(in_channels + primed, chans[0])
        self.down = nn.ModuleList(
            [_DownBlock(a, b) for a, b in zip([chans[0], *levels[:-1]], levels, strict=True)]
        )
        self.ups = nn.ModuleList(
            [_UpBlock(levels[i + 1], levels[i], levels[i]) for i in reversed(range(self.pools))]
        )
        self.head = _conv3(levels[0], out_channels)
        self.detect_head: nn.Sequential | None = None
        if self.detection is not None:
            # as DECODE's output heads: a hidden 3x3 layer, then 1x1 to the nine numbers
            last = nn.Conv2d(DETECTION_HIDDEN, DETECTION_CHANNELS, kernel_size=1)
            assert last.bias is not None
            with torch.no_grad():  # start near silent: the density channels alone
                last.weight.mul_(0.1)
                last.bias.zero_()
                last.bias[0] = P_BIAS
            self.detect_head = nn.Sequential(_conv3(levels[0], DETECTION_HIDDEN), nn.ELU(), last)
        self.body_head: nn.Sequential | None = None
        if body:
            # the glow is smooth and wide: dilated layers look ~15 px around, beside the trunk's
            self.body_head = nn.Sequential(
                _conv3(levels[0], BODY_HIDDEN),
                nn.ELU(),
                nn.Conv2d(BODY_HIDDEN, BODY_HIDDEN, 3, padding=4, dilation=4),
                nn.ELU(),
                nn.Conv2d(BODY_HIDDEN, 1, kernel_size=1),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Refocus (N, 2, H, W) float32 inputs (sides multiples of `size_multiple`)."""
        return self.detect(x)[0]

    def detect(self, x: torch.Tensor) -> tuple[torch.Tensor, Detections | None]:
        """Return the output (as `forward`) and, for a detection model, its detections."""
        out, det, _ = self.outputs(x)
        return out, det

    def outputs(
        self, x: torch.Tensor
    ) -> tuple[torch.Tensor, Detections | None, torch.Tensor | None]:
        """Return the output (as `forward`), the detections and the body's glow.

        Each where the model has that head (else None): one pass through the trunk for all.
        """
        y = self._features(x)
        body = None if self.body_head is None else self.body_head(y)
        out: torch.Tensor = self.head(y)
        if self.global_skip:
            out = out + x[:, :1]
        if self.nonnegative:
            leak = self.train_leak if self.training else 0.0
            out = F.leaky_relu(out, leak) if leak else F.relu(out)
        if self.detect_head is None or self.detection is None:
            return out, None, body
        g = self.detection
        first, step = g["z_first_um"], g["z_step_um"]
        det = decode(self.detect_head(y), first, first + step * (out.shape[1] - 1))
        # served (eval) output: only the sure detections, if the model says so; training sees
        # every pixel's p * N, so the density terms teach p and N everywhere
        min_p = 0.0 if self.training else g.get("serve_min_p", 0.0)
        points = splat(det, first, step, out.shape[1], g["brightness_scale"], min_p)
        return out.float() + points, det, body

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        """Return the U-Net's full-resolution features, which the heads read."""
        stem_in = x if self.primer is None else torch.cat([x, self.primer(x[:, :1])], dim=1)
        y = F.relu(self.stem(stem_in))
        skips: list[torch.Tensor] = []
        for i, block in enumerate(self.down):
            if i > 0:
                y = F.max_pool2d(y, kernel_size=2)
            y = block(y)
            skips.append(y)
        for up, skip in zip(self.ups, reversed(skips[:-1]), strict=True):
            y = up(y, skip)
        return y

    def count_parameters(self) -> int:
        """Return the number of trainable parameters."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def flops_per_pixel(self) -> float:
        """Return the forward FLOPs (2 x multiply-accumulates of convolutions) per input pixel."""
        side = 2 * self.size_multiple
        macs = 0.0

        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            nonlocal macs
            assert isinstance(module, nn.Conv2d | nn.ConvTranspose2d)
            k = module.kernel_size[0] * module.kernel_size[1]
            if isinstance(module, nn.ConvTranspose2d):
                pixels = inputs[0].shape[-2] * inputs[0].shape[-1]
            else:
                pixels = output.shape[-2] * output.shape[-1]
            macs += pixels * k * module.in_channels * module.out_channels / module.groups

        handles = [
            m.register_forward_hook(hook)
            for m in self.modules()
            if isinstance(m, nn.Conv2d | nn.ConvTranspose2d)
        ]
        try:
            with torch.no_grad():
                p = next(self.parameters())
                self(torch.zeros(1, self.architecture["in_channels"], side, side, device=p.device))
        finally:
            for h in handles:
                h.remove()
        return float(2.0 * macs / (side * side))


def build_model(preset: Literal["slim", "paper", "volume"] = "slim", **overrides: Any) -> DeepZ:
    """Build a `DeepZ` from a named preset, with keyword overrides (e.g. ``channels=...``)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; allowed: {sorted(PRESETS)}")
    kwargs = {**PRESETS[preset], **overrides}
    return DeepZ(**kwargs)


class Discriminator(nn.Module):
    """LSGAN critic: a conv net over (N, C, H, W) images that ends in one score per sample.

    Strided 3x3 convs with leaky ReLU halve the frame ``len(channels)`` times, then a global
    average pool and a linear layer give an unbounded score (least-squares GAN targets 0 / 1).
    """

    def __init__(
        self, *, in_channels: int = 1, channels: Sequence[int] = (16, 32, 64, 128)
    ) -> None:
        super().__init__()
        chans = [int(c) for c in channels]
        if not chans or any(c < 1 for c in chans):
            raise ValueError(f"discriminator channels must be non-empty ints >= 1, got {chans}")
        layers: list[nn.Module] = []
        cin = in_channels
        for c in chans:
            layers += [
                nn.Conv2d(cin, c, 3, padding=1),
                nn.LeakyReLU(0.2),
                nn.Conv2d(c, c, 3, stride=2, padding=1),
                nn.LeakyReLU(0.2),
            ]
            cin = c
        self.features = nn.Sequential(*layers)
        self.score = nn.Linear(cin, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Score (N, C, H, W) images, returning (N,) float."""
        f = self.features(x).mean(dim=(-2, -1))
        out: torch.Tensor = self.score(f)[:, 0]
        return out


def untrained_metadata(model: DeepZ, name: str, trained_on: str = "") -> ModelMetadata:
    """Metadata for a model with no training behind it (tests, benchmarks): the paper's optics."""
    return ModelMetadata(
        name=name,
        architecture=model.architecture,
        size_multiple=model.size_multiple,
        dz_range_um=(-10.0, 10.0),
        pixel_size_um=0.3,
        na=0.75,
        wavelength_um=0.52,
        trained_on=trained_on,
    )


def metadata_path(weights: str | Path) -> Path:
    """Return the metadata JSON that sits beside a weights file (``x.pt`` -> ``x.json``)."""
    return Path(weights).with_suffix(".json")


WEIGHTS_SHA256 = "weights_sha256"
"""Key in a saved model's metadata JSON (``extra``) naming the SHA-256 of the weights beside it.

It ties the pair together: the two files are replaced one after the other, and a save cut
between them leaves new weights beside the old JSON, which `load_model` then refuses.
"""


def save_model(model: DeepZ, metadata: ModelMetadata, path: str | Path) -> Path:
    """Write ``model``'s state_dict to `path` and `metadata` beside it; return the JSON path.

    Each file is written atomically (`engine.files.atomic_write`: the old file or the new one,
    never half of one), the weights first, then the JSON naming their SHA-256
    (`WEIGHTS_SHA256`). The JSON is the save's last step: a crash before it leaves the new
    weights beside the previous JSON, which names other weights, or beside none (a first
    save), and `load_model` refuses either, naming the file, rather than reading the weights
    with another model's depths and optics. Written the other way round, new metadata beside
    old weights of the same architecture would read as a model without a word.
    """
    if metadata.architecture != model.architecture:
        raise ModelMetadataError(
            f"metadata.architecture {metadata.architecture} != model {model.architecture}"
        )
    if metadata.size_multiple != model.size_multiple:
        raise ModelMetadataError(
            f"metadata.size_multiple {metadata.size_multiple} != model {model.size_multiple}"
        )
    path = Path(path)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}

    def write(tmp: Path) -> str:
        torch.save(state, tmp)
        return file_sha256(tmp)  # the bytes renamed into place, not whatever is there later

    path.parent.mkdir(parents=True, exist_ok=True)
    sha256 = atomic_write(path, write)  # a crash while saving leaves the weights there were
    meta = metadata_path(path)
    extra = {**metadata.extra, WEIGHTS_SHA256: sha256}
    atomic_write_text(meta, metadata.model_copy(update={"extra": extra}).to_json() + "\n")
    return meta


def write_checkpoint(path: str | Path, content: Any) -> None:
    """Write weights or a training checkpoint so that `path` is always whole.

    ``torch.save`` through `engine.files.atomic_write`: saved beside `path`, flushed to the
    disk, then renamed over it, so a process killed, or a machine losing power, while saving
    leaves the previous file (a rename alone can leave an empty file after a power loss on
    some file systems). A save that fails (a full disk) removes its temporary file and raises.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: torch.save(content, tmp))


def read_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> Any:
    """Read a weights file or training checkpoint: tensors and plain values, never code.

    ``torch.load`` with ``weights_only=True``: a pickled file can otherwise run any code it
    holds, and checkpoints travel between machines (a committed one resumes a run). Raises
    `ModelMetadataError` naming the file when it is missing or torch cannot read it
    (truncated, not a torch file, or holding objects other than tensors and plain values).
    """
    path = Path(path)
    if not path.is_file():
        raise ModelMetadataError(f"{path}: file not found")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # a truncated or foreign file: torch raises several kinds
        raise ModelMetadataError(
            f"{path}: not a loadable PyTorch weights file ({type(exc).__name__})"
        ) from exc


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[DeepZ, ModelMetadata]:
    """Load a state_dict and its metadata JSON; refuse missing or inconsistent metadata.

    Raises `ModelMetadataError` when the JSON beside the weights is missing or invalid, when its
    architecture does not build, when `size_multiple` disagrees with the architecture, when
    the state_dict does not match the architecture or holds NaN or infinite weights (a run
    that diverged), or when the JSON names other weights
    (`WEIGHTS_SHA256`: a save cut between its two files; a JSON that names none, from before,
    is taken as it is). The metadata returned is the one saved, without that key.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: weights file not found")
    metadata = ModelMetadata.from_file(metadata_path(path))
    try:
        model = DeepZ(**metadata.architecture)
    except (TypeError, ValueError) as exc:
        raise ModelMetadataError(
            f"{metadata_path(path)}: architecture {metadata.architecture} does not build: {exc}"
        ) from exc
    # size_multiple against the architecture: checked by the metadata itself (any loader)
    state = read_checkpoint(path)
    if not isinstance(state, dict):
        raise ModelMetadataError(f"{path}: expected a state_dict, got {type(state).__name__}")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ModelMetadataError(
            f"{path}: weights do not match the architecture in {metadata_path(path)} "
            f"({metadata.architecture}): {exc}"
        ) from exc
    tensors = (  # as float64 (exact for any float tensor; numpy has no bfloat16)
        (k, v.detach().double().numpy())
        for k, v in state.items()
        if torch.is_tensor(v) and v.is_floating_point()
    )
    if (refusal := nonfinite_weights(str(path), tensors)) is not None:
        raise ModelMetadataError(refusal)
    recorded = metadata.extra.get(WEIGHTS_SHA256)
    if recorded is not None:  # checked last: a file torch cannot read is said as such first
        actual = file_sha256(path)
        if actual != recorded:
            raise ModelMetadataError(
                f"{path}: these weights (sha256 {actual[:12]}…) are not the ones "
                f"{metadata_path(path)} describes ({str(recorded)[:12]}…): a save interrupted "
                "between the two files? Save the model again"
            )
        extra = {k: v for k, v in metadata.extra.items() if k != WEIGHTS_SHA256}
        metadata = metadata.model_copy(update={"extra": extra})
    model.to(device).eval()
    return model, metadata
