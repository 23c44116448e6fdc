"""The loss terms that teach the volume net depth, each against the simulator's truth."""

from __future__ import annotations

import functools
import math

import numpy as np
import scipy.fft
import torch

from engine.train_volume.config import VolumeTrainConfig
from engine.volume import DEPTH_STEP_UM, defocus_index


def _gauss_matrix(n: int, sigma: float) -> torch.Tensor:
    """(n, n) Gaussian smoothing matrix (rows sum to 1 inside, zero beyond the edges)."""
    i = torch.arange(n, dtype=torch.float32)
    g = torch.exp(-0.5 * ((i[:, None] - i[None, :]) / sigma) ** 2)
    r = max(1, math.ceil(3 * sigma))
    g = g * ((i[:, None] - i[None, :]).abs() <= r)
    return g / g.sum(dim=1, keepdim=True).max()


@functools.lru_cache(maxsize=64)
def _gauss_on(n: int, sigma: float, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Return `_gauss_matrix` on a device, made once per size, scale, device and dtype.

    A loss step needs six; on a GPU each would otherwise be built on the host and copied
    every step.
    """
    return _gauss_matrix(n, sigma).to(device=device, dtype=dtype)


def smooth3d(v: torch.Tensor, sigma_px: float, sigma_slices: float | None) -> torch.Tensor:
    """Separable Gaussian smoothing of (N, D, H, W) volumes along D, H and W (zero edges).

    Done as three small matrix products, which CPUs run far faster than 1-channel convs.
    ``sigma_slices=None`` smooths laterally only.
    """
    n, d, h, w = v.shape
    x = v
    if sigma_slices is not None:
        gz = _gauss_on(d, sigma_slices, v.device, v.dtype)
        x = torch.matmul(gz, v.reshape(n, d, h * w)).reshape(n, d, h, w)
    gh = _gauss_on(h, sigma_px, v.device, v.dtype)
    gw = _gauss_on(w, sigma_px, v.device, v.dtype)
    x = torch.matmul(gh, x)
    return torch.matmul(x, gw.T)


class TorchRenderer:
    """Torch twin of `engine.volume.Renderer.planes` (without the residual) for patches.

    For the loss, the PSF may be cropped (`crop_px`): prediction and truth are rendered the
    same way. As in `Renderer`, the patch sits at the FFT grid's origin with one PSF radius of
    zeros after it (light spread past an edge wraps into those zeros, never onto the patch), so
    a 128 px patch with a 63 px PSF needs a 160 px grid, not 192 with a margin on both sides.
    The zero rows are not transformed, nor are rows outside the patch transformed back. Each
    patch size gets its own grid by that rule, its OTFs made on first use (`patch`, the size
    every step renders, has them made at once): one renderer serves steps that mix crops with
    whole frames (`data.frame_batches`). The
    render term was half of a training step (128² patches, batch 8, 2 threads on an AMX Xeon:
    337 of 631 ms); with this layout, elementwise products instead of an einsum, dense input
    and the truth's light from `light`, a step takes 349 ms, same loss values.
    """

    def __init__(
        self,
        psf: np.ndarray,
        depth_um: np.ndarray,
        patch: int,
        crop_px: int | None = None,
        device: torch.device | str = "cpu",
    ) -> None:
        if crop_px is not None and crop_px < psf.shape[-1]:
            c, r = psf.shape[-1] // 2, crop_px // 2
            psf = psf[:, c - r : c + r + 1, c - r : c + r + 1]
        # a copy: OTFs made later must not see a caller's later change to its bank
        self._psf = torch.from_numpy(np.array(psf, dtype=np.float32, copy=True))
        self._device = torch.device(device)
        self.depth_um = depth_um
        # one OTF per FFT grid: a run whose steps mix patches and whole frames
        # (`data.frame_batches`) renders each on the smallest grid that holds it
        self._otfs: dict[int, torch.Tensor] = {}
        self._crop_light: dict[tuple[int, int], torch.Tensor] = {}
        self._otf(self._grid(patch, patch))  # made now: the size every step renders

    def _grid(self, h: int, w: int) -> int:
        """Return the FFT grid side for an (h, w) patch: the same rule as `Renderer`'s.

        One PSF radius of zeros after the patch, and at least the PSF's size (which a patch
        smaller than a PSF radius needs).
        """
        size = self._psf.shape[-1]
        return int(scipy.fft.next_fast_len(max(max(h, w) + size // 2, size), real=True))

    def _otf(self, grid: int) -> torch.Tensor:
        """Return the bank's OTFs on a `grid`² grid (made once per grid, on the device)."""
        otf = self._otfs.get(grid)
        if otf is None:
            size = self._psf.shape[-1]
            emb = torch.zeros(self._psf.shape[0], grid, grid)
            emb[:, :size, :size] = self._psf
            emb = torch.roll(emb, (-(size // 2), -(size // 2)), dims=(1, 2))
            otf = self._otfs[grid] = torch.fft.rfft2(emb).to(self._device)
        return otf

    def light(self, objects: torch.Tensor, dz_um: np.ndarray) -> torch.Tensor:
        """Mean (N, K) of the planes `render` would return, without rendering them.

        A plane's sum over the patch is each depth's density weighted by how much of its
        light the PSF puts inside the patch: the patch's indicator correlated with the PSF,
        one (H, W) map per bank entry, made once per patch shape. The render term's
        normaliser, for the cost of a dot product instead of an FFT per depth.
        """
        h, w = objects.shape[-2:]
        maps = self._crop_light.get((h, w))
        if maps is None:
            g = self._grid(h, w)
            otf = self._otf(g)
            inside = torch.zeros(g, g, device=otf.device)
            inside[:h, :w] = 1.0
            corr = torch.fft.irfft2(torch.fft.rfft2(inside) * otf.conj(), s=(g, g))
            maps = self._crop_light[(h, w)] = corr[:, :h, :w].reshape(len(otf), -1)
        j = torch.from_numpy(defocus_index(dz_um, self.depth_um)).to(maps.device)
        flat = objects.float().reshape(*objects.shape[:2], -1)
        total = torch.einsum("ndx,kdx->nk", flat, maps[j])
        return total / (h * w)

    def render(self, objects: torch.Tensor, dz_um: np.ndarray) -> torch.Tensor:
        """Planes (N, K, P, P) at defocus `dz_um` from (N, D, P, P) densities."""
        h, w = objects.shape[-2:]
        g = self._grid(h, w)
        otf = self._otf(g)
        # rfft2 of the zero-padded patch, without padding it: along x with n = g (the
        # zeros are implicit), then along y over the patch's rows padded to g
        dense = objects.float().contiguous()  # FFTs on channels-last rows run ~3x slower
        spec = torch.fft.fft(torch.fft.rfft(dense, n=g, dim=-1), n=g, dim=-2)
        j = torch.from_numpy(defocus_index(dz_um, self.depth_um)).to(otf.device)
        # plane k = sum over depths d of spec[d] · OTF[j[k, d]], as elementwise products: an
        # einsum here runs as one tiny complex matmul per frequency, 5x slower with its copies
        out = torch.stack([(spec * otf[jk]).sum(dim=1) for jk in j], 1)
        # irfft2, keeping only the patch: back along y, drop the rows beyond it, then along x
        rows = torch.fft.ifft(out, dim=-2)[..., :h, :]
        img: torch.Tensor = torch.fft.irfft(rows, n=g, dim=-1)
        return img[..., :w]


def _density_term(
    cfg: VolumeTrainConfig,
    pred: torch.Tensor,
    target: torch.Tensor,
    sigma_px: float,
    sigma_slices: float,
) -> torch.Tensor:
    """Return the density term at one smoothing scale (L1, or squared error relative)."""
    lc = cfg.loss
    sp = compress(smooth3d(pred, sigma_px, sigma_slices), lc.compress_scale)
    st = compress(smooth3d(target, sigma_px, sigma_slices), lc.compress_scale)
    # (1, D, 1, 1) weights along the depth grid: 1 at focus, 1 + far_weight at the range's ends
    depth = torch.as_tensor(
        np.abs(cfg.depth_um) / cfg.depth_half_range_um, dtype=sp.dtype, device=sp.device
    )
    wz = (1.0 + lc.far_weight * depth).reshape(1, -1, 1, 1)
    if lc.object_loss == "l1":
        return ((sp - st).abs() * wz).mean()
    if lc.normalise == "batch":  # relative to the target's size, so the terms' weights compare
        return (((sp - st) ** 2) * wz).mean() / ((st**2).mean() + 1e-6)
    # the same, per sample, then averaged: every sample counts, however dim (a crop with next
    # to nothing in it must not weigh a million times the others: each denominator is at
    # least 1e-3 of the batch's)
    size = (st**2).mean(dim=(1, 2, 3))
    size = torch.maximum(size, 1e-3 * size.mean()) + 1e-6
    return ((((sp - st) ** 2) * wz).mean(dim=(1, 2, 3)) / size).mean()


def compress(v: torch.Tensor, scale: float) -> torch.Tensor:
    """Return c·log(1 + v/c) for c = ``scale`` > 0 (v itself for 0): relative above c, linear below.

    The densities are non-negative; the clamp only keeps a leaky output's small negatives
    (``train_leak``) out of the logarithm's domain trouble.
    """
    if scale <= 0:
        return v
    return scale * torch.log1p(v.clamp_min(0.0) / scale)


def _column_term(
    pred: torch.Tensor, target: torch.Tensor, sigma_px: float, scale: float = 0.0
) -> torch.Tensor:
    """Relative squared error of the density summed over depth, smoothed laterally.

    Depth plays no part here, so a faint far object whose depth the network doubts still
    earns the full gradient for putting its mass in the right column; the density term
    places it in depth. With ``scale`` the sums are compared compressed (`compress`).
    """
    sp = compress(smooth3d(pred.sum(dim=1, keepdim=True), sigma_px, None), scale)
    st = compress(smooth3d(target.sum(dim=1, keepdim=True), sigma_px, None), scale)
    return ((sp - st) ** 2).mean() / ((st**2).mean() + 1e-6)


def _cdf_term(pred: torch.Tensor, target: torch.Tensor, sigma_px: float) -> torch.Tensor:
    """Relative squared error of the density's running sums along depth, from both ends.

    Per pixel (after lateral smoothing) the running sum from the top and the one from the
    bottom each differ from the truth's by the mass on the wrong side: mass misplaced by d
    slices costs 2·d·m² in all, mass missed (D + 1)·m², so a guess in doubt pays, and a
    closer guess pays more: a one-dimensional transport cost along depth.
    """
    sp = smooth3d(pred, sigma_px, None)
    st = smooth3d(target, sigma_px, None)

    def both_ends_squared(v: torch.Tensor) -> torch.Tensor:
        # running sums from the top, and from the bottom (= the total minus those above)
        down = torch.cumsum(v, dim=1)
        up = down[:, -1:] - down + v
        return down**2 + up**2

    return both_ends_squared(sp - st).mean() / (both_ends_squared(st).mean() + 1e-6)


def _depth_nll_term(
    pred: torch.Tensor, target: torch.Tensor, sigma_px: float, sigma_slices: float
) -> torch.Tensor:
    """Mass-weighted KL divergence of each column's depth distribution from the truth's.

    After smoothing, each pixel's truth column p(z) and predicted column q(z) are normalised
    over depth; KL(p ‖ q) is averaged over pixels with the truth's column mass as weight, so
    it is 0 when every column puts its light at the right depths in the right proportions,
    nearly whatever the amount (the column and density terms score the amount). q is floored at
    every depth by 1 % of the predicted column's mean and 1 % of the true one's: no depth's
    log-likelihood falls far below log(1/(100·D)), so a sharp wrong guess costs a bounded
    amount; an empty column reads as a uniform guess, log(D) − H(p), cheaper than a sharp wrong
    one and dearer than a broad right one; and, with the mass weight, a column's gradient does
    not grow as its object dims. The floor's share tied to the truth's mass leaves a small
    pull towards more mass: a bead placed right scores 0.017 at the truth's brightness, 0.009
    at ten times it and 0.09 at a tenth (one bead, D = 41); the column term, which scores the
    amount squared, holds that in check.
    """
    sp = smooth3d(pred, sigma_px, sigma_slices).clamp_min(0.0)
    st = smooth3d(target, sigma_px, sigma_slices).clamp_min(0.0)
    mass = st.sum(dim=1, keepdim=True)
    p = st / (mass + 1e-12)
    floor = 1e-2 * (sp.mean(dim=1, keepdim=True) + mass / sp.shape[1]) + 1e-12
    q = (sp + floor) / (sp + floor).sum(dim=1, keepdim=True)
    kl = (p * (torch.log(p + 1e-12) - torch.log(q))).sum(dim=1, keepdim=True)
    return (kl * mass).sum() / (mass.sum() + 1e-12)


def source_masses(
    v: torch.Tensor,
    sources: torch.Tensor,
    depth_um: np.ndarray,
    sigma_px: float,
    sigma_slices: float,
) -> torch.Tensor:
    """Return each source's windowed mass of a density, (N, M).

    ``v`` is (N, D, P, P) on the depth grid ``depth_um``; ``sources`` (N, M, 4) rows x, y
    (patch pixels, centres at integers), depth (µm), brightness (`point_sources`). The window
    is a separable Gaussian centred on the source (unnormalised: 1 at its centre), so a
    density placed a pixel or a slice off still counts, less.
    """
    h, w = v.shape[-2:]
    dt, dev = v.dtype, v.device
    xs = torch.arange(w, dtype=dt, device=dev)
    ys = torch.arange(h, dtype=dt, device=dev)
    zs = torch.as_tensor(depth_um, dtype=dt, device=dev)
    sources = sources.to(dt)
    wx = torch.exp(-0.5 * ((xs - sources[..., 0:1]) / sigma_px) ** 2)  # (N, M, W)
    wy = torch.exp(-0.5 * ((ys - sources[..., 1:2]) / sigma_px) ** 2)  # (N, M, H)
    # (N, M, D); sigma_slices in steps of the grid, which depth_grid spaces by DEPTH_STEP_UM
    wz = torch.exp(-0.5 * ((zs - sources[..., 2:3]) / (sigma_slices * DEPTH_STEP_UM)) ** 2)
    # contract depth first, then rows, then columns: (N, M, H, W) is the largest intermediate
    per_plane = torch.einsum("ndyx,nmd->nmyx", v, wz)
    return torch.einsum("nmyx,nmy,nmx->nm", per_plane, wy, wx)


def _source_term(
    pred: torch.Tensor,
    target: torch.Tensor,
    sources: torch.Tensor,
    mask: torch.Tensor,
    depth_um: np.ndarray,
    sigma_px: float,
    sigma_slices: float,
    far_weight: float = 0.0,
) -> torch.Tensor:
    """Mean over the true beads of the relative squared error of their windowed masses.

    Each bead counts once, whatever its brightness: missing a faint one costs what missing a
    bright one does (the density term weighs a miss by brightness squared). Nothing outside
    the windows is scored. A bead's truth mass is floored at 1 % of the batch's mean so a
    bead at the very edge of the patch or the grid cannot dominate. With ``far_weight`` k a
    bead at depth z weighs 1 + k·|z|/half range in a weighted mean (k = 0: the plain mean).
    """
    # no branch on the bead count (a branch reads it from the device: a sync per step); a batch
    # of worm crops has no beads, an all-zero mask, and the term is then exactly 0
    count = mask.sum().clamp_min(1.0)
    p = source_masses(pred, sources, depth_um, sigma_px, sigma_slices)
    t = source_masses(target, sources, depth_um, sigma_px, sigma_slices)
    t_mean = (t * mask).sum() / count
    size = torch.maximum(t, 1e-2 * t_mean) ** 2 + 1e-12
    half_range = float(np.abs(depth_um).max())
    weight = mask * (1.0 + far_weight * sources[..., 2].to(mask.dtype).abs() / half_range)
    return (((p - t) ** 2 / size) * weight).sum() / weight.sum().clamp_min(1.0)


def _excess_term(
    pred: torch.Tensor,
    target: torch.Tensor,
    sigma_px: float,
    sigma_slices: float,
    threshold: float,
) -> torch.Tensor:
    """Mass of the density outside the truth's support, relative to the truth's mass.

    The support is where the truth smoothed by (``sigma_px``, ``sigma_slices``) exceeds
    ``threshold`` of the sample's brightest smoothed voxel: with the defaults, up to 3 σ from
    a bead, where the smoothing kernel ends (±3 µm in depth, ±6 px laterally), all of a
    nucleus, and a worm's faint body glow (a few ‰ of its nuclei's brightest). Outside it
    nothing is, and whatever the network draws there is invented: a ghost of a bead at the
    mirrored depth, rings around a nucleus. The squared density terms price a ghost holding
    a tenth of a bead's light at a hundredth; this L1 price is its share of the light. Per
    sample, then averaged, each truth mass floored at 1e-3 of the batch's mean (as
    `_density_term`), so an empty crop still pays for what is drawn in it, without dominating.
    """
    with torch.no_grad():
        st = smooth3d(target, sigma_px, sigma_slices)
        peak = st.amax(dim=(1, 2, 3), keepdim=True)
        outside = (st <= threshold * peak).to(pred.dtype)
        mass = target.sum(dim=(1, 2, 3))
        mass = torch.maximum(mass, 1e-3 * mass.mean()) + 1e-6
    return ((pred.clamp_min(0.0) * outside).sum(dim=(1, 2, 3)) / mass).mean()


def body_term(pred: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """Return the body head's term: its glow's squared error relative to the batch's glow power.

    A batch of bead samples, with no body, is priced against a floor (`BODY_FLOOR`).
    """
    return ((pred - truth) ** 2).sum() / (truth**2).sum().clamp_min(BODY_FLOOR * truth.numel())


BODY_FLOOR = 0.01
"""Least mean squared glow (normalised units) `body_term` divides by: a batch with no body
(beads only) still pays for glow the head draws, as if a faint body were there (a worm's glow
is about 0.3-1 of a frame's std)."""


def render_depths(
    rng: np.random.Generator, cfg: VolumeTrainConfig, target: torch.Tensor
) -> np.ndarray:
    """Δz (µm) of the planes the render term scores this step, drawn without replacement.

    With ``render_at_objects`` = a, each draw picks depth d with weight (1 − a)/D + a · m_d / Σm
    (m_d the batch's true density at depth d), renormalised over the depths not yet drawn. A
    plane at an object's own depth is where the rendered object is sharp, so it is where a
    density too wide laterally, or placed a slice off, costs most. A uniform draw spends most
    planes on depths with nothing in focus.
    """
    depth = cfg.depth_um
    k = cfg.loss.render_planes
    share = cfg.loss.render_at_objects
    if share <= 0:
        return rng.choice(depth, k, replace=False)
    mass = target.detach().float().sum(dim=(0, 2, 3)).cpu().numpy().astype(np.float64)
    uniform = np.full(depth.size, 1.0 / depth.size)
    p = uniform if mass.sum() <= 0 else (1 - share) * uniform + share * mass / mass.sum()
    if share >= 1:  # keep k depths drawable however sparse the batch
        p = np.maximum(p, 1e-9)
    return rng.choice(depth, k, replace=False, p=p / p.sum())


def volume_loss(
    cfg: VolumeTrainConfig,
    renderer: TorchRenderer,
    pred: torch.Tensor,
    target: torch.Tensor,
    dz_um: np.ndarray,
    sources: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Object + render loss of predicted densities against the truth, and its parts as numbers.

    `volume_loss_terms` with its parts read (one device sync for all of them).
    """
    total, terms = volume_loss_terms(cfg, renderer, pred, target, dz_um, sources)
    return total, read_parts(terms)


def read_parts(terms: dict[str, torch.Tensor]) -> dict[str, float]:
    """Return a dict of 0-d tensors as numbers, read from the device in one go."""
    if not terms:
        return {}
    values = torch.stack([v.detach().float() for v in terms.values()]).tolist()
    return dict(zip(terms, values, strict=True))


def volume_loss_terms(
    cfg: VolumeTrainConfig,
    renderer: TorchRenderer,
    pred: torch.Tensor,
    target: torch.Tensor,
    dz_um: np.ndarray,
    sources: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Object + render loss of predicted densities against the truth, and its parts.

    The parts stay on the device, detached: reading one (``.item()``) waits for the GPU's
    queue to drain, and the training loop reads them in batches (`read_parts`) so the host
    can queue the next steps meanwhile.

    With ``source_weight`` and ``sources`` (the batch's bead rows and their mask,
    `VolumeBatch`) each true bead's windowed mass is scored too (`_source_term`).

    With ``column_weight`` the density summed over depth is compared too (`_column_term`), with
    ``cdf_weight`` its running sums along depth (`_cdf_term`), with ``depth_nll_weight`` each
    column's distribution over depth (`_depth_nll_term`), with ``excess_weight`` the mass
    drawn where the truth holds nothing (`_excess_term`).
    With ``coarse_weight`` the density is also compared after heavy smoothing: density put a
    few pixels or slices from a faint object then earns partial credit, where the fine term
    alone gives next to no gradient and the network learns to put nothing there.
    """
    lc = cfg.loss
    # A channels-last network returns depth as the innermost axis; every term below works on
    # (H, W) planes, whose FFTs and matrix products are several times slower on that layout
    pred = pred.float().contiguous()
    obj = _density_term(cfg, pred, target, lc.object_sigma_px, lc.object_sigma_slices)
    parts = {"object": obj.detach()}
    total = lc.object_weight * obj
    if lc.coarse_weight > 0:
        coarse = _density_term(cfg, pred, target, lc.coarse_sigma_px, lc.coarse_sigma_slices)
        parts["coarse"] = coarse.detach()
        total = total + lc.coarse_weight * coarse
    if lc.cdf_weight > 0:
        cdf = _cdf_term(pred, target, lc.cdf_sigma_px)
        parts["cdf"] = cdf.detach()
        total = total + lc.cdf_weight * cdf
    if lc.column_weight > 0:
        col = _column_term(pred, target, lc.column_sigma_px, lc.compress_scale)
        parts["column"] = col.detach()
        total = total + lc.column_weight * col
    if lc.depth_nll_weight > 0:
        nll = _depth_nll_term(pred, target, lc.depth_nll_sigma_px, lc.depth_nll_sigma_slices)
        parts["depth_nll"] = nll.detach()
        total = total + lc.depth_nll_weight * nll
    if lc.excess_weight > 0:
        exc = _excess_term(
            pred,
            target,
            lc.excess_support_sigma_px,
            lc.excess_support_sigma_slices,
            lc.excess_threshold,
        )
        parts["excess"] = exc.detach()
        total = total + lc.excess_weight * exc
    if lc.source_weight > 0 and sources is not None:
        src = _source_term(
            pred,
            target,
            *sources,
            cfg.depth_um,
            lc.source_sigma_px,
            lc.source_sigma_slices,
            lc.source_far_weight,
        )
        parts["source"] = src.detach()
        total = total + lc.source_weight * src
    # at weight 0 the render term is still logged (how far the planes drift without it), but
    # outside the graph: no backward pass through the renderer
    with torch.set_grad_enabled(torch.is_grad_enabled() and lc.render_weight > 0):
        # rendering is linear: one render of the error, and the truth's light without rendering
        ren_err = renderer.render(pred - target, dz_um).abs()
        if lc.object_loss == "l1":
            ren = ren_err.mean()
        elif lc.normalise == "batch":
            ren = ren_err.mean() / (renderer.light(target, dz_um).mean() + 1e-6)
        else:
            light = renderer.light(target, dz_um).mean(dim=1)
            light = torch.maximum(light, 1e-3 * light.mean()) + 1e-6
            ren = (ren_err.mean(dim=(1, 2, 3)) / light).mean()
    parts["render"] = ren.detach()
    return total + lc.render_weight * ren, parts
