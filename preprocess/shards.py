"""Token shards: writing one work unit, assembling the manifest, verifying a shard directory.

Layout of a shard directory (docs/formats.md is the reference):
    manifest.json                  what is here, with sizes and sha256 of every file
    tokenizer.model                copy of the tokenizer the ids belong to
    shard-NNNNN.tokens.npy         1-D uint16/uint32 token ids; every document ends with eos
    shard-NNNNN.offsets.npy        1-D int64 cumulative document ends into the tokens
    shard-NNNNN.mask.npy           sft, dpo, kto: 1-D uint8 loss mask aligned with the tokens
    shard-NNNNN.fields.npy         prompts: 1-D uint8, each document's record as one line of UTF-8 JSON
    shard-NNNNN.field_ends.npy     prompts: 1-D int64 cumulative ends of those lines
"""

from __future__ import annotations

import contextlib
import datetime
import glob
import json
import os
import time
from dataclasses import dataclass

import numpy as np

from . import dedup as dd
from .chat_template import ModelTemplate, previous_date, template_for, uses_date
from .encoders import Encoder, first_difference
from .errors import UserError
from .fileio import TMP_MARK, NpyWriter, atomic_write, copy_durably, file_sha256, fsync_path
from .formats import KINDS as KIND_CLASSES
from .formats import parsed_records
from .readers import REASONS, Bad, Segment
from .tokenizer import TokenizerInfo

FORMAT = "shardlm.shards"
FORMAT_VERSION = 1
IMPORTED_VERSION = 2  # a directory over another trainer's token file (preprocess import): ranges of a raw file
MANIFEST = "manifest.json"
WORK_DIR = ".work"  # plan and per-unit records of an unfinished run; removed when the manifest is written
KINDS = tuple(KIND_CLASSES)
EXAMPLES_KEPT = 5  # locations kept per skip reason
BATCH_CHARS = 1 << 20  # text per sentencepiece call: amortises the call, bounds memory
BATCH_DOCS = 4096


@dataclass
class ShardJob:
    """Everything a worker needs to turn a unit into shard files; identical on every worker and rank."""
    out_dir: str
    kind: str
    tokenizer: TokenizerInfo
    text_key: str = "text"
    txt_doc: str = "file"
    strict: bool = False
    max_len: int = 2048  # sft/dpo: longer examples are dropped and counted
    encoder: str = "sentencepiece"  # which backend computes the ids (the same ids: not part of the plan)
    dedup: dd.Dedup = dd.Dedup()
    chat_template: str | None = None  # a file overriding the tokenizer.json's chat template
    chat_template_kwargs: dict | None = None  # the template's options (enable_thinking, ...); None: as saved
    chat_template_date: str | None = None  # what strftime_now tells a template that writes the date (ISO)

    def make_kind(self, encoder: Encoder | None = None):
        return KIND_CLASSES[self.kind](encoder, self.text_key, self.max_len, self.template())

    def template(self):
        """The chat template of a chat kind (None for pretraining): the tokenizer.json's model's, or ours. Prompts
        need one only for their message lists: without one, those are refused one by one (plain text is not)."""
        if self.kind == "pretrain":
            if self.chat_template or self.chat_template_kwargs is not None:
                raise UserError("--chat-template and --chat-template-kwargs are for chat kinds (sft, dpo, kto, "
                                "prompts)")
            return None
        try:
            return template_for(self.tokenizer, self.chat_template, self.chat_template_kwargs, self.chat_template_date)
        except UserError as e:
            if self.kind != "prompts" or self.chat_template:
                raise
            return NoTemplate(str(e))

    def template_identity(self) -> dict:
        """What the manifest and the plan record of the template (nothing for pretraining, or without one)."""
        template = self.template()
        return template.identity() if template is not None else {}

    def unit_record_path(self, name: str) -> str:
        return os.path.join(self.out_dir, WORK_DIR, "units", f"{name}.json")


class NoTemplate:
    """A tokenizer without a chat template, for prompts: plain ones are continued, message lists refused."""

    def __init__(self, why: str):
        self.why = why

    def identity(self) -> dict:
        return {"template": "none"}

    def prompt_ids(self, turns, encode=None):
        raise UserError(self.why)


