"""Per-op kernel registry: which backend runs an op, chosen by device and shape, overridable, logged.

Each op ("dequant_matmul", "kv_attention", ...) has backends registered with
  fn         the implementation, called as fn(*args, **kw)
  supports   supports(*args, **kw) -> None if fn should run these arguments when choosing
             automatically, else the reason (a str): it may decline where it measured slower
  can_run    the same question when the backend is forced: only what it cannot compute at all
             (default: supports)
  priority   {device type: rank}; lower ranks are tried first; a device type absent from the dict
             means the backend is never picked automatically there (it can still be forced).
The device is the type of the first tensor argument (the input activation).

Choice is never silent: the first time an (op, backend, device, shape class) is picked it is
logged at INFO on "lowbit.kernels", together with why any better-ranked backend was skipped.

Forcing a backend (`--backend NAME`) applies to the ops that implement NAME: there, a forced
backend that cannot run raises BackendUnavailable with its reason instead of falling back. Ops
with no NAME backend (kv_attention has no "cpu-packed") choose automatically, and that is logged
like any choice. Forcing a name that no op implements is an error.
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Callable, Iterator

from torch import Tensor

logger = logging.getLogger("lowbit.kernels")

# Decode GEMV vs prefill GEMM: at or below this many activation rows an op is bandwidth-bound.
GEMV_MAX_ROWS = 16


class BackendUnavailable(RuntimeError):
    """A backend cannot run an op on these arguments; the message says which, on what, and why."""


@dataclass(frozen=True)
class _Backend:
    name: str
    fn: Callable
    supports: Callable[..., str | None] | None
    priority: dict[str, int]
    can_run: Callable[..., str | None] | None = None

    def reason_unsupported(self, args, kw) -> str | None:
        return None if self.supports is None else self.supports(*args, **kw)

    def reason_cannot_run(self, args, kw) -> str | None:
        if self.can_run is None:
            return self.reason_unsupported(args, kw)
        return self.can_run(*args, **kw)


_ops: dict[str, dict[str, _Backend]] = {}
_forced: str | None = None
_calls: dict[tuple[str, str, str, str], int] = {}  # (op, device, shape class, backend) -> calls


def register(op: str, backend: str, fn: Callable, supports: Callable | None = None,
             priority: dict[str, int] | None = None, can_run: Callable | None = None) -> None:
    """Register (or replace) `backend` for `op`."""
    _ops.setdefault(op, {})[backend] = _Backend(backend, fn, supports, dict(priority or {}),
                                                can_run)


def backends(op: str) -> list[str]:
    return list(_ops.get(op, {}))


def all_backends() -> list[str]:
    return sorted({name for table in _ops.values() for name in table})


def force_backend(name: str | None) -> None:
    """Run every op that implements backend `name` on it (None: choose automatically again)."""
    global _forced
    if name is not None and name not in all_backends():
        raise BackendUnavailable(f"unknown backend {name!r}; registered: "
                                 f"{', '.join(all_backends()) or 'none'}")
    _forced = name


def forced_backend() -> str | None:
    return _forced


@contextlib.contextmanager
def use_backend(name: str | None) -> Iterator[None]:
    """Force `name` inside the block, restoring the previous choice after it."""
    previous = _forced
    force_backend(name)
    try:
        yield
    finally:
        force_backend(previous)


def chosen() -> dict[str, dict[str, dict[str, int]]]:
    """Backends picked so far, with call counts: {op: {"<device>/<shape class>": {backend: n}}}.
    One op may use several backends on one device (a layer with a ragged group, say)."""
    out: dict[str, dict[str, dict[str, int]]] = {}
    for (op, device, shape_class, backend), n in sorted(_calls.items()):
        out.setdefault(op, {}).setdefault(f"{device}/{shape_class}", {})[backend] = n
    return out


def reset_chosen() -> None:
    """Forget what was picked (and logged), e.g. between benchmark runs."""
    _calls.clear()


def _first_tensor(args, kw) -> Tensor:
    for a in (*args, *kw.values()):
        if isinstance(a, Tensor):
            return a
    raise TypeError("dispatch needs a tensor argument to pick a device")


def _shape_class(x: Tensor) -> str:
    rows = x.numel() // max(x.shape[-1], 1) if x.dim() else 1
    return "gemv" if rows <= GEMV_MAX_ROWS else "gemm"


def _record(op: str, backend: str, device: str, shape_class: str, skipped: list[str]) -> None:
    key = (op, device, shape_class, backend)
    n = _calls.get(key, 0)
    _calls[key] = n + 1
    if n:
        return
    why = f" (skipped {'; '.join(skipped)})" if skipped else ""
    logger.info("%s on %s/%s: backend %s%s", op, device, shape_class, backend, why)


def _pick(op: str, table: dict[str, _Backend], device: str, args, kw) -> tuple[_Backend, list[str]]:
    """The backend to run and the notes to log with it: why better-ranked ones were skipped."""
    notes = []
    if _forced is not None:
        backend = table.get(_forced)
        if backend is not None:
            reason = backend.reason_cannot_run(args, kw)
            if reason is not None:
                raise BackendUnavailable(f"backend {_forced!r} (forced) cannot run {op!r} on "
                                         f"{device}: {reason}")
            return backend, [f"{_forced} forced"]
        notes.append(f"{_forced} (forced) does not implement {op}")
    ranked = sorted((b for b in table.values() if device in b.priority),
                    key=lambda b: b.priority[device])
    skipped = []
    for backend in ranked:
        reason = backend.reason_unsupported(args, kw)
        if reason is None:
            return backend, notes + skipped
        skipped.append(f"{backend.name}: {reason}")
    detail = "; ".join(skipped) if skipped else "no backend is registered for this device"
    raise BackendUnavailable(f"no backend can run {op!r} on {device}: {detail}")


def dispatch(op: str, *args, **kw):
    """Run `op` on the forced backend, or the best-ranked one for the input's device that
    supports these arguments."""
    table = _ops.get(op)
    if not table:
        raise BackendUnavailable(f"no backend is registered for op {op!r}")
    x = _first_tensor(args, kw)
    device = x.device.type
    backend, skipped = _pick(op, table, device, args, kw)
    _record(op, backend.name, device, _shape_class(x), skipped)
    return backend.fn(*args, **kw)
