"""``spec.updatePolicy.schedule``: when to re-resolve a Ready model's upstream revision.

Schedules are intervals: ``@every <duration>`` (Go-style ``1h30m``, ``45s``),
``@hourly``, ``@daily``, ``@weekly``. A cron expression is not interpreted
(shortcut: it reads as ``@daily``). Check times live in memory, so a
restarted manager checks each scheduled model one interval after it first
sees it Ready, with a little jitter so 1,000 models do not resolve at once;
then every interval. Only Hugging Face revisions are re-resolved (one
``/api/models/<repo>/revision/<rev>`` call); other sources report no
revision and never move. A model Failed after a move is checked too: a
later commit may repair what the moved one broke.
"""

from __future__ import annotations

import random
import re
import threading
import time
from collections.abc import Callable
from typing import Any

from controller.manager.errors import TemporaryError

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_NAMED = {"@hourly": 3600.0, "@daily": 86400.0, "@midnight": 86400.0, "@weekly": 604800.0}


def interval(text: str) -> float | None:
    text = text.strip()
    if text in _NAMED:
        return _NAMED[text]
    if text.startswith("@every "):
        parts = re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)", text[len("@every "):])
        total = sum(float(n) * _UNITS[u] for n, u in parts)
        return total if total > 0 else None
    return 86400.0 if text else None


class Scheduler:
    """Per-model next check times, on ``clock`` (monotonic; a test may pass its own)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic,
                 jitter: tuple[float, float] = (0.95, 1.0)) -> None:
        self._next: dict[Any, float] = {}
        self._lock = threading.Lock()
        self.clock = clock
        self.jitter = jitter

    def _plan(self, key: Any, every: float, now: float) -> None:
        self._next[key] = now + every * random.uniform(*self.jitter)

    def due(self, key: Any, every: float, reset: bool = False) -> float:
        """Seconds until ``key``'s next check (≤ 0: now)."""
        now = self.clock()
        with self._lock:
            if reset or key not in self._next:
                self._plan(key, every, now)
            return self._next[key] - now

    def checked(self, key: Any, every: float) -> None:
        """A check ran: the next is one interval from *now*. (Forgetting the key here made
        the pass one interval later plan another interval: a check every two intervals.)"""
        with self._lock:
            self._plan(key, every, self.clock())

    def forget(self, key: Any) -> None:
        with self._lock:
            self._next.pop(key, None)


def _revisions(obj: dict[str, Any]) -> tuple[str, str]:
    """(the revision the artifact was published from, the one last asked for)."""
    from controller.manager import jobs

    current = ((obj.get("status") or {}).get("source") or {}).get("resolvedRevision") or ""
    asked = (obj["metadata"].get("annotations") or {}).get(jobs.UPSTREAM) or ""
    return str(current), str(asked)


def applies(obj: dict[str, Any]) -> bool:
    """Whether there is an upstream revision to re-resolve and one to compare it with
    (a model that failed its first publish has none: its failure was not a move)."""
    hf = ((obj.get("spec") or {}).get("source") or {}).get("huggingFace")
    return bool(hf) and any(_revisions(obj))


def moved(obj: dict[str, Any], latest: str | None) -> bool:
    """Whether ``latest`` asks for a publish: it is neither the revision the artifact was
    published from nor one already asked for (``jobs.UPSTREAM``), whose publish may
    have failed or resolved a newer commit: asking again would change nothing."""
    return bool(latest) and latest not in _revisions(obj)


def upstream_revision(obj: dict[str, Any], settings: Any, token: str | None) -> str | None:
    """The commit the model's source revision points at now (Hugging Face only)."""
    source = ((obj.get("spec") or {}).get("source") or {})
    hf = source.get("huggingFace")
    if not hf:
        return None
    import requests

    endpoint = (settings.hf_endpoint or "https://huggingface.co").rstrip("/")
    url = f"{endpoint}/api/models/{hf['repo']}/revision/{hf.get('revision') or 'main'}"
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        resp = requests.get(url, headers=headers, timeout=(5, 20))
        resp.raise_for_status()
        sha = resp.json().get("sha")
    except (requests.RequestException, ValueError) as e:
        raise TemporaryError(f"resolving {hf['repo']}: {e}", reason="ResolveFailed") from e
    return str(sha) if sha else None
