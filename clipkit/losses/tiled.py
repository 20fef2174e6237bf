"""Tiled kernels behind the contrastive losses: never materialise the ``(N, M)`` logit matrix.

Both functions walk the logits ``L = s * a @ b.T`` tile by tile (Inf-CL, arXiv 2410.17243):
the forward keeps only per-row / per-column running max and log-sum-exp (or a running sum),
the backward recomputes each tile from ``a`` and ``b``. Peak memory is ``O((N + M) * D + tile^2)``.
Tiles hold float32 (float64 for float64 inputs) whatever the input dtype, and the positive logits
are read out of the same tiles, so they carry exactly the tiles' rounding (a positive computed at
another rounding was off by 46% for a tiny bf16 loss, ANCHORS.md).

bf16 / fp16 inputs (both operands of one dtype) are multiplied as they are, with float32 output
(:func:`tile_mm`: tensor cores on CUDA; on CPU the exact products of the same values summed in
float32), the scale applied to the float32 tile; the online log-sum-exp, softmax and gradient
accumulators stay float32, and the backward's gradient tile is rounded to the input dtype for
its two matmuls, as a bf16 autocast backward does. Upcasting every tile instead made the loss
7x slower than open_clip's bf16 ``ClipLoss`` at B = 32,768 on an H100 (bench/results).

These are autograd Functions with Python loops; callers wrap them in
``torch.compiler.disable`` so ``torch.compile`` does not unroll the loop into its graph.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# CPU: 256-512 measured a little faster and leaner than 1024 (ANCHORS.md); GPUs want bigger tiles.
DEFAULT_CHUNK_CPU = 512
DEFAULT_CHUNK_CUDA = 2048


def default_chunk(device: torch.device) -> int:
    """Tile edge used when ``chunk_size`` is None or 0."""
    return DEFAULT_CHUNK_CPU if device.type == "cpu" else DEFAULT_CHUNK_CUDA


def acc_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32 (bf16/fp16 inputs accumulate in float32)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


_LOW = (torch.bfloat16, torch.float16)


def low_precision(*tensors: torch.Tensor) -> bool:
    """True when every operand is one 16-bit float dtype: the tiles multiply them as they are."""
    dts = {t.dtype for t in tensors}
    return len(dts) == 1 and next(iter(dts)) in _LOW


# Whether ``torch.mm(..., out_dtype=)`` runs on a device type (CUDA in torch >= 2.8); learnt
# on first use, so an older torch or another accelerator falls back to upcasting.
_OUT_DTYPE: dict[str, bool] = {}


def tile_mm(x: torch.Tensor, y: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """``x @ y`` with an ``acc``-dtype result; 16-bit operands are not upcast first where the
    device multiplies them with wider output itself (CUDA: bf16 tensor cores, fp32 output).

    Elsewhere the operands are upcast, which gives the exact products of the same 16-bit values
    summed in ``acc``: the result the device path computes, up to summation order.
    """
    if x.dtype == acc and y.dtype == acc:
        return torch.mm(x, y)
    kind = x.device.type
    if kind != "cpu" and _OUT_DTYPE.get(kind, True) and x.dtype == y.dtype:
        try:
            out = torch.mm(x, y, out_dtype=acc)
            _OUT_DTYPE[kind] = True
            return out
        except (TypeError, RuntimeError, NotImplementedError):
            _OUT_DTYPE[kind] = False
    return torch.mm(x.to(acc), y.to(acc))


def _operands(a: torch.Tensor, b: torch.Tensor, s: torch.Tensor, acc: torch.dtype):
    """Tile operands ``(a', b', post)`` with ``L = (a' @ b'.T) * post`` (post None: ``1``).

    Wide inputs: ``a`` is upcast and scaled once (O(N D)), tiles are already logits. 16-bit
    inputs: kept as they are, and each float32 tile is scaled (scaling ``a`` in 16 bits would
    round it a second time).
    """
    if low_precision(a, b):
        return a, b, s
    return a.to(acc) * s, b.to(acc), None


def _scaled(t: torch.Tensor, post: torch.Tensor | None) -> torch.Tensor:
    return t if post is None else t.mul_(post)


# Running-max start: the dtype's lowest finite value, not -inf. A tile row can be all excluded
# (NT-Xent's self-similarity in a 1-column tile) and -inf - (-inf) would be NaN.
_NEG = {
    torch.float32: torch.finfo(torch.float32).min,
    torch.float64: torch.finfo(torch.float64).min,
}


def _diag_in_tile(
    i0: int, i1: int, j0: int, j1: int, offset: int | None, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, int, int] | None:
    """Tile-local (row, col) indices of the entries ``(i, i + offset)`` inside a tile."""
    if offset is None:
        return None
    lo, hi = max(i0, j0 - offset), min(i1, j1 - offset)
    if lo >= hi:
        return None
    idx = torch.arange(lo, hi, device=device)
    return idx - i0, idx + offset - j0, lo, hi


def _mask_in_tile_(t: torch.Tensor, i0: int, i1: int, j0: int, j1: int, exclude: int | None):
    """Set the tile's entries ``(i, i + exclude)`` to -inf in place (out of every softmax)."""
    e = _diag_in_tile(i0, i1, j0, j1, exclude, t.device)
    if e is not None:
        t[e[0], e[1]] = float("-inf")


