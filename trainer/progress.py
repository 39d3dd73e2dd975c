"""Where long work is: the listing, the pass over the images, prepare. A line about every
REPORT_SECONDS (count of total, items/s, time left), for logs such as Vertex AI's; a bar
instead on a terminal or in a notebook."""

import sys
import time

REPORT_SECONDS = 30.0


def interactive(stream=None):
    """Someone watches: a terminal, or a Jupyter cell, where Keras's progress bar renders."""
    return (stream or sys.stdout).isatty() or "ipykernel" in sys.modules


class Report:
    """Progress of `what` over `total` items, or of a count whose total is not known until the
    end (total None: a listing; lines only)."""

    def __init__(self, what, total, every=REPORT_SECONDS, stream=None):
        self.what, self.total, self.every = what, total, every
        self.stream = stream or sys.stdout
        self.began = self.last = time.monotonic()
        self.done_count = 0
        self._bar = None
        if total is not None and interactive(self.stream):  # a bar of no known end says little
            import keras
            self._bar = keras.utils.Progbar(total, unit_name="image")

    def update(self, done):
        self.done_count = done
        if self._bar:
            self._bar.update(done)
            return
        now = time.monotonic()
        if now - self.last >= self.every and (self.total is None or done < self.total):
            self.last = now
            print(self.line(now), file=self.stream, flush=True)

    def add(self, count=1):
        self.update(self.done_count + count)

    def line(self, now=None):
        elapsed = (now or time.monotonic()) - self.began
        rate = self.done_count / elapsed if elapsed > 0 else 0.0
        if self.total is None:
            return f"{self.what}: {self.done_count} so far, {rate:.0f}/s"
        left = (self.total - self.done_count) / rate if rate else float("inf")
        return (f"{self.what}: {self.done_count} of {self.total} "
                f"({100 * self.done_count / max(self.total, 1):.0f}%), {rate:.0f}/s, "
                f"{_duration(left)} left")

    def done(self):
        if self._bar:
            self._bar.update(self.total, finalize=True)


def _duration(seconds):
    if seconds == float("inf"):
        return "unknown time"
    minutes, seconds = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s"
