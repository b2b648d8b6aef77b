"""A tiny progress bar on stderr (no dependency).

On a terminal it redraws one line; elsewhere (a log file, CI) it prints a line at
every tenth of the way, so logs stay short.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    def __init__(self, total: int, desc: str, *, enabled: bool = True, stream: TextIO | None = None, width: int = 24) -> None:
        self.total, self.desc, self.enabled, self.width = max(total, 1), desc, enabled, width
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.n = 0
        self.start = time.perf_counter()
        self._last_draw = 0.0
        self._last_tenth = -1

    def update(self, n: int = 1, note: str = "") -> None:
        self.n += n
        if not self.enabled:
            return
        now = time.perf_counter()
        if self.tty:
            if now - self._last_draw >= 0.1 or self.n >= self.total:
                self._last_draw = now
                self.stream.write("\r" + self.line(note) + "\033[K")
                self.stream.flush()
        else:
            tenth = 10 * self.n // self.total
            if tenth != self._last_tenth:
                self._last_tenth = tenth
                self.stream.write(self.line(note) + "\n")
                self.stream.flush()

    def line(self, note: str = "") -> str:
        elapsed = time.perf_counter() - self.start
        frac = min(self.n / self.total, 1.0)
        filled = int(frac * self.width)
        rate = self.n / elapsed if elapsed > 0 else 0.0
        eta = (self.total - self.n) / rate if rate > 0 else 0.0
        bar = "#" * filled + "." * (self.width - filled)
        tail = f" {note}" if note else ""
        return f"{self.desc} [{bar}] {self.n}/{self.total} {elapsed:.0f}s<{eta:.0f}s{tail}"

    def close(self, note: str = "") -> None:
        if self.enabled and self.tty:
            self.stream.write("\r" + self.line(note) + "\033[K\n")
            self.stream.flush()