class TiledLogSumExp(torch.autograd.Function):
    """Row log-sum-exp, column log-sum-exp and positive logits of ``L = s * a @ b.T``.

    forward(a (N, D), b (M, D), scale 0-d, offset, n_cols, chunk, exclude) ->
    (row_lse (N,), col_lse (n_cols,) over the N rows for columns ``0..n_cols-1``,
    pos (N,) with ``pos[i] = L[i, i + offset]``), all in the accumulation dtype.
    ``offset=None``: no positives (pos is zeros). ``exclude``: the entries ``(i, i + exclude)``
    are left out of every log-sum-exp (NT-Xent's self-similarity); None = none.
    """

    @staticmethod
    def forward(
        ctx, a, b, scale, offset: int | None, n_cols: int, chunk: int, exclude: int | None = None
    ):
        acc = acc_dtype(a, b)
        # fp32/fp64: s * a once (O(N D)), tiles are then the logits; 16-bit: see _operands.
        a_, b_, post = _operands(a, b, scale.detach().to(acc), acc)  # (N, D), (M, D)
        n, m = a_.shape[0], b_.shape[0]
        f = {"dtype": acc, "device": a.device}
        row_lse = torch.empty(n, **f)
        pos = torch.zeros(n, **f)
        col_max = torch.full((n_cols,), _NEG[acc], **f)
        col_sum = torch.zeros(n_cols, **f)
        for i0 in range(0, n, chunk):
            i1 = min(i0 + chunk, n)
            ai = a_[i0:i1]  # (c, D)
            r_max = torch.full((i1 - i0,), _NEG[acc], **f)
            r_sum = torch.zeros(i1 - i0, **f)
            for j0 in range(0, m, chunk):
                j1 = min(j0 + chunk, m)
                t = _scaled(tile_mm(ai, b_[j0:j1].T, acc), post)  # (c, c') logits tile
                d = _diag_in_tile(i0, i1, j0, j1, offset, a.device)
                if d is not None:
                    pos[d[2] : d[3]] = t[d[0], d[1]]
                _mask_in_tile_(t, i0, i1, j0, j1, exclude)
                new = torch.maximum(r_max, t.amax(1))
                r_sum = r_sum * torch.exp(r_max - new) + torch.exp(t - new[:, None]).sum(1)
                r_max = new
                if j0 < n_cols:
                    jc = min(j1, n_cols) - j0
                    tc = t[:, :jc]  # (c, jc) positive columns only
                    old = col_max[j0 : j0 + jc]
                    new_c = torch.maximum(old, tc.amax(0))
                    col_sum[j0 : j0 + jc] = col_sum[j0 : j0 + jc] * torch.exp(old - new_c) + (
                        tc.sub_(new_c).exp_().sum(0)
                    )
                    col_max[j0 : j0 + jc] = new_c
            row_lse[i0:i1] = r_max + torch.log(r_sum)
        col_lse = col_max + torch.log(col_sum)
        ctx.save_for_backward(a, b, scale, row_lse, col_lse)
        ctx.offset, ctx.n_cols, ctx.chunk, ctx.exclude = offset, n_cols, chunk, exclude
        return row_lse, col_lse, pos

    @staticmethod
    def backward(ctx, g_row, g_col, g_pos):
        a, b, scale, row_lse, col_lse = ctx.saved_tensors
        offset, n_cols, chunk, exclude = ctx.offset, ctx.n_cols, ctx.chunk, ctx.exclude
        acc = row_lse.dtype
        s = scale.detach().to(acc)
        a_s, b_, post = _operands(a, b, s, acc)  # as in forward
        # The matmuls with the gradient tile take the unscaled operands (s applied at the end).
        a_ = a if post is not None else a.to(acc)  # (N, D)
        n, m = a.shape[0], b.shape[0]
        g_row, g_col, g_pos = g_row.to(acc), g_col.to(acc), g_pos.to(acc)
        need_b = ctx.needs_input_grad[1]
        # dL/dL_ij = g_row_i * softmax_row_ij + g_col_j * softmax_col_ij + g_pos_i [j = i + off]
        ga = torch.zeros(a.shape, dtype=acc, device=a.device)  # (N, D) sum_j G_ij b_j, x s at end
        gb = torch.zeros(b.shape, dtype=acc, device=b.device) if need_b else None  # (M, D)
        for i0 in range(0, n, chunk):
            i1 = min(i0 + chunk, n)
            ai = a_[i0:i1]
            r = row_lse[i0:i1, None]
            gr = g_row[i0:i1, None]
            for j0 in range(0, m, chunk):
                j1 = min(j0 + chunk, m)
                bj = b_[j0:j1]
                t = _scaled(tile_mm(a_s[i0:i1], bj.T, acc), post)  # (c, c') as in forward
                _mask_in_tile_(t, i0, i1, j0, j1, exclude)  # excluded entries get no gradient
                g = (t - r).exp_().mul_(gr)  # (c, c')
                if j0 < n_cols:
                    jc = min(j1, n_cols) - j0
                    tc = t[:, :jc]
                    g[:, :jc] += tc.sub_(col_lse[j0 : j0 + jc]).exp_().mul_(g_col[j0 : j0 + jc])
                d = _diag_in_tile(i0, i1, j0, j1, offset, a.device)
                if d is not None:
                    g[d[0], d[1]] += g_pos[d[2] : d[3]]
                g = g.to(a_.dtype)  # 16-bit inputs: the gradient tile's matmuls in 16 bits too
                ga[i0:i1] += tile_mm(g, bj, acc)
                if need_b:
                    gb[j0:j1] += tile_mm(g.T, ai, acc)
        # dloss/ds = sum_ij G_ij (a_i . b_j) = sum_i a_i . (G b)_i: O(N D), no extra tile pass.
        g_scale = (ga * a.to(acc)).sum().to(scale.dtype) if ctx.needs_input_grad[2] else None
        ga = ga.mul_(s).to(a.dtype) if ctx.needs_input_grad[0] else None
        gb = gb.mul_(s).to(b.dtype) if need_b else None
        return ga, gb, g_scale, None, None, None, None


