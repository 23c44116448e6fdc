"""The training loop: one step (`training_step`) and the run (`train`)."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.optim.swa_utils import AveragedModel

from engine.detection import detection_loss
from engine.metadata import ModelMetadataError, file_sha256, weights_that_fit
from engine.model import DeepZ
from engine.train import TrainConfigError, _lr_factor
from engine.train_volume.checkpoints import (
    initial_weights,
    resume_checkpoint,
    save_checkpoint,
    save_volume_model,
    widen_inputs,
)
from engine.train_volume.config import TRAIN_SEED_OFFSET, VolumeTrainConfig, build_volume_model
from engine.train_volume.data import Sample, SampleFeed, kind_weights_at, sample_batch
from engine.train_volume.lab import LabStack, lab_loss, sample_lab_batch
from engine.train_volume.losses import (
    TorchRenderer,
    body_term,
    read_parts,
    render_depths,
    volume_loss_terms,
)
from engine.train_volume.optim import build_optimiser, training_device, uses_bf16, weight_average
from engine.train_volume.validation import Validation
from engine.volume import psf_bank


def _progress(cfg: VolumeTrainConfig, step: int, wall_s: float) -> float:
    t = step / cfg.steps
    if cfg.schedule_by == "wall" and cfg.max_wall_s is not None:
        t = max(t, wall_s / cfg.max_wall_s)
    return min(t, 1.0)


def _set_rate(
    cfg: VolumeTrainConfig, opt: torch.optim.Optimizer, step: int, wall_s: float
) -> float:
    """Set each parameter group to the schedule's rate for the step after `step` steps taken.

    A group's ``lr_factor`` (the detection head's) scales it. Returns the base rate.
    """
    lr = cfg.lr * _lr_factor(cfg, step, wall_s)  # type: ignore[arg-type]  # same fields
    for group in opt.param_groups:
        group["lr"] = lr * group.get("lr_factor", 1.0)
    return lr


def batch_loss(
    cfg: VolumeTrainConfig,
    model: DeepZ,
    renderer: TorchRenderer,
    pool: Sequence[Sample],
    step: int,
    device: torch.device,
    bf16: bool,
    labs: Sequence[LabStack],
    key: list[int],
    done: Callable[[str], None],
    whole: bool = False,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One batch of `training_step`: drawn with the seed `key`, run forward; its loss and parts.

    With `whole`, the batch is whole frames rather than crops (`data.frame_batches`).
    """
    rng = np.random.default_rng(key)
    d = cfg.data
    if labs and step % d.lab_every == d.lab_every - 1:  # a lab stack: render loss only
        x, frames, targets, dz = sample_lab_batch(rng, labs[int(rng.integers(len(labs)))], cfg)
        x, frames, targets = x.to(device), frames.to(device), targets.to(device)
        done("batch")
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            pred = model(x.to(memory_format=torch.channels_last))
        done("forward")
        lab = lab_loss(renderer, pred.float(), frames, targets, dz)
        loss, parts = cfg.loss.render_weight * lab, {"lab": lab.detach()}
    else:
        batch = sample_batch(rng, pool, cfg, device, whole=whole)
        x = batch.inputs.contiguous(memory_format=torch.channels_last)
        dz = render_depths(rng, cfg, batch.targets)
        done("batch")
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            pred, det, body = model.outputs(x)
        done("forward")
        beads = (batch.sources, batch.mask)
        if cfg.freeze_trunk:  # the density is frozen: its terms would only pull the splat
            loss, parts = torch.zeros((), device=device), {}
        else:
            loss, parts = volume_loss_terms(cfg, renderer, pred.float(), batch.targets, dz, beads)
        if det is not None and cfg.loss.detection_weight > 0:
            found, found_parts = detection_loss(det, *beads)
            loss = loss + cfg.loss.detection_weight * found
            parts |= found_parts
        if body is not None and batch.body is not None and cfg.loss.body_weight > 0:
            glow = body_term(body.float(), batch.body)
            loss = loss + cfg.loss.body_weight * glow
            parts["body"] = glow.detach()
    return loss, parts


