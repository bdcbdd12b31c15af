"""GPT-2, written as an ordered list of layers.

The list is `[Embedding, Block 0, ..., Block N-1, Head]`; every layer takes one
tensor and returns one tensor, so any contiguous run of layers is a valid
pipeline stage and `nn.Sequential(*layers)` is the whole model. Names of
parameters follow Hugging Face's `GPT2LMHeadModel` one-to-one (wte, wpe, ln_1,
attn.c_attn, attn.c_proj, ln_2, mlp.c_fc, mlp.c_proj, ln_f, lm_head), except
that Hugging Face stores linear weights transposed (Conv1D).

The model knows nothing about parallelism.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from plait.model_shape import PRESETS, GPTConfig  # noqa: F401 - public here too


class Embedding(nn.Module):
    """Token plus learned position embedding: (B, T) ids -> (B, T, C)."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        T = idx.size(1)
        pos = torch.arange(T, device=idx.device)
        return self.drop(self.wte(idx) + self.wpe(pos))  # (B, T, C)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.dropout = cfg.dropout
        self.resid_drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        # (B, T, C) -> (B, nh, T, hs)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0
        )
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_drop(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd)
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # GPT-2 uses the tanh approximation of GELU ("gelu_new" in Hugging Face).
        return self.drop(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class Block(nn.Module):
    """A pre-LayerNorm transformer block: (B, T, C) -> (B, T, C)."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_eps)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class Head(nn.Module):
    """Final LayerNorm and the LM head: (B, T, C) -> logits (B, T, V).

    [Note: tied embeddings] With `tie_embeddings`, `lm_head.weight` is the very
    Parameter of the Embedding's `wte.weight` when both layers live in one
    process. A pipeline that puts them on different ranks keeps two copies and
    must keep them equal itself (sum their gradients), as Megatron-LM does.
    """

    def __init__(self, cfg: GPTConfig, tied_to: Embedding | None = None):
        super().__init__()
        self.ln_f = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_eps)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if tied_to is not None:
            self.lm_head.weight = tied_to.wte.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.ln_f(x))


def _normal_(p: torch.Tensor, std: float, generator: torch.Generator) -> None:
    """Draw N(0, std) into p as build_gpt draws it: in the default dtype, then cast.

    A layer converted to another dtype on the meta device (float64 for exactness
    tests) must get build_gpt's float32 draws upcast, not a float64 draw.
    """
    dtype = torch.get_default_dtype()
    if p.dtype == dtype:
        p.normal_(0.0, std, generator=generator)
    else:
        p.copy_(torch.empty(p.shape, dtype=dtype, device=p.device).normal_(0.0, std, generator=generator))


@torch.no_grad()
def _init_layer(layer: nn.Module, cfg: GPTConfig, generator: torch.Generator) -> None:
    """GPT-2's initialisation: N(0, 0.02), residual projections scaled by 1/sqrt(2 N)."""
    for name, p in layer.named_parameters():
        if name.endswith("c_proj.weight"):
            _normal_(p, 0.02 / math.sqrt(2 * cfg.n_layer), generator)
        elif name.startswith("ln") or name.endswith("bias"):
            continue  # LayerNorm keeps its ones and zeros; biases are zeroed below
        else:
            _normal_(p, 0.02, generator)
    for m in layer.modules():
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)


def _layer_generator(seed: int, index: int, device: torch.device) -> torch.Generator:
    """Layer `index`'s own generator: its values do not depend on which other layers exist."""
    return torch.Generator(device=device).manual_seed(seed * 1_000_003 + index)


