"""Run one function over many items on a bounded thread pool; the first error wins.

Where it sits: every place that moves a model's files in parallel (pack,
pull, the catalog import, bundle export and import) needs the same shape:
at most ``workers`` at once, the biggest first so the last to finish is a
small one, and on the first failure the items not yet started are cancelled
and that failure is raised (the others' errors are dropped; an ``on_error``
hook lets running items notice and stop early). One helper, so the four
callers cannot drift.
"""

from __future__ import annotations

import concurrent.futures as cf
from collections.abc import Callable, Iterable, Sequence
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


def run_all(fn: Callable[[T], R], items: Iterable[T], workers: int, *,
            size: Callable[[T], int] | None = None, name: str = "",
            on_error: Callable[[], None] | None = None) -> list[tuple[T, R]]:
    """``fn(item)`` for every item, at most ``workers`` at once; (item, result) pairs.

    With ``size``, items start largest first. Pairs come back in completion
    order. The first exception cancels what has not started, calls
    ``on_error`` and is raised once the running items have returned.
    """
    order: Sequence[T] = sorted(items, key=lambda x: -size(x)) if size else list(items)
    if not order:
        return []
    out: list[tuple[T, R]] = []
    with cf.ThreadPoolExecutor(max_workers=max(1, min(workers, len(order))),
                               thread_name_prefix=name or "run-all") as pool:
        futures = {pool.submit(fn, item): item for item in order}
        try:
            for fut in cf.as_completed(futures):
                out.append((futures[fut], fut.result()))
        except BaseException:
            if on_error is not None:
                on_error()
            for f in futures:
                f.cancel()
            raise
    return out
