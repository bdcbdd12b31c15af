import itertools
import math
import random

import pytest
import torch

from plait.errors import ConfigError
from plait.model import GPTConfig, build_gpt
from plait.parallel.partition import METHODS, STAGE_SLACK, Partition, balanced_cuts, layer_costs, partition
from plait.parallel.schedule import stage_rank

CFG = GPTConfig(vocab_size=97, block_size=16, n_layer=3, n_head=2, n_embd=16)
NAMES = ["embedding", "block 0", "block 1", "block 2", "head"]
# By hand, C = 16, V = 97, T = 16:
EMBEDDING = 97 * 16 + 16 * 16  # wte + wpe
BLOCK = 12 * 16 * 16 + 13 * 16  # c_attn, c_proj, c_fc, c_proj weights; their biases; two LayerNorms
HEAD = 2 * 16 + 97 * 16  # ln_f + the tied lm_head (the Embedding's wte), counted here too
TOO_MANY = "cannot cut 5 layers into 6 stages; lower --pp (or --virtual-stages) or raise --n-layer"


def brute_force(costs, k):
    """The best split by exhaustion, with balanced_cuts's tie rule spelled out."""
    n = len(costs)
    best = None
    for inner in itertools.combinations(range(1, n), k - 1):
        bounds = (0, *inner, n)
        stage = tuple(math.fsum(costs[a:b]) for a, b in zip(bounds, bounds[1:]))
        key = (max(stage), stage, bounds)
        best = key if best is None or key < best else best
    return list(best[2]), best[0]


def stage_max(costs, bounds):
    return max(math.fsum(costs[a:b]) for a, b in zip(bounds, bounds[1:]))


@pytest.mark.parametrize(
    "costs, k, bounds",
    [
        ([1, 1, 1, 1], 2, [0, 2, 4]),
        ([5, 1, 1, 1, 1, 1], 2, [0, 1, 6]),
        ([1] * 6, 4, [0, 1, 2, 4, 6]),  # ties: the lighter stages come first
        ([1] * 6, 6, [0, 1, 2, 3, 4, 5, 6]),
        ([3, 1, 2], 1, [0, 3]),
        ([1, 0, 1], 2, [0, 1, 3]),  # a zero-cost layer goes to the later stage
        ([0, 0, 0, 9], 2, [0, 1, 4]),
        ([2, 9, 2, 2, 2, 2], 3, [0, 1, 2, 6]),
    ],
)
def test_balanced_cuts_hand_cases(costs, k, bounds):
    assert balanced_cuts(costs, k) == bounds


def test_balanced_cuts_matches_brute_force():
    rng = random.Random(1234)
    cases = 0
    for trial in range(150):
        n = rng.randint(1, 8)
        if trial % 2:
            costs = [rng.randint(0, 3) for _ in range(n)]  # small integers: many ties
        else:
            costs = [rng.uniform(0.0, 10.0) for _ in range(n)]
        for k in range(1, n + 1):
            got = balanced_cuts(costs, k)
            want, optimum = brute_force(costs, k)
            assert len(got) == k + 1 and got[0] == 0 and got[-1] == n
            assert all(a < b for a, b in zip(got, got[1:]))  # no empty stage
            assert stage_max(costs, got) == optimum
            assert got == want
            cases += 1
    assert cases > 300


def brute_force_ranks(costs, k, ranks):
    """The rank-balanced split by exhaustion, with _rank_balanced's rule spelled out: among the
    splits whose largest stage is within STAGE_SLACK of the smallest possible, the least largest
    rank load, then the least largest stage, the lighter stages first, the earlier cuts."""
    n, limit = len(costs), brute_force(costs, k)[1] * (1 + STAGE_SLACK)
    best = None
    for inner in itertools.combinations(range(1, n), k - 1):
        bounds = (0, *inner, n)
        stage = tuple(math.fsum(costs[a:b]) for a, b in zip(bounds, bounds[1:]))
        if max(stage) > limit:
            continue
        load = max(math.fsum(c for c, r in zip(stage, ranks) if r == q) for q in set(ranks))
        key = (load, max(stage), stage, bounds)
        best = key if best is None or key < best else best
    return list(best[3])


