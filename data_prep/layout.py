"""Where every file of a conversion goes, and how each one comes into place whole.

    OUT/<size>/<split>-<iiiii>-of-<nnnnn>.tfrecord   final shards (m2cnn_tf.records)
    OUT/manifest.json                                 written last: the conversion is complete
                                                      (m2cnn_tf.manifest.MANIFEST)
    OUT/.state/plan.json                              the fixed plan (data_prep.plan)
    OUT/.state/chunks/<split>-<ccccc>.json            a chunk is done: its records and skips
    OUT/.state/parts/<size>/<split>-<ccccc>.tfrecord  a done chunk's records at one size
    OUT/.state/shards/<size>/<split>-<jjjjj>.json     a shard is final: records, bytes, sha256

Every file is written under a temporary name and renamed when complete, so after kill -9 a
file either exists whole or not at all. State is removed once manifest.json is written.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

from m2cnn_tf.common import atomic_write_json
from m2cnn_tf.errors import UsageError

STATE = ".state"


@dataclasses.dataclass
class Layout:
    """The paths of one conversion into `out` under its `plan`."""

    out: Path
    plan: dict[str, Any]

    @property
    def state(self) -> Path:
        return self.out / STATE

    def chunk_json(self, split: str, c: int) -> Path:
        return self.state / "chunks" / f"{split}-{c:05d}.json"

    def part(self, size: int, split: str, c: int) -> Path:
        return self.state / "parts" / str(size) / f"{split}-{c:05d}.tfrecord"

    def shard(self, size: int, split: str, j: int) -> Path:
        n = self.plan["splits"][split]["shards"][str(size)]
        return self.out / str(size) / f"{split}-{j:05d}-of-{n:05d}.tfrecord"

    def shard_json(self, size: int, split: str, j: int) -> Path:
        return self.state / "shards" / str(size) / f"{split}-{j:05d}.json"

    def shard_of(self, size: int, c: int) -> int:
        return c // self.plan["chunks_per_shard"][str(size)]

    def chunks_of(self, size: int, split: str, j: int) -> range:
        k = self.plan["chunks_per_shard"][str(size)]
        return range(j * k, min((j + 1) * k, self.plan["splits"][split]["chunks"]))

    def mkdirs(self, sizes: Iterable[int]) -> None:
        for s in sizes:
            (self.out / str(s)).mkdir(parents=True, exist_ok=True)
            (self.state / "parts" / str(s)).mkdir(parents=True, exist_ok=True)
            (self.state / "shards" / str(s)).mkdir(parents=True, exist_ok=True)
        (self.state / "chunks").mkdir(parents=True, exist_ok=True)

    def chunk_done(self, sizes: Iterable[int], split: str, c: int) -> bool:
        if not self.chunk_json(split, c).exists():
            return False
        return all(
            self.part(s, split, c).exists()
            or self.shard_json(s, split, self.shard_of(s, c)).exists()
            for s in sizes
        )


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


@contextlib.contextmanager
def replacing(path: Path) -> Iterator[Path]:
    """A temporary path to stream a large file into; fsynced and renamed over `path` when the
    block ends without error (m2cnn_tf.common.atomic_write_bytes is the in-memory form)."""
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_records(path: Path, records: list[bytes]) -> None:
    from tensorflow import io as tfio  # only the parent imports TensorFlow

    with replacing(path) as tmp, tfio.TFRecordWriter(str(tmp)) as writer:
        for record in records:
            writer.write(record)


def remove_temporaries(root: Path) -> None:
    """What a killed run left half-written."""
    for path in root.rglob("*.tmp*"):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def finalize_shard(layout: Layout, size: int, split: str, j: int) -> bool:
    """Concatenate a shard's chunk parts into its final file once all exist (TFRecord files
    concatenate byte-wise); returns True when the shard is final."""
    if layout.shard_json(size, split, j).exists():
        return True
    chunks = layout.chunks_of(size, split, j)
    parts = [layout.part(size, split, c) for c in chunks]
    if not all(layout.chunk_json(split, c).exists() for c in chunks) or not all(
        p.exists() for p in parts
    ):
        return False
    final = layout.shard(size, split, j)
    digest = hashlib.sha256()
    with replacing(final) as tmp, open(tmp, "wb") as out:
        for p in parts:
            with open(p, "rb") as f:
                for block in iter(lambda f=f: f.read(1 << 22), b""):
                    digest.update(block)
                    out.write(block)
    records = sum(read_json(layout.chunk_json(split, c))["records"] for c in chunks)
    info = {"records": records, "bytes": final.stat().st_size, "sha256": digest.hexdigest()}
    atomic_write_json(layout.shard_json(size, split, j), info)
    for p in parts:
        p.unlink()
    return True


def lock(path: Path) -> IO[str]:
    """One conversion per OUT at a time; the kernel drops the lock if the process dies."""
    f = open(path, "w")  # noqa: SIM115 (held until the conversion ends)
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        raise UsageError(
            f"another conversion is writing to {path.parents[1]}", setting="out"
        ) from None
    return f
