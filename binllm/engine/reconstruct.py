"""The one GPTQ-style reconstruction loop shared by every method.

    W (rows, cols), H (cols, cols)
      │ dead columns: H_jj = 0 → H_jj = 1 (for U only), W[:, j] = 0
      │ U = upper Cholesky factor of (H + λI)⁻¹, λ = percdamp · mean diag H (retry ×10)
      │ state = method.prepare(W, H, U, original=W before zeroing dead columns)
      ▼
    for each block [i1, i2) of block_size columns:
        grid = method.fit(W[:, i1:i2], ctx)              ctx = (H_blk, U_blk, columns, state)
        feedback "column":  for each column j: q_j = round + dequantize;
                            E_j = (w_j − q_j)/U_jj;  W_blk[:, j:] −= E_j · U_blk[j, j:]
        feedback "block":   Q_blk = dequantize(round(W_blk)); E = (W_blk − Q_blk)/diag U_blk
        feedback "none":    as "block", but nothing is propagated
        W[:, i2:] −= E · U[i1:i2, i2:]                   (lazy batch update, GPTQ §3)
    calibrated = method.codes(grids, levels)       calibrated.dequantize() == calibrated_Q
    codes = method.store(calibrated)               scales rounded once to their storage dtype
    Q = codes.dequantize()                         what the finished model computes with, saved

"column" is GPTQ / PB-LLM (intra-block updates); "block" is BiLLM / ARB-LLM, whose block is
binarized at once and only compensates later blocks (BiLLM's and ARB-LLM's reference code).

Inside the loop scales and means are fp32, as the reference code keeps them; `method.store`
rounds them to their storage precision after the last block (nothing is fed back after that
rounding). `loss` is the proxy loss of the stored weights against the very targets the loop
rounded (the fed-back columns), `calibration_loss` that of the loop's own weights, which is
what the references print; they differ only by that final rounding. `binarize_model` feeds
the next decoder layer through `calibrated_Q`, as the references do, and only then gives the
layer its stored weights `Q`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .hessian import inverse_cholesky
from ..methods.base import BlockContext, Feedback, Method


@dataclass(frozen=True)
class Reconstruction:
    Q: Tensor          # (rows, cols) quantized weights as stored, fp32; codes.dequantize() == Q
    codes: object      # the method's layer codes at their storage precision
    loss: float        # Σ (w − q)² / U_jj² / 2 of the stored Q, GPTQ's proxy loss (plain
    #                    Σ (w − q)²/2 without H), w the fed-back column the loop rounded
    calibrated_Q: Tensor  # (rows, cols) the loop's weights (fp32 scales unless in_loop)
    calibrated: object    # their codes, calibrated.dequantize() == calibrated_Q; `codes` if
    #                       nothing was left to round (scale_rounding=in_loop, float32)
    calibration_loss: float  # the loss of calibrated_Q, as the references print it
    percdamp: float | None  # damping finally used (None without a Hessian)


def reconstruct(W: Tensor, H: Tensor | None, method: Method, *, block_size: int = 128,
                percdamp: float = 0.01, feedback: Feedback | None = None,
                name: str = "") -> Reconstruction:
    """Quantize W (rows, cols) with `method`, compensating errors through H (cols, cols)."""
    feedback = feedback or method.feedback
    rows, cols = W.shape
    block_size = method.block_size(block_size, cols)
    U = Hgram = dead = None
    used_damp = None
    if H is not None and method.uses_hessian(feedback):
        inv = inverse_cholesky(H, percdamp, name=name)  # before the copy of W: lower peak
        U, used_damp, dead = inv.U, inv.percdamp, inv.dead
        del inv  # its H (a copy when columns were dead) is not needed
        Hgram = H.to(torch.float32)  # the inputs' own Gram matrix: dead H_jj stay 0 (ARB-X)
    elif feedback != "none":
        raise ValueError(f"feedback={feedback!r} needs a Hessian; pass H or use feedback='none'")
    W = W.detach().to(torch.float32, copy=True)  # (rows, cols), one fp32 copy
    original = W
    if dead is not None and dead.any():
        original = W.clone()
        W[:, dead] = 0
    state = method.prepare(W, Hgram, U, original=original)

    whole = block_size >= cols  # one block (rtn-sign): its Q1, Err1 are Q, E, not copied
    Q = None if whole else torch.zeros_like(W)
    E = None if whole else torch.zeros_like(W)  # (rows, cols) scaled errors (w − q)/U_jj
    grids, levels = [], []
    loss = 0.0
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        W1 = W[:, i1:i2]  # (rows, B); its own copy where the column loop updates it
        W1 = W1 if whole and feedback != "column" else W1.clone()
        U1 = U[i1:i2, i1:i2] if U is not None else None  # (B, B)
        ctx = BlockContext(H=Hgram[i1:i2, i1:i2] if Hgram is not None else None, U=U1,
                           columns=slice(i1, i2), state=state, feedback=feedback)
        grid = method.fit(W1, ctx)
        if feedback == "column":
            Q1, L1, Err1 = _column_feedback(method, grid, W1, U1)
        else:
            every = slice(0, i2 - i1)
            L1 = method.round(W1, grid, every)
            Q1 = method.dequantize(grid, L1, every)  # (rows, B)
            Err1 = (W1 - Q1) / torch.diag(U1)[None, :] if U1 is not None else W1 - Q1
        loss += (Err1 ** 2).sum().item() / 2  # Σ (w − q)² / U_jj² / 2
        if feedback != "none":
            W[:, i2:] -= Err1 @ U[i1:i2, i2:]
        if whole:
            Q, E = Q1, Err1
        else:
            Q[:, i1:i2] = Q1
            E[:, i1:i2] = Err1
        grids.append(grid)
        levels.append(L1)
    del W, W1, Q1, Err1, original, state  # the fed-back weights are done with
    calibrated = method.codes(grids, torch.cat(levels, dim=-1))
    codes = method.store(calibrated)
    Q_stored, stored_loss = Q, loss
    if codes is not calibrated:  # scales rounded after the loop: Q moves, the targets do not
        Q_stored = codes.dequantize()  # (rows, cols)
        d = torch.diag(U)[None, :] if U is not None else 1.0  # (1, cols)
        # in row chunks, in E's place: no third (rows, cols) buffer and no fp64 copy of E
        step = max(1, (1 << 20) // max(cols, 1))
        stored_loss = 0.0
        for r0 in range(0, rows, step):
            e = E[r0:r0 + step]
            e += (Q[r0:r0 + step] - Q_stored[r0:r0 + step]).div_(d)  # E + (Q − Q_stored)/d
            stored_loss += e.pow_(2).sum(dtype=torch.float64).item() / 2
    return Reconstruction(Q=Q_stored, codes=codes, loss=stored_loss, calibrated_Q=Q,
                          calibrated=calibrated, calibration_loss=loss, percdamp=used_damp)


def _column_feedback(method: Method, grid, W1: Tensor, U1: Tensor):
    """GPTQ's inner loop: round column j, then push its error onto columns j+1… of the block."""
    B = W1.shape[1]
    Q1 = torch.zeros_like(W1)  # (rows, B)
    Err1 = torch.zeros_like(W1)  # (rows, B)
    L = []
    for j in range(B):
        col = slice(j, j + 1)
        w = W1[:, col]  # (rows, 1)
        lv = method.round(w, grid, col)
        q = method.dequantize(grid, lv, col)  # (rows, 1)
        Q1[:, col] = q
        err = (w - q) / U1[j, j]  # (rows, 1)
        W1[:, j:] -= err @ U1[j:j + 1, j:]
        Err1[:, col] = err
        L.append(lv)
    return Q1, torch.cat(L, dim=-1), Err1