def training_step(
    cfg: VolumeTrainConfig,
    model: DeepZ,
    opt: torch.optim.Optimizer,
    renderer: TorchRenderer,
    pool: Sequence[Sample],
    step: int,
    device: torch.device,
    bf16: bool,
    labs: Sequence[LabStack] = (),
    ema: AveragedModel | None = None,
    mark: Callable[[str], None] | None = None,
) -> dict[str, torch.Tensor]:
    """Run the loop's step number `step` (counted from 0); return its loss and parts.

    The one home of a training step, which `train` loops over and `benchmarks.train_step`
    times: a batch (from the pool, or every ``lab_every``-th step a lab stack's), the forward
    pass, the loss, the backward pass — ``grad_accumulation`` times (the last
    ``data.frame_batches`` of them on whole frames; a lab step's are all lab crops), the
    gradients averaged —
    and the optimiser with its weight average. The values (the batches' means) come back on
    the device, unread ("loss" first): reading one waits for the GPU's queue.
    `mark`, where given, is called with each phase's name as it ends (``PHASES``).
    """

    def done(phase: str) -> None:
        if mark is not None:
            mark(phase)

    opt.zero_grad(set_to_none=True)
    total: dict[str, torch.Tensor] = {}
    for part in range(cfg.grad_accumulation):
        # batch 0 keeps the seed a step had before accumulation existed: runs stay reproducible
        key = [cfg.seed, step] if part == 0 else [cfg.seed, step, part]
        whole = part >= cfg.grad_accumulation - cfg.data.frame_batches  # the last ones
        loss, parts = batch_loss(
            cfg, model, renderer, pool, step, device, bf16, labs, key, done, whole
        )
        done("loss")
        (loss / cfg.grad_accumulation).backward()  # type: ignore[no-untyped-call]
        done("backward")
        for k, v in {"loss": loss.detach(), **parts}.items():
            share = v / cfg.grad_accumulation
            total[k] = share if part == 0 else total[k] + share
    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    opt.step()
    if ema is not None:
        ema.update_parameters(model)
    done("optimiser")
    return total


PHASES = ("batch", "forward", "loss", "backward", "optimiser")

READ_EVERY = 50
"""`train` reads its steps' loss values from the device every this many steps."""


def _read_rows(
    unread: list[tuple[dict[str, float], dict[str, torch.Tensor]]],
    history: list[dict[str, float]],
) -> dict[str, float]:
    """Append the unread steps' rows to `history` with their values read; return the last's.

    One device sync for all of them. `unread` is emptied.
    """
    keyed = {f"{i} {k}": v for i, (_, values) in enumerate(unread) for k, v in values.items()}
    numbers = iter(read_parts(keyed).values())
    last: dict[str, float] = {}
    for row, values in unread:
        last = {k: next(numbers) for k in values}
        history.append(row | last)
    unread.clear()
    return last


def check_measured_bank(cfg: VolumeTrainConfig) -> str | None:
    """Check a measured PSF bank the optics name; return its SHA-256 (None without one).

    Raises ValueError with one line if it is unfit: missing, not a bank, or its step off the
    simulator's slices. Not at config load: a recipe's config names a bank made by a command
    (its header says which), and loads on a machine that has not made it yet. Before a run,
    though, so a wrong bank fails at the start, not when the first sample is imaged.
    """
    from engine.optics import SLICE_UM, OpticsConfig
    from engine.volume import load_psf_bank

    optics = OpticsConfig(**cfg.optics)
    if optics.psf_model != "measured":
        return None
    ratio = SLICE_UM / optics.psf_bank_step_um
    if abs(ratio - round(ratio)) > 1e-6:
        raise ValueError(
            f"optics.psf_bank_step_um {optics.psf_bank_step_um} µm does not divide the "
            f"simulator's {SLICE_UM} µm slices"
        )
    try:
        load_psf_bank(str(optics.psf_bank), None, measured=True)
        return file_sha256(str(optics.psf_bank))
    except (OSError, ValueError) as exc:
        raise ValueError(f"optics.psf_bank: {exc}") from exc


