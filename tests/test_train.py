import json
import math
import re
import shutil
import statistics
from pathlib import Path
from unittest import mock

import pytest
import torch
from plait.checkpoint import load_checkpoint, trainer_state

from plait.cli import main
from plait.config_file import load_config, read_toml
from plait.engine import Engine
from plait.errors import ConfigError
from plait.model import GPTConfig, build_gpt, gpt_loss
from plait import train as train_module
from plait.lr import plan_of, replan
from plait.report import read_metrics, summary_table
from plait.rundir import with_out
from plait.train import build_optimizer, lr_at, to_device, train, use_tf32

# A model small enough that a step takes milliseconds.
SMALL = {"parallel.dp": 1, "parallel.pp": 1, "parallel.num_microbatches": 1, "model.n_layer": 2, "model.n_embd": 32, "model.n_head": 2, "train.seq_len": 32,
         "train.global_batch": 8, "train.eval_batches": 2, "train.sample_tokens": 8,
         "output.progress": False}


def quiet(*_args, **_kwargs):
    pass


def small_config(tmp_path, data_dir, **overrides):
    return load_config(None, {**SMALL, "data.data_dir": data_dir, "output.out": str(tmp_path / "run"),
                              **overrides})


def test_tiny_preset_validation_loss_falls(tmp_path, data_dir):
    cfg = load_config(None, {"parallel.dp": 1, "parallel.pp": 1, "parallel.num_microbatches": 1,
                             "train.steps": 40, "train.eval_every": 0, "train.seq_len": 64,
                             "train.sample_tokens": 0, "output.progress": False,
                             "data.data_dir": data_dir, "output.out": str(tmp_path / "run")})
    result = train(cfg, log=quiet)
    start, end = result.val_losses[0], result.val_losses[40]
    assert abs(start - torch.log(torch.tensor(2048.0)).item()) < 0.2  # about ln(vocab) at init
    assert end < start - 1.0, (start, end)


