"""Tiny fundus-like test images: a textured bright disc on a noisy black background."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np


def fundus(height: int = 96, width: int = 128, seed: int = 0, radius: float = 0.46) -> np.ndarray:
    """BGR uint8; radius is a fraction of the height (above 0.5 the disc is cut top and bottom,
    as in many Kaggle photographs)."""
    rng = np.random.default_rng(seed)
    img = np.zeros((height, width, 3), np.uint8)
    centre = (width // 2 + int(rng.integers(-3, 4)), height // 2)
    r = int(radius * height)
    colour = tuple(int(v) for v in rng.integers([20, 50, 140], [40, 90, 200]))
    cv2.circle(img, centre, r, colour, -1)
    for _ in range(6):  # vessels
        p = tuple(int(v) for v in rng.integers(0, [width, height]))
        q = tuple(int(v) for v in rng.integers(0, [width, height]))
        cv2.line(img, p, q, (15, 30, 90), 1 + int(rng.integers(0, 2)))
    for _ in range(4):  # bright and dark spots
        p = tuple(int(v) for v in rng.integers(0, [width, height]))
        cv2.circle(img, p, int(rng.integers(1, 4)), (90, 200, 230), -1)
    disc = np.zeros((height, width), np.uint8)
    cv2.circle(disc, centre, r, 255, -1)
    noise = rng.normal(0, 3, img.shape)
    img = np.clip(img + noise, 0, 255).astype(np.uint8)
    img[disc == 0] = rng.integers(0, 4, (int((disc == 0).sum()), 3), dtype=np.uint8)
    return img


def write_fundus(path: Path, seed: int = 0, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), fundus(seed=seed, **kw), [cv2.IMWRITE_JPEG_QUALITY, 90])
    return path


def kaggle_dir(
    root: Path, patients: int = 6, test_patients: int = 4, seed: int = 0, solution: bool = True
) -> Path:
    """A miniature Kaggle layout: train/, test/, trainLabels.csv, retinopathy_solution.csv."""
    rng = np.random.default_rng(seed)
    lines = ["image,level"]
    for p in range(1, patients + 1):
        for eye in ("left", "right"):
            name = f"{p}_{eye}"
            image_seed = seed * 1000 + 2 * p + (eye == "left")
            write_fundus(root / "train" / f"{name}.jpeg", seed=image_seed)
            lines.append(f"{name},{int(rng.integers(0, 5))}")
    (root / "trainLabels.csv").write_text("\n".join(lines) + "\n")
    if solution:
        lines = ["image,level,Usage"]
        for p in range(1001, 1001 + test_patients):
            for eye in ("left", "right"):
                name = f"{p}_{eye}"
                image_seed = seed * 1000 + 2 * p + (eye == "left")
                write_fundus(root / "test" / f"{name}.jpeg", seed=image_seed)
                usage = "Public" if p % 2 else "Private"
                lines.append(f"{name},{int(rng.integers(0, 5))},{usage}")
        (root / "retinopathy_solution.csv").write_text("\n".join(lines) + "\n")
    return root
