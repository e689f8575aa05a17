"""Tokenizers: training ours (sentencepiece BPE, byte fallback, identity normalisation), and loading a sentencepiece
model or a Hugging Face tokenizer.json (hf_tokenizer.py) for what shards, training and generation need; encoding
in bulk is in encoders.py."""

from __future__ import annotations

import contextlib
import io
import os
import random
import re
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import sentencepiece as spm

from .errors import UserError
from .fileio import atomic_write, file_sha256

# Reserved as control symbols: sentencepiece never produces them from text, so no input can inject them.
UNK, BOS, EOS, PAD = "<unk>", "<s>", "</s>", "<pad>"
ROLE_TOKENS = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"}
END_OF_TURN = "<|end|>"
CONTROL_SYMBOLS = [*ROLE_TOKENS.values(), END_OF_TURN]

# The trainer silently drops "sentences" longer than max_sentence_length bytes, so documents are cut into
# chunks below it (at line ends where possible).
TRAIN_CHUNK_BYTES = 4000
TRAIN_MAX_SENTENCE_BYTES = 8192

SP_FILE, HF_FILE = "tokenizer.model", "tokenizer.json"  # the name a tokenizer of each kind has next to shards


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 while every id fits, else uint32 — never a signed or silently wrapping type."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


@dataclass
class TokenizerInfo:
    path: str
    sha256: str
    vocab_size: int
    special_ids: dict[str, int] = field(default_factory=dict)
    adds_dummy_prefix: bool = False
    kind: str = "sentencepiece"  # or "hf": a Hugging Face tokenizer.json

    @property
    def file(self) -> str:
        return HF_FILE if self.kind == "hf" else SP_FILE

    @property
    def eos_id(self) -> int:
        return self.special_ids["eos"]

    @property
    def dtype(self) -> np.dtype:
        return token_dtype(self.vocab_size)

    def to_json(self) -> dict:
        return {
            "kind": self.kind,
            "sha256": self.sha256,
            "vocab_size": self.vocab_size,
            "special_ids": self.special_ids,
            "adds_dummy_prefix": self.adds_dummy_prefix,
        }


def load_processor(path: str, num_threads: int = 1) -> spm.SentencePieceProcessor:
    if not os.path.isfile(path):
        raise UserError(f"{path}: tokenizer model not found")
    try:
        return spm.SentencePieceProcessor(model_file=path, num_threads=num_threads)
    except (RuntimeError, OSError) as e:
        raise UserError(f"{path}: not a sentencepiece model ({str(e).splitlines()[0]})") from None


def is_hf(path: str) -> bool:
    if os.path.isdir(path):
        found = tokenizer_file(path)
        return found is not None and found.endswith(HF_FILE)
    return path.endswith(".json")


def tokenizer_files(path: str) -> list[str]:
    """A tokenizer file and what must travel with it (a tokenizer.json's tokenizer_config.json)."""
    if is_hf(path):
        from .hf_tokenizer import companions
        return companions(path)
    return [path]


def tokenizer_file(directory: str) -> str | None:
    """The tokenizer of a run, checkpoint or model directory: its sentencepiece model when it has one (our
    exports carry both), else its tokenizer.json."""
    for name in (SP_FILE, HF_FILE):
        if os.path.isfile(os.path.join(directory, name)):
            return os.path.join(directory, name)
    return None


def load_tokenizer(path: str) -> TokenizerInfo:
    """Inspect a sentencepiece model (ours, or e.g. a Llama tokenizer.model) or a Hugging Face tokenizer.json (or
    a directory holding one) for what shards need."""
    if is_hf(path):
        from . import hf_tokenizer as hf

        path = hf.find_file(path)
        return TokenizerInfo(path, file_sha256(path), hf.vocab_size(path), hf.special_ids(path), False, "hf")
    if os.path.isdir(path):
        if tokenizer_file(path) is None:
            raise UserError(f"{path}: holds neither a {SP_FILE} nor a {HF_FILE}")
        path = tokenizer_file(path)
    sp = load_processor(path)
    special = {}
    for name, idx in (("unk", sp.unk_id()), ("bos", sp.bos_id()), ("eos", sp.eos_id()), ("pad", sp.pad_id())):
        if idx >= 0:
            special[name] = idx
    for piece in CONTROL_SYMBOLS:
        idx = sp.piece_to_id(piece)
        if idx != sp.unk_id() and sp.is_control(idx):
            special[piece] = idx
    if "eos" not in special:
        raise UserError(f"{path}: the tokenizer has no end-of-sequence token (eos_id is -1)")
    adds_dummy_prefix = sp.encode("a", out_type=str)[0].startswith("▁")
    return TokenizerInfo(path, file_sha256(path), sp.vocab_size(), special, adds_dummy_prefix)


