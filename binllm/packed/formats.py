"""The stored tensors of each codes container (format_version 1; conventions in
binllm.packed.packing).

Shapes use rows = out_features, cols = in_features. `bits(n)` is a uint8 stream of ⌈n/8⌉
bytes, `uint_b(n)` an n-value stream of b-bit integers (⌈n·b/8⌉ bytes). `float` is the dtype of
the layout param "scale_dtype" of every format: fp16 ("float16", also when the param is absent)
or fp32 ("float32").

binary — BinaryCodes (rtn-sign, BiLLM, ARB-*). G groups of orders o_g; groups [0, n_salient)
live in the S salient columns, the others in the R = cols − S remaining ones; P = Σ o_g pairs
(g, o) with o < o_g, P_S of them salient; nblk = ⌈cols / block_size⌉.

| suffix        | content                                                | shape, dtype        |
|---------------|--------------------------------------------------------|---------------------|
| signs{o}      | plane o (1 = +1) over the column classes that hold a   | bits(rows·width_o)  |
|               | group of order > o (all columns → natural order)       |                     |
| salient_cols  | salient-column bitmap, only when 0 < n_salient < G     | bits(cols)          |
| group_salient | group id in salient columns, b_S = ⌈log2 n_salient⌉    | uint_{b_S}(rows·S)  |
| group_rest    | group id − n_salient, b_R = ⌈log2(G − n_salient)⌉      | uint_{b_R}(rows·R)  |
| alpha         | α of the used pairs, g-major then o                    | float (P,rows,nblk) |
| mu            | μ of every group (absent without a mean, ARB-RC)       | float (G,rows,nblk) |
| beta_salient  | β of the salient pairs over the salient columns (RC)   | float (P_S, S)      |
| beta_rest     | β of the other pairs over the other columns (RC)       | float (P − P_S, R)  |

With the layout param "q8_rows" = n (8-bit scale codes, `binllm.methods.codes.q8_round`;
absent in older layouts: floats), alpha and mu are stored as codes plus fp16 super-scales,
one per n rows of each block (nsb = ⌈rows / n⌉), value = (d · q) / 127 in fp32:
alpha_q int8 (P, rows, nblk), alpha_d fp16 (P, nsb, nblk), mu_q int8 (G, rows, nblk),
mu_d fp16 (G, nsb, nblk).

uniform — UniformCodes (gptq), ngroups = ⌈cols / groupsize⌉:
q uint_bits(rows·cols), scale float (rows, ngroups), zero uint_bits(rows·ngroups).

partial-binary — PartialBinaryCodes (PB-LLM PTQ and QAT), n = number of salient weights:
salient bits(rows·cols), q_high uint_{high_bit}(n) (salient weights in row-major order),
signs bits(rows·cols − n) (the other weights in row-major order), high_scale float (rows,),
high_zero uint_{high_bit}(rows), alpha and mu float (rows, ngroups).

factor — FactorCodes (binary-factor), r = the layout param "rank":
u bits(rows·r) (sign(U), row-major (rows, r), 1 = +1), v bits(cols·r) (sign(V), row-major
(cols, r)), s_out float (rows,), s_in float (cols,).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import torch
from torch import Tensor

from ..methods.codes import (SCALE_DTYPES, BinaryCodes, PartialBinaryCodes, UniformCodes,
                             ceil_log2, q8_split, q8_values)
from ..methods.factor_codes import FactorCodes
from .packing import (
    CodesFormat,
    PackingError,
    TensorSpec,
    bit_spec,
    float_spec,
    pack_bits,
    pack_uint,
    scale_dtype_name,
    scale_dtype_of,
    to_exact,
    unpack_bits,
    unpack_uint,
    unpack_uint_rows,
)


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _check_keys(kind: str, p: Mapping[str, Any], need: set[str],
                optional: frozenset[str] = frozenset()) -> None:
    """Refuse params other than `need` plus the optional "scale_dtype" (absent: fp16)."""
    if set(p) - {"scale_dtype"} - optional != need:
        raise PackingError(f"{kind} layout params {sorted(p)} differ from {sorted(need)} "
                           "(and an optional scale_dtype)")
    scale_dtype_name(p)


# -- binary ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class _BinaryPlan:
    """Sizes derived from (rows, cols, params), shared by specs, pack and unpack."""

    G: int
    K: int
    S: int                       # salient columns
    R: int                       # other columns
    nblk: int
    planes: tuple[tuple[bool, bool], ...]  # per plane: stored over (salient, other) columns
    pairs: tuple[tuple[int, int], ...]     # (g, o) with o < order_g, g-major
    n_salient_pairs: int
    bits_salient: int
    bits_rest: int
    bitmap: bool


def _binary_plan(rows: int, cols: int, p: Mapping[str, Any]) -> _BinaryPlan:
    orders, n_sal = list(p["orders"]), int(p["n_salient"])
    G, K, S = len(orders), int(p["planes"]), int(p["salient_columns"])
    planes = tuple((any(orders[g] > o for g in range(n_sal)),
                    any(orders[g] > o for g in range(n_sal, G))) for o in range(K))
    pairs = tuple((g, o) for g in range(G) for o in range(orders[g]))
    return _BinaryPlan(G, K, S, cols - S, _ceil_div(cols, int(p["block_size"])), planes, pairs,
                       sum(1 for g, _ in pairs if g < n_sal), ceil_log2(n_sal),
                       ceil_log2(G - n_sal), 0 < n_sal < G)


def _binary_check(rows: int, cols: int, p: Mapping[str, Any]) -> None:
    _check_keys("binary", p, {"orders", "n_salient", "planes", "block_size", "mean",
                              "column_scales", "salient_columns"}, frozenset({"q8_rows"}))
    if "q8_rows" in p and (not isinstance(p["q8_rows"], int) or p["q8_rows"] < 1):
        raise PackingError(f"binary layout: q8_rows={p['q8_rows']!r} must be a positive int")
    orders, n_sal, S = list(p["orders"]), int(p["n_salient"]), int(p["salient_columns"])
    if not orders or not 0 <= n_sal <= len(orders) or len(orders) > 256 \
            or any(not 0 <= o <= int(p["planes"]) for o in orders) or int(p["block_size"]) < 1:
        raise PackingError(f"inconsistent binary layout params {dict(p)}")
    if not 0 <= S <= cols or (n_sal == 0 and S != 0) or (n_sal == len(orders) and S != cols):
        raise PackingError(f"binary layout: {S} salient columns of {cols} do not fit "
                           f"n_salient={n_sal} of {len(orders)} groups")


def _binary_params(c: BinaryCodes) -> dict[str, Any]:
    return {"orders": list(c.orders), "n_salient": c.n_salient, "planes": c.signs.shape[0],
            "block_size": c.block_size, "mean": c.mu is not None,
            "column_scales": c.beta is not None, "salient_columns": int(c.salient_cols.sum()),
            "scale_dtype": c.scale_dtype, **({"q8_rows": c.q8_rows} if c.q8_rows else {})}


def _binary_specs(rows: int, cols: int, p: Mapping[str, Any]) -> dict[str, TensorSpec]:
    pl, fd = _binary_plan(rows, cols, p), scale_dtype_of(p)
    specs = {f"signs{o}": bit_spec(rows * (pl.S * s + pl.R * r))
             for o, (s, r) in enumerate(pl.planes)}
    if pl.bitmap:
        specs["salient_cols"] = bit_spec(cols)
    specs["group_salient"] = bit_spec(rows * pl.S * pl.bits_salient)
    specs["group_rest"] = bit_spec(rows * pl.R * pl.bits_rest)
    tables = {"alpha": len(pl.pairs), **({"mu": pl.G} if p["mean"] else {})}
    for name, n in tables.items():
        if "q8_rows" in p:
            nsb = _ceil_div(rows, int(p["q8_rows"]))
            specs[f"{name}_q"] = TensorSpec((n, rows, pl.nblk), torch.int8)
            specs[f"{name}_d"] = float_spec(n, nsb, pl.nblk, dtype=torch.float16)
        else:
            specs[name] = float_spec(n, rows, pl.nblk, dtype=fd)
    if p["column_scales"]:
        specs["beta_salient"] = float_spec(pl.n_salient_pairs, pl.S, dtype=fd)
        specs["beta_rest"] = float_spec(len(pl.pairs) - pl.n_salient_pairs, pl.R, dtype=fd)
    return specs


def _pair_index(pl: _BinaryPlan, device) -> tuple[Tensor, Tensor]:
    g, o = zip(*pl.pairs) if pl.pairs else ((), ())
    return (torch.tensor(g, dtype=torch.long, device=device),
            torch.tensor(o, dtype=torch.long, device=device))


def _binary_pack(c: BinaryCodes) -> dict[str, Tensor]:
    rows, cols = c.shape
    p = _binary_params(c)
    _binary_check(rows, cols, p)
    pl, fd = _binary_plan(rows, cols, p), SCALE_DTYPES[c.scale_dtype]
    sal = c.salient_cols.bool()  # (cols,)
    # (rows, cols); uint8 group maps stay uint8 (an int64 copy is 8 bytes per weight)
    group = c.group if c.group.dtype == torch.uint8 else c.group.long()
    if group.numel() and (group.min() < 0 or group.max() >= pl.G):
        raise PackingError(f"group ids outside [0, {pl.G})")
    if not torch.equal(group < c.n_salient, sal[None, :].expand(rows, cols)):
        raise PackingError("groups [0, n_salient) must fill exactly the salient columns; "
                           "these codes mix them and cannot be stored by column class")
    out = {}
    for o, (s, r) in enumerate(pl.planes):
        plane = c.signs[o].bool()  # (rows, cols)
        if s != r:
            plane = plane[:, sal] if s else plane[:, ~sal]  # (rows, S) or (rows, R)
        out[f"signs{o}"] = pack_bits(plane.reshape(-1)) if (s or r) else plane.new_zeros(0)
    if pl.bitmap:
        out["salient_cols"] = pack_bits(sal)
    out["group_salient"] = pack_uint(group[:, sal], pl.bits_salient)  # (rows, S) flat
    out["group_rest"] = pack_uint(group[:, ~sal] - c.n_salient, pl.bits_rest)  # (rows, R) flat
    gi, oi = _pair_index(pl, c.alpha.device)
    tables = {"alpha": c.alpha[gi, oi], **({"mu": c.mu} if c.mu is not None else {})}
    for name, x in tables.items():  # (P, rows, nblk), (G, rows, nblk)
        if c.q8_rows:
            q, d = q8_split(x, c.q8_rows)
            if not torch.equal(q8_values(q, d, c.q8_rows), x.to(torch.float32)):
                raise PackingError(f"{name} holds values that are not 8-bit codes of its "
                                   "super-scales: round them with codes.q8_round")
            out[f"{name}_q"], out[f"{name}_d"] = q, d
        else:
            out[name] = to_exact(x, name, fd)
    if c.beta is not None:
        k = pl.n_salient_pairs
        beta = c.beta[gi, oi]  # (P, cols)
        out["beta_salient"] = to_exact(beta[:k][:, sal], "beta", fd)  # (P_S, S)
        out["beta_rest"] = to_exact(beta[k:][:, ~sal], "beta", fd)  # (P − P_S, R)
    return out


def _binary_unpack(t: Mapping[str, Tensor], rows: int, cols: int,
                   p: Mapping[str, Any]) -> BinaryCodes:
    pl = _binary_plan(rows, cols, p)
    n_sal = int(p["n_salient"])
    q8 = int(p.get("q8_rows", 0))

    def table(name: str) -> Tensor:
        return q8_values(t[f"{name}_q"], t[f"{name}_d"], q8) if q8 else t[name].float()

    dev = next(iter(t.values())).device
    if pl.bitmap:
        sal = unpack_bits(t["salient_cols"], cols)  # (cols,)
        if int(sal.sum()) != pl.S:
            raise PackingError(f"the salient-column bitmap marks {int(sal.sum())} columns, "
                               f"config.json says {pl.S}: the file is corrupt")
    else:
        sal = torch.full((cols,), n_sal > 0, dtype=torch.bool, device=dev)
    group = torch.empty(rows, cols, dtype=torch.uint8, device=dev)
    group[:, sal] = unpack_uint(t["group_salient"], rows * pl.S, pl.bits_salient).view(rows, pl.S)
    rest = unpack_uint(t["group_rest"], rows * pl.R, pl.bits_rest).view(rows, pl.R)
    group[:, ~sal] = rest + n_sal
    if group.numel() and int(group.max()) >= pl.G:
        raise PackingError(f"group ids ≥ {pl.G} in the stored group bitmaps: the file is corrupt")
    signs = torch.zeros(pl.K, rows, cols, dtype=torch.bool, device=dev)
    for o, (s, r) in enumerate(pl.planes):
        width = pl.S * s + pl.R * r
        plane = unpack_bits(t[f"signs{o}"], rows * width).view(rows, width)  # (rows, width)
        if s and r:
            signs[o] = plane
        elif s:
            signs[o][:, sal] = plane
        elif r:
            signs[o][:, ~sal] = plane
    gi, oi = _pair_index(pl, dev)
    alpha = torch.zeros(pl.G, pl.K, rows, pl.nblk, dtype=torch.float32, device=dev)
    alpha[gi, oi] = table("alpha")  # (P, rows, nblk)
    mu = table("mu") if p["mean"] else None
    beta = None
    if p["column_scales"]:
        k = pl.n_salient_pairs
        beta = torch.ones(pl.G, pl.K, cols, dtype=torch.float32, device=dev)
        for part, cls, key in ((slice(None, k), sal, "beta_salient"),
                               (slice(k, None), ~sal, "beta_rest")):
            cidx = cls.nonzero().flatten()  # (S,) or (R,)
            beta[gi[part, None], oi[part, None], cidx[None, :]] = t[key].float()
    return BinaryCodes(group=group, signs=signs, alpha=alpha, mu=mu, beta=beta, salient_cols=sal,
                       orders=tuple(int(o) for o in p["orders"]), n_salient=n_sal,
                       block_size=int(p["block_size"]), scale_dtype=scale_dtype_name(p),
                       q8_rows=q8)


# -- uniform ---------------------------------------------------------------------------------
def _uniform_check(rows: int, cols: int, p: Mapping[str, Any]) -> None:
    _check_keys("uniform", p, {"bits", "groupsize"})
    if not 1 <= int(p["bits"]) <= 8 or int(p["groupsize"]) < 1:
        raise PackingError(f"uniform layout params {dict(p)}: need bits in 1..8 and groupsize ≥ 1")


def _uniform_specs(rows: int, cols: int, p: Mapping[str, Any]) -> dict[str, TensorSpec]:
    b, ng = int(p["bits"]), _ceil_div(cols, int(p["groupsize"]))
    return {"q": bit_spec(rows * cols * b), "scale": float_spec(rows, ng, dtype=scale_dtype_of(p)),
            "zero": bit_spec(rows * ng * b)}


def _uniform_params(c: UniformCodes) -> dict[str, Any]:
    return {"bits": c.bits, "groupsize": c.groupsize, "scale_dtype": c.scale_dtype}


def _uniform_pack(c: UniformCodes) -> dict[str, Tensor]:
    fd = SCALE_DTYPES[c.scale_dtype]
    return {"q": pack_uint(c.q, c.bits), "scale": to_exact(c.scale, "scale", fd),
            "zero": pack_uint(c.zero, c.bits)}


def _uniform_unpack(t: Mapping[str, Tensor], rows: int, cols: int,
                    p: Mapping[str, Any]) -> UniformCodes:
    b, gs = int(p["bits"]), int(p["groupsize"])
    ng = _ceil_div(cols, gs)
    return UniformCodes(q=unpack_uint(t["q"], rows * cols, b).view(rows, cols),
                        scale=t["scale"].float(),
                        zero=unpack_uint(t["zero"], rows * ng, b).view(rows, ng).float(),
                        bits=b, groupsize=gs, scale_dtype=scale_dtype_name(p))


def uniform_rows(t: Mapping[str, Tensor], rows: int, cols: int, p: Mapping[str, Any],
                 ids: Tensor) -> UniformCodes | None:
    """The UniformCodes of rows `ids` (n,) alone, the other rows' levels left packed; None
    unless a row's levels are whole bytes (cols · bits a multiple of 8)."""
    b, gs = int(p["bits"]), int(p["groupsize"])
    if cols * b % 8:
        return None
    zero = unpack_uint_rows(t["zero"], rows, _ceil_div(cols, gs), b, ids)
    return UniformCodes(q=unpack_uint_rows(t["q"], rows, cols, b, ids),
                        scale=t["scale"][ids].float(), zero=zero.float(),
                        bits=b, groupsize=gs, scale_dtype=scale_dtype_name(p))


