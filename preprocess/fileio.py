"""Crash-safe file writing: every file is written under a temporary name, fsynced, then renamed, so a final
name never shows a half-written file. Temporary names carry the host and process id, so two processes writing
the same (deterministic) file — also from two machines onto a shared filesystem — never interfere."""

from __future__ import annotations

import contextlib
import glob
import hashlib
import os
import shutil
import socket
import time

import numpy as np

from .errors import naming

TMP_MARK = ".tmp-"


def tmp_name(path: str) -> str:
    return f"{path}{TMP_MARK}{socket.gethostname()}-{os.getpid()}"


def numbered_lines(path: str) -> list[tuple[int, str]]:
    """(line number, text) of every non-blank line of a UTF-8 text file, split at newlines only: JSON may hold
    U+2028 and other characters that str.splitlines would also split at."""
    from .errors import UserError

    try:
        text = open(path, encoding="utf-8").read()
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text (byte {e.start})") from None
    return [(n, line.rstrip("\r")) for n, line in enumerate(text.split("\n"), 1) if line.strip()]


def file_sha256(path: str, offset: int = 0, length: int | None = None) -> str:
    """sha256 of a file, or of `length` bytes of it from `offset` (a shard's range of an imported file)."""
    h = hashlib.sha256()
    left = float("inf") if length is None else length
    with open(path, "rb") as f:
        f.seek(offset)
        while left > 0 and (block := f.read(int(min(1 << 22, left)))):
            h.update(block)
            left -= len(block)
    return h.hexdigest()


def fsync_path(path: str) -> None:
    """Flush a file or a directory (its names) to the disk, whoever wrote it on this machine."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_then_rename(path: str, write) -> None:
    """write(tmp) fills a temporary name of this process, which is fsynced and renamed to path: path is either
    absent, the old file, or the whole new one."""
    tmp = tmp_name(path)
    try:
        with naming(path):
            write(tmp)
            fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException:
        _unlink_quietly(tmp)
        raise


def atomic_write(path: str, data: bytes) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)

    write_then_rename(path, write)


def copy_durably(src: str, dst: str) -> None:
    write_then_rename(dst, lambda tmp: shutil.copyfile(src, tmp))


def remove_stale_tmp(directory: str, finished=lambda final: False, max_age_s: float = 3600.0) -> int:
    """Delete temporary files left by killed runs; returns how many there were.

    Another process may be writing one right now (two ranks finishing together both write the manifest), so a
    temporary file goes only if its final name is `finished(final)` (nobody writes it again), its process is
    gone from this host, or it comes from another host and has not changed for `max_age_s`."""
    host = socket.gethostname()
    removed = 0
    for path in glob.glob(os.path.join(glob.escape(directory), f"**/*{TMP_MARK}*"), recursive=True):
        final, _, owner = path.rpartition(TMP_MARK)
        owner_host, _, pid = owner.rpartition("-")
        if finished(final):
            stale = True
        elif owner_host == host and pid.isdigit():
            stale = not _process_exists(int(pid))
        else:
            try:
                stale = time.time() - os.path.getmtime(path) > max_age_s
            except FileNotFoundError:
                continue
        if stale:
            _unlink_quietly(path)
            removed += 1
    return removed


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


class NpyWriter:
    """Streams a 1-D array of unknown final length into a .npy file.

    The header of a 1-D .npy is always 128 bytes, so it is written first with length 0 and rewritten with the
    real length on commit(). Use as a context manager: leaving it without commit() deletes the temporary file.
    """

    def __init__(self, path: str, dtype):
        self.path, self.dtype, self.count = path, np.dtype(dtype), 0
        self.tmp = tmp_name(path)
        self.file = open(self.tmp, "wb")
        self._write_header()

    def _write_header(self) -> None:
        header = {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False, "shape": (self.count,)}
        start = self.file.tell()
        np.lib.format.write_array_header_1_0(self.file, header)
        assert self.file.tell() - start == 128, "unexpected .npy header size"

    def write(self, array: np.ndarray) -> None:
        if array.dtype != self.dtype:
            raise TypeError(f"{self.path}: expected {self.dtype}, got {array.dtype}")
        with naming(self.path):
            self.file.write(memoryview(np.ascontiguousarray(array)).cast("B"))
        self.count += len(array)

    def commit(self) -> dict:
        """Make the file visible under its final name; returns its size and sha256."""
        with naming(self.path):
            self.file.seek(0)
            self._write_header()
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()
        digest = file_sha256(self.tmp)
        size = os.path.getsize(self.tmp)
        os.replace(self.tmp, self.path)
        return {"bytes": size, "sha256": digest}

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if not self.file.closed:
            with contextlib.suppress(OSError):  # closing flushes, which fails again on a full disk
                self.file.close()
        if os.path.exists(self.tmp):  # not committed
            _unlink_quietly(self.tmp)
