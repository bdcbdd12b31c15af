"""Runs of the `plait` command that several test modules compare against.

Starting workers costs seconds (each imports torch), so one launched
dp=2 x pp=2 run and its one-process reference are made once per session and
shared: the launcher tests compare them, the fault tests cut and resume them.
"""

import pytest

from plait.cli import main
from tests.distributed.runs import ARGS, HYBRID, ONE_PROCESS, plait


@pytest.fixture(scope="session")
def hybrid_run(tmp_path_factory, data_dir):
    """An uninterrupted dp=2 x pp=2 run started as a plain command, checkpointed every 2 steps."""
    out = tmp_path_factory.mktemp("hybrid") / "run"
    proc = plait(["train", *ARGS, *HYBRID, "--data-dir", data_dir, "--out", str(out)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    (out / "stdout.txt").write_text(proc.stdout)
    return out


@pytest.fixture(scope="session")
def single_run(tmp_path_factory, data_dir):
    """The same run in this one process: the reference every layout must equal."""
    out = tmp_path_factory.mktemp("single") / "run"
    assert main(["train", *ARGS, *ONE_PROCESS, "--data-dir", data_dir, "--out", str(out)]) == 0
    return out
