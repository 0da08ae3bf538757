"""GPTQ: quantize a linear layer's weight column by column, pushing each column's rounding error
onto the not-yet-quantized columns through the inverse Hessian of the layer's inputs.

For a layer y = W x, the output error over calibration inputs X (n, K) is tr(ΔW H ΔWᵀ) with
H = XᵀX / n (the usual 2XᵀX/n up to a factor that cancels). GPTQ (Frantar et al., 2022) quantizes
column j, then updates the remaining columns by −err_j · (H⁻¹)_{j, j+1:} / (H⁻¹)_{jj}, using the
upper Cholesky factor of H⁻¹ so each step needs only one row of it. Columns run in blocks of 128:
inside a block the updates are applied column by column; the block's accumulated errors reach
the columns after it in one matrix product (the "lazy batch" update).

Groups' scales and zero points come from `search.search_params` with importance diag(H) (the mean
of x² per column). With activation order (columns by descending diag(H)) the groups are fixed up
front from the unquantized weight ("static groups"): the stored groups stay contiguous along K, so
the canonical format needs no per-column group index (order "static", the default). Orders that
keep a group's columns together ("group": groups by importance; "none": natural order) instead
search each group's (s, z) on its already error-compensated columns when the group is reached.
Either way the result is the
canonical Int4Weight/Int8Weight: calibration chooses integers, scales and zero points, nothing else.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .formats import Int4Weight, Int8Weight, _scale_dtype
from .primitives import QuantizationError, _check
from .search import code_range, search_params, to_format

DEFAULT_DAMP = 0.01
DEFAULT_BLOCK = 128
# Cholesky of a nearly singular H (few calibration tokens, dead inputs) can fail in fp32: retry
# with 10x the damping, at most this many times, before giving up with an error.
DAMP_RETRIES = 4


class GPTQError(QuantizationError):
    """A Hessian GPTQ cannot use (wrong shape, not finite, not positive definite even damped)."""


def _check_hessian(hessian: Tensor, k: int) -> None:
    if hessian.shape != (k, k):
        raise GPTQError(f"Hessian must be ({k}, {k}) for {k} input features, got "
                        f"{tuple(hessian.shape)}")
    if not torch.isfinite(hessian).all():
        raise GPTQError("Hessian contains NaN or infinity")


def inverse_cholesky(hessian: Tensor, damp: float) -> Tensor:
    """Upper Cholesky factor U of (H + λI)⁻¹ (so (H + λI)⁻¹ = UᵀU), λ = damp · mean diag(H).

    Dead inputs (diag 0: never active in calibration) get H_jj = 1, which decouples them: their
    weights are rounded to nearest and push no error elsewhere."""
    # fp64: a damped H with outlier channels can be too ill-conditioned for an fp32 Cholesky of
    # its inverse; K x K in fp64 is at most 1.6 GB (K = 14336)
    h = hessian.double().clone()
    diag = h.diagonal()  # a view: adding to it damps h in place, no K x K identity needed
    diag[diag == 0] = 1
    lam = damp * float(diag.mean())
    added = 0.0
    for _ in range(DAMP_RETRIES + 1):
        diag += lam - added
        added = lam
        chol, info = torch.linalg.cholesky_ex(h)
        if int(info) == 0:
            inv = torch.cholesky_inverse(chol)
            del chol
            upper, info = torch.linalg.cholesky_ex(inv, upper=True)
            if int(info) == 0:
                return upper.float()
        lam *= 10
    raise GPTQError(f"Hessian is not positive definite even with damping {lam / 10:.3g}")


# Column orders. Measured on the default model (mean KL on compare's 8 windows, 8192 calibration
# tokens, same sample; seconds on this 2-core CPU): g128 static 0.153 (87 s), group 0.160 (50 s),
# none 0.225 (tied lm_head quantized too: static 0.178, group 0.184); g64 static 0.123 (51 s),
# group 0.124 (389 s: a search per group of 64). Static is the default.
ORDERS = ("static", "group", "none")


def _processing_order(importance: Tensor, gs: int, order: str) -> Tensor:
    """Column permutation (K,). "static": all columns by descending importance. "group": groups
    by descending total importance, columns within a group likewise, so each group stays a
    contiguous run. "none": natural order. Stable sorts: ties keep the lower index first."""
    k = importance.shape[0]
    if order == "static":
        return torch.sort(importance, descending=True, stable=True).indices
    cols = torch.arange(k, device=importance.device)
    if order == "none":
        return cols
    runs = []
    group_importance = torch.stack([importance[g0:g0 + gs].sum() for g0 in range(0, k, gs)])
    for g in torch.sort(group_importance, descending=True, stable=True).indices.tolist():
        within = torch.sort(importance[g * gs:(g + 1) * gs], descending=True, stable=True).indices
        runs.append(cols[g * gs:(g + 1) * gs][within])
    return torch.cat(runs)


def _blocks(group_of: list[int], block_size: int, aligned: bool) -> list[tuple[int, int]]:
    """[b0, b1) column ranges in processing order. Aligned: cut only where the group changes,
    after at least block_size columns (a group is then never split across blocks, so it is up to
    date when its (s, z) are searched)."""
    k = len(group_of)
    if not aligned:
        return [(b0, min(b0 + block_size, k)) for b0 in range(0, k, block_size)]
    cuts = [j for j in range(1, k) if group_of[j] != group_of[j - 1]] + [k]
    blocks, b0 = [], 0
    for c in cuts:
        if c - b0 >= block_size or c == k:
            blocks.append((b0, c))
            b0 = c
    return blocks


def gptq_quantize(w: Tensor, hessian: Tensor, bits: int = 4, group_size: int | None = 128,
                  symmetric: bool = False, scale_dtype: torch.dtype | None = None, *,
                  damp: float = DEFAULT_DAMP, block_size: int = DEFAULT_BLOCK,
                  order: str = "static") -> Int4Weight | Int8Weight:
    """w (N, K) and H = XᵀX / n (K, K) over calibration inputs → Int4Weight/Int8Weight.

    order: "static" (default) is full activation order with every group's (s, z) searched up front
    on the unquantized weight; "group" processes groups by descending importance and searches each
    group's (s, z) on its error-compensated columns when reached; "none" is natural order with
    (s, z) searched when each group is reached. group_size None means per output channel (int8
    only). Scales are stored in `scale_dtype` (default: w's dtype). Deterministic."""
    _check(w, bits, group_size or w.shape[-1])
    if bits == 4 and (group_size is None or w.shape[1] % 2):
        raise QuantizationError("int4 needs a group size and an even number of input features")
    if order not in ORDERS:
        raise QuantizationError(f"GPTQ order must be one of {ORDERS}, not {order!r}")
    n, k = w.shape
    _check_hessian(hessian, k)
    sdt = _scale_dtype(w, scale_dtype)
    symmetric = symmetric or bits == 8
    gs = group_size or k
    cmin, cmax = code_range(bits, symmetric)
    importance = hessian.diagonal().float().clamp_min(0).to(w.device)
    perm = _processing_order(importance, gs, order)
    dynamic = order != "static"
    if dynamic:
        scale = torch.empty(n, (k + gs - 1) // gs, dtype=sdt, device=w.device)
        zero = torch.zeros(scale.shape, device=w.device)
    else:
        scale, zero = search_params(w, importance, bits, gs, symmetric, sdt)
    weight = w.float()[:, perm]
    # the Cholesky factor depends on the column order: permute H first, then factor
    u = inverse_cholesky(hessian.to(w.device)[perm][:, perm], damp)
    imp = importance[perm]
    group_of = (perm // gs).tolist()  # the group of each column in processing order
    codes = torch.empty(n, k, device=w.device)

    for b0, b1 in _blocks(group_of, block_size, aligned=dynamic):
        block = weight[:, b0:b1].clone()  # (N, B)
        errors = torch.empty_like(block)
        ub = u[b0:b1, b0:b1]
        for i in range(b1 - b0):
            col = b0 + i
            g = group_of[col]
            if dynamic and (i == 0 or group_of[col - 1] != g):
                width = group_of[col:b1].count(g)
                s, z = search_params(block[:, i:i + width], imp[col:col + width], bits, gs,
                                     symmetric, sdt)
                scale[:, g], zero[:, g] = s[:, 0], z[:, 0]
            s, z = scale[:, g].float(), zero[:, g]
            c = (torch.round(block[:, i] / s) + z).clamp(cmin, cmax)
            codes[:, col] = c
            err = (block[:, i] - (c - z) * s) / ub[i, i]
            block[:, i:] -= err.unsqueeze(1) * ub[i, i:].unsqueeze(0)
            errors[:, i] = err
        weight[:, b1:] -= errors @ u[b0:b1, b1:]

    codes = codes[:, torch.argsort(perm)]
    return to_format(codes, scale, zero, bits, group_size, symmetric)


def reconstruction_error(w: Tensor, w_hat: Tensor, hessian: Tensor) -> float:
    """tr(ΔW H ΔWᵀ) in fp64: the summed mean squared output error over the calibration inputs
    (per token, summed over output channels) that GPTQ reduces."""
    d = (w.double() - w_hat.double())
    return float(torch.einsum("nk,kl,nl->", d, hessian.double(), d))

