"""What a run leaves behind for people: the metrics log and the loss curve."""

from __future__ import annotations

import json
import os
import statistics
from pathlib import Path
from typing import Any


class MetricsLog:
    """`metrics.jsonl`: one JSON object per line, flushed as each is written.

    Opening it for a resumed run drops the lines past the step resumed from,
    so the log reads as if the run had never stopped. With `tensorboard`, each
    number also goes to TensorBoard event files in that folder.
    """

    def __init__(self, path: str | Path, resume_step: int | None = None, tensorboard: str | Path | None = None):
        self.path = Path(path)
        if resume_step is not None and self.path.exists():
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            tmp = self.path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(line + "\n" for line in kept))
            os.replace(tmp, self.path)
        self._fh = open(self.path, "a")
        self._tb = None
        if tensorboard is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                from plait.errors import ConfigError

                raise ConfigError("--tensorboard needs the tensorboard package; pip install tensorboard") from None
            self._tb = SummaryWriter(str(tensorboard), purge_step=resume_step + 1 if resume_step else None)

    def write(self, record: dict[str, Any]) -> None:
        self._fh.write(json.dumps(record) + "\n")
        self._fh.flush()
        if self._tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self._tb.add_scalar(key, value, record["step"])

    def close(self) -> None:
        self._fh.close()
        if self._tb is not None:
            self._tb.close()


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a `metrics.jsonl`, in order."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def plot_loss(records: list[dict[str, Any]], out: str | Path, title: str = "") -> None:
    """Draw training and validation loss against step into a PNG (written whole or not at all)."""
    import matplotlib

    matplotlib.use("Agg")  # no display: files only
    import matplotlib.pyplot as plt

    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if train:
        ax.plot(*zip(*train), label="train", color="tab:blue", linewidth=1.2)
    if val:
        ax.plot(*zip(*val), label="validation", color="tab:orange", marker="o", markersize=4)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats per token)")
    ax.set_title(title or "loss")
    ax.legend()
    _finish(fig, ax, out)


# [Note: peak FLOP/s] Dense peak TFLOP/s of one GPU (no sparsity), keyed by the name
# torch.cuda.get_device_name gives it (matched whole: an H100's SXM, PCIe and NVL
# forms differ by a third) and by the compute dtype: "bfloat16" the BF16 tensor
# cores, "float32" the TF32 tensor cores (plait's training turns TF32 on for
# float32 matmuls on CUDA), "float64" the FP64 tensor cores. Figures from NVIDIA's datasheets,
# which print the sparse figure, twice the dense one, beside these. A dtype a
# datasheet gives no figure for is left out: it reports an unknown peak rather
# than a guess.
GPU_PEAK_TFLOPS: dict[str, dict[str, float]] = {
    # H100 Tensor Core GPU datasheet: SXM5, PCIe, NVL.
    "NVIDIA H100 80GB HBM3": {"bfloat16": 989, "float32": 495, "float64": 67},
    "NVIDIA H100 PCIe": {"bfloat16": 756, "float32": 378, "float64": 51},
    "NVIDIA H100 NVL": {"bfloat16": 835, "float32": 418, "float64": 60},
    # H200 Tensor Core GPU datasheet: SXM, NVL.
    "NVIDIA H200": {"bfloat16": 989, "float32": 495, "float64": 67},
    "NVIDIA H200 NVL": {"bfloat16": 835, "float32": 418, "float64": 60},
    # GH200 Grace Hopper Superchip datasheet (its GPU's figures are the H100 SXM's).
    "NVIDIA GH200 480GB": {"bfloat16": 989, "float32": 495, "float64": 67},
    # A100 Tensor Core GPU datasheet: the same figures for SXM4 and PCIe, 40 and 80 GB.
    "NVIDIA A100-SXM4-80GB": {"bfloat16": 312, "float32": 156, "float64": 19.5},
    "NVIDIA A100-SXM4-40GB": {"bfloat16": 312, "float32": 156, "float64": 19.5},
    "NVIDIA A100-PCIE-40GB": {"bfloat16": 312, "float32": 156, "float64": 19.5},
    "NVIDIA A100 80GB PCIe": {"bfloat16": 312, "float32": 156, "float64": 19.5},
    # A30 datasheet.
    "NVIDIA A30": {"bfloat16": 165, "float32": 82, "float64": 10.3},
    # A10, A40, L4, L40, L40S datasheets: no FP64 tensor cores, no FP64 figure.
    "NVIDIA A10": {"bfloat16": 125, "float32": 62.5},
    "NVIDIA A40": {"bfloat16": 149.7, "float32": 74.8},
    "NVIDIA L4": {"bfloat16": 121, "float32": 60},
    "NVIDIA L40": {"bfloat16": 181, "float32": 90.5},
    "NVIDIA L40S": {"bfloat16": 362, "float32": 183},
}
_UNITS = {"bfloat16": "BF16", "float32": "TF32", "float64": "FP64"}


def gpu_peak_tflops(name: str, dtype: str) -> float | None:
    """The datasheet's dense peak TFLOP/s of the GPU `name` in `dtype`; None when plait's table has none.

    `name` as `torch.cuda.get_device_name` reports it; see [Note: peak FLOP/s].
    """
    return GPU_PEAK_TFLOPS.get(name, {}).get(dtype)