@torch.no_grad()
def init_gpt_layer(index: int, layer: nn.Module, cfg: GPTConfig, seed: int = 0) -> None:
    """Give layer `index` of a GPT the values `build_gpt(cfg, seed)` gives it, on its own device.

    Everything the layer holds is set, LayerNorm's ones and zeros included, so a
    layer fresh from `to_empty` (garbage memory) is fully initialised. A tied
    Head (`tie_embeddings`) gets the Embedding's token-embedding values: the copy
    a pipeline's last stage holds starts equal to the first stage's
    ([Note: tied embeddings]).
    """
    device = next(layer.parameters()).device
    for m in layer.modules():
        if isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    _init_layer(layer, cfg, _layer_generator(seed, index, device))
    if cfg.tie_embeddings and isinstance(layer, Head):
        # wte.weight is the Embedding's first parameter, so its values are the first
        # draw from layer 0's generator.
        _normal_(layer.lm_head.weight, 0.02, _layer_generator(seed, 0, device))


def build_gpt(cfg: GPTConfig, seed: int = 0, device: torch.device | str | None = None) -> list[nn.Module]:
    """Build the layer list `[Embedding, Block * n_layer, Head]`, initialised from `seed`.

    Each layer is initialised from its own generator, seeded by (seed, layer
    index), so a layer's initial values do not depend on which other layers
    are built: a pipeline rank gets the same numbers as one process would.
    """
    device = torch.device(device) if device is not None else torch.device("cpu")
    with device:  # build in place: no CPU copy of a large model first
        layers: list[nn.Module] = [Embedding(cfg)]
        layers += [Block(cfg) for _ in range(cfg.n_layer)]
        # The head is initialised before it is tied, so an untied head gets its own values.
        layers.append(Head(cfg))
    if device.type != "meta":  # meta tensors have no values: see plait.model.materialize
        for index, layer in enumerate(layers):
            _init_layer(layer, cfg, _layer_generator(seed, index, device))
    if cfg.tie_embeddings:
        layers[-1].lm_head.weight = layers[0].wte.weight
    return layers


def gpt_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over every position: logits (B, T, V), targets (B, T)."""
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()  # the softmax of a large vocabulary needs float32's range
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def count_params(layers: list[nn.Module]) -> int:
    """Number of distinct parameters (a tied weight counts once)."""
    seen = {id(p): p.numel() for layer in layers for p in layer.parameters()}
    return sum(seen.values())


def flops_per_token(cfg: GPTConfig, seq_len: int | None = None) -> int:
    """Training FLOPs per token (forward + backward), as in the PaLM appendix.

    6 x (parameters that take part in matrix multiplies) + 12 x n_layer x n_embd x T
    for attention scores and values. Embedding lookups are not multiplies; the
    LM head is, tied or not.
    """
    T = seq_len or cfg.block_size
    C, L = cfg.n_embd, cfg.n_layer
    matmul_params = L * 12 * C * C + C * cfg.vocab_size
    return 6 * matmul_params + 12 * L * C * T


def sample_next(logits: torch.Tensor, temperature: float = 0.8, top_k: int | None = 40,
                generator: torch.Generator | None = None, vocab: int | None = None) -> torch.Tensor:
    """One token per row from the last position's logits (B, V): (B, 1) ids, below `vocab`
    if given (a padded model's extra rows are no token)."""
    logits = logits[:, :vocab].float() / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = F.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)


@torch.no_grad()
def generate(
    model: nn.Module,
    idx: torch.Tensor,
    max_new_tokens: int,
    block_size: int,
    temperature: float = 0.8,
    top_k: int | None = 40,
    generator: torch.Generator | None = None,
    vocab: int | None = None,
) -> torch.Tensor:
    """Sample `max_new_tokens` continuations of idx (B, T); returns (B, T + new).

    `vocab`: the tokenizer's size, when the model's vocabulary is padded past it.
    A pipeline samples the same way through `Engine.generate`.
    """
    for _ in range(max_new_tokens):
        logits = model(idx[:, -block_size:])[:, -1, :]  # (B, V)
        idx = torch.cat([idx, sample_next(logits, temperature, top_k, generator, vocab)], dim=1)
    return idx
