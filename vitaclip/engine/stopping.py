"""Stopping a training run early, on a signal, with a checkpoint.

Schedulers warn a job before they end it: SLURM sends SIGTERM at a time limit, preemption or
`scancel` (or the signal of `sbatch --signal=USR1@120` ahead of the limit), and torchrun passes
SIGTERM on to its workers, then waits about 30 s before killing them. The default action of
either signal ends the process at once, losing every step since the last checkpoint.
"""
from __future__ import annotations

import signal
import threading
from typing import Dict, Optional, Sequence

DEFAULT_STOP_SIGNALS = ("SIGTERM", "SIGUSR1")


def parse_signal(name: str) -> signal.Signals:
    """signal.Signals from "SIGTERM" or "TERM" (any case)."""
    key = name.strip().upper()
    key = key if key.startswith("SIG") else "SIG" + key
    try:
        return signal.Signals[key]
    except KeyError:
        raise ValueError(f"unknown signal {name!r} (e.g. SIGTERM, SIGUSR1)") from None


class StopRequest:
    """Once installed (in the main thread; elsewhere Python cannot take signals and it does
    nothing), the first of `signals` to arrive is remembered in `received` instead of ending
    the process, and that signal's previous handler is put back: a second one acts as it would
    have without this (by default, ends the process). `uninstall` puts back the others."""

    def __init__(self, signals: Sequence[str]):
        self.signals = [parse_signal(name) for name in signals]
        self.received: Optional[str] = None
        self._previous: Dict[signal.Signals, object] = {}

    def install(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig in list(self._previous):
            self._restore(sig)

    def _handle(self, signum, frame) -> None:
        if self.received is None:
            self.received = signal.Signals(signum).name
        self._restore(signal.Signals(signum))

    def _restore(self, sig: signal.Signals) -> None:
        if sig in self._previous:
            previous = self._previous.pop(sig)
            # None: a handler set outside Python, which Python cannot put back; the default instead
            signal.signal(sig, signal.SIG_DFL if previous is None else previous)
