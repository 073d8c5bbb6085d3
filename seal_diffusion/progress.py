"""Progress of long jobs (compare, the σ sweep, the robustness matrix): one counter for the terminal and the app.

A job knows how many units of work it will do. :class:`Ticker` counts them and reports ``(done, total, label)`` to
the caller's ``progress`` callback (the app's progress bar) and, when asked, draws a tqdm bar on the terminal.
"""

from __future__ import annotations

from typing import Callable

from tqdm.auto import tqdm

# progress(done, total, what is running): what the library's long jobs call as they advance
Progress = Callable[[int, int, str], object]


class Ticker:
    """Counts units of work; calls ``callback(done, total, label(what, done, total))`` and advances a tqdm bar.

    ``desc`` draws a tqdm bar (hidden unless ``show``); without it only the callback is told. ``done`` never passes
    ``total``.
    """

    def __init__(self, total: int, callback: Progress | None = None, *, desc: str | None = None, show: bool = False,
                 unit: str = "it", label: Callable[[str, int, int], str] | None = None):
        self.total, self.done, self.callback = total, 0, callback
        self.label = label or (lambda what, done, total: what)
        self.bar = tqdm(total=total, desc=desc, unit=unit, disable=not show) if desc is not None else None

    def __call__(self, what: str, n: int = 1) -> None:
        self.done = min(self.done + n, self.total)
        if self.bar is not None:
            self.bar.update(n)
            self.bar.set_postfix_str(what)
        if self.callback is not None:
            self.callback(self.done, self.total, self.label(what, self.done, self.total))

    def advance_to(self, done: int, what: str) -> None:
        """Move to ``done`` units (a sub-job reports its own step count); never backwards."""
        self(what, max(done - self.done, 0))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
