"""Layer-level codes: what a method produces and the packed format stores.

Every method returns one of these containers. `dequantize()` is *the* dequantization: the
reconstruction loop measures its error on it and the packed model computes its forward from
it, so a saved model reproduces the model in memory bit for bit. Floating-point fields hold
values at the container's `scale_dtype`: "float32" while a layer is calibrated (as the reference
code), then `round_scales` rounds them once to their storage precision (fp16 by default) when
the layer is finished; see `binllm.methods.base.Method.store`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import ClassVar, Literal

import torch
from torch import Tensor

ScaleDtype = Literal["float16", "float32"]  # a method's `scale_dtype` argument
SCALE_DTYPES = {"float16": torch.float16, "float32": torch.float32}
STORAGE_DTYPE = SCALE_DTYPES["float16"]  # scales and means are stored in fp16 by default


def to_storage(x: Tensor, dtype: ScaleDtype = "float16") -> Tensor:
    """Round to the storage precision `dtype`, returned as fp32 so calibration math stays fp32.

    "float16" (the default) rounds; "float32" keeps fp32 values as they are (the references).
    """
    return x.to(SCALE_DTYPES[dtype]).to(torch.float32)


Q8_FIELDS = ("alpha", "mu")  # BinaryCodes fields held as 8-bit codes when q8_rows > 0
Q8_LEVELS = 127  # 8-bit scale codes q ∈ [−127, 127] (`q8_round`)


def q8_round(x: Tensor, rows: int) -> Tensor:
    """x (..., R, nblk) rounded to 8-bit codes with one fp16 super-scale per `rows` rows.

    Like llama.cpp's k-quants, whose 6-bit sub-block scales share an fp16 scale per 256-weight
    super-block, but along the rows: each column block of each (group, order) has its R values
    cut into super-blocks of `rows` consecutive rows (the last may be shorter), and

        d = fp16(max |x| over the super-block),  q = round(127 · x / d) ∈ [−127, 127],
        value = (d · q) / 127   (fp32: d · q is exact, the division rounds once)

    The largest |x| gets q = ±127, so its value is d itself and `q8_split` recovers (q, d)
    from the values alone. Returns the values, fp32, shaped as x (all-zero super-blocks: 0).
    """
    q, d = _q8_codes(x, rows, from_values=False)
    return q8_values(q, d, rows)


def q8_values(q: Tensor, d: Tensor, rows: int) -> Tensor:
    """(d · q) / 127 of codes q (..., R, nblk) and super-scales d (..., ⌈R/rows⌉, nblk)."""
    idx = torch.arange(q.shape[-2], device=q.device) // rows  # (R,) super-block of each row
    return (d.to(torch.float32).index_select(-2, idx) * q.to(torch.float32)) / Q8_LEVELS


def q8_split(values: Tensor, rows: int) -> tuple[Tensor, Tensor]:
    """(q int8 (..., R, nblk), d fp16 (..., ⌈R/rows⌉, nblk)) of values made by `q8_round`.

    The caller checks `q8_values(q, d, rows) == values` (values not made by q8_round fail)."""
    return _q8_codes(values, rows, from_values=True)


def _q8_codes(x: Tensor, rows: int, from_values: bool) -> tuple[Tensor, Tensor]:
    *lead, R, nb = x.shape
    nsb = -(-R // rows)
    pad = torch.zeros(*lead, nsb * rows, nb, dtype=torch.float32, device=x.device)
    pad[..., :R, :] = x.to(torch.float32)
    xs = pad.reshape(*lead, nsb, rows, nb)  # (..., nsb, rows, nb)
    amax = xs.abs().amax(-2, keepdim=True)  # (..., nsb, 1, nb)
    d = amax.to(torch.float16).to(torch.float32)  # the stored super-scale (exact for values)
    safe = torch.where(d > 0, d, torch.ones_like(d))
    q = torch.where(d > 0, torch.round(xs * Q8_LEVELS / safe), torch.zeros_like(xs))
    q = q.clamp(-Q8_LEVELS, Q8_LEVELS)
    if not from_values:  # the largest |x| is d itself: code ±127 (recoverable from the values)
        top = (xs.abs() == amax) & (amax > 0)
        q = torch.where(top, torch.where(xs < 0, -Q8_LEVELS, Q8_LEVELS).to(q.dtype), q)
    q = q.reshape(*lead, nsb * rows, nb)[..., :R, :].to(torch.int8)
    return q, d.squeeze(-2).to(torch.float16)


def round_scales(codes, dtype: ScaleDtype):
    """`codes` with their scales and means (the container's SCALE_FIELDS) rounded to `dtype`.

    The codes themselves when they already are at `dtype` (their values are then exact in it).
    Integer fields (signs, levels, zero points) are kept as they are, and so are α and μ of
    BinaryCodes with 8-bit scale codes (q8_rows > 0: rounded by `q8_round` inside the loop).
    """
    if codes.scale_dtype == dtype:
        return codes
    q8 = Q8_FIELDS if getattr(codes, "q8_rows", 0) else ()  # 8-bit codes: already stored
    rounded = {f: to_storage(getattr(codes, f), dtype) for f in type(codes).SCALE_FIELDS
               if getattr(codes, f) is not None and f not in q8}
    return replace(codes, **rounded, scale_dtype=dtype)


def scale_bits(dtype: ScaleDtype) -> int:
    """Bits one stored scale or mean of `dtype` occupies."""
    return SCALE_DTYPES[dtype].itemsize * 8


def ceil_log2(n: int) -> int:
    """Bits needed to tell n alternatives apart (0 for a single one): ⌈log2 n⌉."""
    return 0 if n <= 1 else (n - 1).bit_length()


def per_weight(items, key: str) -> float:
    """Σ item.key · rows · cols / Σ rows · cols over `items` (each with a (rows, cols) `shape`):
    a model's bits per weight from its linears' (0 when there are none)."""
    n = sum(it.shape[0] * it.shape[1] for it in items)
    return sum(getattr(it, key) * it.shape[0] * it.shape[1] for it in items) / max(n, 1)


def _stream(n_bits: int) -> int:
    """Bits a packed stream of n_bits occupies on disk: whole bytes (binllm.packed.packing)."""
    return 8 * math.ceil(n_bits / 8)


@dataclass(frozen=True)
class BinaryCodes:
    """Grouped, multi-order binarization (rtn-sign, BiLLM, ARB-LLM and its variants).

    Ŵ[r, c] = μ[g, r, b] + Σ_o α[g, o, r, b] · β[g, o, c] · S[o, r, c]
    with g = group[r, c], b = c // block_size, S = ±1 from `signs`, o over the K planes
    (α is 0 for planes beyond a group's order, β is 1 when absent).

    | name         | meaning                                              | shape               |
    |--------------|------------------------------------------------------|---------------------|
    | group        | group id of every weight                             | (rows, cols) uint8  |
    | signs        | sign planes, True = +1                               | (K, rows, cols) bool|
    | alpha        | row scales per group, order and block                | (G, K, rows, nblk)  |
    | mu           | row means per group and block (None: no mean, RC)    | (G, rows, nblk)     |
    | beta         | column scales per group and order (ARB-RC) or None   | (G, K, cols)        |
    | salient_cols | structured salient columns (BiLLM's column bitmap)   | (cols,) bool        |
    | orders       | binarization order of each group                     | G ints              |
    | n_salient    | groups [0, n_salient) live in salient columns        | int                 |
    | scale_dtype  | storage precision of alpha, mu and beta              | "float16"/"float32" |
    | q8_rows      | 0: alpha, mu at scale_dtype; n > 0: 8-bit codes with | int                 |
    |              | one fp16 super-scale per n rows of each block        |                     |
    |              | (`q8_round`; beta stays at scale_dtype)              |                     |
    """

    SCALE_FIELDS: ClassVar[tuple[str, ...]] = ("alpha", "mu", "beta")
    SIGN_FIELDS: ClassVar[tuple[str, ...]] = ("signs",)  # bool planes, True = +1

    group: Tensor
    signs: Tensor
    alpha: Tensor
    mu: Tensor | None
    beta: Tensor | None
    salient_cols: Tensor
    orders: tuple[int, ...]
    n_salient: int
    block_size: int
    scale_dtype: ScaleDtype = "float16"
    q8_rows: int = 0

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.group.shape)

    def dequantize(self) -> Tensor:
        """Ŵ (rows, cols) fp32, gathering each weight's own group's α, μ, β (rows in chunks)."""
        rows, cols = self.group.shape
        dev = self.group.device
        G, K = len(self.orders), self.signs.shape[0]
        blk = torch.arange(cols, device=dev) // self.block_size  # (cols,)
        orders = torch.tensor(self.orders, device=dev)  # (G,)
        cols_G = torch.arange(cols, device=dev) * G  # (cols,)
        Q = torch.empty(rows, cols, dtype=torch.float32, device=dev)
        step = max(1, (1 << 21) // max(cols, 1))
        for r0 in range(0, rows, step):
            r = slice(r0, min(r0 + step, rows))
            g = self.group[r].long()  # (n, cols)
            idx = blk[None, :] * G + g  # (n, cols): entry (block, group) of each weight's row
            col_idx = cols_G[None, :] + g if self.beta is not None else None  # (n, cols)

            def at(table: Tensor) -> Tensor:  # (G, rows, nblk) -> (n, cols)
                per_row = table[:, r].permute(1, 2, 0).reshape(g.shape[0], -1)  # (n, nblk·G)
                return torch.gather(per_row, 1, idx)

            acc = None
            for o in range(K):
                term = at(self.alpha[:, o]) * (self.signs[o, r].to(torch.float32) * 2 - 1)
                if self.beta is not None:  # β[g, o, c] from the (cols, G) table
                    term = term * torch.take(self.beta[:, o].T.contiguous(), col_idx)
                if acc is None:
                    acc = term if self.mu is None else at(self.mu) + term
                else:  # plane o only where the group's order reaches it
                    acc = torch.where(orders[g] > o, acc + term, acc)
            Q[r] = acc
        return Q

    @staticmethod
    def cat(blocks: list[BinaryCodes]) -> BinaryCodes:
        """Join per-block codes along the columns (every block but the last is full)."""
        first = blocks[0]

        def join(name: str, dim: int):
            parts = [getattr(b, name) for b in blocks]
            return None if parts[0] is None else torch.cat(parts, dim=dim)

        return replace(first, group=join("group", 1), signs=join("signs", 2),
                       alpha=join("alpha", 3), mu=join("mu", 2), beta=join("beta", 2),
                       salient_cols=join("salient_cols", 0))

    # -- bit accounting ---------------------------------------------------------------
    def paper_bits(self) -> float:
        """Bits per weight as the papers count them: one bit per sign plane of each weight."""
        # each weight's order as fp32, filled group by group (no int64 copy of the group map)
        order_of = torch.empty(self.group.shape, dtype=torch.float32, device=self.group.device)
        for g, order in enumerate(self.orders):
            order_of.masked_fill_(self.group == g, float(order))
        return order_of.mean().item()

    def stored_bits(self) -> int:
        """Every bit the packed form stores: sign planes, bitmaps, scales and means.

        Equals the bytes binllm.packed.layout.pack writes for these codes, × 8 (each bit stream is
        padded to whole bytes).
        """
        rows, cols = self.group.shape
        n_sal_cols = int(self.salient_cols.sum())
        col_count = {True: n_sal_cols, False: cols - n_sal_cols}
        G, K = len(self.orders), self.signs.shape[0]
        nblk = self.alpha.shape[-1]
        is_sal = [g < self.n_salient for g in range(G)]
        bits = 0
        for o in range(K):  # plane o: one stream over the column classes holding order > o
            bits += _stream(rows * sum(col_count[sal] for sal in (True, False) if any(
                self.orders[g] > o and is_sal[g] == sal for g in range(G))))
        bits += _stream(rows * n_sal_cols * ceil_log2(self.n_salient))  # group ids, salient cols
        # group ids, the other columns
        bits += _stream(rows * col_count[False] * ceil_log2(G - self.n_salient))
        if 0 < self.n_salient < G:
            bits += _stream(cols)  # salient-column bitmap
        pairs = [(g, o) for g in range(G) for o in range(self.orders[g])]
        fb = scale_bits(self.scale_dtype)
        # one α (and μ) per row and block: fb bits, or an 8-bit code plus its share of the
        # fp16 super-scales (one per q8_rows rows and block)
        per_table = (rows * nblk * 8 + -(-rows // self.q8_rows) * nblk * 16 if self.q8_rows
                     else rows * nblk * fb)
        bits += len(pairs) * per_table  # alpha
        if self.mu is not None:
            bits += G * per_table
        if self.beta is not None:
            bits += sum(col_count[is_sal[g]] for g, _ in pairs) * fb
        return bits


@dataclass(frozen=True)
class UniformCodes:
    """Uniform asymmetric integer codes (GPTQ baseline): Ŵ = scale · (q − zero) per group.

    | name  | meaning                          | shape                 |
    |-------|----------------------------------|-----------------------|
    | q     | integer levels in [0, 2^bits−1]  | (rows, cols) uint8    |
    | scale | step per row and group           | (rows, ngroups)       |
    | zero  | integer zero point               | (rows, ngroups)       |

    scale_dtype: storage precision of scale ("float16" or "float32").
    """

    SCALE_FIELDS: ClassVar[tuple[str, ...]] = ("scale",)
    SIGN_FIELDS: ClassVar[tuple[str, ...]] = ()

    q: Tensor
    scale: Tensor
    zero: Tensor
    bits: int
    groupsize: int
    scale_dtype: ScaleDtype = "float16"

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.q.shape)

    def dequantize(self) -> Tensor:
        g = torch.arange(self.q.shape[1], device=self.q.device) // self.groupsize  # (cols,)
        return self.scale[:, g] * (self.q.to(torch.float32) - self.zero[:, g])

    def paper_bits(self) -> float:
        return float(self.bits)

    def stored_bits(self) -> int:
        rows, cols = self.q.shape
        fb = scale_bits(self.scale_dtype)
        return (_stream(rows * cols * self.bits) + self.scale.numel() * fb  # q, scale
                + _stream(self.scale.numel() * self.bits))  # zero points


@dataclass(frozen=True)
class PartialBinaryCodes:
    """PB-LLM: unstructured salient weights at `high_bit`, the rest binarized.

    Ŵ = where(salient, s_h · (q_high − z_h), α · S + μ), row-wise statistics.

    | name       | meaning                                        | shape              |
    |------------|------------------------------------------------|--------------------|
    | salient    | salient positions (kept at high_bit)           | (rows, cols) bool  |
    | q_high     | levels of salient weights (0 elsewhere)        | (rows, cols) uint8 |
    | high_scale | step of the per-row high-bit grid              | (rows,)            |
    | high_zero  | integer zero point of that grid                | (rows,)            |
    | signs      | signs of binarized weights, True = +1          | (rows, cols) bool  |
    | alpha      | binarization scale per row and group           | (rows, ngroups)    |
    | mu         | binarization mean per row and group            | (rows, ngroups)    |

    scale_dtype: storage precision of high_scale, alpha and mu ("float16" or "float32").
    """

    SCALE_FIELDS: ClassVar[tuple[str, ...]] = ("high_scale", "alpha", "mu")
    SIGN_FIELDS: ClassVar[tuple[str, ...]] = ("signs",)  # used where not salient

    salient: Tensor
    q_high: Tensor
    high_scale: Tensor
    high_zero: Tensor
    signs: Tensor
    alpha: Tensor
    mu: Tensor
    high_bit: int
    groupsize: int
    scale_dtype: ScaleDtype = "float16"

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.signs.shape)

    def dequantize(self) -> Tensor:
        g = torch.arange(self.signs.shape[1], device=self.signs.device) // self.groupsize
        low = self.alpha[:, g] * (self.signs.to(torch.float32) * 2 - 1) + self.mu[:, g]
        high = self.high_scale[:, None] * (self.q_high.to(torch.float32) - self.high_zero[:, None])
        return torch.where(self.salient, high, low)

    def paper_bits(self) -> float:
        f = self.salient.float().mean().item()
        return (1 - f) * 1 + f * self.high_bit

    def stored_bits(self) -> int:
        numel = self.signs.numel()
        n_sal = int(self.salient.sum())
        fb = scale_bits(self.scale_dtype)
        return (_stream(numel)  # salient-position bitmap (bit streams padded to bytes)
                + _stream(n_sal * self.high_bit) + _stream(numel - n_sal)  # salient levels, signs
                + self.high_scale.numel() * fb + _stream(self.high_zero.numel() * self.high_bit)
                + (self.alpha.numel() + self.mu.numel()) * fb)


def codes_fields(codes) -> dict[str, object]:
    """The codes' fields by name (tensors and metadata alike)."""
    return {f.name: getattr(codes, f.name) for f in fields(codes)}
