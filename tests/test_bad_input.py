"""Bad input found at run time: refused before any work, one line, exit code 2."""

import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed.launcher.api as launcher_api

from plait.cli import main
from tests.distributed.harness import free_port

ONE = ["--dp", "1", "--pp", "1", "--microbatches", "1", "--no-progress"]
SMALL = [*ONE, "--n-layer", "1", "--n-embd", "16", "--n-head", "2", "--seq-len", "16", "--global-batch", "2",
         "--steps", "1", "--eval-batches", "1", "--sample-tokens", "0"]


def busy_port():
    s = socket.create_server(("127.0.0.1", 0))
    return s, s.getsockname()[1]


def run(args, capsys):
    code = main(["train", *args])
    return code, capsys.readouterr().err


def test_rendezvous_port_already_in_use(capsys):
    holder, port = busy_port()
    with holder:
        code, err = run(["--nnodes", "2", "--node-rank", "0", "--rdzv", f"127.0.0.1:{port}"], capsys)
    assert (code, err) == (2, f"plait: error: --rdzv 127.0.0.1:{port}: cannot listen there (Address already in "
                              f"use); choose a free port, or an address of this machine\n")


def test_rendezvous_port_already_in_use_on_one_node(launches, capsys):
    holder, port = busy_port()
    with holder:
        code, err = run(["--dp", "2", "--pp", "1", "--device", "cpu", "--rdzv", f"127.0.0.1:{port}", *WORKERS],
                        capsys)
    assert (code, err) == (2, f"plait: error: --rdzv 127.0.0.1:{port}: cannot listen there (Address already in "
                              f"use); choose a free port, or an address of this machine\n")
    assert launches == []


def launch_configs(monkeypatch):
    """The LaunchConfigs torch's launcher would be given; no worker started."""
    for var in ("OMP_NUM_THREADS", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE"):  # the launcher sets them for its workers
        monkeypatch.setenv(var, os.environ.get(var, "1"))
    configs = []
    monkeypatch.setattr(launcher_api, "elastic_launch", lambda config, entry: lambda *args: configs.append(config))
    return configs


def mine(rdzv_configs):
    """The rendezvous settings plait gives (torch's LaunchConfig adds its own join "timeout")."""
    return {k: v for k, v in rdzv_configs.items() if k != "timeout"}


def test_rdzv_is_used_on_one_node(monkeypatch, capsys):
    configs = launch_configs(monkeypatch)
    port = free_port()
    assert run(["--dp", "2", "--pp", "1", "--device", "cpu", "--rdzv", f"127.0.0.1:{port}", *WORKERS],
               capsys) == (0, "")
    [config] = configs
    assert (config.rdzv_endpoint, config.local_addr, mine(config.rdzv_configs)) == (
        f"127.0.0.1:{port}", "127.0.0.1", {"is_host": True, "read_timeout": 120})


def test_a_second_node_joins_once_node_0_answers(monkeypatch, capsys):
    configs = launch_configs(monkeypatch)
    node_0, port = busy_port()  # something listening at the address, as node 0's store would be
    with node_0:
        assert run(["--nnodes", "2", "--node-rank", "1", "--rdzv", f"127.0.0.1:{port}", "--dp", "2", "--pp", "1",
                    "--device", "cpu", "--timeout", "6.5", *WORKERS], capsys) == (0, "")
    [config] = configs
    assert (config.rdzv_endpoint, config.local_addr, mine(config.rdzv_configs)) == (
        f"127.0.0.1:{port}", None, {"is_host": False, "read_timeout": 7})  # torch's store takes whole seconds


def test_a_second_node_whose_node_0_is_unreachable_says_so_in_one_line_after_the_timeout():
    """The issue's case, as typed: not torch's 41 lines of C++ frames after 76 s and exit 1."""
    port = free_port()  # nothing listens there
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, "-m", "plait", "train", "--nnodes", "2", "--node-rank", "1",
                           "--rdzv", f"127.0.0.1:{port}", "--dp", "2", "--pp", "1", "--timeout", "1", *WORKERS],
                          capture_output=True, text=True, timeout=120, env=env)
    assert (proc.returncode, proc.stderr, proc.stdout) == (
        2, f"plait: error: --rdzv 127.0.0.1:{port}: node 0's rendezvous did not answer within --timeout 1 s "
           f"(Connection refused); start node 0 (--node-rank 0) with the same --rdzv, or give its address\n", "")


