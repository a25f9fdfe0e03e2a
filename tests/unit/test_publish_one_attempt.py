"""Two attempts of one publish Job never share a work dir at the same time.

With a work volume (``--publish-work-size``) a Job's next pod may start while
the previous one still runs on the same claim; ``jobs.publish.one_attempt``
makes the second wait, and fail retryably if the first never lets go. The
holder here is another process, killed with SIGKILL as a node would kill it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from ingest.publish.worker import PublishError
from jobs.publish import one_attempt

HOLD = """
import sys, time
from jobs.publish import one_attempt
with one_attempt(sys.argv[1]):
    print("held", flush=True)
    time.sleep(60)
"""


def _holder(work: str) -> subprocess.Popen[str]:
    p = subprocess.Popen([sys.executable, "-c", HOLD, work], stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None and p.stdout.readline().strip() == "held"
    return p


def test_second_attempt_waits_then_fails_retryably(tmp_path):
    holder = _holder(str(tmp_path))
    try:
        t0 = time.monotonic()
        with pytest.raises(PublishError) as e, one_attempt(str(tmp_path), wait=0.6):
            pass
        assert time.monotonic() - t0 >= 0.6
        assert e.value.reason == "WorkDirBusy" and e.value.retryable
    finally:
        holder.kill()
        holder.wait()


def test_attempt_proceeds_once_the_holder_dies(tmp_path):
    holder = _holder(str(tmp_path))
    entered = []

    def kill_soon() -> None:
        time.sleep(0.3)
        os.kill(holder.pid, signal.SIGKILL)

    threading.Thread(target=kill_soon).start()
    with one_attempt(str(tmp_path), wait=10):
        entered.append(time.monotonic())
    holder.wait()
    assert entered, "the attempt never got the work dir"
