"""What a failed DVC stage tells the user: its own error line, and whether retrying can help.

Kept apart from the Prefect flow so the CLI can name it without importing Prefect.
"""

from __future__ import annotations

import re
import signal
from collections.abc import Sequence

from flows.credentials import scrub

# `ddpm <stage>` exits 2 for the errors it explains (bad config or data, divergence, out of memory)
EXIT_DETERMINISTIC = 2
_DVC_ERROR = "ERROR: "
# what /bin/sh prints for a child a signal ended (DVC then reports the shell's exit 128 + the signal)
_SHELL_SIGNAL_LINES = ("Killed", "Terminated", "Aborted", "Segmentation fault", "Bus error")


class StageFailed(RuntimeError):
    """A stage failed; the message ends with the stage's own error line (or DVC's, if the command never ran)."""

    def __init__(self, stage: str, exit_code: int | None, reason: str, deterministic: bool, where: str = ""):
        self.stage, self.exit_code, self.reason, self.deterministic = stage, exit_code, reason, deterministic
        where = where or (f"exit {exit_code}" if exit_code is not None else "DVC did not run it")
        super().__init__(f"stage {stage} failed ({where}{', not retried' if deterministic else ''}): {reason}")

    def __reduce__(self):  # pickled with Prefect's task state: rebuild from the same fields
        return type(self), (self.stage, self.exit_code, self.reason, self.deterministic)


class StageTimedOut(StageFailed):
    """A stage ran past its time limit and was stopped; not retried (it would hit the same limit)."""

    def __init__(self, stage: str, limit_name: str, limit_s: float):
        self.limit_name, self.limit_s = limit_name, limit_s
        super().__init__(stage, None, f"stopped after {limit_s:g} s, the limit {limit_name} (raise it in "
                                      f"params.yaml, or 0 for none)", True, where="timed out")

    def __reduce__(self):
        return type(self), (self.stage, self.limit_name, self.limit_s)


def classify(stage: str, lines: Sequence[str]) -> StageFailed:
    """The failure that ``dvc repro <stage>``'s output describes.

    The command ran and failed: DVC's last line says ``exited with N``; the reason is the stage's own
    ``ddpm <stage>: error: ...`` line, else the last line before DVC's (a traceback's last line);
    deterministic when N is 2. The command never ran (a missing dependency, a bad dvc.yaml): the
    reason is DVC's error, deterministic unless DVC could not take its lock.
    """
    lines = [ln for ln in lines if ln.strip()]
    dvc_errors = [ln for ln in lines if ln.startswith(_DVC_ERROR)]
    exited = re.search(r"exited with (-?\d+)", " ".join(dvc_errors[-2:]))
    if exited:
        code = int(exited.group(1))
        own = [ln for ln in lines if not ln.startswith(_DVC_ERROR)]
        reason = next((ln for ln in reversed(own) if re.match(r"ddpm \w+: error: ", ln)), own[-1] if own else "no output")
        signum = -code if code < 0 else code - 128 if 128 < code < 160 and reason in _SHELL_SIGNAL_LINES else 0
        if signum:  # killed by a signal (the OOM killer, a kill -9): the command printed no reason of its own
            shown = reason.startswith("> ") or reason in _SHELL_SIGNAL_LINES
            reason = f"killed by {_signal_name(signum)}" + ("" if shown else f" after: {reason}")
        return StageFailed(stage, code, scrub(reason), code == EXIT_DETERMINISTIC)
    reason = dvc_errors[-1][len(_DVC_ERROR):] if dvc_errors else (lines[-1] if lines else "no output")
    return StageFailed(stage, None, scrub(reason), "lock" not in reason.lower())


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"
