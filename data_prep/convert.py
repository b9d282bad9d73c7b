"""The conversion engine shared by data_prep.kaggle and data_prep.folder.

Listing → preprocessed (m2cnn_tf.preprocessing), encoded images → sharded TFRecords
(m2cnn_tf.records) + OUT/manifest.json. Streaming, parallel and resumable:

* Items are put in a seeded order per split and cut into fixed chunks; a shard of size S is
  the concatenation of a fixed run of chunks, so which record goes where never depends on
  timing, workers or interruptions.
* Workers (separate processes, no TensorFlow) decode, preprocess and encode one image at a
  time; the parent serializes Examples and writes each finished chunk as a part file.
* Every file is written under a temporary name and renamed when complete; a chunk is done
  when its summary JSON exists. After kill -9, the same command redoes only unfinished chunks,
  and the deterministic pipeline makes the redone records byte-identical.

State lives in OUT/.state/ and is removed once manifest.json is written.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import datetime as dt
import fcntl
import hashlib
import json
import multiprocessing
import os
import platform
import shutil
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from data_prep.sources import Item, Listing, Skip, UsageError
from data_prep.worker import SPLITS, Settings, check_image, encode_image, init_worker
from m2cnn_tf.preprocessing import PreprocessParams

STATE = ".state"
MANIFEST = "manifest.json"
PLAN_VERSION = 1
_PILOT_IMAGES = 8
_TASK_TIMEOUT = 300  # seconds; one image takes well under one
_FALLBACK_BYTES_PER_PIXEL = {"jpeg": 0.6, "png": 2.0}


# ---------------------------------------------------------------------------------------------
# Command line (shared by the two CLIs)


def default_workers() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def add_processing_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("processing (§II-A, Eq. (1))")
    g.add_argument("--sizes", default="224,448,720", help="output sizes, comma separated")
    g.add_argument("--base-size", type=int, default=720, help="resolution Eq. (1) runs at")
    g.add_argument("--alpha", type=float, default=4.0, help="Eq. (1) α")
    g.add_argument("--beta", type=float, default=-4.0, help="Eq. (1) β")
    g.add_argument("--rho", type=float, default=10.0, help="Eq. (1) ρ, in base-size pixels")
    g.add_argument("--gamma", type=float, default=128.0, help="Eq. (1) γ")
    g.add_argument("--no-mask", action="store_true", help="skip the 90%% circular mask")
    g.add_argument("--mask-fraction", type=float, default=0.9, help="mask radius / disc radius")
    o = parser.add_argument_group("output and execution")
    o.add_argument("--format", choices=("jpeg", "png"), default="jpeg", help="PNG is lossless")
    o.add_argument("--jpeg-quality", type=int, default=95)
    o.add_argument("--workers", type=int, default=default_workers(), help="processes")
    o.add_argument("--seed", type=int, default=0, help="split and record order")
    o.add_argument("--strict", action="store_true", help="any bad input: exit 1, write nothing")
    o.add_argument("--shard-mb", type=float, default=150.0, help="target shard size in MB")
    o.add_argument("--no-progress", action="store_true", help="no progress bar")


def settings_from_args(args: argparse.Namespace) -> Settings:
    try:
        sizes = tuple(sorted({int(s) for s in str(args.sizes).split(",") if s.strip()}))
    except ValueError:
        raise UsageError(f"--sizes must be integers like 224,448,720, got {args.sizes!r}") from None
    if not sizes or min(sizes) < 8:
        raise UsageError(f"--sizes must be integers of at least 8, got {args.sizes!r}")
    if max(sizes) > args.base_size:
        raise UsageError(
            f"size {max(sizes)} exceeds --base-size {args.base_size}: every size is resized "
            "from the base image, so raise --base-size"
        )
    if not 1 <= args.jpeg_quality <= 100:
        raise UsageError(f"--jpeg-quality must be 1–100, got {args.jpeg_quality}")
    if args.workers < 1:
        raise UsageError(f"--workers must be at least 1, got {args.workers}")
    if args.shard_mb <= 0:
        raise UsageError(f"--shard-mb must be positive, got {args.shard_mb}")
    try:
        params = PreprocessParams(
            alpha=args.alpha,
            beta=args.beta,
            rho=args.rho,
            gamma=args.gamma,
            mask=not args.no_mask,
            mask_fraction=args.mask_fraction,
            base_size=args.base_size,
        )
    except ValueError as e:
        raise UsageError(str(e)) from None
    return Settings(
        sizes=sizes,
        params=params,
        image_format=args.format,
        jpeg_quality=args.jpeg_quality,
        seed=args.seed,
        shard_mb=args.shard_mb,
        workers=args.workers,
        strict=args.strict,
        progress=not args.no_progress,
    )


def run_cli(prog: str, body: Callable[[], int]) -> int:
    """Usage errors → one line and exit 2; interruption → how to resume; no traceback walls."""
    try:
        return body()
    except UsageError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\n{prog}: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except OSError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 1


# ---------------------------------------------------------------------------------------------
# Execution


class _Executor:
    """Ordered map of an image path → result over worker processes, with a bounded window so
    memory stays flat however large the dataset. One worker runs in-process.

    Workers fork from a forkserver that imported only data_prep.worker: they never inherit
    TensorFlow (or its threads) from the parent, whatever the parent has imported.
    """

    def __init__(self, settings: Settings):
        self.workers = settings.workers
        self.pool = None
        if self.workers > 1:
            ctx = multiprocessing.get_context("forkserver")
            ctx.set_forkserver_preload(["data_prep.worker"])
            self.pool = ctx.Pool(self.workers, initializer=init_worker, initargs=(settings,))
        else:
            init_worker(settings, in_process=True)

    def map(
        self, fn: Callable[[str], Any], tasks: Iterable[Any], path: Callable[[Any], str]
    ) -> Iterator[tuple[Any, Any]]:
        """(task, fn(path(task))) in task order; only plain paths cross to the workers."""
        if self.pool is None:
            for task in tasks:
                yield task, fn(path(task))
            return
        window: collections.deque = collections.deque()
        for task in tasks:
            window.append((task, self.pool.apply_async(fn, (path(task),))))
            if len(window) >= 4 * self.workers:
                yield self._next(window)
        while window:
            yield self._next(window)

    @staticmethod
    def _next(window: collections.deque) -> tuple[Any, Any]:
        # A worker killed by a crashing decoder never answers; Pool would wait forever.
        head, result = window.popleft()
        try:
            return head, result.get(timeout=_TASK_TIMEOUT)
        except multiprocessing.TimeoutError:
            return head, f"worker crashed or took over {_TASK_TIMEOUT} s"

    def close(self) -> None:
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()


# ---------------------------------------------------------------------------------------------
# Files


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _write_json(path: Path, obj: Any) -> None:
    text = json.dumps(obj, indent=1, sort_keys=True, ensure_ascii=False) + "\n"
    _atomic_write_bytes(path, text.encode())


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text())


def _write_records(path: Path, records: list[bytes]) -> None:
    from tensorflow import io as tfio  # only the parent imports TensorFlow

    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    with tfio.TFRecordWriter(str(tmp)) as writer:
        for record in records:
            writer.write(record)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _remove_temporaries(root: Path) -> None:
    for path in root.rglob("*.tmp*"):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


# ---------------------------------------------------------------------------------------------
# Plan: the fixed assignment of items to chunks and of chunks to shards


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


def _make_plan(
    by_split: dict[str, list[Item]], settings: Settings, executor: _Executor, key: str
) -> dict[str, Any]:
    """Chunk length and chunks per shard from the encoded size of a few pilot images."""
    flat = [it for items in by_split.values() for it in items]
    step = max(1, len(flat) // _PILOT_IMAGES)
    pilot = [it.path for it in flat[::step][:_PILOT_IMAGES]]
    sizes_seen: dict[int, list[int]] = {s: [] for s in settings.sizes}
    for _, result in executor.map(encode_image, pilot, path=str):
        if isinstance(result, dict):
            for s, data in result.items():
                sizes_seen[s].append(len(data))
    est = {
        s: float(np.mean(v)) if v else _FALLBACK_BYTES_PER_PIXEL[settings.image_format] * s * s
        for s, v in sizes_seen.items()
    }
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
        "created_utc": _now(),
        "estimated_bytes_per_image": {str(s): round(v) for s, v in est.items()},
        "chunk_images": chunk,
        "chunks_per_shard": {str(s): k for s, k in per_shard.items()},
        "splits": splits,
    }


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


@dataclasses.dataclass
class _Layout:
    """Where every file of a conversion goes."""

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


def _finalize_shard(layout: _Layout, size: int, split: str, j: int) -> bool:
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
    tmp = final.with_name(f"{final.name}.tmp{os.getpid()}")
    digest = hashlib.sha256()
    with open(tmp, "wb") as out:
        for p in parts:
            with open(p, "rb") as f:
                for block in iter(lambda f=f: f.read(1 << 22), b""):
                    digest.update(block)
                    out.write(block)
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, final)
    records = sum(_read_json(layout.chunk_json(split, c))["records"] for c in chunks)
    info = {"records": records, "bytes": final.stat().st_size, "sha256": digest.hexdigest()}
    _write_json(layout.shard_json(size, split, j), info)
    for p in parts:
        p.unlink()
    return True


# ---------------------------------------------------------------------------------------------
# The conversion


def _summarize_skips(skipped: list[dict[str, str]]) -> str:
    counts = collections.Counter(s["reason"] for s in skipped)
    return ", ".join(f"{n} {reason}" for reason, n in counts.most_common())


def _print_problems(prog: str, problems: list[Skip]) -> None:
    print(f"{prog}: --strict: {len(problems)} bad input(s); nothing written:", file=sys.stderr)
    for p in problems[:20]:
        print(f"  {p.image_id or p.path}: {p.reason}", file=sys.stderr)
    if len(problems) > 20:
        print(f"  ... and {len(problems) - 20} more", file=sys.stderr)


def _progress(settings: Settings, total: int, initial: int, desc: str):
    from tqdm import tqdm

    return tqdm(
        total=total,
        initial=initial,
        unit="img",
        desc=desc,
        disable=not settings.progress,
        dynamic_ncols=True,
        smoothing=0.05,
        file=sys.stderr,
    )


def convert(
    listing: Listing,
    out: str | os.PathLike,
    settings: Settings,
    prog: str,
    argv: list[str] | None = None,
) -> int:
    """Run or resume a conversion; returns the process exit code."""
    command = ["python", "-m", prog, *(sys.argv[1:] if argv is None else argv)]
    out = Path(out)
    started = time.time()
    by_split = order_items(listing.items, settings.seed)
    key = hashlib.sha256(
        json.dumps(
            {
                "plan_version": PLAN_VERSION,
                "source": listing.source,
                "options": listing.options,
                "settings": settings.output_key(),
                "items": _items_digest(by_split),
            },
            sort_keys=True,
        ).encode()
    ).hexdigest()

    manifest_path = out / MANIFEST
    if manifest_path.exists():
        previous = _read_json(manifest_path)
        if previous.get("key") == key:
            print(f"{prog}: {out} is already complete (see {manifest_path})")
            return 0
        raise UsageError(
            f"{out} holds a finished conversion with other inputs or settings; use another --out"
        )
    plan_path = out / STATE / "plan.json"
    plan = _read_json(plan_path) if plan_path.exists() else None
    if plan is not None and plan.get("key") != key:
        raise UsageError(
            f"{out} holds an unfinished conversion with other inputs or settings; rerun that "
            "command to finish it, or use another --out"
        )
    if plan is None and out.is_dir() and any(out.glob("*/*.tfrecord")):
        raise UsageError(f"{out} already holds TFRecords from another conversion")
    if not by_split:
        raise UsageError(
            "no usable images: "
            + (
                _summarize_skips([s.to_dict() for s in listing.skipped])
                or "the label file has no rows"
            )
        )

    executor = _Executor(settings)
    try:
        if settings.strict:  # every problem at once, so one fix-up round is enough
            problems = list(listing.skipped)
            flat = [it for items in by_split.values() for it in items]
            with _progress(settings, len(flat), 0, "checking") as bar:
                for item, reason in executor.map(check_image, flat, path=_path):
                    if reason:
                        problems.append(Skip(item.image_id, item.path, reason, item.split))
                    bar.update(1)
            if problems:
                _print_problems(prog, problems)
                return 1
        (out / STATE).mkdir(parents=True, exist_ok=True)
        lock = _lock(out / STATE / "lock")
        if plan is None:
            plan = _make_plan(by_split, settings, executor, key)
            _write_json(plan_path, plan)
        layout = _Layout(out, plan)
        layout.mkdirs(settings.sizes)
        _remove_temporaries(out)
        stats = _run_chunks(layout, by_split, settings, executor)
    finally:
        executor.close()
    code = _write_manifest(layout, by_split, listing, settings, key, started, stats, command)
    lock.close()
    return code


def _lock(path: Path) -> Any:
    """One conversion per OUT at a time; the kernel drops the lock if the process dies."""
    f = open(path, "w")  # noqa: SIM115 (held until the conversion ends)
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        raise UsageError(f"another conversion is writing to {path.parents[1]}") from None
    return f


def _run_chunks(
    layout: _Layout, by_split: dict[str, list[Item]], settings: Settings, executor: _Executor
) -> dict[str, int]:
    from m2cnn_tf import records  # TensorFlow: parent only, after the workers started

    chunk_len = layout.plan["chunk_images"]
    todo: list[tuple[str, int, list[Item]]] = []
    reused = 0
    for split, items in by_split.items():
        for c in range(layout.plan["splits"][split]["chunks"]):
            members = items[c * chunk_len : (c + 1) * chunk_len]
            if layout.chunk_done(settings.sizes, split, c):
                reused += len(members)
            else:
                todo.append((split, c, members))
        for s in settings.sizes:  # a kill between the last part and its shard
            for j in range(layout.plan["splits"][split]["shards"][str(s)]):
                _finalize_shard(layout, s, split, j)
    total = sum(len(v) for v in by_split.values())
    tasks = ((split, c, it) for split, c, members in todo for it in members)
    pending: dict[tuple[str, int], list[tuple[Item, dict[int, bytes] | str]]] = {}
    sizes_of = {(split, c): len(members) for split, c, members in todo}
    processed = 0
    with _progress(settings, total, reused, "converting") as bar:
        for (split, c, item), result in executor.map(encode_image, tasks, path=_task_path):
            pending.setdefault((split, c), []).append((item, result))
            bar.update(1)
            processed += 1
            if len(pending[(split, c)]) == sizes_of[(split, c)]:
                _write_chunk(layout, settings, records, split, c, pending.pop((split, c)))
    return {"processed": processed, "reused": reused, "chunks_redone": len(todo)}


def _path(item: Item) -> str:
    return item.path


def _task_path(task: tuple[str, int, Item]) -> str:
    return task[2].path


def _write_chunk(
    layout: _Layout,
    settings: Settings,
    records: Any,
    split: str,
    c: int,
    results: list[tuple[Item, dict[int, bytes] | str]],
) -> None:
    grades: collections.Counter = collections.Counter()
    skipped = []
    per_size: dict[int, list[bytes]] = {s: [] for s in settings.sizes}
    for item, result in results:
        if isinstance(result, str):
            skipped.append(Skip(item.image_id, item.path, result, split).to_dict())
            continue
        grades[item.grade] += 1
        for s, data in result.items():
            per_size[s].append(
                records.make_example(
                    data,
                    image_format=settings.image_format,
                    height=s,
                    width=s,
                    grade=item.grade,
                    image_id=item.image_id,
                    patient=item.patient,
                    eye=item.eye,
                )
            )
    for s, recs in per_size.items():
        _write_records(layout.part(s, split, c), recs)
    summary = {
        "records": len(results) - len(skipped),
        "grades": {str(g): n for g, n in sorted(grades.items())},
        "skipped": skipped,
    }
    _write_json(layout.chunk_json(split, c), summary)
    for s in settings.sizes:
        _finalize_shard(layout, s, split, layout.shard_of(s, c))


def _versions() -> dict[str, str]:
    import PIL
    import tensorflow as tf

    import m2cnn_tf

    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "m2cnn_tf": m2cnn_tf.__version__,
        "numpy": np.__version__,
        "opencv": cv2.__version__,
        "pillow": PIL.__version__,
        "tensorflow": tf.__version__,
    }


def _write_manifest(
    layout: _Layout,
    by_split: dict[str, list[Item]],
    listing: Listing,
    settings: Settings,
    key: str,
    started: float,
    stats: dict[str, int],
    command: list[str],
) -> int:
    prog = command[2]
    plan = layout.plan
    skipped = [s.to_dict() for s in listing.skipped]
    counts: dict[str, dict[str, Any]] = {}
    for split in by_split:
        grades: collections.Counter = collections.Counter()
        total = 0
        for c in range(plan["splits"][split]["chunks"]):
            chunk = _read_json(layout.chunk_json(split, c))
            grades.update({int(g): n for g, n in chunk["grades"].items()})
            total += chunk["records"]
            skipped.extend(chunk["skipped"])
        counts[split] = {"records": total, "grades": {str(g): grades[g] for g in range(5)}}
    shards: dict[str, list[dict[str, Any]]] = {}
    for s in settings.sizes:
        shards[str(s)] = []
        for split in by_split:
            for j in range(plan["splits"][split]["shards"][str(s)]):
                if not _finalize_shard(layout, s, split, j):
                    raise RuntimeError(f"shard {layout.shard(s, split, j)} incomplete")
                info = _read_json(layout.shard_json(s, split, j))
                path = layout.shard(s, split, j).relative_to(layout.out).as_posix()
                shards[str(s)].append({"path": path, "split": split, **info})
    seconds = time.time() - started
    manifest = {
        "key": key,
        "tool": prog,
        "command": command,
        "source": listing.source,
        "params": {
            **settings.output_key(),
            **listing.options,
            "chunk_images": plan["chunk_images"],
            "chunks_per_shard": plan["chunks_per_shard"],
            "estimated_bytes_per_image": plan["estimated_bytes_per_image"],
        },
        "counts": counts,
        "shards": shards,
        "skipped": skipped,
        "skipped_summary": dict(collections.Counter(s["reason"] for s in skipped)),
        "notes": listing.notes,
        "timings": {
            "first_started_utc": plan["created_utc"],
            "finished_utc": _now(),
            "this_run_seconds": round(seconds, 2),
            "this_run_images": stats["processed"],
            "this_run_images_per_second": round(stats["processed"] / max(seconds, 1e-9), 2),
            "resumed_images": stats["reused"],
            "workers": settings.workers,
        },
        "versions": _versions(),
    }
    _write_json(layout.out / MANIFEST, manifest)
    shutil.rmtree(layout.state, ignore_errors=True)

    written = ", ".join(f"{sp} {c['records']}" for sp, c in counts.items())
    total = sum(c["records"] for c in counts.values())
    print(
        f"{prog}: wrote {total} images ({written}) at sizes "
        f"{', '.join(map(str, settings.sizes))} to {layout.out} in {seconds:.1f} s"
        + (f" (resumed: {stats['reused']} images were already done)" if stats["reused"] else "")
    )
    for note in listing.notes:
        print(f"{prog}: note: {note}")
    if skipped:
        print(
            f"{prog}: skipped {len(skipped)} input(s): {_summarize_skips(skipped)}; "
            f"each is listed in {layout.out / MANIFEST}"
        )
    else:
        print(f"{prog}: no inputs skipped")
    return 0
