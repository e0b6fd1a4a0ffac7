"""Stop training cleanly on SIGTERM or SIGINT: finish the step, write a checkpoint, return.

Schedulers (SLURM, Kubernetes, spot instances) send SIGTERM some time before they kill a job, and
Ctrl-C sends SIGINT. Here both only set a flag, which the training loop reads at the end of every
step. A second signal while the first is pending is passed on to the handler that was there before
(so Ctrl-C twice interrupts at once, e.g. when the file system hangs the checkpoint write; a second
SIGINT raises KeyboardInterrupt even if the handler before was SIG_IGN).
"""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopSignal:
    """Context manager: while inside, SIGTERM/SIGINT set `received` instead of ending the process.

    Handlers can only be installed from the main thread; elsewhere (training inside a worker thread)
    this does nothing and the signals keep their usual effect. The previous handlers come back on exit.
    """

    def __init__(self, signals: tuple[signal.Signals, ...] = STOP_SIGNALS):
        self.signals = signals
        self.received: signal.Signals | None = None
        self._previous: dict[signal.Signals, Any] = {}

    @property
    def name(self) -> str | None:
        """ "SIGTERM", "SIGINT", or None when no signal came."""
        return self.received.name if self.received is not None else None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is None:
            self.received = signal.Signals(signum)
            return
        self._restore()  # a second signal: behave as if we had never been here...
        if signum == signal.SIGINT:  # ...except that Ctrl-C twice always interrupts, whatever handler
            raise KeyboardInterrupt  # was there before (a library may have left SIGINT ignored)
        signal.raise_signal(signum)

    def _restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        self._previous.clear()

    def __enter__(self) -> StopSignal:
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._handle) for sig in self.signals}
        return self

    def __exit__(self, *exc: object) -> None:
        self._restore()
