"""``spec.updatePolicy.schedule``: *when* to check a Ready model's upstream (``upstream.py``
says *how*; ``Reconciler.check_upstream`` ties the two together).

Accepted forms (``parse``), all evaluated in UTC:

* a 5-field cron expression ``minute hour day-of-month month day-of-week``
  with ``*``, lists (``1,15``), ranges (``1-5``), steps (``*/15``,
  ``10-50/10``, ``5/15`` = ``5-max/15``) and names (``jan``…``dec``,
  ``sun``…``sat``; day-of-week 0 and 7 are both Sunday; ``?`` is ``*`` in
  the two day fields). Day-of-month and day-of-week follow Vixie cron
  (crontab(5)): when both are restricted — neither starts with ``*`` — a
  day matching *either* fires; otherwise a day must match both;
* the macros ``@yearly``/``@annually`` (``0 0 1 1 *``), ``@monthly``
  (``0 0 1 * *``), ``@weekly`` (``0 0 * * 0``), ``@daily``/``@midnight``
  (``0 0 * * *``) and ``@hourly`` (``0 * * * *``): real cron times, not
  intervals from whenever the controller started;
* ``@every <duration>`` (Go-style ``1h30m``, ``45s``, ``1d``; at least 1 s):
  an interval from the last check.

An expression that cannot fire (``0 0 30 2 *``) is invalid, like one that
does not parse: ``ScheduleError``, surfaced as condition reason
``InvalidSchedule`` (the CRD rejects most of them first).

``Scheduler`` keeps each model's next check time in memory on the wall
clock, seeded from ``status.upstream.lastCheckedAt``: a manager restarted
across a fire time checks the model once, soon after it starts, instead of
waiting for the next fire (a week, for a weekly schedule). Cron fires are
spread by up to ``spread`` seconds and intervals shortened by up to 5 %, so
a thousand models on ``@daily`` do not all probe their upstream in the same
second.
"""

from __future__ import annotations

import datetime
import random
import re
import threading
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Protocol

# Why our own parser and no library: cronsim 2.9 (maintained, Debian-cron semantics) gives
# the same fire times for every 5-field case in tests/unit/test_schedule.py, but names no
# cause in its errors ("Bad minute" alike for 60, */0, 5-1 and fri-mon, where the
# InvalidSchedule message must say what to fix), takes a sixth (seconds) field and L/W/#,
# and has no macros and no '?': this validator would stay, and a second parser would only
# add a way to disagree. croniter 7 (now under pallets-eco) reads '*/2' in day-of-month as
# a restriction, unlike Vixie cron, and accepts '0 0 30 2 *', '5-1' and '@DAILY'.
UTC = datetime.UTC
MIN_EVERY = 1.0  # seconds; a shorter interval would make the probe a busy loop
MAX_YEARS = 9  # Feb 29 on a given weekday recurs within 28 years, but a plain Feb 29 within 8

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_EVERY = re.compile(r"^@every ((?:[0-9]+(?:\.[0-9]+)?(?:ms|s|m|h|d))+)$")
_PART = re.compile(r"([0-9]+(?:\.[0-9]+)?)(ms|s|m|h|d)")
MACROS = {"@yearly": "0 0 1 1 *", "@annually": "0 0 1 1 *", "@monthly": "0 0 1 * *",
          "@weekly": "0 0 * * 0", "@daily": "0 0 * * *", "@midnight": "0 0 * * *",
          "@hourly": "0 * * * *"}
