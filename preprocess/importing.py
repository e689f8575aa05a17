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

import hashlib
import json
import multiprocessing as mp
import os
from dataclasses import dataclass

import numpy as np

from . import megatron
from .errors import UserError
from .fileio import NpyWriter, fsync_path
from .parallel import changed_input, input_stamp
from .shards import EXAMPLES_KEPT, FORMAT, FORMAT_VERSION, MANIFEST, ShardJob, copy_tokenizer, read_manifest, write_manifest
from .tokenizer import TextTokenizer, TokenizerInfo

FORMATS = ("megatron", "nanogpt")
SHARD_BYTES = 1 << 30  # of the token file per shard: the unit of hashing, verifying and parallel reading
SHARD_DOCUMENTS = 1 << 24  # documents per shard at most: a shard's offsets are held in memory while written
CHUNK = 1 << 24  # elements scanned at a time
ROUND_TRIP_DOCUMENTS, ROUND_TRIP_IDS = 32, 256  # the tokenizer check's sample: documents, and ids of each


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
    eot = tokenizer.eos_id if eot is None else eot
    if not 0 <= eot < min(tokenizer.vocab_size, 1 << 16):
        raise UserError(f"--eot {eot}: not an id below {min(tokenizer.vocab_size, 1 << 16):,} (the tokenizer has "
                        f"{tokenizer.vocab_size:,} ids; nanoGPT's are uint16)")
    return Foreign(fmt, path, path, np.dtype(np.uint16), [path], nanogpt_ends(path, eot), eot)


def nanogpt_ends(path: str, eot: int):
    """Every document of a nanoGPT file ends after an `eot` id (prepare.py appends one to each); ids after the
    last one make a last document without it."""
    ids = np.memmap(path, np.uint16, "r") if os.path.getsize(path) else np.zeros(0, np.uint16)
    last = 0
    for at in range(0, len(ids), CHUNK):
        ends = np.flatnonzero(np.asarray(ids[at:at + CHUNK]) == eot).astype(np.int64) + at + 1
        last = int(ends[-1]) if len(ends) else last
        yield ends
    if last < len(ids):
        yield np.array([len(ids)], np.int64)


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
    digest, low, high = hashlib.sha256(), None, None
    ids = np.memmap(bin_path, dtype, "r") if end > start else np.zeros(0, dtype)
    for at in range(start, end, CHUNK):
        block = np.asarray(ids[at:min(end, at + CHUNK)])
        digest.update(block.tobytes())
        i, j = int(np.argmin(block)), int(np.argmax(block))
        if low is None or block[i] < low[0]:
            low = (int(block[i]), at + i)
        if high is None or block[j] > high[0]:
            high = (int(block[j]), at + j)
    ends = np.load(offsets_path, mmap_mode="r") + start
    return {"sha256": digest.hexdigest(), "low": low, "high": high,
            "without_eos": int(np.count_nonzero(ids[ends - 1] != eos)) if len(ends) else 0}


