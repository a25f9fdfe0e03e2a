"""Command-line sizes, read the way the project's flags have always read them.

Where it sits: the toolkit, for the entry points of both the node plugin
(``csi.main``: ``--cache-capacity``) and the controller (``upload-gateway
--max-staging-bytes``). One parser, two readings of the unit letters, each
kept because flags in use mean it:

* ``size_arg`` reads a Kubernetes quantity (what a chart copies from a
  volume's size): ``100Gi`` is 100·2³⁰, ``500G`` is 500·10⁹, nothing else;
* ``size_arg(text, binary=True)`` is the node plugin's older, looser form:
  ``500Gi``, ``500G``, ``500gb`` and ``500GiB`` are all 500·2³⁰.

Both raise ``SizeError``, a ``ValueError`` that argparse also shows as it is
(``ArgumentTypeError``), so the same function serves as an argparse
``type=`` and as a check of a flag read by hand.
"""

from __future__ import annotations

import argparse
import functools
import re

_QUANTITY = re.compile(r"\s*(\d+)\s*(Ki|Mi|Gi|Ti|Pi|k|K|M|G|T|P)?\s*")
_DECIMAL = {None: 1, "k": 10**3, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15,
            "Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40, "Pi": 1 << 50}
_LOOSE = re.compile(r"\s*(\d+)\s*([kmgtKMGT]?)i?[bB]?\s*")
_BINARY = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


class SizeError(argparse.ArgumentTypeError, ValueError):
    """Not a size; the message says what one looks like."""


def size_arg(text: str, *, binary: bool = False) -> int:
    """Bytes from ``text`` (see the module docstring for the two readings)."""
    if binary:
        m = _LOOSE.fullmatch(text)
        if m:
            return int(m.group(1)) * _BINARY[m.group(2).lower()]
    else:
        m = _QUANTITY.fullmatch(text)
        if m:
            return int(m.group(1)) * _DECIMAL[m.group(2)]
    raise SizeError(f"not a size: {text!r} (e.g. {'500Gi' if binary else '100Gi'})")


# for argparse's ``type=``: the node plugin's --cache-capacity
binary_size_arg = functools.partial(size_arg, binary=True)
