"""The run's configuration: one tree of frozen dataclasses.

A `Config` is built from the defaults below, then an optional TOML file, then
command-line overrides (`plait.config_file.load_config`), and is checked once as it is built:
each section checks its own fields, `Config.__post_init__` checks every rule
that involves more than one field. Every failure is a one-line `ConfigError`
that names the field, the value, what is allowed and the option to change.

Each field carries its command-line flag and help text in its metadata, so
the `plait train` options are generated from this file and cannot drift.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from typing import Any

from plait.errors import ConfigError
from plait.model_shape import PRESETS, GPTConfig
from plait.parallel.schedule import V_SCHEDULES
from plait.stop import STOP_SIGNALS

SCHEDULES = ("gpipe", "1f1b", "interleaved-1f1b", "zb1p", "zbv", "dualpipev")
DTYPES = ("float32", "bfloat16", "float64")
DEFAULT_VOCAB, BYTE_VOCAB = 2048, 257  # BYTE_VOCAB: 256 bytes and the end-of-text token
WEEK_S = 7 * 24 * 3600.0  # a longer timeout is no timeout (and overflows a timedelta somewhere past 1e14 s)


def option(default: Any, help: str, *, flag: str | None = None, choices: tuple | None = None,
           min: float | None = None, max: float | None = None, min_open: bool = False,
           listed: bool = False) -> Any:
    """A config field with its command-line flag, help text and allowed values.

    The flag also names the field's TOML key (`--microbatches` -> `microbatches`):
    one name per option everywhere ([Note: one name per option]). `listed`: a
    comma-separated list of whole numbers, which TOML may also give as an array.
    """
    meta = {"help": help, "flag": flag, "choices": choices, "min": min, "max": max, "min_open": min_open,
            "listed": listed}
    return field(default=default, metadata=meta)


# [Note: one name per option]
# An option has one name: its flag, `--microbatches`, is `microbatches` in a TOML
# file, `parallel.microbatches` in every message and in the config.toml a run
# writes. Two fields keep an older Python attribute name (`num_microbatches`,
# `preset`) for the library's sake; a TOML file may still use those names (the
# config.toml files that runs wrote before) and they are read as the flag's name.


# [Note: padded vocabulary] The model's vocabulary is the tokenizer's rounded up to a multiple of
# `model.vocab_multiple` (64), as nanoGPT pads GPT-2's 50,257 to 50,304 and Megatron-LM to a
# multiple of 128: with 50,257 rows the LM head's matmuls fall back to unaligned kernels, 15.5 ms
# of a 39.5 ms gpt2-124m step on an H200, and padded the step was 25% shorter (README,
# Benchmarks). The extra rows are never a target, so training pushes their logits down; sampling
# draws from the tokenizer's ids only, and the Hugging Face export drops the rows. plait's own
# BPE vocabulary (2,048 by default) is already a multiple; the byte tokenizer's 257 becomes 320.
# A run saved before padding existed has no `vocab_multiple` in its config.toml and resumes
# unpadded (`cli._config_from`).


@dataclass(frozen=True)
class ModelConfig:
    """The model's shape: a preset, with any of its numbers overridden."""

    preset: str = option("tiny", "size preset", flag="--model", choices=tuple(PRESETS))
    n_layer: int | None = option(None, "transformer blocks (default: the preset's)", min=1)
    n_head: int | None = option(None, "attention heads (default: the preset's)", min=1)
    n_embd: int | None = option(None, "embedding width (default: the preset's)", min=1)
    block_size: int | None = option(None, "context length (default: the preset's)", min=1)
    dropout: float = option(0.0, "dropout probability", min=0.0, max=0.99)  # 1.0 would zero every activation
    tie_embeddings: bool = option(True, "share the LM head's weight with the token embedding")
    vocab_multiple: int = option(64, "pad the model's vocabulary (embedding and LM head rows) up to a multiple "
                                 "of this, for aligned matmuls; 1: no padding", min=1)

    def __post_init__(self) -> None:
        _check_fields(self, "model")

    def gpt(self, vocab_size: int) -> GPTConfig:
        """The model's full shape, once the tokenizer's vocabulary size is known: its vocabulary
        padded up to a multiple of `vocab_multiple` ([Note: padded vocabulary])."""
        n_layer, n_head, n_embd, block_size = self.shape
        padded = -(-vocab_size // self.vocab_multiple) * self.vocab_multiple
        return GPTConfig(vocab_size=padded, block_size=block_size, n_layer=n_layer,
                         n_head=n_head, n_embd=n_embd, dropout=self.dropout,
                         tie_embeddings=self.tie_embeddings)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """(n_layer, n_head, n_embd, block_size), overrides applied to the preset."""
        preset = PRESETS[self.preset]
        given = (self.n_layer, self.n_head, self.n_embd, self.block_size)
        return tuple(g if g is not None else p for g, p in zip(given, preset))  # type: ignore[return-value]


@dataclass(frozen=True)
class DataConfig:
    """Where the text comes from and how it becomes tokens."""

    data: str | None = option(None, "a text, .jsonl, .jsonl.gz or pre-tokenized .bin file, a folder of text and "
                                    ".jsonl files, or a folder `plait prepare` wrote (default: CPython's "
                                    "documentation topics)")
    data_dir: str = option("data", "folder where prepared tokens and the tokenizer are cached")
    tokenizer: str = option("bpe", "tokenizer: bpe (byte-level BPE trained on the corpus), byte (raw bytes), "
                                   "or the path of a Hugging Face tokenizer.json")
    vocab_size: int = option(DEFAULT_VOCAB, "BPE vocabulary size (the byte tokenizer always has 257)", min=BYTE_VOCAB, max=65536)
    val_fraction: float = option(0.1, "held-out share of the tokens for validation", min=0.0,
                                 min_open=True, max=0.5)
    text_field: str = option("text", "the field of each JSON Lines record that holds its text")
    bin_dtype: str = option("uint16", "token type of a .bin without an llm.c header", choices=("uint16", "uint32"))
    bpe_sample_mb: float = option(8.0, "MB of text, from the start of the corpus, the BPE tokenizer is trained on",
                                  min=0.0, min_open=True)

    def __post_init__(self) -> None:
        _check_fields(self, "data")
        if self.tokenizer not in ("bpe", "byte") and not self.tokenizer.endswith(".json"):
            raise ConfigError(f"invalid data.tokenizer = {self.tokenizer!r}: must be bpe, byte or the path of a "
                              f"tokenizer.json file (--tokenizer)")
        if self.tokenizer.endswith(".json") and self.vocab_size != DEFAULT_VOCAB:
            raise ConfigError(f"data.vocab_size = {self.vocab_size} does not apply to a tokenizer file "
                              f"(data.tokenizer = {self.tokenizer!r}), which has its own vocabulary; "
                              f"drop --vocab-size")
        if self.tokenizer == "byte" and self.vocab_size != BYTE_VOCAB:
            if self.vocab_size != DEFAULT_VOCAB:  # the default is not a request: a byte run records 257
                raise ConfigError(f"data.vocab_size = {self.vocab_size} does not apply to data.tokenizer = 'byte', "
                                  f"which always has {BYTE_VOCAB} tokens; drop --vocab-size, or use --tokenizer bpe")
            object.__setattr__(self, "vocab_size", BYTE_VOCAB)

    def prepare_options(self) -> dict:
        """The keyword arguments of `plait.data.prepare` these options give."""
        return {"tokenizer": self.tokenizer, "vocab_size": self.vocab_size, "val_fraction": self.val_fraction,
                "text_field": self.text_field, "bin_dtype": self.bin_dtype, "bpe_sample_mb": self.bpe_sample_mb}


@dataclass(frozen=True)
class ParallelConfig:
    """How the work is spread over processes."""

    dp: int = option(2, "data-parallel replicas", min=1)
    pp: int = option(2, "pipeline ranks", min=1)
    schedule: str = option("1f1b", "pipeline schedule", choices=SCHEDULES)
    num_microbatches: int = option(4, "micro-batches per step on each data-parallel rank "
                                      "(gradient accumulation when pp=1)", flag="--microbatches", min=1)
    virtual_stages: int | None = option(None, "pipeline stages per rank: interleaved-1f1b needs 2 or more, zbv and "
                                              "dualpipev exactly 2 (default: 2 for zbv and dualpipev, else 1)", min=1)
    partition: str = option("uniform", "how layers are cut into stages", choices=("uniform", "params", "profile"))
    split: str | None = option(None, "manual cut indices, e.g. 3,5 (overrides --partition; needs --pp 2 or more)",
                               listed=True)
    bucket_mb: float = option(25.0, "gradient bucket size of the data-parallel all-reduce, in MiB",
                              min=0.0, min_open=True)
    zero: int = option(0, "ZeRO level: 0 replicated; 1 each dp rank keeps 1/dp of the optimizer state and "
                          "receives 1/dp of the reduced gradients; 2 also keeps only that 1/dp of the gradients "
                          "(reduced every micro-batch) (a no-op at dp=1)", choices=(0, 1, 2))
    overlap_param_gather: bool = option(False, "under --zero 1 or 2, run the parameter all-gather behind the next "
                                               "step's forward (each layer waits for its own buckets)")
    timeout: float = option(120.0, "seconds any collective may wait for a peer before the run fails",
                            min=1.0, max=WEEK_S)
    max_memory_gb: float | None = option(None, "memory of one device in GiB: a layout predicted to need more "
                                               "(plait/memory.py) is refused before it starts", min=0.0,
                                         min_open=True)

    def __post_init__(self) -> None:
        if self.virtual_stages is None:  # a V has one valid count, two stages per rank: taken, not asked for
            object.__setattr__(self, "virtual_stages", 2 if self.pp > 1 and self.schedule in V_SCHEDULES else 1)
        _check_fields(self, "parallel")
        if self.split is not None:
            try:
                self.cuts
            except ValueError:
                raise ConfigError(f"invalid parallel.split = {self.split!r}: must be whole numbers separated "
                                  f"by commas, e.g. 3,5 (--split)") from None
        if self.overlap_param_gather and self.zero == 0:
            raise ConfigError("parallel.overlap_param_gather needs --zero 1 or 2: without ZeRO there is no parameter "
                              "all-gather to overlap; drop --overlap-param-gather or set --zero 1")
        if self.pp > 1 and self.schedule == "interleaved-1f1b":
            if self.virtual_stages < 2:
                raise ConfigError(f"parallel.schedule = 'interleaved-1f1b' needs parallel.virtual_stages >= 2 "
                                  f"(got {self.virtual_stages}); set --virtual-stages 2")
            if self.num_microbatches % self.pp:
                raise ConfigError(f"parallel.schedule = 'interleaved-1f1b' needs micro-batches "
                                  f"({self.num_microbatches}) to be a multiple of pp ({self.pp}); "
                                  f"set --microbatches {self.pp * max(1, self.num_microbatches // self.pp)}")
        elif self.pp > 1 and self.schedule in V_SCHEDULES:
            if self.virtual_stages != 2:
                raise ConfigError(f"parallel.schedule = '{self.schedule}' runs two stages per rank in a V, so it needs "
                                  f"parallel.virtual_stages = 2 (got {self.virtual_stages}); set --virtual-stages 2 "
                                  f"(or leave it out), or use --schedule zb1p for one stage per rank")
            if self.schedule == "dualpipev" and self.num_microbatches < 2 * self.pp:
                raise ConfigError(f"parallel.schedule = 'dualpipev' needs at least 2 x pp = {2 * self.pp} "
                                  f"micro-batches (got {self.num_microbatches}); set --microbatches {2 * self.pp}, "
                                  f"or use --schedule zbv")
        elif self.virtual_stages != 1:
            raise ConfigError(f"parallel.virtual_stages = {self.virtual_stages} needs --schedule interleaved-1f1b, "
                              f"zbv or dualpipev and --pp 2 or more; set --virtual-stages 1")

    @property
    def world_size(self) -> int:
        return self.dp * self.pp

    @property
    def cuts(self) -> list[int] | None:
        """The manual cut indices of `split`, or None."""
        return [int(c) for c in self.split.split(",")] if self.split else None


@dataclass(frozen=True)
class LaunchConfig:
    """Where the workers run: this machine, or several through torch's c10d rendezvous."""

    nnodes: int = option(1, "machines in the job (each runs its share of dp x pp workers)", min=1)
    node_rank: int = option(0, "this machine's index, 0 .. nnodes-1 (node 0 hosts the rendezvous)", min=0)
    rdzv: str | None = option(None, "HOST:PORT of the rendezvous on node 0 (default: 127.0.0.1 and a free port)")
    max_restarts: int = option(0, "times torch's launcher restarts the workers after one fails", min=0)
    backend: str = option("auto", "collectives; they follow --device (nccl on cuda, gloo on cpu), and a "
                                  "backend named here must be that one", choices=("auto", "gloo", "nccl"))
    stop_signal: str = option("SIGTERM", "a signal that, like SIGTERM and SIGINT, stops the run after the step "
                                         "all ranks agree on, with a checkpoint (a second one stops at once)",
                              choices=STOP_SIGNALS)

    def __post_init__(self) -> None:
        _check_fields(self, "launch")
        if self.node_rank >= self.nnodes:
            raise ConfigError(f"invalid launch.node_rank = {self.node_rank}: must be < launch.nnodes = "
                              f"{self.nnodes} (--node-rank)")
        if self.nnodes > 1 and not self.rdzv:
            raise ConfigError(f"launch.nnodes = {self.nnodes} needs the rendezvous address of node 0; "
                              f"give --rdzv HOST:PORT")
        if self.rdzv is not None:
            host, _, port = self.rdzv.rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ConfigError(f"invalid launch.rdzv = {self.rdzv!r}: must be HOST:PORT, e.g. 10.0.0.1:29400 "
                                  f"(--rdzv)")


@dataclass(frozen=True)
class TrainConfig:
    """The optimisation: batch, schedule of the learning rate, evaluation."""

    steps: int = option(200, "optimizer steps", min=1)
    global_batch: int = option(16, "sequences per optimizer step, over all replicas", min=1)
    seq_len: int | None = option(None, "tokens per sequence (default: the model's context length)", min=1)
    lr: float = option(1e-3, "peak learning rate", min=0.0, min_open=True)
    min_lr_ratio: float = option(0.1, "final learning rate as a fraction of --lr", min=0.0, max=1.0)
    warmup_steps: int = option(20, "linear warm-up steps before the cosine decay", min=0)
    weight_decay: float = option(0.1, "AdamW weight decay (matrices and embeddings only)", min=0.0)
    beta1: float = option(0.9, "AdamW beta1", min=0.0, max=0.9999)
    beta2: float = option(0.95, "AdamW beta2", min=0.0, max=0.9999)
    grad_clip: float = option(1.0, "clip the global gradient norm to this (0: off)", min=0.0)
    eval_every: int = option(50, "validation loss every N steps (0: only at the end)", min=0)
    eval_batches: int = option(4, "batches of the validation split per evaluation", min=1)
    seed: int = option(1337, "seed for initialisation and batches", min=0)
    dtype: str = option("float32", "compute dtype (bfloat16 uses autocast)", choices=DTYPES)
    device: str = option("auto", "device, which also picks the backend: cuda (cuda:LOCAL_RANK, nccl) or cpu "
                                 "(gloo); auto is cuda when a GPU is visible", choices=("auto", "cpu", "cuda"))
    activation_checkpointing: str = option("none", "recompute activations in the backward: full (each block "
                                                   "keeps only its input) or selective (keeps attention outputs)",
                                           choices=("none", "selective", "full"))
    sample_tokens: int = option(120, "tokens of text sampled at the end (0: none)", min=0)
    sample_prompt: str = option("The", "prompt for the sample at the end")

    def __post_init__(self) -> None:
        _check_fields(self, "train")


@dataclass(frozen=True)
class OutputConfig:
    """Where the run writes, and how often."""

    out: str | None = option(None, "run directory (default: runs/<date>-<time>)")
    checkpoint_every: int = option(0, "checkpoint every N steps (0: only at the end)", min=0)
    keep_checkpoints: int = option(2, "newest checkpoints to keep", min=1)
    checkpoint_timeout: float = option(600.0, "seconds the ranks wait for each other while a checkpoint is "
                                              "written and hashed (its own limit, not --timeout)",
                                       min=0.0, min_open=True, max=WEEK_S)
    async_checkpoint: bool = option(True, "write checkpoints in a background thread from host copies, so the step "
                                          "loop waits only for the copy (plait/checkpoint_async.py)")
    progress: bool = option(True, "show a progress bar")
    trace: bool = option(False, "record per-rank timelines; write trace.json and pipeline.png")
    trace_steps: int = option(2, "steps to record with --trace (after two of warm-up)", min=1)
    tensorboard: bool = option(False, "also write the per-step metrics as TensorBoard events in RUN_DIR/tensorboard")
    peak_tflops: float | None = option(None, "dense peak TFLOP/s of one device in the compute dtype, for MFU "
                                             "(default: the datasheet figure of a known GPU, measured on a CPU)",
                                       min=0.0, min_open=True)

    def __post_init__(self) -> None:
        _check_fields(self, "output")


@dataclass(frozen=True)
class Config:
    """The whole configuration of a run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    def __post_init__(self) -> None:
        n_layer, n_head, n_embd, block_size = self.model.shape
        if n_embd % n_head:
            raise ConfigError(f"model.n_embd = {n_embd} is not divisible by model.n_head = {n_head}; "
                              f"choose --n-embd a multiple of --n-head")
        if self.train.seq_len is not None and self.train.seq_len > block_size:
            raise ConfigError(f"train.seq_len = {self.train.seq_len} is longer than the context length "
                              f"model.block_size = {block_size}; lower --seq-len or raise --block-size")
        p = self.parallel
        if self.train.global_batch % (p.dp * p.num_microbatches):
            n = p.dp * p.num_microbatches
            raise ConfigError(f"train.global_batch = {self.train.global_batch} does not divide into "
                              f"dp({p.dp}) x microbatches({p.num_microbatches}) = {n}; "
                              f"choose --global-batch a multiple of {n}")
        stages = p.pp * p.virtual_stages
        if stages > n_layer + 2:
            what = f"pp({p.pp}) x virtual_stages({p.virtual_stages}) = {stages}" if p.virtual_stages > 1 else f"parallel.pp = {p.pp}"
            raise ConfigError(f"{what} is more stages than the model's {n_layer + 2} layers "
                              f"(embedding, {n_layer} blocks, head); lower --pp or raise --n-layer")
        if p.world_size % self.launch.nnodes:
            raise ConfigError(f"dp({p.dp}) * pp({p.pp}) = {p.world_size} workers do not split over "
                              f"launch.nnodes = {self.launch.nnodes} machines; choose --dp and --pp whose "
                              f"product is a multiple of --nnodes")
        if p.cuts is not None:
            _check_split(p, n_layer + 2, n_layer)

    @property
    def seq_len(self) -> int:
        """Tokens per sequence, the model's context length unless given."""
        return self.train.seq_len or self.model.shape[3]


def _check_split(p: ParallelConfig, n: int, n_layer: int) -> None:
    """--split against the model's `n` layers, here in the parent, before any process or file exists.

    (partition.py checks a library caller's split the same way.)
    """
    stages = p.pp * p.virtual_stages
    example = ",".join(str(i * n // stages) for i in range(1, stages))  # the uniform cut
    if stages == 1:
        raise ConfigError(f"parallel.split = {p.split!r} cuts the model into pipeline stages, but parallel.pp = 1 "
                          f"is one stage; drop --split, or set --pp 2 or more")
    what = f"pp({p.pp})" + (f" x virtual_stages({p.virtual_stages})" if p.virtual_stages > 1 else "")
    if len(p.cuts) != stages - 1:
        need = "one index" if stages == 2 else f"{stages - 1} increasing indices"
        raise ConfigError(f"parallel.split = {p.split!r} has {len(p.cuts)} cut(s) but {what} = {stages} stages "
                          f"need {stages - 1}; give --split {need} between 1 and {n - 1}, e.g. --split {example}")
    bounds = [0, *p.cuts, n]
    if any(a >= b for a, b in zip(bounds, bounds[1:])):
        raise ConfigError(f"parallel.split = {p.split!r}: each cut must be between 1 and {n - 1} and the cuts must "
                          f"increase, for the model's {n} layers (embedding, {n_layer} blocks, head); "
                          f"e.g. --split {example}")


SECTIONS: dict[str, type] = {"model": ModelConfig, "data": DataConfig, "parallel": ParallelConfig,
                             "launch": LaunchConfig, "train": TrainConfig, "output": OutputConfig}


def flag_of(f: dataclasses.Field) -> str:
    """The command-line flag of a field: `--n-layer` for model.n_layer, unless named."""
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def key_of(f: dataclasses.Field) -> str:
    """The field's name in TOML and in messages: its flag's (`microbatches` for --microbatches)."""
    return flag_of(f)[2:].replace("-", "_")


def field_type(cls: type, name: str) -> tuple[type, bool]:
    """(base type, whether None is allowed) of a field."""
    hint = typing.get_type_hints(cls)[name]
    args = typing.get_args(hint)
    if args:  # X | None
        return next(a for a in args if a is not type(None)), True
    return hint, False


def _check_fields(obj: Any, section: str) -> None:
    """Check each field's range and choices; the one place these messages are made."""
    for f in dataclasses.fields(obj):
        value, meta = getattr(obj, f.name), f.metadata
        if value is None:
            continue
        where, flag = f"{section}.{key_of(f)} = {value!r}", flag_of(f)
        if meta.get("choices") and value not in meta["choices"]:
            allowed = ", ".join(map(str, meta["choices"]))
            raise ConfigError(f"invalid {where}: must be one of {allowed} ({flag})")
        lo, hi = meta.get("min"), meta.get("max")
        above = None if lo is None else f"> {lo}" if meta.get("min_open") else f">= {lo}"
        below = None if hi is None else f"<= {hi}"
        # Every float, bounded or not: NaN compares false both ways, and inf is no learning rate or timeout.
        if isinstance(value, float) and not math.isfinite(value):
            bounds = " and ".join(b for b in (above, below) if b)
            raise ConfigError(f"invalid {where}: must be a finite number{' ' + bounds if bounds else ''} ({flag})")
        if lo is not None and (value < lo or (meta.get("min_open") and value == lo)):
            raise ConfigError(f"invalid {where}: must be {above} ({flag})")
        if hi is not None and value > hi:
            raise ConfigError(f"invalid {where}: must be {below} ({flag})")
