"""``spec.updatePolicy.schedule``: the cron parser, next fire times in UTC, the scheduler on an
injected clock, what counts as a move, and the CRD's CEL rule agreeing with the parser.

No cluster and no network: the probes and the reconcile against real servers are in
tests/integration/test_update_schedule.py.
"""

from __future__ import annotations

import datetime
import os
import re
from typing import Any

import pytest
import yaml

from api import names as api_names
from controller.models import schedule, upstream

UTC = datetime.UTC
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def ts(text: str) -> float:
    return datetime.datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()


def iso(t: float) -> str:
    return datetime.datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M")


def fires(expr: str, start: str, n: int = 1) -> list[str]:
    s, t, out = schedule.parse(expr), ts(start), []
    for _ in range(n):
        t = s.next_after(t)
        out.append(iso(t))
    return out


# (expression, after, the next fire times in UTC)
NEXT = [
    # the examples/ schedule: Sundays 03:00 (2026-05-06 is a Wednesday)
    ("0 3 * * 0", "2026-05-06T12:00:00", ["2026-05-10T03:00", "2026-05-17T03:00"]),
    ("0 3 * * 7", "2026-05-06T12:00:00", ["2026-05-10T03:00"]),  # 7 is Sunday too
    ("0 3 * * sun", "2026-05-10T03:00:00", ["2026-05-17T03:00"]),  # strictly after
    ("0 3 * * SUN", "2026-05-10T02:59:59", ["2026-05-10T03:00"]),
    ("*/15 * * * *", "2026-01-01T00:14:59", ["2026-01-01T00:15", "2026-01-01T00:30"]),
    ("5/20 * * * *", "2026-01-01T00:00:00", ["2026-01-01T00:05", "2026-01-01T00:25",
                                             "2026-01-01T00:45", "2026-01-01T01:05"]),
    ("10-50/20 9-17 * * mon-fri", "2026-05-08T17:45:00",  # 10,30,50; Friday → Monday
     ["2026-05-08T17:50", "2026-05-11T09:10", "2026-05-11T09:30"]),
    ("0 0,12 * * *", "2026-01-01T00:00:00", ["2026-01-01T12:00", "2026-01-02T00:00"]),
    # month ends: the 31st skips the months without one
    ("0 0 31 * *", "2026-01-31T00:00:00", ["2026-03-31T00:00", "2026-05-31T00:00"]),
    ("30 23 30 * *", "2026-01-31T00:00:00", ["2026-03-30T23:30"]),  # no Feb 30
    # Feb 29: leap years only, 2100 is not one
    ("0 0 29 2 *", "2026-03-01T00:00:00", ["2028-02-29T00:00", "2032-02-29T00:00"]),
    ("0 0 29 feb *", "2096-03-01T00:00:00", ["2104-02-29T00:00"]),
    # year end and the macros: real cron times, not intervals
    ("59 23 31 12 *", "2026-12-31T23:59:00", ["2027-12-31T23:59"]),
    ("@yearly", "2026-03-01T00:00:00", ["2027-01-01T00:00"]),
    ("@annually", "2026-12-31T23:59:59", ["2027-01-01T00:00"]),
    ("@monthly", "2026-01-31T10:00:00", ["2026-02-01T00:00", "2026-03-01T00:00"]),
    ("@weekly", "2026-05-06T12:00:00", ["2026-05-10T00:00"]),
    ("@daily", "2026-05-06T12:00:00", ["2026-05-07T00:00"]),
    ("@midnight", "2026-05-06T23:59:59", ["2026-05-07T00:00"]),
    ("@hourly", "2026-05-06T12:00:00", ["2026-05-06T13:00", "2026-05-06T14:00"]),
    # day-of-month and day-of-week both restricted: either fires (Vixie);
    # 2026-03-06 is the first Friday after Mar 1, then the 13th (also a Friday)
    ("0 0 13 * fri", "2026-03-01T00:00:00", ["2026-03-06T00:00", "2026-03-13T00:00",
                                             "2026-03-20T00:00", "2026-03-27T00:00",
                                             "2026-04-03T00:00", "2026-04-10T00:00",
                                             "2026-04-13T00:00"]),
    ("0 0 1,15 * 1", "2026-06-01T00:00:00", ["2026-06-08T00:00", "2026-06-15T00:00"]),
    ("0 0 29 2 mon", "2026-03-01T00:00:00", ["2027-02-01T00:00"]),  # a Monday in Feb
    # one of them starts with '*': both must match (AND), '*/2' included
    ("0 0 * * 1", "2026-06-01T00:00:00", ["2026-06-08T00:00"]),
    ("0 0 */2 * mon", "2026-06-01T00:00:00", ["2026-06-15T00:00", "2026-06-29T00:00"]),
    ("0 0 13 * ?", "2026-03-01T00:00:00", ["2026-03-13T00:00", "2026-04-13T00:00"]),
    ("0 12 * jan,jul *", "2026-01-31T12:00:00", ["2026-07-01T12:00"]),
]