@pytest.mark.parametrize("files", [{}, {"a.txt": "", "b.md": ""}], ids=["no text files", "empty files"])
def test_empty_corpus(tmp_path, files, capsys):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for name, text in files.items():
        (corpus / name).write_text(text)
    code, err = run([*SMALL, "--data", str(corpus), "--data-dir", str(tmp_path / "d"), "--out", str(tmp_path / "r")],
                    capsys)
    assert code == 2
    expected = (f"--data {corpus}: the folder has no .txt, .md, .rst, .jsonl or .jsonl.gz files; put text files in it"
                if not files
                else f"--data {corpus}: all 2 text files in the folder are empty; give some text")
    assert err == f"plait: error: {expected}\n"
    assert not (tmp_path / "r").exists()


def test_resume_with_another_model_shape(tmp_path, data_dir, capsys):
    run_dir = tmp_path / "run"
    assert main(["train", *SMALL, "--data-dir", data_dir, "--out", str(run_dir)]) == 0
    capsys.readouterr()
    code, err = run(["--resume", str(run_dir), "--n-embd", "32", "--steps", "2"], capsys)
    assert code == 2
    assert err == (f"plait: error: checkpoint {run_dir}/checkpoints/step-000001 holds a different model: "
                   f"0.wte.weight is [2048, 16] there, [2048, 32] here; resume with the run's own model options\n")


# Devices and backends ([Note: one device choice] in plait/distributed.py). This machine may have no GPU:
# "CUDA present" is torch.cuda monkeypatched, and "absent" too, so the tests mean the same on a GPU node.

NO_GPU = "no CUDA device is visible"
DEVICE_CUDA = f"train.device = 'cuda' but {NO_GPU}; use --device cpu (gloo)"
NCCL_NO_CUDA = f"launch.backend = 'nccl' needs CUDA, but {NO_GPU}; use --backend gloo (or auto) to run on the CPU"
NCCL_ON_CPU = ("launch.backend = 'nccl' needs CUDA tensors, but train.device = 'cpu'; use --backend gloo (or auto), "
               "or --device cuda")
GLOO_AUTO = ("launch.backend = 'gloo' does not take CUDA tensors, but train.device = 'auto' picks cuda on this "
             "machine; use --device cpu to run on gloo, or --backend auto (nccl)")
GLOO_CUDA = ("launch.backend = 'gloo' does not take CUDA tensors, but train.device = 'cuda'; use --backend nccl "
             "(or auto), or --device cpu")
TOO_MANY = ("dp(2) x pp(2) = 4 processes on this node but 2 GPUs visible; lower --dp or --pp, spread the workers "
            "over more machines (--nnodes), or use --device cpu")
TOO_MANY_PER_NODE = ("dp(4) x pp(2) / nnodes(2) = 4 processes on this node but 2 GPUs visible; lower --dp or --pp, "
                     "spread the workers over more machines (--nnodes), or use --device cpu")
WORKERS = ["--out", "unused-run-dir"]  # refused before anything is written; given so no default is made


@pytest.fixture
def gpus(monkeypatch):
    """`gpus(n)`: torch sees n CUDA devices (0: none); nothing of the parent's torchrun environment."""
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)

    def visible(n: int) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)

    return visible