def token_bytes(path: str) -> np.ndarray:
    """Per id, the UTF-8 bytes of the text it stands for: a byte piece (<0x0A>) 1, a control symbol (eos,
    <|end|>) 0, any other piece its text with "▁" read as a space. With the identity normalisation
    and no dummy prefix (tokenizers trained here), the bytes of a text are exactly the sum over its ids; a dummy
    prefix adds one byte per encoded text, which the sum counts. A tokenizer.json: see hf_tokenizer.token_bytes."""
    if is_hf(path):
        from . import hf_tokenizer as hf
        return hf.token_bytes(path)
    sp = load_processor(path)
    sizes = np.zeros(sp.vocab_size(), dtype=np.int64)
    for i in range(sp.vocab_size()):
        if sp.is_byte(i):
            sizes[i] = 1
        elif not (sp.is_control(i) or sp.is_unknown(i)):
            sizes[i] = len(sp.id_to_piece(i).replace("▁", " ").encode())
    return sizes


class TextTokenizer:
    """One text at a time, for training's samples, generation and `show`: encode, decode, and which ids are
    control symbols; the same for either kind of tokenizer file."""

    def __init__(self, path: str):
        self.info = load_tokenizer(path)
        if self.info.kind == "hf":
            from .hf_tokenizer import HFText
            self._impl = HFText(self.info.path)
        else:
            self._impl = _SPText(self.info.path)
        self.vocab_size, self.eos_id = self.info.vocab_size, self.info.eos_id

    def encode(self, text: str) -> list[int]:
        return self._impl.encode(text)

    def decode(self, ids) -> str:
        return self._impl.decode(ids)

    def piece(self, i: int) -> str:
        return self._impl.piece(i)

    def is_control(self, i: int) -> bool:
        return self._impl.is_control(i)


class _SPText:
    def __init__(self, path: str):
        self.sp = load_processor(path)

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def decode(self, ids) -> str:
        return self.sp.decode([int(i) for i in ids])

    def piece(self, i: int) -> str:
        return self.sp.id_to_piece(int(i))

    def is_control(self, i: int) -> bool:
        return self.sp.is_control(int(i))


# ---------------------------------------------------------------------------------------------- training

def training_chunks(text: str, limit: int = TRAIN_CHUNK_BYTES):
    """Yield pieces of `text` of at most `limit` UTF-8 bytes, made of whole lines where lines are short enough."""
    buf, size = [], 0
    for line in text.splitlines(keepends=True):
        n = len(line.encode("utf-8", "surrogatepass"))
        if size + n > limit and buf:
            yield "".join(buf)
            buf, size = [], 0
        if n > limit:
            yield from _split_line(line, limit)
            continue
        buf.append(line)
        size += n
    if buf:
        yield "".join(buf)


