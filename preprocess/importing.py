"""python -m preprocess import: another trainer's token files as a pretraining shard directory, never copied and
never re-tokenized.

A corpus already tokenized for Megatron (PREFIX.bin + PREFIX.idx) or nanoGPT (train.bin: headerless uint16 ids)
can be terabytes. The import leaves the ids where they are: the directory gets a link to the token file (a hard
link on the same filesystem, else a symbolic one), a manifest whose shards are byte ranges of it, each with its
sha256, each shard's document ends (offsets, written from the .idx or found at the end-of-text id), and a copy of
the tokenizer the ids belong to. Training, `verify`, `show` and `export` then read it as any shard directory.
What it costs is one read of the token file: every range is hashed and every id checked against the tokenizer's
vocabulary, by `--workers` processes.

The tokenizer is checked twice: every id must lie in its vocabulary, and decoding a sample of documents and
encoding them again must give back the same ids for most of them (another tokenizer of as large a vocabulary
does not).
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import json
import multiprocessing as mp
import os
import shutil
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass

import numpy as np

from . import megatron
from .errors import UserError
from .fileio import NpyWriter, atomic_write, fsync_path
from .parallel import changed_input, input_stamp
from .shards import EXAMPLES_KEPT, FORMAT, IMPORTED_VERSION, MANIFEST, ShardJob, copy_tokenizer, read_manifest, write_manifest
from .tokenizer import TextTokenizer, TokenizerInfo

FORMATS = ("megatron", "nanogpt")
SHARD_BYTES = 1 << 30  # of the token file per shard: the unit of hashing, verifying and parallel reading
SHARD_DOCUMENTS = 1 << 24  # documents per shard at most: a shard's offsets are held in memory while written
CHUNK = 1 << 24  # elements scanned at a time
ROUND_TRIP_WINDOWS, ROUND_TRIP_IDS = 16, 512  # the tokenizer check's sample: runs of the file, and ids of each
ROUND_TRIP_NEEDED = 0.97  # of the ids given back: the right tokenizer gives back over 0.99 (docs/preprocessing.md)
MARK = ".import.json"  # an unfinished import's plan: another import into the directory is refused


@dataclass
class Foreign:
    """Another trainer's corpus: its token file, element type, the files it was read from, and its documents'
    ends in elements (an iterator of int64 arrays, in order)."""
    format: str
    path: str  # as given: PREFIX or FILE
    bin_path: str
    dtype: np.dtype
    inputs: list[str]
    ends: object
    eot: int | None = None


def open_foreign(fmt: str, path: str, tokenizer: TokenizerInfo, eot: int | None) -> Foreign:
    if fmt == "megatron":
        if eot is not None:
            raise UserError("--eot is for nanogpt files; a Megatron index says where its documents end")
        index = megatron.read_index(path)
        return Foreign(fmt, path, index.bin_path, index.dtype, [index.prefix + ".idx", index.bin_path],
                       index.document_ends())
    if not os.path.isfile(path):
        raise UserError(f"{path}: not found")
    size = os.path.getsize(path)
    if size % 2:
        raise UserError(f"{path}: {size:,} bytes, an odd number: not nanoGPT's uint16 ids")
    what = "--eot" if eot is not None else "the tokenizer's eos, the default of --eot,"
    eot = tokenizer.eos_id if eot is None else eot
    if not 0 <= eot < min(tokenizer.vocab_size, 1 << 16):
        raise UserError(f"{what} {eot}: not an id below {min(tokenizer.vocab_size, 1 << 16):,} (the tokenizer has "
                        f"{tokenizer.vocab_size:,} ids; nanoGPT's are uint16)")
    return Foreign(fmt, path, path, np.dtype(np.uint16), [path], nanogpt_ends(path, eot), eot)


def nanogpt_ends(path: str, eot: int):
    """Every document of a nanoGPT file ends after an `eot` id (prepare.py appends one to each); ids after the
    last one make a last document without it. Read a chunk at a time (no map of the whole file)."""
    last = total = 0
    for at, block in file_blocks(path, np.dtype(np.uint16), 0, os.path.getsize(path) // 2):
        ends = np.flatnonzero(block == eot).astype(np.int64) + at + 1
        last, total = int(ends[-1]) if len(ends) else last, at + len(block)
        yield ends
    if last < total:
        yield np.array([total], np.int64)


def file_blocks(path: str, dtype: np.dtype, start: int, end: int):
    """(first element, elements) of [start, end) of a raw file, CHUNK elements at a time, read (not mapped: a file
    cut short while read is an error here, not a bus error)."""
    with open(path, "rb") as f:
        f.seek(start * dtype.itemsize)
        for at in range(start, end, CHUNK):
            want = (min(end, at + CHUNK) - at) * dtype.itemsize
            data = f.read(want)
            if len(data) != want:
                raise UserError(f"{path}: cut short while it was read (element {at + len(data) // dtype.itemsize:,} "
                                f"of {end:,}); was it changed during the import?")
            yield at, np.frombuffer(data, dtype)


@dataclass
class Planned:
    name: str
    start: int  # element of the token file
    end: int
    documents: int
    offsets: dict  # the offsets file's manifest entry


def write_offsets(out_dir: str, foreign: Foreign, skipped: dict, examples: list):
    """Cut the documents into shards of about SHARD_BYTES at document ends and write each one's offsets; empty
    documents are dropped and counted. Yields Planned, a shard at a time."""
    target = max(1, SHARD_BYTES // foreign.dtype.itemsize)
    start, before, count, pending = 0, 0, 0, []  # shard start, the end before, documents seen, this shard's ends
    number = 0

    def close(ends):
        nonlocal start, number
        name = f"shard-{number:05d}"
        with NpyWriter(os.path.join(out_dir, f"{name}.offsets.npy"), np.int64) as offsets:
            offsets.write(ends - start)
            meta = {"path": f"{name}.offsets.npy", **offsets.commit()}
        planned = Planned(name, start, int(ends[-1]), len(ends), meta)
        start, number = int(ends[-1]), number + 1
        return planned

    for chunk in foreign.ends:
        chunk = np.asarray(chunk, np.int64)
        if not len(chunk):
            continue
        previous = np.concatenate([[before], chunk[:-1]])
        empty = np.flatnonzero(chunk <= previous)
        for i in empty[:EXAMPLES_KEPT - len(examples)]:
            examples.append(f"{foreign.path}: document {count + int(i):,} is empty")
        skipped["empty"] = skipped.get("empty", 0) + len(empty)
        count, before = count + len(chunk), int(chunk[-1])
        chunk = chunk[chunk > previous]
        while len(chunk):
            held = sum(map(len, pending))
            cut = min(int(np.searchsorted(chunk, start + target)), SHARD_DOCUMENTS - held - 1)
            if cut >= len(chunk):
                pending.append(chunk)
                break
            yield close(np.concatenate([*pending, chunk[:cut + 1]]))
            pending, chunk = [], chunk[cut + 1:]
    if pending:
        yield close(np.concatenate(pending))


def scan_range(bin_path: str, dtype: str, start: int, end: int, offsets_path: str, eos: int) -> dict:
    """One shard's range of the token file: its sha256, its smallest and largest id (and where), and how many of its
    documents do not end with eos."""
    dtype = np.dtype(dtype)
    digest, low, high, without = hashlib.sha256(), None, None, 0
    ends = np.load(offsets_path) + start - 1  # the last element of each document
    for at, block in file_blocks(bin_path, dtype, start, end):
        digest.update(block)
        i, j = int(np.argmin(block)), int(np.argmax(block))
        if low is None or block[i] < low[0]:
            low = (int(block[i]), at + i)
        if high is None or block[j] > high[0]:
            high = (int(block[j]), at + j)
        last = ends[np.searchsorted(ends, at):np.searchsorted(ends, at + len(block))] - at
        without += int(np.count_nonzero(block[last] != eos))
    return {"sha256": digest.hexdigest(), "low": low, "high": high, "without_eos": without}


def round_trip(foreign: Foreign, tokenizer_path: str) -> dict:
    """Up to ROUND_TRIP_WINDOWS runs of ROUND_TRIP_IDS consecutive ids spread over the token file, their texts
    between control symbols (eos, ...) decoded and encoded again: how many ids come back in place (difflib's
    matching blocks; the ends of a run, where a character may be cut, aside). The tokenizer the ids were made
    with gives back nearly all of them."""
    tok = TextTokenizer(tokenizer_path)
    total = os.path.getsize(foreign.bin_path) // foreign.dtype.itemsize
    count = max(1, min(ROUND_TRIP_WINDOWS, total // ROUND_TRIP_IDS))
    ids = given = 0
    for w in range(count):
        start = w * max(0, total - ROUND_TRIP_IDS) // max(1, count - 1) if count > 1 else 0
        blocks = [b for _, b in file_blocks(foreign.bin_path, foreign.dtype, start, min(total, start + ROUND_TRIP_IDS))]
        run = [int(i) for b in blocks for i in b][2:-2]
        pieces, piece = [], []  # the texts between control symbols (eos, ...), each encoded on its own
        for i in run + [None]:
            if i is None or tok.is_control(i):
                pieces += [piece] if piece else []
                piece = []
            else:
                piece.append(i)
        for piece in pieces:
            again = tok.encode(tok.decode(piece).strip("\ufffd"))
            ids += len(piece)
            given += sum(m.size for m in difflib.SequenceMatcher(None, piece, again, autojunk=False)
                         .get_matching_blocks())
    return {"ids": ids, "given_back": given}


def import_corpus(fmt: str, path: str, tokenizer: TokenizerInfo, out_dir: str, *, eot: int | None = None,
                  workers: int = 1, trust_tokenizer: bool = False) -> tuple[dict, bool]:
    """Write out_dir as a pretraining shard directory over `path`'s token file; (manifest, already done). out_dir
    must be new, empty, or an unfinished import of the same plan (then done again); what a refused or failed
    import wrote is removed."""
    foreign = open_foreign(fmt, path, tokenizer, eot)
    stamps = [input_stamp(p, False) for p in foreign.inputs]
    options = {"format": fmt, "shard_bytes": SHARD_BYTES, **({"eot": foreign.eot} if fmt == "nanogpt" else {})}
    plan = {"inputs": [os.path.realpath(s["path"]) for s in stamps], "options": options,
            "tokenizer_sha256": tokenizer.sha256}
    plan_sha256 = hashlib.sha256(json.dumps(plan, sort_keys=True).encode()).hexdigest()
    if os.path.isfile(os.path.join(out_dir, MANIFEST)):
        previous = read_manifest(out_dir)
        if previous.get("plan_sha256") != plan_sha256:
            what = "another shard directory" if "imported" not in previous else \
                f"an import of {previous['imported']['from']} with other options or another tokenizer"
            raise UserError(f"{out_dir}: holds {what}; give an empty or new --out")
        if (changed := changed_input(previous["inputs"], stamps)) is not None:
            raise UserError(f"{out_dir}: imported before, but {changed} since; give a new --out")
        return previous, True
    claim(out_dir, plan_sha256)
    try:
        manifest = write_import(foreign, tokenizer, out_dir, workers, trust_tokenizer)
    except BaseException:
        discard(out_dir)
        raise
    manifest.update(plan_sha256=plan_sha256, options=options, inputs=stamps)
    write_manifest(out_dir, manifest)
    os.remove(os.path.join(out_dir, MARK))
    return manifest, False


def claim(out_dir: str, plan_sha256: str) -> None:
    """out_dir for this import: new or empty (a file of the user's is never overwritten), or left by an unfinished
    import of the same plan; marked as this import's until its manifest is written."""
    mark = os.path.join(out_dir, MARK)
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        try:
            with open(mark, encoding="utf-8") as f:
                ours = json.load(f).get("plan_sha256") == plan_sha256
        except (OSError, ValueError, AttributeError):
            ours = False
        if not ours:
            raise UserError(f"{out_dir}: not empty; an import writes a new or empty directory")
    os.makedirs(out_dir, exist_ok=True)
    atomic_write(mark, json.dumps({"plan_sha256": plan_sha256}).encode())


def discard(out_dir: str) -> None:
    """What an import that did not finish wrote: out_dir emptied (it held nothing of the user's: claim)."""
    for name in os.listdir(out_dir):
        target = os.path.join(out_dir, name)
        if os.path.isdir(target) and not os.path.islink(target):
            shutil.rmtree(target, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                os.remove(target)
    with contextlib.suppress(OSError):
        os.rmdir(out_dir)


def write_import(foreign: Foreign, tokenizer: TokenizerInfo, out_dir: str, workers: int,
                 trust_tokenizer: bool) -> dict:
    """The import's files, checked in the order that costs least first: the tokenizer on a sample, then every id
    while the ranges are hashed. The manifest without the plan's keys."""
    copy_tokenizer(ShardJob(out_dir, "pretrain", tokenizer))
    check = round_trip(foreign, os.path.join(out_dir, tokenizer.file))
    if not trust_tokenizer and check["given_back"] < ROUND_TRIP_NEEDED * check["ids"]:
        raise UserError(f"{tokenizer.path}: decoding {check['ids']:,} ids of {foreign.path} and encoding the text "
                        f"again gave back {check['given_back']:,} ({100 * check['given_back'] / check['ids']:.0f}%; "
                        "the tokenizer they were made with gives back over 99%): give that one, or "
                        "--trust-tokenizer to import anyway")
    link, how = link_into(foreign.bin_path, out_dir)
    skipped, examples = {}, []
    shards = list(write_offsets(out_dir, foreign, skipped, examples))
    if not shards:
        raise UserError(f"{foreign.path}: holds no document")
    size = os.path.getsize(foreign.bin_path)
    args = [(foreign.bin_path, foreign.dtype.name, s.start, s.end, os.path.join(out_dir, s.offsets["path"]),
             tokenizer.eos_id) for s in shards]
    if workers > 1 and len(args) > 1:
        try:  # a pool that notices a worker killed (out of memory, a file cut short under it) instead of waiting
            with ProcessPoolExecutor(min(workers, len(args)), mp_context=mp.get_context("fork")) as pool:
                scans = list(pool.map(scan_range, *zip(*args, strict=True)))
        except BrokenProcessPool:
            raise UserError(f"{foreign.bin_path}: a process reading it died (out of memory, or the file changed "
                            "during the import?)") from None
    else:
        scans = [scan_range(*a) for a in args]
    if os.path.getsize(foreign.bin_path) != size:
        raise UserError(f"{foreign.bin_path}: changed size during the import")
    low = min((s["low"] for s in scans if s["low"]), default=None)
    high = max((s["high"] for s in scans if s["high"]), default=None)
    if low is not None and low[0] < 0:
        raise UserError(f"{foreign.bin_path}: id {low[0]} at element {low[1]:,} is negative")
    if high is not None and high[0] >= tokenizer.vocab_size:
        raise UserError(f"{foreign.bin_path}: id {high[0]:,} at element {high[1]:,} is past the vocabulary of "
                        f"{tokenizer.path} ({tokenizer.vocab_size:,} ids): the ids were made with another tokenizer")
    without_eos = sum(s["without_eos"] for s in scans)
    item = foreign.dtype.itemsize
    records = [{"name": s.name, "documents": s.documents, "tokens": s.end - s.start,
                "files": {"tokens": {"path": link, "offset": s.start * item, "bytes": (s.end - s.start) * item,
                                     "sha256": scan["sha256"], "dtype": foreign.dtype.name, "file_bytes": size},
                          "offsets": s.offsets},
                "sources": [{"path": foreign.bin_path, "bytes": [s.start * item, s.end * item]}],
                "input_bytes": (s.end - s.start) * item, "skipped": {}, "skipped_examples": {}}
               for s, scan in zip(shards, scans, strict=True)]
    return {
        "format": FORMAT,
        "format_version": IMPORTED_VERSION,
        "kind": "pretrain",
        "plan_sha256": None,
        "tokenizer": {"file": tokenizer.file, **tokenizer.to_json()},
        "dtype": foreign.dtype.name,
        "options": None,
        "imported": {"format": foreign.format, "from": foreign.path, "link": how, "eos_ends_documents": without_eos == 0,
                     "documents_without_eos": without_eos, "tokenizer_round_trip": check,
                     **({"tokenizer_trusted": True} if trust_tokenizer else {})},
        "inputs": None,
        "totals": {"shards": len(records), "documents": sum(r["documents"] for r in records),
                   "tokens": sum(r["tokens"] for r in records), "input_bytes": size, "skipped": sum(skipped.values())},
        "skipped": skipped,
        "skipped_examples": {"empty": examples} if examples else {},
        "shards": records,
    }


def link_into(path: str, out_dir: str) -> tuple[str, str]:
    """The token file under its own name in out_dir (claimed: nothing of the user's there), without a copy: a hard
    link where the filesystem allows one, else a symbolic link to its absolute path; (the name, "hard" or
    "symbolic"). A hard link keeps the ids when the original name is removed or replaced by a new file, not when
    that file is rewritten in place (the same file): `verify` and a fresh run's re-hash see that."""
    name = os.path.basename(path)
    dst = os.path.join(out_dir, name)
    if os.path.lexists(dst):  # an unfinished import's
        os.remove(dst)
    try:
        os.link(path, dst)
        how = "hard"
    except OSError:  # another filesystem, or one without hard links
        os.symlink(os.path.abspath(path), dst)
        how = "symbolic"
    fsync_path(out_dir)
    return name, how
