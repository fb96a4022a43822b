"""CPU forward of packed layers by compiled kernels: the kernel form's products, read from its
packed bit planes (nothing dequantized), and 8-bit UniformCodes read in place from their packed
bytes (`uniform8_linear`, `uniform8_linear_bf16`: a q8 table as the output layer).

`form_matmul(form, x)` computes y = x Ŵᵀ (N, rows) for x (N, cols), fp32 (bf16 on the bf16
prefill path):

- N ≤ GEMV_MAX (decode, small batches): `torch.ops.binllm_cpu.bitpart` per BitPart on up
  to SMALL_BATCH inputs per call, a lookup-table GEMV over the bit planes (per x version and
  4 columns, a table of the 16 subset sums in fp32, so the result stays exact to fp32
  round-off; AVX-512: a 16-row tile's bytes of one plane column index two tables by their
  nibbles with `vpermps`, 16 rows × 8 columns per two permutes; elsewhere a portable C++
  loop of the same lookups), plus `sparse` for PB-LLM's salient weights. Nothing is
  dequantized. A layer's decode step skips the Python around these calls: its decoder
  (`bind_decoder`, the compiled module's `Decoder`, built once per form with the form's
  tensors checked then) is called from Python directly and runs `form_gemv` per stage, which
  reads x in its own dtype, runs every part (the same loops, the same fp32 sums) and returns y
  rounded to x's dtype with the bias added. The fp32 sums are grouped by the loop that runs
  them: AVX-512 and portable loops, and AVX-512 for 1–2 inputs (four partial sums per lookup)
  and 3–8 (two), add in different orders, so these results agree to fp32 round-off, not bit
  for bit; one loop on the same inputs gives the same bits.
- N > GEMV_MAX (prefill), x fp32 (or fp16): each part's weight is rebuilt ROW_CHUNK rows at a
  time into one reusable fp32 buffer (`bitpart_dense`, per x version) and multiplied by the
  fp32 GEMM; the sparse part is a CSR matmul.
- N > GEMV_MAX, x bf16 (a model held in bf16): y (bf16) is F.linear(x, Ŵ.to(torch.bfloat16)),
  the reference forward's product (to bf16 round-off: its fp32 sums may be ordered otherwise),
  computed by a bf16 GEMM (AMX where the CPU has it, through oneDNN): `bf16_chunk_rows` rows
  (a buffer of up to BF16_CHUNK_BYTES, at least ROW_CHUNK rows) of every part are rebuilt side
  by side into one bf16 buffer (`bitpart_dense_bf16`: the x versions' column scales applied,
  the sum in fp32 rounded once to bf16, round to nearest even as torch rounds; PB-LLM's
  salient levels written over their positions), x's columns gathered to match
  (`columns_bf16`, or x itself where the columns are in order), and one bf16 GEMM per chunk
  writes y's columns. On a CPU without bf16 instructions (`fast_bf16_matmul`) the GEMM is
  the fp32 one on the same bf16 values (x and the rebuilt rows, exact in fp32), rounded once to
  bf16: the same product to bf16 round-off, several times faster there than torch's converted
  bf16 GEMM. A ChainForm (binary-factor) stays on the fp32 path: its t between the
  stages is not a bf16 product of Ŵ, and rounding t would add an error the reference does not
  have.
- Where the extension cannot run (no compiler, not a CPU tensor, gradients wanted, or
  BINLLM_KERNELS=torch), the pure-PyTorch `form_matmul_torch` computes the same product and a
  one-time warning (logging) says why.

The extension is built and loaded by `binllm.kernels.cpu_build` (`extension()`).
"""

from __future__ import annotations

import functools
import logging
import warnings
from collections.abc import Iterator

import torch
from torch import Tensor

from .cpu_build import extension
from .cpu_features import fast_bf16_matmul
from .form import KernelForm, form_matmul_torch, part_inputs
from .form_ref import stages_of

log = logging.getLogger(__name__)

