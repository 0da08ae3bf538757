import itertools
import logging

import pytest
import torch

from lowbit.engine.kernels import registry
from lowbit.engine.kernels import BackendUnavailable, dispatch, force_backend, use_backend

_ids = itertools.count()


def _op():
    """A fresh op name per test, so registrations and logged choices never leak between tests."""
    return f"test_op_{next(_ids)}"


def _register_pair(op, fast_reason=None):
    registry.register(op, "slow", lambda x: ("slow", x), priority={"cpu": 100, "cuda": 100})
    registry.register(op, "fast", lambda x: ("fast", x), supports=lambda x: fast_reason,
                      priority={"cpu": 1})


def test_priority_order_respected():
    op = _op()
    _register_pair(op)
    assert dispatch(op, torch.zeros(2, 3))[0] == "fast"
    assert sorted(registry.backends(op)) == ["fast", "slow"]


def test_unsupported_backend_skipped_with_reason_logged(caplog):
    op = _op()
    _register_pair(op, fast_reason="needs K % 64 == 0")
    with caplog.at_level(logging.INFO, logger="lowbit.kernels"):
        assert dispatch(op, torch.zeros(1, 3))[0] == "slow"
        dispatch(op, torch.zeros(1, 3))
    msgs = [r.getMessage() for r in caplog.records if op in r.getMessage()]
    assert len(msgs) == 1  # logged once per (op, backend, device, shape class)
    assert "backend slow" in msgs[0] and "fast: needs K % 64 == 0" in msgs[0]


def test_choice_logged_per_shape_class_and_counted(caplog):
    op = _op()
    _register_pair(op)
    with caplog.at_level(logging.INFO, logger="lowbit.kernels"):
        for rows in (1, 1, 4, 200):
            dispatch(op, torch.zeros(rows, 8))
    msgs = [r.getMessage() for r in caplog.records if op in r.getMessage()]
    assert len(msgs) == 2 and "cpu/gemv" in msgs[0] and "cpu/gemm" in msgs[1]
    assert registry.chosen()[op] == {"cpu/gemv": {"fast": 3}, "cpu/gemm": {"fast": 1}}


def test_device_absent_from_priority_is_never_auto_picked():
    op = _op()
    registry.register(op, "cuda-only", lambda x: "cuda-only", priority={"cuda": 0})
    with pytest.raises(BackendUnavailable, match="no backend is registered for this device"):
        dispatch(op, torch.zeros(1))
    with use_backend("cuda-only"):  # forcing ignores priority; supports() is the only gate
        assert dispatch(op, torch.zeros(1)) == "cuda-only"


def test_forced_backend_that_cannot_run_raises_with_reason():
    op = _op()
    _register_pair(op, fast_reason="activation dtype float64 is not supported")
    with use_backend("fast"):
        with pytest.raises(BackendUnavailable, match="'fast'.*float64 is not supported"):
            dispatch(op, torch.zeros(1))
    assert dispatch(op, torch.zeros(1))[0] == "slow"  # the context manager restored auto choice


def test_forced_backend_runs_where_it_only_declined_for_speed():
    op = _op()
    registry.register(op, "slow", lambda x: ("slow", x), priority={"cpu": 100})
    registry.register(op, "packed", lambda x: ("packed", x), priority={"cpu": 1},
                      supports=lambda x: "64 rows: measured slower" if x.numel() > 8 else None,
                      can_run=lambda x: "float64 cannot run" if x.dtype == torch.float64 else None)
    assert dispatch(op, torch.zeros(64))[0] == "slow"  # auto: declined, measured slower
    with use_backend("packed"):
        assert dispatch(op, torch.zeros(64))[0] == "packed"  # forced: it can compute it
        with pytest.raises(BackendUnavailable, match="float64 cannot run"):
            dispatch(op, torch.zeros(2, dtype=torch.float64))


def test_forced_backend_missing_for_op_chooses_automatically_and_logs(caplog):
    op = _op()
    _register_pair(op, fast_reason="needs K % 64 == 0")
    other = _op()
    registry.register(other, "special", lambda x: "special", priority={"cpu": 1})
    with caplog.at_level(logging.INFO, logger="lowbit.kernels"), use_backend("special"):
        assert dispatch(other, torch.zeros(1)) == "special"
        assert dispatch(op, torch.zeros(1))[0] == "slow"
        dispatch(op, torch.zeros(1))
    msgs = [r.getMessage() for r in caplog.records if op + " " in r.getMessage()]
    assert len(msgs) == 1  # logged once, as any choice
    assert "backend slow" in msgs[0] and "special (forced) does not implement" in msgs[0]
    assert "fast: needs K % 64 == 0" in msgs[0]


def test_forced_backend_missing_for_op_with_no_backend_for_device_raises():
    op = _op()
    registry.register(op, "cuda-only", lambda x: x, priority={"cuda": 0})
    other = _op()
    registry.register(other, "special", lambda x: "special", priority={"cpu": 1})
    with use_backend("special"):
        with pytest.raises(BackendUnavailable, match="no backend is registered for this device"):
            dispatch(op, torch.zeros(1))


def test_forced_wins_over_priority_and_unknown_name_rejected():
    op = _op()
    _register_pair(op)
    with use_backend("slow"):
        assert dispatch(op, torch.zeros(1))[0] == "slow"
    with pytest.raises(BackendUnavailable, match="unknown backend 'nope'"):
        force_backend("nope")
    assert registry.forced_backend() is None


def test_no_backend_can_run_lists_every_reason():
    op = _op()
    registry.register(op, "a", lambda x: x, supports=lambda x: "reason A", priority={"cpu": 1})
    registry.register(op, "b", lambda x: x, supports=lambda x: "reason B", priority={"cpu": 2})
    with pytest.raises(BackendUnavailable, match="a: reason A; b: reason B"):
        dispatch(op, torch.zeros(1))
    with pytest.raises(BackendUnavailable, match="no backend is registered for op"):
        dispatch(_op(), torch.zeros(1))


def test_dequant_matmul_backends_registered():
    assert {"reference", "cpu-packed"} <= set(registry.backends("dequant_matmul"))