def train(cfg: VolumeTrainConfig, resume: bool = False, progress: bool = True) -> DeepZ:
    """Run (or resume) volume training; return the model (eval mode)."""
    from tqdm import tqdm

    from engine.optics import OpticsConfig

    bank_sha256 = check_measured_bank(cfg)
    torch.set_num_threads(cfg.threads)
    torch.set_flush_denormal(True)
    torch.manual_seed(cfg.seed)
    device = training_device(cfg)
    bf16 = uses_bf16(cfg)
    out = cfg.out_dir  # made once the start is checked: a refused run leaves no empty folder
    model: DeepZ = build_volume_model(cfg)
    model = model.to(device, memory_format=torch.channels_last)  # type: ignore[call-overload]
    opt = build_optimiser(cfg, model)
    step, history, wall_before = 0, [], 0.0
    ema_state: dict[str, torch.Tensor] | None = None
    ckpt = out / "checkpoint.pt"
    if resume:
        src, ck = resume_checkpoint(cfg, ckpt)
        with weights_that_fit(f"--resume: {src} does not fit this config's network"):
            model.load_state_dict(ck["model"])
            opt.load_state_dict(ck["opt"])
        step, history, wall_before = ck["step"], ck["history"], ck["wall_s"]
        ema_state = ck.get("ema")
        if ck.get("psf_bank_sha256", bank_sha256) != bank_sha256:  # older checkpoints: none
            raise TrainConfigError(
                f"optics.psf_bank: {src} was trained through another PSF bank (sha256 "
                f"{str(ck['psf_bank_sha256'])[:12]}) than the config's now "
                f"({str(bank_sha256)[:12]}); a resume would mix two microscopes"
            )
        print(f"resumed from {src} at step {step} ({wall_before / 60:.0f} min trained)")
    elif cfg.init_from is not None:
        state = widen_inputs(initial_weights(Path(cfg.init_from)), model.state_dict())
        own = model.state_dict()
        # layers whose shape changed (e.g. the head of a wider depth grid) start fresh
        fresh = sorted(k for k, v in own.items() if k not in state or state[k].shape != v.shape)
        if len(fresh) > len(own) // 2:  # not this network's weights: a run from scratch
            raise ModelMetadataError(  # would pass for a fine-tune
                f"init_from: {cfg.init_from} fits {len(own) - len(fresh)} of this network's "
                f"{len(own)} tensors: not weights of this architecture"
            )
        model.load_state_dict(
            {k: v for k, v in state.items() if k in own and k not in fresh}, strict=False
        )
        note = f"; fresh: {', '.join(fresh)}" if fresh else ""
        print(f"initialised from {cfg.init_from} (fresh optimiser and schedule{note})")
    ema = weight_average(model, cfg.ema_decay)
    if ema is not None and resume:
        if ema_state is not None:
            ema.load_state_dict(ema_state)
        else:  # a checkpoint of a run without the average: it starts from the weights
            print("the checkpoint has no weight average: it starts from the weights")
    elif ema_state is not None:
        print("ema_decay = 0: the checkpoint's weight average is dropped; the raw weights go on")
    # the network validation reads and the run writes: the average where one is kept
    served: DeepZ = model if ema is None else ema.module  # type: ignore[assignment]
    try:  # read before the folder is made and the pool simulated: a stack it cannot use is
        # one line now, not a traceback after minutes of simulation (review 85)
        labs = (
            [LabStack(spec, cfg.patch_size) for spec in cfg.data.lab_stacks]
            if cfg.data.lab_every
            else []
        )
    except (OSError, ValueError) as exc:
        raise TrainConfigError(f"data.lab_stacks: {exc}") from None
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(cfg.model_dump_json(indent=2))
    psf = psf_bank(OpticsConfig(**cfg.optics), cfg.depth_um, modality=cfg.target_modality)
    renderer = TorchRenderer(psf, cfg.depth_um, cfg.patch_size, cfg.loss.render_psf_px, device)
    with SampleFeed(cfg) as feed:  # its workers (if any) stop however the loop ends
        d = cfg.data
        first_seed = TRAIN_SEED_OFFSET + cfg.seed * 1_000_000
        # the pool as an unbroken run holds it at `step`: the refreshes before it (the loop
        # makes the one at `step` itself), each sample in its slot (counter % pool size); with
        # a curriculum its samples take the kind weights of `step`, not of when first drawn
        counter = d.pool_size + (max(step - 1, 0) // d.refresh_every) * d.refresh_count
        weights = kind_weights_at(cfg, _progress(cfg, step, wall_before))
        made = [
            feed.submit(first_seed + counter - d.pool_size + i, weights) for i in range(d.pool_size)
        ]
        val = Validation(cfg)  # (with workers, built while they simulate the pool)
        pool = [get() for get in made]
        pool = [pool[(j - counter) % d.pool_size] for j in range(d.pool_size)]
        # the next refresh's samples, simulated while the steps before it run (with workers);
        # their kind weights are those of the refresh before, a curriculum one refresh behind
        ahead = [feed.submit(first_seed + counter + i, weights) for i in range(d.refresh_count)]
        start = time.monotonic()
        bar = tqdm(
            total=cfg.steps, initial=step, disable=not progress, unit="step", dynamic_ncols=True
        )
        # set before the first step is taken: the optimiser was built at cfg.lr (or restored at
        # a checkpoint's, `checkpoint_from_weights`' at cfg.lr too), and a fresh Adam's first
        # step moves every weight by about its rate, so a fine-tune's first step took the peak
        # rate past the warm-up (review 72)
        _set_rate(cfg, opt, step, wall_before)
        model.train()
        # where this run's wall time goes, printed at its end: a GPU run's loop reached half its
        # step benchmark's rate (docs/benchmarks.md, sessions 23-24) and this says whether the
        # pool's refreshes or the validations take the rest, or the steps themselves
        spent = {"refresh": 0.0, "validation and checkpoints": 0.0}
        first_step = step
        # each step's loss values stay on the device until READ_EVERY steps are due, then are
        # read in one go: a read is a host sync, and 7 a step kept a GPU from running ahead
        unread: list[tuple[dict[str, float], dict[str, torch.Tensor]]] = []
        while step < cfg.steps:
            wall = wall_before + time.monotonic() - start
            if step > 0 and step % d.refresh_every == 0:
                t0 = time.monotonic()
                for get in ahead:  # waits for the workers' samples if they are not done yet
                    pool[counter % d.pool_size] = get()
                    counter += 1
                weights = kind_weights_at(cfg, _progress(cfg, step, wall))
                ahead = [
                    feed.submit(first_seed + counter + i, weights) for i in range(d.refresh_count)
                ]
                spent["refresh"] += time.monotonic() - t0
            values = training_step(cfg, model, opt, renderer, pool, step, device, bf16, labs, ema)
            step += 1
            wall = wall_before + time.monotonic() - start
            lr = _set_rate(cfg, opt, step, wall)
            unread.append(({"step": step, "lr": lr, "wall_s": wall}, values))
            bar.update(1)
            timeout = cfg.max_wall_s is not None and wall >= cfg.max_wall_s
            validate = step % cfg.checkpoint_every == 0 or step == cfg.steps or timeout
            if validate or len(unread) >= READ_EVERY:
                parts = _read_rows(unread, history)
                bar.set_postfix({k: f"{v:.4f}" for k, v in parts.items() if k != "loss"})
            if validate:
                t0 = time.monotonic()
                served.eval()
                history[-1] |= val.run(cfg, served, bf16, device)
                model.train()
                # (`checkpoint_from_weights` leaves one row without a loss)
                bar.write(
                    f"step {step} ({wall / 60:.1f} min): "
                    f"loss {np.mean([h['loss'] for h in history[-100:] if 'loss' in h]):.4f}"
                    f"  bead depth median {history[-1]['val_bead_depth_median_um']:.2f} µm, "
                    f"p90 {history[-1]['val_bead_depth_p90_um']:.2f} µm, "
                    f"within 1 µm {history[-1]['val_bead_within_1um']:.0%}, "
                    f"found {history[-1]['val_bead_found']:.0%}, "
                    f"recall (<= 1 µm of all) {history[-1]['val_bead_recall_1um']:.0%}, "
                    f"beyond 6 µm {history[-1]['val_far_recall_1um']:.0%}, "
                    f"depth channels used {history[-1]['val_depth_channels_used']:.0%}, "
                    f"density FWHM {history[-1]['val_density_fwhm_um']:.2f} µm "
                    f"(truth {history[-1]['val_truth_density_fwhm_um']:.2f})"
                )
                save_checkpoint(cfg, model, opt, step, history, wall, ema)
                spent["validation and checkpoints"] += time.monotonic() - t0
            if timeout:
                bar.write(f"stopping at step {step}: max_wall_s = {cfg.max_wall_s} reached")
                break
        bar.close()
        _read_rows(unread, history)  # (empty unless the loop was left early)
        total = time.monotonic() - start
        stepping = total - sum(spent.values())
        bar.write(
            f"{step - first_step} steps in {total:.0f} s: "
            + ", ".join(f"{k} {v:.0f} s" for k, v in spent.items())
            + f", the steps {stepping:.0f} s ({(step - first_step) / max(stepping, 1e-9):.1f}"
            " steps/s)"
        )
    served.eval()
    if cfg.weights_out is not None:
        save_volume_model(cfg, served, psf, history, step, bf16)
    return served
