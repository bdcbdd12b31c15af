from plait.cli import main
from plait.config import load_config
from plait.verify import _report, _small_copy


def test_slurm_script(capsys):
    assert main(["slurm", "--nodes", "2", "--gpus-per-node", "4", "--partition", "gpu", "--time", "01:00:00",
                 "--", "--dp", "4", "--pp", "2", "--model", "gpt2-124m", "--steps", "1000"]) == 0
    script = capsys.readouterr().out
    assert script.splitlines()[:9] == [
        "#!/bin/bash", "#SBATCH --job-name=plait", "#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1",
        "#SBATCH --gpus-per-node=4", "#SBATCH --partition=gpu", "#SBATCH --time=01:00:00",
        "#SBATCH --output=%x-%j.out", "set -euo pipefail"]
    assert 'head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)' in script
    assert "srun --kill-on-bad-exit=1 bash -c 'exec plait train \\" in script
    assert '--nnodes "$SLURM_NNODES" --node-rank "$SLURM_NODEID" --rdzv "$0:$1" "${@:2}"' in script
    assert script.rstrip().endswith('"$head" "$port" --dp 4 --pp 2 --model gpt2-124m --steps 1000')


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
