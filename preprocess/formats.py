"""Records → documents, one function per shard kind. A record that cannot be used becomes a Bad."""

from __future__ import annotations

from .readers import Bad


def pretrain_text(record: object, text_key: str) -> str | Bad:
    """A pretraining document: a bare string, or the `text_key` field of an object."""
    if isinstance(record, Bad):
        return record
    if isinstance(record, dict):
        if text_key not in record:
            return Bad("missing_key", repr(text_key))
        record = record[text_key]
        if not isinstance(record, str):
            return Bad("not_a_string", f"{text_key!r} is {type(record).__name__}")
    elif not isinstance(record, str):
        return Bad("not_an_object", type(record).__name__)
    return check_text(record)


def check_text(text: str) -> str | Bad:
    if not text or text.isspace():
        return Bad("empty")
    if "\x00" in text:
        return Bad("binary", "NUL bytes")
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:  # a lone surrogate from a JSON "\ud800" escape
            return Bad("invalid_utf8", f"lone surrogate at character {e.start}")
    return text
