"""Drawing helpers for synthetic chest X-ray phantoms (numpy + PIL only, no CLI).

Everything is drawn in a canonical frame: x, y in [-1, 1], x towards image right (the patient's
left, as on a PA film), y downwards. A per-image pose (rotation, scale, shift) maps pixel centres
into this frame, so anatomy and findings move together and a finding's box can be read off its
own rendered map in pixel space. Values are "density" (0 = air/black, ~0.8 = bone/white);
`expose` turns a density map into an 8-bit image. Used by stages/sources/synthetic.py.
Inputs: shape and pose parameters; outputs: density maps and 8-bit images.
Run: no CLI; tested by tests/test_synthetic.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

F32 = np.float32


@dataclass(frozen=True)
class Anatomy:
    """Per-patient body and organ geometry (canonical units)."""

    body_w: float  # half-width of the thorax
    neck_w: float
    shoulder_y: float
    lung_top: float  # apex y
    lung_base: float  # right costophrenic angle y; the left lung reaches base_skew lower
    base_skew: float
    lung_med: float  # medial lung border |x|
    lung_w: float  # widest lung width
    dome_h: float  # diaphragm dome height
    heart: tuple[float, float, float, float]  # centre x, centre y, half-width, half-height
    rib_spacing: float
    rib_phase: float
    rib_curve: float
    clav_y: float
    tissue: float  # soft-tissue density
    lung_depth: float  # how much darker aerated lung is
    bubble: bool  # gastric air bubble under the left dome


def sample_anatomy(rng: np.random.Generator) -> Anatomy:
    u = rng.uniform
    return Anatomy(
        body_w=u(0.80, 0.97),
        neck_w=u(0.20, 0.30),
        shoulder_y=u(-0.92, -0.80),
        lung_top=u(-0.80, -0.70),
        lung_base=u(0.40, 0.55),
        base_skew=u(0.0, 0.06),
        lung_med=u(0.08, 0.12),
        lung_w=u(0.52, 0.66),
        dome_h=u(0.12, 0.22),
        heart=(u(0.06, 0.14), u(0.26, 0.34), u(0.28, 0.36), u(0.20, 0.26)),
        rib_spacing=u(0.105, 0.13),
        rib_phase=u(0.0, 1.0),
        rib_curve=u(0.55, 0.75),
        clav_y=u(-0.74, -0.66),
        tissue=u(0.42, 0.52),
        lung_depth=u(0.26, 0.34),
        bubble=bool(rng.random() < 0.6),
    )


def canonical_grid(size: int, rot: float, scale: float, shift: tuple[float, float]):
    """Canonical (x, y) of every pixel centre under the pose (rotation in radians)."""
    c = (np.arange(size, dtype=F32) + F32(0.5)) * F32(2.0 / size) - F32(1.0)
    dx = c[None, :] - F32(shift[0])
    dy = c[:, None] - F32(shift[1])
    cs, sn = F32(np.cos(rot) / scale), F32(np.sin(rot) / scale)
    return cs * dx + sn * dy, cs * dy - sn * dx


def ramp(d: np.ndarray, width: float) -> np.ndarray:
    """Smooth 0 -> 1 step across d = 0 over ``width`` (soft edges without a blur pass)."""
    t = np.clip(d * F32(1.0 / width) + F32(0.5), 0.0, 1.0)
    return t * t * (F32(3.0) - F32(2.0) * t)


def lung_geometry(a: Anatomy, x, y, side: int):
    """Signed distance-like depth inside one lung (side -1 = image left, +1 = image right).

    Returns (depth, t) where depth > 0 inside and t is the fractional height apex->base.
    Works on scalars and arrays, so lesion placement can test single points.
    """
    xm = x * side
    base = a.lung_base + (a.base_skew if side > 0 else 0.0)
    t = np.clip((y - a.lung_top) / (base - a.lung_top), 0.0, 1.0)
    med = a.lung_med + 0.03 * (1.0 - t)
    width = a.lung_w * t**0.45  # rounded apex, widest at the base
    centre = med + 0.4 * a.lung_w
    dome = base - a.dome_h * np.clip(1.0 - ((xm - centre) / (0.6 * a.lung_w)) ** 2, 0.0, 1.0)
    depth = np.minimum(np.minimum(xm - med, med + width - xm), np.minimum(y - a.lung_top, dome - y))
    return depth, t


def dome_y(a: Anatomy, x) -> np.ndarray:
    """Diaphragm height under each lung (used for the abdomen and effusions)."""
    side = np.where(x > 0, 1.0, -1.0)
    xm = np.abs(x)
    base = a.lung_base + np.where(side > 0, a.base_skew, 0.0)
    centre = a.lung_med + 0.4 * a.lung_w
    return base - a.dome_h * np.clip(1.0 - ((xm - centre) / (0.6 * a.lung_w)) ** 2, 0.0, 1.0)


def ellipse(x, y, cx, cy, rx, ry, angle: float = 0.0) -> np.ndarray:
    """1 - normalised squared radius of a rotated ellipse (> 0 inside)."""
    dx, dy = x - F32(cx), y - F32(cy)
    if angle:
        c, s = F32(np.cos(angle)), F32(np.sin(angle))
        dx, dy = c * dx + s * dy, c * dy - s * dx
    return F32(1.0) - (dx * F32(1.0 / rx)) ** 2 - (dy * F32(1.0 / ry)) ** 2


def smooth_field(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Zero-mean, unit-ish random field with features about size/cells pixels wide."""
    g = rng.standard_normal((cells, cells)).astype(F32)
    return np.asarray(Image.fromarray(g).resize((size, size), Image.BICUBIC))


