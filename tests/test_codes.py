"""BinaryCodes.dequantize against the docstring's formula evaluated weight by weight."""

from __future__ import annotations

import pytest
import torch
from packed_codes import binary_codes


def naive_dequantize(c) -> torch.Tensor:
    """Ŵ[r, c] = μ[g, r, b] + Σ_{o < order(g)} α[g, o, r, b]·β[g, o, c]·S[o, r, c], one by one."""
    rows, cols = c.group.shape
    Q = torch.zeros(rows, cols)
    for r in range(rows):
        for j in range(cols):
            g, b = int(c.group[r, j]), j // c.block_size
            v = c.mu[g, r, b] if c.mu is not None else torch.tensor(0.0)
            for o in range(c.orders[g]):
                t = c.alpha[g, o, r, b] * (1.0 if c.signs[o, r, j] else -1.0)
                if c.beta is not None:
                    t = t * c.beta[g, o, j]
                v = v + t
            Q[r, j] = v
    return Q


@pytest.mark.parametrize("kw", [
    dict(orders=(1,), n_salient=0),                                   # rtn-sign
    dict(orders=(2, 1, 1), n_salient=1),                              # BiLLM / ARB
    dict(orders=(2, 2, 1, 1), n_salient=2),                           # CGB
    dict(orders=(2, 2, 1, 1), n_salient=2, mean=False, beta=True),    # ARB-LLM_RC
    dict(orders=(2, 1, 1, 1), n_salient=1, block=16),                 # num_p = 2
])
def test_dequantize_equals_the_formula_weight_by_weight(kw):
    c = binary_codes(rows=7, cols=45, **{"block": 32, **kw})
    assert torch.allclose(c.dequantize(), naive_dequantize(c), rtol=0, atol=1e-6)


def group_by_group(c) -> torch.Tensor:
    """The same formula evaluated one group at a time over the whole matrix."""
    rows, cols = c.group.shape
    blk = torch.arange(cols) // c.block_size
    S = c.signs.float() * 2 - 1
    Q = torch.zeros(rows, cols)
    for g, order in enumerate(c.orders):
        Qg = c.mu[g][:, blk] if c.mu is not None else torch.zeros(rows, cols)
        for o in range(order):
            t = c.alpha[g, o][:, blk] * S[o]
            Qg = Qg + (t * c.beta[g, o][None, :] if c.beta is not None else t)
        Q = torch.where(c.group == g, Qg, Q)
    return Q


@pytest.mark.parametrize("beta", [False, True])
def test_row_chunks_equal_the_whole_matrix_evaluation(beta):
    """70 × 40000 weights: dequantize works in two row chunks; bit-identical to one pass."""
    c = binary_codes(rows=70, cols=40000, block=128, orders=(2, 2, 1, 1), n_salient=2,
                     mean=not beta, beta=beta)
    assert torch.equal(c.dequantize(), group_by_group(c))
