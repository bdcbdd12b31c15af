"""Layers built on the meta device: each rank materialises only its own, with one process's values,
and samples through the pipeline the tokens one process samples."""

import torch
from torch import nn

import plait
from plait.model import GPTConfig, build_gpt, generate, gpt_init, gpt_loss
from tests.distributed.harness import spawn

CFG = GPTConfig(vocab_size=61, block_size=8, n_layer=4, n_head=2, n_embd=16, tie_embeddings=True)
SEED, GLOBAL_BATCH, STEPS = 3, 8, 2
# (dp, pp, schedule, virtual stages): pp=1 with dp=4, pp=2 with dp=2, interleaved, pp=4.
LAYOUTS = [(4, 1, "1f1b", 1), (2, 2, "1f1b", 1), (2, 2, "interleaved-1f1b", 2), (1, 4, "gpipe", 1)]


def meta_layers():
    layers = build_gpt(CFG, seed=SEED, device="meta")
    return [layer.to(torch.float64) for layer in layers]


def global_batch(step):
    g = torch.Generator().manual_seed(700 + step)
    x = torch.randint(0, CFG.vocab_size, (GLOBAL_BATCH, CFG.block_size), generator=g)
    return x, torch.roll(x, -1, dims=1)


def build_on_every_layout():
    out = []
    for dp, pp, schedule, virtual in LAYOUTS:
        mesh = plait.make_mesh(dp=dp, pp=pp)
        layers = meta_layers()
        engine = plait.Engine(layers, gpt_loss, mesh, schedule=schedule, microbatches=2, virtual_stages=virtual,
                              partition_method="params", init=gpt_init(CFG, SEED), device="cpu")
        state = {k: v.clone() for k, v in engine.state_dict().items()}
        # Every tensor of a layer this rank does not hold is still on the meta device.
        others_meta = all(t.is_meta for j, layer in enumerate(layers) if j not in engine.layer_ids
                          for t in (*layer.parameters(), *layer.buffers()))
        mine_real = all(not p.is_meta for p in engine.parameters())
        prompt = torch.tensor([[1, 2, 3], [4, 5, 6]])  # two rows; 12 tokens overrun block_size 8
        sampled = engine.generate(prompt, 12, CFG.block_size, generator=torch.Generator().manual_seed(9))
        trained = None
        if schedule == "interleaved-1f1b":  # the materialised tied copies train as one weight
            dp_rank = mesh["dp"].get_local_rank()
            opt = torch.optim.AdamW(engine.parameters(), lr=1e-2, weight_decay=0.1)
            for step in range(STEPS):
                x, y = global_batch(step)
                rows = slice(dp_rank * GLOBAL_BATCH // dp, (dp_rank + 1) * GLOBAL_BATCH // dp)
                engine.train_step(x[rows], y[rows])
                opt.step()
                opt.zero_grad()
            trained = {k: v.clone() for k, v in engine.state_dict().items()}
        out.append({"state": state, "layer_ids": engine.layer_ids, "others_meta": others_meta,
                    "mine_real": mine_real, "trained": trained,
                    "sampled": sampled})
    return out


def reference():
    model = nn.Sequential(*[layer.double() for layer in build_gpt(CFG, seed=SEED)])
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    sampled = generate(model.eval(), torch.tensor([[1, 2, 3], [4, 5, 6]]), 12, CFG.block_size,
                       generator=torch.Generator().manual_seed(9))
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    for step in range(STEPS):
        x, y = global_batch(step)
        gpt_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    return initial, model.state_dict(), sampled


def gather(ranks, n, field):
    state = {}
    for r in ranks:
        for key, value in r[n][field].items():
            if key in state:  # replicas and the tied copies are bit-identical
                assert torch.equal(state[key], value), (LAYOUTS[n], key)
            state[key] = value
    return state


def test_meta_build_gives_one_process_parameters_on_every_layout():
    initial, trained, sampled = reference()
    ranks = spawn(build_on_every_layout, 4, timeout=300)
    head = f"{CFG.n_layer + 1}.lm_head.weight"
    for n, (dp, pp, schedule, virtual) in enumerate(LAYOUTS):
        state = gather(ranks, n, "state")
        assert state.keys() == initial.keys()
        for key, want in initial.items():
            assert torch.equal(state[key], want), (LAYOUTS[n], key)  # bit-identical
        # The last stage's own copy of the tied head starts equal to the first stage's embedding.
        assert torch.equal(state[head], state["0.wte.weight"])
        for r in ranks:
            assert r[n]["mine_real"] and r[n]["others_meta"], LAYOUTS[n]
            # Sampled through the pipeline, on every rank: one process's tokens.
            assert torch.equal(r[n]["sampled"], sampled), LAYOUTS[n]
            if pp == 1:  # one stage: every rank holds the whole model
                assert r[n]["layer_ids"] == list(range(CFG.n_layer + 2))
        if pp > 1:  # a rank holds a part: every layer is held by exactly the ranks of one pp coordinate
            assert sorted({j for r in ranks for j in r[n]["layer_ids"]}) == list(range(CFG.n_layer + 2))
            assert all(len(r[n]["layer_ids"]) < CFG.n_layer + 2 for r in ranks)
        if schedule == "interleaved-1f1b":
            got = gather(ranks, n, "trained")
            for key, want in trained.items():
                diff = (got[key] - want).abs().max().item()
                assert diff <= 1e-9, (key, diff)
