"""Exporting a trained run: one plait safetensors file, or a Hugging Face GPT-2 folder.

Both read the run's newest complete checkpoint (checksums verified) and its
`config.toml`. Both write under a temporary name and rename into place, so an
interrupted export leaves nothing that looks finished. Neither writes over an
existing file or folder unless asked to (`force`, --force).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from plait.checkpoint import load_model, newest_intact, unique_tensors
from plait.config_file import load_config
from plait.data.tokenizer import EOT, byte_tokenizer
from plait.errors import ConfigError
from plait.fsync import follow_umask, fsync
from plait.model.gpt import GPTConfig, build_gpt

# What export_hf writes: --force replaces a folder holding these only, never one with anything else in it.
HF_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")

# Weights of nn.Linear in plait and of Conv1D in Hugging Face: stored transposed there.
_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def _read_run(run_dir: str | Path):
    """(run config, GPTConfig, model state with tied aliases) of the run's newest checkpoint."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.toml").is_file():
        raise ConfigError(f"{run_dir}: no config.toml there; give the directory of a plait run")
    ckpt = newest_intact(run_dir)
    if ckpt is None:
        raise ConfigError(f"{run_dir}: no complete checkpoint in {run_dir / 'checkpoints'}; "
                          f"train the run until it saves one, or give another run")
    cfg = load_config(run_dir / "config.toml")
    # On the CPU whatever device trained it, and only the model's files: newest_intact has
    # just checked every checksum, and the optimizer state is not needed.
    state = load_model(ckpt, verify=False)
    # The weights, not the config, know the vocabulary: it was fixed by the tokenizer at training time.
    # Rows as saved, padded or not ([Note: padded vocabulary]): a run from before padding has none.
    gpt = dataclasses.replace(cfg.model, vocab_multiple=1).gpt(state["0.wte.weight"].shape[0])
    expected = nn.Sequential(*build_gpt(gpt, device="meta")).state_dict()
    got = {k: tuple(v.shape) for k, v in state.items()}
    if got != {k: tuple(v.shape) for k, v in expected.items()}:
        raise ConfigError(f"{ckpt}: its weights do not match the model in {run_dir / 'config.toml'}; "
                          f"the run's config was edited after training, restore it")
    return cfg, gpt, state


def export_safetensors(run_dir: str | Path, out_file: str | Path, force: bool = False) -> Path:
    """Write the newest checkpoint's whole model to one safetensors file; returns its path.

    Keys are those of `nn.Sequential(*layers).state_dict()`; a tied weight is
    stored once and listed under the metadata's "tied" (alias -> key), with
    the GPTConfig as JSON under "config". Read it back with `load_exported`.
    An existing file is refused, or with `force` replaced whole.
    """
    out_file = Path(out_file)
    if out_file.is_dir():
        raise ConfigError(f"{out_file} is a folder; give a file name such as model.safetensors")
    if out_file.exists() and not force:
        raise ConfigError(f"{out_file} exists; give --force to replace it, or a new file name")
    _, gpt, state = _read_run(run_dir)
    tensors, aliases = unique_tensors(state)
    metadata = {"format": "plait", "config": json.dumps(dataclasses.asdict(gpt)), "tied": json.dumps(aliases)}
    out_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_file.with_name(f".{out_file.name}.tmp-{os.getpid()}")
    try:
        save_file(tensors, tmp, metadata=metadata)
        follow_umask(tmp)
        fsync(tmp)
        os.replace(tmp, out_file)
    finally:
        tmp.unlink(missing_ok=True)
    fsync(out_file.parent)
    return out_file


def load_exported(path: str | Path, device: torch.device | str = "cpu") -> list[nn.Module]:
    """Rebuild the layer list `[Embedding, Block * n_layer, Head]` from an `export_safetensors` file."""
    with safe_open(str(path), framework="pt", device=str(device)) as fh:
        metadata = fh.metadata() or {}
        if metadata.get("format") != "plait":
            raise ConfigError(f"{path} is not a plait export; give a file written by `plait export`")
        state = {k: fh.get_tensor(k) for k in fh.keys()}
    gpt = GPTConfig(**json.loads(metadata["config"]))
    for alias, key in json.loads(metadata["tied"]).items():
        state[alias] = state[key]
    # Built on the meta device and then given the file's tensors: no throwaway random initialisation.
    layers = build_gpt(gpt, device="meta")
    nn.Sequential(*layers).load_state_dict(state, strict=True, assign=True)
    if gpt.tie_embeddings:  # assign wraps each key in its own Parameter; make the head share again
        layers[-1].lm_head.weight = layers[0].wte.weight
    return layers


def _hf_state(gpt: GPTConfig, state: dict[str, torch.Tensor], vocab: int) -> dict[str, torch.Tensor]:
    """plait's keys and layouts -> Hugging Face GPT2LMHeadModel's, with the tokenizer's `vocab`
    rows of the embedding and LM head (a padded model's extra rows are no token)."""
    head = gpt.n_layer + 1
    out = {}
    for key, t in state.items():
        index, name = key.split(".", 1)
        i = int(index)
        if name == "lm_head.weight" and gpt.tie_embeddings:
            continue  # Hugging Face ties lm_head to wte itself and expects no lm_head key in the file
        if i in (0, head):
            hf = name if name == "lm_head.weight" else f"transformer.{name}"
            t = t[:vocab] if name in ("wte.weight", "lm_head.weight") else t
        else:
            hf = f"transformer.h.{i - 1}.{name}"
            t = t.t() if name in _CONV1D else t
        out[hf] = t.detach().contiguous().cpu()
    return out