@pytest.mark.parametrize(("expr", "after", "want"), NEXT, ids=[f"{e}@{a}" for e, a, _ in NEXT])
def test_next_fire_times(expr: str, after: str, want: list[str]) -> None:
    assert fires(expr, after, len(want)) == want


def test_next_fire_is_on_a_minute_boundary_and_fast() -> None:
    s = schedule.parse("7 * * * *")
    t = s.next_after(ts("2026-01-01T00:06:59") + 0.999)
    assert iso(t) == "2026-01-01T00:07" and t % 60 == 0
    # the worst case a valid expression allows: a few hundred steps, not minute by minute
    import time

    start = time.perf_counter()
    assert fires("0 0 29 2 *", "2097-03-01T00:00:00") == ["2104-02-29T00:00"]
    assert time.perf_counter() - start < 1.0


def test_every_is_an_interval() -> None:
    assert schedule.parse("@every 2s").next_after(100.0) == 102.0
    assert isinstance(schedule.parse("@every 1h30m"), schedule.Every)
    assert schedule.parse("@every 1h30m").next_after(0.0) == 5400.0
    assert schedule.parse("@every 1d").next_after(0.0) == 86400.0
    assert schedule.parse("@every 1.5s").next_after(0.0) == 1.5


INVALID = [
    ("", "empty"),
    ("0 3 * *", "5 fields"),
    ("0 3 * * * *", "5 fields"),
    ("60 * * * *", "outside 0-59"),
    ("* 24 * * *", "outside 0-23"),
    ("* * 0 * *", "outside 1-31"),
    ("* * * 13 *", "outside 1-12"),
    ("* * * * 8", "outside 0-7"),
    ("*/0 * * * *", "positive"),
    ("5-1 * * * *", "backwards"),
    ("fri-mon * * * *", "not a number"),
    ("0 0 * * fri-mon", "backwards"),
    ("0 0 * jam *", "not a number"),
    ("0 0 30 2 *", "can never fire"),
    ("0 0 31 4,6,9,11 *", "can never fire"),
    ("@every", "takes a duration"),
    ("@every 1 day", "takes a duration"),
    ("@every 0s", "at least 1s"),
    ("@every 500ms", "at least 1s"),
    ("@fortnightly", "unknown macro"),
    ("@DAILY", "unknown macro"),
    ("rm -rf /", "5 fields"),
]


@pytest.mark.parametrize(("expr", "why"), INVALID, ids=[e or "empty" for e, _ in INVALID])
def test_invalid_expressions_are_refused(expr: str, why: str) -> None:
    with pytest.raises(schedule.ScheduleError, match=re.escape(why)) as info:
        schedule.parse(expr)
    assert info.value.reason == "InvalidSchedule"


# --- the scheduler on an injected clock -----------------------------------------------


class Clock:
    def __init__(self, start: str = "2026-05-06T12:00:00") -> None:
        self.now = ts(start)

    def __call__(self) -> float:
        return self.now


