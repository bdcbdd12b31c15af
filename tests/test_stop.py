"""plait/stop.py: what one process does with stop signals (the job-wide stop: tests/distributed/test_stop.py)."""

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from plait.stop import StopRequested, StopSignals, before_first_step_line, signals_for, stopped_line, stopped_short


def test_the_stop_signals_are_sigterm_sigint_and_the_chosen_one():
    assert signals_for("SIGTERM") == [signal.SIGTERM, signal.SIGINT]
    assert signals_for("SIGUSR1") == [signal.SIGTERM, signal.SIGINT, signal.SIGUSR1]


def test_before_the_model_exists_the_first_signal_raises_and_after_it_only_sets_the_flag():
    stops = StopSignals("SIGUSR1").install()
    try:
        stops.raising = True
        with pytest.raises(StopRequested) as caught:
            os.kill(os.getpid(), signal.SIGUSR1)
            signal.sigtimedwait([], 0)  # a point where Python runs the handler
        assert caught.value.name == "SIGUSR1" and stops.name == "SIGUSR1"
        again = StopSignals("SIGUSR1").install()
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGUSR1)  # within the window: the same stop, arriving twice
        assert again.requested == signal.SIGUSR1
        again.uninstall()
    finally:
        stops.uninstall()
    assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL


def test_a_second_signal_after_the_window_exits_at_once_with_128_plus_its_number():
    code = textwrap.dedent("""
        import os, signal, time
        from plait.stop import StopSignals
        stops = StopSignals("SIGUSR1", window_s=0.2).install()
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(0.3)
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(5)
        print("not reached")
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 128 + signal.SIGUSR1
    assert proc.stdout == ""
    assert proc.stderr == "plait: stopped at once on a second SIGUSR1; no checkpoint written for this stop\n"


def test_the_lines_and_a_run_stopped_short_of_its_end(tmp_path):
    assert stopped_line(78, "SIGTERM", "RUN/checkpoints/step-000078", "RUN") == (
        "stopped at step 78 on SIGTERM; checkpoint RUN/checkpoints/step-000078; resume with: plait train --resume RUN")
    assert before_first_step_line("SIGINT") == "stopped before the first step on SIGINT; nothing was written"
    assert not stopped_short(str(tmp_path), 6)  # no checkpoint: nothing to tell
    (tmp_path / "checkpoints" / "step-000004").mkdir(parents=True)
    assert not stopped_short(str(tmp_path), 6)  # no manifest: not a complete checkpoint
    (tmp_path / "checkpoints" / "step-000004" / "manifest.json").write_text("{}")
    assert stopped_short(str(tmp_path), 6)
    (tmp_path / "checkpoints" / "step-000006").mkdir()
    (tmp_path / "checkpoints" / "step-000006" / "manifest.json").write_text("{}")
    assert not stopped_short(str(tmp_path), 6)  # the last step's checkpoint: finished
