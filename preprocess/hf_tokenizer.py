"""Hugging Face tokenizer.json files with BPE — byte-level (GPT-2, Llama 3, SmolLM, Qwen) or sentencepiece-style with
byte fallback (Mistral, Gemma: spaces as "▁", bytes without a piece as <0xNN>): what shards need of them.

Text never becomes a control token: every added token that marks something (the special <|endoftext|>,
<|begin_of_text|>, ..., and those marked non-special, such as Qwen's <|fim_prefix|> or <tool_call>) is taken out of
what `tokenizers` would match in the text, as sentencepiece never produces a control symbol from text; such text is
encoded as the bytes it is. Added tokens that are ordinary text (Gemma's runs of spaces, tabs and newlines: not
special, nothing but whitespace) stay: the model's tokenizer produces them from that text, and so do shards. Encoding adds
nothing either (no BOS from the post-processor); shards append eos themselves.

The end-of-sequence token may be named by a tokenizer_config.json next to the file, which is therefore copied
wherever the tokenizer.json is (shard directories, runs, checkpoints).
"""

from __future__ import annotations

import functools
import json
import os
import re

import numpy as np

from .errors import UserError

FILE = "tokenizer.json"
CONFIG = "tokenizer_config.json"
SAVED = "shardlm_chat_template.json"  # the template and options chat shards were written in (chat_template.py)
BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")  # a byte-fallback piece of a sentencepiece-style vocabulary
# when tokenizer_config.json does not say, the first of these that is a special token is the end of a document
EOS_NAMES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|im_end|>")
# what else ends a model's reply where its vocabulary has it as a special token (Llama 3's generation_config lists
# <|end_of_text|>, <|eom_id|> and <|eot_id|>; Gemma's <eos> and <end_of_turn>)
END_NAMES = (*EOS_NAMES, "<|eot_id|>", "<|eom_id|>", "<end_of_turn>", "<|end|>")


def find_file(path: str) -> str:
    """A tokenizer.json, or the one in a directory."""
    candidate = os.path.join(path, FILE) if os.path.isdir(path) else path
    if not os.path.isfile(candidate):
        raise UserError(f"{path}: no {FILE} here")
    return candidate


