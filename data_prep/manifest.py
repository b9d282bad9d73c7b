"""What a finished conversion records in OUT/manifest.json: its inputs (and, for a published
set, its name, licence note and citation: `dataset`), settings, counts, shards with checksums,
every skipped input with its reason, every val/test image kept although imperfect (`flagged`),
every image the dataset's own protocol leaves out (`excluded`, e.g. ungradable), the images
each split's source listed (`expected`), timings and versions.
m2cnn_tf.manifest reads it (record counts for training, completeness for evaluation).

The manifest is written last, atomically: it exists only for a complete conversion, and its
`key` lets a rerun of the same command recognise it.
"""

from __future__ import annotations

import collections
import platform
from collections.abc import Sequence
from typing import Any

import cv2

from data_prep.layout import Layout, finalize_shard, read_json
from data_prep.plan import now
from data_prep.sources import Item, Listing
from data_prep.worker import Settings
from m2cnn_tf import common
from m2cnn_tf.common import atomic_write_json
from m2cnn_tf.errors import RunFailed
from m2cnn_tf.manifest import MANIFEST


def versions() -> dict[str, str]:
    """common.versions(), plus OpenCV's own version (the `opencv` key) and the platform: the
    decoder and resampler that decide the pixels."""
    return {**common.versions(), "opencv": cv2.__version__, "platform": platform.platform()}


def summarize_skips(skipped: Sequence[dict[str, str]]) -> str:
    """ "2 missing file, 1 truncated JPEG": reasons by count."""
    counts = collections.Counter(s["reason"] for s in skipped)
    return ", ".join(f"{n} {reason}" for reason, n in counts.most_common())


def _counts(
    layout: Layout, by_split: dict[str, list[Item]]
) -> tuple[dict[str, dict[str, Any]], list[dict[str, str]], list[dict[str, str]]]:
    """Records and grades per split, and the images the workers skipped and flagged, from the
    chunks."""
    counts: dict[str, dict[str, Any]] = {}
    skipped: list[dict[str, str]] = []
    flagged: list[dict[str, str]] = []
    for split in by_split:
        grades: collections.Counter = collections.Counter()
        total = 0
        for c in range(layout.plan["splits"][split]["chunks"]):
            chunk = read_json(layout.chunk_json(split, c))
            grades.update({int(g): n for g, n in chunk["grades"].items()})
            total += chunk["records"]
            skipped.extend(chunk["skipped"])
            flagged.extend(chunk.get("flagged", []))  # chunks of an older, resumed run: none
        counts[split] = {"records": total, "grades": {str(g): grades[g] for g in range(5)}}
    return counts, skipped, flagged


def expected_images(by_split: dict[str, list[Item]], listing: Listing) -> dict[str, int]:
    """Per split, the distinct images its source rows name: those converted, those the workers
    skipped and those the listing rejected (a missing file, a bad grade). Evaluation compares
    the images it graded with this (m2cnn_tf.manifest.completeness)."""
    ids: dict[str, set[str]] = collections.defaultdict(set)
    for split, items in by_split.items():
        ids[split].update(it.image_id for it in items)
    for skip in listing.skipped:
        if skip.split:
            ids[skip.split].add(skip.image_id)
    return {split: len(ids[split]) for split in common.SPLITS if split in ids}


def _shards(
    layout: Layout, by_split: dict[str, list[Item]], sizes: Sequence[int]
) -> dict[str, list[dict[str, Any]]]:
    """Every final shard per size: path, split, records, bytes, sha256."""
    shards: dict[str, list[dict[str, Any]]] = {}
    for s in sizes:
        shards[str(s)] = []
        for split in by_split:
            for j in range(layout.plan["splits"][split]["shards"][str(s)]):
                if not finalize_shard(layout, s, split, j):
                    raise RunFailed(f"shard {layout.shard(s, split, j)} is incomplete")
                info = read_json(layout.shard_json(s, split, j))
                path = layout.shard(s, split, j).relative_to(layout.out).as_posix()
                shards[str(s)].append({"path": path, "split": split, **info})
    return shards


def write_manifest(
    layout: Layout,
    by_split: dict[str, list[Item]],
    listing: Listing,
    settings: Settings,
    *,
    tool: str,
    command: list[str],
    timings: dict[str, Any],
) -> dict[str, Any]:
    """Write OUT/manifest.json (the conversion is then complete) and return it."""
    plan = layout.plan
    counts, worker_skips, flagged = _counts(layout, by_split)
    skipped = [s.to_dict() for s in listing.skipped] + worker_skips
    excluded = [s.to_dict() for s in listing.excluded]
    manifest = {
        "key": plan["key"],
        "tool": tool,
        "command": command,
        "source": listing.source,
        **({"dataset": listing.dataset} if listing.dataset else {}),
        "params": {
            **settings.output_key(),
            **listing.options,
            "chunk_images": plan["chunk_images"],
            "chunks_per_shard": plan["chunks_per_shard"],
            "estimated_bytes_per_image": plan["estimated_bytes_per_image"],
        },
        "counts": counts,
        "expected": expected_images(by_split, listing),
        "shards": _shards(layout, by_split, settings.sizes),
        "skipped": skipped,
        "skipped_summary": dict(collections.Counter(s["reason"] for s in skipped)),
        "flagged": flagged,
        "flagged_summary": dict(collections.Counter(s["reason"] for s in flagged)),
        "excluded": excluded,
        "excluded_summary": dict(collections.Counter(s["reason"] for s in excluded)),
        "notes": listing.notes,
        "timings": {"first_started_utc": plan["created_utc"], "finished_utc": now(), **timings},
        "versions": versions(),
    }
    atomic_write_json(layout.out / MANIFEST, manifest)
    return manifest
