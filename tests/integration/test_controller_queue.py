"""The manager's work queue lanes: urgent keys first, and client-go's guarantees kept.

No server needed: the queue is plain threads and a condition variable.
"""

from __future__ import annotations

import pytest

from kube.workqueue import WorkQueue


@pytest.fixture
def q():
    queue = WorkQueue()
    yield queue
    queue.shutdown()


def test_urgent_lane_first_and_promotion(q):
    q.add("status-a")
    q.add("status-b")
    q.add("new-c", urgent=True)
    q.add("status-b", urgent=True)  # queued normally, then found to owe a Job: promoted
    assert len(q) == 3 and q.urgent_len() == 2
    got = [q.get(timeout=1) for _ in range(3)]
    assert got == ["new-c", "status-b", "status-a"]
    for k in got:
        q.done(k)
    with pytest.raises(TimeoutError):
        q.get(timeout=0.05)  # status-b's stale normal-lane entry is not handed out again


def test_key_in_processing_is_not_handed_out_twice(q):
    q.add("m", urgent=True)
    assert q.get(timeout=1) == "m"
    q.add("m")  # a change mid-reconcile
    q.add("m", urgent=True)
    with pytest.raises(TimeoutError):
        q.get(timeout=0.05)
    q.done("m")  # queued once more, in the lane of its latest add
    assert q.urgent_len() == 1
    assert q.get(timeout=1) == "m"
    q.done("m")
    assert len(q) == 0
