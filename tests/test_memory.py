"""The memory plan (plait/memory.py): exact parts, scaling, the --max-memory-gb refusal, summary.json."""

import dataclasses
import json

import pytest
import torch

from plait import memory
from plait.parallel.buckets import STAGING_BUFFERS
from plait.cli import main
from plait.config_file import load_config
from plait.model import GPTConfig, build_gpt, count_params, gpt_loss
from plait.parallel.partition import partition
from plait.parallel.schedule import make_schedule, simulate
from plait.train import train

GPT = GPTConfig(vocab_size=300, block_size=32, n_layer=4, n_head=2, n_embd=32)
BASE = memory.Layout(dp=1, pp=1, schedule="1f1b", num_microbatches=4, virtual_stages=1, partition="uniform",
                     cuts=None, bucket_mb=25.0, zero=0, checkpointing="none", micro_rows=2, seq_len=32,
                     dtype="float32", device="cpu")


def layout(**changes):
    return dataclasses.replace(BASE, **changes)


def stage_params(pp):
    """Elements held by each pipeline rank, counted on real layers, a tied weight once per rank."""
    layers = build_gpt(GPT)
    cut = partition(layers, pp, "uniform")
    return [len({id(p): p for j in cut.stage_layers(s) for p in layers[j].parameters()}) and
            sum({id(p): p.numel() for j in cut.stage_layers(s) for p in layers[j].parameters()}.values())
            for s in range(pp)]


def test_one_process_counts_every_parameter_once():
    (plan,) = memory.plan_layout(GPT, BASE)
    n = count_params(build_gpt(GPT))
    assert (plan.weights, plan.gradients, plan.optimizer) == (4 * n, 4 * n, 8 * n)
    (wide,) = memory.plan_layout(GPT, layout(dtype="float64"))
    assert (wide.weights, wide.optimizer) == (8 * n, 16 * n)


def test_a_pipeline_keeps_a_second_copy_of_the_tied_head():
    plans = memory.plan_layout(GPT, layout(pp=2))
    assert [p.weights for p in plans] == [4 * n for n in stage_params(2)]
    assert sum(p.weights for p in plans) == 4 * (count_params(build_gpt(GPT)) + GPT.vocab_size * GPT.n_embd)
    assert [(p.rank, p.dp_rank, p.pp_rank) for p in plans] == [(0, 0, 0), (1, 0, 1)]


def test_zero_shards_the_optimizer_state_then_the_gradients():
    n = count_params(build_gpt(GPT))
    plain, zero1, zero2 = (memory.plan_layout(GPT, layout(dp=2, zero=z)) for z in (0, 1, 2))
    assert [(p.weights, p.gradients, p.optimizer) for p in plain] == [(4 * n, 4 * n, 8 * n)] * 2
    assert [(p.weights, p.gradients, p.optimizer) for p in zero1] == [(4 * n, 4 * n, 4 * n)] * 2
    # ZeRO-2: the reduced half of the buckets, and one bucket in flight (here the whole model fits one).
    assert [(p.gradients, p.optimizer) for p in zero2] == [(2 * n + 4 * n, 4 * n)] * 2
    small_bucket = memory.plan_layout(GPT, layout(dp=2, zero=2, bucket_mb=0.0625))
    assert small_bucket[0].gradients == 2 * n + STAGING_BUFFERS * 2**16
    (alone,) = memory.plan_layout(GPT, layout(zero=2))  # at dp=1 there is nothing to shard
    assert (alone.gradients, alone.optimizer) == (4 * n, 8 * n)


def test_data_parallel_adds_a_quarter_of_the_weights_to_the_cpu_overhead():
    # [Note: overhead]: the gradients autograd makes outside the buckets pass through the CPU heap.
    (alone,) = memory.plan_layout(GPT, layout())
    for zero in (0, 1, 2):
        plans = memory.plan_layout(GPT, layout(dp=2, zero=zero))
        assert [p.overhead - alone.overhead for p in plans] == [int(0.25 * alone.weights)] * 2
    (cuda,) = memory.plan_layout(GPT, layout(device="cuda"))
    assert [p.overhead for p in memory.plan_layout(GPT, layout(dp=2, device="cuda"))] == [cuda.overhead] * 2


