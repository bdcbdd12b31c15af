"""MFU's peak: the datasheet table by exact device name and dtype, an unknown GPU, and --peak-tflops."""

import json

import pytest
import torch

from plait.cli import _config_from, build_parser, main
from plait.config_file import load_config
from plait.errors import ConfigError
from plait.report import GPU_PEAK_TFLOPS, gpu_peak_tflops, peak_flops, summary_table

# Dense TFLOP/s (bfloat16, TF32 for float32, FP64 tensor core) from NVIDIA's datasheets, written
# out here rather than read from the table under test; None where the datasheet gives no figure.
DATASHEET = {
    "NVIDIA H100 80GB HBM3": (989, 495, 67),
    "NVIDIA H100 PCIe": (756, 378, 51),
    "NVIDIA H100 NVL": (835, 418, 60),
    "NVIDIA H200": (989, 495, 67),
    "NVIDIA H200 NVL": (835, 418, 60),
    "NVIDIA GH200 480GB": (989, 495, 67),
    "NVIDIA A100-SXM4-80GB": (312, 156, 19.5),
    "NVIDIA A100-SXM4-40GB": (312, 156, 19.5),
    "NVIDIA A100-PCIE-40GB": (312, 156, 19.5),
    "NVIDIA A100 80GB PCIe": (312, 156, 19.5),
    "NVIDIA A30": (165, 82, 10.3),
    "NVIDIA A10": (125, 62.5, None),
    "NVIDIA A40": (149.7, 74.8, None),
    "NVIDIA L4": (121, 60, None),
    "NVIDIA L40": (181, 90.5, None),
    "NVIDIA L40S": (362, 183, None),
}
CASES = [(name, dtype, figures[i]) for name, figures in DATASHEET.items()
         for i, dtype in enumerate(("bfloat16", "float32", "float64"))]
CUDA0 = torch.device("cuda", 0)


def test_the_table_holds_exactly_the_listed_gpus():
    assert set(GPU_PEAK_TFLOPS) == set(DATASHEET)


@pytest.mark.parametrize("name,dtype,tflops", CASES, ids=[f"{n}-{d}" for n, d, _ in CASES])
def test_each_gpu_and_dtype_gives_its_datasheet_figure(name, dtype, tflops):
    assert gpu_peak_tflops(name, dtype) == tflops


def test_names_match_whole_so_h100_forms_differ():
    assert gpu_peak_tflops("NVIDIA H100 80GB HBM3", "bfloat16") == 989
    assert gpu_peak_tflops("NVIDIA H100 PCIe", "bfloat16") == 756
    for name in ("NVIDIA H100", "H100", "NVIDIA H100 80GB HBM3 ", "nvidia h100 pcie", "NVIDIA H100 SXM5 64GB"):
        assert gpu_peak_tflops(name, "bfloat16") is None, name


def test_a_known_gpu_gives_its_figure_times_the_processes(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: "NVIDIA H100 NVL")
    assert peak_flops(CUDA0, "bfloat16", 8) == (835e12 * 8,
                                                "835 TFLOP/s dense BF16 per NVIDIA H100 NVL (datasheet) x 8")
    assert peak_flops(CUDA0, "float32", 2) == (418e12 * 2, "418 TFLOP/s dense TF32 per NVIDIA H100 NVL (datasheet) x 2")
    assert peak_flops(CUDA0, "float64", 1) == (60e12, "60 TFLOP/s dense FP64 per NVIDIA H100 NVL (datasheet) x 1")


def test_an_unknown_gpu_reports_no_guess(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: "NVIDIA GeForce RTX 4090")
    assert peak_flops(CUDA0, "bfloat16", 4) == (None, "NVIDIA GeForce RTX 4090 has no bfloat16 figure in plait's table")
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: "NVIDIA L40S")
    assert peak_flops(CUDA0, "float64", 1) == (None, "NVIDIA L40S has no float64 figure in plait's table")


