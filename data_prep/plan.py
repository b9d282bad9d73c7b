"""Which record goes where: the fixed order of the items, their cut into chunks, and which run
of chunks makes each shard.

Items are put in a seeded order per split and cut into fixed chunks; a shard of size S is the
concatenation of a fixed run of chunks. The plan is written once, before any image, so which
record goes where never depends on timing, workers or interruptions.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np

from data_prep.sources import Item, Listing
from data_prep.worker import Settings, encode_image
from m2cnn_tf.common import SPLITS

PLAN_VERSION = 1
_PILOT_IMAGES = 8
# Bytes per pixel when no pilot image could be encoded (typical of Eq. (1) output; ours).
_FALLBACK_BYTES_PER_PIXEL = {"jpeg": 0.6, "png": 2.0}

Map = Callable[..., Iterator[tuple[Any, Any]]]  # data_prep.executor.Executor.map


def now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def order_items(items: list[Item], seed: int) -> dict[str, list[Item]]:
    """Each split in a seeded order, so shards mix grades even when a CSV is sorted by grade."""
    by_split: dict[str, list[Item]] = {}
    for k, split in enumerate(SPLITS):
        members = sorted((it for it in items if it.split == split), key=lambda it: it.image_id)
        order = np.random.default_rng([seed, k]).permutation(len(members))
        if members:
            by_split[split] = [members[i] for i in order]
    return by_split


def _items_digest(by_split: dict[str, list[Item]]) -> str:
    h = hashlib.sha256()
    for split, items in by_split.items():
        for it in items:
            h.update(f"{split}\t{it.image_id}\t{it.path}\t{it.grade}\t{it.patient}\n".encode())
    return h.hexdigest()


def conversion_key(listing: Listing, settings: Settings, by_split: dict[str, list[Item]]) -> str:
    """What identifies a conversion's output: a resumed or repeated run must have the same."""
    identity = {
        "plan_version": PLAN_VERSION,
        "source": listing.source,
        "options": listing.options,
        "settings": settings.output_key(),
        "items": _items_digest(by_split),
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def _estimate_bytes(
    by_split: dict[str, list[Item]], settings: Settings, map_images: Map
) -> dict[int, float]:
    """Encoded bytes per image at each size, from a few pilot images spread over the listing."""
    flat = [it for items in by_split.values() for it in items]
    step = max(1, len(flat) // _PILOT_IMAGES)
    pilot: Iterable[str] = [it.path for it in flat[::step][:_PILOT_IMAGES]]
    seen: dict[int, list[int]] = {s: [] for s in settings.sizes}
    for _, result in map_images(encode_image, pilot, args=_path_only):
        if isinstance(result, dict):
            for s, data in result.items():
                seen[s].append(len(data))
    fallback = _FALLBACK_BYTES_PER_PIXEL[settings.image_format]
    return {s: float(np.mean(v)) if v else fallback * s * s for s, v in seen.items()}


def _path_only(path: str) -> tuple[str]:
    return (path,)


def make_plan(
    by_split: dict[str, list[Item]], settings: Settings, map_images: Map, key: str
) -> dict[str, Any]:
    """Chunk length and chunks per shard such that shards come near `settings.shard_mb`."""
    est = _estimate_bytes(by_split, settings, map_images)
    target = settings.shard_mb * 1e6
    chunk = int(max(1, min(settings.chunk_max, target // est[max(settings.sizes)])))
    per_shard = {s: max(1, round(target / (chunk * est[s]))) for s in settings.sizes}
    splits = {}
    for split, items in by_split.items():
        n_chunks = -(-len(items) // chunk)
        splits[split] = {
            "items": len(items),
            "chunks": n_chunks,
            "shards": {str(s): -(-n_chunks // per_shard[s]) for s in settings.sizes},
        }
    return {
        "version": PLAN_VERSION,
        "key": key,
        "created_utc": now(),
        "estimated_bytes_per_image": {str(s): round(v) for s, v in est.items()},
        "chunk_images": chunk,
        "chunks_per_shard": {str(s): k for s, k in per_shard.items()},
        "splits": splits,
    }
