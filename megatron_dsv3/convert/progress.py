"""A progress line for long conversions: bytes done of the total, throughput and time left.

On a terminal it redraws one line (at most four times a second); in a log (CI, a batch job) it
prints a line every 10% so the log stays short.  Safe to call from several threads.
"""

from __future__ import annotations

import sys
import threading
import time


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} TB"


def _clock(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class Progress:
    def __init__(self, label: str, total_bytes: int, *, stream=None, enabled: bool = True):
        self.label, self.total = label, max(1, total_bytes)
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.done = 0
        self.start = time.perf_counter()
        self._lock = threading.Lock()
        self._last_draw = 0.0
        self._last_decile = -1

    def line(self) -> str:
        elapsed = time.perf_counter() - self.start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        left = (self.total - self.done) / rate if rate > 0 else 0.0
        return (f"{self.label}: {_size(self.done)} / {_size(self.total)} ({100 * self.done / self.total:3.0f}%)"
                f"  {_size(rate)}/s  elapsed {_clock(elapsed)}  ETA {_clock(left)}")

    def add(self, nbytes: int) -> None:
        with self._lock:
            self.done += nbytes
            if not self.enabled:
                return
            now = time.perf_counter()
            if self.tty:
                if now - self._last_draw >= 0.25:
                    self._last_draw = now
                    self.stream.write("\r" + self.line())
                    self.stream.flush()
            else:
                decile = int(10 * self.done / self.total)
                if decile > self._last_decile:
                    self._last_decile = decile
                    self.stream.write(self.line() + "\n")
                    self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.tty:
            self.stream.write("\r" + self.line() + "\n")
            self.stream.flush()

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.start