SMALL_BATCH = 8    # inputs per bit-plane GEMV call (the kernel's widest batch tile)
GEMV_MAX = 32      # largest N computed by GEMV calls (chunks of SMALL_BATCH); beyond: dense GEMM
ROW_CHUNK = 512    # rows rebuilt at a time on the prefill path (at least, for bf16)
BF16_CHUNK_BYTES = 2 << 20  # bf16 prefill: a chunk's rows fill up to this many buffer bytes
IMPLS = {"avx512": 0, "portable": 1}


@functools.lru_cache(maxsize=None)
def _warn_once(reason: str) -> None:
    log.warning("binllm: packed layers use the pure-PyTorch kernel form (slower): %s", reason)


def fast_path_reason(form: KernelForm, x: Tensor) -> str | None:
    """Why the compiled kernels cannot compute this product (None: they can)."""
    if x.device.type != "cpu":
        return f"no compiled kernel for {x.device.type} tensors here"
    if x.requires_grad and torch.is_grad_enabled():
        return "the compiled kernels have no backward (input requires grad)"
    status = extension()
    return None if status.ok else status.reason


def form_matmul(form: KernelForm, x: Tensor, impl: str = "avx512") -> Tensor:
    """y = x Ŵᵀ (N, rows) for x (N, cols), reading only the form (see module docstring): fp32,
    or bf16 where a bf16 x takes the bf16 prefill path (F.linear's own rounding).

    impl "avx512" uses the AVX-512 loops where they were compiled, "portable" the plain C++
    loops (of the GEMV and of the bf16 rebuild).
    """
    reason = fast_path_reason(form, x)
    if reason is not None:
        _warn_once(reason)
        return form_matmul_torch(form, x)
    stages = stages_of(form)
    if (x.dtype == torch.bfloat16 and x.shape[0] > GEMV_MAX and len(stages) == 1
            and (form.sparse is None or len(form.parts) == 1)):  # a sparse part: PB-LLM's form
        return _dense_chunks_bf16(form, x.contiguous(), impl)
    x = x.float().contiguous()
    for stage in stages:  # a ChainForm's stages in turn (t stays fp32 in between)
        x = _compiled(stage, x, impl)
    return x


def bind_decoder(form: KernelForm, impl: str = "avx512"):
    """`form_linear(form, x, bias)` of one form at decode, in one compiled call.

    Built once per form (a layer binds it at its first kernel-form forward, through
    `binllm.kernels.form_decoder`): the compiled module's `Decoder` holds the parts' tensors as
    `form_gemv`'s arguments (`stages`: rows, parts, sparse, groupsize and the parts' in_order
    flags per stage), checked once, so a call goes from Python straight to the kernels.
    `decoder(x, bias)` returns y (..., rows)
    in x's dtype for x (..., cols) fp32, bf16 or fp16 on the CPU with at most GEMV_MAX rows and
    no gradient wanted, and None for any other input (the registry's path computes it): each
    stage is `form_gemv` (x read in its own dtype, every part's product added into one fp32
    sum per SMALL_BATCH rows, the loops of `_compiled`), the last rounded once to x's dtype with
    the bias (rounded to x's dtype first) added there: bit for bit
    `form_matmul(form, x).to(x.dtype) + bias.to(x.dtype)`. A ChainForm's stages run in turn,
    t kept fp32 between them.
    """
    stages = [_gemv_args(stage) for stage in stages_of(form)]
    decoder = extension().module.Decoder(stages, form.cols, GEMV_MAX * form.cols, IMPLS[impl])
    decoder.stages = tuple(stages)
    return decoder


def decoder(form: KernelForm):
    """The form's `Decoder` where the compiled kernels are usable, else None."""
    return bind_decoder(form) if extension().ok else None


