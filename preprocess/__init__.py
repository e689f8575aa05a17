"""Corpora → sentencepiece tokenizer → memory-mapped token shards (see docs/formats.md)."""
