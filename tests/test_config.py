import subprocess
import sys

import pytest

from plait.cli import main
import dataclasses

from plait.config import SECTIONS, Config, ModelConfig, field_type, flag_of, key_of
from plait.config_file import load_config, to_dict, to_toml
from plait.errors import ConfigError

# (command-line arguments, the exact one-line message after "plait: error: ")
BAD = [
    (["--steps", "0"], "invalid train.steps = 0: must be >= 1 (--steps)"),
    (["--steps", "ten"], "invalid train.steps = 'ten': must be a whole number (--steps)"),
    (["--steps", "1.5"], "invalid train.steps = '1.5': must be a whole number (--steps)"),
    (["--lr", "0"], "invalid train.lr = 0.0: must be > 0.0 (--lr)"),
    (["--lr", "fast"], "invalid train.lr = 'fast': must be a number (--lr)"),
    (["--model", "huge"], "invalid model.model = 'huge': must be one of tiny, small, gpt2-124m, "
                          "gpt2-350m, gpt2-774m, gpt2-1.5b (--model)"),
    (["--dtype", "float16"], "invalid train.dtype = 'float16': must be one of float32, bfloat16, float64 (--dtype)"),
    (["--schedule", "zigzag"], "invalid parallel.schedule = 'zigzag': must be one of gpipe, 1f1b, "
                               "interleaved-1f1b, zb1p, zbv, dualpipev (--schedule)"),
    (["--tokenizer", "wordpiece"], "invalid data.tokenizer = 'wordpiece': must be bpe, byte or the path of a "
                                   "tokenizer.json file (--tokenizer)"),
    (["--tokenizer", "t.json", "--vocab-size", "300"], "data.vocab_size = 300 does not apply to a tokenizer file "
                                                       "(data.tokenizer = 't.json'), which has its own vocabulary; "
                                                       "drop --vocab-size"),
    (["--bin-dtype", "int8"], "invalid data.bin_dtype = 'int8': must be one of uint16, uint32 (--bin-dtype)"),
    (["--bpe-sample-mb", "0"], "invalid data.bpe_sample_mb = 0.0: must be > 0.0 (--bpe-sample-mb)"),
    (["--val-fraction", "0"], "invalid data.val_fraction = 0.0: must be > 0.0 (--val-fraction)"),
    (["--val-fraction", "0.9"], "invalid data.val_fraction = 0.9: must be <= 0.5 (--val-fraction)"),
    (["--vocab-size", "100"], "invalid data.vocab_size = 100: must be >= 257 (--vocab-size)"),
    (["--dropout", "1.5"], "invalid model.dropout = 1.5: must be <= 0.99 (--dropout)"),
    (["--dp", "0"], "invalid parallel.dp = 0: must be >= 1 (--dp)"),
    (["--microbatches", "-1"], "invalid parallel.microbatches = -1: must be >= 1 (--microbatches)"),
    (["--grad-clip", "-1"], "invalid train.grad_clip = -1.0: must be >= 0.0 (--grad-clip)"),
    (["--n-embd", "100", "--n-head", "3"],
     "model.n_embd = 100 is not divisible by model.n_head = 3; choose --n-embd a multiple of --n-head"),
    (["--seq-len", "256"], "train.seq_len = 256 is longer than the context length model.block_size = 128; "
                           "lower --seq-len or raise --block-size"),
    (["--global-batch", "10", "--microbatches", "4"],
     "train.global_batch = 10 does not divide into dp(2) x microbatches(4) = 8; choose --global-batch a multiple of 8"),
    (["--virtual-stages", "2"], "parallel.virtual_stages = 2 needs --schedule interleaved-1f1b, zbv or dualpipev "
                                "and --pp 2 or more; set --virtual-stages 1"),
    (["--schedule", "zb1p", "--virtual-stages", "2"], "parallel.virtual_stages = 2 needs --schedule interleaved-1f1b, "
                                                      "zbv or dualpipev and --pp 2 or more; set --virtual-stages 1"),
    (["--schedule", "zbv", "--virtual-stages", "1"], "parallel.schedule = 'zbv' runs two stages per rank in a V, so it "
                                                     "needs parallel.virtual_stages = 2 (got 1); set --virtual-stages "
                                                     "2 (or leave it out), or use --schedule zb1p for one stage per "
                                                     "rank"),
    (["--schedule", "zbv", "--virtual-stages", "3"], "parallel.schedule = 'zbv' runs two stages per rank in a V, so it "
                                                     "needs parallel.virtual_stages = 2 (got 3); set --virtual-stages "
                                                     "2 (or leave it out), or use --schedule zb1p for one stage per "
                                                     "rank"),
    (["--schedule", "dualpipev", "--virtual-stages", "1"],
     "parallel.schedule = 'dualpipev' runs two stages per rank in a V, so it needs parallel.virtual_stages = 2 (got 1); "
     "set --virtual-stages 2 (or leave it out), or use --schedule zb1p for one stage per rank"),
    (["--schedule", "dualpipev", "--microbatches", "2"],
     "parallel.schedule = 'dualpipev' needs at least 2 x pp = 4 micro-batches (got 2); set --microbatches 4, or use "
     "--schedule zbv"),
    (["--schedule", "interleaved-1f1b"], "parallel.schedule = 'interleaved-1f1b' needs parallel.virtual_stages >= 2 "
                                         "(got 1); set --virtual-stages 2"),
    (["--schedule", "interleaved-1f1b", "--virtual-stages", "2", "--microbatches", "3", "--global-batch", "12"],
     "parallel.schedule = 'interleaved-1f1b' needs micro-batches (3) to be a multiple of pp (2); set --microbatches 2"),
    (["--split", "2,x"], "invalid parallel.split = '2,x': must be whole numbers separated by commas, e.g. 3,5 (--split)"),
    # Item 6 of issue 15: every --split is checked against the model's layers here, before any process starts.
    (["--split", "2,4"], "parallel.split = '2,4' has 2 cut(s) but pp(2) = 2 stages need 1; give --split one index "
                         "between 1 and 5, e.g. --split 3"),
    (["--split", "0"], "parallel.split = '0': each cut must be between 1 and 5 and the cuts must increase, for the "
                       "model's 6 layers (embedding, 4 blocks, head); e.g. --split 3"),
    (["--split", "6"], "parallel.split = '6': each cut must be between 1 and 5 and the cuts must increase, for the "
                       "model's 6 layers (embedding, 4 blocks, head); e.g. --split 3"),
    (["--pp", "3", "--dp", "1", "--split", "3,3"],
     "parallel.split = '3,3': each cut must be between 1 and 5 and the cuts must increase, for the model's 6 layers "
     "(embedding, 4 blocks, head); e.g. --split 2,4"),
    (["--dp", "4", "--pp", "1", "--split", "3"], "parallel.split = '3' cuts the model into pipeline stages, but "
                                                 "parallel.pp = 1 is one stage; drop --split, or set --pp 2 or more"),
    (["--schedule", "interleaved-1f1b", "--virtual-stages", "2", "--split", "3"],
     "parallel.split = '3' has 1 cut(s) but pp(2) x virtual_stages(2) = 4 stages need 3; give --split 3 increasing "
     "indices between 1 and 5, e.g. --split 1,3,4"),
    (["--nnodes", "2"], "launch.nnodes = 2 needs the rendezvous address of node 0; give --rdzv HOST:PORT"),
    (["--nnodes", "2", "--node-rank", "2", "--rdzv", "h:1"], "invalid launch.node_rank = 2: must be < launch.nnodes = 2 (--node-rank)"),
    (["--nnodes", "2", "--rdzv", "nohost"], "invalid launch.rdzv = 'nohost': must be HOST:PORT, e.g. 10.0.0.1:29400 (--rdzv)"),
    (["--nnodes", "3", "--rdzv", "h:1"], "dp(2) * pp(2) = 4 workers do not split over launch.nnodes = 3 machines; "
                                         "choose --dp and --pp whose product is a multiple of --nnodes"),
    (["--pp", "9", "--dp", "1"], "parallel.pp = 9 is more stages than the model's 6 layers (embedding, 4 blocks, head); "
                    "lower --pp or raise --n-layer"),
    (["--bogus", "1"], "unrecognized arguments: --bogus 1; see 'plait --help'"),
    (["--config", "/nonexistent/run.toml"], "--config /nonexistent/run.toml: no such file"),
    # Item 5: a folder, a path through a file.
    (["--config", "/"], "--config /: is a folder; give a TOML file (a run's is RUN_DIR/config.toml)"),
    (["--config", "/etc/hostname/run.toml"], "--config /etc/hostname/run.toml: cannot read it (Not a directory); "
                                             "give a readable TOML file"),
    # Item 11: the byte tokenizer has 257 tokens, whatever --vocab-size says.
    (["--tokenizer", "byte", "--vocab-size", "4096"], "data.vocab_size = 4096 does not apply to data.tokenizer = "
                                                      "'byte', which always has 257 tokens; drop --vocab-size, or use "
                                                      "--tokenizer bpe"),
    # Item 4: non-finite numbers, and the range of every float.
    (["--lr", "inf"], "invalid train.lr = inf: must be a finite number > 0.0 (--lr)"),
    (["--lr", "nan"], "invalid train.lr = nan: must be a finite number > 0.0 (--lr)"),
    (["--lr", "1e400"], "invalid train.lr = inf: must be a finite number > 0.0 (--lr)"),
    (["--beta2", "nan"], "invalid train.beta2 = nan: must be a finite number >= 0.0 and <= 0.9999 (--beta2)"),
    (["--beta1", "1"], "invalid train.beta1 = 1.0: must be <= 0.9999 (--beta1)"),
    (["--dropout", "nan"], "invalid model.dropout = nan: must be a finite number >= 0.0 and <= 0.99 (--dropout)"),
    (["--dropout", "1"], "invalid model.dropout = 1.0: must be <= 0.99 (--dropout)"),
    (["--grad-clip", "nan"], "invalid train.grad_clip = nan: must be a finite number >= 0.0 (--grad-clip)"),
    (["--grad-clip", "inf"], "invalid train.grad_clip = inf: must be a finite number >= 0.0 (--grad-clip)"),
    (["--bucket-mb", "nan"], "invalid parallel.bucket_mb = nan: must be a finite number > 0.0 (--bucket-mb)"),
    (["--timeout", "nan"], "invalid parallel.timeout = nan: must be a finite number >= 1.0 and <= 604800.0 (--timeout)"),
    (["--timeout", "1e9"], "invalid parallel.timeout = 1000000000.0: must be <= 604800.0 (--timeout)"),
    (["--checkpoint-timeout=-inf"], "invalid output.checkpoint_timeout = -inf: must be a finite number > 0.0 and "
                                       "<= 604800.0 (--checkpoint-timeout)"),
    (["--weight-decay", "inf"], "invalid train.weight_decay = inf: must be a finite number >= 0.0 (--weight-decay)"),
    (["--peak-tflops", "nan"], "invalid output.peak_tflops = nan: must be a finite number > 0.0 (--peak-tflops)"),
    # Issue 16 item 2: ZeRO levels (2 is not written yet).
    (["--zero", "3"], "invalid parallel.zero = 3: must be one of 0, 1, 2 (--zero)"),
    (["--zero=-1"], "invalid parallel.zero = -1: must be one of 0, 1, 2 (--zero)"),
    (["--vocab-multiple", "0"], "invalid model.vocab_multiple = 0: must be >= 1 (--vocab-multiple)"),
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
                           "eval_batches, seed, dtype, device, activation_checkpointing, sample_tokens, sample_prompt"),
    ("[trainer]\nsteps = 3\n", "unknown config section [trainer]; known: model, data, parallel, launch, train, output"),
    ("[model]\ntie_embeddings = 'yes please'\n",
     "invalid model.tie_embeddings = 'yes please': must be true or false (--tie-embeddings)"),
    ("steps = = 3\n", None),  # not TOML: the message quotes the parser's reason
    ("[parallel]\nmicrobatches = 2\nnum_microbatches = 2\n",
     "config section [parallel] gives microbatches twice, also as its older name num_microbatches; keep microbatches"),
    ("[parallel]\nsplit = [1.5]\n", "invalid parallel.split = [1.5]: must be whole numbers, e.g. [3, 5] or \"3,5\" "
                                   "(--split)"),
    ("[parallel]\nsplit = [0]\n", "parallel.split = '0': each cut must be between 1 and 5 and the cuts must increase, "
                                  "for the model's 6 layers (embedding, 4 blocks, head); e.g. --split 3"),
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