def _online_lse_(
    r_max: torch.Tensor, r_sum: torch.Tensor, lo: int, hi: int, t: torch.Tensor, dim: int
) -> None:
    """Fold tile ``t`` into the running max / sum of rows ``lo:hi`` (reduced over ``dim``)."""
    old = r_max[lo:hi]
    new = torch.maximum(old, t.amax(dim))
    r_sum[lo:hi] = r_sum[lo:hi] * torch.exp(old - new) + torch.exp(t - new.unsqueeze(dim)).sum(dim)
    r_max[lo:hi] = new


class TiledPairLogSumExp(torch.autograd.Function):
    """Self-excluded row log-sum-exp of the symmetric ``L = s * z @ z.T`` (NT-Xent's logits).

    forward(z (2N, D), scale 0-d, half N, chunk) -> (row_lse (2N,) with ``L[i, i]`` left out,
    pos (N,) with ``pos[i] = L[i, i + N]``), accumulation dtype. ``L`` is symmetric, so only
    the tiles on and above the diagonal are computed: an off-diagonal tile feeds its rows'
    running sums directly and its columns' running sums transposed. That halves the matmuls
    of the forward and of the backward's recomputation; each value ``L[i, j]``, ``i`` and
    ``j`` in different tiles, is one variable shared by rows ``i`` and ``j``.
    """

    @staticmethod
    def forward(ctx, z, scale, half: int, chunk: int):
        acc = acc_dtype(z)
        z_ = z.to(acc)  # (2N, D)
        zs = z_ * scale.detach().to(acc)
        m = z_.shape[0]
        r_max = z_.new_full((m,), _NEG[acc])
        r_sum = z_.new_zeros(m)
        pos = z_.new_zeros(half)
        for i0 in range(0, m, chunk):
            i1 = min(i0 + chunk, m)
            for j0 in range(i0, m, chunk):  # upper triangle of tiles (tile edges align)
                j1 = min(j0 + chunk, m)
                t = torch.mm(zs[i0:i1], z_[j0:j1].T)  # (c, c') logits tile
                # (i, i + N) always lies on or above the diagonal: every positive is read here.
                d = _diag_in_tile(i0, i1, j0, j1, half, z_.device)
                if d is not None:
                    pos[d[2] : d[3]] = t[d[0], d[1]]
                if j0 == i0:
                    _mask_in_tile_(t, i0, i1, j0, j1, 0)  # self-similarity
                _online_lse_(r_max, r_sum, i0, i1, t, 1)
                if j0 > i0:
                    _online_lse_(r_max, r_sum, j0, j1, t, 0)  # rows j see the tile transposed
        row_lse = r_max + torch.log(r_sum)
        ctx.save_for_backward(z, scale, row_lse)
        ctx.half, ctx.chunk = half, chunk
        return row_lse, pos

    @staticmethod
    def backward(ctx, g_row, g_pos):
        z, scale, row_lse = ctx.saved_tensors
        half, chunk = ctx.half, ctx.chunk
        acc = row_lse.dtype
        z_, s = z.to(acc), scale.detach().to(acc)
        zs = z_ * s
        m = z_.shape[0]
        g_row, g_pos = g_row.to(acc), g_pos.to(acc)
        # gz = sum over variables t_ij of dloss/dt_ij * (z_j to row i, z_i to row j), times s
        # at the end (t_ij = s z_i . z_j).
        gz = torch.zeros_like(z_)  # (2N, D)
        for i0 in range(0, m, chunk):
            i1 = min(i0 + chunk, m)
            zi = z_[i0:i1]
            for j0 in range(i0, m, chunk):
                j1 = min(j0 + chunk, m)
                zj = z_[j0:j1]
                t = torch.mm(zs[i0:i1], zj.T)  # (c, c') recomputed tile, as in forward
                if j0 == i0:
                    _mask_in_tile_(t, i0, i1, j0, j1, 0)
                # row i's softmax over its columns j, weighted by row i's upstream gradient
                h = (t - row_lse[i0:i1, None]).exp_().mul_(g_row[i0:i1, None])  # (c, c')
                d = _diag_in_tile(i0, i1, j0, j1, half, z_.device)
                if d is not None:
                    h[d[0], d[1]] += g_pos[d[2] : d[3]]
                if j0 == i0:
                    # Diagonal tile: t_ij and t_ji are separate variables, both s z_i . z_j.
                    gz[i0:i1] += (h + h.T) @ zi
                else:
                    # Off-diagonal: t_ij is also row j's logit of column i.
                    h += t.sub_(row_lse[None, j0:j1]).exp_().mul_(g_row[None, j0:j1])
                    gz[i0:i1] += h @ zj
                    gz[j0:j1] += h.T @ zi
        # dloss/ds = sum_ij dloss/dt_ij * z_i . z_j; gz counts every term twice.
        g_scale = 0.5 * (gz * z_).sum().to(scale.dtype) if ctx.needs_input_grad[1] else None
        gz = gz.mul_(s).to(z.dtype) if ctx.needs_input_grad[0] else None
        return gz, g_scale, None, None


