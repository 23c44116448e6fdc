"""The device, precision and optimiser a run trains with, and its weight average."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from engine.model import DeepZ
from engine.train_volume.config import VolumeTrainConfig


def cpu_has_bf16() -> bool:
    """Whether the CPU has native bfloat16 matmul (AVX-512-BF16 or AMX), from /proc/cpuinfo."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def training_device(cfg: VolumeTrainConfig) -> torch.device:
    """Return the torch device of `cfg.device`; raise TrainConfigError naming it when missing."""
    from engine.train import TrainConfigError

    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise TrainConfigError("device = 'cuda' but torch sees no CUDA GPU here (use 'cpu')")
    return torch.device(cfg.device)


def uses_bf16(cfg: VolumeTrainConfig) -> bool:
    """Whether `cfg` trains under bfloat16 autocast on its device."""
    if cfg.bf16 != "auto":
        return cfg.bf16 == "on"
    if cfg.device == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return cpu_has_bf16()


def build_optimiser(cfg: VolumeTrainConfig, model: DeepZ) -> torch.optim.Adam:
    """Return the run's optimiser: Adam over the weights the config trains (`_param_groups`).

    With ``freeze_trunk`` (and a detection head) the rest of `model` is frozen here first, so
    every caller (the run, the step benchmark, `checkpoint_from_weights`) trains the same set.
    """
    if cfg.freeze_trunk and model.detect_head is not None:  # the head alone learns
        model.requires_grad_(False)
        model.detect_head.requires_grad_(True)
    return torch.optim.Adam(_param_groups(model, cfg), lr=cfg.lr)


def _param_groups(model: DeepZ, cfg: VolumeTrainConfig) -> list[dict[str, Any]]:
    """Return the optimiser's groups: the detection head, and everything else.

    The head is fresh on a trained network, so it learns at ``detection_lr_factor`` times lr.
    Frozen parameters (``freeze_trunk``) are left out.
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    head = [p for n, p in named if n.startswith("detect_head.")]
    rest = [p for n, p in named if not n.startswith("detect_head.")]
    groups: list[dict[str, Any]] = [{"params": rest, "lr_factor": 1.0}] if rest else []
    if head:
        factor = cfg.detection_lr_factor
        groups.append({"params": head, "lr": cfg.lr * factor, "lr_factor": factor})
    return groups


def weight_average(model: DeepZ, decay: float) -> AveragedModel | None:
    """Return an exponential moving average of `model`'s weights (torch's), or None for 0."""
    if decay <= 0:
        return None
    average = get_ema_multi_avg_fn(decay)  # type: ignore[no-untyped-call]
    return AveragedModel(model, multi_avg_fn=average, use_buffers=True)