def begun_date(job: ShardJob) -> str | None:
    """The date a model's template that writes today's date (strftime_now) renders this job's documents with: an
    earlier run's into the same directory, else the one the first of the job's ranks to get here recorded (an
    exclusive create in .work: ranks that start either side of midnight agree), else today's."""
    template = job.template()
    if not isinstance(template, ModelTemplate) or not uses_date(template.source):
        return None
    if day := previous_date(template, job.out_dir):
        return day
    today = datetime.date.today().isoformat()
    if os.path.isfile(os.path.join(job.out_dir, MANIFEST)):  # a finished job of another template: refused later
        return today
    work = os.path.join(job.out_dir, WORK_DIR)
    os.makedirs(work, exist_ok=True)
    path = os.path.join(work, "chat_template_date")
    try:
        with open(path, "x", encoding="utf-8") as f:
            f.write(today)
        return today
    except FileExistsError:
        for _ in range(100):  # another rank's write in progress
            with open(path, encoding="utf-8") as f:
                if day := f.read().strip():
                    return day
            time.sleep(0.05)
        raise UserError(f"{path}: empty; delete it and run again") from None


def shard_files(name: str, has_mask: bool, has_fields: bool = False) -> dict[str, str]:
    files = {"tokens": f"{name}.tokens.npy", "offsets": f"{name}.offsets.npy"}
    if has_mask:
        files["mask"] = f"{name}.mask.npy"
    if has_fields:
        files["fields"], files["field_ends"] = f"{name}.fields.npy", f"{name}.field_ends.npy"
    return files


def format_skip(where: str, bad: Bad) -> str:
    return f"{bad.where or where}: {REASONS[bad.reason]}" + (f" ({bad.detail})" if bad.detail else "")