@pytest.fixture
def launches(monkeypatch):
    """The workers the launcher would start: a list of their command lines, none actually started."""
    for var in ("OMP_NUM_THREADS", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE"):  # the launcher sets them for its workers
        monkeypatch.setenv(var, os.environ.get(var, "1"))
    started = []
    monkeypatch.setattr(launcher_api, "elastic_launch",
                        lambda config, entry: lambda *args: started.append((config.nproc_per_node, args)))
    return started


@pytest.mark.parametrize("n_gpus,args,message", [
    (0, ["--backend", "nccl", "--dp", "2"], NCCL_NO_CUDA),
    (0, ["--device", "cuda", "--dp", "2"], DEVICE_CUDA),
    (0, ["--device", "cpu", "--backend", "nccl", "--dp", "2"], NCCL_ON_CPU),
    (2, ["--device", "cpu", "--backend", "nccl", "--dp", "2"], NCCL_ON_CPU),
    (2, ["--backend", "gloo", "--dp", "2"], GLOO_AUTO),
    (2, ["--device", "cuda", "--backend", "gloo", "--dp", "2"], GLOO_CUDA),
    (2, ["--dp", "2", "--pp", "2"], TOO_MANY),
    (2, ["--device", "cuda", "--dp", "2", "--pp", "2"], TOO_MANY),
    (2, ["--dp", "4", "--pp", "2", "--nnodes", "2", "--node-rank", "1", "--rdzv", "127.0.0.1:29400"],
     TOO_MANY_PER_NODE),
], ids=lambda v: " ".join(v) if isinstance(v, list) else str(v))
def test_device_and_backend_refused_before_any_worker_starts(gpus, launches, n_gpus, args, message, capsys):
    gpus(n_gpus)
    code, err = run([*args, *WORKERS], capsys)
    assert (code, err) == (2, f"plait: error: {message}\n")
    assert launches == []


@pytest.mark.parametrize("args,n_gpus", [(["--dp", "2", "--pp", "1"], 2), (["--dp", "2", "--pp", "2"], 4),
                                         (["--dp", "2", "--pp", "2", "--device", "cpu"], 1),
                                         (["--dp", "2", "--pp", "2", "--backend", "gloo"], 0)],
                         ids=["2 on 2 GPUs", "4 on 4 GPUs", "cpu on a GPU node", "gloo without CUDA"])
def test_layouts_that_fit_the_node_are_launched(gpus, launches, args, n_gpus, capsys):
    gpus(n_gpus)
    assert run([*args, *WORKERS], capsys) == (0, "")
    assert [nproc for nproc, _ in launches] == [int(args[1]) * int(args[3])]


def test_device_cuda_without_cuda_in_one_process(gpus, capsys):
    gpus(0)
    assert run([*ONE, "--device", "cuda", *WORKERS], capsys) == (2, f"plait: error: {DEVICE_CUDA}\n")


def test_nccl_on_a_cpu_machine_is_one_line_and_exit_2_from_the_command():
    """The issue's case, as a new user types it: no traceback, no worker started."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # the same answer on a GPU node
    proc = subprocess.run([sys.executable, "-m", "plait", "train", "--backend", "nccl", "--dp", "2"],
                          capture_output=True, text=True, timeout=120, env=env)
    assert (proc.returncode, proc.stderr, proc.stdout) == (2, f"plait: error: {NCCL_NO_CUDA}\n", "")


def torchrun_env(monkeypatch, local_rank: int, local_world: int | None, world: int = 4) -> None:
    """The environment torchrun gives a worker: here no launcher checked anything before it."""
    monkeypatch.setenv("RANK", str(local_rank))
    monkeypatch.setenv("WORLD_SIZE", str(world))
    monkeypatch.setenv("LOCAL_RANK", str(local_rank))
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "1")  # never reached: the worker refuses before the process group
    if local_world is not None:
        monkeypatch.setenv("LOCAL_WORLD_SIZE", str(local_world))


@pytest.mark.parametrize("n_gpus,local_rank,local_world,args,message", [
    (2, 0, 4, [], "LOCAL_WORLD_SIZE = 4 processes on this node but 2 GPUs visible; start at most 2 per node "
                  "(torchrun --nproc-per-node 2), or use --device cpu"),
    (2, 1, 4, [], None),  # the same refusal: local rank 0 says it for the node
    (2, 2, None, [], "LOCAL_RANK = 2 but 2 GPUs visible on this node; start at most 2 processes per node, "
                     "or use --device cpu"),
    (0, 0, 4, ["--backend", "nccl"], NCCL_NO_CUDA),
    (0, 0, 4, ["--device", "cuda"], DEVICE_CUDA),
    (4, 0, 4, ["--backend", "gloo"], GLOO_AUTO),
    (4, 0, 4, ["--device", "cpu", "--backend", "nccl"], NCCL_ON_CPU),
], ids=["more workers than GPUs", "the same on local rank 1", "a local rank past the last GPU",
        "nccl without CUDA", "cuda without CUDA", "gloo with CUDA", "nccl with --device cpu"])
def test_a_torchrun_worker_checks_its_device_itself(gpus, monkeypatch, n_gpus, local_rank, local_world, args,
                                                    message, capsys):
    gpus(n_gpus)
    torchrun_env(monkeypatch, local_rank, local_world)
    code, err = run(["--dp", "2", "--pp", "2", *args, *WORKERS], capsys)
    assert (code, err) == (2, "" if message is None else f"plait: error: {message}\n")


VERIFY_CUDA = "train.device = 'cuda': plait verify runs on the CPU with gloo, in float64; drop --device cuda"
VERIFY_NCCL = "launch.backend = 'nccl': plait verify runs on the CPU with gloo, in float64; drop --backend nccl"


@pytest.mark.parametrize("args,message", [
    (["--device", "cuda"], VERIFY_CUDA),
    (["--backend", "nccl", "--dp", "2"], VERIFY_NCCL),
    (["--device", "cuda", "--backend", "nccl"],
     "train.device = 'cuda' and launch.backend = 'nccl': plait verify runs on the CPU with gloo, in float64; "
     "drop --device cuda and --backend nccl"),
], ids=["--device cuda", "--backend nccl", "both"])
def test_verify_refuses_a_gpu_request(gpus, launches, args, message, capsys):
    gpus(2)
    assert main(["verify", *args]) == 2
    assert capsys.readouterr().err == f"plait: error: {message}\n"
    assert launches == []


def test_verify_runs_on_the_cpu_on_a_gpu_node(gpus, launches, monkeypatch, capsys):
    """A GPU node (torch.cuda faked: any real CUDA call would fail): the CPU, gloo and a CPU mesh."""
    from plait import distributed

    gpus(1)
    asked = []
    real_init, real_mesh = distributed.init, distributed.make_mesh
    monkeypatch.setattr(distributed, "init", lambda **kw: asked.append(("init", kw)) or real_init(**kw))
    monkeypatch.setattr(distributed, "make_mesh", lambda **kw: asked.append(("mesh", kw)) or real_mesh(**kw))
    assert main(["verify", *ONE, "--verify-steps", "1"]) == 0  # the older spelling of --steps, still taken
    assert capsys.readouterr().out.splitlines()[-1] == "verdict: PASS (tolerance 1e-09)"
    assert asked == [("init", {"device": "cpu", "backend": "gloo", "timeout_s": 120.0}),
                     ("mesh", {"dp": 1, "pp": 1, "device_type": "cpu"})]
    assert main(["verify", "--dp", "2", "--pp", "2"]) == 0  # 4 workers on 1 GPU: fine, they use the CPU
    assert [nproc for nproc, _ in launches] == [4]


# Issue 15 items 4 and 6: refused once, in the parent, before any worker starts and before anything is written.

@pytest.mark.parametrize("args,message", [
    (["--lr", "nan"], "invalid train.lr = nan: must be a finite number > 0.0 (--lr)"),
    (["--timeout", "nan"], "invalid parallel.timeout = nan: must be a finite number >= 1.0 and <= 604800.0 (--timeout)"),
    (["--split", "0"], "parallel.split = '0': each cut must be between 1 and 5 and the cuts must increase, for the "
                       "model's 6 layers (embedding, 4 blocks, head); e.g. --split 3"),
    (["--dp", "4", "--pp", "1", "--split", "3"], "parallel.split = '3' cuts the model into pipeline stages, but "
                                                 "parallel.pp = 1 is one stage; drop --split, or set --pp 2 or more"),
], ids=["--lr nan", "--timeout nan", "--split 0", "--split at pp=1"])
def test_refused_in_the_parent_before_workers_or_files(tmp_path, monkeypatch, launches, args, message, capsys):
    monkeypatch.chdir(tmp_path)  # the default run folder would be runs/<date>-<time> here
    assert run(args, capsys) == (2, f"plait: error: {message}\n")
    assert launches == [] and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args,message", [
    (["--dp", "2", "--lr", "nan"], "invalid train.lr = nan: must be a finite number > 0.0 (--lr)"),
    (["--split", "0"], "parallel.split = '0': each cut must be between 1 and 5 and the cuts must increase, for the "
                       "model's 6 layers (embedding, 4 blocks, head); e.g. --split 3"),
], ids=["--dp 2 --lr nan", "--split 0 (dp 2 x pp 2)"])
def test_launched_command_refuses_once_before_any_worker(tmp_path, args, message):
    """As typed: `plait train` that would start workers says it once, writes nothing, exit 2."""
    proc = subprocess.run([sys.executable, "-m", "plait", "train", *args], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)
    assert (proc.returncode, proc.stderr, proc.stdout) == (2, f"plait: error: {message}\n", "")
    assert list(tmp_path.iterdir()) == []


def test_non_finite_learning_rate_in_one_process_never_trains(tmp_path, capsys):
    code, err = run([*SMALL, "--lr", "inf", "--out", str(tmp_path / "r")], capsys)
    assert (code, err) == (2, "plait: error: invalid train.lr = inf: must be a finite number > 0.0 (--lr)\n")
    assert not (tmp_path / "r").exists()


# Issue 15 item 10: plait verify honours the train options it can and refuses, by name, those it cannot.

@pytest.mark.parametrize("args,message", [
    (["--dtype", "bfloat16"], "train.dtype = 'bfloat16': plait verify runs in float64; drop --dtype"),
    (["--n-embd", "64"], "model.n_embd = 64: plait verify runs its own small copy of the model, 2 heads x 32 wide "
                         "on 16 tokens; drop --n-embd"),
    (["--dropout", "0.5"], "model.dropout = 0.5: plait verify compares without dropout, whose masks differ from "
                           "layout to layout; drop --dropout"),
    (["--n-embd", "64", "--seq-len", "8", "--dropout", "0.5", "--out", "x"],
     "model.n_embd = 64 and train.seq_len = 8: plait verify runs its own small copy of the model, 2 heads x 32 wide "
     "on 16 tokens; model.dropout = 0.5: it compares without dropout, whose masks differ from layout to layout; "
     "output.out = 'x': it writes nothing; drop --n-embd, --seq-len, --dropout and --out"),
    (["--partition", "profile"], "parallel.partition = 'profile': plait verify cuts uniformly for --partition "
                                 "profile, whose timings differ from run to run (give a run's cut with --split); "
                                 "drop --partition"),
    (["--warmup-steps", "5"], "train.warmup_steps = 5: plait verify keeps --lr constant; drop --warmup-steps"),
    (["--tokenizer", "byte"], "data.tokenizer = 'byte': plait verify trains on random tokens, not text; "
                              "drop --tokenizer"),
], ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_verify_refuses_train_options_it_cannot_honour(launches, args, message, capsys):
    assert main(["verify", "--dp", "2", *args]) == 2
    assert capsys.readouterr().err == f"plait: error: {message}\n"
    assert launches == []


def test_verify_honours_steps_and_says_what_it_did_not_use(tmp_path, capsys):
    path = tmp_path / "run.toml"  # a run's config: what verify cannot use is listed, not refused
    path.write_text("[train]\nsteps = 500\ndtype = 'bfloat16'\n[model]\nn_embd = 64\n")
    assert main(["verify", *ONE, "--config", str(path), "--steps", "2", "--dtype", "float64", "--n-layer", "2",
                 "--global-batch", "4", "--seed", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == ("plait verify: dp=1 x pp=1, 1f1b, 1 micro-batches, 2 steps; float64 GPT with 2 blocks x 32 "
                        "wide, tied head, global batch 4")
    assert lines[1] == "not used from --config: model.n_embd = 64"  # --dtype float64 and --steps 2 were honoured
    assert [line.split()[0] for line in lines[3:5]] == ["1", "2"] and lines[-1] == "verdict: PASS (tolerance 1e-09)"
    assert main(["verify", *ONE, "--config", str(path), "--n-layer", "1", "--global-batch", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert ", 3 steps;" in lines[0]  # the config file's 500 steps are a training run's, not verify's
    assert lines[1] == "not used from --config: model.n_embd = 64, train.dtype = 'bfloat16', train.steps = 500"


@pytest.mark.parametrize("rank,said", [(0, True), (1, False), (3, False)])
def test_under_torchrun_a_bad_option_is_said_once(gpus, monkeypatch, rank, said, capsys):
    """Workers that torchrun started (no plait parent to check first) all refuse; only rank 0 says why."""
    gpus(0)
    torchrun_env(monkeypatch, rank, 4)
    message = ("plait: error: parallel.split = '0': each cut must be between 1 and 5 and the cuts must increase, "
               "for the model's 6 layers (embedding, 4 blocks, head); e.g. --split 3\n")
    assert run(["--split", "0", *WORKERS], capsys) == (2, message if said else "")