class TiledSigmoidSum(torch.autograd.Function):
    """SigLIP's summed pairwise loss ``sum_ij softplus(-z_ij * (s * a_i . b_j + bias))``.

    ``z_ij = +1`` where ``j == i + offset`` (the positives), ``-1`` elsewhere.
    forward(a (N, D), b (M, D), scale 0-d, bias 0-d, offset, chunk) -> 0-d sum (accumulation dtype).
    """

    @staticmethod
    def forward(ctx, a, b, scale, bias, offset: int, chunk: int):
        acc = acc_dtype(a, b)
        # The scale and bias go on each float32 tile; 16-bit operands are multiplied as they are.
        a_, b_ = (a, b) if low_precision(a, b) else (a.to(acc), b.to(acc))
        s, c = scale.detach().to(acc), bias.detach().to(acc)
        n, m = a_.shape[0], b_.shape[0]
        total = torch.zeros((), dtype=acc, device=a.device)
        for i0 in range(0, n, chunk):
            i1 = min(i0 + chunk, n)
            ai = a_[i0:i1]
            for j0 in range(0, m, chunk):
                j1 = min(j0 + chunk, m)
                t = tile_mm(ai, b_[j0:j1].T, acc).mul_(s).add_(c)  # (c, c') logits tile
                d = _diag_in_tile(i0, i1, j0, j1, offset, a.device)
                if d is not None:
                    # -z * L: flip the positives in place (no softplus(x) - x cancellation)
                    t[d[0], d[1]] = -t[d[0], d[1]]
                # softplus(u) = -logsigmoid(-u); F.softplus's default threshold (u > 20 -> u)
                # drops exp(-u) and was 2.4e-12 off open_clip in float64 at scale 100.
                total -= F.logsigmoid(t.neg_()).sum()
        ctx.save_for_backward(a, b, scale, bias)
        ctx.offset, ctx.chunk, ctx.acc = offset, chunk, acc
        return total

    @staticmethod
    def backward(ctx, g_out):
        a, b, scale, bias = ctx.saved_tensors
        offset, chunk, acc = ctx.offset, ctx.chunk, ctx.acc
        a_, b_ = (a, b) if low_precision(a, b) else (a.to(acc), b.to(acc))
        s, c = scale.detach().to(acc), bias.detach().to(acc)
        g_out = g_out.to(acc)
        n, m = a_.shape[0], b_.shape[0]
        need_b = ctx.needs_input_grad[1]
        ga = torch.zeros(a.shape, dtype=acc, device=a.device)  # (N, D)
        gb = torch.zeros(b.shape, dtype=acc, device=b.device) if need_b else None  # (M, D)
        g_bias = torch.zeros((), dtype=acc, device=a.device)
        for i0 in range(0, n, chunk):
            i1 = min(i0 + chunk, n)
            ai = a_[i0:i1]
            for j0 in range(0, m, chunk):
                j1 = min(j0 + chunk, m)
                bj = b_[j0:j1]
                g = tile_mm(ai, bj.T, acc).mul_(s).add_(c)  # (c, c') logits tile
                d = _diag_in_tile(i0, i1, j0, j1, offset, a.device)
                if d is not None:
                    g[d[0], d[1]] = -g[d[0], d[1]]
                g.sigmoid_()  # d softplus(-z L) / dL = -z * sigmoid(-z L)
                if d is not None:
                    g[d[0], d[1]] = -g[d[0], d[1]]  # positives: -sigmoid(-L), exact for large L
                g.mul_(g_out)
                g_bias += g.sum()
                g = g.to(a_.dtype)  # 16-bit inputs: the gradient tile's matmuls in 16 bits too
                ga[i0:i1] += tile_mm(g, bj, acc)
                if need_b:
                    gb[j0:j1] += tile_mm(g.T, ai, acc)
        g_scale = (ga * a.to(acc)).sum().to(scale.dtype) if ctx.needs_input_grad[2] else None
        g_bias = g_bias.to(bias.dtype) if ctx.needs_input_grad[3] else None
        ga = ga.mul_(s).to(a.dtype) if ctx.needs_input_grad[0] else None
        gb = gb.mul_(s).to(b.dtype) if need_b else None
        return ga, gb, g_scale, g_bias, None, None
