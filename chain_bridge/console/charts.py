"""Hand-drawn SVG line charts: the points of a polyline for a series, as the page renders it on load.

static/console.js redraws the same polyline from the live stream with the same arithmetic, so a page looks the
same with or without JavaScript. Missing samples (None) are skipped; the y axis runs from 0 to the peak, and
at least to 1 (so a series of tiny values, e.g. a few milliseconds of finality lag, stays a flat line at the
bottom instead of filling the chart).
"""

from __future__ import annotations

from collections.abc import Sequence

WIDTH = 600
HEIGHT = 120
PAD = 4
MIN_SCALE = 1.0


def polyline(values: Sequence[float | None], width: int = WIDTH, height: int = HEIGHT) -> str:
    """The `points` attribute of an SVG polyline drawing `values` left to right across `width` × `height`."""
    present = [(i, v) for i, v in enumerate(values) if v is not None]
    if not present:
        return ""
    top = max(MIN_SCALE, *(v for _, v in present))
    step = (width - 2 * PAD) / max(len(values) - 1, 1)
    return " ".join(f"{PAD + i * step:.1f},{height - PAD - (v / top) * (height - 2 * PAD):.1f}" for i, v in present)


def peak(values: Sequence[float | None]) -> float | None:
    """The largest sample (the chart's scale), or None when nothing was measured."""
    present = [v for v in values if v is not None]
    return max(present) if present else None