def round_trip(foreign: Foreign, shards: list[Planned], out_dir: str, tokenizer: TokenizerInfo) -> dict:
    """Decode up to ROUND_TRIP_DOCUMENTS documents spread over the corpus (their first ROUND_TRIP_IDS ids, control
    symbols left out) and encode the text again: the tokenizer the ids were made with gives most of them back id
    for id, another one almost none."""
    tok = TextTokenizer(os.path.join(out_dir, tokenizer.file))
    ids = np.memmap(foreign.bin_path, foreign.dtype, "r")
    total = sum(s.documents for s in shards)
    count = min(total, ROUND_TRIP_DOCUMENTS)
    picked = [i * total // count for i in range(count)]
    tried = same = 0
    first = 0  # documents before the shard
    for shard in shards:
        offsets = None
        while picked and picked[0] < first + shard.documents:
            offsets = np.load(os.path.join(out_dir, shard.offsets["path"]), mmap_mode="r") if offsets is None \
                else offsets
            local = picked.pop(0) - first
            a = shard.start + (int(offsets[local - 1]) if local else 0)
            doc = [int(i) for i in ids[a:min(a + ROUND_TRIP_IDS, shard.start + int(offsets[local]))]]
            doc = [i for i in doc if not tok.is_control(i)]
            if doc:
                tried += 1
                same += tok.encode(tok.decode(doc)) == doc
        first += shard.documents
    return {"documents": tried, "identical": same}


def import_corpus(fmt: str, path: str, tokenizer: TokenizerInfo, out_dir: str, *, eot: int | None = None,
                  workers: int = 1, trust_tokenizer: bool = False) -> tuple[dict, bool]:
    """Write out_dir as a pretraining shard directory over `path`'s token file; (manifest, already done)."""
    foreign = open_foreign(fmt, path, tokenizer, eot)
    stamps = [input_stamp(p, False) for p in foreign.inputs]
    options = {"format": fmt, "shard_bytes": SHARD_BYTES, **({"eot": foreign.eot} if fmt == "nanogpt" else {})}
    plan = {"inputs": [s["path"] for s in stamps], "options": options, "tokenizer_sha256": tokenizer.sha256}
    plan_sha256 = hashlib.sha256(json.dumps(plan, sort_keys=True).encode()).hexdigest()
    if os.path.isfile(os.path.join(out_dir, MANIFEST)):
        previous = read_manifest(out_dir)
        if previous.get("plan_sha256") != plan_sha256:
            raise UserError(f"{out_dir}: holds another shard directory already; give an empty or new --out")
        if (changed := changed_input(previous["inputs"], stamps)) is not None:
            raise UserError(f"{out_dir}: imported before, but {changed} since; give a new --out")
        return previous, True
    os.makedirs(out_dir, exist_ok=True)
    copy_tokenizer(ShardJob(out_dir, "pretrain", tokenizer))
    link, how = link_into(foreign.bin_path, out_dir)

    skipped, examples = {}, []
    shards = list(write_offsets(out_dir, foreign, skipped, examples))
    if not shards:
        raise UserError(f"{path}: holds no document")
    args = [(foreign.bin_path, foreign.dtype.name, s.start, s.end, os.path.join(out_dir, s.offsets["path"]),
             tokenizer.eos_id) for s in shards]
    if workers > 1 and len(args) > 1:
        with mp.get_context("fork").Pool(min(workers, len(args))) as pool:
            scans = pool.starmap(scan_range, args, chunksize=1)
    else:
        scans = [scan_range(*a) for a in args]
    low = min((s["low"] for s in scans if s["low"]), default=None)
    high = max((s["high"] for s in scans if s["high"]), default=None)
    if low is not None and low[0] < 0:
        raise UserError(f"{foreign.bin_path}: id {low[0]} at element {low[1]:,} is negative")
    if high is not None and high[0] >= tokenizer.vocab_size:
        raise UserError(f"{foreign.bin_path}: id {high[0]:,} at element {high[1]:,} is past the vocabulary of "
                        f"{tokenizer.path} ({tokenizer.vocab_size:,} ids): the ids were made with another tokenizer")
    check = round_trip(foreign, shards, out_dir, tokenizer)
    if not trust_tokenizer and check["identical"] * 2 < check["documents"]:
        raise UserError(f"{tokenizer.path}: decoding and encoding again gave back {check['identical']} of "
                        f"{check['documents']} sampled documents of {path} (the tokenizer the ids were made with gives "
                        "back nearly all): give that one, or --trust-tokenizer to import anyway")
    without_eos = sum(s["without_eos"] for s in scans)
    item = foreign.dtype.itemsize
    records = [{"name": s.name, "documents": s.documents, "tokens": s.end - s.start,
                "files": {"tokens": {"path": link, "offset": s.start * item, "bytes": (s.end - s.start) * item,
                                     "sha256": scan["sha256"], "dtype": foreign.dtype.name,
                                     "file_bytes": os.path.getsize(foreign.bin_path)},
                          "offsets": s.offsets},
                "sources": [{"path": foreign.bin_path, "bytes": [s.start * item, s.end * item]}],
                "input_bytes": (s.end - s.start) * item, "skipped": {}, "skipped_examples": {}}
               for s, scan in zip(shards, scans, strict=True)]
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "kind": "pretrain",
        "plan_sha256": plan_sha256,
        "tokenizer": {"file": tokenizer.file, **tokenizer.to_json()},
        "dtype": foreign.dtype.name,
        "options": options,
        "imported": {"format": fmt, "from": path, "link": how, "eos_ends_documents": without_eos == 0,
                     "documents_without_eos": without_eos, "tokenizer_round_trip": check,
                     **({"tokenizer_trusted": True} if trust_tokenizer else {})},
        "inputs": stamps,
        "totals": {"shards": len(records), "documents": sum(r["documents"] for r in records),
                   "tokens": sum(r["tokens"] for r in records), "input_bytes": os.path.getsize(foreign.bin_path),
                   "skipped": sum(skipped.values())},
        "skipped": skipped,
        "skipped_examples": {"empty": examples} if examples else {},
        "shards": records,
    }
    write_manifest(out_dir, manifest)
    return manifest, False


def link_into(path: str, out_dir: str) -> tuple[str, str]:
    """The token file under its own name in out_dir, without a copy: a hard link where the filesystem allows one
    (the directory then holds the ids whatever becomes of the original name), else a symbolic link to its absolute
    path; (the name in out_dir, "hard" or "symbolic")."""
    name = os.path.basename(path)
    dst = os.path.join(out_dir, name)
    if os.path.lexists(dst):
        if os.path.exists(dst) and os.path.samefile(dst, path):
            return name, "symbolic" if os.path.islink(dst) else "hard"
        os.remove(dst)
    try:
        os.link(path, dst)
        how = "hard"
    except OSError:  # another filesystem, or one without hard links
        os.symlink(os.path.abspath(path), dst)
        how = "symbolic"
    fsync_path(out_dir)
    return name, how