def given_peak(peak_tflops: float, processes: int) -> tuple[float, str]:
    """The job's peak FLOP/s from --peak-tflops, one device's dense peak, and its source text."""
    return peak_tflops * 1e12 * processes, f"--peak-tflops {peak_tflops:g} x {processes}"


def peak_flops(device, dtype: str, processes: int, peak_tflops: float | None = None) -> tuple[float | None, str]:
    """The job's peak FLOP/s (None: unknown) and where the number comes from.

    `peak_tflops` (--peak-tflops), when given, is one device's peak. Else a
    known GPU: the datasheet's dense figure per device in `dtype`; an unknown
    one: None, not a guess. A CPU: measured here, a 1024^3 float32 matrix
    product with this process's threads, times the processes the cores can run
    at once.
    """
    import os
    import time

    import torch

    if peak_tflops is not None:
        return given_peak(peak_tflops, processes)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        tflops = gpu_peak_tflops(name, dtype)
        if tflops is None:
            return None, f"{name} has no {dtype} figure in plait's table"
        unit = _UNITS.get(dtype, dtype)
        return tflops * 1e12 * processes, f"{tflops:g} TFLOP/s dense {unit} per {name} (datasheet) x {processes}"
    a, b = torch.randn(1024, 1024, device=device), torch.randn(1024, 1024, device=device)
    a @ b
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    per_process = 2 * 1024**3 / best
    parallel = min(processes, max(1, (os.cpu_count() or 1) // torch.get_num_threads()))
    return per_process * parallel, f"measured matmul, {parallel} process(es) at once"


def _flops(x: float) -> str:
    return f"{x / 1e12:,.0f} TFLOP/s" if x >= 1e12 else f"{x / 1e9:,.0f} GFLOP/s"


def throughput(records: list[dict[str, Any]]) -> tuple[float | None, float | None]:
    """(median step time in s, tokens/s at that median) over every step of a metrics log; (None, None) if none.

    The one definition: the summary a run writes and `plait report` both use it.
    """
    steps = [r for r in records if "step_time" in r]
    if not steps:
        return None, None
    median_t = statistics.median(r["step_time"] for r in steps)
    return median_t, steps[-1]["tokens"] / steps[-1]["step"] / median_t


def summary_table(summary: dict[str, Any], records: list[dict[str, Any]]) -> str:
    """The run report as a text table: throughput, MFU, bubble, where each rank's time went, memory."""
    median_t, tps = throughput(records)
    if median_t is None:
        return "no training steps recorded"
    lines = [f"{'tokens/s':<28}{tps:>14,.0f}", f"{'median step time (ms)':<28}{median_t * 1e3:>14.1f}"]
    if summary.get("peak_flops"):
        mfu = summary["flops_per_token"] * tps / summary["peak_flops"]
        lines.append(f"{'MFU':<28}{mfu:>14.2%}   (peak {_flops(summary['peak_flops'])}, "
                     f"{summary.get('peak_source', '')})")
    else:
        source = summary.get("peak_source")
        lines.append("MFU: unknown peak, give --peak-tflops" + (f" ({source})" if source else ""))
    val = summary.get("val_loss") or {}
    if val:
        first, last = min(val, key=int), max(val, key=int)
        lines.append(f"{'validation loss':<28}{val[first]:>14.4f} -> {val[last]:.4f} (step {first} -> {last})")
    trace = summary.get("trace")
    if trace:
        sim = trace.get("bubble_simulated")
        lines.append(f"{'bubble (traced step)':<28}{trace['bubble_measured']:>14.3f} measured, "
                     + (f"{sim:.3f} simulated, " if sim is not None else "") + f"{trace['bubble_theory']:.3f} theory")
        lines.append(f"{'rank':<6}{'compute %':>10}{'comm %':>9}{'idle %':>9}   (traced step {trace['traced_step']})")
        for rank, row in sorted(trace.get("ranks", {}).items(), key=lambda kv: int(kv[0])):
            lines.append(f"{rank:<6}{row['compute']:>10.1%}{row['comm']:>9.1%}{row['idle']:>9.1%}")
    memory = summary.get("peak_memory_mib")
    if memory:
        lines.append("peak memory (MiB) by rank: " + ", ".join(f"{r}: {m:,.0f}" for r, m in memory.items()))
    return "\n".join(lines)


def plot_throughput(records: list[dict[str, Any]], out: str | Path) -> None:
    """Tokens/s against step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [(r["step"], r["tokens_per_s"]) for r in records if "tokens_per_s" in r]
    fig, ax = plt.subplots(figsize=(7, 3.5), dpi=110)
    if pts:
        ax.plot(*zip(*pts), color="tab:green", linewidth=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel("tokens / s")
    ax.set_title("throughput")
    _finish(fig, ax, out)


def _finish(fig, ax, out: str | Path) -> None:
    """Grid, layout, and the PNG written whole or not at all."""
    import matplotlib.pyplot as plt

    ax.grid(alpha=0.3)
    fig.tight_layout()
    out = Path(out)
    tmp = out.with_name(out.stem + ".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, out)
