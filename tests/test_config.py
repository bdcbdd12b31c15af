import subprocess
import sys

import pytest

from plait.cli import main
from plait.config import Config, load_config, to_toml
from plait.errors import ConfigError

# (command-line arguments, the exact one-line message after "plait: error: ")
BAD = [
    (["--steps", "0"], "invalid train.steps = 0: must be >= 1 (--steps)"),
    (["--steps", "ten"], "invalid train.steps = 'ten': must be a whole number (--steps)"),
    (["--steps", "1.5"], "invalid train.steps = '1.5': must be a whole number (--steps)"),
    (["--lr", "0"], "invalid train.lr = 0.0: must be > 0.0 (--lr)"),
    (["--lr", "fast"], "invalid train.lr = 'fast': must be a number (--lr)"),
    (["--model", "huge"], "invalid model.preset = 'huge': must be one of tiny, small, gpt2-124m, "
                          "gpt2-350m, gpt2-774m, gpt2-1.5b (--model)"),
    (["--dtype", "float16"], "invalid train.dtype = 'float16': must be one of float32, bfloat16, float64 (--dtype)"),
    (["--schedule", "zigzag"], "invalid parallel.schedule = 'zigzag': must be one of gpipe, 1f1b, "
                               "interleaved-1f1b (--schedule)"),
    (["--tokenizer", "wordpiece"], "invalid data.tokenizer = 'wordpiece': must be one of bpe, byte (--tokenizer)"),
    (["--val-fraction", "0"], "invalid data.val_fraction = 0.0: must be > 0.0 (--val-fraction)"),
    (["--val-fraction", "0.9"], "invalid data.val_fraction = 0.9: must be <= 0.5 (--val-fraction)"),
    (["--vocab-size", "100"], "invalid data.vocab_size = 100: must be >= 257 (--vocab-size)"),
    (["--dropout", "1.5"], "invalid model.dropout = 1.5: must be <= 0.99 (--dropout)"),
    (["--dp", "0"], "invalid parallel.dp = 0: must be >= 1 (--dp)"),
    (["--microbatches", "-1"], "invalid parallel.num_microbatches = -1: must be >= 1 (--microbatches)"),
    (["--grad-clip", "-1"], "invalid train.grad_clip = -1.0: must be >= 0.0 (--grad-clip)"),
    (["--n-embd", "100", "--n-head", "3"],
     "model.n_embd = 100 is not divisible by model.n_head = 3; choose --n-embd a multiple of --n-head"),
    (["--seq-len", "256"], "train.seq_len = 256 is longer than the context length model.block_size = 128; "
                           "lower --seq-len or raise --block-size"),
    (["--global-batch", "10", "--microbatches", "4"],
     "train.global_batch = 10 does not divide into dp(2) x microbatches(4) = 8; choose --global-batch a multiple of 8"),
    (["--virtual-stages", "2"], "parallel.virtual_stages = 2 needs --schedule interleaved-1f1b and --pp 2 or more; "
                                "set --virtual-stages 1"),
    (["--schedule", "interleaved-1f1b"], "parallel.schedule = 'interleaved-1f1b' needs parallel.virtual_stages >= 2 "
                                         "(got 1); set --virtual-stages 2"),
    (["--schedule", "interleaved-1f1b", "--virtual-stages", "2", "--microbatches", "3", "--global-batch", "12"],
     "parallel.schedule = 'interleaved-1f1b' needs micro-batches (3) to be a multiple of pp (2); set --microbatches 2"),
    (["--split", "2,x"], "invalid parallel.split = '2,x': must be whole numbers separated by commas, e.g. 3,5 (--split)"),
    (["--split", "2,4"], "parallel.split = '2,4' has 2 cut(s) but 2 stages need 1; give --split 1 indices"),
    (["--nnodes", "2"], "launch.nnodes = 2 needs the rendezvous address of node 0; give --rdzv HOST:PORT"),
    (["--nnodes", "2", "--node-rank", "2", "--rdzv", "h:1"], "invalid launch.node_rank = 2: must be < launch.nnodes = 2 (--node-rank)"),
    (["--nnodes", "2", "--rdzv", "nohost"], "invalid launch.rdzv = 'nohost': must be HOST:PORT, e.g. 10.0.0.1:29400 (--rdzv)"),
    (["--nnodes", "3", "--rdzv", "h:1"], "dp(2) * pp(2) = 4 workers do not split over launch.nnodes = 3 machines; "
                                         "choose --dp and --pp whose product is a multiple of --nnodes"),
    (["--pp", "9", "--dp", "1"], "parallel.pp = 9 is more stages than the model's 6 layers (embedding, 4 blocks, head); "
                    "lower --pp or raise --n-layer"),
    (["--bogus", "1"], "unrecognized arguments: --bogus 1; see 'plait --help'"),
    (["--config", "/nonexistent/run.toml"], "--config /nonexistent/run.toml: no such file"),
    (["--resume", "/nonexistent/run"], "--resume /nonexistent/run: no config.toml there; "
                                       "give the directory of a plait run"),
]