@functools.cache
def read_spec(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            spec = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: not a readable tokenizer.json ({e})") from None
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or not (is_byte_level(spec) or is_metaspace(spec)):
        raise UserError(f"{path}: only BPE tokenizer.json files are supported, byte-level (GPT-2, Llama 3, Qwen) or "
                        f"sentencepiece-style with byte fallback (Mistral); this one is {model.get('type')}, neither "
                        "byte-level nor with byte_fallback")
    return spec


def is_byte_level(spec: dict) -> bool:
    return any(_has_byte_level(spec.get(k)) for k in ("pre_tokenizer", "decoder"))


def is_metaspace(spec: dict) -> bool:
    """A sentencepiece BPE as a tokenizer.json: spaces as "▁" (a Metaspace step, or a normalizer replacing them) and
    bytes that have no piece as <0xNN> pieces (byte_fallback)."""
    steps = json.dumps([spec.get("normalizer"), spec.get("pre_tokenizer")], ensure_ascii=False)
    return bool((spec.get("model") or {}).get("byte_fallback")) and ("Metaspace" in steps or "\u2581" in steps)


def companions(path: str) -> list[str]:
    """The files that make up this tokenizer: the tokenizer.json, and its tokenizer_config.json and the
    shardlm_chat_template.json of chat shards written with it (preprocess/chat_template.py) if any."""
    folder = os.path.dirname(path)
    names = (CONFIG, SAVED)
    return [path, *(p for p in (os.path.join(folder, n) for n in names) if os.path.isfile(p))]


def _has_byte_level(step) -> bool:
    if not isinstance(step, dict):
        return False
    return step.get("type") == "ByteLevel" or any(_has_byte_level(s) for s in step.get("pretokenizers", [])
                                                  + step.get("decoders", []))


def special_tokens(spec: dict) -> dict[str, int]:
    return {t["content"]: int(t["id"]) for t in spec.get("added_tokens", []) if t.get("special")}


def is_textual(token: dict) -> bool:
    """An added token that is ordinary text the tokenizer produces from text: not special, and nothing but
    whitespace (Gemma's runs of spaces, tabs and newlines; "▁" is a space in a sentencepiece-style vocabulary).
    Any other added token marks something and is never produced from text here (<tool_call>, [INST], ...)."""
    content = token["content"]
    return not token.get("special") and bool(content) and all(c.isspace() or c == "\u2581" for c in content)


def markers_as_text(spec: dict) -> list[str]:
    """Non-special added tokens that are no whitespace: the model's own tokenizer makes them from text that spells
    them (Qwen's <tool_call>, Gemma's <table>), shards never do (they stay the text's bytes)."""
    return [t["content"] for t in spec.get("added_tokens", []) if not t.get("special") and not is_textual(t)]


def added_tokens(spec: dict) -> dict[str, int]:
    """Every added token that marks something (special or not): none of them is ever produced from text here."""
    return {t["content"]: int(t["id"]) for t in spec.get("added_tokens", []) if not is_textual(t)}


def textual_tokens(spec: dict) -> dict[str, int]:
    """The added tokens that are ordinary text, produced from it as the model's tokenizer does."""
    return {t["content"]: int(t["id"]) for t in spec.get("added_tokens", []) if is_textual(t)}


def without_pieces(spec: dict, contents: set[str]) -> dict:
    """`spec` with these added tokens gone, and every merge that would build one of them from text."""
    spec = json.loads(json.dumps(spec))
    spec["added_tokens"] = [t for t in spec.get("added_tokens", []) if t["content"] not in contents]
    spec["model"]["merges"] = [m for m in spec["model"].get("merges", [])
                               if ("".join(m) if isinstance(m, list) else m.replace(" ", "")) not in contents]
    return spec


def _config_token(path: str, key: str) -> str | None:
    """eos_token / bos_token from the tokenizer_config.json next to the file, if there is one."""
    config = os.path.join(os.path.dirname(path), CONFIG)
    if not os.path.isfile(config):
        return None
    try:
        with open(config, encoding="utf-8") as f:
            value = json.load(f).get(key)
    except (OSError, ValueError):
        return None
    return value.get("content") if isinstance(value, dict) else value


def special_ids(path: str) -> dict[str, int]:
    spec = read_spec(path)
    specials = special_tokens(spec)
    ids = {}
    eos = _config_token(path, "eos_token") or next((n for n in EOS_NAMES if n in specials), None)
    if eos not in specials:
        raise UserError(f"{path}: cannot tell its end-of-sequence token (no tokenizer_config.json eos_token, and "
                        f"none of {', '.join(EOS_NAMES)} is a special token); put a tokenizer_config.json with "
                        "\"eos_token\" next to it")
    ids["eos"] = specials[eos]
    if (bos := _config_token(path, "bos_token")) in specials:
        ids["bos"] = specials[bos]
    return ids


def end_ids(path: str) -> list[int]:
    """The special tokens among END_NAMES this tokenizer has: ids a reply may end at."""
    specials = special_tokens(read_spec(path))
    return [specials[n] for n in END_NAMES if n in specials]


def vocab_size(path: str) -> int:
    """One past the largest id of the model's vocabulary and its added tokens."""
    spec = read_spec(path)
    ids = [*spec["model"]["vocab"].values(), *(t["id"] for t in spec.get("added_tokens", []))]
    return max(ids) + 1


@functools.cache
def encoding_spec(path: str) -> str:
    """The tokenizer.json that encodes text exactly as the file does, except that no text becomes a special token
    and nothing is added around it."""
    spec = read_spec(path)
    spec = without_pieces(spec, set(added_tokens(spec)))
    spec["post_processor"] = None
    spec["truncation"] = spec["padding"] = None
    return json.dumps(spec, ensure_ascii=False)


def load_reference(path: str):
    """The `tokenizers` library on encoding_spec(): the reference encoder for these files."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # one process per worker; no pool to fork
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise UserError(f"{path}: reading a tokenizer.json needs the tokenizers library (pip install tokenizers)") from None
    return Tokenizer.from_str(encoding_spec(path))


@functools.cache
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet: the printable character each byte is written as, inverted."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


def token_bytes(path: str) -> np.ndarray:
    """Per id, how many bytes of text it stands for (0 for special tokens and unused ids): a byte-level piece one
    per character of GPT-2's alphabet; a sentencepiece-style piece its UTF-8 with "▁" as a space, <0xNN> one."""
    spec = read_spec(path)
    sizes = np.zeros(vocab_size(path), dtype=np.int64)
    decoder = _byte_decoder()
    byte_level = is_byte_level(spec)
    added = set(added_tokens(spec).values())  # never produced from text: no bytes
    for piece, i in spec["model"]["vocab"].items():
        if i in added:
            continue
        if byte_level:
            sizes[i] = sum(1 if c in decoder else len(c.encode()) for c in piece)
        else:
            sizes[i] = 1 if BYTE_PIECE.fullmatch(piece) else len(piece.replace("\u2581", " ").encode())
    for text, i in textual_tokens(spec).items():  # matched in the text: its own bytes ("▁" a space if sentencepiece-style)
        sizes[i] = len(text.encode() if byte_level else text.replace("\u2581", " ").encode())
    return sizes


class HFText:
    """encode/decode for training, generation and `show`."""

    def __init__(self, path: str):
        from tokenizers import Tokenizer

        self.path = path
        self.encoder = load_reference(path)
        with open(path, encoding="utf-8") as f:
            self.full = Tokenizer.from_str(f.read())  # decodes special ids too
        self.specials = set(added_tokens(read_spec(path)).values())
        self.vocab_size = vocab_size(path)

    def encode(self, text: str) -> list[int]:
        return self.encoder.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        return self.full.decode([int(i) for i in ids], skip_special_tokens=False)

    def piece(self, i: int) -> str:
        return self.full.id_to_token(int(i)) or f"<unused {i}>"

    def is_control(self, i: int) -> bool:
        return int(i) in self.specials
