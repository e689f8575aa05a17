"""Input files → deterministic segments → raw records.

A segment is a piece of one input that can be read on its own: a newline-aligned byte range of a .jsonl
(or of a .txt read one document per line), one parquet row group, or a whole file (.json arrays, gzip,
.txt read as one document). Segments depend only on the files and the options, never on the worker count.
"""

from __future__ import annotations

import glob
import gzip
import json
import os
import re
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

import orjson

from .errors import UserError

FORMATS = {".jsonl": "jsonl", ".jsonl.gz": "jsonl.gz", ".json": "json", ".txt": "txt", ".txt.gz": "txt.gz", ".md": "txt",
           ".parquet": "parquet"}
TXT_DOC_MODES = ("file", "line")
READ_BLOCK = 1 << 20
BOM = "\ufeff"
BOM_BYTES = BOM.encode()


def input_format(path: str) -> str | None:
    name = path.lower()
    for suffix in sorted(FORMATS, key=len, reverse=True):
        if name.endswith(suffix):
            return FORMATS[suffix]
    return None


def expand_inputs(patterns: list[str], exclude: str | None = None) -> list[str]:
    """Files, directories (searched recursively; hidden entries skipped) and globs → a sorted, de-duplicated
    list of input files. Files under `exclude` (the output directory) are left out."""
    found: list[str] = []
    for pattern in patterns:
        if glob.has_magic(pattern):
            matches = sorted(glob.glob(pattern, recursive=True))
            if not matches:
                raise UserError(f"{pattern}: no file matches")
        elif os.path.isdir(pattern) or os.path.isfile(pattern):
            matches = [pattern]
        else:
            raise UserError(f"{pattern}: no such file or directory")
        for match in matches:
            if os.path.isdir(match):
                inside = []
                for root, dirs, names in os.walk(match):
                    dirs[:] = [d for d in dirs if not d.startswith(".")]
                    inside.extend(os.path.join(root, n) for n in names if not n.startswith(".") and input_format(n))
                if not inside:
                    raise UserError(f"{match}: directory holds no input file ({', '.join(FORMATS)})")
                found.extend(sorted(inside))
            elif input_format(match):
                found.append(match)
            elif not glob.has_magic(pattern):
                raise UserError(f"{match}: unsupported input format (expected one of {', '.join(FORMATS)})")
    if exclude is not None:
        out = os.path.abspath(exclude) + os.sep
        found = [f for f in found if not os.path.abspath(f).startswith(out)]
    return list(dict.fromkeys(found))


@dataclass(frozen=True)
class Segment:
    path: str
    fmt: str
    start: int = 0          # byte offset, or row group index for parquet
    end: int | None = None  # byte end; None: the whole file (or the whole row group)
    size: int = 0           # bytes, for scheduling and progress

    def provenance(self) -> dict:
        d = {"path": self.path}
        if self.fmt == "parquet" and self.end is not None:
            d["row_group"] = self.start
        elif self.end is not None:
            d["bytes"] = [self.start, self.end]
        return d


def plan_segments(paths: list[str], max_bytes: int, txt_doc: str) -> list[Segment]:
    segments = []
    for path in paths:
        fmt = input_format(path)
        size = os.path.getsize(path)
        if fmt == "jsonl" or (fmt == "txt" and txt_doc == "line"):
            ranges = _line_aligned_ranges(path, size, max_bytes, universal=fmt == "txt")
            segments.extend(Segment(path, fmt, a, b, b - a) for a, b in ranges)
        elif fmt == "parquet":
            segments.extend(_parquet_segments(path, size))
        else:
            segments.append(Segment(path, fmt, 0, None, size))
    return segments


def _line_aligned_ranges(path: str, size: int, max_bytes: int, universal: bool = False):
    """Cut [0, size) near every multiple of max_bytes, each cut moved to the next line start (after a "\n", or
    with `universal` also after a lone "\r": text files from old Macs end lines with CR only)."""
    cuts = [0]
    with open(path, "rb") as f:
        for target in range(max_bytes, size, max_bytes):
            if target > cuts[-1]:
                cut = _line_start_at_or_after(f, target, universal)
                if cut >= size:
                    break
                cuts.append(cut)
    cuts.append(size)
    return [(a, b) for a, b in zip(cuts, cuts[1:], strict=False) if b > a]


def _line_start_at_or_after(f, pos: int, universal: bool = False) -> int:
    """Scans in blocks, so a very long line costs no memory."""
    f.seek(pos - 1)  # `pos` itself is a line start when the byte before it ends a line
    start = pos - 1
    while block := f.read(READ_BLOCK):
        match = (_EOL_BYTE if universal else _LF).search(block)
        if match:
            i = match.start()
            if block[i] == 0x0D:  # "\r": a line end of its own unless "\n" follows
                after = block[i + 1:i + 2] or f.read(1)
                return start + i + 1 + (after == b"\n")
            return start + i + 1
        start += len(block)
    return start