def test_every_checks_once_per_interval() -> None:
    clock = Clock()
    s = schedule.Scheduler(clock=clock, jitter=(1.0, 1.0), spread=0.0)
    every, key = schedule.parse("@every 10s"), ("Model", "ns", "m")
    assert s.next_check(key, every) - clock.now == 10.0  # first sight: one interval from now
    clock.now += 10.0
    assert s.next_check(key, every) <= clock.now  # due
    s.checked(key, every)
    assert s.next_check(key, every) - clock.now == 10.0  # one interval after the check, not two
    clock.now += 4.0
    assert s.next_check(key, every) - clock.now == 6.0
    assert s.next_check(key, every, reset=True) - clock.now == 10.0  # a publish restarts it
    s.forget(key)
    clock.now += 1.0
    assert s.next_check(key, every) - clock.now == 10.0


def test_cron_fires_at_its_times_and_a_changed_schedule_replans() -> None:
    clock = Clock("2026-05-06T12:00:00")
    s = schedule.Scheduler(clock=clock, spread=0.0)
    key, sunday = ("ClusterModel", "", "llama"), schedule.parse("0 3 * * 0")
    assert iso(s.next_check(key, sunday)) == "2026-05-10T03:00"
    clock.now = ts("2026-05-10T03:00:00")
    assert s.next_check(key, sunday) <= clock.now
    assert iso(s.checked(key, sunday)) == "2026-05-17T03:00"
    assert iso(s.next_check(key, schedule.parse("@daily"))) == "2026-05-11T00:00"


def test_a_restart_catches_up_a_missed_fire_once() -> None:
    clock = Clock("2026-05-10T09:00:00")  # the manager was down over Sunday 03:00
    s = schedule.Scheduler(clock=clock, spread=30.0)
    sunday, key = schedule.parse("0 3 * * 0"), ("Model", "ns", "m")
    last = ts("2026-05-03T03:00:10")  # status.upstream.lastCheckedAt
    at = s.next_check(key, sunday, last=last)
    assert clock.now <= at <= clock.now + 30.0  # soon, spread
    clock.now = at
    assert iso(s.checked(key, sunday)) == "2026-05-17T03:00"
    # not missed: the plan continues from the last check
    s2 = schedule.Scheduler(clock=Clock("2026-05-06T12:00:00"), spread=0.0)
    assert iso(s2.next_check(key, sunday, last=last)) == "2026-05-10T03:00"
    every = schedule.parse("@every 1h")
    s3 = schedule.Scheduler(clock=Clock("2026-05-06T12:00:00"), jitter=(1.0, 1.0), spread=0.0)
    assert iso(s3.next_check(key, every, last=ts("2026-05-06T11:30:00"))) == "2026-05-06T12:30"


def test_retry_after_a_failed_check_is_sooner_than_the_next_fire() -> None:
    clock = Clock("2026-05-10T03:00:00")
    s = schedule.Scheduler(clock=clock, spread=0.0)
    sunday, key = schedule.parse("0 3 * * 0"), ("Model", "ns", "m")
    assert s.checked(key, sunday, retry_in=300.0) == clock.now + 300.0
    # an interval shorter than the retry keeps its interval
    every = schedule.parse("@every 10s")
    assert s.checked(key, every, retry_in=300.0) <= clock.now + 10.0


def test_spread_and_jitter_stay_bounded() -> None:
    clock = Clock("2026-05-06T12:00:00")
    s = schedule.Scheduler(clock=clock)
    daily, every = schedule.parse("@daily"), schedule.parse("@every 100s")
    midnight = ts("2026-05-07T00:00:00")
    ats = [s.next_check(("Model", "ns", str(i)), daily) for i in range(200)]
    assert all(midnight <= a <= midnight + 30.0 for a in ats) and len(set(ats)) > 1
    dues = [s.next_check(("Model", "e", str(i)), every) - clock.now for i in range(200)]
    assert all(95.0 <= d <= 100.0 for d in dues) and len(set(dues)) > 1


def test_rfc3339_round_trip() -> None:
    t = ts("2026-05-10T03:00:00")
    assert schedule.rfc3339(t) == "2026-05-10T03:00:00Z"
    assert schedule.from_rfc3339(schedule.rfc3339(t)) == t
    assert schedule.from_rfc3339(None) is None and schedule.from_rfc3339("garbage") is None


