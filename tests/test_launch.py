import pytest

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
    import torch

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