def test_a_rank_holding_two_stages_gets_its_share():
    """The benchmark GPT's shape (embedding, 5 blocks, head, the head a little under a block) in
    zbv's V on 2 ranks (stages 0 and 3 on rank 0): stage by stage the best cut is
    embedding | 2 blocks | 2 blocks | block + head, which leaves rank 0 a block and a bit against
    rank 1's 4 blocks; by rank, 3 against 3 with the same largest stage (2 blocks)."""
    costs = [0.125, 1, 1, 1, 1, 1, 0.875]
    v = [stage_rank(s, 2, "v") for s in range(4)]
    assert v == [0, 1, 1, 0]
    assert balanced_cuts(costs, 4) == [0, 1, 3, 5, 7]
    assert balanced_cuts(costs, 4, v) == [0, 2, 3, 5, 7]
    assert stage_max(costs, [0, 2, 3, 5, 7]) == stage_max(costs, [0, 1, 3, 5, 7]) == 2
    # One stage per rank, or no ranks given: the stage-by-stage cut.
    assert balanced_cuts(costs, 4, [0, 1, 2, 3]) == balanced_cuts(costs, 4)
    with pytest.raises(ValueError, match=r"^3 ranks for 4 stages$"):
        balanced_cuts(costs, 4, [0, 1, 1])


def test_rank_balanced_cuts_match_brute_force():
    rng = random.Random(4321)
    cases = 0
    for trial in range(120):
        n = rng.randint(2, 9)
        costs = ([rng.randint(0, 3) for _ in range(n)] if trial % 2 else [rng.uniform(0.0, 10.0) for _ in range(n)])
        for pp in (2, 3):
            for layout in ("loop", "v"):
                k = 2 * pp
                if k > n:
                    continue
                ranks = [stage_rank(s, pp, layout) for s in range(k)]
                assert balanced_cuts(costs, k, ranks) == brute_force_ranks(costs, k, ranks), (costs, pp, layout)
                cases += 1
    assert cases > 200


def test_balanced_cuts_errors():
    with pytest.raises(ConfigError) as e:
        balanced_cuts([1.0] * 5, 6)
    assert str(e.value) == TOO_MANY
    with pytest.raises(ValueError):
        balanced_cuts([1.0, -1.0], 2)
    with pytest.raises(ValueError):
        balanced_cuts([1.0, float("nan")], 2)
    with pytest.raises(ValueError):
        balanced_cuts([1.0], 0)


def test_layer_costs_uniform_and_params():
    layers = build_gpt(CFG, seed=0)
    assert layer_costs(layers, "uniform") == [1.0] * 5
    assert layer_costs(layers, "params") == [EMBEDDING, BLOCK, BLOCK, BLOCK, HEAD]
    assert [EMBEDDING, BLOCK, HEAD] == [1808, 3280, 1584]
    untied = build_gpt(GPTConfig(**{**CFG.__dict__, "tie_embeddings": False}), seed=0)
    assert layer_costs(untied, "params") == [EMBEDDING, BLOCK, BLOCK, BLOCK, HEAD]


def test_layer_costs_profile_has_no_side_effects():
    cfg = GPTConfig(vocab_size=97, block_size=16, n_layer=3, n_head=2, n_embd=16, dropout=0.1)
    layers = build_gpt(cfg, seed=0)
    params = {id(p): p for layer in layers for p in layer.parameters()}.values()
    before = [p.detach().clone() for p in params]
    wpe = layers[0].wpe.weight
    wpe.grad = torch.full_like(wpe, 7.0)  # a gradient already there must survive
    rng = torch.get_rng_state()
    x = torch.randint(0, cfg.vocab_size, (2, 8), generator=torch.Generator().manual_seed(0))

    seconds = layer_costs(layers, "profile", sample_input=x, repeats=2)

    assert len(seconds) == 5
    assert all(isinstance(s, float) and s > 0 for s in seconds)
    assert all(torch.equal(a, p) for a, p in zip(before, params))
    assert all(p.grad is None for p in params if p is not wpe)
    assert torch.equal(wpe.grad, torch.full_like(wpe, 7.0))
    assert torch.equal(torch.get_rng_state(), rng)
    with pytest.raises(ValueError):
        layer_costs(layers, "profile")