# -- partial binary ----------------------------------------------------------------------------
def _partial_check(rows: int, cols: int, p: Mapping[str, Any]) -> None:
    _check_keys("partial-binary", p, {"high_bit", "groupsize", "salient_count"})
    if not 1 <= int(p["high_bit"]) <= 8 or int(p["groupsize"]) < 1 \
            or not 0 <= int(p["salient_count"]) <= rows * cols:
        raise PackingError(f"partial-binary layout params {dict(p)}: need high_bit in 1..8, "
                           f"groupsize ≥ 1 and 0 ≤ salient_count ≤ {rows * cols}")


def _partial_specs(rows: int, cols: int, p: Mapping[str, Any]) -> dict[str, TensorSpec]:
    hb, n, ng = int(p["high_bit"]), int(p["salient_count"]), _ceil_div(cols, int(p["groupsize"]))
    fd = scale_dtype_of(p)
    return {"salient": bit_spec(rows * cols), "q_high": bit_spec(n * hb),
            "signs": bit_spec(rows * cols - n), "high_scale": float_spec(rows, dtype=fd),
            "high_zero": bit_spec(rows * hb), "alpha": float_spec(rows, ng, dtype=fd),
            "mu": float_spec(rows, ng, dtype=fd)}


def _partial_params(c: PartialBinaryCodes) -> dict[str, Any]:
    return {"high_bit": c.high_bit, "groupsize": c.groupsize, "salient_count": int(c.salient.sum()),
            "scale_dtype": c.scale_dtype}


