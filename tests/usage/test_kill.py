"""kill -9, for real: `sync_usage --follow` processes killed with SIGKILL while they pop, on a
database file, against the fake proxy. The bigger trial is bench/kill_sync.py."""

from __future__ import annotations

from tests.fakes.kill_trial import Trial


def test_sigkill_while_popping_loses_nothing_that_arrived_and_never_locks_out(tmp_path):
    trial = Trial(workdir=tmp_path, seed=7, batch=200, interval=0.1, kill_within=0.12)

    result = trial.run(records=6000, kills=3, keys=12)

    assert result.kills == 3 and result.kills_while_popping >= 1, result.summary()
    assert result.popped == result.served == 6000
    # Every body that reached the database was counted, exactly once.
    assert result.lost_after_store == 0, result.summary()
    # What is missing is exactly what was cut on the wire, nothing else: at most one pop per
    # kill during a pop (the complete records of a cut answer that reached the spool file are
    # recovered, so the loss need not be whole pops: one run lost 94 of a 200-record pop).
    assert result.counted + result.lost_on_wire == result.served, result.summary()
    assert 0 <= result.lost_on_wire <= 200 * result.kills_while_popping, result.summary()
    # Each restart found the killed holder's process gone and took the lease at once.
    assert result.waits_for_lease == 0, result.summary()
