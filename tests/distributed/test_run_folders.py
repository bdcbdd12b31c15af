"""Run folders through the launched command: the README's round trip, and a resume that extends a run."""

import json
import re
import statistics
from pathlib import Path

from plait.report import read_metrics
from tests.distributed.runs import ARGS, plait


def files_in(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` and its bytes: equal snapshots mean nothing was written."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_the_readme_round_trip_and_an_extended_resume(tmp_path, data_dir):
    # The README's commands, with the tiny model of the launcher tests; every run here is dp=2 workers.
    tiny = [*ARGS, "--data-dir", data_dir, "--checkpoint-every", "10", "--eval-every", "10", "--warmup-steps", "5"]
    run = lambda *args: plait(["train", *args], cwd=tmp_path)  # noqa: E731
    first = run("--dp", "2", "--pp", "1", *tiny, "--steps", "30", "--out", "runs/r")
    assert first.returncode == 0, first.stderr[-3000:]
    r = tmp_path / "runs" / "r"
    before = files_in(r)

    # Fed back, the config is a new run in a folder of its own; runs/r is untouched.
    again = run("--config", "runs/r/config.toml", "--steps", "5")
    assert again.returncode == 0, again.stderr[-3000:]
    (other,) = [p for p in (tmp_path / "runs").iterdir() if p.name != "r"]
    assert re.fullmatch(r"\d{8}-\d{6}", other.name)
    assert "layout: dp=2 x pp=1 on 2 process(es)" in again.stdout
    assert [rec["step"] for rec in read_metrics(other / "metrics.jsonl")] == list(range(6))
    assert files_in(r) == before

    # Refused in the launching parent, before any worker starts, one line, nothing written: the old folder
    # named as --out, and a resume whose --steps is not past its checkpoint.
    for args, message in [
        (["--config", "runs/r/config.toml", "--steps", "5", "--out", "runs/r"],
         "--out runs/r already holds a run; continue it with --resume runs/r, or give a new --out"),
        (["--resume", "runs/r", "--steps", "20", "--lr", "0.5"],
         "--steps 20 is not past the checkpoint's step 30 in runs/r; give --steps 31 or more"),
    ]:
        refused = run(*args)
        assert (refused.returncode, refused.stdout, refused.stderr) == (2, "", f"plait: error: {message}\n")
    assert files_in(r) == before and len(list((tmp_path / "runs").iterdir())) == 2

    # Extended: the summary covers steps 0-40, and the finished run trains on at its floor (0.1 x lr).
    extended = run("--resume", "runs/r", "--steps", "40")
    assert extended.returncode == 0, extended.stderr[-3000:]
    records = read_metrics(r / "metrics.jsonl")
    assert [rec["step"] for rec in records] == list(range(41))
    assert [rec["lr"] for rec in records[31:]] == [1e-3 * 0.1] * 10
    summary = json.loads((r / "summary.json").read_text())
    val = {str(rec["step"]): rec["val_loss"] for rec in records if "val_loss" in rec}
    assert list(summary["val_loss"]) == ["0", "10", "20", "30", "40"] and summary["val_loss"] == val
    median = statistics.median(rec["step_time"] for rec in records if "step_time" in rec)
    assert summary["median_step_time_s"] == median
    lines = [" ".join(line.split()) for line in extended.stdout.splitlines()]
    assert f"validation loss {val['0']:.4f} -> {val['40']:.4f} (step 0 -> 40)" in lines
    assert f"median step time (ms) {median * 1e3:.1f}" in lines