def sample_field(g: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Bilinear lookup of grid ``g`` at fractional (column u, row v), wrapping around.

    The grid sides must be powers of two so the wrap is a cheap bit mask.
    """
    h, w = g.shape
    flat = g.ravel()
    u0, v0 = np.floor(u), np.floor(v)
    fu, fv = u - u0, v - v0
    i0 = u0.astype(np.int32)
    j0 = v0.astype(np.int32)
    i1, j1 = (i0 + 1) & (w - 1), ((j0 + 1) & (h - 1)) * w
    i0, j0 = i0 & (w - 1), (j0 & (h - 1)) * w
    top = flat[j0 + i0] * (1 - fu) + flat[j0 + i1] * fu
    bot = flat[j1 + i0] * (1 - fu) + flat[j1 + i1] * fu
    return top * (1 - fv) + bot * fv


@dataclass
class Body:
    """A rendered normal phantom before exposure: density plus the masks findings need."""

    density: np.ndarray
    lungs: tuple[np.ndarray, np.ndarray]  # soft masks of the image-left and image-right lung
    x: np.ndarray
    y: np.ndarray


def render_body(a: Anatomy, x: np.ndarray, y: np.ndarray, rng: np.random.Generator) -> Body:
    """Draw the normal anatomy. Consumes a fixed amount of ``rng`` (vessel texture)."""
    ax_ = np.abs(x)
    # Silhouette: neck, rounded shoulders, chest widest low down, soft edge.
    chest = F32(a.body_w) * (F32(1.0) - F32(0.08) * (y - F32(0.2)) ** 2)
    shoulder = F32(0.07) * np.exp(-(((y - F32(a.shoulder_y + 0.12)) * F32(9.0)) ** 2))
    half = a.neck_w + (chest + shoulder - F32(a.neck_w)) * ramp(y - F32(a.shoulder_y), 0.25)
    body = ramp(half - ax_, 0.06)
    thick = np.sqrt(np.clip(1.0 - (ax_ / half) ** 2, 0.0, 1.0))
    dens = F32(a.tissue) * body * (F32(0.65) + F32(0.35) * thick)

    # Heart shadow bulges towards image right (patient's left); the aortic knob above it.
    hx, hy, hw, hh = a.heart
    heart = ramp(ellipse(x, y, hx, hy, hw, hh, angle=-0.35), 0.3)
    knob = ramp(ellipse(x, y, 0.08, hy - hh - 0.27, 0.07, 0.06), 0.8)
    solid = F32(1.0) - F32(0.92) * np.maximum(heart, knob)
    lungs = []
    for side in (-1, 1):
        depth, _ = lung_geometry(a, x, y, side)
        lungs.append(ramp(depth, 0.09) * solid)
    lung = lungs[0] + lungs[1]

    # Vessel markings: streaks radiating from each hilum, denser and brighter near it.
    vessels = rng.standard_normal((16, 64)).astype(F32)
    rx, ry = ax_ - F32(0.2), y + F32(0.02)
    r = np.sqrt(rx * rx + ry * ry)
    streak = sample_field(vessels, np.arctan2(ry, rx) * F32(64 / (2 * np.pi)), r * F32(8.0))
    marks = (np.clip(streak, 0.0, None) * F32(0.05) + F32(0.09)) * np.exp(-r * F32(2.5))
    dens -= lung * (F32(a.lung_depth) - marks)

    # Spine (faint through the mediastinum) and trachea down the midline.
    spine = ramp(F32(0.06) - ax_, 0.03) * body
    dens += spine * (F32(0.05) + F32(0.02) * np.cos(y * F32(2 * np.pi / 0.11)))
    trachea = ramp(F32(0.032) - ax_, 0.02) * ramp(F32(-0.34) - y, 0.06)
    dens -= F32(0.09) * trachea

    # Abdomen below the domes, and the gastric bubble under the left dome.
    dome = dome_y(a, x)
    dens += F32(0.07) * ramp(y - dome, 0.06) * body
    if a.bubble:
        bub = ramp(ellipse(x, y, 0.45, dome_y(a, 0.45) + 0.09, 0.10, 0.05), 0.5)
        dens -= F32(0.10) * bub

    # Posterior ribs arc up from the spine then down laterally; anterior ribs are fainter.
    cage = ramp(half * F32(0.94) - ax_, 0.08) * ramp(ax_ - F32(0.07), 0.04)
    cage *= ramp(dome + F32(0.12) - y, 0.1) * ramp(y - F32(a.lung_top - 0.1), 0.06)
    arc = y + F32(0.3) * ax_ - F32(a.rib_curve) * ax_ * ax_
    phase = arc * F32(1.0 / a.rib_spacing) - F32(a.rib_phase)
    post = (F32(0.5) + F32(0.5) * np.cos(F32(2 * np.pi) * phase)) ** 4
    ant_phase = (y - F32(0.45) * ax_) * F32(1.0 / (1.4 * a.rib_spacing))
    ant = (F32(0.5) + F32(0.5) * np.cos(F32(2 * np.pi) * ant_phase)) ** 6
    dens += cage * (F32(0.03) + F32(0.05) * lung) * (post + F32(0.35) * ant)
    # Clavicles rise from the sternum towards the shoulders.
    clav_c = F32(a.clav_y + 0.06) - F32(0.22) * ax_ + F32(0.3) * (ax_ - F32(0.35)) ** 2
    clav = ramp(F32(0.026) - np.abs(y - clav_c), 0.02) * ramp(ax_ - F32(0.05), 0.04)
    dens += F32(0.11) * clav * ramp(F32(0.78) - ax_, 0.08) * body
    return Body(density=dens, lungs=(lungs[0], lungs[1]), x=x, y=y)


def expose(dens: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Density -> 8-bit image with random exposure, gamma and noise (fixed rng use)."""
    size = dens.shape[0]
    low = smooth_field(rng, size, 4) * F32(rng.uniform(0.01, 0.04))
    grain = rng.standard_normal(dens.shape).astype(F32) * F32(rng.uniform(0.008, 0.025))
    white = rng.uniform(0.66, 0.78)
    black = rng.uniform(-0.02, 0.04)
    gamma = rng.uniform(0.85, 1.2)
    v = np.clip((dens - F32(black)) * F32(1.0 / (white - black)) + low, 0.0, 1.0) ** F32(gamma)
    v = np.clip(v + grain, 0.0, 1.0)
    return (v * F32(255.0) + F32(0.5)).astype(np.uint8)


# ---------------------------------------------------------------- findings
# Each finding returns a density map added to the body; detection lesions have compact support
# (exactly zero outside their drawn extent), so the box read off the map is exact.


def lung_point(a: Anatomy, rng: np.random.Generator, side: int, t_range, margin: float):
    """A random canonical point inside one lung, at least ``margin`` from its border if possible."""
    best, best_depth = (0.0, 0.0), -np.inf
    for _ in range(40):
        t = rng.uniform(*t_range)
        y = a.lung_top + t * (a.lung_base - a.lung_top)
        med = a.lung_med + 0.03 * (1.0 - t)
        x = side * (med + rng.uniform(0.15, 0.85) * a.lung_w * t**0.45)
        depth = float(lung_geometry(a, x, y, side)[0])
        if depth >= margin:
            return x, y
        if depth > best_depth:
            best, best_depth = (x, y), depth
    return best


def blob(x, y, cx, cy, sx, sy, angle: float = 0.0) -> np.ndarray:
    return np.exp(np.minimum(ellipse(x, y, cx, cy, sx, sy, angle) - F32(1.0), 0.0))


def patch(x, y, rng: np.random.Generator, centre, count, size, spread: float, aspect=(0.6, 1.2)):
    """Union (capped at 1) of a random number of elliptical Gaussian blobs around ``centre``."""
    m = np.zeros_like(x)
    for _ in range(int(rng.integers(*count))):
        s = rng.uniform(*size)
        dx, dy = rng.normal(0, spread, 2)
        cx, cy = centre[0] + dx, centre[1] + dy
        m += blob(x, y, cx, cy, s, s * rng.uniform(*aspect), rng.uniform(0, np.pi))
    return np.minimum(m, 1.0)


def _compact(m: np.ndarray, level: float) -> np.ndarray:
    """Shift a soft map down so it is exactly zero where it fell below ``level`` of its peak."""
    peak = float(m.max())
    if peak <= 0:
        return m
    return np.maximum(m - F32(level * peak), 0.0) * F32(1.0 / (1.0 - level))


def lesion(kind: str, a: Anatomy, body: Body, rng: np.random.Generator, side: int):
    """Density map of one detection finding, exactly zero outside its drawn extent."""
    x, y = body.x, body.y
    lung = body.lungs[0 if side < 0 else 1]
    u = rng.uniform
    if kind == "Nodule":  # small, round, well defined
        r = u(0.045, 0.075)  # >= ~4 px radius at 192 px: smaller ones are noise-level
        cx, cy = lung_point(a, rng, side, (0.2, 0.85), r * 1.2)
        q = np.clip(ellipse(x, y, cx, cy, r, r * u(0.85, 1.15)), 0.0, 1.0)
        return F32(u(0.24, 0.38)) * np.sqrt(q)
    if kind == "Mass":  # larger than any nodule, dense, homogeneous, sharp lobulated edge
        r = u(0.11, 0.17)
        cx, cy = lung_point(a, rng, side, (0.25, 0.8), r * 0.6)
        ang = np.arctan2(y - F32(cy), x - F32(cx))
        ph = u(0, 2 * np.pi, 2)
        rr = F32(r) * (
            F32(1.0) + F32(0.08) * np.sin(3 * ang + ph[0]) + F32(0.05) * np.sin(5 * ang + ph[1])
        )
        q = np.clip(1.0 - ((x - F32(cx)) ** 2 + (y - F32(cy)) ** 2) / (rr * rr), 0.0, 1.0)
        return F32(u(0.26, 0.38)) * q**0.25
    if kind == "Consolidation":  # lobar airspace opacity: wide, fainter, mottled, bronchograms
        cx, cy = lung_point(a, rng, side, (0.3, 0.85), 0.12)
        m = patch(x, y, rng, (cx, cy), (5, 9), (0.07, 0.13), 0.09, aspect=(0.6, 1.3))
        # An absolute cut (the patch peaks at 1): exactly zero outside the lung, so no box
        # is left around an opacity hidden behind the heart.
        m = np.clip((m * lung - F32(0.35)) * F32(4.0), 0.0, 1.0)  # a steep, defined edge
        tex = np.clip(F32(0.45) + F32(0.55) * smooth_field(rng, x.shape[0], 28), 0.0, 1.0)
        # Air bronchograms: dark tubes running from the hilar side of the opacity outwards.
        tubes = np.zeros_like(x)
        for _ in range(int(rng.integers(2, 4))):
            th = u(-0.6, 0.6) + (0.0 if side > 0 else np.pi)
            length = u(0.12, 0.22)
            px, py = cx - side * 0.06, cy + u(-0.05, 0.05)
            dx, dy = np.cos(th), np.sin(th)
            along = np.clip((x - F32(px)) * F32(dx) + (y - F32(py)) * F32(dy), 0.0, length)
            dist = np.hypot(x - F32(px + 0) - along * F32(dx), y - F32(py) - along * F32(dy))
            tubes = np.maximum(tubes, ramp(F32(0.011) - dist, 0.01))
        return F32(u(0.16, 0.24)) * m * tex * (F32(1.0) - F32(0.75) * tubes)
    if kind == "Effusion":  # meniscus at the costophrenic angle, blunting the base
        base = a.lung_base + (a.base_skew if side > 0 else 0.0)
        h = u(0.22, 0.40)
        edge = a.lung_med + a.lung_w
        frac = np.clip((F32(edge) - x * side) / F32(a.lung_w), 0.0, 1.0)
        top = F32(base - h) + F32(0.6 * h) * frac**0.7  # higher laterally: the meniscus sign
        depth, _ = lung_geometry(a, x, y, side)
        region = ramp(depth + F32(0.02), 0.03) * ramp(y - top, 0.05)  # fluid blurs the dome
        fluid = F32(a.tissue + 0.08) - body.density
        m = np.maximum(fluid, 0.0) * region
        return _compact(m, 0.3)
    if kind == "Atelectasis":  # plate-like band in the mid/lower zone
        cx, cy = lung_point(a, rng, side, (0.45, 0.85), 0.08)
        q = np.clip(ellipse(x, y, cx, cy, u(0.12, 0.2), u(0.02, 0.035), u(-0.35, 0.35)), 0.0, 1.0)
        return F32(u(0.14, 0.22)) * np.sqrt(q) * np.minimum(lung * 1.5, 1.0)
    if kind == "Pneumothorax":  # apical/lateral air rim without vessels, thin pleural line
        depth, t = lung_geometry(a, x, y, side)
        width = F32(a.lung_w) * t**0.45
        gap = F32(u(0.06, 0.12)) * (F32(1.3) - t)
        inner = F32(a.lung_med) + width - gap  # the collapsed lung edge
        t_end = u(0.45, 0.75)
        keep = (depth > 0) & (t < t_end)
        rim = np.where(keep & (x * side > inner), F32(-0.07), F32(0.0))
        line = np.where(keep & (np.abs(x * side - inner) < 0.012), F32(0.08), F32(0.0))
        return rim + line
    raise ValueError(f"unknown lesion kind {kind!r}")


def support_box(m: np.ndarray) -> list[int] | None:
    """Tight integer box [x1, y1, x2, y2] (x2, y2 exclusive) of a map's non-zero pixels."""
    rows = np.flatnonzero(np.any(m != 0, axis=1))
    cols = np.flatnonzero(np.any(m != 0, axis=0))
    if rows.size == 0:
        return None
    return [int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1]
