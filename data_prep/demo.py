"""The bundled demo dataset: synthetic diabetic-retinopathy fundus photographs in the Kaggle layout.

Why synthetic: the Kaggle EyePACS images (§III-A) cannot be shipped, yet `make demo` and the
end-to-end tests must exercise the whole pipeline (conversion with Eq. (1), three training
stages, evaluation) without a download. Every image is the real fundus photograph that
scikit-image ships in its wheel (`skimage.data.retina()`, CC0, a healthy left eye), varied like a
Kaggle capture (pose, eye mirror, scale, illumination, blur, noise, JPEG quality), with lesions
painted in proportion to the grade:

- grade 1 (mild NPDR): microaneurysms only;
- grade 2 (moderate): more microaneurysms, dot/blot haemorrhages, hard exudates, a cotton-wool spot;
- grade 3 (severe): many more and larger haemorrhages, exudate clusters, cotton-wool spots;
- grade 4 (PDR): grade-3 lesions plus new vessels (tortuous thin red fronds) and, sometimes, a
  boat-shaped pre-retinal haemorrhage.

Lesions are small, local colour changes with sharp-ish edges, so they survive Graham's local
contrast normalisation (Eq. (1): I − G(ρ=10)∗I at 720 px), while the global colour and
illumination changes, which carry no grade information, are removed by it.

Layout written (as the Kaggle competition download, read by `data_prep.kaggle`):
`train/*.jpeg`, `test/*.jpeg`, `trainLabels.csv` (image,level), `retinopathy_solution.csv`
(image,level,Usage; Public = val split, Private = test split), plus `demo.json` (parameters and
counts). The CSVs are written last, so a complete CSV means a complete dataset.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import sys
import time
from functools import lru_cache
from pathlib import Path

import cv2
import numpy as np

GRADES = range(5)
DEFAULT_PER_GRADE = 40  # train images per grade
DEFAULT_EVAL_PER_GRADE = 16  # val and test images per grade, each (even: every patient has 2 eyes)
DEFAULT_WIDTH = 768  # canvas width; Kaggle's 3:2 aspect, modest so that conversion stays fast
ASPECT = 3 / 2
MARKER = "demo.json"

# Landmarks of skimage.data.retina() (a left eye) in unit-disc coordinates (x right, y down),
# measured on the image: optic disc centre and radius, and the fovea.
OPTIC_DISC = (-0.69, -0.10)
OPTIC_DISC_RADIUS = 0.13
FOVEA = (0.0, -0.02)
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


@dataclasses.dataclass(frozen=True)
class ImageSpec:
    """Everything needed to render one image; `render` is a pure function of it.

    Pose/illumination/noise and lesions come from separate seeds, so a spec with `grade=0`
    renders the identical photograph without lesions (what the tests compare against).
    """

    name: str  # e.g. "10_left"
    split: str  # train | val | test
    grade: int
    width: int
    height: int
    diameter: float  # fundus disc diameter in pixels (may exceed the height: clipped, as Kaggle)
    centre: tuple[float, float]
    angle: float  # degrees
    mirror: bool  # right eye: the left-eye photograph mirrored
    gain: tuple[float, float, float]  # RGB: patient pigmentation x camera exposure
    gamma: float
    gradient: tuple[float, float]  # uneven illumination across the disc
    vignette: float
    blur: float  # Gaussian sigma in pixels: slight defocus
    black_level: float
    noise: float  # sensor noise sigma in grey levels
    jpeg_quality: int
    lesion_seed: int
    noise_seed: int

    @property
    def folder(self) -> str:
        return "train" if self.split == "train" else "test"


@lru_cache(maxsize=1)
def _base_fundus() -> tuple[np.ndarray, tuple[float, float], float]:
    """The skimage photograph as float32 RGB, with its disc centre and radius (bundled, offline)."""
    from skimage import data

    rgb = data.retina().astype(np.float32)
    ys, xs = np.nonzero(rgb.max(axis=2) > 20)
    centre = ((xs.min() + xs.max()) / 2, (ys.min() + ys.max()) / 2)
    radius = (xs.max() - xs.min() + ys.max() - ys.min()) / 4
    return rgb, centre, radius


def _pair_grades(grades: list[int], rng: np.random.Generator) -> list[tuple[int, int]]:
    """Pairs eyes into patients with equal or adjacent grades, as the two eyes of real patients.

    Sorted grades are paired neighbour by neighbour; swapping members of consecutive pairs (only
    where both pairs stay within one grade) mixes some ±1 pairs in.
    """
    g = sorted(grades)
    pairs = [[g[i], g[i + 1]] for i in range(0, len(g) - 1, 2)]
    for a, b in itertools.pairwise(pairs):
        if rng.random() < 0.35 and abs(a[0] - b[0]) <= 1 and abs(a[1] - b[1]) <= 1:
            a[1], b[0] = b[0], a[1]
            a.sort()
            b.sort()
    out = [(p[0], p[1]) for p in pairs]
    if len(g) % 2:
        out.append((g[-1], -1))  # odd count: one patient with a single eye
    return out


def plan(
    per_grade: int = DEFAULT_PER_GRADE,
    eval_per_grade: int = DEFAULT_EVAL_PER_GRADE,
    seed: int = 0,
    width: int = DEFAULT_WIDTH,
) -> list[ImageSpec]:
    """Every image of the dataset, sorted by patient id then eye (the Kaggle CSV order)."""
    if per_grade < 1 or eval_per_grade < 0 or width < 64:
        raise ValueError("need per_grade >= 1, eval_per_grade >= 0 and width >= 64")
    rng = np.random.default_rng([seed, 0])
    height = round(width / ASPECT)
    patients: list[tuple[str, tuple[int, int]]] = []
    for split, n in (("train", per_grade), ("val", eval_per_grade), ("test", eval_per_grade)):
        grades = [g for g in GRADES for _ in range(n)]
        patients += [(split, pair) for pair in _pair_grades(grades, rng)]
    # Kaggle-like ids: increasing with gaps, train and test patients interleaved.
    ids = np.cumsum(rng.integers(1, 5, size=len(patients)))
    order = rng.permutation(len(patients))
    specs = []
    for pid, k in zip(ids.tolist(), order.tolist(), strict=True):
        split, pair = patients[k]
        if rng.random() < 0.5:
            pair = (pair[1], pair[0]) if pair[1] >= 0 else pair
        prng = np.random.default_rng([seed, pid, 9])  # patient: pigmentation
        tint = (prng.uniform(0.88, 1.10), prng.uniform(0.72, 1.25), prng.uniform(0.65, 1.45))
        for eye, grade in zip(("left", "right"), pair, strict=True):
            if grade < 0:
                continue
            specs.append(_sample_spec(f"{pid}_{eye}", split, grade, width, height, tint, seed))
    return specs


def _sample_spec(
    name: str,
    split: str,
    grade: int,
    width: int,
    height: int,
    tint: tuple[float, float, float],
    seed: int,
) -> ImageSpec:
    pid, eye = name.split("_")
    r = np.random.default_rng([seed, int(pid), eye == "right"])
    exposure = r.uniform(0.62, 1.12)
    return ImageSpec(
        name=name,
        split=split,
        grade=grade,
        width=width,
        height=height,
        diameter=height * r.uniform(0.90, 1.10),
        centre=(width * r.uniform(0.46, 0.54), height * r.uniform(0.48, 0.52)),
        angle=float(r.uniform(-25, 25)),
        mirror=eye == "right",
        gain=tuple(float(exposure * t * r.uniform(0.95, 1.05)) for t in tint),
        gamma=float(r.uniform(0.85, 1.2)),
        gradient=(float(r.uniform(-0.22, 0.22)), float(r.uniform(-0.22, 0.22))),
        vignette=float(r.uniform(0.0, 0.35)),
        blur=float(r.choice([0.0, r.uniform(0.3, 0.9)])),
        black_level=float(r.uniform(0.0, 8.0)),
        noise=float(r.uniform(0.8, 3.0)),
        jpeg_quality=int(r.integers(86, 97)),
        lesion_seed=int(r.integers(2**31)),
        noise_seed=int(r.integers(2**31)),
    )


class _Canvas:
    """The photograph in canvas coordinates and the unit-disc → canvas mapping of its pose."""

    def __init__(self, spec: ImageSpec) -> None:
        base, (bx, by), br = _base_fundus()
        scale = spec.diameter / (2 * br)
        small = cv2.resize(base, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
        sx, sy = bx * scale, by * scale
        if spec.mirror:
            small = small[:, ::-1]
            sx = small.shape[1] - 1 - sx
        t = math.radians(spec.angle)
        self.rot = np.array([[math.cos(t), -math.sin(t)], [math.sin(t), math.cos(t)]], np.float64)
        cx, cy = spec.centre
        m = np.hstack([self.rot, [[cx], [cy]] - self.rot @ [[sx], [sy]]])
        self.image = cv2.warpAffine(
            np.ascontiguousarray(small), m, (spec.width, spec.height), flags=cv2.INTER_LINEAR
        )
        self.radius = spec.diameter / 2
        self.mirror = spec.mirror
        self.centre = np.array(spec.centre)

    def to_canvas(self, u: float, v: float) -> tuple[float, float]:
        """Unit-disc coordinates of the left-eye photograph → canvas pixels."""
        p = self.rot @ [-u if self.mirror else u, v] * self.radius + self.centre
        return float(p[0]), float(p[1])


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


def _random_site(
    r: np.random.Generator, rmax: float = LESION_MAX_RADIUS, power: float = 0.5
) -> tuple[float, float]:
    """A point of the unit disc outside the optic disc; power < 0.5 concentrates on the centre."""
    while True:
        rho, phi = rmax * r.random() ** power, r.uniform(0, 2 * math.pi)
        u, v = rho * math.cos(phi), rho * math.sin(phi)
        if math.hypot(u - OPTIC_DISC[0], v - OPTIC_DISC[1]) > OPTIC_DISC_RADIUS + 0.04:
            return u, v


def _lesion_layers(spec: ImageSpec, canvas: _Canvas) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Alpha maps of blood (dark red), hard exudates (yellow) and cotton-wool spots (pale)."""
    sev = SEVERITY[spec.grade]
    r = np.random.default_rng(spec.lesion_seed)
    shape = (spec.height, spec.width)
    blood, exudate, cotton = (np.zeros(shape, np.float32) for _ in range(3))
    d = spec.diameter

    def count(rng_range: tuple[int, int]) -> int:
        return int(r.integers(rng_range[0], rng_range[1] + 1))

    for _ in range(count(sev.microaneurysms)):  # tiny round dark-red dots
        x, y = canvas.to_canvas(*_random_site(r, power=0.7))
        rad = d * r.uniform(0.0045, 0.0075)
        _stamp(
            blood,
            x,
            y,
            rad,
            rad * r.uniform(0.85, 1.0),
            r.uniform(0, math.pi),
            r.uniform(0.8, 1.0),
            0.45,
        )
    for _ in range(count(sev.haemorrhages)):  # dot/blot: 1-3 overlapping soft ellipses
        x, y = canvas.to_canvas(*_random_site(r, power=0.6))
        rad = d * r.uniform(0.010, 0.024) * sev.haemorrhage_size
        for _ in range(int(r.integers(1, 4))):
            ox, oy = r.normal(0, rad * 0.4, 2)
            _stamp(
                blood,
                x + ox,
                y + oy,
                rad * r.uniform(0.6, 1.1),
                rad * r.uniform(0.4, 0.9),
                r.uniform(0, math.pi),
                r.uniform(0.75, 0.95),
                0.7,
            )
    for _ in range(count(sev.exudate_clusters)):  # waxy yellow specks, clustered near the macula
        cu, cv = _random_site(r, rmax=0.5, power=0.6)
        spread = r.uniform(0.04, 0.10)
        for _ in range(count(sev.exudates_per_cluster)):
            u, v = cu + r.normal(0, spread), cv + r.normal(0, spread)
            if math.hypot(u, v) > LESION_MAX_RADIUS:
                continue
            x, y = canvas.to_canvas(u, v)
            rad = d * r.uniform(0.0035, 0.009)
            _stamp(
                exudate,
                x,
                y,
                rad,
                rad * r.uniform(0.6, 1.0),
                r.uniform(0, math.pi),
                r.uniform(0.75, 0.95),
                0.35,
            )
    for _ in range(count(sev.cotton_wool)):  # fuzzy pale patches near the vascular arcades
        x, y = canvas.to_canvas(*_random_site(r, rmax=0.65, power=0.5))
        rad = d * r.uniform(0.018, 0.032)
        for _ in range(int(r.integers(2, 4))):
            ox, oy = r.normal(0, rad * 0.35, 2)
            _stamp(
                cotton,
                x + ox,
                y + oy,
                rad * r.uniform(0.7, 1.1),
                rad * r.uniform(0.5, 0.8),
                r.uniform(0, math.pi),
                r.uniform(0.45, 0.65),
                1.0,
            )
    fronds = count(sev.new_vessel_fronds)
    if fronds:
        blood = np.maximum(blood, _new_vessels(r, fronds, spec, canvas))
    if r.random() < sev.preretinal_probability:  # boat-shaped: blood settles, flat upper level
        x, y = canvas.to_canvas(*_random_site(r, rmax=0.6))
        rx, ry = d * r.uniform(0.045, 0.07), d * r.uniform(0.03, 0.045)
        pre = np.zeros(shape, np.float32)
        _stamp(pre, x, y, rx, ry, 0.0, 0.9, 0.25)
        pre[: max(int(y - 0.2 * ry), 0)] = 0
        np.maximum(blood, pre, out=blood)
    return blood, exudate, cotton