def encoder_sample(job: ShardJob, segments: list[Segment], budget_chars: int = 1 << 20,
                   spread: int = 16) -> list[tuple[str, object]]:
    """(text, where) pairs the encoder would see, from up to `spread` segments evenly spaced over the job (where()
    names the record's file and line): what an encoder is checked on before it may write this job's shards."""
    kind = job.make_kind()
    picked = segments if len(segments) <= spread else [segments[i * len(segments) // spread] for i in range(spread)]
    sample = []
    for seg in picked:
        taken = 0
        for _, _, parsed, where in parsed_records(kind, [seg], job.txt_doc):
            if isinstance(parsed, Bad):
                continue
            sample += [(text, where) for text in kind.texts(parsed)]
            taken += kind.size(parsed)
            if taken >= budget_chars // len(picked):
                break
    return sample


SPOT_CHECK_CHARS = 1 << 15  # of every unit, encoded by the reference too when the fast encoder writes it


def spot_check(kind, batch: list, fast: Encoder, reference: Encoder, places: list) -> str | None:
    """Where the fast encoder differs from the reference on the first texts of a unit's first batch."""
    texts, where, size = [], [], 0
    for parsed, place in zip(batch, places, strict=True):
        for text in kind.texts(parsed):
            texts.append(text[:SPOT_CHECK_CHARS - size])  # both encoders get the same (possibly cut) string
            where.append(place)
            size += len(texts[-1])
            if size >= SPOT_CHECK_CHARS:
                break
        if size >= SPOT_CHECK_CHARS:
            break
    return first_difference(texts, where, fast, reference)


def write_unit(job: ShardJob, encoder: Encoder, name: str, segments: list[Segment],
               reference: Encoder | None = None) -> dict:
    """Tokenize one unit into its shard files and return its record (also saved under .work/units/).

    With a `reference` (the fast encoder is writing), the unit's first texts are encoded by both; if they
    differ, the whole unit is written by the reference, and the returned record (not the saved one) says where
    under "_reencoded"."""
    kind = job.make_kind(encoder)
    reencoded = None
    files = shard_files(name, kind.has_mask, kind.has_fields)
    for path in files.values():  # left by a killed run (this unit is only ever written by this rank)
        for stale in glob.glob(os.path.join(glob.escape(job.out_dir), glob.escape(path) + TMP_MARK + "*")):
            os.unlink(stale)
    skipped: dict[str, int] = {}
    examples: dict[str, list[str]] = {}
    doc_lengths: list[np.ndarray] = []
    num_tokens = 0
    drops = dd.unit_drops(job.out_dir, name) if job.dedup.on else {}
    duplicates = dict.fromkeys(dd.KINDS[:1 + (job.dedup.mode == "near")], 0)
    ordinal = -1  # of the usable documents, as the signature pass counts them

    def skip(bad: Bad, where) -> None:
        if job.strict:
            raise UserError(format_skip(where(), bad))
        skipped[bad.reason] = skipped.get(bad.reason, 0) + 1
        kept = examples.setdefault(bad.reason, [])
        if len(kept) < EXAMPLES_KEPT:
            kept.append(format_skip(where(), bad))

    with contextlib.ExitStack() as stack:
        path = lambda key: os.path.join(job.out_dir, files[key])  # noqa: E731
        tokens = stack.enter_context(NpyWriter(path("tokens"), job.tokenizer.dtype))
        masks = stack.enter_context(NpyWriter(path("mask"), np.uint8)) if kind.has_mask else None
        fields = stack.enter_context(NpyWriter(path("fields"), np.uint8)) if kind.has_fields else None
        field_lengths: list[int] = []
        batch: list = []
        places: list = []
        batch_chars = 0

        def flush():
            nonlocal batch, places, batch_chars, num_tokens, reference, reencoded
            if reference is not None:  # the unit's first batch
                if (diff := spot_check(kind, batch, encoder, reference, places)) is not None:
                    kind.encoder, reencoded = reference, diff
                reference = None
            ids, mask, lengths, bad = kind.build(batch)
            for i, b in bad:
                skip(b, places[i])
            tokens.write(ids)
            if masks is not None:
                masks.write(mask)
            if fields is not None:
                lines = kind.fields(batch, bad, places)
                fields.write(np.frombuffer(b"".join(lines), np.uint8))
                field_lengths.extend(len(line) for line in lines)
            doc_lengths.append(lengths)
            num_tokens += len(ids)
            batch, places, batch_chars = [], [], 0

        for _, _, parsed, where in parsed_records(kind, segments, job.txt_doc):
            if isinstance(parsed, Bad):
                skip(parsed, where)
                continue
            ordinal += 1
            if ordinal in drops:
                duplicates[drops[ordinal]] += 1
                continue
            batch.append(parsed)
            places.append(where)
            batch_chars += kind.size(parsed)
            if batch_chars >= BATCH_CHARS or len(batch) >= BATCH_DOCS:
                flush()
        if batch:
            flush()
        lengths = np.concatenate(doc_lengths) if doc_lengths else np.empty(0, np.int64)
        with NpyWriter(path("offsets"), np.int64) as offsets:
            offsets.write(np.cumsum(lengths, dtype=np.int64))
            metas = {"offsets": offsets.commit()}
        if masks is not None:
            metas["mask"] = masks.commit()
        if fields is not None:
            with NpyWriter(path("field_ends"), np.int64) as ends:
                ends.write(np.cumsum(np.array(field_lengths, dtype=np.int64)))
                metas["field_ends"] = ends.commit()
            metas["fields"] = fields.commit()
        metas["tokens"] = tokens.commit()
    fsync_path(job.out_dir)

    record = {
        "name": name,
        "documents": int(len(lengths)),
        "tokens": int(num_tokens),
        "files": {key: {"path": files[key], **metas[key]} for key in files},
        "sources": [seg.provenance() for seg in segments],
        "input_bytes": sum(seg.size for seg in segments),
        "skipped": dict(sorted(skipped.items())),
        "skipped_examples": dict(sorted(examples.items())),
        **({"duplicates": duplicates} if job.dedup.on else {}),
    }
    atomic_write(job.unit_record_path(name), json.dumps(record).encode())
    return {**record, "_reencoded": reencoded} if reencoded else record


def copy_tokenizer(job: ShardJob) -> None:
    """The tokenizer next to the shards, under its kind's name (with a tokenizer.json's config); only into a
    directory the plan has accepted, so a refused --out keeps its own."""
    from .tokenizer import tokenizer_files

    main, *others = tokenizer_files(job.tokenizer.path)
    dst = os.path.join(job.out_dir, job.tokenizer.file)
    if not (os.path.exists(dst) and file_sha256(dst) == job.tokenizer.sha256):
        copy_durably(main, dst)
    for path in others:
        copy_durably(path, os.path.join(job.out_dir, os.path.basename(path)))
    template = job.template()
    if isinstance(template, ModelTemplate):  # a model's template: it and its options travel with the tokenizer
        template.save(job.out_dir)


def unit_is_complete(job: ShardJob, name: str) -> dict | None:
    """The unit's record if its files are all in place (cheap: sizes only), else None."""
    try:
        with open(job.unit_record_path(name), "rb") as f:
            record = json.load(f)
    except (OSError, ValueError):
        return None
    for meta in record["files"].values():
        path = os.path.join(job.out_dir, meta["path"])
        if not os.path.isfile(path) or os.path.getsize(path) != meta["bytes"]:
            return None
    return record


def build_manifest(job: ShardJob, plan: dict, stamps: list[dict], records: list[dict],
                   duplicates: dict | None = None) -> dict:
    """`duplicates`: the dedup resolution's counts and examples, when --dedup is on."""
    skipped: dict[str, int] = {}
    examples: dict[str, list[str]] = {}
    for r in records:
        for reason, n in r["skipped"].items():
            skipped[reason] = skipped.get(reason, 0) + n
            kept = examples.setdefault(reason, [])
            kept.extend(r["skipped_examples"][reason][: EXAMPLES_KEPT - len(kept)])
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "kind": job.kind,
        "plan_sha256": plan["sha256"],
        "tokenizer": {"file": job.tokenizer.file, **job.tokenizer.to_json()},
        "dtype": job.tokenizer.dtype.name,
        **job.template_identity(),
        "options": plan["options"],
        "inputs": stamps,  # path, bytes, mtime_ns (and sha256 with --strict): a re-run sees what changed
        "totals": {
            "shards": len(records),
            "documents": sum(r["documents"] for r in records),
            "tokens": sum(r["tokens"] for r in records),
            "input_bytes": sum(r["input_bytes"] for r in records),
            "skipped": sum(skipped.values()),
        },
        "skipped": dict(sorted(skipped.items())),
        "skipped_examples": dict(sorted(examples.items())),
        **({"duplicates": {k: sum(r["duplicates"][k] for r in records) for k in duplicates["duplicates"]},
            "duplicate_examples": duplicates["duplicate_examples"]} if duplicates else {}),
        "shards": records,
    }


def write_manifest(out_dir: str, manifest: dict) -> None:
    atomic_write(os.path.join(out_dir, MANIFEST), (json.dumps(manifest, indent=1, ensure_ascii=False) + "\n").encode())
    fsync_path(out_dir)


def read_manifest(out_dir: str) -> dict:
    path = os.path.join(out_dir, MANIFEST)
    try:
        with open(path, "rb") as f:
            manifest = json.load(f)
    except FileNotFoundError:
        raise UserError(f"{path}: not found (is {out_dir} a shard directory?)") from None
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: unreadable manifest ({e})") from None
    if manifest.get("format") != FORMAT or manifest.get("format_version") not in (FORMAT_VERSION, IMPORTED_VERSION):
        raise UserError(f"{path}: not a {FORMAT} v{FORMAT_VERSION} (or v{IMPORTED_VERSION}: imported) manifest")
    return manifest


# ------------------------------------------------------------------------------------------------ verify

def shard_array(out_dir: str, meta: dict) -> np.ndarray:
    """A shard file, memory-mapped read-only: an .npy file, or (imported, with "offset" and "dtype") a byte range of
    another trainer's raw token file."""
    path = os.path.join(out_dir, meta["path"])
    if "offset" not in meta:
        return np.load(path, mmap_mode="r")
    dtype = np.dtype(meta["dtype"])
    count = meta["bytes"] // dtype.itemsize
    return np.memmap(path, dtype, "r", meta["offset"], (count,)) if count else np.zeros(0, dtype)


def file_problem(out_dir: str, meta: dict) -> str | None:
    """What a cheap look finds wrong with a shard file: missing, or not of the size the manifest records (an
    imported range: its whole file's)."""
    path = os.path.join(out_dir, meta["path"])
    want = meta.get("file_bytes", meta["bytes"])
    if not os.path.isfile(path):
        return f"{meta['path']}: missing"
    if (size := os.path.getsize(path)) != want:
        return f"{meta['path']}: {size} bytes, manifest says {want} (truncated or overwritten)"
    return None


def verify_shard(out_dir: str, shard: dict, manifest: dict) -> list[str]:
    """Problems with one shard: missing, truncated or changed files, bad offsets, out-of-range ids, documents not
    ending with eos (unless the manifest says an imported corpus has such), mask values above the kind's (kto: 2,
    the label of an undesirable completion)."""
    dtype, tok = manifest["dtype"], manifest["tokenizer"]
    vocab_size, eos_id = tok["vocab_size"], tok["special_ids"]["eos"]
    problems = [p for meta in shard["files"].values() if (p := file_problem(out_dir, meta))]
    problems += [f"{meta['path']}: sha256 differs from the manifest (file changed)" for meta in shard["files"].values()
                 if not problems and file_sha256(os.path.join(out_dir, meta["path"]), meta.get("offset", 0),
                                                 meta["bytes"]) != meta["sha256"]]
    if problems:
        return problems
    tokens = shard_array(out_dir, shard["files"]["tokens"])
    offsets = shard_array(out_dir, shard["files"]["offsets"])
    name = shard["name"]
    if tokens.dtype != np.dtype(dtype) or tokens.ndim != 1 or len(tokens) != shard["tokens"]:
        problems.append(f"{name}: tokens are {tokens.dtype}{list(tokens.shape)}, manifest says {dtype}[{shard['tokens']}]")
    elif offsets.dtype != np.int64 or len(offsets) != shard["documents"]:
        problems.append(f"{name}: offsets are {offsets.dtype}[{len(offsets)}], manifest says int64[{shard['documents']}]")
    elif len(offsets) and (offsets[-1] != len(tokens) or np.any(np.diff(offsets) <= 0) or offsets[0] <= 0):
        problems.append(f"{name}: document offsets are not increasing up to the token count")
    elif len(tokens) and ((top := int(tokens.max())) >= vocab_size or int(tokens.min()) < 0):
        problems.append(f"{name}: token id {top if top >= vocab_size else int(tokens.min())} is outside the "
                        f"vocabulary (size {vocab_size})")
    elif eos_ends_documents(manifest) and len(offsets) and np.any(tokens[offsets - 1] != eos_id):
        problems.append(f"{name}: a document does not end with eos ({eos_id})")
    elif "field_ends" in shard["files"] and not fields_match(out_dir, shard):
        problems.append(f"{name}: the fields do not hold one record per document")
    elif "mask" in shard["files"]:
        mask = shard_array(out_dir, shard["files"]["mask"])
        top = mask_max(manifest["kind"])
        if mask.dtype != np.uint8 or mask.shape != tokens.shape:
            problems.append(f"{name}: mask is {mask.dtype}[{len(mask)}], expected uint8[{len(tokens)}]")
        elif len(mask) and int(mask.max()) > top:
            values = ", ".join(map(str, range(top))) + f" and {top}"
            problems.append(f"{name}: mask holds values other than {values}")
    return problems


def eos_ends_documents(manifest: dict) -> bool:
    """Every document ends with eos: always in shards written here; in an imported corpus only when it did there."""
    return manifest.get("imported", {}).get("eos_ends_documents", True)


def fields_match(out_dir: str, shard: dict) -> bool:
    """A prompts shard's records: one per document, ending where the fields end."""
    files = shard["files"]
    ends, fields = shard_array(out_dir, files["field_ends"]), shard_array(out_dir, files["fields"])
    return len(ends) == shard["documents"] and (not len(ends) or (int(ends[-1]) == len(fields)
                                                                  and bool(np.all(np.diff(ends) > 0))))


def mask_max(kind: str) -> int:
    return 2 if kind == "kto" else 1


def verify(out_dir: str, workers: int = 1, progress=None) -> tuple[dict, list[str]]:
    manifest = read_manifest(out_dir)
    problems = []
    tok = manifest["tokenizer"]
    tok_path = os.path.join(out_dir, tok["file"])
    if not os.path.isfile(tok_path):
        problems.append(f"{tok['file']}: missing")
    elif file_sha256(tok_path) != tok["sha256"]:
        problems.append(f"{tok['file']}: sha256 differs from the manifest")
    settings = {k: v for k, v in manifest.items() if k != "shards"}  # what each shard's check needs, not every shard
    args = [(out_dir, s, settings) for s in manifest["shards"]]
    if workers > 1 and len(args) > 1:
        import multiprocessing as mp
        with mp.get_context("fork").Pool(min(workers, len(args))) as pool:
            results = pool.starmap(verify_shard, args, chunksize=1)
    else:
        results = [verify_shard(*a) for a in args]
    for r in results:
        problems.extend(r)
    return manifest, problems
