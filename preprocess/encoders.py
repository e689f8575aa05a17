"""Text → token ids. The reference is sentencepiece for a .model file and Hugging Face `tokenizers` for a
tokenizer.json; gigatoken (an optional extra) computes the same function several times faster, and is used only
where a check on the job's own text finds identical ids.

Both sit behind one `Encoder`: it cuts very long documents the same way for either backend and appends eos, so
a shard's bytes never depend on which backend ran."""

from __future__ import annotations

import json

import numpy as np

from .errors import UserError
from .tokenizer import TokenizerInfo, load_processor

ENCODERS = ("auto", "sentencepiece", "tokenizers", "gigatoken")

# Documents longer than this many characters are encoded in pieces, which bounds the encoder's memory.
ENCODE_PIECE_CHARS = 1 << 20


class SentencepieceBackend:
    name = "sentencepiece"

    def __init__(self, info: TokenizerInfo):
        self.sp = load_processor(info.path, num_threads=1)

    def encode(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(concatenated ids, length of each text)."""
        parts = self.sp.encode(texts, return_type="numpy")
        lengths = np.fromiter((len(p) for p in parts), np.int64, count=len(parts))
        return (np.concatenate(parts) if parts else np.empty(0, np.int32)), lengths


class TokenizersBackend:
    """Hugging Face `tokenizers` on a tokenizer.json, with no text read as a special token (hf_tokenizer.py)."""
    name = "tokenizers"

    def __init__(self, info: TokenizerInfo):
        from .hf_tokenizer import load_reference
        self.tok = load_reference(info.path)

    def encode(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        parts = [np.array(e.ids, dtype=np.uint32) for e in self.tok.encode_batch_fast(texts, add_special_tokens=False)]
        lengths = np.fromiter((len(p) for p in parts), np.int64, count=len(parts))
        return (np.concatenate(parts) if parts else np.empty(0, np.uint32)), lengths


class GigatokenBackend:
    """gigatoken's sentencepiece-BPE implementation, single-threaded (one process per worker, as the job runs).

    Its loader lists a model's control pieces (<s>, </s>, <|user|>, ...) as added tokens, which makes the *text*
    "<s>" encode to the control id — the injection our chat template exists to rule out. sentencepiece never
    produces a control piece from text, so they are removed, with any merge that would build one."""
    name = "gigatoken"

    def __init__(self, info: TokenizerInfo):
        try:
            import gigatoken
            from gigatoken._load.sentencepiece import sentencepiece_to_tokenizer_json
        except ImportError:
            raise UserError("--encoder gigatoken: gigatoken is not installed (pip install 'shardlm[fast]')") from None
        if info.kind == "hf":  # the same file the reference encodes with
            from .hf_tokenizer import encoding_spec
            try:
                self.tok = gigatoken.Tokenizer.from_json(encoding_spec(info.path))
            except (RuntimeError, ValueError) as e:  # a pipeline it does not implement (a sentencepiece-style Split)
                raise UserError(f"{info.path}: gigatoken cannot encode this tokenizer ({e})") from None
            return
        from .hf_tokenizer import without_pieces

        sp = load_processor(info.path)
        control = {sp.id_to_piece(i) for i in range(sp.vocab_size()) if sp.is_control(i)}
        with open(info.path, "rb") as f:
            try:
                spec = json.loads(sentencepiece_to_tokenizer_json(f.read()))
            except ValueError as e:  # a unigram model, or one without byte fallback
                raise UserError(f"{info.path}: gigatoken cannot encode this model ({e})") from None
        self.tok = gigatoken.Tokenizer.from_json(json.dumps(without_pieces(spec, control), ensure_ascii=False))

    def encode(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        layout = self.tok.encode_batch(texts, parallel=False).layout
        offsets = np.asarray(layout.offsets.data, dtype=np.int64)
        return np.asarray(layout.content.data)[offsets[0]:offsets[-1]], np.diff(offsets)


BACKENDS = {"sentencepiece": SentencepieceBackend, "tokenizers": TokenizersBackend, "gigatoken": GigatokenBackend}


def reference_backend(info: TokenizerInfo) -> str:
    return "tokenizers" if info.kind == "hf" else "sentencepiece"


def gigatoken_available() -> bool:
    import importlib.util
    return importlib.util.find_spec("gigatoken") is not None


class Encoder:
    """Batched encoding of whole documents: one flat id array, each document followed by eos."""

    def __init__(self, info: TokenizerInfo, backend: str | None = None):
        self.backend = BACKENDS[backend or reference_backend(info)](info)
        self.name = self.backend.name
        self.eos = info.eos_id
        self.dtype = info.dtype
        self.adds_dummy_prefix = info.adds_dummy_prefix

    def encode(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(ids, lengths): the concatenated ids of all documents and each document's length incl. eos."""
        if not texts:
            return np.empty(0, self.dtype), np.empty(0, np.int64)
        ids, lengths = self._encode_flat(texts)
        ends = np.cumsum(lengths)
        # ids are < vocab_size, which the dtype holds, so the unchecked cast is exact
        return np.insert(ids, ends, self.eos).astype(self.dtype, casting="unsafe", copy=False), lengths + 1

    def encode_each(self, texts: list[str]) -> list[np.ndarray]:
        """The ids of every text, without eos."""
        ids, lengths = self._encode_flat(texts)
        return np.split(ids, np.cumsum(lengths)[:-1]) if texts else []

    def _encode_flat(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Long texts go to the backend in pieces (the same pieces for every backend); their lengths are summed
        back per text."""
        if all(len(t) <= ENCODE_PIECE_CHARS for t in texts):
            return self.backend.encode(texts)
        pieces, owner = [], []
        for i, t in enumerate(texts):
            parts = split_for_encoding(t, ENCODE_PIECE_CHARS, self.adds_dummy_prefix) if len(t) > ENCODE_PIECE_CHARS else [t]
            pieces += parts
            owner += [i] * len(parts)
        ids, piece_lengths = self.backend.encode(pieces)
        return ids, np.bincount(np.array(owner), weights=piece_lengths, minlength=len(texts)).astype(np.int64)


def split_for_encoding(text: str, limit: int, adds_dummy_prefix: bool) -> list[str]:
    """Cut a long document into pieces whose concatenated encodings decode back to exactly `text`.

    Without a dummy prefix any cut is exact; a line end is preferred so that few merges are lost.
    A tokenizer with a dummy prefix (Llama) prepends "▁" to every piece, so a piece may only start where a
    space was, and that space is dropped from the piece: the prefix stands for it. If no space exists, the
    text is not cut at all (correct, only slower).
    """
    pieces, start, n = [], 0, len(text)
    while n - start > limit:
        lo, hi = start + limit // 2, start + limit
        if adds_dummy_prefix:
            cut = text.rfind(" ", lo, hi)
            if cut <= start:
                cut = text.find(" ", hi)
            if cut <= start:
                break
            pieces.append(text[start:cut])
            start = cut + 1
        else:
            cut = text.rfind("\n", lo, hi) + 1 or text.rfind(" ", lo, hi) + 1 or hi
            pieces.append(text[start:cut])
            start = cut
    pieces.append(text[start:])
    return pieces


def first_difference(texts: list[str], places: list, fast: Encoder, reference: Encoder) -> str | None:
    """Where `fast` encodes any of `texts` to other ids than `reference`, as "place: token k is a, not b";
    places[i]() names where texts[i] came from."""
    ids_f, len_f = fast.encode(texts)
    ids_r, len_r = reference.encode(texts)
    if np.array_equal(len_f, len_r) and np.array_equal(ids_f, ids_r):
        return None
    starts = np.concatenate([[0], np.cumsum(len_r)[:-1]])
    starts_f = np.concatenate([[0], np.cumsum(len_f)[:-1]])
    for i, (a, n, b, m) in enumerate(zip(starts_f, len_f, starts, len_r, strict=True)):
        x, y = ids_f[a:a + n], ids_r[b:b + m]
        if not np.array_equal(x, y):
            k = next((k for k in range(min(n, m)) if x[k] != y[k]), min(n, m))
            got = int(x[k]) if k < n else "the end"
            want = int(y[k]) if k < m else "the end"
            return f"{places[i]()}: token {k} is {got}, {reference.name} gives {want}"
    return None


def choose_encoder(requested: str, info: TokenizerInfo, sample) -> tuple[str, str | None]:
    """The backend to run, and a note for the user when `auto` falls back. gigatoken runs only if it gives the
    reference's ids on every (text, where) of sample() — the job's own input; an explicit request that fails the
    check is an error."""
    reference = reference_backend(info)
    if requested in ("sentencepiece", "tokenizers") and requested != reference:
        raise UserError(f"--encoder {requested} cannot read {info.path}; its encoder is {reference}")
    if requested == reference or (requested == "auto" and not gigatoken_available()):
        return reference, None
    try:
        fast = Encoder(info, "gigatoken")
    except UserError as e:
        if requested == "gigatoken":
            raise
        return reference, f"note: {e}; encoding with {reference}"
    pairs = sample()
    texts, places = [t for t, _ in pairs], [w for _, w in pairs]
    diff = first_difference(texts, places, fast, Encoder(info, reference))
    if diff is None:
        return "gigatoken", None
    if requested == "gigatoken":
        raise UserError(f"--encoder gigatoken gives other ids than {reference}: {diff}")
    return reference, f"note: gigatoken gives other ids than {reference} ({diff}); encoding with {reference}"
