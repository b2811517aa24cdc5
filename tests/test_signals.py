"""flows/signals.py with real signals and real process groups."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from flows.signals import Stopped, StopRequest, signal_of, stop_on_signals, stop_process_group


@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_raises_stopped_and_the_previous_handler_comes_back(sig, code):
    before = signal.getsignal(sig)
    with pytest.raises(Stopped) as caught:
        with stop_on_signals():
            os.kill(os.getpid(), sig)
            time.sleep(5)  # the handler raises here, in the main thread
    assert caught.value.signum == sig and caught.value.exit_code == code
    assert str(caught.value) == f"stopped by {sig.name}" and signal_of(caught.value) == sig
    assert signal.getsignal(sig) is before


def test_graceful_the_first_signal_asks_the_second_raises():
    request = StopRequest()
    with pytest.raises(Stopped):
        with stop_on_signals(graceful=request):
            os.kill(os.getpid(), signal.SIGTERM)
            deadline = time.monotonic() + 5
            while not request.is_set() and time.monotonic() < deadline:
                time.sleep(0.01)
            assert request.is_set() and request.signum == signal.SIGTERM  # asked, nothing raised
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)


def test_a_stop_survives_a_prefect_state_message():
    stopped = Stopped(signal.SIGINT, "during stage train; the next pipeline run resumes")
    back = Stopped.from_message(str(stopped))
    assert (back.signum, back.detail, back.exit_code) == (signal.SIGINT, stopped.detail, 130)
    other = Stopped.from_message("Flow run was cancelled.")
    assert other.signum == signal.SIGTERM and str(other) == "stopped by SIGTERM: Flow run was cancelled."
    assert signal_of(KeyboardInterrupt()) == signal.SIGINT and signal_of(ValueError()) is None


CHILD = """
import signal, sys, time
def finish(*_):
    time.sleep(1.0)  # a checkpoint being written
    open(sys.argv[1], "w").write("finished")
    sys.exit(0)
signal.signal(signal.SIGTERM, finish)
open(sys.argv[1] + ".ready", "w").close()
time.sleep(60)
"""


def test_the_whole_group_is_waited_for_not_only_its_leader(tmp_path):
    """The leader (as DVC) dies at once on SIGTERM; its child (as `ddpm train`) needs a second to finish: it
    must get that second, not a SIGKILL the moment the leader is gone."""
    marker = tmp_path / "child"
    leader = subprocess.Popen(["sh", "-c", f'"{sys.executable}" -c \'{CHILD}\' "{marker}" & wait'],
                              start_new_session=True)
    deadline = time.monotonic() + 30
    while not (tmp_path / "child.ready").exists():
        assert time.monotonic() < deadline and leader.poll() is None
        time.sleep(0.05)
    t0 = time.monotonic()
    stop_process_group(leader, grace_s=10)
    assert marker.read_text() == "finished" and 0.9 < time.monotonic() - t0 < 9
    with pytest.raises(ProcessLookupError):
        os.killpg(leader.pid, 0)  # nothing of the group is left


def test_what_ignores_sigterm_is_killed_after_the_grace_period(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                             "open('ready', 'w').close(); time.sleep(60)"], cwd=tmp_path, start_new_session=True)
    deadline = time.monotonic() + 30
    while not (tmp_path / "ready").exists():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    t0 = time.monotonic()
    stop_process_group(proc, grace_s=1)
    assert proc.wait(timeout=5) == -signal.SIGKILL and 0.9 < time.monotonic() - t0 < 9
