"""SIGTERM and SIGINT as exceptions, so a stopped command runs its ``finally`` blocks and stops what it started.

Python's default SIGTERM ends the process on the spot: no ``finally``, no ``atexit`` (Prefect's temporary
server), children left running. Inside :func:`stop_on_signals` a first SIGTERM or SIGINT either raises
:class:`Stopped` where the main thread is, or, given ``graceful``, only sets that event so long work can stop
at a safe point (training writes a checkpoint first); a second signal raises at once.
:func:`stop_process_group` stops a child's whole process group, so nothing it started outlives the command.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Iterator

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Stopped(BaseException):
    """A stop signal arrived. A BaseException, as KeyboardInterrupt: ``except Exception`` does not swallow it."""

    def __init__(self, signum: int, detail: str = ""):
        self.signum, self.detail = signum, detail
        super().__init__(f"stopped by {signal.Signals(signum).name}" + (f": {detail}" if detail else ""))

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # what a shell reports for a process ended by the signal

    def __reduce__(self):
        return type(self), (self.signum, self.detail)

    @classmethod
    def from_message(cls, text: str) -> Stopped:
        """Back from its message (a Prefect Cancelled state's): ``stopped by SIGINT: ...``; else SIGTERM."""
        m = re.match(r"stopped by (SIG[A-Z]+)(?:: (.*))?$", text, re.S)
        if m and m.group(1) in signal.Signals.__members__:
            return cls(signal.Signals[m.group(1)], m.group(2) or "")
        return cls(signal.SIGTERM, text)


def signal_of(exc: BaseException) -> int | None:
    """The signal behind a stop: ours, Prefect's (``TerminationSignal``, also a cancellation from the API),
    Ctrl-C's KeyboardInterrupt. None for any other exception."""
    if isinstance(exc, Stopped):
        return exc.signum
    if isinstance(exc, KeyboardInterrupt):
        return signal.SIGINT
    if type(exc).__name__ == "TerminationSignal":  # prefect.exceptions, not imported by the stage commands
        return getattr(exc, "signal", signal.SIGTERM)
    return None


class StopRequest(threading.Event):
    """An event that also remembers which signal set it."""

    signum: int | None = None


@contextlib.contextmanager
def stop_on_signals(graceful: StopRequest | None = None) -> Iterator[StopRequest]:
    """Within the block, SIGTERM/SIGINT raise :class:`Stopped` (or first set ``graceful``); the previous
    handlers come back afterwards. Only the main thread can install handlers: elsewhere this does nothing."""
    request = graceful if graceful is not None else StopRequest()

    def handler(signum, frame):
        if graceful is not None and not graceful.is_set():
            graceful.signum = signum
            graceful.set()
            return
        raise Stopped(signum)

    if threading.current_thread() is not threading.main_thread():
        yield request
        return
    previous = {sig: signal.signal(sig, handler) for sig in SIGNALS}
    try:
        yield request
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def stop_process_group(proc: subprocess.Popen, grace_s: float, first: int = signal.SIGTERM) -> None:
    """``first`` (SIGTERM) to the process group ``proc`` leads (started with ``start_new_session``: a stage's
    DVC, shell and `ddpm <stage>`; a server and its workers), SIGKILL to what is left of it after ``grace_s``.
    The whole group is waited for, not only its leader: DVC ends at once on SIGTERM, while `ddpm train`
    first writes its checkpoint."""
    for sig, wait_s in ((first, grace_s), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            proc.poll()  # reap the leader (DVC); the kernel reparents and reaps the rest
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.1)
