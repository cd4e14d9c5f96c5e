"""The spool: each popped `/usage-queue` body goes to a local file, sealed and fsynced, before
anything else can fail; the database is written from the file afterwards.

Why: the proxy forgets a record once popped, so between the pop and the database commit the
body existed only in this process. A locked database (another writer holding SQLite past its
busy timeout), a full disk or a PostgreSQL restart then lost it. Now the body is on disk
first, and a file leaves the spool only after its UsageBatch rows committed
(usage.services imports it; the batch's `spool` name makes the import idempotent).

A file (USAGE_SPOOL_DIR, 0700, files 0600):
    b"KPSPOOL1" + 16 hex chars of file id
    frames: 4-byte big-endian length, 1 kind byte (b"d" data, b"e" end), then the frame
            sealed by pool.escrow.frame_seal (zlib + AES-GCM), its AAD binding file id, index
            and kind, so frames cannot be dropped, reordered or moved between files unseen.
    the end frame holds JSON {"bytes": n, "cut": ""} ("cut": why the answer stopped short).
The body holds plaintext client keys, hence the sealing; frames let a streamed answer be
written as it arrives, never whole in memory. A file is written as `.tmp-<pid>-<name>`,
fsynced, renamed into place, and the directory fsynced: a file with a final name is whole.
A temporary file whose writer died (kill -9 during the read) is adopted as a cut answer.

Reading splits a body into pieces of at most `piece_limit()` characters along its records
(an incremental json raw_decode over the array), so a body bigger than the memory cap
(CLIPROXY_MAX_ANSWER_BYTES) is counted in bounded memory.
"""

from __future__ import annotations

import codecs
import itertools
import json
import os
import struct
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from django.conf import settings

from pool.escrow import frame_open, frame_seal

MAGIC = b"KPSPOOL1"
SUFFIX = ".pop"
TMP_PREFIX = ".tmp-"
QUARANTINE = "quarantine"
RUNS = "runs"
# Plaintext per frame, and what a process killed mid-read can lose at most: each frame is
# handed to the kernel as soon as it is sealed (flushed, not fsynced: fsync once, at the end).
FRAME_BYTES = 64 * 1024
MAX_RECORD_CHARS = 4 * 1024 * 1024  # one record bigger than this is garbage, not a record
_LENGTH = struct.Struct(">I")
_WS = " \t\r\n"