def test_peak_tflops_overrides_the_table_and_the_measurement(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: "NVIDIA GeForce RTX 4090")
    assert peak_flops(CUDA0, "bfloat16", 4, peak_tflops=165.2) == (165.2e12 * 4, "--peak-tflops 165.2 x 4")
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: "NVIDIA H100 80GB HBM3")
    assert peak_flops(CUDA0, "bfloat16", 1, peak_tflops=900) == (900e12, "--peak-tflops 900 x 1")
    assert peak_flops(torch.device("cpu"), "float32", 2, peak_tflops=0.1) == (0.2e12, "--peak-tflops 0.1 x 2")


def test_the_cpu_keeps_its_measured_matmul():
    peak, source = peak_flops(torch.device("cpu"), "float32", 1)
    assert peak > 0 and source == "measured matmul, 1 process(es) at once"


# Two steps of 1000 tokens, half a second each: 2,000 tokens/s; at 6 MFLOP per token, 12 GFLOP/s.
RECORDS = [{"step": 1, "loss": 5.0, "step_time": 0.5, "tokens_per_s": 2000.0, "tokens": 1000},
           {"step": 2, "loss": 4.0, "step_time": 0.5, "tokens_per_s": 2000.0, "tokens": 2000}]


def _summary(peak, source):
    return {"steps": 2, "parameters": 1e6, "flops_per_token": 6e6, "processes": 2, "peak_flops": peak,
            "peak_source": source, "val_loss": {}, "trace": None, "peak_memory_mib": {"0": 10.0, "1": 11.0}}


def test_summary_table_mfu_line():
    lines = summary_table(_summary(1e11, "--peak-tflops 0.05 x 2"), RECORDS).splitlines()
    assert lines[2] == "MFU                                 12.00%   (peak 100 GFLOP/s, --peak-tflops 0.05 x 2)"
    lines = summary_table(_summary(989e12 * 2, "989 TFLOP/s dense BF16 per NVIDIA H200 (datasheet) x 2"),
                          RECORDS).splitlines()
    assert lines[2] == ("MFU                                  0.00%   (peak 1,978 TFLOP/s, "
                        "989 TFLOP/s dense BF16 per NVIDIA H200 (datasheet) x 2)")
    unknown = summary_table(_summary(None, "NVIDIA GeForce RTX 4090 has no bfloat16 figure in plait's table"), RECORDS)
    assert unknown.splitlines()[2] == ("MFU: unknown peak, give --peak-tflops "
                                       "(NVIDIA GeForce RTX 4090 has no bfloat16 figure in plait's table)")


@pytest.fixture
def run_dir(tmp_path):
    """A finished run's summary and metrics, as `plait train` leaves them, from a GPU plait does not know."""
    (tmp_path / "summary.json").write_text(json.dumps(
        _summary(None, "NVIDIA GeForce RTX 4090 has no bfloat16 figure in plait's table")))
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    return tmp_path


def test_report_command_takes_peak_tflops(run_dir, capsys):
    assert main(["report", str(run_dir)]) == 0
    assert ("MFU: unknown peak, give --peak-tflops (NVIDIA GeForce RTX 4090 has no bfloat16 figure in plait's table)"
            in capsys.readouterr().out.splitlines())
    assert main(["report", str(run_dir), "--peak-tflops", "0.05"]) == 0
    assert ("MFU                                 12.00%   (peak 100 GFLOP/s, --peak-tflops 0.05 x 2)"
            in capsys.readouterr().out.splitlines())
    for bad in ("0", "-1", "nan", "inf"):
        assert main(["report", str(run_dir), "--peak-tflops", bad]) == 2
        assert capsys.readouterr().err == f"plait: error: --peak-tflops must be a finite number > 0 (got {float(bad):g})\n"


def test_train_option_peak_tflops():
    assert load_config().output.peak_tflops is None
    assert load_config(None, {"output.peak_tflops": "312"}).output.peak_tflops == 312.0
    assert _config_from(build_parser().parse_args(["train", "--peak-tflops", "312"])).output.peak_tflops == 312.0
    for bad, allowed in (("0", "> 0.0"), ("-3", "> 0.0"), ("nan", "a finite number > 0.0")):
        with pytest.raises(ConfigError) as e:
            load_config(None, {"output.peak_tflops": bad})
        assert str(e.value) == f"invalid output.peak_tflops = {float(bad)!r}: must be {allowed} (--peak-tflops)"
