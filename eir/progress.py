"""Progress bars that stay readable in log files.

On a terminal, tqdm redraws in place; in a log file (CI, Ray Jobs, nohup) every redraw is a new
line, so there the bar refreshes only every 30 s.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm import tqdm

T = TypeVar("T")


def progress(
    items: Iterable[T], desc: str, *, total: int | None = None, enabled: bool = True, unit: str = "it"
) -> Iterator[T]:
    interactive = sys.stderr.isatty()
    return iter(
        tqdm(
            items,
            desc=desc,
            total=total,
            disable=not enabled,
            unit=unit,
            mininterval=0.5 if interactive else 30.0,
            dynamic_ncols=interactive,
        )
    )