def uniform8_linear(q: Tensor, scale: Tensor, zero: Tensor, groupsize: int, x: Tensor,
                    impl: str = "avx512") -> Tensor | None:
    """F.linear(x, Ŵ) (..., rows) in x's dtype for 8-bit UniformCodes read in place from their
    packed tensors: q (rows · cols,) uint8, scale (rows, groups) fp16 or fp32, zero
    (rows · groups,) uint8, Ŵ = scale · (q − zero) in fp32 as `UniformCodes.dequantize`
    computes it, each product summed in fp32 and y rounded once to x's dtype (no kernel form,
    no dequantized table). None where the compiled kernels do not compute it: x neither fp32,
    bf16 nor fp16 (fp64), another device, gradients wanted, or no extension."""
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16) \
            or x.device.type != "cpu" or (x.requires_grad and torch.is_grad_enabled()) \
            or not extension().ok:
        return None
    cols = x.shape[-1]
    y = torch.ops.binllm_cpu.uniform8_gemv(x.reshape(-1, cols), q, scale, zero, groupsize,
                                           IMPLS[impl])
    return y.to(x.dtype).reshape(*x.shape[:-1], y.shape[-1])


def uniform8_linear_bf16(q: Tensor, scale: Tensor, zero: Tensor, groupsize: int, x: Tensor,
                         impl: str = "avx512") -> Tensor | None:
    """F.linear(x, Ŵ.to(torch.bfloat16)) (..., rows) bf16 for bf16 x and the 8-bit UniformCodes
    of `uniform8_linear`: `bf16_chunk_rows` rows of Ŵ at a time rebuilt into one bf16 buffer
    (`uniform8_dense_bf16`, Ŵ.to(torch.bfloat16)'s bits) and multiplied by the bf16 GEMM (the
    fp32 GEMM on the same values where the CPU has no bf16 instructions) into y's columns, as
    `_dense_chunks_bf16` does (no dequantized fp32 table). None for other x
    (another dtype or device, gradients wanted) or without the extension."""
    if x.dtype != torch.bfloat16 or x.device.type != "cpu" \
            or (x.requires_grad and torch.is_grad_enabled()) or not extension().ok:
        return None
    rows, cols = scale.shape[0], x.shape[-1]
    xs = x.reshape(-1, cols).contiguous()
    chunk = bf16_chunk_rows(cols)
    buf = torch.empty(min(chunk, rows), cols, dtype=torch.bfloat16)
    y = torch.empty(xs.shape[0], rows, dtype=torch.bfloat16)
    xs32 = None if fast_bf16_matmul() else xs.float()
    for r0 in range(0, rows, chunk):
        n = min(chunk, rows - r0)
        torch.ops.binllm_cpu.uniform8_dense_bf16(q, scale, zero, groupsize, r0, buf[:n],
                                                 IMPLS[impl])
        _mm_bf16(xs, buf[:n], y[:, r0:r0 + n], xs32)
    return y.reshape(*x.shape[:-1], rows)


def _mm_bf16(xs: Tensor, w: Tensor, out: Tensor, xs32: Tensor | None) -> None:
    """out = xs wᵀ for bf16 xs (N, K) and w (n, K), into a bf16 view (N, n) whose row stride is
    the GEMM's ldc: the bf16 GEMM, or with xs32 (xs in fp32: a CPU without bf16 instructions)
    the fp32 GEMM on the same values, rounded once to bf16."""
    if xs32 is None:
        torch.mm(xs, w.T, out=out)
    else:
        out.copy_(torch.mm(xs32, w.float().T))


