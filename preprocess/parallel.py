"""Work units and the worker pool: plan → skip completed units → run the rest in N processes → manifest.

Each unit (about `unit_bytes` of input) becomes exactly one shard, written by whichever worker takes it, so the
output depends only on inputs and options — not on the worker count, nor on a kill and re-run in between.
"""

from __future__ import annotations

import ctypes
import hashlib
import itertools
import json
import multiprocessing as mp
import os
import shutil
import signal
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass

from . import dedup as dd
from .encoders import Encoder, reference_backend
from .errors import UserError
from .fileio import atomic_write, file_sha256, remove_stale_tmp
from .group import StaticGroup
from .readers import Segment
from .shards import (
    MANIFEST,
    WORK_DIR,
    ShardJob,
    build_manifest,
    copy_tokenizer,
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


def model_template(job: ShardJob) -> dict:
    """A model's chat template and its options, which the documents depend on (shardlm's own is implied)."""
    identity = job.template_identity()
    return {"chat_template": identity} if "chat_template_sha256" in identity else {}


def make_plan(job: ShardJob, paths: list[str], segments: list[Segment], unit_bytes: int) -> Plan:
    units = group_units(segments, unit_bytes)
    width = max(5, len(str(len(units) - 1)))
    names = [f"shard-{i:0{width}d}" for i in range(len(units))]
    doc = {
        "kind": job.kind,
        "tokenizer_sha256": job.tokenizer.sha256,
        "tokenizer_special_ids": job.tokenizer.special_ids,  # a tokenizer.json's eos can come from its config
        "options": {"text_key": job.text_key, "txt_doc": job.txt_doc, "unit_bytes": unit_bytes,
                    # line mode once split at LF only: an output of that rule is not taken for this one's
                    **({"line_ends": "lf-crlf-cr"} if job.txt_doc == "line" else {}),
                    **({"max_len": job.max_len} if job.kind != "pretrain" else {}),
                    **model_template(job),
                    **({"dedup": job.dedup.options()} if job.dedup.on else {})},
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
    reference = reference_backend(job.tokenizer)
    _worker["reference"] = Encoder(job.tokenizer, reference) if job.encoder != reference else None


def _run_unit(task: tuple[str, list[Segment]]) -> dict:
    name, segments = task
    record = write_unit(_worker["job"], _worker["encoder"], name, segments, reference=_worker["reference"])
    _release_free_memory()
    return record


def _sign_unit(task: tuple[str, list[Segment]]) -> dict:
    name, segments = task
    return {"name": name, "input_bytes": dd.sign_unit(_worker["job"], name, segments)}


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


def run_units(job: ShardJob, tasks, workers: int, on_done, work=_run_unit) -> None:
    """Run work(task) for every task of the iterable in `workers` processes, keeping each busy; on_done(result)
    after each. The iterable is read only as workers free up, so it can hand out units on demand.

    A worker that dies (OOM killer, kill -9) fails the run with a clear error instead of hanging it."""
    tasks = iter(tasks)
    if workers == 1:
        _init_worker(job, in_process=True)
        for task in tasks:
            on_done(work(task))
        return
    pool = ProcessPoolExecutor(workers, mp_context=mp.get_context("fork"), initializer=_init_worker, initargs=(job,))
    try:
        pool.submit(int).result()  # every worker is forked now, before `tasks` is first read (it may start a thread)
        running = {pool.submit(work, task) for task in itertools.islice(tasks, workers)}
        while running:
            finished, running = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                on_done(future.result())
                running |= {pool.submit(work, task) for task in itertools.islice(tasks, 1)}
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
    duplicates = dd.load_summary(job.out_dir) if job.dedup.on else None
    manifest = build_manifest(job, plan.doc, plan.stamps, [records_by_name[n] for n in plan.names], duplicates)
    write_manifest(job.out_dir, manifest)
    shutil.rmtree(os.path.join(job.out_dir, WORK_DIR), ignore_errors=True)
    # left by killed runs: every shard file is final now, but another rank may still be writing the manifest
    remove_stale_tmp(job.out_dir, finished=lambda final: os.path.basename(final).startswith("shard-"))
    return manifest


def _ordered(tasks: list) -> list:
    return sorted(tasks, key=lambda t: -sum(s.size for s in t[1]))  # largest first, for an even finish


def find_duplicates(job: ShardJob, plan: Plan, workers: int, group, bar) -> None:
    """The first two passes of --dedup: every unit's signatures, then one resolution by rank 0 while the others
    wait (one process holds every signature), unless an earlier run got that far."""
    if dd.resolved(job.out_dir):
        return
    position = {n: i for i, n in enumerate(plan.names)}
    todo = [(n, u) for n, u in zip(plan.names, plan.units, strict=True) if not dd.signature_done(job.out_dir, n)]
    bar.reset(total=sum(s.size for _, u in todo for s in u) // max(1, group.world))
    bar.set_description("signatures")
    mine = group.tasks(_ordered(todo), position, "signatures")
    run_units(job, mine, workers, lambda r: bar.update(r["input_bytes"]), work=_sign_unit)
    group.wait_for(lambda: all(dd.signature_done(job.out_dir, n) for n in plan.names), "unit signatures")
    if group.rank == 0 and not dd.resolved(job.out_dir):
        bar.set_description("resolving duplicates")
        dd.resolve(job, plan.names, plan.units)
    group.wait_for(lambda: dd.resolved(job.out_dir), "duplicate resolution")


def build_shards(job: ShardJob, plan: Plan, workers: int, progress: bool = True,
                 group=None) -> tuple[dict | None, dict]:
    """Write the missing units (this rank's share: see preprocess.group), then the manifest once every unit of
    the plan is done. Returns (manifest, or None if other ranks are still at work; stats of this run)."""
    from tqdm import tqdm

    group = group or StaticGroup()
    done = prepare_out_dir(job, plan)
    if done is not None:
        _check_strict(job, done["skipped_examples"])
        return done, {"already_complete": True, "resumed_units": len(plan.names), "new_tokens": 0,
                      "new_documents": 0, "seconds": 0.0}
    copy_tokenizer(job)
    start = time.perf_counter()
    desc = "shards" if group.world == 1 else f"shards (rank {group.rank}/{group.world})"
    bar = tqdm(total=0, unit="B", unit_scale=True, desc=desc, disable=None if progress and group.rank == 0 else True)
    try:
        if job.dedup.on:
            find_duplicates(job, plan, workers, group, bar)
        records: dict[str, dict] = {}
        todo = []
        for name, unit in zip(plan.names, plan.units, strict=True):
            if (record := unit_is_complete(job, name)) is not None:
                records[name] = record
            else:
                todo.append((name, unit))
        for record in records.values():  # finished by an earlier run without --strict
            _check_strict(job, record["skipped_examples"])
        stats = {"resumed_units": len(records), "new_tokens": 0, "new_documents": 0, "reencoded": []}
        mine = group.tasks(_ordered(todo), {n: i for i, n in enumerate(plan.names)}, "shards")
        bar.reset(total=sum(s.size for _, u in todo for s in u) // (1 if group.dynamic else max(1, group.world)))
        bar.set_description(desc)
        written = time.perf_counter()

        def on_done(record: dict) -> None:
            if (where := record.pop("_reencoded", None)) is not None:
                stats["reencoded"].append(where)
            records[record["name"]] = record
            stats["new_tokens"] += record["tokens"]
            stats["new_documents"] += record["documents"]
            elapsed = max(time.perf_counter() - written, 1e-9)
            bar.set_postfix_str(f"{stats['new_documents'] / elapsed:,.0f} docs/s, "
                                f"{stats['new_tokens'] / elapsed:,.0f} tokens/s", refresh=False)
            bar.update(record["input_bytes"])

        run_units(job, mine, workers, on_done)
    finally:
        bar.close()
    stats["seconds"] = time.perf_counter() - start
    if group.dynamic:
        return _finish_together(job, plan, group, stats)
    if group.world > 1:  # the other ranks' units: complete only if every record is there
        for name in plan.names:
            if name not in records and (record := unit_is_complete(job, name)) is not None:
                records[name] = record
        if os.path.isfile(os.path.join(job.out_dir, MANIFEST)):  # another rank finished (and may be removing .work)
            return prepare_out_dir(job, plan), stats
        if len(records) < len(plan.names):
            stats["units_left"] = len(plan.names) - len(records)
            return None, stats
    return finish(job, plan, records), stats


def _finish_together(job: ShardJob, plan: Plan, group, stats: dict) -> tuple[dict | None, dict]:
    """MPI: every rank is done after the barrier; rank 0 writes the manifest and prints the one summary, with
    the totals of every rank's run."""
    group.barrier()
    every = group.gather(stats)
    manifest = None
    if group.rank == 0:
        records = {n: unit_is_complete(job, n) for n in plan.names}
        if missing := [n for n, r in records.items() if r is None]:
            raise UserError(f"{job.out_dir}: {missing[0]} and {len(missing) - 1} other units are missing after every "
                            "rank finished: is the output directory on a filesystem every rank shares?")
        manifest = finish(job, plan, records)
        stats = {**stats, "new_tokens": sum(s["new_tokens"] for s in every),
                 "new_documents": sum(s["new_documents"] for s in every),
                 "seconds": max(s["seconds"] for s in every), "ranks": group.world,
                 "reencoded": [w for s in every for w in s["reencoded"]]}
    group.barrier()  # the manifest exists before any rank returns
    return (manifest if group.rank == 0 else {"rank": group.rank}), stats


def _check_strict(job: ShardJob, skipped_examples: dict[str, list[str]]) -> None:
    if job.strict and skipped_examples:
        raise UserError(min(examples[0] for examples in skipped_examples.values()))