@pytest.mark.parametrize("config, lt, capability, expected_kib", [
    (None, None, (9, 0), 4096 * 8 + 1024),  # Hopper: 32 MiB, and cuBLASLt's 1 MiB (measured on an H200)
    (None, None, (8, 0), 4096 * 2 + 16 * 8 + 1024),  # before Hopper: PyTorch's ":4096:2:16:8"
    (":4096:8", "2048", (8, 0), 4096 * 8 + 2048),
    (":16:8", None, (9, 0), 16 * 8 + 1024),  # the setting deterministic cuBLAS asks for
])
def test_the_cuda_plan_holds_cublas_workspaces(monkeypatch, config, lt, capability, expected_kib):
    # [Note: cuBLAS workspace]
    for name, value in (("CUBLAS_WORKSPACE_CONFIG", config), ("CUBLASLT_WORKSPACE_SIZE", lt)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert memory.cublas_workspace_bytes() == expected_kib * 1024
    cfg = load_config(None, {"train.dtype": "float32"})
    assert memory.Layout.of(cfg, "cuda").workspace == expected_kib * 1024
    assert memory.Layout.of(cfg, "cpu").workspace == 0
    (cpu,) = memory.plan_layout(GPT, layout())
    (cuda,) = memory.plan_layout(GPT, layout(device="cuda", workspace=expected_kib * 1024))
    assert cuda.overhead == 8 * 2**20 + expected_kib * 1024 and cpu.overhead != cuda.overhead


def test_peak_in_flight_follows_the_schedule():
    assert [memory.peak_in_flight(a) for a in make_schedule("1f1b", 4, 8).values()] == [4, 3, 2, 1]
    assert [memory.peak_in_flight(a) for a in make_schedule("gpipe", 4, 8).values()] == [8] * 4
    interleaved = make_schedule("interleaved-1f1b", 2, 4, 2)
    assert [memory.peak_in_flight(a, 2) for a in interleaved.values()] == [2.5, 1.5]  # 5 and 3 halves
    for name, pp, m, v in [("1f1b", 4, 8, 1), ("gpipe", 3, 5, 1), ("interleaved-1f1b", 4, 8, 2)]:
        actions = make_schedule(name, pp, m, v)
        simulated = simulate(actions, pp, m, v).peak_in_flight
        assert {r: memory.peak_in_flight(a, v) * v for r, a in actions.items()} == simulated


def test_activations_scale_with_the_micro_batch_and_the_micro_batches_in_flight():
    rows = [memory.plan_layout(GPT, layout(micro_rows=b))[0].activations for b in (1, 2, 3)]
    assert rows[2] - rows[1] == rows[1] - rows[0] > 0  # linear (the position ids are the constant)
    first_stage = {(s, m): memory.plan_layout(GPT, layout(pp=4, schedule=s, num_microbatches=m))[0].activations
                   for s in ("1f1b", "gpipe") for m in (4, 8)}
    assert first_stage["1f1b", 8] == first_stage["1f1b", 4] == first_stage["gpipe", 4]  # pp = 4 in flight
    # GPipe holds all m: four more micro-batches of rank 0's layers.
    kinds = ["embedding", *["block"] * GPT.n_layer, "head"]
    first = partition(build_gpt(GPT, device="meta"), 4, "uniform").stage_layers(0)
    per_microbatch = sum(memory._layer_activations(GPT, layout(pp=4), kinds[j]) for j in first)
    assert first_stage["gpipe", 8] - first_stage["gpipe", 4] == 4 * per_microbatch


def test_checkpointing_lowers_activations():
    none, selective, full = (memory.plan_layout(GPT, layout(checkpointing=m))[0].activations
                             for m in ("none", "selective", "full"))
    assert full < selective < none


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_the_formula_is_what_autograd_keeps(dtype, dropout):
    """Each layer's planned bytes per micro-batch are the bytes of the tensors autograd saves
    (parameters aside), counted by a saved-tensors hook."""
    gpt = dataclasses.replace(GPT, dropout=dropout)
    lay = layout(dtype=dtype)
    layers = build_gpt(gpt)
    params = {p.untyped_storage().data_ptr() for layer in layers for p in layer.parameters()}
    x = torch.randint(0, gpt.vocab_size, (lay.micro_rows, lay.seq_len))
    seen = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in params and t.dim() > 0:  # not the loss's 0-d scalars
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16")
    h = x
    for j, kind in enumerate(["embedding", *["block"] * gpt.n_layer, "head"]):
        seen.clear()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast:
            h = layers[j](h) if kind != "head" else gpt_loss(layers[j](h), x)
        planned = memory._layer_activations(gpt, lay, kind)
        assert sum(seen.values()) == planned, (kind, sum(seen.values()), planned)


def cfg_with(tmp_path, data_dir, **overrides):
    return load_config(None, {"parallel.dp": 1, "parallel.pp": 1, "parallel.num_microbatches": 1,
                              "model.n_layer": 2, "model.n_embd": 32, "model.n_head": 2, "train.seq_len": 32,
                              "train.global_batch": 4, "train.steps": 2, "train.eval_batches": 1,
                              "train.sample_tokens": 0, "output.progress": False, "data.data_dir": data_dir,
                              "output.out": str(tmp_path / "run"), **overrides})


def test_a_run_records_its_plan_and_its_measured_peak(tmp_path, data_dir):
    lines = []
    cfg = cfg_with(tmp_path, data_dir)
    run = train(cfg, log=lambda *a, **_k: lines.append(" ".join(map(str, a)))).run_dir
    summary = json.loads((run / "summary.json").read_text())
    assert set(summary["memory_plan_mib"]) == set(summary["measured_memory_mib"]) == set(summary["peak_memory_mib"]) == {"0"}
    plan = summary["memory_plan_mib"]["0"]
    assert set(plan) >= {"weights", "gradients", "optimizer", "activations", "total"}
    assert plan["total"] == pytest.approx(sum(v for k, v in plan.items() if k not in ("total", "overlap"))
                                          - plan["overlap"])
    assert 0 < summary["measured_memory_mib"]["0"] < summary["peak_memory_mib"]["0"]
    assert any(line.startswith("memory plan (MiB): rank 0 (dp=0, pp=0) ") for line in lines)
    assert any(line.startswith("memory: rank 0 (dp=0, pp=0) measured ") for line in lines)


REFUSALS = [
    # (options, the one line on stderr)
    (["--model", "small", "--global-batch", "8", "--microbatches", "1", "--max-memory-gb", "0.3"],
     "plait: error: parallel.max_memory_gb = 0.3: rank 0 (dp=0, pp=0) is predicted to peak at 0.71 GB "
     "(weights 0.04, gradients 0.04, optimizer 0.09, activations 0.36, overhead 0.21, less 0.04 of gradients made "
     "as activations are freed); try --pp 4 or --microbatches 4 (2 sequences per micro-batch)\n"),
    (["--max-memory-gb", "0.001"],
     "plait: error: parallel.max_memory_gb = 0.001: rank 0 (dp=0, pp=0) is predicted to peak at 0.07 GB "
     "(weights 0.00, gradients 0.00, optimizer 0.01, activations 0.03, overhead 0.03, less 0.00 of gradients made "
     "as activations are freed); it cannot fit in 0.001 GB "
     "even with --pp 6, --activation-checkpointing full and --microbatches 16 (1 sequence per micro-batch); "
     "it needs at least 0.02 GB\n"),
]


def test_max_memory_is_an_option_of_the_parallel_section(tmp_path, capsys):
    path = tmp_path / "run.toml"
    path.write_text("[parallel]\nmax_memory_gb = 0.5\n")
    assert load_config(path).parallel.max_memory_gb == 0.5
    assert load_config(None).parallel.max_memory_gb is None  # no limit unless asked
    assert main(["train", "--max-memory-gb", "0"]) == 2
    assert capsys.readouterr().err == "plait: error: invalid parallel.max_memory_gb = 0.0: must be > 0.0 (--max-memory-gb)\n"


@pytest.mark.parametrize("args,message", REFUSALS)
def test_a_layout_over_max_memory_is_refused_in_one_line(tmp_path, args, message, capsys):
    out = tmp_path / "run"
    code = main(["train", "--dp", "1", "--pp", "1", "--no-progress", "--out", str(out), *args])
    assert (code, capsys.readouterr().err) == (2, message)
    assert not out.exists()


def test_a_launched_layout_is_refused_before_any_worker(tmp_path, monkeypatch, capsys):
    import torch.distributed.launcher.api as launcher_api

    started = []
    monkeypatch.setattr(launcher_api, "elastic_launch", lambda config, entry: lambda *a: started.append(a))
    code = main(["train", "--dp", "2", "--pp", "2", "--max-memory-gb", "0.001", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and started == [] and err.count("\n") == 1
    # The last stage, with the LM head and the loss, is the fullest.
    assert err == ("plait: error: parallel.max_memory_gb = 0.001: rank 2 (dp=0, pp=1) is predicted to peak at 0.04 GB "
                   "(weights 0.00, gradients 0.00, optimizer 0.00, activations 0.01, overhead 0.02); it cannot fit in "
                   "0.001 GB even with --pp 6, --zero 2, --activation-checkpointing full and --microbatches 8 "
                   "(1 sequence per micro-batch); it needs at least 0.02 GB\n")
