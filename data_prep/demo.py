"""The bundled demo dataset: synthetic diabetic-retinopathy fundus photographs in the Kaggle layout.

Why synthetic: the Kaggle EyePACS images (§III-A) cannot be shipped, yet `make demo` and the
end-to-end tests must exercise the whole pipeline (conversion with Eq. (1), three training
stages, evaluation) without a download. Every image is the real fundus photograph that
scikit-image ships in its wheel (`skimage.data.retina()`, CC0, a healthy left eye), varied like a
Kaggle capture (pose, eye mirror, scale, illumination, blur, noise, JPEG quality), with lesions
painted in proportion to the grade (data_prep.lesions). Eq. (1) removes the global colour and
illumination changes, which carry no grade information, and keeps the lesions.

    python -m data_prep.demo --out DIR [--per-grade 40] [--eval-per-grade 16] [--seed 0]
    m2cnn-prep demo --out DIR [...]

Layout written (as the Kaggle competition download, read by `data_prep.kaggle`):
`train/*.jpeg`, `test/*.jpeg`, `trainLabels.csv` (image,level), `retinopathy_solution.csv`
(image,level,Usage; Public = val split, Private = test split), plus `demo.json` (parameters and
counts). The CSVs are written last, so a complete CSV means a complete dataset. A folder that
holds anything but a previous demo dataset is refused. Exit codes: 0 done, 2 usage.
"""

from __future__ import annotations

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
from absl import flags

from data_prep import lesions
from m2cnn_tf import cli
from m2cnn_tf.common import SPLITS
from m2cnn_tf.errors import UsageError

GRADES = range(5)
DEFAULT_PER_GRADE = 40  # train images per grade
DEFAULT_EVAL_PER_GRADE = 16  # val and test images per grade, each (even: every patient has 2 eyes)
DEFAULT_WIDTH = 768  # canvas width; Kaggle's 3:2 aspect, modest so that conversion stays fast
ASPECT = 3 / 2
MARKER = "demo.json"


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
    for setting, value, least in (
        ("per_grade", per_grade, 1),
        ("eval_per_grade", eval_per_grade, 0),
        ("width", width, 64),
    ):
        if value < least:
            raise UsageError(f"must be at least {least}, got {value}", setting=setting)
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
        self.shape = (spec.height, spec.width)
        self.diameter = spec.diameter
        self.radius = spec.diameter / 2
        self.mirror = spec.mirror
        self.centre = np.array(spec.centre)

    def to_canvas(self, u: float, v: float) -> tuple[float, float]:
        """Unit-disc coordinates of the left-eye photograph → canvas pixels."""
        p = self.rot @ [-u if self.mirror else u, v] * self.radius + self.centre
        return float(p[0]), float(p[1])


def render(spec: ImageSpec) -> np.ndarray:
    """The RGB uint8 photograph described by `spec` (deterministic)."""
    canvas = _Canvas(spec)
    img = canvas.image
    lesions.paint(img, spec.grade, spec.lesion_seed, canvas)

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


def _claim(out: Path) -> None:
    """Make `out` an empty demo dataset folder. Refuses a non-empty folder that is not a
    previous demo dataset, so it never mixes with, or deletes, someone's data."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out} exists and is not a directory", setting="out")
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER).exists():
        raise UsageError(f"{out} is not empty and holds no demo dataset", setting="out")
    for folder in ("train", "test"):
        (out / folder).mkdir(parents=True, exist_ok=True)
        for old in (out / folder).glob("*.jpeg"):
            old.unlink()  # a previous demo dataset (the marker says so): stale names must go
    for name in ("trainLabels.csv", "retinopathy_solution.csv"):
        (out / name).unlink(missing_ok=True)
    (out / MARKER).write_text("{}\n")  # claims the folder before writing images


def _write_labels(out: Path, specs: list[ImageSpec]) -> None:
    """The two Kaggle CSVs: train, and the solution with Public = val and Private = test."""
    usage = {"val": "Public", "test": "Private"}
    with open(out / "trainLabels.csv", "w") as f:
        f.write("image,level\n")
        f.writelines(f"{s.name},{s.grade}\n" for s in specs if s.split == "train")
    with open(out / "retinopathy_solution.csv", "w") as f:
        f.write("image,level,Usage\n")
        f.writelines(f"{s.name},{s.grade},{usage[s.split]}\n" for s in specs if s.split != "train")


def generate(
    out: str | Path,
    per_grade: int = DEFAULT_PER_GRADE,
    eval_per_grade: int = DEFAULT_EVAL_PER_GRADE,
    seed: int = 0,
    width: int = DEFAULT_WIDTH,
) -> dict:
    """Writes the dataset to `out` and returns its summary (also saved as `demo.json`).

    A previous demo dataset in `out` is replaced; any other non-empty folder is refused.
    """
    start = time.perf_counter()
    out = Path(out)
    specs = plan(per_grade, eval_per_grade, seed, width)
    _claim(out)
    for spec in specs:
        (out / spec.folder / f"{spec.name}.jpeg").write_bytes(encode(spec, render(spec)))
    _write_labels(out, specs)
    counts = {
        split: {str(g): sum(s.split == split and s.grade == g for s in specs) for g in GRADES}
        for split in SPLITS
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


# ---------------------------------------------------------------------------------------------
# Command line

PROG = "data_prep.demo"
FLAGS = flags.FlagValues()
flags.DEFINE_string("out", None, "output folder (created)", flag_values=FLAGS)
flags.DEFINE_integer("per-grade", DEFAULT_PER_GRADE, "train images per grade", flag_values=FLAGS)
flags.DEFINE_integer(
    "eval-per-grade",
    DEFAULT_EVAL_PER_GRADE,
    "val and test images per grade, each",
    flag_values=FLAGS,
)
flags.DEFINE_integer("seed", 0, "random seed", flag_values=FLAGS)
flags.DEFINE_integer(
    "width", DEFAULT_WIDTH, "image width in pixels; the height is 2/3 of it", flag_values=FLAGS
)
flags.mark_flag_as_required("out", flag_values=FLAGS)


def _body(_rest: list[str]) -> None:
    out = FLAGS.out
    summary = generate(
        out, FLAGS["per-grade"].value, FLAGS["eval-per-grade"].value, FLAGS.seed, FLAGS.width
    )
    c = summary["counts"]
    print(
        f"demo dataset: {summary['images']} images of {summary['patients']} patients in "
        f"{out} (train {sum(c['train'].values())}, val {sum(c['val'].values())}, "
        f"test {sum(c['test'].values())}; {summary['width']}x{summary['height']}) "
        f"in {summary['seconds']:.1f} s"
    )


def run(argv: list[str] | None = None, *, prog: str = PROG) -> int:
    return cli.run(prog, __doc__, FLAGS, _body, argv)


def main() -> None:
    sys.exit(run())


if __name__ == "__main__":
    main()
