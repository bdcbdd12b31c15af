import pytest
import torch

from plait.optimizer_names import SlicedState


def _parts():
    """A 2 x 3 parameter's AdamW state saved by three dp ranks: elements [0, 2), [2, 5), [5, 6)."""
    whole = torch.arange(6.0)
    step = torch.tensor(4.0)
    return whole, [(lo, hi, {"exp_avg": whole[lo:hi].clone(), "exp_avg_sq": -whole[lo:hi], "step": step})
                   for lo, hi in ((2, 5), (0, 2), (5, 6))]  # in any order, as files are read


def test_a_slice_is_copied_from_the_parts_it_overlaps():
    whole, parts = _parts()
    state = SlicedState((2, 3), parts)
    got = state.slice(1, 4)  # a rank of another dp: from two of the parts
    assert torch.equal(got["exp_avg"], whole[1:4]) and torch.equal(got["exp_avg_sq"], -whole[1:4])
    assert got["step"] == 4.0 and got["step"] is not parts[0][2]["step"]
    got["exp_avg"][0] = 99.0  # a copy: the saved parts (a mapped file) are left alone
    assert parts[1][2]["exp_avg"][1] == 1.0


def test_whole_is_the_parameters_state_in_its_shape():
    whole, parts = _parts()
    got = SlicedState((2, 3), parts).whole()
    assert torch.equal(got["exp_avg"], whole.view(2, 3)) and torch.equal(got["exp_avg_sq"], -whole.view(2, 3))
    assert got["step"] == 4.0


def test_a_slice_the_parts_do_not_cover_is_an_error():
    _, parts = _parts()
    with pytest.raises(ValueError) as e:
        SlicedState((2, 3), parts[:2]).whole()
    assert str(e.value) == "the saved slices cover 5 of elements [0, 6) of a parameter's state"
