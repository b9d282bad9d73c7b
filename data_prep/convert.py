"""The conversion engine every data_prep conversion command shares (kaggle, folder, and the
published sets: aptos, messidor2, idrid, ddr).

Listing → preprocessed (m2cnn_tf.preprocessing), encoded images → sharded TFRecords
(m2cnn_tf.records) + OUT/manifest.json. Streaming, parallel and resumable:

* the plan (data_prep.plan) fixes which record goes into which chunk and shard;
* workers (data_prep.worker, separate processes, no TensorFlow) decode, preprocess and encode
  one image at a time; the parent serializes Examples and writes each finished chunk as a part;
* an image that cannot be used is skipped in train; in val and test (`worker.KEEP_SPLITS`) an
  image is skipped only when it has no pixels at all, and one kept although imperfect (a
  truncated JPEG) is flagged in the manifest;
* every file comes into place whole (data_prep.layout); a chunk is done when its summary JSON
  exists. After kill -9 the same call redoes only unfinished chunks, and the deterministic
  pipeline makes the redone records byte-identical.

`convert` raises m2cnn_tf.errors types and reports through a `log` callable; it never exits.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from data_prep.executor import Executor
from data_prep.layout import (
    STATE,
    Layout,
    finalize_shard,
    lock,
    read_json,
    remove_temporaries,
    write_records,
)
from data_prep.manifest import summarize_skips, write_manifest
from data_prep.plan import conversion_key, make_plan, order_items
from data_prep.sources import Item, Listing, Skip
from data_prep.worker import KEEP_SPLITS, Encoded, Settings, check_image, encode_item
from m2cnn_tf.common import atomic_write_json
from m2cnn_tf.errors import Interrupted, RunFailed, UsageError
from m2cnn_tf.manifest import MANIFEST

Log = Callable[[str], None]


@dataclasses.dataclass(frozen=True)
class Result:
    """What a conversion wrote."""

    manifest: Path
    records: dict[str, int]  # per split
    skipped: int  # inputs left out, each listed with its reason in the manifest
    flagged: int = 0  # val/test images kept although imperfect, each listed in the manifest
    resumed: int = 0  # images an interrupted run had already converted
    excluded: int = 0  # left out by the dataset's protocol (ungradable), listed in the manifest
    already_complete: bool = False  # the same conversion was found finished; nothing redone


class BadInputs(RunFailed):
    """The strict mode found unusable inputs; nothing was written. `problems` lists them all."""

    def __init__(self, problems: list[Skip]):
        super().__init__(f"{len(problems)} bad input(s); nothing written", setting="strict")
        self.problems = problems


def convert(
    listing: Listing,
    out: str | os.PathLike,
    settings: Settings,
    *,
    tool: str = "data_prep",
    command: Sequence[str] | None = None,
    log: Log = print,
) -> Result:
    """Run or resume a conversion of `listing` into `out`.

    `tool` and `command` (default: this process's argv) are recorded in the manifest. Raises
    UsageError for an `out` that holds another conversion or no usable image, BadInputs (strict
    mode), Interrupted on Ctrl-C (the same call resumes), RunFailed when a file cannot be written.
    """
    command = list(sys.argv if command is None else command)
    try:
        return _convert(listing, Path(out), settings, tool, command, log)
    except KeyboardInterrupt:
        raise Interrupted("interrupted; run the same conversion again to resume") from None
    except OSError as e:
        raise RunFailed(str(e)) from e


def _convert(
    listing: Listing, out: Path, settings: Settings, tool: str, command: list[str], log: Log
) -> Result:
    started = time.time()
    by_split = order_items(listing.items, settings.seed)
    key = conversion_key(listing, settings, by_split)
    finished = _finished(out, key)
    if finished is not None:
        log(f"{out} is already complete (see {out / MANIFEST})")
        return finished
    plan = _unfinished_plan(out, key)
    if not by_split:
        reasons = summarize_skips([s.to_dict() for s in listing.skipped])
        raise UsageError(f"no usable images: {reasons or 'the label file has no rows'}")
    with Executor(settings) as executor:
        if settings.strict:  # every problem at once, so one fix-up round is enough
            _check_all(listing, by_split, settings, executor)
        (out / STATE).mkdir(parents=True, exist_ok=True)
        with lock(out / STATE / "lock"):
            if plan is None:
                plan = make_plan(by_split, settings, executor.map, key)
                atomic_write_json(out / STATE / "plan.json", plan)
            layout = Layout(out, plan)
            layout.mkdirs(settings.sizes)
            remove_temporaries(out)
            stats = _run_chunks(layout, by_split, settings, executor)
            seconds = time.time() - started
            timings = _timings(stats, seconds, settings.workers)
            manifest = write_manifest(
                layout, by_split, listing, settings, tool=tool, command=command, timings=timings
            )
            shutil.rmtree(layout.state, ignore_errors=True)
    result = _result(out, manifest, resumed=stats["reused"])
    _log_summary(result, manifest, settings, seconds, log)
    return result


def _timings(stats: dict[str, int], seconds: float, workers: int) -> dict[str, Any]:
    return {
        "this_run_seconds": round(seconds, 2),
        "this_run_images": stats["processed"],
        "this_run_images_per_second": round(stats["processed"] / max(seconds, 1e-9), 2),
        "resumed_images": stats["reused"],
        "workers": workers,
    }


def _result(out: Path, manifest: dict[str, Any], **kw: Any) -> Result:
    records = {split: c["records"] for split, c in manifest["counts"].items()}
    flagged = len(manifest.get("flagged", []))
    excluded = len(manifest.get("excluded", []))
    return Result(
        out / MANIFEST, records, len(manifest["skipped"]), flagged, excluded=excluded, **kw
    )


def _finished(out: Path, key: str) -> Result | None:
    """The result of this very conversion if `out` holds it finished; refuses another one."""
    path = out / MANIFEST
    if not path.exists():
        return None
    manifest = read_json(path)
    if manifest.get("key") != key:
        raise UsageError(
            f"{out} holds a finished conversion with other inputs or settings; choose another "
            "output folder",
            setting="out",
        )
    return _result(out, manifest, already_complete=True)


def _unfinished_plan(out: Path, key: str) -> dict[str, Any] | None:
    """The plan of an interrupted run of this conversion; refuses another one's leftovers."""
    plan_path = out / STATE / "plan.json"
    plan = read_json(plan_path) if plan_path.exists() else None
    if plan is not None and plan.get("key") != key:
        raise UsageError(
            f"{out} holds an unfinished conversion with other inputs or settings; run that "
            "conversion again to finish it, or choose another output folder",
            setting="out",
        )
    if plan is None and out.is_dir() and any(out.glob("*/*.tfrecord")):
        raise UsageError(f"{out} already holds TFRecords from another conversion", setting="out")
    return plan


def _progress(settings: Settings, total: int, initial: int, desc: str) -> Any:
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


def _check_all(
    listing: Listing, by_split: dict[str, list[Item]], settings: Settings, executor: Executor
) -> None:
    """Strict mode: decode every image before writing anything; BadInputs lists every problem."""
    problems = list(listing.skipped)
    flat = [it for items in by_split.values() for it in items]
    with _progress(settings, len(flat), 0, "checking") as bar:
        for item, reason in executor.map(check_image, flat, args=_path):
            if reason:
                problems.append(Skip(item.image_id, item.path, reason, item.split))
            bar.update(1)
    if problems:
        raise BadInputs(problems)


def _run_chunks(
    layout: Layout, by_split: dict[str, list[Item]], settings: Settings, executor: Executor
) -> dict[str, int]:
    """Convert every chunk not done yet; finish shards whose parts a kill left behind."""
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
                finalize_shard(layout, s, split, j)
    total = sum(len(v) for v in by_split.values())
    tasks = ((split, c, it) for split, c, members in todo for it in members)
    pending: dict[tuple[str, int], list[tuple[Item, Encoded | str]]] = {}
    sizes_of = {(split, c): len(members) for split, c, members in todo}
    processed = 0
    with _progress(settings, total, reused, "converting") as bar:
        for (split, c, item), result in executor.map(encode_item, tasks, args=_task_args):
            pending.setdefault((split, c), []).append((item, result))
            bar.update(1)
            processed += 1
            if len(pending[(split, c)]) == sizes_of[(split, c)]:
                _write_chunk(layout, settings, records, split, c, pending.pop((split, c)))
    return {"processed": processed, "reused": reused, "chunks_redone": len(todo)}


def _path(item: Item) -> tuple[str]:
    return (item.path,)


def _task_args(task: tuple[str, int, Item]) -> tuple[str, bool]:
    """encode_item's arguments: the path, and whether the image is kept if imperfect."""
    split, _, item = task
    return item.path, split in KEEP_SPLITS


def _write_chunk(
    layout: Layout,
    settings: Settings,
    records: Any,
    split: str,
    c: int,
    results: list[tuple[Item, Encoded | str]],
) -> None:
    """One chunk's parts at every size, then its summary (the chunk is done), then any shard
    this chunk completes."""
    grades: collections.Counter = collections.Counter()
    skipped, flagged = [], []
    per_size: dict[int, list[bytes]] = {s: [] for s in settings.sizes}
    for item, result in results:
        if isinstance(result, str):
            skipped.append(Skip(item.image_id, item.path, result, split).to_dict())
            continue
        if result.flag:
            flagged.append(Skip(item.image_id, item.path, result.flag, split).to_dict())
        grades[item.grade] += 1
        for s, data in result.images.items():
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
        write_records(layout.part(s, split, c), recs)
    summary = {
        "records": len(results) - len(skipped),
        "grades": {str(g): n for g, n in sorted(grades.items())},
        "skipped": skipped,
        "flagged": flagged,
    }
    atomic_write_json(layout.chunk_json(split, c), summary)
    for s in settings.sizes:
        finalize_shard(layout, s, split, layout.shard_of(s, c))


def _log_summary(
    result: Result, manifest: dict[str, Any], settings: Settings, seconds: float, log: Log
) -> None:
    """What was written, what was resumed, the listing's notes and what was skipped."""
    written = ", ".join(f"{split} {n}" for split, n in result.records.items())
    out = result.manifest.parent
    log(
        f"wrote {sum(result.records.values())} images ({written}) at sizes "
        f"{', '.join(map(str, settings.sizes))} to {out} in {seconds:.1f} s"
        + (f" (resumed: {result.resumed} images were already done)" if result.resumed else "")
    )
    for note in manifest["notes"]:
        log(f"note: {note}")
    if result.excluded:
        log(
            f"excluded {result.excluded} image(s) by the dataset's protocol: "
            f"{summarize_skips(manifest['excluded'])}; each is listed in {result.manifest}"
        )
    if result.flagged:
        log(
            f"kept {result.flagged} imperfect val/test image(s): "
            f"{summarize_skips(manifest['flagged'])}; each is flagged in {result.manifest}"
        )
    if result.skipped:
        log(
            f"skipped {result.skipped} input(s): {summarize_skips(manifest['skipped'])}; "
            f"each is listed in {result.manifest}"
        )
    else:
        log("no inputs skipped")