def _new_vessels(
    r: np.random.Generator, fronds: int, spec: ImageSpec, canvas: _Canvas
) -> np.ndarray:
    """PDR: tufts of thin tortuous vessels at the disc (NVD) or elsewhere (NVE): random walks."""
    mask = np.zeros((spec.height, spec.width), np.uint8)
    d = spec.diameter
    shift = 4  # sub-pixel precision of cv2.polylines
    for k in range(fronds):
        if k == 0 or r.random() < 0.3:
            phi = r.uniform(0, 2 * math.pi)
            u = OPTIC_DISC[0] + OPTIC_DISC_RADIUS * 0.9 * math.cos(phi)
            v = OPTIC_DISC[1] + OPTIC_DISC_RADIUS * 0.9 * math.sin(phi)
        else:
            u, v = _random_site(r, rmax=0.7)
        x0, y0 = canvas.to_canvas(u, v)
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


def render(spec: ImageSpec) -> np.ndarray:
    """The RGB uint8 photograph described by `spec` (deterministic)."""
    canvas = _Canvas(spec)
    img = canvas.image
    blood, exudate, cotton = _lesion_layers(spec, canvas)
    img *= 1.0 - blood[..., None] * (1.0 - BLOOD)
    img += cotton[..., None] * (COTTON_WOOL - img)
    img += exudate[..., None] * (EXUDATE - img)

    # Camera: exposure and colour, uneven illumination, vignetting, gamma, defocus.
    h, w = spec.height, spec.width
    cx, cy = spec.centre
    rad = canvas.radius
    xs = ((np.arange(w, dtype=np.float32) - cx) / rad)[None, :]
    ys = ((np.arange(h, dtype=np.float32) - cy) / rad)[:, None]
    light = (1 + spec.gradient[0] * xs + spec.gradient[1] * ys) * (
        1 - spec.vignette * (xs * xs + ys * ys)
    )
    img *= np.clip(light, 0.2, None)[..., None] * np.array(spec.gain, np.float32)
    img = 255.0 * (np.clip(img, 0, 255) / 255.0) ** spec.gamma
    if spec.blur > 0:
        img = cv2.GaussianBlur(img, (0, 0), spec.blur)

    # Field stop: a sharp circle (it also hides the tab at the edge of the skimage photograph).
    disc = np.zeros((h, w), np.uint8)
    cv2.circle(
        disc, (round(cx * 16), round(cy * 16)), round(0.985 * rad * 16), 255, -1, cv2.LINE_AA, 4
    )
    img *= disc[..., None].astype(np.float32) / 255.0

    noise = np.random.default_rng(spec.noise_seed).standard_normal(img.shape, np.float32)
    img += spec.black_level + spec.noise * noise
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def encode(spec: ImageSpec, rgb: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".jpeg", rgb[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, spec.jpeg_quality])
    if not ok:
        raise RuntimeError(f"JPEG encoding failed for {spec.name}")
    return buf.tobytes()


