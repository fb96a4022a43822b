"""Hand-built codes of every container type, shaped like each method's output (test helper)."""

from __future__ import annotations

import torch

from binllm.methods.codes import BinaryCodes, PartialBinaryCodes, UniformCodes, to_storage
from binllm.methods.factor_codes import FactorCodes


def _fp16(x):
    return to_storage(x)


def binary_codes(rows=5, cols=77, block=32, orders=(2, 1, 1), n_salient=1, mean=True,
                 beta=False, seed=0) -> BinaryCodes:
    """Codes shaped like BiLLM (2,1,1 / 1), CGB (2,2,1,1 / 2), RC (beta, no mean), rtn (1 / 0)."""
    g = torch.Generator().manual_seed(seed)
    G, K = len(orders), max(orders)
    nblk = -(-cols // block)
    sal = torch.rand(cols, generator=g) < 0.2 if 0 < n_salient < G else \
        torch.full((cols,), n_salient == G)
    u = torch.rand(rows, cols, generator=g)
    in_sal = (u * n_salient).long().clamp(max=max(n_salient - 1, 0))
    in_rest = n_salient + (u * (G - n_salient)).long().clamp(max=max(G - n_salient - 1, 0))
    group = torch.where(sal[None, :], in_sal, in_rest).to(torch.uint8)
    alpha = _fp16(torch.rand(G, K, rows, nblk, generator=g))
    for gi, o in enumerate(orders):
        alpha[gi, o:] = 0
    return BinaryCodes(
        group=group, signs=torch.rand(K, rows, cols, generator=g) > 0.5, alpha=alpha,
        mu=_fp16(torch.randn(G, rows, nblk, generator=g)) if mean else None,
        beta=_fp16(torch.rand(G, K, cols, generator=g) + 0.5) if beta else None,
        salient_cols=sal, orders=tuple(orders), n_salient=n_salient, block_size=block)


def uniform_codes(rows=6, cols=45, bits=3, groupsize=16, seed=0) -> UniformCodes:
    g = torch.Generator().manual_seed(seed)
    ng = -(-cols // groupsize)
    return UniformCodes(q=torch.randint(0, 2 ** bits, (rows, cols), generator=g).to(torch.uint8),
                        scale=_fp16(torch.rand(rows, ng, generator=g) + 0.01),
                        zero=torch.randint(0, 2 ** bits, (rows, ng), generator=g).float(),
                        bits=bits, groupsize=groupsize)


def partial_codes(rows=7, cols=33, high_bit=8, groupsize=33, frac=0.15, seed=0):
    g = torch.Generator().manual_seed(seed)
    sal = torch.rand(rows, cols, generator=g) < frac
    ng = -(-cols // groupsize)
    q = torch.randint(0, 2 ** high_bit, (rows, cols), generator=g).to(torch.uint8)
    return PartialBinaryCodes(
        salient=sal, q_high=torch.where(sal, q, 0), high_scale=_fp16(torch.rand(rows, generator=g)),
        high_zero=torch.randint(0, 2 ** high_bit, (rows,), generator=g).float(),
        signs=(torch.rand(rows, cols, generator=g) > 0.5) & ~sal,
        alpha=_fp16(torch.rand(rows, ng, generator=g)),
        mu=_fp16(torch.randn(rows, ng, generator=g)),
        high_bit=high_bit, groupsize=groupsize)


def factor_codes(rows=13, cols=37, rank=5, seed=0) -> FactorCodes:
    """binary-factor's codes: sign(U) (rows, r), sign(V) (cols, r), fp16 s_out, s_in."""
    g = torch.Generator().manual_seed(seed)
    return FactorCodes(u=torch.rand(rows, rank, generator=g) > 0.5,
                       v=torch.rand(cols, rank, generator=g) > 0.5,
                       s_out=_fp16(torch.rand(rows, generator=g) + 0.1),
                       s_in=_fp16(torch.randn(cols, generator=g)))


HAND_BUILT = {
    "rtn-like": lambda: binary_codes(orders=(1,), n_salient=0),
    "billm-like": lambda: binary_codes(),
    "cgb-like": lambda: binary_codes(rows=4, cols=130, block=64, orders=(2, 2, 1, 1), n_salient=2),
    "rc-like": lambda: binary_codes(mean=False, beta=True, seed=3),
    "rc-cgb-like": lambda: binary_codes(orders=(2, 2, 1, 1), n_salient=2, mean=False, beta=True),
    "all-salient": lambda: binary_codes(orders=(2,), n_salient=1),
    "three-rest-groups": lambda: binary_codes(orders=(2, 1, 1, 1), n_salient=1, seed=5),
    "uniform-3bit": lambda: uniform_codes(),
    "uniform-8bit-row": lambda: uniform_codes(bits=8, groupsize=45),
    "uniform-1bit": lambda: uniform_codes(rows=3, cols=9, bits=1, groupsize=4),
    "pb-8bit": lambda: partial_codes(),
    "pb-3bit-grouped": lambda: partial_codes(high_bit=3, groupsize=8, frac=0.4),
    "factor-r5": lambda: factor_codes(),
    "factor-r1": lambda: factor_codes(rows=1, cols=130, rank=1, seed=2),
    "factor-r19": lambda: factor_codes(rows=35, cols=21, rank=19, seed=3),
}