def _hf_config(gpt: GPTConfig, vocab: int, eot_id: int, dtype: torch.dtype) -> dict:
    return {
        "model_type": "gpt2",
        "architectures": ["GPT2LMHeadModel"],
        "vocab_size": vocab,
        "n_positions": gpt.block_size,
        "n_ctx": gpt.block_size,
        "n_embd": gpt.n_embd,
        "n_layer": gpt.n_layer,
        "n_head": gpt.n_head,
        "n_inner": None,  # 4 * n_embd, as plait's MLP
        "activation_function": "gelu_new",  # the tanh GELU plait uses
        "layer_norm_epsilon": gpt.layer_norm_eps,
        "resid_pdrop": gpt.dropout,
        "embd_pdrop": gpt.dropout,
        "attn_pdrop": gpt.dropout,
        "tie_word_embeddings": gpt.tie_embeddings,
        "bos_token_id": eot_id,
        "eos_token_id": eot_id,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }


def export_hf(run_dir: str | Path, out_dir: str | Path, log: Callable[[str], None] = print,
              force: bool = False) -> Path:
    """Write a folder that `transformers.GPT2LMHeadModel.from_pretrained` loads; returns it.

    It holds `config.json`, `model.safetensors` (Hugging Face names, Conv1D
    weights transposed) and, for a BPE run, `tokenizer.json` and
    `tokenizer_config.json` for `PreTrainedTokenizerFast`/`AutoTokenizer`.
    plait's byte tokenizer has no Hugging Face form: no tokenizer files are
    written and `log` says so. `out_dir` must not exist or be empty; with
    `force` it may also be an earlier export (only files named in HF_FILES),
    which is replaced whole.
    """
    out_dir = Path(out_dir)
    if out_dir.is_file():
        raise ConfigError(f"{out_dir} is a file; give a new or empty folder")
    held = sorted(p.name for p in out_dir.iterdir()) if out_dir.is_dir() else []
    if held and not force:
        raise ConfigError(f"{out_dir} exists and is not empty; give a new or empty folder, or --force to replace it")
    if others := [name for name in held if name not in HF_FILES]:
        # --force replaces what an export wrote; it is no licence to delete a folder of other things.
        raise ConfigError(f"{out_dir} holds files an export does not write ({', '.join(others[:3])}"
                          f"{', ...' if len(others) > 3 else ''}); --force replaces only an earlier export, "
                          f"give a new or empty folder")
    cfg, gpt, state = _read_run(run_dir)
    hf_tokenizer = None
    eot_id, eot_name = byte_tokenizer().eot_id, EOT
    vocab = byte_tokenizer().vocab_size
    if cfg.data.tokenizer != "byte":
        from plait.data.corpus import prepare  # loads the run's prepared tokenizer; prepares again only if it is gone

        d = cfg.data
        data = prepare(d.data, d.data_dir, **d.prepare_options())
        vocab = data.tokenizer.vocab_size
        if gpt.vocab_size not in (vocab, cfg.model.gpt(vocab).vocab_size):  # unpadded: saved before padding
            raise ConfigError(f"the tokenizer in {data.dir} has {vocab} tokens, the model "
                              f"{gpt.vocab_size}; the run's data changed since training, restore it")
        eot_id, eot_name = data.tokenizer.eot_id, data.tokenizer.eot
        if data.tokenizer.kind != "byte":  # a prepared folder given as --data may hold the byte tokenizer
            hf_tokenizer = json.loads((data.dir / "tokenizer.json").read_text(encoding="utf-8"))["huggingface"]
    tensors = _hf_state(gpt, state, vocab)
    dtype = next(iter(tensors.values())).dtype

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        # Hugging Face refuses a safetensors file whose metadata does not say "pt".
        save_file(tensors, tmp / "model.safetensors", metadata={"format": "pt"})
        follow_umask(tmp / "model.safetensors")
        files = {"config.json": _hf_config(gpt, vocab, eot_id, dtype)}
        if hf_tokenizer is not None:
            files["tokenizer.json"] = hf_tokenizer
            files["tokenizer_config.json"] = {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": eot_name, "eos_token": eot_name, "unk_token": eot_name,
                "model_max_length": gpt.block_size,
                "clean_up_tokenization_spaces": False,  # plait decodes text exactly as it was
            }
        for name, obj in files.items():
            (tmp / name).write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        for path in tmp.iterdir():
            fsync(path)
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        if held:  # --force: a rename cannot land on a folder that is not empty; move the old export aside
            os.replace(out_dir, old)
        os.replace(tmp, out_dir)  # onto a missing or empty folder: both are allowed
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)
    fsync(out_dir.parent)
    if hf_tokenizer is None:
        log(f"{out_dir}: no tokenizer files written; plait's byte tokenizer (ids 0-255 are UTF-8 bytes, "
            f"{eot_id} is <|endoftext|>) has no Hugging Face form")
    return out_dir