def _partial_pack(c: PartialBinaryCodes) -> dict[str, Tensor]:
    sal = c.salient.bool()  # (rows, cols)
    fd = SCALE_DTYPES[c.scale_dtype]
    return {"salient": pack_bits(sal.reshape(-1)),
            "q_high": pack_uint(c.q_high[sal], c.high_bit),  # (n,) row-major
            "signs": pack_bits(c.signs.bool()[~sal]),  # (rows·cols − n,) row-major
            "high_scale": to_exact(c.high_scale, "high_scale", fd),
            "high_zero": pack_uint(c.high_zero, c.high_bit),
            "alpha": to_exact(c.alpha, "alpha", fd), "mu": to_exact(c.mu, "mu", fd)}


def _partial_unpack(t: Mapping[str, Tensor], rows: int, cols: int,
                    p: Mapping[str, Any]) -> PartialBinaryCodes:
    hb, n = int(p["high_bit"]), int(p["salient_count"])
    sal = unpack_bits(t["salient"], rows * cols).view(rows, cols)
    if int(sal.sum()) != n:
        raise PackingError(f"the salient bitmap marks {int(sal.sum())} weights, config.json "
                           f"says {n}: the file is corrupt")
    # masked_scatter_ fills the True positions in row-major order, as pack read them
    q_high = torch.zeros(rows, cols, dtype=torch.uint8, device=sal.device)
    q_high.masked_scatter_(sal, unpack_uint(t["q_high"], n, hb))
    signs = torch.zeros(rows, cols, dtype=torch.bool, device=sal.device)
    signs.masked_scatter_(~sal, unpack_bits(t["signs"], rows * cols - n))
    return PartialBinaryCodes(salient=sal, q_high=q_high, high_scale=t["high_scale"].float(),
                              high_zero=unpack_uint(t["high_zero"], rows, hb).float(),
                              signs=signs, alpha=t["alpha"].float(), mu=t["mu"].float(),
                              high_bit=hb, groupsize=int(p["groupsize"]),
                              scale_dtype=scale_dtype_name(p))


