"""Ctrl-C or SIGTERM (a scheduler preempting the job) during training: the first signal finishes
the current step, saves and exits; a second one aborts at once (the checkpoint writer leaves no
partial directory behind)."""

from __future__ import annotations

import signal
import sys
import threading
from types import FrameType, TracebackType
from typing import Any


class StopRequest:
    """A flag set by SIGINT (or by code, e.g. tests) that the training loop polls between steps."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}
        self._installed = False

    def request(self) -> None:
        self.requested = True

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print(
            f"\n{signal.Signals(signum).name}: stopping after this step and saving "
            "(Ctrl-C again to abort without saving)",
            file=sys.stderr,
            flush=True,
        )

    def __enter__(self) -> StopRequest:
        # Signal handlers can only be installed from the main thread; elsewhere (e.g. a
        # notebook's worker thread) Ctrl-C keeps its default behaviour.
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
            self._installed = True
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._installed:
            for signum, previous in self._previous.items():
                signal.signal(signum, previous)
            self._previous = {}
            self._installed = False