# --- what counts as a move --------------------------------------------------------------


def _model(resolved: str = "", asked: str = "", source: str = "huggingFace",
           digest: str = "") -> dict[str, Any]:
    ann = {api_names.UPSTREAM: asked} if asked else {}
    status: dict[str, Any] = {}
    if resolved:
        status["source"] = {"resolvedRevision": resolved}
    if digest:
        status["artifact"] = {"digest": digest}
    return {"metadata": {"name": "m", "annotations": ann},
            "spec": {"source": {source: {"repo": "a/b"}}}, "status": status}


def test_what_counts_as_a_move() -> None:
    assert upstream.moved(_model("aaa"), "bbb")
    assert not upstream.moved(_model("aaa"), "aaa")
    assert not upstream.moved(_model("aaa"), None)
    # asked for already (its publish failed, or resolved a newer commit): not again
    assert not upstream.moved(_model("aaa", asked="bbb"), "bbb")
    assert upstream.moved(_model("aaa", asked="bbb"), "ccc")


def test_which_models_are_probed() -> None:
    assert upstream.applies(_model("aaa"))
    assert upstream.applies(_model("", asked="bbb"))
    # published without a revision (an HTTP server with no ETag): probed, to say so
    assert upstream.applies(_model("", source="http", digest="sha256:" + "a" * 64))
    assert not upstream.applies(_model(""))  # failed its first publish: nothing to compare
    assert not upstream.applies(_model("sha256:x", source="upload"))
    assert not upstream.applies(_model("sha256:x", source="pvc"))
    for kind in ("ollama", "s3", "catalog"):
        assert upstream.applies(_model("x", source=kind))


# --- the CRD's CEL rule agrees with the parser ------------------------------------------


def _cel_cron_pattern() -> str:
    """The CRD rule's cron regex (RE2; this subset, (?i:…) included, means the same in re)."""
    with open(os.path.join(REPO, "crds", "modelcache.io_models.yaml")) as f:
        crd = yaml.safe_load(f)
    spec = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    rule = spec["properties"]["updatePolicy"]["properties"]["schedule"][
        "x-kubernetes-validations"][0]["rule"]
    pats = re.findall(r"matches\('(\^[^']*)'\)", rule)
    assert len(pats) == 2 and pats[0].startswith("^@every"), rule
    return pats[1]


def cel_accepts_cron(expr: str) -> bool:
    return re.match(_cel_cron_pattern(), expr) is not None


def test_cel_accepts_what_the_parser_accepts() -> None:
    for expr, _, _ in NEXT:
        if not expr.startswith("@"):
            assert cel_accepts_cron(expr), expr


PAST_A_REGEX = ("can never fire", "backwards")  # Feb 30, 5-1: the controller's InvalidSchedule


@pytest.mark.parametrize("expr", [e for e, why in INVALID
                                  if e and not e.startswith("@") and why not in PAST_A_REGEX])
def test_cel_refuses_what_the_parser_refuses(expr: str) -> None:
    assert not cel_accepts_cron(expr)


def test_every_schedule_in_examples_parses() -> None:
    found = {}
    for root, _, names in os.walk(os.path.join(REPO, "examples")):
        for n in names:
            if n.endswith((".yaml", ".yml")):
                with open(os.path.join(root, n)) as f:
                    for doc in yaml.safe_load_all(f):
                        text = ((doc or {}).get("spec") or {}).get("updatePolicy", {}) \
                            .get("schedule") if isinstance(doc, dict) else None
                        if text:
                            found[f"{n}/{doc['metadata']['name']}"] = schedule.parse(text)
    assert found, "no example has a schedule"
    # the review's case: "0 3 * * 0" runs on Sundays, not daily
    sunday = found["cluster-model.yaml/llama-3-8b"]
    assert fires(sunday.text, "2026-05-06T12:00:00", 2) == ["2026-05-10T03:00",
                                                            "2026-05-17T03:00"]