def bf16_chunk_rows(K: int) -> int:
    """Rows rebuilt at a time on the bf16 prefill path for a buffer K columns wide: at least
    ROW_CHUNK, more while the buffer stays within BF16_CHUNK_BYTES (an L2's worth), so that a
    small layer is one GEMM writing y whole (a GEMM into a column slice of y is slower)."""
    return max(ROW_CHUNK, BF16_CHUNK_BYTES // (2 * K))


def _gemv_args(form: KernelForm) -> tuple[int, list[Tensor], list[Tensor], int, list[int]]:
    """rows, parts, sparse, groupsize, in_order: one KernelForm as `form_gemv` takes it (in_order:
    each BitPart's flag, 1 where its columns are x's in order, so that x is read in place)."""
    no_scale = torch.empty(0)  # the op's "no column scales"
    parts = [t for part in form.parts
             for t in (part.perm, no_scale if part.scale is None else part.scale, part.planes,
                       part.terms, part.cptr, part.cidx, part.fac, part.coef, part.seg)]
    sp = form.sparse
    sparse = [] if sp is None else [sp.rowptr, sp.col, sp.q, sp.scale, sp.zero, sp.sub]
    return (form.rows, parts, sparse, 0 if sp is None else sp.groupsize,
            [int(part.in_order) for part in form.parts])


def _compiled(form: KernelForm, x: Tensor, impl: str) -> Tensor:
    """y (N, rows) of one KernelForm by the compiled kernels, x (N, cols) fp32 contiguous."""
    if x.shape[0] > GEMV_MAX:
        return _dense_chunks(form, x)
    if x.shape[0] > SMALL_BATCH:
        return torch.cat([_compiled(form, x[i:i + SMALL_BATCH], impl)
                          for i in range(0, x.shape[0], SMALL_BATCH)])
    ops = torch.ops.binllm_cpu
    y = torch.zeros(x.shape[0], form.rows)
    no_scale = torch.empty(0)  # the op's "no column scales"
    for part in form.parts:
        scale = no_scale if part.scale is None else part.scale
        ops.bitpart(x, part.perm, scale, part.planes, part.terms, part.cptr, part.cidx,
                    part.fac, part.coef, part.seg, y, IMPLS[impl], part.in_order)
    if form.sparse is not None:
        sp = form.sparse
        ops.sparse(x, sp.rowptr, sp.col, sp.q, sp.scale, sp.zero, sp.sub, sp.groupsize, y,
                   IMPLS[impl])
    return y


def _dense_chunks(form: KernelForm, x: Tensor) -> Tensor:
    """Prefill: rebuild ROW_CHUNK rows of each part at a time into one buffer, dense GEMM."""
    ops = torch.ops.binllm_cpu
    y = torch.zeros(x.shape[0], form.rows)
    for part in form.parts:
        xv = part_inputs(part, x)  # (N, V, P)
        buf = torch.empty(min(ROW_CHUNK, form.rows), part.width)
        for r0 in range(0, form.rows, ROW_CHUNK):
            n = min(ROW_CHUNK, form.rows - r0)
            for v in range(xv.shape[1]):
                ops.bitpart_dense(part.planes, part.terms, part.cptr, part.cidx, part.fac,
                                  part.coef, part.seg, v, r0, buf[:n])
                y[:, r0:r0 + n].addmm_(xv[:, v], buf[:n].T)
    if form.sparse is not None:
        sp = form.sparse
        with warnings.catch_warnings():  # "sparse CSR support is in beta": ours is tested
            warnings.simplefilter("ignore")
            csr = torch.sparse_csr_tensor(sp.rowptr, sp.col.long(), sp.values(),
                                          (form.rows, form.cols), check_invariants=False)
        y += (csr @ x.T).T
    return y


def _dense_chunks_bf16(form: KernelForm, x: Tensor, impl: str) -> Tensor:
    """Prefill of a bf16 x (N, cols): y = F.linear(x, Ŵ.to(torch.bfloat16)) (N, rows) bf16.

    `bf16_chunk_rows` rows of every part are rebuilt side by side into one bf16 buffer
    (`bitpart_dense_bf16`: the x versions' column scales applied, summed in fp32, rounded once
    to bf16 as Ŵ.to(torch.bfloat16) rounds), and each chunk is one bf16 GEMM (AMX where the CPU
    has it) with the parts' x columns side by side (`columns_bf16`; x itself where the one
    part's columns are x's in order), accumulated in fp32 and rounded once, as F.linear is, into
    y's columns. A sparse part (PB-LLM: one BitPart over all columns) replaces the binary value
    under each salient weight, so its level scale·(q − zero) is written into the buffer.
    Where the CPU has no bf16 instructions (`fast_bf16_matmul`), the fp32 GEMM multiplies the
    same bf16 values instead and y is rounded once to bf16.
    """
    xs = columns_bf16(form, x)
    y = torch.empty(x.shape[0], form.rows, dtype=torch.bfloat16)
    xs32 = None if fast_bf16_matmul() else xs.float()
    for r0, w in rows_bf16(form, impl):
        _mm_bf16(xs, w, y[:, r0:r0 + w.shape[0]], xs32)
    return y


def columns_bf16(form: KernelForm, x: Tensor) -> Tensor:
    """Every part's x columns side by side (N, K) bf16, for x (N, cols) bf16 contiguous: the
    GEMM operand matching `rows_bf16`'s rows (x itself where its columns are in order)."""
    if _in_order(form):
        return x
    xs = torch.empty(x.shape[0], sum(part.width for part in form.parts), dtype=torch.bfloat16)
    c0 = 0
    for part in form.parts:
        torch.ops.binllm_cpu.columns_bf16(x, part.perm, xs[:, c0:c0 + part.width])
        c0 += part.width
    return xs


def rows_bf16(form: KernelForm, impl: str = "avx512") -> Iterator[tuple[int, Tensor]]:
    """(r0, Ŵ's rows [r0, r0 + n) (n, K) bf16) chunk by chunk: every part's rows side by side
    in `columns_bf16`'s column order, PB-LLM's salient levels written in. The chunks share one
    buffer: each is valid until the next is made."""
    ops = torch.ops.binllm_cpu
    K = sum(part.width for part in form.parts)
    chunk = bf16_chunk_rows(K)
    buf = torch.empty(min(chunk, form.rows), K, dtype=torch.bfloat16)
    salient = _salient_entries(form, K)
    no_scale = torch.empty(0)
    for r0 in range(0, form.rows, chunk):
        n = min(chunk, form.rows - r0)
        c0 = 0
        for part in form.parts:
            scale = no_scale if part.scale is None else part.scale
            ops.bitpart_dense_bf16(part.planes, part.terms, part.cptr, part.cidx, part.fac,
                                   part.coef, part.seg, scale, r0,
                                   buf[:n, c0:c0 + part.width], IMPLS[impl])
            c0 += part.width
        if salient is not None:
            at, level = salient
            k = slice(int(form.sparse.rowptr[r0]), int(form.sparse.rowptr[r0 + n]))
            buf.view(-1)[at[k] - r0 * K] = level[k]
        yield r0, buf[:n]


def _in_order(form: KernelForm) -> bool:
    """Whether the form is one part over x's columns in order, unpadded (q1_0, rtn-sign,
    GPTQ and PB-LLM with whole-byte groups): its GEMM operand is x itself."""
    part = form.parts[0] if len(form.parts) == 1 else None
    return part is not None and part.width == form.cols and part.in_order and \
        int(part.perm[-1]) >= 0


def _salient_entries(form: KernelForm, K: int) -> tuple[Tensor, Tensor] | None:
    """The sparse part's entries as (flat index r·K + buffer column, bf16 level) in CSR order,
    for the one BitPart whose columns fill the buffer (K wide); None without a sparse part."""
    sp = form.sparse
    if sp is None:
        return None
    perm = form.parts[0].perm
    column = torch.full((form.cols,), -1, dtype=torch.long)  # buffer column of each x column
    column[perm[perm >= 0]] = torch.nonzero(perm >= 0).flatten()
    r = torch.repeat_interleave(torch.arange(form.rows), sp.rowptr.diff())
    c = sp.col.long()
    level = sp.scale[r] * (sp.q.float() - sp.zero[r])  # = value + sub: the weight itself
    return r * K + column[c], level.to(torch.bfloat16)