def test_run_directory_contents(tmp_path, data_dir):
    cfg = small_config(tmp_path, data_dir, **{"train.steps": 4, "train.eval_every": 2, "output.peak_tflops": 0.5})
    result = train(cfg, log=quiet)
    run = result.run_dir
    assert load_config(run / "config.toml") == with_out(cfg, None)  # the folder is not part of the config
    assert "out" not in read_toml(run / "config.toml")["output"]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1, 2, 3, 4]
    assert [r["step"] for r in records if "val_loss" in r] == [0, 2, 4]
    assert {"loss", "lr", "grad_norm", "step_time", "tokens_per_s", "tokens"} <= set(records[1])
    assert records[4]["tokens"] == 4 * 8 * 32
    assert (run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (run / "sample.txt").read_text() == result.sample and result.sample.startswith("The")
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["final_loss"] == records[4]["loss"]
    assert (summary["processes"], summary["peak_flops"], summary["peak_source"]) == (1, 0.5e12, "--peak-tflops 0.5 x 1")
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-000004"]


def test_resume_reproduces_the_uninterrupted_run_exactly(tmp_path, data_dir):
    cfg = small_config(tmp_path, data_dir, **{"train.steps": 6, "output.checkpoint_every": 3,
                                              "output.keep_checkpoints": 5, "train.warmup_steps": 2,
                                              "train.eval_every": 2})
    full = train(cfg, log=quiet).run_dir
    # A run that died after step 3: its later checkpoint and metrics never happened.
    cut = tmp_path / "cut"
    shutil.copytree(full, cut)
    shutil.rmtree(cut / "checkpoints" / "step-000006")
    lines = (cut / "metrics.jsonl").read_text().splitlines()
    (cut / "metrics.jsonl").write_text("\n".join(lines[:5]) + "\n")  # steps 0..4: step 4 half-done
    assert main(["train", "--resume", str(cut), "--no-progress"]) == 0  # the saved layout: one process
    a = load_checkpoint(full / "checkpoints" / "step-000006")
    b = load_checkpoint(cut / "checkpoints" / "step-000006")
    oa, ob = a["optimizer"]["state"], b["optimizer"]["state"]
    a, b = a["model"], b["model"]
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert oa.keys() == ob.keys() and len(oa) > 0
    for k, state in oa.items():
        assert torch.equal(state["exp_avg_sq"], ob[k]["exp_avg_sq"])
    strip = lambda r: {k: v for k, v in r.items() if k not in ("step_time", "tokens_per_s", "checkpoint_stall_s")}  # noqa: E731
    ra = [strip(json.loads(x)) for x in (full / "metrics.jsonl").read_text().splitlines()]
    rb = [strip(json.loads(x)) for x in (cut / "metrics.jsonl").read_text().splitlines()]
    assert ra == rb


def test_async_and_sync_checkpoints_are_the_same_and_each_records_its_stall(tmp_path, data_dir):
    runs = {}
    for background in (True, False):
        cfg = small_config(tmp_path / str(background), data_dir, **{
            "train.steps": 5, "output.checkpoint_every": 2, "output.keep_checkpoints": 5, "train.eval_every": 0,
            "train.sample_tokens": 0, "output.async_checkpoint": background})
        runs[background] = train(cfg, log=quiet).run_dir
    for step in (2, 4, 5):
        a, b = (run / "checkpoints" / f"step-{step:06d}" / "model-pp00.safetensors" for run in runs.values())
        assert a.read_bytes() == b.read_bytes(), step
    for run in runs.values():
        records = read_metrics(run / "metrics.jsonl")
        # The record of each step that checkpointed (every 2 steps, and the last) holds the seconds
        # the step loop spent in the checkpoint: the staging, when the write is in the background.
        assert [r["step"] for r in records if "checkpoint_stall_s" in r] == [2, 4, 5]
        assert all(0 < r["checkpoint_stall_s"] < 60 for r in records if "checkpoint_stall_s" in r)


def test_resume_with_more_steps_continues(tmp_path, data_dir):
    cfg = small_config(tmp_path, data_dir, **{"train.steps": 2, "train.sample_tokens": 0})
    run = train(cfg, log=quiet).run_dir
    assert main(["train", "--resume", str(run), "--steps", "3", "--no-progress"]) == 0
    assert load_config(run / "config.toml").train.steps == 3
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000002", "step-000003"]


@pytest.mark.parametrize("dtype", ["bfloat16", "float64"])
def test_other_dtypes_train(tmp_path, data_dir, dtype):
    cfg = small_config(tmp_path, data_dir, **{"train.steps": 3, "train.dtype": dtype})
    result = train(cfg, log=quiet)
    assert all(torch.isfinite(torch.tensor(result.losses)))
    weights = load_checkpoint(result.run_dir / "checkpoints" / "step-000003")["model"]
    expected = torch.float64 if dtype == "float64" else torch.float32  # autocast keeps float32 weights
    assert weights["0.wte.weight"].dtype == expected


def test_learning_rate_schedule():
    cfg = load_config(None, {"train.steps": 110, "train.warmup_steps": 10, "train.lr": 1.0,
                             "train.min_lr_ratio": 0.1})
    assert lr_at(0, cfg) == pytest.approx(0.1)
    assert lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(60, cfg) == pytest.approx(0.55)  # halfway down the cosine
    assert lr_at(110, cfg) == pytest.approx(0.1)


def test_another_steps_on_resume_replans_the_rest_of_the_cosine_without_a_jump():
    def cfg(steps):
        return load_config(None, {"train.steps": steps, "train.warmup_steps": 10, "train.lr": 1.0,
                                  "train.min_lr_ratio": 0.1})

    first = plan_of(cfg(110), None)
    assert first == {"steps": 110, "anchor_step": 10, "anchor_progress": 0.0}
    assert replan(first, 60, cfg(110)) is None  # the same --steps: the plan it had
    assert replan(None, 60, cfg(210)) is None  # a checkpoint from before plans were recorded
    # Stopped half-way down (0.55) and given 100 more steps: on from 0.55, the rest of the cosine over 150 steps.
    anchor = replan(first, 60, cfg(210))
    assert anchor == (60, 0.5)
    assert lr_at(60, cfg(210), anchor) == pytest.approx(lr_at(60, cfg(110))) == pytest.approx(0.55)
    assert lr_at(135, cfg(210), anchor) == pytest.approx(0.1 + 0.45 * (1 + math.cos(0.75 * math.pi)))
    assert lr_at(210, cfg(210), anchor) == pytest.approx(0.1)
    # Extended again at 135: it goes on from there, whatever the first plan was.
    again = replan(plan_of(cfg(210), anchor), 135, cfg(310))
    assert again == (135, 0.75) and lr_at(135, cfg(310), again) == pytest.approx(lr_at(135, cfg(210), anchor))
    # A finished run (at the floor) that is extended trains on at the floor.
    done = replan(first, 110, cfg(210))
    assert done == (110, 1.0) and [lr_at(s, cfg(210), done) for s in (110, 160, 209)] == [0.1, 0.1, 0.1]
    # Resumed inside the warm-up: the warm-up goes on, then the cosine over the new length.
    assert [lr_at(s, cfg(210), replan(first, 5, cfg(210))) for s in (5, 110)] == [0.6, lr_at(110, cfg(210))]


TINY_CLI = ["--dp", "1", "--pp", "1", "--microbatches", "1", "--no-progress", "--n-layer", "1", "--n-embd", "16",
            "--n-head", "2", "--seq-len", "16", "--global-batch", "2", "--eval-batches", "1", "--sample-tokens", "0"]


def test_zero_at_dp_1_runs_and_says_that_it_does_nothing(tmp_path, data_dir, capsys):
    assert main(["train", *TINY_CLI, "--data-dir", data_dir, "--steps", "1", "--zero", "2",
                 "--out", str(tmp_path / "r")]) == 0
    assert capsys.readouterr().err.splitlines()[0] == (
        "plait: note: --zero 2 does nothing at --dp 1: the one replica holds all the optimizer state; it shards "
        "it over --dp 2 or more")


def files_in(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` and its bytes: equal snapshots mean nothing was written."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_the_readme_round_trip_gives_the_second_run_a_folder_of_its_own(tmp_path, data_dir, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["train", *TINY_CLI, "--data-dir", data_dir, "--steps", "3", "--out", "runs/r"]) == 0
    first = files_in(tmp_path / "runs" / "r")
    # config.toml fed back is a new run: it gets runs/<date>-<time>, the first run's folder is untouched.
    assert main(["train", "--config", "runs/r/config.toml", "--steps", "2"]) == 0
    second = [p for p in (tmp_path / "runs").iterdir() if p.name != "r"]
    assert len(second) == 1 and re.fullmatch(r"\d{8}-\d{6}", second[0].name), second
    assert [r["step"] for r in read_metrics(second[0] / "metrics.jsonl")] == [0, 1, 2]
    assert files_in(tmp_path / "runs" / "r") == first
    capsys.readouterr()
    # Named as --out, a folder holding a run (or anything else) is refused, and nothing is written.
    assert main(["train", "--config", "runs/r/config.toml", "--steps", "2", "--out", "runs/r"]) == 2
    assert capsys.readouterr().err == ("plait: error: --out runs/r already holds a run; continue it with "
                                       "--resume runs/r, or give a new --out\n")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "mine.txt").write_text("mine")
    assert main(["train", "--config", "runs/r/config.toml", "--out", "notes"]) == 2
    assert capsys.readouterr().err == "plait: error: --out notes is not empty; give a new or empty folder as --out\n"
    assert files_in(tmp_path / "runs" / "r") == first and files_in(tmp_path / "notes") == {"mine.txt": b"mine"}
    assert len(list((tmp_path / "runs").iterdir())) == 2
    # The library refuses the same.
    with pytest.raises(ConfigError, match=re.escape("--out runs/r already holds a run")):
        train(load_config("runs/r/config.toml", {"output.out": "runs/r"}), log=quiet)


def test_a_resume_not_past_its_checkpoint_is_refused_and_records_nothing(tmp_path, data_dir, capsys):
    run = tmp_path / "run"
    assert main(["train", *TINY_CLI, "--data-dir", data_dir, "--steps", "4", "--out", str(run)]) == 0
    before = files_in(run)
    capsys.readouterr()
    for args, steps in ((["--steps", "3", "--lr", "0.5"], 3), ([], 4)):
        assert main(["train", "--resume", str(run), *args]) == 2
        assert capsys.readouterr().err == (f"plait: error: --steps {steps} is not past the checkpoint's step 4 in "
                                           f"{run}; give --steps 5 or more\n")
    # Refused later, by the checkpoint itself (another model's shape): nothing recorded either.
    assert main(["train", "--resume", str(run), "--steps", "6", "--n-embd", "32"]) == 2
    assert capsys.readouterr().err.startswith(f"plait: error: checkpoint {run}/checkpoints/step-000004 holds a "
                                              f"different model")
    assert files_in(run) == before  # config.toml too: neither --lr 0.5 nor --n-embd 32 was recorded


def test_resumed_runs_report_the_whole_run_and_keep_the_learning_rate_continuous(tmp_path, data_dir, capsys):
    run = tmp_path / "run"
    opts = [*TINY_CLI, "--data-dir", data_dir, "--out", str(run), "--warmup-steps", "1", "--eval-every", "3",
            "--checkpoint-every", "3", "--keep-checkpoints", "5"]
    assert main(["train", *opts, "--steps", "6"]) == 0
    straight = read_metrics(run / "metrics.jsonl")
    shutil.rmtree(run / "checkpoints" / "step-000006")  # the run stopped after step 3
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--steps", "12"]) == 0
    printed = capsys.readouterr().out
    records = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(13))
    lrs = [r["lr"] for r in records[1:]]
    # Steps 1-4 as the straight run had them (the old plan's rate at the resumed step 3, no jump); then
    # the rest of its cosine, from progress (3 - 1) / (6 - 1) = 0.4, stretched over the 9 steps left.
    assert lrs[:4] == [r["lr"] for r in straight[1:5]]
    expected = [1e-4 + 0.5 * (1 + math.cos(math.pi * (0.4 + 0.6 * (s - 3) / 9))) * 9e-4 for s in range(3, 12)]
    assert lrs[3:] == pytest.approx(expected, rel=1e-12)
    assert trainer_state(run / "checkpoints" / "step-000012")["lr_schedule"] == {
        "steps": 12, "anchor_step": 3, "anchor_progress": pytest.approx(0.4)}
    summary = json.loads((run / "summary.json").read_text())
    val = {str(r["step"]): r["val_loss"] for r in records if "val_loss" in r}
    assert list(summary["val_loss"]) == ["0", "3", "6", "9", "12"] and summary["val_loss"] == val
    times = [r["step_time"] for r in records if "step_time" in r]
    assert summary["median_step_time_s"] == statistics.median(times) and len(times) == 12
    assert summary["tokens_per_s"] == 2 * 16 / statistics.median(times)
    assert summary["final_loss"] == records[-1]["loss"]
    table = summary_table(summary, records)
    assert f"validation loss {val['0']:.4f} -> {val['12']:.4f} (step 0 -> 12)" in " ".join(table.split())
    assert table in printed
    assert main(["report", str(run)]) == 0
    assert table in capsys.readouterr().out  # plait report reads the same figures
    # A finished run given more steps trains on at the floor (0.1 x lr), not back up the cosine.
    assert main(["train", "--resume", str(run), "--steps", "14"]) == 0
    assert [r["lr"] for r in read_metrics(run / "metrics.jsonl")[13:]] == [1e-3 * 0.1] * 2


def _run(args, capsys):
    code = main(["train", "--no-progress", "--dp", "1", "--pp", "1", "--microbatches", "1", *args])
    return code, capsys.readouterr().err


def test_missing_data_path(tmp_path, capsys):
    code, err = _run(["--data", str(tmp_path / "nope.txt"), "--out", str(tmp_path / "run")], capsys)
    assert (code, err) == (2, f"plait: error: --data {tmp_path / 'nope.txt'}: no such file or folder\n")
    assert not (tmp_path / "run").exists()


def test_corpus_shorter_than_one_sequence(tmp_path, capsys):
    text = tmp_path / "short.txt"
    text.write_text("a few words only")
    code, err = _run(["--data", str(text), "--tokenizer", "byte", "--seq-len", "64",
                      "--data-dir", str(tmp_path / "d"), "--out", str(tmp_path / "run")], capsys)
    assert code == 2
    assert err == ("plait: error: the train split has 16 tokens, fewer than one sequence of --seq-len 64 + 1; "
                   "give more text with --data or lower --seq-len\n")
    assert not (tmp_path / "run").exists()


def test_unwritable_output_directory(tmp_path, data_dir, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    code, err = _run(["--out", str(blocker / "run"), "--data-dir", data_dir], capsys)
    assert (code, err) == (2, f"plait: error: --out {blocker / 'run'}: cannot write there (Not a directory); "
                              f"choose another --out\n")


def test_nan_loss_stops_with_one_line_and_no_checkpoint(tmp_path, data_dir, capsys):
    args = ["--n-layer", "1", "--n-embd", "32", "--seq-len", "32", "--lr", "1e6", "--warmup-steps", "0",
            "--steps", "10", "--data-dir", data_dir, "--out", str(tmp_path / "run")]
    code, err = _run(args, capsys)
    assert code == 1
    assert err.startswith("plait: error: step ") and err.count("\n") == 1
    assert "the loss is nan" in err and "lower --lr (now 1e+06)" in err
    assert not (tmp_path / "run" / "checkpoints").exists()
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["config.toml", "metrics.jsonl"]


def test_tensorboard_events_hold_the_metrics(tmp_path, data_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = small_config(tmp_path, data_dir, **{"train.steps": 3, "output.tensorboard": True})
    run = train(cfg, log=quiet).run_dir
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    losses = [(e.step, e.value) for e in events.Scalars("loss")]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert losses == [(r["step"], pytest.approx(r["loss"])) for r in records if "loss" in r]


def test_optimizer_is_fused_adamw_with_decay_on_matrices_only():
    cfg = load_config(None, {"train.weight_decay": 0.25, "train.lr": 1e-3})
    engine = Engine(build_gpt(GPTConfig(vocab_size=64, block_size=8, n_layer=1, n_head=2, n_embd=16), seed=0), gpt_loss)
    opt = build_optimizer(engine, cfg)
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["fused"] is True
    decayed, plain = opt.param_groups
    assert decayed["weight_decay"] == 0.25 and plain["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decayed["params"]) and all(p.dim() < 2 for p in plain["params"])
    assert len(decayed["params"]) + len(plain["params"]) == len(list(engine.parameters()))


def test_tf32_is_on_for_float32_matmuls_on_cuda_only(monkeypatch):
    asked = []
    monkeypatch.setattr(torch, "set_float32_matmul_precision", asked.append)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    use_tf32(torch.device("cpu"))
    assert (asked, torch.backends.cudnn.allow_tf32) == ([], False)
    use_tf32(torch.device("cuda", 1))
    assert (asked, torch.backends.cudnn.allow_tf32) == (["high"], True)


def test_batches_go_to_the_gpu_pinned_and_non_blocking():
    batch = mock.Mock()  # a CUDA copy cannot run here; the calls made on the batch are the point
    gpu = torch.device("cuda", 1)
    assert to_device(batch, gpu) is batch.pin_memory.return_value.to.return_value
    batch.pin_memory.assert_called_once_with()
    batch.pin_memory.return_value.to.assert_called_once_with(gpu, non_blocking=True)
    cpu_batch = torch.zeros(2, 3, dtype=torch.long)
    assert to_device(cpu_batch, torch.device("cpu")) is cpu_batch  # unchanged on the CPU: no copy, no pinning


def test_every_batch_of_training_and_evaluation_goes_through_to_device(tmp_path, data_dir, monkeypatch):
    moved = []
    monkeypatch.setattr(train_module, "to_device", lambda x, device: moved.append(device) or x)
    train(small_config(tmp_path, data_dir, **{"train.steps": 1, "train.eval_batches": 1,
                                              "train.sample_tokens": 0}), log=quiet)
    assert moved == [torch.device("cpu")] * 6  # evaluation at step 0, the step, evaluation at the end: x and y each


def test_byte_run_records_the_vocabulary_it_used(tmp_path):
    """Issue 15 item 11: a byte run's config.toml says 257, the tokenizer's size; the model it
    trained pads that to 320 rows ([Note: padded vocabulary]), which the config also gives back."""
    text = tmp_path / "text.txt"
    text.write_text("plait cuts a model into stages. " * 200)
    cfg = small_config(tmp_path, str(tmp_path / "d"), **{"data.data": str(text), "data.tokenizer": "byte",
                                                         "train.steps": 1, "train.eval_batches": 1,
                                                         "train.sample_tokens": 0})
    run = train(cfg, log=quiet).run_dir
    assert "vocab_size = 257" in (run / "config.toml").read_text()
    assert load_config(run / "config.toml").data.vocab_size == 257
    saved = load_config(run / "config.toml")
    rows = load_checkpoint(run / "checkpoints" / "step-000001")["model"]["0.wte.weight"].shape[0]
    assert rows == saved.model.gpt(saved.data.vocab_size).vocab_size == 320


def test_the_meta_build_trains_as_the_real_build(tmp_path, data_dir):
    """--partition profile builds every layer for real; any other partition builds on the meta
    device and lets the Engine initialise: the same run, loss for loss and the same sample."""
    runs = {}
    for method in ("profile", "uniform"):
        cfg = small_config(tmp_path / method, data_dir, **{"train.steps": 3, "parallel.partition": method})
        runs[method] = train(cfg, log=quiet)
    assert runs["profile"].losses == runs["uniform"].losses
    assert runs["profile"].sample == runs["uniform"].sample


def test_a_restarted_round_that_finds_the_last_checkpoint_only_finishes_the_run(tmp_path, monkeypatch, capsys):
    """No step left to train: the round still measures memory and writes the summary (it reads
    the measured peak that the last step would have gathered)."""
    out = tmp_path / "run"
    args = ["train", "--n-layer", "2", "--n-embd", "32", "--n-head", "2", "--seq-len", "32", "--global-batch", "8",
            "--steps", "3", "--eval-batches", "1", "--sample-tokens", "0", "--no-progress", "--dp", "1", "--pp", "1",
            "--microbatches", "1", "--data-dir", str(tmp_path / "data"), "--out", str(out)]
    assert main(args) == 0
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    assert main(args) == 0
    assert "resumed from " + str(out / "checkpoints" / "step-000003") + " at step 3" in capsys.readouterr().out
    assert set(json.loads((out / "summary.json").read_text())["measured_memory_mib"]) == {"0"}


def test_a_byte_run_pads_its_vocabulary_and_samples_only_real_tokens(tmp_path, data_dir):
    # [Note: padded vocabulary] 257 byte ids -> 320 rows; the sample decodes (no id past 256).
    cfg = small_config(tmp_path, data_dir, **{"train.steps": 2, "data.tokenizer": "byte", "train.sample_tokens": 64})
    lines = []
    result = train(cfg, log=lines.append)
    state = load_checkpoint(result.run_dir / "checkpoints" / "step-000002")["model"]
    assert state["0.wte.weight"].shape[0] == 320
    assert any(", vocab 257 (padded to 320)," in line for line in lines), lines[:3]
    assert len(result.sample.encode()) >= 64  # every sampled id decoded to a byte (or EOT)


def test_a_run_saved_before_vocabulary_padding_resumes_unpadded(tmp_path, data_dir):
    cfg = small_config(tmp_path, data_dir, **{"train.steps": 2, "train.sample_tokens": 0, "data.tokenizer": "byte",
                                              "model.vocab_multiple": 1})
    run = train(cfg, log=quiet).run_dir
    saved = (run / "config.toml").read_text()
    assert "vocab_multiple = 1\n" in saved
    (run / "config.toml").write_text(saved.replace("vocab_multiple = 1\n", ""))  # as runs wrote it before
    assert main(["train", "--resume", str(run), "--steps", "3", "--no-progress"]) == 0
    state = load_checkpoint(run / "checkpoints" / "step-000003")["model"]
    assert state["0.wte.weight"].shape[0] == 257
