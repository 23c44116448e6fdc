"""Cost of one volume-training step, by phase: where a CPU training run spends its time.

``python -m benchmarks.train_step [--config configs/train_volume.toml] [--steps 24]
[--threads 2] [--precisions fp32 bf16] [--device cuda] [--batch-size 32]``

A few simulated samples are made once (their cost, per sample, is reported apart: training
makes ``data.refresh_count`` new ones every ``data.refresh_every`` steps, in worker processes
where ``data.workers`` asks), then ``--steps`` steps of the config's recipe are timed
after a warm-up, split into drawing the batch, the network's forward pass, the loss
(`engine.train_volume.volume_loss_terms`: the terms the config weighs), the backward pass and
the optimiser with the weight average where the config keeps one. The step is the training
loop's own (`engine.train_volume.training_step`), so what is timed is what `train` runs; what
the loop adds (the pool's refreshes, validations, checkpoints) it prints at a run's end. bf16
is the CPU's bfloat16 autocast with channels-last (where AVX-512-BF16 or AMX exists; skipped
with its reason elsewhere; on CUDA always). ``--device cuda`` times the same step on a GPU
(each phase ends with a synchronisation, so the phases add up to the step), and
``--batch-size`` overrides the config's (a GPU wants larger batches). Writes
``benchmarks/results/train_step.json``.
"""

from __future__ import annotations

import argparse
import itertools
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.machine import run_record, write_results

RESULTS = Path(__file__).parent / "results" / "train_step.json"
DEFAULT_CONFIG = Path(__file__).parents[1] / "configs" / "train_volume.toml"


def run(
    config: Path,
    steps: int,
    threads: int,
    precisions: Sequence[str],
    samples: int = 3,
    device: str | None = None,
    batch_size: int | None = None,
) -> tuple[list[dict[str, Any]], float]:
    """Time `steps` training steps per precision; return the rows and seconds per sample."""
    import torch

    from engine import train_volume as tv
    from engine.optics import OpticsConfig
    from engine.volume import psf_bank

    torch.set_num_threads(threads)
    cfg = tv.load_config(config)
    if device is not None:  # else the config's own
        cfg.device = device  # type: ignore[assignment]  # checked by training_device below
    if batch_size is not None:
        cfg.batch_size = batch_size
    dev = tv.training_device(cfg)
    psf = psf_bank(OpticsConfig(**cfg.optics), cfg.depth_um, modality=cfg.target_modality)
    renderer = tv.TorchRenderer(psf, cfg.depth_um, cfg.patch_size, cfg.loss.render_psf_px, dev)

    def now() -> float:
        if dev.type == "cuda":  # GPU work is queued: a phase ends when the device is done
            torch.cuda.synchronize()
        return time.perf_counter()

    t0 = time.perf_counter()
    pool = [tv.Sample(cfg, 7_000_000 + i, cfg.data.kind_weights) for i in range(samples)]
    sample_s = (time.perf_counter() - t0) / samples
    d = cfg.data
    print(
        f"one simulated sample: {sample_s:.2f} s ({d.refresh_count} new ones every "
        f"{d.refresh_every} steps, {d.workers or 'no'} worker processes)",
        flush=True,
    )
    labs = [tv.LabStack(spec, cfg.patch_size) for spec in d.lab_stacks] if d.lab_every else []
    # the clock at a step's start and at the end of each phase, with the phase's name (with
    # grad_accumulation > 1 a step runs batch .. backward once per batch, then the optimiser)
    marks: list[tuple[str, float]] = []

    def mark(phase: str) -> None:
        marks.append((phase, now()))

    rows = []
    for precision in precisions:
        bf16 = precision == "bf16"
        if bf16 and dev.type == "cpu" and not tv.cpu_has_bf16():
            print("bf16: skipped (this CPU has neither AVX-512-BF16 nor AMX)", flush=True)
            continue
        torch.manual_seed(0)
        model = tv.build_volume_model(cfg)
        model = model.to(dev, memory_format=torch.channels_last)  # type: ignore[call-overload]
        model.train()
        opt = tv.build_optimiser(cfg, model)
        ema = tv.weight_average(model, cfg.ema_decay)
        spent = dict.fromkeys(tv.PHASES, 0.0)
        warmup = 3
        for step in range(warmup + steps):
            marks[:] = [("start", now())]
            # the training loop's own step (`train_volume.training_step`); each phase's end
            # is marked as it comes
            tv.training_step(cfg, model, opt, renderer, pool, step, dev, bf16, labs, ema, mark)
            if step >= warmup:
                for (_, a), (phase, b) in itertools.pairwise(marks):
                    spent[phase] += b - a
        ms = {phase: round(1e3 * s / steps, 1) for phase, s in spent.items()}
        total = sum(spent.values()) / steps
        rows.append(
            {
                "precision": precision,
                "device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu",
                "batch_size": cfg.batch_size,
                "grad_accumulation": cfg.grad_accumulation,
                "patch_size": cfg.patch_size,
                "frame_batches": cfg.data.frame_batches,
                "frames_per_batch": cfg.data.frames_per_batch,
                "threads": threads,
                "steps": steps,
                "ms": ms,
                "step_ms": round(1e3 * total, 1),
                "steps_per_s": round(1 / total, 2),
            }
        )
        print(
            f"{precision}: {1e3 * total:6.1f} ms per step ({1 / total:.2f} steps/s): "
            + ", ".join(f"{k} {v:.1f}" for k, v in ms.items()),
            flush=True,
        )
    return rows, sample_s


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.train_step")
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="else the config's")
    p.add_argument("--batch-size", type=int, default=None, help="override the config's")
    p.add_argument("--results", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    load_before = os.getloadavg()
    command = None if argv is None else list(argv)
    rows, sample_s = run(
        args.config,
        args.steps,
        args.threads,
        args.precisions,
        device=args.device,
        batch_size=args.batch_size,
    )
    result = {
        **run_record("benchmarks.train_step", command, None, load_before),
        "config": str(args.config),
        "sample_s": round(sample_s, 2),
        "rows": rows,
    }
    write_results(args.results, result, measured=bool(rows))  # no precision ran: nothing
    return 0 if rows else 1


if __name__ == "__main__":
    raise SystemExit(main())
