"""Progress bars for long transfers (tqdm on stderr; quiet when not a terminal).

tqdm is imported only when a bar is shown: a scripted pull (no terminal,
``--no-progress``) starts without it.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager


def _noop(_: int) -> None:
    pass


def add_flags(p: argparse.ArgumentParser) -> None:
    """``--progress`` / ``--no-progress`` (default: a bar only on a terminal)."""
    p.add_argument("--progress", dest="progress", action="store_true", default=None,
                   help="always show the progress bar (default: only on a terminal)")
    p.add_argument("--no-progress", dest="progress", action="store_false")


@contextmanager
def bar(total: int, desc: str, enabled: bool | None = None) -> Iterator[Callable[[int], None]]:
    """A byte progress bar; yields a callback taking byte deltas (may be negative)."""
    disable = (not sys.stderr.isatty()) if enabled is None else not enabled
    if disable:
        yield _noop
        return
    from tqdm import tqdm

    with tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024,
              file=sys.stderr, disable=disable, dynamic_ncols=True, miniters=1,
              mininterval=0.2) as t:
        yield t.update


@contextmanager
def open_bar(desc: str, enabled: bool | None = None
             ) -> Iterator[tuple[Callable[[int], None], Callable[[int], None]]]:
    """A byte bar whose total is learnt later; yields (update, set_total)."""
    disable = (not sys.stderr.isatty()) if enabled is None else not enabled
    from tqdm import tqdm

    with tqdm(total=None, desc=desc, unit="B", unit_scale=True, unit_divisor=1024,
              file=sys.stderr, disable=disable, dynamic_ncols=True, mininterval=0.2) as t:

        def set_total(total: int) -> None:
            t.total = total
            t.refresh()

        yield t.update, set_total
