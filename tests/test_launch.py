import os
import shlex
import subprocess
import sys

import pytest

from plait.cli import main
from plait.config_file import load_config
from plait.verify import _report, _small_copy


def test_slurm_script(capsys):
    assert main(["slurm", "--nodes", "2", "--gpus-per-node", "4", "--partition", "gpu", "--time", "01:00:00",
                 "--", "--dp", "4", "--pp", "2", "--model", "gpt2-124m", "--steps", "1000", "--stop-signal",
                 "SIGUSR1"]) == 0
    script = capsys.readouterr().out
    assert script.splitlines()[:12] == [
        "#!/bin/bash", "#SBATCH --job-name=plait", "#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1",
        "#SBATCH --gpus-per-node=4", "#SBATCH --partition=gpu", "#SBATCH --time=01:00:00",
        "#SBATCH --output=%x-%j.out", "#SBATCH --open-mode=append", "#SBATCH --signal=USR1@120",
        "#SBATCH --requeue", "set -euo pipefail"]
    assert 'head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)' in script
    # Not `plait` from PATH: this interpreter by its absolute path, i.e. the environment the script came from.
    assert f"python={shlex.quote(os.path.abspath(sys.executable))}\n" in script
    assert "srun --kill-on-bad-exit=1 bash -c 'exec \"$0\" -m plait train \\" in script
    assert '--nnodes "$SLURM_NNODES" --node-rank "$SLURM_NODEID" --rdzv "$1:$2" "${@:3}"' in script
    # No --out: the run folder is named after the job, which keeps its id when Slurm requeues it.
    assert ('run="runs/${SLURM_JOB_NAME:-plait}-${SLURM_JOB_ID}"\nif [ -f "$run/config.toml" ]; then\n'
            '    set -- --resume "$run"\nelse\n    set -- --dp 4 --pp 2 --model gpt2-124m --steps 1000 '
            '--stop-signal SIGUSR1 --out "$run"\nfi\n') in script
    assert '    "$python" "$head" "$port" "$@"\n' in script


def test_slurm_signal_grace(capsys):
    assert main(["slurm", "--nodes", "1", "--gpus-per-node", "2", "--signal-grace", "600", "--", "--dp", "2",
                 "--pp", "1"]) == 0
    assert "#SBATCH --signal=TERM@600\n" in capsys.readouterr().out
    assert main(["slurm", "--nodes", "1", "--gpus-per-node", "2", "--signal-grace", "-1", "--", "--dp", "2",
                 "--pp", "1"]) == 2
    assert capsys.readouterr().err == "plait: error: --signal-grace must be between 0 and 65535 seconds (got -1)\n"


def test_slurm_script_runs_the_given_python_with_each_node_s_rank(tmp_path):
    """The srun line, run by bash with srun and scontrol stood in for: each node's command line, word by word."""
    from plait.launch import slurm_script

    fake = tmp_path / "bin"
    fake.mkdir()
    # A long host list: a reader that stops after the first line would SIGPIPE scontrol, and under
    # `set -o pipefail` end the job with 141 (it did in CI with `head -n 1`).
    (fake / "scontrol").write_text("#!/bin/bash\nprintf 'node-a\\nnode-b\\n'\nseq 1 200000 | sed 's/^/node-x/'\n")
    # srun runs its command once per node, as tasks 0 and 1 would.
    (fake / "srun").write_text('#!/bin/bash\nshift\nfor n in 0 1; do SLURM_NODEID=$n "$@"; done\n')
    python = tmp_path / "env dir" / "python"  # a space: the path must survive quoting
    python.parent.mkdir()
    python.write_text("#!/bin/bash\necho \"$SLURM_NODEID: $*\"\n")
    for f in (fake / "scontrol", fake / "srun", python):
        f.chmod(0o755)
    script = slurm_script(2, 4, ["--dp", "8", "--out", "runs/a b"], python=str(python))
    env = {**os.environ, "PATH": f"{fake}:{os.environ['PATH']}", "SLURM_JOB_NODELIST": "node-[a-b]",
           "SLURM_JOB_ID": "1234", "SLURM_NNODES": "2"}
    proc = subprocess.run(["bash", "-c", script], capture_output=True, text=True, env=env, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        f"{n}: -m plait train --nnodes 2 --node-rank {n} --rdzv node-a:21234 --dp 8 --out runs/a b" for n in (0, 1)]


