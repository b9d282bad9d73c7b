"""What diabetic-retinopathy lesions each grade of the demo dataset shows, and how they are
painted onto a fundus photograph (data_prep.demo).

- grade 1 (mild NPDR): microaneurysms only;
- grade 2 (moderate): more microaneurysms, dot/blot haemorrhages, hard exudates, a cotton-wool spot;
- grade 3 (severe): many more and larger haemorrhages, exudate clusters, cotton-wool spots;
- grade 4 (PDR): grade-3 lesions plus new vessels (tortuous thin red fronds) and, sometimes, a
  boat-shaped pre-retinal haemorrhage.

Lesions are small, local colour changes with sharp-ish edges, so they survive Graham's local
contrast normalisation (Eq. (1): I − G(ρ=10)∗I at 720 px). Sites are drawn in the unit-disc
coordinates of the left-eye photograph and placed on the canvas by its pose.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Protocol

import cv2
import numpy as np

# Landmarks of skimage.data.retina() (a left eye) in unit-disc coordinates (x right, y down),
# measured on the image: optic disc centre and radius.
OPTIC_DISC = (-0.69, -0.10)
OPTIC_DISC_RADIUS = 0.13
LESION_MAX_RADIUS = 0.84  # stay inside Graham's circular mask at 90 % of the radius

# Multiplicative darkening of R, G, B for blood (microaneurysms, haemorrhages, new vessels), and
# the RGB colours that hard exudates and cotton-wool spots blend towards.
BLOOD = np.array([0.58, 0.34, 0.44], np.float32)
EXUDATE = np.array([252.0, 228.0, 120.0], np.float32)
COTTON_WOOL = np.array([238.0, 214.0, 178.0], np.float32)


@dataclasses.dataclass(frozen=True)
class Severity:
    """Lesion counts (inclusive ranges) and size scales for one grade; monotone in the grade."""

    microaneurysms: tuple[int, int] = (0, 0)
    haemorrhages: tuple[int, int] = (0, 0)
    haemorrhage_size: float = 1.0  # multiplies the base radius: blots grow with severity
    exudate_clusters: tuple[int, int] = (0, 0)
    exudates_per_cluster: tuple[int, int] = (0, 0)
    cotton_wool: tuple[int, int] = (0, 0)
    new_vessel_fronds: tuple[int, int] = (0, 0)
    preretinal_probability: float = 0.0


SEVERITY: dict[int, Severity] = {
    0: Severity(),
    1: Severity(microaneurysms=(5, 10)),
    2: Severity(
        microaneurysms=(10, 18),
        haemorrhages=(3, 7),
        exudate_clusters=(1, 2),
        exudates_per_cluster=(4, 9),
        cotton_wool=(0, 1),
    ),
    3: Severity(
        microaneurysms=(18, 28),
        haemorrhages=(12, 20),
        haemorrhage_size=1.3,
        exudate_clusters=(2, 4),
        exudates_per_cluster=(6, 12),
        cotton_wool=(2, 4),
    ),
    4: Severity(
        microaneurysms=(22, 34),
        haemorrhages=(16, 26),
        haemorrhage_size=1.45,
        exudate_clusters=(3, 5),
        exudates_per_cluster=(6, 14),
        cotton_wool=(3, 6),
        new_vessel_fronds=(2, 4),
        preretinal_probability=0.5,
    ),
}


class Placement(Protocol):
    """Where the fundus lies on the canvas (data_prep.demo's canvas)."""

    shape: tuple[int, int]  # canvas (height, width)
    diameter: float  # disc diameter in pixels

    def to_canvas(self, u: float, v: float) -> tuple[float, float]: ...


def paint(img: np.ndarray, grade: int, seed: int, place: Placement) -> None:
    """Paint the lesions of `grade` onto the float RGB `img`, in place (deterministic in seed)."""
    blood, exudate, cotton = lesion_layers(grade, seed, place)
    img *= 1.0 - blood[..., None] * (1.0 - BLOOD)
    img += cotton[..., None] * (COTTON_WOOL - img)
    img += exudate[..., None] * (EXUDATE - img)


def lesion_layers(
    grade: int, seed: int, place: Placement
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Alpha maps of blood (dark red), hard exudates (yellow) and cotton-wool spots (pale)."""
    sev = SEVERITY[grade]
    r = np.random.default_rng(seed)
    blood, exudate, cotton = (np.zeros(place.shape, np.float32) for _ in range(3))
    _microaneurysms(r, _count(r, sev.microaneurysms), place, blood)
    _haemorrhages(r, _count(r, sev.haemorrhages), sev.haemorrhage_size, place, blood)
    for _ in range(_count(r, sev.exudate_clusters)):
        _exudate_cluster(r, sev.exudates_per_cluster, place, exudate)
    _cotton_wool(r, _count(r, sev.cotton_wool), place, cotton)
    fronds = _count(r, sev.new_vessel_fronds)
    if fronds:
        blood = np.maximum(blood, new_vessels(r, fronds, place))
    if r.random() < sev.preretinal_probability:
        _preretinal(r, place, blood)
    return blood, exudate, cotton


def _count(r: np.random.Generator, inclusive: tuple[int, int]) -> int:
    return int(r.integers(inclusive[0], inclusive[1] + 1))


def _stamp(
    alpha: np.ndarray,
    x: float,
    y: float,
    rx: float,
    ry: float,
    theta: float,
    opacity: float,
    edge: float,
) -> None:
    """Max-composites a soft ellipse into `alpha`: flat core, smooth rim of relative width edge."""
    h, w = alpha.shape
    reach = max(rx, ry) + 1.5
    x0, x1 = max(int(x - reach), 0), min(int(x + reach) + 2, w)
    y0, y1 = max(int(y - reach), 0), min(int(y + reach) + 2, h)
    if x0 >= x1 or y0 >= y1:
        return
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    dx, dy = xx - x, yy - y
    c, s = math.cos(theta), math.sin(theta)
    d = np.sqrt(((c * dx + s * dy) / rx) ** 2 + ((c * dy - s * dx) / ry) ** 2)
    t = np.clip((1.0 - d) / edge, 0.0, 1.0)
    a = opacity * t * t * (3 - 2 * t)  # smoothstep
    np.maximum(alpha[y0:y1, x0:x1], a, out=alpha[y0:y1, x0:x1])


def _blob(
    r: np.random.Generator,
    alpha: np.ndarray,
    x: float,
    y: float,
    rx: float,
    ry: float,
    opacity: tuple[float, float],
    edge: float,
) -> None:
    """`_stamp` at a random orientation and an opacity drawn from the range."""
    _stamp(alpha, x, y, rx, ry, r.uniform(0, math.pi), r.uniform(*opacity), edge)


def random_site(
    r: np.random.Generator, rmax: float = LESION_MAX_RADIUS, power: float = 0.5
) -> tuple[float, float]:
    """A point of the unit disc outside the optic disc; power < 0.5 concentrates on the centre."""
    while True:
        rho, phi = rmax * r.random() ** power, r.uniform(0, 2 * math.pi)
        u, v = rho * math.cos(phi), rho * math.sin(phi)
        if math.hypot(u - OPTIC_DISC[0], v - OPTIC_DISC[1]) > OPTIC_DISC_RADIUS + 0.04:
            return u, v


def _microaneurysms(r: np.random.Generator, n: int, place: Placement, blood: np.ndarray) -> None:
    """Tiny round dark-red dots."""
    for _ in range(n):
        x, y = place.to_canvas(*random_site(r, power=0.7))
        rad = place.diameter * r.uniform(0.0045, 0.0075)
        _blob(r, blood, x, y, rad, rad * r.uniform(0.85, 1.0), (0.8, 1.0), 0.45)


def _haemorrhages(
    r: np.random.Generator, n: int, size: float, place: Placement, blood: np.ndarray
) -> None:
    """Dot/blot haemorrhages: 1-3 overlapping soft ellipses each."""
    for _ in range(n):
        x, y = place.to_canvas(*random_site(r, power=0.6))
        rad = place.diameter * r.uniform(0.010, 0.024) * size
        for _ in range(int(r.integers(1, 4))):
            ox, oy = r.normal(0, rad * 0.4, 2)
            rx, ry = rad * r.uniform(0.6, 1.1), rad * r.uniform(0.4, 0.9)
            _blob(r, blood, x + ox, y + oy, rx, ry, (0.75, 0.95), 0.7)


def _exudate_cluster(
    r: np.random.Generator, per_cluster: tuple[int, int], place: Placement, exudate: np.ndarray
) -> None:
    """Waxy yellow specks, clustered near the macula."""
    cu, cv = random_site(r, rmax=0.5, power=0.6)
    spread = r.uniform(0.04, 0.10)
    for _ in range(_count(r, per_cluster)):
        u, v = cu + r.normal(0, spread), cv + r.normal(0, spread)
        if math.hypot(u, v) > LESION_MAX_RADIUS:
            continue
        x, y = place.to_canvas(u, v)
        rad = place.diameter * r.uniform(0.0035, 0.009)
        _blob(r, exudate, x, y, rad, rad * r.uniform(0.6, 1.0), (0.75, 0.95), 0.35)


def _cotton_wool(r: np.random.Generator, n: int, place: Placement, cotton: np.ndarray) -> None:
    """Fuzzy pale patches near the vascular arcades."""
    for _ in range(n):
        x, y = place.to_canvas(*random_site(r, rmax=0.65, power=0.5))
        rad = place.diameter * r.uniform(0.018, 0.032)
        for _ in range(int(r.integers(2, 4))):
            ox, oy = r.normal(0, rad * 0.35, 2)
            rx, ry = rad * r.uniform(0.7, 1.1), rad * r.uniform(0.5, 0.8)
            _blob(r, cotton, x + ox, y + oy, rx, ry, (0.45, 0.65), 1.0)


def _preretinal(r: np.random.Generator, place: Placement, blood: np.ndarray) -> None:
    """Boat-shaped pre-retinal haemorrhage: the blood settles, with a flat upper level."""
    x, y = place.to_canvas(*random_site(r, rmax=0.6))
    d = place.diameter
    rx, ry = d * r.uniform(0.045, 0.07), d * r.uniform(0.03, 0.045)
    pre = np.zeros(place.shape, np.float32)
    _stamp(pre, x, y, rx, ry, 0.0, 0.9, 0.25)
    pre[: max(int(y - 0.2 * ry), 0)] = 0
    np.maximum(blood, pre, out=blood)


def new_vessels(r: np.random.Generator, fronds: int, place: Placement) -> np.ndarray:
    """PDR: tufts of thin tortuous vessels at the disc (NVD) or elsewhere (NVE): random walks."""
    mask = np.zeros(place.shape, np.uint8)
    d = place.diameter
    shift = 4  # sub-pixel precision of cv2.polylines
    for k in range(fronds):
        if k == 0 or r.random() < 0.3:
            phi = r.uniform(0, 2 * math.pi)
            u = OPTIC_DISC[0] + OPTIC_DISC_RADIUS * 0.9 * math.cos(phi)
            v = OPTIC_DISC[1] + OPTIC_DISC_RADIUS * 0.9 * math.sin(phi)
        else:
            u, v = random_site(r, rmax=0.7)
        x0, y0 = place.to_canvas(u, v)
        for _ in range(int(r.integers(4, 9))):  # a tuft of loops sprouting from one point
            heading, x, y = r.uniform(0, 2 * math.pi), x0, y0
            pts = [(x, y)]
            for _ in range(int(r.integers(10, 20))):
                heading += r.normal(0.25, 0.6)  # the drift curls the vessel into loops
                step = d * r.uniform(0.004, 0.008)
                x, y = x + step * math.cos(heading), y + step * math.sin(heading)
                pts.append((x, y))
            poly = np.round(np.array(pts) * (1 << shift)).astype(np.int32)
            thickness = max(1, round(d * r.uniform(0.0015, 0.0035)))
            cv2.polylines(mask, [poly], False, 255, thickness, cv2.LINE_AA, shift)
    mask = cv2.GaussianBlur(mask, (0, 0), 0.6)
    return mask.astype(np.float32) * (0.8 / 255)
