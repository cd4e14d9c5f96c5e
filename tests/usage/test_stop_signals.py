"""SIGTERM and SIGINT to `manage.py sync_usage`, for real: a real process on a database file,
the signal sent while a pop (or the snapshot read) is in flight. The unit in hand is finished
or spooled, the process says one sentence and leaves without a traceback, and a clean rerun
counts exactly what the proxy served."""

from __future__ import annotations

import pytest

from tests.fakes.sync_process import SIGNALS, finish, signal_on_pop





def one_sentence(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    return lines[0]


@pytest.mark.parametrize("name", ["SIGTERM", "SIGINT"])
def test_a_one_shot_queue_sync_stops_after_the_pop_in_hand(sync_bench, name):
    b = sync_bench(batch=100)
    b.serve(1000)  # ten pops' worth
    box: list = []
    b.proxy.on_management = signal_on_pop(box, SIGNALS[name], at_pop=3)

    box.append(b.start("sync_usage"))
    code, _out, err = finish(box[0])

    assert code == 128 + SIGNALS[name]
    assert f"Stopped by {name}" in one_sentence(err)
    # The pass stopped after the third pop, not at the end of the queue.
    assert b.proxy.popped == 300 and len(b.proxy.queue) == 700
    assert b.totals()["counted"] == 300  # the pop in hand was finished, not dropped

    b.proxy.on_management = None
    rerun = b.run("sync_usage")
    assert rerun.returncode == 0, rerun.stderr
    assert b.totals()["counted"] == b.served == 1000
    assert b.spooled() == []


@pytest.mark.parametrize("name", ["SIGTERM", "SIGINT"])
def test_a_following_queue_sync_stops_cleanly(sync_bench, name):
    b = sync_bench(batch=100)
    b.serve(1000)
    box: list = []
    b.proxy.on_management = signal_on_pop(box, SIGNALS[name], at_pop=4)

    box.append(b.start("sync_usage", "--follow", "--interval", "0.2"))
    code, out, err = finish(box[0])

    assert code == 0, err
    assert "Traceback" not in err and err.strip() == "", err
    assert out.strip().splitlines()[-1] == "Stopped."
    assert b.proxy.popped == 400  # stopped after the pop in hand

    b.proxy.on_management = None
    assert b.run("sync_usage").returncode == 0
    assert b.totals()["counted"] == b.served == 1000


@pytest.mark.parametrize("name", ["SIGTERM", "SIGINT"])
def test_a_one_shot_snapshot_sync_stops_cleanly(sync_bench, name):
    b = sync_bench(generation="snapshot")
    b.serve(300)
    box: list = []
    b.proxy.on_management = signal_on_pop(box, SIGNALS[name], at_pop=1)

    box.append(b.start("sync_usage"))
    code, _out, err = finish(box[0])

    assert code == 128 + SIGNALS[name]
    assert f"Stopped by {name}" in one_sentence(err)

    b.proxy.on_management = None
    b.serve(50)
    assert b.run("sync_usage").returncode == 0
    assert b.totals()["counted"] == b.served == 350  # nothing lost, nothing counted twice


@pytest.mark.parametrize("name", ["SIGTERM", "SIGINT"])
def test_a_following_snapshot_sync_stops_cleanly(sync_bench, name):
    b = sync_bench(generation="snapshot")
    b.serve(300)
    box: list = []
    b.proxy.on_management = signal_on_pop(box, SIGNALS[name], at_pop=2)

    box.append(b.start("sync_usage", "--follow", "--interval", "0.2"))
    code, out, err = finish(box[0])

    assert code == 0 and "Traceback" not in err and err.strip() == "", err
    assert out.strip().splitlines()[-1] == "Stopped."

    b.proxy.on_management = None
    assert b.run("sync_usage").returncode == 0
    assert b.totals()["counted"] == b.served == 300
