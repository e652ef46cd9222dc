"""A small progress bar on stderr (no dependency): redrawn in place on a terminal, one line
per tenth of the work otherwise (logs, CI)."""

import sys
import time


def _clock(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds), 60)
    return f"{minutes}:{seconds:02d}"


class Progress:
    """`step(label)` before each unit of work, `close()` at the end."""

    def __init__(self, total: int, stream=None, width: int = 24):
        self.total = max(total, 1)
        self.stream = sys.stderr if stream is None else stream
        self.width = width
        self.done = -1
        self.start = time.perf_counter()
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.last_tenth = -1

    def step(self, label: str) -> None:
        self.done += 1
        elapsed = time.perf_counter() - self.start
        fraction = self.done / self.total
        filled = int(self.width * fraction)
        left = f", ~{_clock(elapsed / fraction * (1 - fraction))} left" if self.done else ""
        line = (
            f"[{'#' * filled}{'.' * (self.width - filled)}] {self.done}/{self.total} "
            f"{_clock(elapsed)}{left}  {label}"
        )
        if self.tty:
            self.stream.write("\r" + line[:160] + "\x1b[K")
            self.stream.flush()
        elif int(10 * fraction) > self.last_tenth:
            self.last_tenth = int(10 * fraction)
            print(line, file=self.stream, flush=True)

    def close(self) -> None:
        elapsed = _clock(time.perf_counter() - self.start)
        done = f"[{'#' * self.width}] {self.total}/{self.total} {elapsed}  done"
        if self.tty:
            self.stream.write("\r" + done + "\x1b[K\n")
        else:
            print(done, file=self.stream)
        self.stream.flush()