FLOATS = [(section, f) for section, cls in SECTIONS.items() for f in dataclasses.fields(cls)
          if field_type(cls, f.name)[0] is float]


def test_the_config_tree_has_the_float_fields_we_think():
    assert sorted(f"{s}.{f.name}" for s, f in FLOATS) == [
        "data.bpe_sample_mb", "data.val_fraction", "model.dropout", "output.checkpoint_timeout", "output.peak_tflops",
        "parallel.bucket_mb", "parallel.max_memory_gb", "parallel.timeout", "train.beta1", "train.beta2",
        "train.grad_clip", "train.lr", "train.min_lr_ratio",
        "train.weight_decay"]


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
@pytest.mark.parametrize("section,f", FLOATS, ids=[f"{s}.{f.name}" for s, f in FLOATS])
def test_every_float_option_must_be_finite(section, f, value, capsys):
    """Issue 15 item 4: one check, in config.py, for every float field of the tree."""
    assert main(["train", f"{flag_of(f)}={value}"]) == 2  # "=": argparse reads a lone -inf as an option
    err = capsys.readouterr().err
    assert err.startswith(f"plait: error: invalid {section}.{key_of(f)} = {value}: must be a finite number")
    assert err.endswith(f" ({flag_of(f)})\n") and err.count("\n") == 1


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_non_finite_numbers_in_a_config_file(tmp_path, value, capsys):
    path = tmp_path / "run.toml"
    path.write_text(f"[train]\nlr = {value}\n")  # TOML has nan and inf
    assert main(["train", "--config", str(path)]) == 2
    assert capsys.readouterr().err == f"plait: error: invalid train.lr = {value}: must be a finite number > 0.0 (--lr)\n"


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