_MONTHS = {n: i + 1 for i, n in enumerate(
    ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"))}
_DAYS = {n: i for i, n in enumerate(("sun", "mon", "tue", "wed", "thu", "fri", "sat"))}
# (name, low, high, names) per field; day-of-week allows 7 (= Sunday) as cron does
_FIELDS: tuple[tuple[str, int, int, dict[str, int]], ...] = (
    ("minute", 0, 59, {}), ("hour", 0, 23, {}), ("day-of-month", 1, 31, {}),
    ("month", 1, 12, _MONTHS), ("day-of-week", 0, 7, _DAYS))
_MONTH_DAYS = (31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)  # the most each month can have


class ScheduleError(ValueError):
    """The schedule does not parse, or can never fire."""

    reason = "InvalidSchedule"


class Schedule(Protocol):
    @property
    def text(self) -> str: ...

    def next_after(self, t: float) -> float:
        """The first fire time strictly after ``t`` (seconds since the epoch)."""
        ...


@dataclass(frozen=True)
class Every:
    """``@every <duration>``: a check every ``seconds`` after the last one."""

    text: str
    seconds: float

    def next_after(self, t: float) -> float:
        return t + self.seconds


@dataclass(frozen=True)
class Cron:
    """A 5-field cron expression, fired on UTC minute boundaries."""

    text: str
    minutes: frozenset[int]
    hours: frozenset[int]
    doms: frozenset[int]
    months: frozenset[int]
    dows: frozenset[int]  # 0 = Sunday … 6
    dom_star: bool  # the field starts with '*' (Vixie: then day-of-month AND day-of-week)
    dow_star: bool

    def day_matches(self, d: datetime.date) -> bool:
        dom = d.day in self.doms
        dow = d.isoweekday() % 7 in self.dows
        if self.dom_star or self.dow_star:
            return dom and dow
        return dom or dow

    def next_after(self, t: float) -> float:
        dt = datetime.datetime.fromtimestamp(t, UTC).replace(second=0, microsecond=0)
        dt += datetime.timedelta(minutes=1)
        limit = dt.year + MAX_YEARS
        # skip whole months, days and hours that cannot match: a yearly schedule
        # costs a few hundred steps, not half a million minutes
        while dt.year <= limit:
            if dt.month not in self.months:
                dt = (dt.replace(day=28, hour=0, minute=0) + datetime.timedelta(days=4)
                      ).replace(day=1)
            elif not self.day_matches(dt.date()):
                dt = dt.replace(hour=0, minute=0) + datetime.timedelta(days=1)
            elif dt.hour not in self.hours:
                dt = dt.replace(minute=0) + datetime.timedelta(hours=1)
            elif dt.minute not in self.minutes:
                dt += datetime.timedelta(minutes=1)
            else:
                return dt.timestamp()
        raise ScheduleError(f"{self.text!r} does not fire within {MAX_YEARS} years")


def _value(text: str, low: int, high: int, names: dict[str, int], what: str) -> int:
    key = text.lower()
    if key in names:
        return names[key]
    if not text.isdigit():
        raise ScheduleError(f"{what}: {text!r} is not a number"
                            + (f" or a name ({', '.join(names)})" if names else ""))
    n = int(text)
    if not low <= n <= high:
        raise ScheduleError(f"{what}: {n} is outside {low}-{high}")
    return n


def _field(text: str, index: int) -> tuple[frozenset[int], bool]:
    """One cron field → (the values it allows, whether it starts with ``*``)."""
    what, low, high, names = _FIELDS[index]
    if text == "?" and what in ("day-of-month", "day-of-week"):
        text = "*"
    out: set[int] = set()
    for item in text.split(","):
        rng, slash, step_text = item.partition("/")
        step = 1
        if slash:
            if not step_text.isdigit() or int(step_text) == 0:
                raise ScheduleError(f"{what}: step {step_text!r} must be a positive number")
            step = int(step_text)
        if rng == "*":
            start, end = low, high
        elif "-" in rng:
            a, _, b = rng.partition("-")
            start, end = (_value(a, low, high, names, what), _value(b, low, high, names, what))
            if start > end:
                raise ScheduleError(f"{what}: range {rng!r} runs backwards")
        else:
            start = _value(rng, low, high, names, what)
            end = high if slash else start  # "5/15" is "5-max/15", as Vixie and robfig read it
        out.update(range(start, end + 1, step))
    if what == "day-of-week" and 7 in out:
        out = (out - {7}) | {0}
    return frozenset(out), text.startswith("*")


def parse_cron(text: str, original: str | None = None) -> Cron:
    fields = text.split()
    if len(fields) != 5:
        raise ScheduleError(f"{original or text!r}: a cron expression has 5 fields "
                            f"(minute hour day-of-month month day-of-week), got {len(fields)}")
    (mi, _), (ho, _), (dom, dom_star), (mo, _), (dow, dow_star) = (
        _field(f, i) for i, f in enumerate(fields))
    cron = Cron(original or text, mi, ho, dom, mo, dow, dom_star, dow_star)
    # a day-of-month no allowed month has (Feb 30, Apr 31) never fires when it decides
    # alone: restricted while day-of-week is '*' (AND), so '0 0 30 2 *' is refused here
    if dow_star and not any(d <= _MONTH_DAYS[m - 1] for m in mo for d in dom):
        raise ScheduleError(f"{original or text!r} can never fire: no allowed month has "
                            f"day {min(dom)}")
    return cron


def parse_every(text: str) -> Every:
    m = _EVERY.match(text)
    if not m:
        raise ScheduleError(f"{text!r}: '@every' takes a duration like 24h, 1h30m, 45s")
    seconds = sum(float(n) * _UNITS[u] for n, u in _PART.findall(m.group(1)))
    if seconds < MIN_EVERY:
        raise ScheduleError(f"{text!r}: the interval must be at least {MIN_EVERY:g}s")
    return Every(text, seconds)


def parse(text: str) -> Schedule:
    """``spec.updatePolicy.schedule`` → a ``Schedule``; ``ScheduleError`` if invalid."""
    text = text.strip()
    if not text:
        raise ScheduleError("the schedule is empty")
    if text.startswith("@every"):
        return parse_every(text)
    if text.startswith("@"):
        macro = MACROS.get(text)
        if macro is None:
            raise ScheduleError(f"{text!r}: unknown macro (one of {', '.join(MACROS)}, "
                                "@every <duration>)")
        return parse_cron(macro, original=text)
    return parse_cron(text)


def rfc3339(t: float) -> str:
    return datetime.datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def from_rfc3339(text: str | None) -> float | None:
    if not text:
        return None
    try:
        return datetime.datetime.strptime(str(text), "%Y-%m-%dT%H:%M:%SZ").replace(
            tzinfo=UTC).timestamp()
    except ValueError:
        return None


class Scheduler:
    """Per-model next check times on ``clock`` (the wall clock; a test passes its own)."""

    def __init__(self, clock: Callable[[], float] = time.time,
                 jitter: tuple[float, float] = (0.95, 1.0), spread: float = 30.0) -> None:
        self._next: dict[Hashable, tuple[str, float]] = {}
        self._lock = threading.Lock()
        self.clock = clock
        self.jitter = jitter
        self.spread = spread

    def _after(self, sched: Schedule, base: float) -> float:
        if isinstance(sched, Every):
            return base + sched.seconds * random.uniform(*self.jitter)
        return sched.next_after(base) + random.uniform(0.0, self.spread)

    def next_check(self, key: Hashable, sched: Schedule, last: float | None = None,
                   reset: bool = False) -> float:
        """When ``key`` is next checked. First sight plans from ``last`` (the check
        before a restart; a fire missed since is due at once, spread) or from now."""
        now = self.clock()
        with self._lock:
            planned = self._next.get(key)
            if reset or planned is None or planned[0] != sched.text:
                at = self._after(sched, now if reset or last is None else last)
                if at <= now:  # missed while no manager ran
                    at = now + random.uniform(0.0, self.spread)
                self._next[key] = (sched.text, at)
            return self._next[key][1]

    def checked(self, key: Hashable, sched: Schedule, retry_in: float | None = None) -> float:
        """A check ran now: plan the next one (sooner, ``retry_in``, after a transient failure)."""
        now = self.clock()
        with self._lock:
            at = self._after(sched, now)
            if retry_in is not None:
                at = min(at, now + retry_in)
            self._next[key] = (sched.text, at)
            return at

    def forget(self, key: Hashable) -> None:
        with self._lock:
            self._next.pop(key, None)
