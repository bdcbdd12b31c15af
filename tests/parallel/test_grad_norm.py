import torch
from torch.utils._python_dispatch import TorchDispatchMode

from plait.engine import Engine
from plait.model import GPTConfig, build_gpt, gpt_loss
from plait.parallel.grad_norm import scale_, squared_norm


class CountOps(TorchDispatchMode):
    """Every aten operator the code inside runs: what a GPU would launch, one kernel or more each."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def _tensors():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(5, 3, generator=g), torch.randn(7, generator=g).double(),
            torch.randn(4, 4, generator=g).bfloat16(), torch.randn(11, generator=g)]


def test_squared_norm_is_the_sum_of_squares_over_mixed_dtypes():
    tensors = _tensors()
    expected = sum(t.double().pow(2).sum() for t in tensors)
    got = squared_norm(tensors, torch.device("cpu"))
    assert got.dtype == torch.float64 and got.shape == ()
    assert abs(got.item() - expected.item()) <= 1e-6 * expected.item()
    assert squared_norm([], torch.device("cpu")).item() == 0.0


def test_scale_multiplies_each_tensor_in_its_own_dtype():
    tensors = _tensors()
    before = [t.clone() for t in tensors]
    scale_(tensors, torch.tensor(0.25, dtype=torch.float64))
    for t, b in zip(tensors, before):
        assert t.dtype == b.dtype and torch.equal(t, b * 0.25)


def _norm_and_clip_ops(n_layer):
    cfg = GPTConfig(vocab_size=61, block_size=8, n_layer=n_layer, n_head=2, n_embd=16)
    engine = Engine(build_gpt(cfg, seed=0), gpt_loss)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 61, (4, 8), generator=g)
    with CountOps() as counted:
        engine.train_step(x, torch.roll(x, -1, dims=1))
        engine.clip_grad_norm_(1e-3)
    with CountOps() as forward_backward:  # the step alone, for the part the norm and clip add
        engine.executor.run(engine.train_actions, engine.train_plan, [x], [torch.roll(x, -1, dims=1)],
                            loss_scale=1.0)
    return len(counted.ops) - len(forward_backward.ops), sum(p.numel() > 0 for p in engine.parameters())


def test_the_norm_and_clipping_run_as_many_operators_for_any_number_of_parameters():
    # [Note: grouped norm] 12 more layers add 144 parameters and not one operator: one grouped
    # norm and one grouped multiply, not a few small kernels per parameter.
    small, small_params = _norm_and_clip_ops(2)
    large, large_params = _norm_and_clip_ops(14)
    assert large_params - small_params == 12 * 12
    assert small == large, (small, large)
    assert small < small_params, (small, small_params)