def test_config_file_that_is_not_utf8(tmp_path, capsys):
    path = tmp_path / "run.toml"
    path.write_bytes(b"[train]\nsteps = \xff\n")
    assert main(["train", "--config", str(path)]) == 2
    assert capsys.readouterr().err == f"plait: error: --config {path}: not valid TOML (not UTF-8 text)\n"


def test_a_run_folders_unreadable_config_names_resume(tmp_path, capsys):
    (tmp_path / "config.toml").write_text("steps = = 3\n")
    assert main(["train", "--resume", str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith(f"plait: error: --resume {tmp_path} (its config.toml): not valid TOML (")


# Issue 15 item 14: one name per option. The flag names the TOML key and the field in every message.

def test_toml_keys_are_the_flags_names(tmp_path):
    cfg = load_config(None, {"parallel.num_microbatches": "2", "model.preset": "small"})
    written = to_dict(cfg)
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            if getattr(getattr(cfg, section), f.name) is not None:
                assert flag_of(f) == "--" + key_of(f).replace("_", "-")
                assert key_of(f) in written[section], (section, f.name)
    assert written["parallel"]["microbatches"] == 2 and "num_microbatches" not in written["parallel"]
    assert written["model"]["model"] == "small" and "preset" not in written["model"]
    path = tmp_path / "run.toml"
    path.write_text("[parallel]\nmicrobatches = 2\n[model]\nmodel = 'small'\n")
    assert load_config(path) == cfg


def test_config_files_written_before_the_rename_still_read(tmp_path):
    """A config.toml that a run wrote with the older keys: --resume and --config still take it."""
    path = tmp_path / "config.toml"
    path.write_text("[model]\npreset = 'small'\n[data]\ntokenizer = 'byte'\nvocab_size = 2048\n"
                    "[parallel]\nnum_microbatches = 2\nsplit = '3'\n")
    cfg = load_config(path, {"parallel.microbatches": "8"})  # the command line overrides the old key
    assert (cfg.model.preset, cfg.parallel.num_microbatches, cfg.parallel.cuts) == ("small", 8, [3])
    assert cfg.data.vocab_size == 257  # an older byte run recorded the default 2048; it used 257


def test_split_in_toml_as_a_list_or_a_string(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text("[parallel]\ndp = 1\npp = 3\nsplit = [2, 4]\n")
    listed = load_config(path)
    path.write_text("[parallel]\ndp = 1\npp = 3\nsplit = '2,4'\n")
    assert load_config(path) == listed and listed.parallel.cuts == [2, 4]


def test_byte_tokenizer_records_its_257_tokens(tmp_path):
    """Issue 15 item 11: the config.toml of a byte run says the vocabulary it used."""
    cfg = load_config(None, {"data.tokenizer": "byte"})
    assert cfg.data.vocab_size == 257 and "vocab_size = 257" in to_toml(cfg)
    assert load_config(None, {"data.tokenizer": "byte", "data.vocab_size": "257"}) == cfg


@pytest.mark.parametrize("options,virtual", [({}, 1), ({"parallel.schedule": "interleaved-1f1b",
                                                          "parallel.virtual_stages": "3"}, 3),
                                              ({"parallel.schedule": "zbv"}, 2), ({"parallel.schedule": "dualpipev"}, 2),
                                              ({"parallel.schedule": "zbv", "parallel.pp": "1"}, 1)])
def test_virtual_stages_left_out_are_the_schedule_s_own(tmp_path, options, virtual):
    # A V runs two stages per rank and nothing else, so it is not asked for; the count is written
    # down as chosen, and the run's config.toml reads back to the same layout.
    cfg = load_config(None, options)
    assert cfg.parallel.virtual_stages == virtual
    path = tmp_path / "config.toml"
    path.write_text(to_toml(cfg))
    assert f"virtual_stages = {virtual}" in path.read_text() and load_config(path) == cfg


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
    for cls in SECTIONS.values():
        for f in dataclasses.fields(cls):
            assert flag_of(f) in out
    assert "(default: 200)" in out and "(default: tiny)" in out


def test_command_line_error_has_no_traceback():
    proc = subprocess.run([sys.executable, "-m", "plait", "train", "--steps", "0"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr == "plait: error: invalid train.steps = 0: must be >= 1 (--steps)\n"


@pytest.mark.parametrize("multiple, tokens, rows", [(64, 257, 320), (64, 2048, 2048), (1, 257, 257),
                                                    (64, 50257, 50304), (128, 50257, 50304), (128, 2049, 2176)])
def test_the_model_vocabulary_is_the_tokenizers_padded_to_a_multiple(multiple, tokens, rows):
    # [Note: padded vocabulary]
    assert ModelConfig(vocab_multiple=multiple).gpt(tokens).vocab_size == rows
