"""Deduplication in two passes, with the same bytes for any number of workers, ranks and interruptions.

1. Signatures (in parallel, one file per unit under .work/dedup/): for every usable document, a 128-bit hash
   of its exact text and, for `near`, a MinHash of its shingles (datasketch).
2. One resolution in the job's global document order (unit, then position): a document is dropped if an earlier
   kept one has the same text (`exact`) or, for `near`, an estimated Jaccard similarity of at least the
   threshold (candidates from datasketch's LSH index of the kept documents). The first of a group is kept.
3. The writing pass skips the dropped documents and counts them per kind.

The resolution holds every document's signature in one process: about 16 bytes each for `exact`, and
num_perm × 4 bytes plus the LSH index of the kept ones for `near` (docs/benchmarks.md has measured figures).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import zlib
from dataclasses import asdict, dataclass

import numpy as np

from .errors import UserError
from .fileio import atomic_write
from .formats import parsed_records
from .readers import Bad, Segment, SegmentReader

MODES = ("none", "exact", "near")
SHINGLES = ("words", "chars")
KINDS = ("exact", "near")
EXAMPLES_KEPT = 5
SIGN_BATCH = 1024  # documents per MinHash.bulk call: bounds the shingles held at once
# MinHash of CRC-32 shingle hashes (3x faster than datasketch's default SHA-1, and as good a base for its
# random affine permutations); a change here changes signatures, so it is part of the plan
SIGNATURE = "minhash-affine32-crc32"
_WORD = re.compile(r"\w+")


@dataclass(frozen=True)
class Dedup:
    mode: str = "none"
    threshold: float = 0.8  # near: estimated Jaccard similarity of the shingle sets
    shingles: str = "words"  # near: word n-grams, or character n-grams (for text without spaces: Chinese)
    ngram: int = 5
    num_perm: int = 128

    def __post_init__(self):
        if self.mode not in MODES:
            raise UserError(f"--dedup must be one of {', '.join(MODES)}, got {self.mode!r}")
        if not 0 < self.threshold <= 1:
            raise UserError(f"--dedup-threshold must be in (0, 1], got {self.threshold}")
        if self.ngram < 1 or self.num_perm < 16:
            raise UserError(f"--dedup-ngram must be ≥ 1 and --dedup-num-perm ≥ 16, got {self.ngram}, {self.num_perm}")
        if self.shingles not in SHINGLES:
            raise UserError(f"--dedup-shingles must be one of {', '.join(SHINGLES)}, got {self.shingles!r}")
        if self.mode == "near":
            try:
                import datasketch  # noqa: F401
            except ImportError:
                raise UserError("--dedup near needs datasketch (pip install 'shardlm[dedup]')") from None

    @property
    def on(self) -> bool:
        return self.mode != "none"

    def options(self) -> dict:
        """What the output depends on (recorded in the plan, so a resume with other settings is refused)."""
        return {**asdict(self), "signature": SIGNATURE} if self.mode == "near" else {"mode": self.mode}


def work_dir(out_dir: str) -> str:
    return os.path.join(out_dir, ".work", "dedup")


def signature_path(out_dir: str, name: str) -> str:
    return os.path.join(work_dir(out_dir), f"{name}.npz")


def drops_path(out_dir: str, name: str | None = None) -> str:
    """One unit's dropped documents; without a name, the resolution's summary (written last: its presence
    means every unit's file is there)."""
    return os.path.join(work_dir(out_dir), f"{name}.drops.npy" if name else "resolution.json")


def shingle(text: str, dedup: Dedup) -> list[bytes]:
    """Lower-cased word n-grams, or character n-grams of the whitespace-collapsed text; a text shorter than
    one n-gram is one shingle."""
    n = dedup.ngram
    if dedup.shingles == "words":
        words = _WORD.findall(text.lower())
        grams = [" ".join(words[i:i + n]) for i in range(max(1, len(words) - n + 1))]
    else:
        flat = " ".join(text.lower().split())
        grams = [flat[i:i + n] for i in range(max(1, len(flat) - n + 1))]
    return [g.encode("utf-8", "surrogatepass") for g in grams]


def usable_documents(job, kind, segments: list[Segment]):
    """(segment index, position, parsed) of every usable record, in the order the writing pass meets them."""
    for si, pos, parsed, _ in parsed_records(kind, segments, job.txt_doc):
        if not isinstance(parsed, Bad):
            yield si, pos, parsed


def sign_unit(job, name: str, segments: list[Segment]) -> int:
    """Write the unit's signature file; returns its input bytes (for progress)."""
    kind = job.make_kind()
    dedup = job.dedup
    keys, places, sigs, batch = [], [], [], []

    def flush():
        from datasketch import MinHash
        sigs.extend(m.hashvalues.astype(np.uint32) for m in MinHash.bulk(batch, num_perm=dedup.num_perm, seed=1,
                                                                          hashfunc=zlib.crc32))
        batch.clear()

    for si, pos, parsed in usable_documents(job, kind, segments):
        text = kind.dedup_text(parsed)
        keys.append(hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest())
        places.append((si, pos))
        if dedup.mode == "near":
            batch.append(shingle(text, dedup))
            if len(batch) >= SIGN_BATCH:
                flush()
    if batch:
        flush()
    buf = io.BytesIO()
    np.savez(buf, keys=np.frombuffer(b"".join(keys), np.uint8).reshape(-1, 16),
             places=np.array(places, np.int64).reshape(-1, 2),
             minhash=np.array(sigs, np.uint32).reshape(len(sigs), dedup.num_perm if sigs else 0))
    os.makedirs(work_dir(job.out_dir), exist_ok=True)
    atomic_write(signature_path(job.out_dir, name), buf.getvalue())
    return sum(s.size for s in segments)


def signature_done(out_dir: str, name: str) -> bool:
    return os.path.isfile(signature_path(out_dir, name))


def resolve(job, names: list[str], units: list[list[Segment]]) -> dict:
    """Find the duplicates of the whole job from every unit's signatures (deterministic: any rank that runs
    this writes the same bytes) and save them; returns the counts and examples."""
    loaded = []
    for n in names:  # copied out and closed: a job may have more units than a process may open files
        with np.load(signature_path(job.out_dir, n)) as f:
            loaded.append({k: f[k] for k in ("keys", "places", "minhash")})
    keys = np.concatenate([f["keys"] for f in loaded])
    unit_of = np.concatenate([np.full(len(f["keys"]), u, np.int64) for u, f in enumerate(loaded)])
    ordinal = np.concatenate([np.arange(len(f["keys"]), dtype=np.int64) for f in loaded])
    places = np.concatenate([f["places"] for f in loaded])
    n = len(keys)
    original = np.arange(n)
    kind = np.zeros(n, np.uint8)  # 0 kept, 1 exact, 2 near
    if n:
        # the first occurrence of every exact text (np.unique returns first indices)
        _, first, inverse = np.unique(np.ascontiguousarray(keys).view("V16").ravel(), return_index=True,
                                      return_inverse=True)
        original = first[inverse.ravel()]
        kind[original != np.arange(n)] = 1
    if job.dedup.mode == "near" and n:
        from datasketch import LeanMinHash, MinHashLSH

        minhash = np.concatenate([f["minhash"] for f in loaded])
        dedup = job.dedup
        lsh = MinHashLSH(threshold=dedup.threshold, num_perm=dedup.num_perm)
        for i in np.flatnonzero(kind == 0):
            m = LeanMinHash(seed=1, hashvalues=minhash[i], scheme="affine32")  # no permutations: 30x cheaper
            similar = [c for c in lsh.query(m) if np.mean(minhash[c] == minhash[i]) >= dedup.threshold]
            if similar:
                kind[i], original[i] = 2, min(similar)
            else:
                lsh.insert(int(i), m, check_duplication=False)
    dropped = np.flatnonzero(kind)
    counts = {k: int(np.sum(kind == j + 1)) for j, k in enumerate(KINDS) if k == "exact" or job.dedup.mode == "near"}
    examples: dict[str, list[str]] = {}
    readers: dict[tuple[int, int], SegmentReader] = {}

    def where(i: int) -> str:
        u, si = int(unit_of[i]), int(places[i, 0])
        if (u, si) not in readers:
            readers[u, si] = SegmentReader(units[u][si], txt_doc=job.txt_doc)
        return readers[u, si].where(int(places[i, 1]))

    for i in dropped:
        label = KINDS[kind[i] - 1]
        kept = examples.setdefault(label, [])
        if len(kept) < EXAMPLES_KEPT:
            kept.append(f"{where(i)}: {'repeats' if label == 'exact' else 'nearly repeats'} {where(original[i])}")
    summary = {"duplicates": counts, "duplicate_examples": examples}
    bounds = np.searchsorted(unit_of[dropped], np.arange(len(names) + 1))  # unit_of is sorted
    for u, name in enumerate(names):  # each unit reads only its own: a few bytes per dropped document
        mine = dropped[bounds[u]:bounds[u + 1]]
        buf = io.BytesIO()
        np.save(buf, np.stack([ordinal[mine], kind[mine]], axis=1).astype(np.int64).reshape(-1, 2))
        atomic_write(drops_path(job.out_dir, name), buf.getvalue())
    atomic_write(drops_path(job.out_dir), json.dumps(summary, sort_keys=True).encode())
    return summary


def resolved(out_dir: str) -> bool:
    return os.path.isfile(drops_path(out_dir))


def load_summary(out_dir: str) -> dict:
    with open(drops_path(out_dir), "rb") as f:
        return json.load(f)


def unit_drops(out_dir: str, name: str) -> dict[int, str]:
    """ordinal of a usable document within the unit → why it is dropped ("exact" or "near")."""
    rows = np.load(drops_path(out_dir, name))
    return {int(o): KINDS[k - 1] for o, k in rows}
