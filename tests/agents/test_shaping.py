"""The rollout's shaping of finished episodes (toolgrpo.agents.shaping) against hand-computed values."""

import numpy as np
import pytest

from toolgrpo.agents.shaping import keeps_loss, overlong_penalty, void_turn


def test_void_turn_is_neither_a_complete_call_nor_an_answer():
    assert not void_turn(cut=False, parse_failure=False, final_without_answer=False)
    assert void_turn(cut=True, parse_failure=False, final_without_answer=False)
    assert void_turn(cut=False, parse_failure=True, final_without_answer=False)
    assert void_turn(cut=False, parse_failure=False, final_without_answer=True)


def test_keeps_loss_by_hand():
    truncated = [None, "context", "turns", "crashed", None]
    void = [0, 0, 0, 0, 2]
    cases = {
        (False, "none"): [1, 1, 1, 0, 1],  # crashed rows never keep their loss
        (True, "none"): [1, 1, 1, 0, 0],
        (False, "context"): [1, 0, 1, 0, 1],
        (False, "all"): [1, 0, 0, 0, 1],
        (True, "all"): [1, 0, 0, 0, 0],
    }
    for (mask_void, mask_truncated), expect in cases.items():
        got = keeps_loss(truncated, void, mask_void, mask_truncated)
        assert got.tolist() == [bool(x) for x in expect], (mask_void, mask_truncated)
    with pytest.raises(ValueError, match="mask_truncated"):
        keeps_loss(truncated, void, mask_truncated="overlong")


def test_overlong_penalty_by_hand():
    """DAPO eq. 13 with L_max 100, L_cache 20: 0 up to 80, then linear to -1 at 100, -1 past."""
    lengths = np.array([10, 80, 81, 90, 100, 101])
    expect = np.where(lengths <= 80, 0.0, np.where(lengths <= 100, (80 - lengths) / 20, -1.0))
    np.testing.assert_allclose(expect, [0, 0, -0.05, -0.5, -1, -1])
    got = [overlong_penalty(int(n), 100, 20) for n in lengths]
    np.testing.assert_allclose(got, expect)
    np.testing.assert_allclose(
        [overlong_penalty(int(n), 100, 20, 0.5) for n in lengths], expect / 2
    )
    assert overlong_penalty(10**6, 100, 0) == 0.0  # buffer 0: off