def generate(
    out_dir: str | Path,
    per_grade: int = DEFAULT_PER_GRADE,
    eval_per_grade: int = DEFAULT_EVAL_PER_GRADE,
    seed: int = 0,
    width: int = DEFAULT_WIDTH,
) -> dict:
    """Writes the dataset to `out_dir` and returns its summary (also saved as `demo.json`).

    Refuses a non-empty folder that is not a previous demo dataset, so it never mixes with, or
    deletes, someone's data; a previous demo dataset is replaced.
    """
    start = time.perf_counter()
    out = Path(out_dir)
    specs = plan(per_grade, eval_per_grade, seed, width)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER).exists():
        raise ValueError(f"--out {out} is not empty and holds no demo dataset; choose another")
    for folder in ("train", "test"):
        (out / folder).mkdir(parents=True, exist_ok=True)
        for old in (out / folder).glob("*.jpeg"):
            old.unlink()  # a previous demo dataset (the marker says so): stale names must go
    for name in ("trainLabels.csv", "retinopathy_solution.csv"):
        (out / name).unlink(missing_ok=True)
    (out / MARKER).write_text("{}\n")  # claims the folder before writing images

    for spec in specs:
        (out / spec.folder / f"{spec.name}.jpeg").write_bytes(encode(spec, render(spec)))

    usage = {"val": "Public", "test": "Private"}
    with open(out / "trainLabels.csv", "w") as f:
        f.write("image,level\n")
        f.writelines(f"{s.name},{s.grade}\n" for s in specs if s.split == "train")
    with open(out / "retinopathy_solution.csv", "w") as f:
        f.write("image,level,Usage\n")
        f.writelines(f"{s.name},{s.grade},{usage[s.split]}\n" for s in specs if s.split != "train")

    counts = {
        split: {str(g): sum(s.split == split and s.grade == g for s in specs) for g in GRADES}
        for split in ("train", "val", "test")
    }
    summary = {
        "source": "skimage.data.retina() with synthetic lesions (data_prep.demo)",
        "seed": seed,
        "per_grade": per_grade,
        "eval_per_grade": eval_per_grade,
        "width": width,
        "height": specs[0].height,
        "images": len(specs),
        "patients": len({s.name.split("_")[0] for s in specs}),
        "counts": counts,
    }
    (out / MARKER).write_text(json.dumps(summary, indent=2) + "\n")  # no timing: reproducible
    return {**summary, "seconds": round(time.perf_counter() - start, 2)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m data_prep.demo",
        description="Write the synthetic demo dataset in the Kaggle EyePACS layout.",
    )
    p.add_argument("--out", required=True, help="output folder (created)")
    p.add_argument(
        "--per-grade",
        type=int,
        default=DEFAULT_PER_GRADE,
        help=f"train images per grade (default {DEFAULT_PER_GRADE})",
    )
    p.add_argument(
        "--eval-per-grade",
        type=int,
        default=DEFAULT_EVAL_PER_GRADE,
        help=f"val and test images per grade, each (default {DEFAULT_EVAL_PER_GRADE})",
    )
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument(
        "--width",
        type=int,
        default=DEFAULT_WIDTH,
        help=f"image width in pixels, height is 2/3 of it (default {DEFAULT_WIDTH})",
    )
    args = p.parse_args(argv)
    try:
        summary = generate(args.out, args.per_grade, args.eval_per_grade, args.seed, args.width)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    c = summary["counts"]
    print(
        f"demo dataset: {summary['images']} images of {summary['patients']} patients in "
        f"{args.out} (train {sum(c['train'].values())}, val {sum(c['val'].values())}, "
        f"test {sum(c['test'].values())}; {summary['width']}x{summary['height']}) "
        f"in {summary['seconds']:.1f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
