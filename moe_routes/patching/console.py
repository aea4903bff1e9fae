"""Progress lines on stdout and warnings on stderr, prefixed with the command name."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

PROG = "moe-routes patch"
_quiet = False


def say(msg: str = "") -> None:
    if not _quiet:
        print(f"{PROG}: {msg}" if msg else "", flush=True)


def warn(msg: str) -> None:
    print(f"{PROG}: warning: {msg}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence say() (verify runs apply/reverse many times and prints one line per layout)."""
    global _quiet
    before, _quiet = _quiet, True
    try:
        yield
    finally:
        _quiet = before
