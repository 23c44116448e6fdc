"""Summaries: medians and shares within a tolerance, Wilson intervals, paired sign tests."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from engine.heldout.readouts import FWHM_TOLERANCE


def wilson_interval(hits: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95 % Wilson score interval of a proportion `hits` / `n` (``(nan, nan)`` when n = 0).

    With 149 beads, 51 % within 1 µm is 43-59 %: differences of a few beads between two models
    are within it, which is why `paired_hits` compares models bead by bead.
    """
    if n <= 0:
        return (math.nan, math.nan)
    p = hits / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def paired_hits(
    errors_a: np.ndarray, errors_b: np.ndarray, within_um: float = 1.0
) -> dict[str, float]:
    """Compare two methods on the same beads: B's gains and losses against A, and a sign test.

    `errors_a` and `errors_b` are absolute depth errors of the same beads in the same order
    (NaN: not found). ``gained``: beads B places within `within_um` and A does not; ``lost``:
    the reverse. ``p_value``: the two-sided exact binomial (sign) test on those discordant
    beads, the chance of a split at least this uneven if the two were equally good.
    """
    a = np.nan_to_num(np.asarray(errors_a, dtype=np.float64).ravel(), nan=np.inf) <= within_um
    b = np.nan_to_num(np.asarray(errors_b, dtype=np.float64).ravel(), nan=np.inf) <= within_um
    return sign_test(a, b)


def sign_test(hits_a: np.ndarray, hits_b: np.ndarray) -> dict[str, float]:
    """B's gains and losses against A on the same items (booleans: a hit), with a sign test.

    ``gained``: items B hits and A misses; ``lost``: the reverse; ``p_value``: the two-sided
    exact binomial test on those discordant items (`paired_hits` for bead depths; the tilted
    plane's beads in focus in `engine.fidelity`).
    """
    a = np.asarray(hits_a, dtype=bool).ravel()
    b = np.asarray(hits_b, dtype=bool).ravel()
    if a.shape != b.shape:
        raise ValueError(f"a paired comparison needs the same beads: {a.size} against {b.size}")
    gained, lost = int(np.sum(b & ~a)), int(np.sum(a & ~b))
    n = gained + lost
    k = min(gained, lost)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2.0**n if n else 1.0
    return {
        "beads": float(a.size),
        "gained": float(gained),
        "lost": float(lost),
        "p_value": min(1.0, 2 * tail),
    }


def summarise(errors: np.ndarray) -> dict[str, float]:
    """Summary of absolute depth errors (µm); NaN entries are failures (bead not found).

    Failures count as infinitely wrong: they are in the denominators of the fractions and
    push the median and p90 up (to inf if they are that many). ``median_found_um`` is the
    median over the beads that were found, for context only.
    """
    e = np.asarray(errors, dtype=np.float64).ravel()
    fails = ~np.isfinite(e)
    filled = np.where(fails, np.inf, e)
    n = int(e.size)
    nan = math.nan
    # the share within 1 µm and its 95 % interval: what one more or one fewer bead is worth
    lo, hi = wilson_interval(int(np.sum(filled <= 1.0)), n)
    return {
        "count": float(n),
        "failures": float(fails.sum()),
        "median_um": float(np.median(filled)) if n else nan,
        "p90_um": float(np.percentile(filled, 90, method="higher")) if n else nan,
        "within_1um": float(np.mean(filled <= 1.0)) if n else nan,
        "within_1um_lo": lo,
        "within_1um_hi": hi,
        "within_0p5um": float(np.mean(filled <= 0.5)) if n else nan,
        "median_found_um": float(np.median(e[~fails])) if (~fails).any() else nan,
    }


RANGES_UM = (4.0, 6.0)
"""Half-ranges around focus (µm) over which `within_range` summarises bead depth."""


def within_range(
    z_true_um: np.ndarray, errors: np.ndarray, ranges_um: Sequence[float] = RANGES_UM
) -> list[dict[str, float]]:
    """`summarise` over the beads closer than r to focus (|z| < r), for each r in `ranges_um`.

    The targets ask for every bead over ±10 µm; this says how far from focus one frame gives
    depth to a stated accuracy (the median and p90, beads not found counting as failures).
    """
    dist = np.abs(np.asarray(z_true_um, dtype=np.float64))
    err = np.asarray(errors, dtype=np.float64)
    return [{"range_um": float(r), **summarise(err[dist < r])} for r in ranges_um]


def summarise_ratios(ratios: np.ndarray, tolerance: float = FWHM_TOLERANCE) -> dict[str, float]:
    """Summary of FWHM ratios: NaN (unresolved) counts as outside the tolerance."""
    r = np.asarray(ratios, dtype=np.float64).ravel()
    ok = np.isfinite(r)
    n = int(r.size)
    nan = math.nan
    return {
        "count": float(n),
        "unresolved": float((~ok).sum()),
        "median_ratio": float(np.median(r[ok])) if ok.any() else nan,
        "fraction_within": float(np.mean(ok & (np.abs(np.where(ok, r, 0.0) - 1) <= tolerance)))
        if n
        else nan,
        "tolerance": tolerance,
    }
