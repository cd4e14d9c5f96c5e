"""The spool before the database (usage/spool.py): every pop is sealed and fsynced to a local
file first, counted from there, and removed only once its batches committed.

The first tests run in this process; the last ones run `manage.py sync_usage` as a real
process against a database that another process locks, or whose disk is full."""

from __future__ import annotations

import glob
import json
import os
import shutil
import socket
import stat
import subprocess
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import pytest
from django.core.management import CommandError
from django.db.models import Sum

from tests.fakes.sync_process import Locker, checkpoint, finish, wait_for
from tests.usage.conftest import sync
from usage import services, spool
from usage.models import QuarantinedRecord, UsageBatch, UsageSnapshot

T0 = datetime(2026, 11, 22, 3, 10, tzinfo=timezone.utc).timestamp()


class Killed(Exception):
    """Stands for the process dying at this line."""


def counted() -> int:
    return UsageSnapshot.objects.aggregate(n=Sum("requests"))["n"] or 0


def fill(proxy, people_keys, n: int) -> None:
    for i in range(n):
        proxy.add_usage(people_keys[i % 3].value, timestamp=T0 + i / 1000)


def spool_files(settings) -> list[Path]:
    return spool.pending_files(Path(settings.USAGE_SPOOL_DIR))


# --- in this process ---------------------------------------------------------------------------


@pytest.mark.django_db
def test_a_spooled_body_is_sealed_private_and_gone_once_counted(fake_proxy, people_keys,
                                                               settings, monkeypatch):
    settings.CLIPROXY_USAGE_MODE = "queue"
    fill(fake_proxy, people_keys, 30)
    seen: list[bytes] = []
    real_import = services._spool_import

    def looking(path, state):
        seen.append(path.read_bytes())
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        return real_import(path, state)

    monkeypatch.setattr(services, "_spool_import", looking)
    sync()

    assert counted() == 30 and len(seen) == 1
    assert seen[0].startswith(spool.MAGIC)
    for held in people_keys:  # no client key in clear on the disk
        assert held.value.encode() not in seen[0]
    assert b"mock-gpt" not in seen[0]  # nothing of the body in clear
    assert stat.S_IMODE(Path(settings.USAGE_SPOOL_DIR).stat().st_mode) == 0o700
    assert spool_files(settings) == []
    assert UsageBatch.objects.get().spool.endswith(f".pop:{spool.piece_limit()}:0")


@pytest.mark.django_db
def test_a_run_that_dies_between_the_commit_and_the_removal_counts_once(
    fake_proxy, people_keys, settings, monkeypatch
):
    settings.CLIPROXY_USAGE_MODE = "queue"
    settings.USAGE_QUEUE_BATCH = 10
    fill(fake_proxy, people_keys, 25)
    with monkeypatch.context() as patched:
        def dying(path):
            raise Killed(path.name)

        patched.setattr(spool, "remove", dying)
        with pytest.raises(Killed):
            sync()
    assert counted() == 10 and len(spool_files(settings)) == 1  # counted, file still there

    sync()

    assert counted() == 25  # the file's batch was not stored a second time
    assert spool_files(settings) == []


@pytest.mark.django_db
def test_a_body_over_the_memory_cap_is_counted_in_pieces_and_the_pops_shrink(
    fake_proxy, people_keys, settings
):
    settings.CLIPROXY_USAGE_MODE = "queue"
    settings.USAGE_QUEUE_BATCH = 3000
    settings.CLIPROXY_MAX_ANSWER_BYTES = 256 * 1024  # pieces of 64 KiB (the least)
    fill(fake_proxy, people_keys, 4000)

    out = sync()

    assert counted() == 4000
    pieces = UsageBatch.objects.filter(spool__isnull=False).order_by("pk")
    assert pieces.count() > 3  # the first pop (~800 KB) was not read whole
    assert sum(p.record_count for p in pieces) == 4000
    assert "so the next pops ask for" in out
    # The second pop asked for fewer records than the first.
    first = pieces.first().spool.split(":")[0]
    assert pieces.filter(spool__startswith=first).aggregate(n=Sum("record_count"))["n"] == 3000


