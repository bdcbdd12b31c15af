"""benchmarks/gpu.py, checked without a GPU: its CPU dry run prints the whole table, and
without --dry-run-cpu a machine with no CUDA device gets one line on stderr and exit 0."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_script(*args: str, **env: str) -> subprocess.CompletedProcess:
    # This checkout's src first, so the script imports the plait under test.
    path = os.pathsep.join(p for p in (str(ROOT / "src"), os.environ.get("PYTHONPATH")) if p)
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu.py"), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": path, **env})


def test_dry_run_on_the_cpu_prints_the_table_with_both_contenders():
    proc = run_script("--dry-run-cpu", "--rounds", "1", "--warmup", "1")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("contender"))
    assert lines[header].split() == ["contender", "step", "(ms)", "tokens/s", "peak", "mem", "(MiB)", "vs", "plain",
                                     "MFU"]
    assert lines[header + 1].split()[0] == "plait"
    assert lines[header + 2].startswith("plain PyTorch")
    assert any(line.startswith("traced plait step") for line in lines)


def test_without_cuda_it_says_so_in_one_line_and_exits_0():
    proc = run_script(CUDA_VISIBLE_DEVICES="")  # the same answer on a GPU machine
    assert (proc.returncode, proc.stdout, proc.stderr) == (
        0, "", "benchmarks/gpu.py needs a CUDA device; none is visible\n")


def test_the_host_overhead_benchmark_prints_both_contenders_and_their_difference():
    path = os.pathsep.join(p for p in (str(ROOT / "src"), os.environ.get("PYTHONPATH")) if p)
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "host_overhead.py"), "--layers", "2",
                           "--rounds", "2"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": path})
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    header = lines.index(f"{'contender':<15}{'step (ms)':>11}{'vs plain':>10}")
    assert [line.split()[0] for line in lines[header + 1:header + 3]] == ["plait", "plain"]
    assert lines[header + 2].split()[-1] == "1.000"
    assert lines[-1].startswith("plait - plain: ") and "paired ratio median" in lines[-1]
