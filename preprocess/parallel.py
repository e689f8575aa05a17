"""Work units and the worker pool: plan → skip completed units → run the rest in N processes → manifest.

Each unit (about `unit_bytes` of input) becomes exactly one shard, written by whichever worker takes it, so the
output depends only on inputs and options — not on the worker count, nor on a kill and re-run in between.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import multiprocessing as mp
import os
import shutil
import signal
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass

from .encoders import Encoder
from .errors import UserError
from .fileio import atomic_write, file_sha256, remove_stale_tmp
from .readers import Segment
from .shards import (
    MANIFEST,
    WORK_DIR,
    ShardJob,
    build_manifest,
    unit_is_complete,
    write_manifest,
    write_unit,
)

MiB = 1 << 20


def auto_unit_bytes(total_bytes: int) -> int:
    """About 512 units per corpus (even load on many workers), each 4–256 MiB (per-unit costs stay near 1%)."""
    return min(256 * MiB, max(4 * MiB, -(-total_bytes // 512 // MiB) * MiB))


def group_units(segments: list[Segment], unit_bytes: int) -> list[list[Segment]]:
    """Consecutive segments packed into units of up to unit_bytes (a larger segment is a unit of its own)."""
    units: list[list[Segment]] = []
    current, size = [], 0
    for seg in segments:
        if current and size + seg.size > unit_bytes:
            units.append(current)
            current, size = [], 0
        current.append(seg)
        size += seg.size
    if current:
        units.append(current)
    return units


@dataclass
class Plan:
    units: list[list[Segment]]
    names: list[str]
    doc: dict            # what the output depends on; its sha256 goes into the manifest
    stamps: list[dict]   # each input's path, size and modification time (and sha256 with --strict)

    @property
    def resume_key(self) -> dict:
        """A partial run is resumed, and a finished one reused, only if this matches exactly."""
        return {"plan_sha256": self.doc["sha256"], "inputs": self.stamps}


def input_stamp(path: str, content: bool) -> dict:
    st = os.stat(path)
    return {"path": path, "bytes": st.st_size, "mtime_ns": st.st_mtime_ns,
            **({"sha256": file_sha256(path)} if content else {})}


def changed_input(old: list[dict], new: list[dict]) -> str | None:
    """The first input whose stamp differs: by content where both stamps have it, else by size and time."""
    for a, b in zip(old, new, strict=True):
        if not isinstance(a, dict):
            return "the run was planned by an older version of this tool"
        if "sha256" in a and "sha256" in b:
            if a["sha256"] != b["sha256"]:
                return f"{b['path']} has other content"
        elif (a["bytes"], a.get("mtime_ns", b["mtime_ns"])) != (b["bytes"], b["mtime_ns"]):  # older: no time
            return f"{b['path']} was modified"
    return None


def make_plan(job: ShardJob, paths: list[str], segments: list[Segment], unit_bytes: int) -> Plan:
    units = group_units(segments, unit_bytes)
    width = max(5, len(str(len(units) - 1)))
    names = [f"shard-{i:0{width}d}" for i in range(len(units))]
    doc = {
        "kind": job.kind,
        "tokenizer_sha256": job.tokenizer.sha256,
        "options": {"text_key": job.text_key, "txt_doc": job.txt_doc, "unit_bytes": unit_bytes,
                    **({"max_len": job.max_len} if job.kind != "pretrain" else {})},
        "inputs": [{"path": p, "bytes": os.path.getsize(p)} for p in paths],
        "units": [[s.provenance() for s in unit] for unit in units],
    }
    doc["sha256"] = hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()
    return Plan(units, names, doc, [input_stamp(p, content=job.strict) for p in paths])


# ----------------------------------------------------------------------------------------------- workers

_worker: dict = {}


def _init_worker(job: ShardJob, in_process: bool = False) -> None:
    if not in_process:
        if sys.platform.startswith("linux"):  # die with the parent, so a killed job leaves no writers behind
            ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C
    _worker["job"], _worker["encoder"] = job, Encoder(job.tokenizer, job.encoder)


def _run_unit(task: tuple[str, list[Segment]]) -> dict:
    name, segments = task
    record = write_unit(_worker["job"], _worker["encoder"], name, segments)
    _release_free_memory()
    return record


def _release_free_memory() -> None:
    """Hand freed heap pages back to the OS after each unit: without it glibc keeps tokenizer buffers and a
    worker's RSS steps up by ~20 MB partway through a long run (docs/benchmarks.md)."""
    if "libc" not in _worker:
        try:
            _worker["libc"] = ctypes.CDLL("libc.so.6")
        except OSError:
            _worker["libc"] = None
    if _worker["libc"] is not None:
        _worker["libc"].malloc_trim(0)


def run_units(job: ShardJob, tasks: list[tuple[str, list[Segment]]], workers: int, on_done) -> None:
    """Run tasks (largest first, for an even finish) in `workers` processes; on_done(record) after each.

    A worker that dies (OOM killer, kill -9) fails the run with a clear error instead of hanging it."""
    tasks = sorted(tasks, key=lambda t: -sum(s.size for s in t[1]))
    workers = max(1, min(workers, len(tasks)))
    if workers == 1:
        _init_worker(job, in_process=True)
        for task in tasks:
            on_done(_run_unit(task))
        return
    pool = ProcessPoolExecutor(workers, mp_context=mp.get_context("fork"), initializer=_init_worker, initargs=(job,))
    try:
        for future in as_completed([pool.submit(_run_unit, task) for task in tasks]):
            on_done(future.result())
    except BrokenProcessPool:
        _stop(pool)
        raise UserError("a worker process died (killed, or out of memory?); re-run the same command to resume") from None
    except BaseException:
        _stop(pool)
        raise
    pool.shutdown()


