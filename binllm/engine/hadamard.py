"""Orthogonal matrices for rotating a residual stream: Hadamard where one is known, else random.

A Hadamard matrix H of order n has ±1 entries and H Hᵀ = n I. Orders built here:
Sylvester's 2^k, Paley's construction I (q + 1 for a prime q ≡ 3 mod 4, e.g. 12, 20, 24,
44, 48, 72) and Kronecker products of the two (H_a ⊗ H_b has order a · b), which covers the
usual widths: 576 = 8 · 72, 768 = 2^8 · 3 has none, 2880 = 64 · 45 has none, 4096 = 2^12.
Where none is found, a seeded random orthogonal matrix (QR of a Gaussian, SpinQuant's
starting point) stands in. Either way the rotation R = D H / √n (D a seeded random ±1
diagonal) is orthogonal, so it costs nothing once folded into the weights.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _is_prime(q: int) -> bool:
    return q >= 2 and all(q % p for p in range(2, int(q ** 0.5) + 1))


def sylvester(n: int) -> Tensor:
    """Hadamard matrix of order n = 2^k (float64)."""
    H = torch.ones(1, 1, dtype=torch.float64)
    while H.shape[0] < n:
        H = torch.cat([torch.cat([H, H], 1), torch.cat([H, -H], 1)], 0)
    return H


def paley(q: int) -> Tensor:
    """Hadamard matrix of order q + 1 for a prime q ≡ 3 (mod 4) (Paley's construction I).

    With χ the quadratic character mod q and the Jacobsthal matrix Qj[i, j] = χ(j − i),
    S = [[0, 1ᵀ], [−1, Qj]] is skew and H = I + S is Hadamard.
    """
    residues = {(x * x) % q for x in range(1, q)}
    chi = torch.tensor([0.0] + [1.0 if a in residues else -1.0 for a in range(1, q)],
                       dtype=torch.float64)  # (q,) χ(a)
    idx = torch.arange(q)
    Qj = chi[(idx[None, :] - idx[:, None]) % q]  # (q, q)
    S = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    S[0, 1:] = 1
    S[1:, 0] = -1
    S[1:, 1:] = Qj
    return torch.eye(q + 1, dtype=torch.float64) + S


def _paley_orders(n: int) -> list[int]:
    """Orders q + 1 ≤ n (q prime ≡ 3 mod 4) that divide n, largest first."""
    return [m for m in range(n, 3, -1) if n % m == 0 and _is_prime(m - 1) and (m - 1) % 4 == 3]


def hadamard(n: int) -> tuple[Tensor, str] | None:
    """(H, how it was built) of order n, or None where this module knows no construction."""
    if n & (n - 1) == 0:
        return sylvester(n), f"Sylvester {n}"
    for m in _paley_orders(n):
        rest = n // m
        if rest & (rest - 1) == 0:
            how = f"Paley {m}" if rest == 1 else f"Sylvester {rest} ⊗ Paley {m}"
            return torch.kron(sylvester(rest), paley(m - 1)), how
        for m2 in _paley_orders(rest):
            if (rest // m2) & (rest // m2 - 1) == 0:
                H = torch.kron(torch.kron(sylvester(rest // m2), paley(m2 - 1)), paley(m - 1))
                return H, f"Sylvester {rest // m2} ⊗ Paley {m2} ⊗ Paley {m}"
    return None


def rotation(n: int, seed: int = 0) -> tuple[Tensor, str]:
    """(R (n, n) float64 orthogonal, its description): D · H / √n with a seeded random ±1
    diagonal D, or a seeded random orthogonal matrix where no Hadamard of order n is known."""
    gen = torch.Generator().manual_seed(seed)
    built = hadamard(n)
    if built is None:
        A = torch.randn(n, n, generator=gen, dtype=torch.float64)
        Qm, Rm = torch.linalg.qr(A)
        return Qm * torch.sign(torch.diagonal(Rm))[None, :], "random orthogonal (no Hadamard " \
            f"of order {n} known here)"
    H, how = built
    D = torch.randint(0, 2, (n,), generator=gen, dtype=torch.float64) * 2 - 1
    return D[:, None] * H / n ** 0.5, f"randomized Hadamard ({how})"