def _split_line(line: str, limit: int):
    # A character is at most 4 bytes, so limit // 4 characters always fit; prefer to cut after a space.
    step = max(1, limit // 4)
    start = 0
    while start < len(line):
        end = min(len(line), start + step)
        if end < len(line):
            space = line.rfind(" ", start + step // 2, end)
            if space > start:
                end = space + 1
        yield line[start:end]
        start = end


@dataclass
class TrainReport:
    vocab_size: int
    requested_vocab_size: int
    documents: int
    chunks: int
    bytes_trained: int
    skipped_by_trainer: int
    seconds: float


def train_tokenizer(documents, out_dir: str, vocab_size: int, *, character_coverage: float = 0.9995,
                    extra_control_symbols=(), threads: int | None = None) -> TrainReport:
    """Train a BPE model on an iterable of document strings; writes out_dir/tokenizer.{model,vocab,log}.

    Characters outside the most frequent `character_coverage` share of the text get no piece of their own and
    are written as their UTF-8 bytes (byte fallback): small vocabularies on Chinese need a lower coverage."""
    if not 0.98 <= character_coverage <= 1:  # sentencepiece's own limits
        raise UserError(f"--character-coverage must be between 0.98 and 1, got {character_coverage}")
    os.makedirs(out_dir, exist_ok=True)
    stats = {"chunks": 0, "bytes": 0, "documents": 0}

    chunks = []  # sentencepiece holds its whole input in memory anyway; the caller bounds it by sampling
    for doc in documents:
        stats["documents"] += 1
        for chunk in training_chunks(doc):
            stats["chunks"] += 1
            stats["bytes"] += len(chunk.encode("utf-8", "surrogatepass"))
            chunks.append(chunk)
    if not chunks:
        raise UserError("no text to train the tokenizer on (every input document was empty or skipped)")

    log_path = os.path.join(out_dir, "tokenizer.log")
    options = dict(
        model_type="bpe",
        vocab_size=vocab_size,
        byte_fallback=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        allow_whitespace_only_pieces=True,
        split_digits=True,
        character_coverage=character_coverage,
        max_sentence_length=TRAIN_MAX_SENTENCE_BYTES,
        input_sentence_size=0,
        unk_id=0, bos_id=1, eos_id=2, pad_id=3,
        unk_piece=UNK, bos_piece=BOS, eos_piece=EOS, pad_piece=PAD,
        control_symbols=[*CONTROL_SYMBOLS, *extra_control_symbols],
        num_threads=threads or len(os.sched_getaffinity(0)),
    )
    t0 = time.perf_counter()
    used_vocab = vocab_size
    model = _train_once(chunks, options, log_path)
    if isinstance(model, _TooHigh):
        # Tiny corpora cannot fill a large vocabulary: use the largest size the corpus supports, and say so.
        used_vocab = model.max_size
        print(f"warning: the corpus supports at most {used_vocab} tokens; training with --vocab-size {used_vocab} "
              f"instead of {vocab_size}", file=sys.stderr)
        model = _train_once(chunks, {**options, "vocab_size": used_vocab}, log_path)
        if isinstance(model, _TooHigh):
            raise UserError(f"sentencepiece could not train a vocabulary of {used_vocab} on this corpus; see {log_path}")
    seconds = time.perf_counter() - t0

    atomic_write(os.path.join(out_dir, "tokenizer.model"), model)
    sp = spm.SentencePieceProcessor(model_proto=model)
    vocab_lines = "".join(f"{sp.id_to_piece(i)}\t{sp.get_score(i)}\n" for i in range(sp.vocab_size()))
    atomic_write(os.path.join(out_dir, "tokenizer.vocab"), vocab_lines.encode("utf-8"))
    with open(log_path, encoding="utf-8", errors="replace") as f:
        skipped = sum(int(m) for m in re.findall(r"Skipped (\d+) too long sentences", f.read()))
    return TrainReport(sp.vocab_size(), vocab_size, stats["documents"], stats["chunks"], stats["bytes"], skipped, seconds)


@dataclass
class _TooHigh:
    max_size: int


@contextlib.contextmanager
def _stderr_to(file):
    """Send file descriptor 2 (sentencepiece's C++ log) to `file`; works whatever sys.stderr is."""
    saved = os.dup(2)
    os.dup2(file.fileno(), 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _train_once(chunks: list[str], options: dict, log_path: str):
    model = io.BytesIO()
    with open(log_path, "w", encoding="utf-8") as log, _stderr_to(log):
        try:
            spm.SentencePieceTrainer.train(sentence_iterator=iter(chunks), model_writer=model, **options)
        except RuntimeError as e:
            msg = str(e)
            too_high = re.search(r"Vocabulary size too high \((\d+)\)\. Please set it to a value <= (\d+)", msg)
            if too_high:
                return _TooHigh(int(too_high.group(2)))
            too_small = re.search(r"Vocabulary size is smaller than required_chars\. (\d+) vs (\d+)", msg)
            if too_small:
                raise UserError(f"--vocab-size {too_small.group(1)} is too small for this corpus: it needs at least "
                                f"{too_small.group(2)} (256 byte pieces, the special tokens and every character within "
                                f"--character-coverage {options['character_coverage']}; lower it to write rarer "
                                "characters as bytes)") from None
            raise UserError(f"sentencepiece training failed: {msg.splitlines()[-1]} (full log: {log_path})") from None
    return model.getvalue()


def sample_documents(segments, read_documents, budget_bytes: int, seed: int):
    """Stream documents for tokenizer training: everything if the input fits the budget, else random whole
    segments (about one work unit each) until the budget is reached — the corpus is never held in memory."""
    total = sum(s.size for s in segments)
    order = list(segments)
    if total > budget_bytes:
        random.Random(seed).shuffle(order)
    taken = 0
    for seg in order:
        for text in read_documents(seg):
            yield text
            taken += len(text.encode("utf-8", "surrogatepass"))
            if taken >= budget_bytes:
                return