def spool_dir() -> Path:
    """USAGE_SPOOL_DIR, created 0700 (the files hold sealed client keys)."""
    directory = Path(settings.USAGE_SPOOL_DIR)
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    if directory.stat().st_mode & 0o077:
        os.chmod(directory, 0o700)
    return directory


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def piece_limit() -> int:
    """Characters of a body handled at once: an eighth of the answer cap (8 MiB by default),
    never under 64 KiB. A piece is held as text, as bytes, sealed, and parsed into records
    and rows while it is counted: about 12 times its size in memory (bench/spool_memory.py:
    16 MiB pieces peaked at 210 MiB, 4 MiB pieces at 102 MiB, for a 131 MiB answer). An
    eighth keeps a default pop (4,000 records, about 5 MB) whole: a body split into pieces is
    parsed twice (once to find where its records end), which put the PostgreSQL ingest at
    4.5x json.loads instead of under 3x."""
    cap = int(getattr(settings, "CLIPROXY_MAX_ANSWER_BYTES", 64 * 1024 * 1024))
    return max(64 * 1024, cap // 8)


class SpoolWriter:
    """One body on its way to the spool: `write` chunks as they arrive, then `finish` (whole
    or cut) or `discard` (nothing arrived)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.file_id = os.urandom(8).hex()
        self.name = f"{time.time_ns():020d}-{self.file_id}{SUFFIX}"
        self.tmp = directory / f"{TMP_PREFIX}{os.getpid()}-{self.name}"
        self._index = 0
        self._buffer = bytearray()
        self.size = 0
        self.head = b""  # the first bytes, to tell an empty answer (`[]`) without reading back
        self.failed: OSError | None = None  # the spool could not be written (see recover)
        self._offset = 0
        self._closed = True
        try:
            # Unbuffered: a write the disk refuses leaves nothing behind to be written later.
            self._fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            self._closed = False
            self._put(MAGIC + self.file_id.encode())
        except OSError as exc:
            self.failed = exc  # the body is held in memory instead (see recover)

    def write(self, chunk: bytes) -> None:
        if not chunk:
            return
        if len(self.head) < 16:
            self.head = (self.head + chunk)[:16]
        self.size += len(chunk)
        self._buffer += chunk
        if self.failed is None and len(self._buffer) >= FRAME_BYTES:
            try:
                self._frame(b"d", bytes(self._buffer))
            except OSError as exc:
                # The spool's disk is full or gone: the answer is still read to its end
                # (it is gone from the proxy), held in memory from here; see recover().
                self.failed = exc
                return
            self._buffer.clear()

    def recover(self) -> bytes:
        """The whole body after the spool could not be written: the frames that reached the
        file, then what was held in memory since."""
        self._close()
        if self._offset <= len(MAGIC) + 16:
            return bytes(self._buffer)
        written = SpoolReader(self.tmp)
        return b"".join(written.chunks()) + bytes(self._buffer)

    @property
    def empty(self) -> bool:
        return self.size <= 16 and self.head.strip() in (b"[]", b"")

    def _put(self, data: bytes) -> None:
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(self._fd, view):]
        except OSError:
            try:
                os.ftruncate(self._fd, self._offset)  # no half frame left in the file
            except OSError:
                pass
            raise
        self._offset += len(data)

    def _close(self) -> None:
        if not self._closed:
            self._closed = True
            os.close(self._fd)

    def _frame(self, kind: bytes, data: bytes) -> None:
        # Each frame goes to the kernel as soon as it is sealed (no fsync until the end).
        sealed = frame_seal(data, aad=_aad(self.file_id, self._index, kind))
        self._put(_LENGTH.pack(len(sealed)) + kind + sealed)
        self._index += 1

    def finish(self, *, cut: str = "") -> Path:
        """Seals the rest, fsyncs, renames into place, fsyncs the directory. `cut`: why the
        answer stopped short (it is then set aside when imported). Raises OSError when the
        spool cannot be written: recover() then has the body."""
        if self.failed is not None:
            raise self.failed
        if self._buffer:
            self._frame(b"d", bytes(self._buffer))
            self._buffer.clear()
        self._frame(b"e", json.dumps({"bytes": self.size, "cut": cut}).encode())
        os.fsync(self._fd)
        self._close()
        if self.failed is not None:
            raise self.failed
        final = self.directory / self.name
        os.rename(self.tmp, final)
        self.tmp = final  # what recover() and discard() work on from here
        _fsync_dir(self.directory)
        return final

    def discard(self) -> None:
        self._close()
        try:
            self.tmp.unlink(missing_ok=True)
        except OSError:
            pass


def _aad(file_id: str, index: int, kind: bytes) -> bytes:
    return f"{file_id}:{index}:".encode() + kind


class SpoolReader:
    """Reads one spool file back. After `chunks()` is exhausted, `cut` says why the body is
    incomplete ("" when whole). Raises EscrowUnreadable when sealed under another secret."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.cut = ""
        self.size = 0

    def chunks(self) -> Iterator[bytes]:
        with open(self.path, "rb") as f:
            head = f.read(len(MAGIC) + 16)
            if not head.startswith(MAGIC) or len(head) < len(MAGIC) + 16:
                self.cut = "the spool file has no header (it was never written whole)"
                return
            file_id = head[len(MAGIC):].decode("ascii", "replace")
            index = 0
            while True:
                prefix = f.read(_LENGTH.size + 1)
                if len(prefix) < _LENGTH.size + 1:
                    break
                (length,) = _LENGTH.unpack(prefix[:4])
                kind = prefix[4:5]
                sealed = f.read(length)
                if len(sealed) < length:
                    break
                data = frame_open(sealed, aad=_aad(file_id, index, kind))
                index += 1
                if kind == b"e":
                    end = json.loads(data)
                    self.cut = str(end.get("cut") or "")
                    self.size = int(end.get("bytes") or 0)
                    return
                yield data
        self.cut = ("the sync was stopped while this answer arrived (kill -9 or a crash); "
                    "the part before that was kept")

    def read_whole(self) -> bytes:
        return b"".join(self.chunks())


class Splitter:
    """Splits a JSON array arriving in chunks into pieces (bytes of a JSON array) of at most
    about `limit` characters, keeping each record's text exactly as the proxy sent it. After
    the pieces, `records` is how many came out and `error` why the rest could not be read
    ("" when the array was whole)."""

    def __init__(self, chunks: Iterable[bytes], *, limit: int) -> None:
        self._chunks = iter(chunks)
        self.limit = limit
        self.records = 0
        self.error = ""
        self.offset = 0  # characters consumed before the current buffer

    def pieces(self) -> Iterator[tuple[bytes, int]]:
        # surrogateescape: bytes that are not UTF-8 go through untouched; the checks in
        # usage.records decide what to do with them, as for a body read whole.
        decoder = codecs.getincrementaldecoder("utf-8")("surrogateescape")
        raw_decode = json.JSONDecoder().raw_decode
        buf, pos, eof = "", 0, False
        state = "start"
        piece: list[str] = []
        piece_chars = 0

        def more() -> bool:
            nonlocal buf, pos, eof
            if eof:
                return False
            try:
                chunk = next(self._chunks)
                text = decoder.decode(chunk)
            except StopIteration:
                text, eof = decoder.decode(b"", final=True), True
            self.offset += pos
            buf, pos = buf[pos:] + text, 0
            return True

        def flush() -> tuple[bytes, int]:
            nonlocal piece, piece_chars
            body = ("[" + ",".join(piece) + "]").encode("utf-8", "surrogateescape")
            n = len(piece)
            piece, piece_chars = [], 0
            return body, n

        while True:
            while pos < len(buf) and buf[pos] in _WS:
                pos += 1
            if pos >= len(buf):
                if more():
                    continue
                if state != "done":
                    self.error = _ended_early(self.records)
                break
            c = buf[pos]
            if state == "start":
                if c != "[":
                    self.error = "The proxy's usage queue answer is not a list of records."
                    break
                pos += 1
                state = "first"
            elif state in ("first", "value"):
                if state == "first" and c == "]":
                    pos += 1
                    state = "done"
                    continue
                try:
                    _value, end = raw_decode(buf, pos)
                except (ValueError, RecursionError):
                    end = -1
                if end == -1 or (end == len(buf) and not eof):
                    # Incomplete (or a number that may go on): read more, within reason.
                    if len(buf) - pos > MAX_RECORD_CHARS or not more():
                        self.error = (_ended_early(self.records) if eof
                                      else "The proxy's usage queue answer is not JSON.")
                        break
                    continue
                piece.append(buf[pos:end])
                piece_chars += end - pos
                self.records += 1
                pos = end
                state = "sep"
                if piece_chars >= self.limit:
                    yield flush()
            elif state == "sep":
                if c == ",":
                    state = "value"
                elif c == "]":
                    state = "done"
                else:
                    self.error = "The proxy's usage queue answer is not JSON."
                    break
                pos += 1
            else:  # done: only whitespace may follow
                self.error = "The proxy's usage queue answer is not JSON (data after the list)."
                break
        if piece:
            yield flush()


def _ended_early(records: int) -> str:
    return f"the answer ends before its list does ({records} complete records before that)"


def pieces_of(
    reader: SpoolReader, *, limit: int
) -> tuple[Iterator[tuple[bytes, int]], Splitter | None]:
    """The pieces of a spool file: a whole body that fits in one piece is handed on as it is
    (exactly as a body read whole always was); a bigger or cut one goes through a Splitter,
    returned so the caller can read its `error` once the pieces are consumed. Never more
    than about one piece is read ahead."""
    chunks = reader.chunks()
    head: list[bytes] = []
    size = 0
    for chunk in chunks:
        head.append(chunk)
        size += len(chunk)
        if size > limit:
            break
    else:
        if not reader.cut:
            return iter([(b"".join(head), -1)]), None
    splitter = Splitter(itertools.chain(head, chunks), limit=limit)
    return splitter.pieces(), splitter


def pending_files(directory: Path) -> list[Path]:
    """Files to import, oldest first; adopts temporary files whose writer process is gone."""
    for tmp in directory.glob(f"{TMP_PREFIX}*{SUFFIX}"):
        pid_text, _sep, name = tmp.name[len(TMP_PREFIX):].partition("-")
        try:
            pid = int(pid_text)
        except ValueError:
            continue
        if pid == os.getpid() or _alive(pid):
            continue
        if tmp.stat().st_size <= len(MAGIC) + 16:  # died before any of the answer arrived
            remove(tmp)
            continue
        os.rename(tmp, directory / name)  # read back as a cut answer (no end frame)
        _fsync_dir(directory)
    return sorted(directory.glob(f"[0-9]*{SUFFIX}"))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def set_aside(path: Path) -> Path:
    """Moves a cut body to the spool's quarantine directory, where it stays (sealed) for
    staff to look at; it is never imported again."""
    target_dir = path.parent / QUARANTINE
    target_dir.mkdir(exist_ok=True, mode=0o700)
    target = target_dir / path.name
    os.rename(path, target)
    _fsync_dir(path.parent)
    return target


def remove(path: Path) -> None:
    path.unlink(missing_ok=True)
    _fsync_dir(path.parent)


def records_in(path: Path) -> int:
    """How many complete records a spool file holds (read in bounded memory)."""
    splitter = Splitter(SpoolReader(path).chunks(), limit=piece_limit())
    for _piece in splitter.pieces():
        pass
    return splitter.records


# --- sync runs the database could not take --------------------------------------------------


def run_save(fields: dict[str, object]) -> None:
    """Keeps a SyncRun the database refused (it holds counts and a sentence, no key) until a
    run that can write it."""
    directory = spool_dir() / RUNS
    directory.mkdir(exist_ok=True, mode=0o700)
    path = directory / f"{time.time_ns():020d}.json"
    tmp = directory / f".{path.name}"
    tmp.write_text(json.dumps(fields, default=str))
    os.rename(tmp, path)


def runs_pending() -> list[tuple[Path, dict[str, object]]]:
    directory = spool_dir() / RUNS
    if not directory.is_dir():
        return []
    runs = []
    for path in sorted(directory.glob("[0-9]*.json")):
        try:
            runs.append((path, json.loads(path.read_text())))
        except (OSError, ValueError):
            path.unlink(missing_ok=True)  # a run's summary only; its records are elsewhere
    return runs