def test_partition_uniform_params_manual():
    layers = build_gpt(CFG, seed=0)
    p = partition(layers, 2)
    assert p == Partition(bounds=(0, 2, 5), costs=(1.0,) * 5, method="uniform")
    assert partition(layers, 3, "uniform").bounds == (0, 1, 3, 5)
    # Params: the embedding and head are light, so the first stage takes a block too.
    p = partition(layers, 3, "params")
    assert p.bounds == (0, 2, 3, 5) and p.method == "params"
    assert p.stage_costs() == [EMBEDDING + BLOCK, BLOCK, BLOCK + HEAD]
    assert p.num_stages == 3
    assert [list(p.stage_layers(s)) for s in range(3)] == [[0, 1], [2], [3, 4]]
    assert partition(layers, 2, "params").bounds == (0, 2, 5)
    m = partition(layers, 2, "params", split=[4])
    assert m == Partition(bounds=(0, 4, 5), costs=(EMBEDDING, BLOCK, BLOCK, BLOCK, HEAD), method="manual")
    assert partition(layers, 1).bounds == (0, 5)
    assert partition(layers, 5, split=[1, 2, 3, 4]).bounds == (0, 1, 2, 3, 4, 5)


def test_partition_profile_is_a_valid_cut():
    layers = build_gpt(CFG, seed=0)
    p = partition(layers, 2, "profile", sample_input=torch.zeros(2, 8, dtype=torch.long))
    assert p.method == "profile" and len(p.costs) == 5
    assert p.bounds == tuple(balanced_cuts(p.costs, 2))


@pytest.mark.parametrize(
    "k, split, message",
    [
        (6, None, TOO_MANY),
        (6, [1, 2, 3, 4, 5], TOO_MANY),
        (2, [3, 4], "--split 3,4: 2 stages need 1 cut index, got 2"),
        (3, [2], "--split 2: 3 stages need 2 cut indices, got 1"),
        (3, [3, 2], "--split 3,2: cut indices must increase strictly, each between 1 and 4"),
        (3, [2, 2], "--split 2,2: cut indices must increase strictly, each between 1 and 4"),
        (2, [0], "--split 0: cut indices must increase strictly, each between 1 and 4"),
        (2, [5], "--split 5: cut indices must increase strictly, each between 1 and 4"),
    ],
)
def test_partition_errors(k, split, message):
    layers = build_gpt(CFG, seed=0)
    with pytest.raises(ConfigError) as e:
        partition(layers, k, split=split)
    assert str(e.value) == message


def test_unknown_method():
    layers = build_gpt(CFG, seed=0)
    message = "--partition flops: unknown method; choose one of uniform, params, profile"
    for call in (lambda: partition(layers, 2, "flops"), lambda: layer_costs(layers, "flops")):
        with pytest.raises(ConfigError) as e:
            call()
        assert str(e.value) == message
    assert METHODS == ("uniform", "params", "profile")


def test_describe():
    layers = build_gpt(CFG, seed=0)
    assert partition(layers, 3).describe(NAMES) == (
        "stage 0: embedding          (1 layer)  20.0%\n"
        "stage 1: block 0 .. block 1 (2 layers) 40.0%\n"
        "stage 2: block 2 .. head    (2 layers) 40.0%"
    )
    # 5088 / 13232 = 38.452%, 8144 / 13232 = 61.548%
    assert partition(layers, 2, "params").describe() == (
        "stage 0: layer 0 .. layer 1 (2 layers) 38.5%\n"
        "stage 1: layer 2 .. layer 4 (3 layers) 61.5%"
    )
    with pytest.raises(ValueError):
        partition(layers, 2).describe(NAMES[:4])