_LF = re.compile(rb"\n")
_EOL_BYTE = re.compile(rb"[\r\n]")
_EOL = re.compile(rb"\r\n|\r|\n")


def _universal_lines(f, limit: int | None = None) -> Iterator[bytes]:
    """The lines of a binary file (at most `limit` bytes of it), split at "\r\n", "\r" or "\n" and without them;
    read in blocks, so that a file with CR line ends is not one line held in memory."""
    pending: list[bytes] = []
    left = limit
    while True:
        block = f.read(READ_BLOCK if left is None else min(READ_BLOCK, left))
        if not block:
            break
        while block.endswith(b"\r") and (left is None or left > len(block)):  # keep "\r\n" in one block
            extra = f.read(1)
            if not extra:
                break
            block += extra
        if left is not None:
            left -= len(block)
        parts = _EOL.split(block)
        if len(parts) == 1:
            pending.append(block)
            continue
        parts[0] = b"".join(pending) + parts[0]
        pending = [parts.pop()]
        yield from parts
    if rest := b"".join(pending):
        yield rest


def _parquet_segments(path: str, size: int) -> list[Segment]:
    import pyarrow.parquet as pq
    try:
        meta = pq.ParquetFile(path).metadata
    except Exception:  # unreadable: the reader reports it as a counted skip (or a --strict error)
        return [Segment(path, "parquet", 0, None, size)]
    return [Segment(path, "parquet", i, i + 1, meta.row_group(i).total_byte_size) for i in range(meta.num_row_groups)]


# ----------------------------------------------------------------------------------------------- reading

@dataclass(frozen=True)
class Bad:
    """A record that cannot be used, with the reason counted in the manifest."""
    reason: str
    detail: str = ""
    where: str | None = None  # overrides the reader's location when the reader knows better


REASONS = {
    "invalid_utf8": "invalid UTF-8",
    "invalid_json": "invalid JSON",
    "not_an_object": "not a JSON object",
    "missing_key": "missing key",
    "not_a_string": "not a string",
    "empty": "empty document",
    "binary": "binary data",
    "unreadable": "unreadable file",
    "bad_messages": "malformed messages",
    "bad_role": "unknown role",
    "no_assistant": "no assistant turn",
    "identical_pair": "chosen and rejected are identical",
    "bad_label": "label not true or false",
    "too_long": "too long",
    "template_error": "the chat template refused it",
    "template_split": "the chat template's rendering cannot be split into turns",
    "unsupported": "unsupported content",
}


