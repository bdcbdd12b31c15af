"""A traced run records exactly what the schedule says, in files a person can open."""

import json
import statistics
import subprocess
import sys

import matplotlib.image
import pytest

from plait.parallel.schedule import make_schedule

ARGS = ["--dp", "1", "--pp", "2", "--microbatches", "4", "--schedule", "1f1b", "--n-layer", "2", "--n-embd", "32",
        "--n-head", "2", "--seq-len", "32", "--global-batch", "8", "--steps", "4", "--eval-batches", "1",
        "--sample-tokens", "0", "--no-progress", "--trace"]


@pytest.mark.parametrize("schedule,virtual", [("zbv", 2), ("dualpipev", 2)])
def test_traced_run(tmp_path, data_dir, schedule, virtual):
    """Every F, B, I and W recorded as the schedule orders them (zbv: two stages per rank, in a V;
    dualpipev: B's and split backwards on one stage; one event per action)."""
    out = tmp_path / "run"
    args = [*ARGS, "--schedule", schedule, "--virtual-stages", str(virtual)]
    proc = subprocess.run([sys.executable, "-m", "plait", "train", *args, "--data-dir", data_dir, "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    trace = json.loads((out / "trace.json").read_text())
    events = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    for e in events:
        assert {"name", "cat", "ph", "ts", "dur", "pid", "tid"} <= set(e) and e["dur"] >= 0
    actions = make_schedule(schedule, 2, 4, virtual)
    for step in (2, 3):  # the traced steps (0-based), after two of warm-up
        for rank in (0, 1):
            mine = sorted((e for e in events if e["pid"] == rank and e["args"]["step"] == step
                           and e["cat"] in ("F", "B", "I", "W")), key=lambda e: e["ts"])
            assert [f"{e['args']['stage']}{e['name']}" for e in mine] == [str(a) for a in actions[rank]]
    png = out / "pipeline.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    height, width, _ = matplotlib.image.imread(png).shape
    assert width > 800 and height > 300
    # The report agrees with metrics.jsonl.
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    tokens_per_s = 8 * 32 / statistics.median(r["step_time"] for r in records if "step_time" in r)
    report = subprocess.run([sys.executable, "-m", "plait", "report", str(out)], capture_output=True, text=True,
                            timeout=120)
    assert report.returncode == 0, report.stderr
    assert f"{'tokens/s':<28}{tokens_per_s:>14,.0f}" in report.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert f"{summary['trace']['bubble_measured']:.3f} measured" in report.stdout
    # The simulation of the traced step ran, with the measured F (and B, or I and W) times.
    assert 0 <= summary["trace"]["bubble_simulated"] < 1
    assert (out / "throughput.png").is_file() and (out / "loss.png").is_file()
