import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from plait.data import batch_offsets, get_batch

SRC = Path(__file__).resolve().parents[2] / "src"
TOKENS = np.random.default_rng(0).integers(0, 2048, size=5000).astype(np.uint16)


def test_offsets_range_and_type():
    off = batch_offsets(3, 7, 4096, 16, 100)
    assert off.dtype == np.int64 and off.shape == (4096,)
    assert off.min() == 0 and off.max() == 100 - 16 - 1


def test_offsets_fixed_values():
    # Pinned so a change of generator or seeding, which would alter resumed runs, fails here.
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([1, 2])))
    expected = rng.integers(0, 1000 - 8, size=5, dtype=np.int64)
    assert batch_offsets(1, 2, 5, 8, 1000).tolist() == expected.tolist()


def test_identical_across_calls():
    x1, y1 = get_batch(TOKENS, 1, 5, 8, 32)
    x2, y2 = get_batch(TOKENS, 1, 5, 8, 32)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)


def test_identical_across_processes():
    code = (
        "import sys, numpy as np; from plait.data import get_batch; "
        "t = np.random.default_rng(0).integers(0, 2048, size=5000).astype(np.uint16); "
        "x, y = get_batch(t, 1, 5, 8, 32, share=1, num_shares=2); "
        "sys.stdout.buffer.write(x.numpy().tobytes() + y.numpy().tobytes())"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(SRC)},
        capture_output=True, check=True, timeout=120,
    ).stdout
    x, y = get_batch(TOKENS, 1, 5, 8, 32, share=1, num_shares=2)
    assert out == x.numpy().tobytes() + y.numpy().tobytes()


def test_shape_dtype_and_shift():
    x, y = get_batch(TOKENS, 4, 9, 6, 20)
    assert x.shape == y.shape == (6, 20)
    assert x.dtype == y.dtype == torch.long
    assert x.is_contiguous() and y.is_contiguous()
    for row, start in enumerate(batch_offsets(4, 9, 6, 20, len(TOKENS))):
        assert x[row].tolist() == TOKENS[start:start + 20].tolist()
        assert y[row].tolist() == TOKENS[start + 1:start + 21].tolist()


@pytest.mark.parametrize("num_shares", [1, 2, 4])
def test_shares_partition_the_global_batch(num_shares):
    gx, gy = get_batch(TOKENS, 2, 11, 8, 16)
    shares = [get_batch(TOKENS, 2, 11, 8, 16, share=k, num_shares=num_shares) for k in range(num_shares)]
    assert all(x.shape == (8 // num_shares, 16) for x, _ in shares)
    assert torch.equal(torch.cat([x for x, _ in shares]), gx)
    assert torch.equal(torch.cat([y for _, y in shares]), gy)
    b = 8 // num_shares
    for k, (x, y) in enumerate(shares):
        assert torch.equal(x, gx[k * b:(k + 1) * b]) and torch.equal(y, gy[k * b:(k + 1) * b])


def test_steps_and_seeds_differ():
    x0, _ = get_batch(TOKENS, 1, 0, 8, 32)
    x1, _ = get_batch(TOKENS, 1, 1, 8, 32)
    x2, _ = get_batch(TOKENS, 2, 0, 8, 32)
    assert not torch.equal(x0, x1)
    assert not torch.equal(x0, x2)


def test_works_on_a_memmap(tmp_path):
    path = tmp_path / "t.bin"
    TOKENS.tofile(path)
    mm = np.memmap(path, dtype=np.uint16, mode="r")
    x, y = get_batch(mm, 1, 3, 4, 8)
    ex, ey = get_batch(TOKENS, 1, 3, 4, 8)
    assert torch.equal(x, ex) and torch.equal(y, ey)


def test_bad_shares():
    with pytest.raises(ValueError, match="does not divide"):
        get_batch(TOKENS, 1, 0, 6, 8, num_shares=4)
    with pytest.raises(ValueError, match="does not divide"):
        get_batch(TOKENS, 1, 0, 6, 8, num_shares=0)
    with pytest.raises(ValueError, match="out of range"):
        get_batch(TOKENS, 1, 0, 6, 8, share=2, num_shares=2)
    with pytest.raises(ValueError, match="out of range"):
        get_batch(TOKENS, 1, 0, 6, 8, share=-1, num_shares=2)


def test_too_few_tokens():
    with pytest.raises(ValueError, match="cannot hold one sequence"):
        batch_offsets(0, 0, 2, 8, 8)
    assert batch_offsets(0, 0, 3, 8, 9).tolist() == [0, 0, 0]