class SegmentReader:
    """Iterates (position, record) over a segment; `where(position)` names the file and line for messages.

    A record is a dict or str as parsed, or a Bad. Blank lines in line-oriented files are not records.
    """

    def __init__(self, seg: Segment, columns: list[str] | None = None, txt_doc: str = "file"):
        self.seg, self.columns, self.txt_lines = seg, columns, txt_doc == "line"
        self._line_base: int | None = None

    def where(self, pos: int) -> str:
        seg = self.seg
        if seg.fmt in ("jsonl", "txt") and seg.end is not None:
            if self._line_base is None:  # counted only when a message needs it
                self._line_base = _count_lines(seg.path, seg.start, universal=seg.fmt == "txt")
            return f"{seg.path}:{self._line_base + pos + 1}"
        if seg.fmt in ("jsonl.gz", "txt.gz"):
            return f"{seg.path}:{pos + 1}"
        if seg.fmt == "json":
            return f"{seg.path}[{pos}]"
        if seg.fmt == "parquet":
            return f"{seg.path}:row {pos}"
        return seg.path

    def __iter__(self) -> Iterator[tuple[int, object]]:
        fmt = self.seg.fmt
        if fmt == "jsonl":
            yield from ((i, _parse_json_line(line)) for i, line in self._lines())
        elif fmt == "jsonl.gz":
            yield from ((i, line if isinstance(line, Bad) else _parse_json_line(line)) for i, line in self._gzip_lines())
        elif fmt in ("txt", "txt.gz") and self.txt_lines:
            yield from ((i, line if isinstance(line, Bad) else _decode(line)) for i, line in self._text_lines())
        elif fmt in ("txt", "txt.gz"):
            yield 0, self._whole_text()
        elif fmt == "json":
            yield from self._json_array()
        elif fmt == "parquet":
            yield from self._parquet_rows()
        else:
            raise ValueError(fmt)

    def _lines(self) -> Iterator[tuple[int, bytes]]:
        """Non-blank lines of the byte range [start, end) (line-aligned), numbered from 0 at `start`."""
        seg = self.seg
        with open(seg.path, "rb", buffering=READ_BLOCK) as f:
            f.seek(seg.start)
            pos = seg.start
            for lineno, line in enumerate(f):
                if pos >= seg.end:
                    break
                pos += len(line)
                if lineno == 0 and seg.start == 0:
                    line = line.removeprefix(BOM_BYTES)
                if line and not line.isspace():
                    yield lineno, line

    def _text_lines(self) -> Iterator[tuple[int, bytes | Bad]]:
        """Non-blank lines of a text file or segment at any line end (LF, CRLF, CR), numbered from 0."""
        seg = self.seg
        try:
            with (gzip.open(seg.path, "rb") if seg.fmt == "txt.gz" else open(seg.path, "rb")) as f:
                f.seek(seg.start)
                limit = None if seg.end is None else seg.end - seg.start
                lineno = -1
                for lineno, line in enumerate(_universal_lines(f, limit)):
                    if lineno == 0 and seg.start == 0:
                        line = line.removeprefix(BOM_BYTES)
                    if line and not line.isspace():
                        yield lineno, line
        except (OSError, EOFError, zlib.error) as e:
            yield lineno + 1, Bad("unreadable", f"corrupt gzip: {e}", f"{seg.path}:{lineno + 2}")

    def _gzip_lines(self) -> Iterator[tuple[int, bytes | Bad]]:
        lineno = 0
        try:
            with gzip.open(self.seg.path, "rb") as f:
                for lineno, line in enumerate(f):
                    if lineno == 0:
                        line = line.removeprefix(BOM_BYTES)
                    if line and not line.isspace():
                        yield lineno, line
        except (OSError, EOFError, zlib.error) as e:
            yield lineno, Bad("unreadable", f"corrupt gzip: {e}", f"{self.seg.path}:{lineno + 1}")

    def _read_all(self) -> bytes | Bad:
        try:
            if self.seg.fmt.endswith(".gz"):
                with gzip.open(self.seg.path, "rb") as f:
                    return f.read()
            with open(self.seg.path, "rb") as f:
                return f.read()
        except (OSError, EOFError, zlib.error) as e:
            return Bad("unreadable", str(e))

    def _whole_text(self) -> str | Bad:
        data = self._read_all()
        if isinstance(data, Bad):
            return data
        return self._decode_file(data)

    def _decode_file(self, data: bytes) -> str | Bad:
        try:
            return data.decode("utf-8").removeprefix(BOM)
        except UnicodeDecodeError as e:
            line = data.count(b"\n", 0, e.start) + 1
            return Bad("invalid_utf8", f"byte 0x{data[e.start]:02x}", f"{self.seg.path}:{line}")

    def _json_array(self) -> Iterator[tuple[int, object]]:
        data = self._read_all()
        if isinstance(data, Bad):
            yield 0, data
            return
        text = self._decode_file(data)
        if isinstance(text, Bad):
            yield 0, text
            return
        try:
            value = json.loads(text)
        except json.JSONDecodeError as e:
            yield 0, Bad("invalid_json", e.msg, f"{self.seg.path}:{e.lineno}")
            return
        if not isinstance(value, list):
            yield 0, Bad("invalid_json", "expected a JSON array of records", self.seg.path)
            return
        yield from enumerate(value)

    def _parquet_rows(self) -> Iterator[tuple[int, object]]:
        import pyarrow.parquet as pq
        seg = self.seg
        try:
            pf = pq.ParquetFile(seg.path)
        except Exception as e:
            yield 0, Bad("unreadable", f"not a readable parquet file ({str(e).splitlines()[0]})", seg.path)
            return
        if seg.end is None:  # the file opened now but not at planning time: it changed underneath us
            yield 0, Bad("unreadable", "file changed since the job was planned", seg.path)
            return
        names = pf.schema_arrow.names
        columns = [c for c in self.columns if c in names] if self.columns is not None else names
        row = sum(pf.metadata.row_group(i).num_rows for i in range(seg.start))
        try:
            for batch in pf.iter_batches(row_groups=[seg.start], columns=columns, batch_size=4096):
                cols = {name: batch.column(name).to_pylist() for name in batch.schema.names}
                for i in range(batch.num_rows):
                    yield row, {name: values[i] for name, values in cols.items() if values[i] is not None}
                    row += 1
        except Exception as e:
            yield row, Bad("unreadable", f"corrupt parquet data ({str(e).splitlines()[0]})")


def _parse_json_line(line: bytes) -> object:
    try:
        return orjson.loads(line)  # fast path; on any failure the standard library classifies the problem
    except orjson.JSONDecodeError:
        pass
    text = _decode(line.rstrip(b"\r\n"))
    if isinstance(text, Bad):
        return text
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        return Bad("invalid_json", e.msg)


def _decode(data: bytes) -> str | Bad:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        return Bad("invalid_utf8", f"byte 0x{data[e.start]:02x} at column {e.start + 1}")


def _count_lines(path: str, end: int, universal: bool = False) -> int:
    """Line ends in the first `end` bytes: "\n", and with `universal` also a "\r" not followed by "\n"."""
    count, last = 0, b""
    with open(path, "rb") as f:
        while end > 0:
            block = f.read(min(READ_BLOCK, end))
            if not block:
                break
            count += block.count(b"\n")
            if universal:
                count += block.count(b"\r") - block.count(b"\r\n") - (last == b"\r" and block[:1] == b"\n")
                last = block[-1:]
            end -= len(block)
    return count