@pytest.mark.django_db
def test_an_answer_cut_mid_way_keeps_its_complete_records_and_sets_the_rest_aside(
    fake_proxy, people_keys, settings
):
    settings.CLIPROXY_USAGE_MODE = "queue"
    settings.USAGE_QUEUE_BATCH = 20
    fill(fake_proxy, people_keys, 50)
    whole = json.dumps([fake_proxy.queue[i][1] for i in range(20)]).encode()
    one = len(whole) // 20
    fake_proxy.cut_pops, fake_proxy.cut_after = 1, one * 7 + one // 2  # 7 whole records, then half

    with pytest.raises(CommandError, match="cut off"):
        sync()

    assert counted() == 7
    aside = QuarantinedRecord.objects.get()
    assert aside.reason.startswith("Answer cut short") and "7 complete records" in aside.reason
    kept = list((Path(settings.USAGE_SPOOL_DIR) / spool.QUARANTINE).iterdir())
    assert len(kept) == 1 and kept[0].name in aside.reason
    assert spool_files(settings) == []

    sync()  # the next run goes on with the rest of the queue
    assert counted() == 7 + 30
    assert QuarantinedRecord.objects.count() == 1  # the cut is filed once


@pytest.mark.django_db
def test_a_body_left_half_written_by_a_killed_run_is_recovered(fake_proxy, people_keys,
                                                              settings):
    """kill -9 while the answer arrived: the temporary file of a dead process is adopted, and
    its complete records counted."""
    settings.CLIPROXY_USAGE_MODE = "queue"
    records = [{"timestamp": "2026-11-22T03:10:00.000000001Z", "api_key": people_keys[0].value,
                "model": "mock-gpt", "failed": False,
                "tokens": {"input_tokens": 11, "output_tokens": 7, "total_tokens": 18}}] * 2000
    body = json.dumps(records).encode()
    writer = spool.SpoolWriter(spool.spool_dir())
    part = body[: len(body) * 3 // 4]
    for i in range(0, len(part), 16 * 1024):  # as the answer arrives
        writer.write(part[i : i + 16 * 1024])  # frames of 64 KiB reach the file as they fill
    writer._close()  # the process died here
    dead = _dead_pid()
    orphan = writer.tmp.with_name(f"{spool.TMP_PREFIX}{dead}-{writer.name}")
    os.rename(writer.tmp, orphan)

    sync()

    # What reached the file: every whole frame of 64 KiB (the unsealed rest died with it).
    reached = (len(body) * 3 // 4) // spool.FRAME_BYTES * spool.FRAME_BYTES
    per_record = len(json.dumps(records[0])) + 2
    assert reached // per_record - 1 <= counted() <= reached // per_record
    assert "kill -9" in QuarantinedRecord.objects.get().reason
    assert not orphan.exists() and spool_files(settings) == []


def _dead_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


@pytest.mark.django_db
def test_a_spool_file_sealed_with_another_secret_waits_for_it(fake_proxy, people_keys,
                                                             settings):
    settings.CLIPROXY_USAGE_MODE = "queue"
    original = settings.SECRET_KEY
    settings.SECRET_KEY = "another-secret-key-another-secret-key-another"
    writer = spool.SpoolWriter(spool.spool_dir())
    writer.write(json.dumps([{"timestamp": "2026-11-22T03:10:00Z",
                              "api_key": people_keys[0].value, "model": "mock-gpt",
                              "tokens": {"input_tokens": 1}}]).encode())
    writer.finish()
    settings.SECRET_KEY = original

    with pytest.raises(CommandError, match="cannot be opened"):
        sync()
    assert counted() == 0 and len(spool_files(settings)) == 1

    settings.SECRET_KEY = "another-secret-key-another-secret-key-another"
    sync()
    assert counted() == 1 and spool_files(settings) == []


# --- real processes -----------------------------------------------------------------------------




def test_a_database_locked_past_the_retry_loses_nothing(sync_bench):
    b = sync_bench(batch=100, retry_seconds=2, busy_timeout=0.5)
    b.serve(450)
    lockers: list[Locker] = []

    def lock_on_second_pop(method: str, path: str) -> None:
        if path == "/usage-queue" and b.proxy.popped == 100 and not lockers:
            lockers.append(Locker(b.database))  # another writer takes SQLite mid-run

    b.proxy.on_management = lock_on_second_pop
    try:
        run = b.run("sync_usage")
        assert run.returncode == 75, run.stderr
        assert "Traceback" not in run.stderr
        line = run.stderr.strip()
        assert len(line.splitlines()) == 1 and "locked" in line
        assert "saved 350 records in the spool; they are counted at the next run" in line
        assert b.proxy.popped == 450 and len(b.spooled()) == 4  # the rest went to the spool
    finally:
        for locker in lockers:
            locker.release()

    b.proxy.on_management = None
    rerun = b.run("sync_usage")

    assert rerun.returncode == 0, rerun.stderr
    totals = b.totals()
    assert totals["counted"] == b.served == 450 and totals["pending"] == 0
    assert b.spooled() == []
    assert totals["runs"] == 2 and totals["failed_runs"] == 1  # the failed run was filed too


def test_a_following_sync_survives_a_locked_database_and_counts_everything_after(sync_bench):
    b = sync_bench(batch=100, retry_seconds=1, busy_timeout=0.3)
    b.serve(200)
    follower = b.start("sync_usage", "--follow", "--interval", "0.2")
    try:
        wait_for(lambda: b.totals()["counted"] == 200, "the first records counted",
                 process=follower)
        runs_before = b.totals()["runs"]
        locker = Locker(b.database)
        try:
            b.serve(300)
            # Popped into the spool while the database is locked, over several retries.
            wait_for(lambda: not b.proxy.queue and len(b.spooled()) >= 1,
                     "the queue drained into the spool", process=follower)
            b.serve(100)
            wait_for(lambda: not b.proxy.queue, "more pops into the spool", process=follower)
            # Locked for longer than the retry, pass after pass: each failed pass is filed
            # in the spool until the database takes it.
            wait_for(lambda: len(list((b.spool / spool.RUNS).glob("*.json"))) >= 2,
                     "two passes over the retry", process=follower)
            kept = len(list((b.spool / spool.RUNS).glob("*.json")))
        finally:
            locker.release()
        wait_for(lambda: b.totals()["counted"] == b.served == 600,
                 "everything counted once the lock is gone", process=follower)
        wait_for(lambda: not list((b.spool / spool.RUNS).glob("*.json")),
                 "the failed passes filed as SyncRuns", process=follower)
        # Every pass kept in the spool is filed. (Not all of them failed: a pass whose only
        # database write was its own run row met the lock there and was kept as it ended, ok.)
        assert b.totals()["runs"] >= runs_before + kept and b.totals()["failed_runs"] >= 1
        assert follower.poll() is None  # still running
    finally:
        follower.terminate()
        code, out, err = finish(follower)
    assert code == 0 and "Traceback" not in err
    assert "locked" in err  # told, once per kind a minute
    assert err.count("locked") == 1, err
    assert b.spooled() == []


@pytest.fixture
def tiny_disk(tmp_path):
    mount = tmp_path / "tiny"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)],
                          capture_output=True)
    if done.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def _fill(directory: Path) -> Path:
    """Fills the file system to its last byte."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for size in (1 << 16, 1 << 12, 1 << 9, 1):
            try:
                while True:
                    os.write(fd, b"\0" * size)
            except OSError:
                pass
    finally:
        os.close(fd)
    return filler


def test_a_full_disk_under_the_database_loses_nothing(sync_bench, tiny_disk):
    b = sync_bench(batch=500, database=tiny_disk / "db.sqlite3", retry_seconds=1, busy_timeout=0.3)
    b.serve(3000)
    fillers: list[Path] = []

    def fill_on_first_pop(method: str, path: str) -> None:
        if path == "/usage-queue" and not fillers:
            checkpoint(b.database)  # the WAL starts empty: new writes need new space
            fillers.append(_fill(tiny_disk))

    b.proxy.on_management = fill_on_first_pop
    run = b.run("sync_usage")
    assert run.returncode == 75, run.stderr
    assert "Traceback" not in run.stderr and "full" in run.stderr
    assert b.proxy.popped == 3000 and len(b.spooled()) >= 1  # on the normal disk

    for filler in fillers:
        filler.unlink()
    b.proxy.on_management = None
    rerun = b.run("sync_usage")

    assert rerun.returncode == 0, rerun.stderr
    assert b.totals()["counted"] == b.served == 3000
    assert b.spooled() == []
    shutil.rmtree(b.spool, ignore_errors=True)


@pytest.mark.django_db
def test_a_spool_on_a_full_disk_falls_back_to_the_database(fake_proxy, people_keys, settings,
                                                           tiny_disk):
    """The spool's own disk fills up in the middle of an answer: the answer is still read to
    its end (it is gone from the proxy) and stored in the database directly."""
    settings.CLIPROXY_USAGE_MODE = "queue"
    settings.USAGE_QUEUE_BATCH = 3000  # ~700 KB a pop: several 64 KiB frames
    settings.USAGE_SPOOL_DIR = tiny_disk / "spool"
    spool.spool_dir()
    filler = _fill(tiny_disk)
    os.truncate(filler, filler.stat().st_size - 16 * 1024)  # room for a few sealed frames
    fill(fake_proxy, people_keys, 7000)

    out = sync()

    assert counted() == 7000
    assert "USAGE_SPOOL_DIR) cannot be written (No space left on device)" in out
    assert spool_files(settings) == [] and not list((tiny_disk / "spool").glob(".tmp-*"))


class OwnPostgres:
    """A throw-away PostgreSQL cluster on 127.0.0.1 that a test can stop and start again."""

    def __init__(self) -> None:
        bins = sorted(glob.glob("/usr/lib/postgresql/*/bin"))
        if not bins or shutil.which("runuser") is None and os.getuid() == 0:
            pytest.skip("no PostgreSQL server binaries here")
        self.bin = Path(bins[-1])
        self.dir = Path(tempfile.mkdtemp(prefix="keyportal-pg-"))
        self.as_owner: list[str] = []
        if os.getuid() == 0:  # the server refuses root: run it as the postgres user
            try:
                shutil.chown(self.dir, "postgres")
            except LookupError:
                pytest.skip("no postgres user to run the server as")
            self.as_owner = ["runuser", "-u", "postgres", "--"]
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self._run("initdb", "-D", str(self.dir / "data"), "-U", "keyportal", "--auth=trust",
                  "-E", "UTF8")
        self.start()
        self._run("createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", "keyportal",
                  "keyportal")
        self.url = f"postgres://keyportal@127.0.0.1:{self.port}/keyportal"

    def _run(self, tool: str, *args: str) -> None:
        done = subprocess.run([*self.as_owner, str(self.bin / tool), *args],
                              capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"{tool} failed: {done.stderr[-1000:]}")

    def start(self) -> None:
        self._run("pg_ctl", "-D", str(self.dir / "data"), "-l", str(self.dir / "log"), "-w",
                  "-o", f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 "
                  "-c fsync=off", "start")

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.dir / "data"), "-m", "immediate", "-w", "stop")

    def remove(self) -> None:
        subprocess.run([*self.as_owner, str(self.bin / "pg_ctl"), "-D", str(self.dir / "data"),
                        "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(self.dir, ignore_errors=True)


def test_postgresql_going_down_mid_run_loses_nothing(sync_bench):
    pg = OwnPostgres()
    try:
        b = sync_bench(batch=100, database_url=pg.url, retry_seconds=2)
        b.serve(450)
        stopped: list[bool] = []

        def stop_on_second_pop(method: str, path: str) -> None:
            if path == "/usage-queue" and b.proxy.popped == 100 and not stopped:
                pg.stop()  # the server crashes while the pop is in flight
                stopped.append(True)

        b.proxy.on_management = stop_on_second_pop
        run = b.run("sync_usage")
        assert run.returncode == 75, run.stderr
        assert "Traceback" not in run.stderr, run.stderr
        assert "cannot be reached" in run.stderr
        # The pop in flight went to the spool; no further pop was sent without a database
        # (the refusal latch lives in the database cache): the proxy keeps the rest.
        assert "saved 100 records in the spool" in run.stderr
        assert b.proxy.popped == 200 and len(b.spooled()) == 1

        pg.start()
        b.proxy.on_management = None
        rerun = b.run("sync_usage")

        assert rerun.returncode == 0, rerun.stderr
        totals = b.totals()
        assert totals["counted"] == b.served == 450 and totals["pending"] == 0
        assert totals["failed_runs"] == 1 and b.spooled() == []
    finally:
        pg.remove()