def _stop(pool: ProcessPoolExecutor) -> None:
    """Stop at once: queued units are cancelled and running ones killed (a re-run redoes them)."""
    for process in list(getattr(pool, "_processes", {}).values()):
        process.kill()
    pool.shutdown(wait=False, cancel_futures=True)


# ------------------------------------------------------------------------------------------ orchestration

def prepare_out_dir(job: ShardJob, plan: Plan) -> dict | None:
    """Check the output directory against the plan. Returns the manifest if the job is already complete."""
    out = job.out_dir
    manifest_path = os.path.join(out, MANIFEST)
    plan_path = os.path.join(out, WORK_DIR, "plan.json")
    if os.path.isfile(manifest_path):
        with open(manifest_path, "rb") as f:
            manifest = json.load(f)
        if manifest.get("plan_sha256") == plan.doc["sha256"]:
            if (changed := changed_input(manifest["inputs"], plan.stamps)) is not None:
                raise UserError(f"{out}: holds shards of an earlier version of the inputs ({changed} since); "
                                "delete it or choose another --out")
            shutil.rmtree(os.path.join(out, WORK_DIR), ignore_errors=True)  # killed just after the manifest
            return manifest
        raise UserError(f"{out}: already holds shards made from other inputs or options; "
                        "choose another --out or delete it")
    if os.path.isfile(plan_path):
        with open(plan_path, "rb") as f:
            previous = json.load(f)
        if previous.get("plan_sha256") != plan.doc["sha256"]:
            raise UserError(f"{out}: holds an unfinished run of other inputs or options; delete it or choose "
                            "another --out")
        if (changed := changed_input(previous["inputs"], plan.stamps)) is not None:
            raise UserError(f"{out}: holds an unfinished run of an earlier version of the inputs ({changed} "
                            "since); delete it or choose another --out")
    elif os.path.isdir(out) and any(n.startswith("shard-") for n in os.listdir(out)):
        raise UserError(f"{out}: holds shard files but no manifest or plan; delete it or choose another --out")
    os.makedirs(os.path.join(out, WORK_DIR, "units"), exist_ok=True)
    atomic_write(plan_path, json.dumps(plan.resume_key).encode())  # every rank writes the same bytes
    return None


def finish(job: ShardJob, plan: Plan, records_by_name: dict[str, dict]) -> dict:
    manifest = build_manifest(job, plan.doc, plan.stamps, [records_by_name[n] for n in plan.names])
    write_manifest(job.out_dir, manifest)
    shutil.rmtree(os.path.join(job.out_dir, WORK_DIR), ignore_errors=True)
    # left by killed runs: every shard file is final now, but another rank may still be writing the manifest
    remove_stale_tmp(job.out_dir, finished=lambda final: os.path.basename(final).startswith("shard-"))
    return manifest


def build_shards(job: ShardJob, plan: Plan, workers: int, progress: bool = True, rank: int = 0,
                 world: int = 1) -> tuple[dict | None, dict]:
    """Write the missing units of this rank (unit i belongs to rank i % world), then the manifest if every
    unit of the plan is done — so whichever rank finishes last writes it, with no communication between ranks
    beyond the shared output directory. Returns (manifest or None, stats of this run)."""
    from tqdm import tqdm

    done = prepare_out_dir(job, plan)
    if done is not None:
        _check_strict(job, done["skipped_examples"])
        return done, {"already_complete": True, "resumed_units": len(plan.names), "new_tokens": 0,
                      "new_documents": 0, "seconds": 0.0}
    records: dict[str, dict] = {}
    todo = []
    for i, (name, unit) in enumerate(zip(plan.names, plan.units, strict=True)):
        record = unit_is_complete(job, name)
        if record is not None:
            records[name] = record
        elif i % world == rank:
            todo.append((name, unit))
    for record in records.values():  # finished by an earlier run without --strict
        _check_strict(job, record["skipped_examples"])
    stats = {"resumed_units": len(records), "new_tokens": 0, "new_documents": 0}
    start = time.perf_counter()
    mine = sum(s.size for _, unit in todo for s in unit)
    bar = tqdm(total=mine, unit="B", unit_scale=True, desc="shards" if world == 1 else f"shards (rank {rank}/{world})",
               disable=None if progress and rank == 0 else True)

    def on_done(record: dict) -> None:
        records[record["name"]] = record
        stats["new_tokens"] += record["tokens"]
        stats["new_documents"] += record["documents"]
        elapsed = max(time.perf_counter() - start, 1e-9)
        bar.set_postfix_str(f"{stats['new_documents'] / elapsed:,.0f} docs/s, {stats['new_tokens'] / elapsed:,.0f} tokens/s",
                            refresh=False)
        bar.update(record["input_bytes"])

    try:
        run_units(job, todo, workers, on_done)
    finally:
        bar.close()
    stats["seconds"] = time.perf_counter() - start
    if world > 1:  # the other ranks' units: complete only if every record is there
        for name in plan.names:
            if name not in records and (record := unit_is_complete(job, name)) is not None:
                records[name] = record
        if os.path.isfile(os.path.join(job.out_dir, MANIFEST)):  # another rank finished (and may be removing .work)
            return prepare_out_dir(job, plan), stats
        if len(records) < len(plan.names):
            stats["units_left"] = len(plan.names) - len(records)
            return None, stats
    return finish(job, plan, records), stats


def _check_strict(job: ShardJob, skipped_examples: dict[str, list[str]]) -> None:
    if job.strict and skipped_examples:
        raise UserError(min(examples[0] for examples in skipped_examples.values()))
