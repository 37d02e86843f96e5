"""Progress every stage shows the same way: a bar at a terminal, log lines elsewhere.

At a terminal (stderr is a TTY) with the stage's `progress` on: a tqdm bar. Otherwise (progress=false, or
stderr a Slurm log file, where tqdm's `\r` frames pile up into megabytes of one line): one log line at least
every `every` seconds (60), with the count, the rate and the ETA, and one at the end of anything that took
that long:

    INFO hpcgan.progress: shard: 3,200/7,000 img (46%), 13.3 img/s, ETA 4m46s

Use it like tqdm: `with Progress(total, "shard", "img", bar=s.progress) as p: ... p.update(n)`. `clock` (or
CLOCK[0] for every Progress made) is injectable for tests: a function returning seconds.
"""
from __future__ import annotations

import logging
import sys
import time
from typing import Callable

logger = logging.getLogger("hpcgan.progress")

EVERY = 60.0   # seconds between log lines when there is no bar
CLOCK: list[Callable[[], float]] = [time.monotonic]   # the default clock (a test puts its own in)


def duration(seconds: float) -> str:
    """'45s', '4m46s', '2h05m'."""
    s = int(round(max(seconds, 0)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class Progress:
    def __init__(self, total: int | None, desc: str, unit: str = "it", *, bar: bool = True, initial: int = 0,
                 every: float | None = None, clock: Callable[[], float] | None = None, tty: bool | None = None,
                 leave: bool = True):
        self.total, self.desc, self.unit = total, desc, unit
        self.every = EVERY if every is None else every
        self.clock = clock or CLOCK[0]
        self.n = self.start = initial
        self.postfix: dict = {}
        self.t0 = self.last = self.clock()
        tty = sys.stderr.isatty() if tty is None else tty
        self.bar = None
        if bar and tty:
            from tqdm import tqdm
            self.bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True, leave=leave)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.bar is not None:
            self.bar.update(n)
            return
        now = self.clock()
        if now - self.last >= self.every:
            self.last = now
            logger.info("%s", self.line(now))

    def set_postfix(self, **values) -> None:
        """Numbers shown after the count (losses, validation scores); None values are left out."""
        self.postfix = {k: v for k, v in values.items() if v is not None}
        if self.bar is not None:
            self.bar.set_postfix(self.postfix, refresh=False)

    def line(self, now: float | None = None) -> str:
        now = self.clock() if now is None else now
        elapsed = max(now - self.t0, 1e-9)
        rate = (self.n - self.start) / elapsed
        count = f"{self.n:,}/{self.total:,} {self.unit}" if self.total else f"{self.n:,} {self.unit}"
        parts = [f"{self.desc}: {count}" + (f" ({100 * self.n / self.total:.0f}%)" if self.total else "")]
        parts.append(f"{rate:.3g} {self.unit}/s")
        if self.total and rate > 0 and self.n < self.total:
            parts.append(f"ETA {duration((self.total - self.n) / rate)}")
        elif self.total and self.n >= self.total:
            parts.append(f"done in {duration(elapsed)}")
        parts += [f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in self.postfix.items()]
        return ", ".join(parts)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        elif self.clock() - self.t0 >= self.every and self.last != -1:   # a long one says it ended
            logger.info("%s", self.line())
        self.last = -1   # closed: said once