@pytest.mark.parametrize("args,message", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_values_give_one_line_and_exit_code_2(args, message, capsys):
    assert main(["train", *args]) == 2
    err = capsys.readouterr().err
    assert err == f"plait: error: {message}\n"


@pytest.mark.parametrize("toml,message", [
    ("[train]\nsteps = 'ten'\n", "invalid train.steps = 'ten': must be a whole number (--steps)"),
    ("[train]\nstep = 3\n", "unknown config field train.step; known: steps, global_batch, seq_len, lr, "
                           "min_lr_ratio, warmup_steps, weight_decay, beta1, beta2, grad_clip, eval_every, "
                           "eval_batches, seed, dtype, device, sample_tokens, sample_prompt"),
    ("[trainer]\nsteps = 3\n", "unknown config section [trainer]; known: model, data, parallel, launch, train, output"),
    ("[model]\ntie_embeddings = 'yes please'\n",
     "invalid model.tie_embeddings = 'yes please': must be true or false (--tie-embeddings)"),
    ("steps = = 3\n", None),  # not TOML: the message quotes the parser's reason
])
def test_bad_config_files(tmp_path, toml, message, capsys):
    path = tmp_path / "run.toml"
    path.write_text(toml)
    assert main(["train", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    if message is None:
        assert err.startswith(f"plait: error: --config {path}: not valid TOML (")
    else:
        assert err == f"plait: error: {message}\n"


def test_precedence_defaults_then_file_then_command_line(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text("[train]\nsteps = 7\nlr = 0.01\n[model]\nn_layer = 2\n")
    cfg = load_config(path, {"train.lr": "0.5"})
    assert cfg.train.steps == 7 and cfg.train.lr == 0.5 and cfg.model.n_layer == 2
    assert cfg.train.global_batch == Config().train.global_batch
    assert cfg.model.shape == (2, 4, 128, 128)


def test_written_config_reads_back_equal(tmp_path):
    cfg = load_config(None, {"train.steps": "3", "model.n_embd": "64", "data.data": "corpus.txt",
                             "output.progress": False})
    path = tmp_path / "config.toml"
    path.write_text(to_toml(cfg))
    assert load_config(path) == cfg


def test_config_is_frozen():
    cfg = Config()
    with pytest.raises(Exception):
        cfg.train.steps = 3  # type: ignore[misc]


def test_cross_field_checks_also_apply_to_direct_construction():
    from plait.config import ParallelConfig, TrainConfig

    with pytest.raises(ConfigError, match="does not divide"):
        Config(train=TrainConfig(global_batch=6), parallel=ParallelConfig(dp=4))


def test_help_lists_every_option_with_its_default(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    import dataclasses

    from plait.config import SECTIONS, flag_of

    for cls in SECTIONS.values():
        for f in dataclasses.fields(cls):
            assert flag_of(f) in out
    assert "(default: 200)" in out and "(default: tiny)" in out


def test_command_line_error_has_no_traceback():
    proc = subprocess.run([sys.executable, "-m", "plait", "train", "--steps", "0"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr == "plait: error: invalid train.steps = 0: must be >= 1 (--steps)\n"
