"""The helpers every stage shares (muse.arrays, muse.configs, muse.simtier): one copy, so their edge
cases are pinned here once."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

from muse.arrays import check_k, l2_normalise, lookup, lookup_sorted
from muse.configs import config_from_dict
from muse.errors import ConfigurationError


def test_lookup_sorted_positions_and_found() -> None:
    pos, found = lookup_sorted(np.array([2, 5, 9]), np.array([5, 1, 9, 10, 2]))
    assert found.tolist() == [True, False, True, False, True]
    assert pos[found].tolist() == [1, 2, 0]
    assert pos.dtype == np.int64 and ((pos >= 0) & (pos < 3)).all()  # absent ids still index safely


def test_lookup_sorted_on_an_empty_table() -> None:
    pos, found = lookup_sorted(np.zeros(0, np.int64), np.array([1, 2]))
    assert pos.tolist() == [0, 0] and not found.any()


def test_lookup_any_order_table() -> None:
    assert lookup(np.array([30, 10, 20]), np.array([20, 40, 30, 10])).tolist() == [2, -1, 0, 1]
    assert lookup(np.zeros(0, np.int64), np.array([1])).tolist() == [-1]


def test_l2_normalise_keeps_zero_rows_and_huge_directions() -> None:
    v = np.array([[3.0, 4.0], [0.0, 0.0], [1e30, 1e30]], dtype=np.float32)
    out = l2_normalise(v)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [[0.6, 0.8], [0.0, 0.0], [2**-0.5, 2**-0.5]], rtol=1e-6)
    np.testing.assert_allclose(l2_normalise(np.array([0.0, 2.0])), [0.0, 1.0])  # one vector too


@pytest.mark.parametrize("k", [0, -3, 2.5, True, "5", None])
def test_check_k_refuses_with_a_configuration_error(k: object) -> None:
    with pytest.raises(ConfigurationError, match="k must be a positive integer"):
        check_k(k)


def test_check_k_bounds_and_types() -> None:
    assert check_k(np.int64(7)) == 7 and type(check_k(np.int64(7))) is int
    assert check_k(16384, 16384) == 16384
    with pytest.raises(ValueError, match=r"k must be an integer in 1\.\.16384, got 16385"):
        check_k(16385, 16384)


@dataclass(frozen=True)
class _Cfg:
    a: int = 1
    b: str = "x"


def test_config_from_dict_drop_none_keeps_defaults_but_still_rejects_unknown_keys() -> None:
    assert config_from_dict(_Cfg, {"a": None, "b": "y"}, drop_none=True) == _Cfg(1, "y")
    assert config_from_dict(_Cfg, {"b": None}).b is None  # without drop_none a None is a value
    with pytest.raises(ConfigurationError, match=r"unknown _Cfg keys \['c'\]"):
        config_from_dict(_Cfg, {"c": None}, drop_none=True)


def test_one_n_tiers_for_retriever_and_ranker() -> None:
    from muse.simtier import N_TIERS
    from ranker.layers.simtier import SimTier
    from ranker.models.config import ModelConfig
    from retriever import kernels

    assert kernels.N_TIERS is N_TIERS and SimTier().n_tiers == N_TIERS and ModelConfig().n_tiers == N_TIERS