@pytest.mark.parametrize("args,message", [
    (["--nodes", "0", "--gpus-per-node", "4"], "--nodes must be >= 1 (got 0)"),
    (["--nodes", "2", "--gpus-per-node", "-1"], "--gpus-per-node must be >= 1 (got -1)"),
    (["--nodes", "1", "--gpus-per-node", "1", "--time", "banana"],
     "--time 'banana' is not a Slurm time limit; use minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS, "
     "e.g. 04:00:00"),
    (["--nodes", "1", "--gpus-per-node", "1", "--time", "1:00:00\n#SBATCH --exclusive"],
     "--time '1:00:00\\n#SBATCH --exclusive' is not a Slurm time limit; use minutes, MM:SS, HH:MM:SS, D-HH, "
     "D-HH:MM or D-HH:MM:SS, e.g. 04:00:00"),
    (["--nodes", "1", "--gpus-per-node", "1", "--job-name", "a b'c"],
     "--job-name \"a b'c\": use letters, digits, '.', '_' and '-' only"),
    (["--nodes", "1", "--gpus-per-node", "1", "--job-name", ""], "--job-name '': use letters, digits, '.', '_' "
                                                                  "and '-' only"),
    (["--nodes", "1", "--gpus-per-node", "1", "--partition", "gpu long"],
     "--partition 'gpu long': use letters, digits, '.', '_' and '-' only (several partitions: separated by "
     "commas)"),
], ids=["nodes 0", "gpus -1", "time banana", "time with a newline", "job name with quote", "empty job name",
        "partition with space"])
def test_slurm_options_are_checked_by_name(args, message, capsys):
    assert main(["slurm", *args, "--", "--dp", "1", "--pp", "1"]) == 2
    captured = capsys.readouterr()
    assert (captured.out, captured.err) == ("", f"plait: error: {message}\n")


@pytest.mark.parametrize("time", ["90", "30:00", "04:00:00", "2-12", "2-12:30", "2-12:30:00"])
def test_slurm_time_formats(time, capsys):
    assert main(["slurm", "--nodes", "1", "--gpus-per-node", "2", "--time", time, "--partition", "gpu,gpu-long",
                 "--job-name", "run_1.a-b", "--", "--dp", "2", "--pp", "1"]) == 0
    script = capsys.readouterr().out
    assert f"#SBATCH --time={time}\n" in script and "#SBATCH --partition=gpu,gpu-long\n" in script
    assert "#SBATCH --job-name=run_1.a-b\n" in script


def test_slurm_layout_must_fill_the_allocation(capsys):
    assert main(["slurm", "--nodes", "2", "--gpus-per-node", "4", "--", "--dp", "2", "--pp", "2"]) == 2
    assert capsys.readouterr().err == ("plait: error: dp(2) * pp(2) = 4 != 2 nodes x 4 GPUs = 8; "
                                       "choose --dp and --pp to fill the allocation\n")


def test_slurm_checks_the_train_options(capsys):
    assert main(["slurm", "--nodes", "1", "--gpus-per-node", "4", "--", "--steps", "0"]) == 2
    assert capsys.readouterr().err == "plait: error: invalid train.steps = 0: must be >= 1 (--steps)\n"


def test_verify_report_fails_on_a_difference():

    cfg = load_config(None, {"parallel.dp": 1, "parallel.pp": 1, "model.n_layer": 1})
    gpt = _small_copy(cfg)
    from plait.verify import _reference

    state, losses = _reference(cfg, gpt, 2)
    lines = []
    assert _report(cfg, gpt, 2, losses, [state], lines.append) == 0
    assert lines[-1] == "verdict: PASS (tolerance 1e-09)"
    bent = {k: v.clone() for k, v in state.items()}
    bent["1.attn.c_attn.weight"][0, 0] += 1e-6
    lines.clear()
    assert _report(cfg, gpt, 2, losses, [bent], lines.append) == 1
    assert lines[-1] == "verdict: FAIL (tolerance 1e-09)"
    assert "largest parameter difference 1.0e-06 (1.attn.c_attn.weight)" in lines[-2]


def test_rendezvous_store_listens_on_the_given_address_only():
    from torch.distributed.elastic.rendezvous import RendezvousParameters

    from plait import launch

    params = RendezvousParameters(backend=launch.RDZV_BACKEND, endpoint="127.0.0.1:0", run_id="t",
                                  min_nodes=1, max_nodes=1, is_host=True)
    handler = launch._c10d_bound_to_endpoint(params)
    assert handler.get_backend() == launch.RDZV_BACKEND
    host, port = launch._LISTENERS[-1].getsockname()
    assert host == "127.0.0.1" and port > 0  # not 0.0.0.0 or ::, and a port the system picked


def test_worker_store_listens_on_master_addr_only(monkeypatch):
    from datetime import timedelta

    from plait import distributed
    from tests.distributed.harness import free_port

    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    store = distributed._make_store(0, 1, timedelta(seconds=10))
    store.set("k", "v")
    assert store.get("k") == b"v"
    assert distributed._LISTENERS[-1].getsockname()[0] == "127.0.0.1"