# -- factor ------------------------------------------------------------------------------------
def _factor_check(rows: int, cols: int, p: Mapping[str, Any]) -> None:
    _check_keys("factor", p, {"rank"})
    if not isinstance(p["rank"], int) or p["rank"] < 1:
        raise PackingError(f"factor layout: rank={p['rank']!r} must be a positive int")


def _factor_specs(rows: int, cols: int, p: Mapping[str, Any]) -> dict[str, TensorSpec]:
    r, fd = int(p["rank"]), scale_dtype_of(p)
    return {"u": bit_spec(rows * r), "v": bit_spec(cols * r),
            "s_out": float_spec(rows, dtype=fd), "s_in": float_spec(cols, dtype=fd)}


def _factor_params(c: FactorCodes) -> dict[str, Any]:
    return {"rank": c.rank, "scale_dtype": c.scale_dtype}


def _factor_pack(c: FactorCodes) -> dict[str, Tensor]:
    fd = SCALE_DTYPES[c.scale_dtype]
    return {"u": pack_bits(c.u.bool().reshape(-1)), "v": pack_bits(c.v.bool().reshape(-1)),
            "s_out": to_exact(c.s_out, "s_out", fd), "s_in": to_exact(c.s_in, "s_in", fd)}


def _factor_unpack(t: Mapping[str, Tensor], rows: int, cols: int,
                   p: Mapping[str, Any]) -> FactorCodes:
    r = int(p["rank"])
    return FactorCodes(u=unpack_bits(t["u"], rows * r).view(rows, r),
                       v=unpack_bits(t["v"], cols * r).view(cols, r),
                       s_out=t["s_out"].float(), s_in=t["s_in"].float(),
                       scale_dtype=scale_dtype_name(p))


FORMATS: Mapping[str, CodesFormat] = MappingProxyType({f.name: f for f in (
    CodesFormat("binary", BinaryCodes, _binary_params, _binary_specs, _binary_pack,
                _binary_unpack, _binary_check),
    CodesFormat("uniform", UniformCodes, _uniform_params, _uniform_specs, _uniform_pack,
                _uniform_unpack, _uniform_check),
    CodesFormat("partial-binary", PartialBinaryCodes, _partial_params, _partial_specs,
                _partial_pack, _partial_unpack, _partial_check),
    CodesFormat("factor", FactorCodes, _factor_params, _factor_specs, _factor_pack,
                _factor_unpack, _factor_check),
)})
