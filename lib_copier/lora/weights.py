"""One LoRA module's tensors (down, up, alpha) and the weight delta they stand for.

kohya's convention: delta = alpha / rank * up @ down, with `up` a (out, rank[, 1, 1]) matrix and `down` a
(rank, in[, kh, kw]) one; a missing alpha means alpha = rank (scale 1).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch


@dataclass
class LoRAWeights:
    down: torch.Tensor
    up: torch.Tensor
    alpha: float

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape of the weight this module changes."""
        return (self.up.shape[0], *self.down.shape[1:])

    def norm(self) -> float:
        """The Frobenius norm of `delta`, from the factors' Gram matrices in float64 (no dense matrix)."""
        up, down = self.up.double().flatten(1), self.down.double().flatten(1)
        return abs(self.scale) * float(((up.T @ up) * (down @ down.T)).sum().clamp(min=0).sqrt())

    def delta(self, device=None) -> torch.Tensor:
        """scale * up @ down in float32, shaped like the target weight."""
        up = self.up.to(device=device, dtype=torch.float32).flatten(1)
        down = self.down.to(device=device, dtype=torch.float32).flatten(1)
        return (self.scale * (up @ down)).reshape(self.shape)


def join_modules(modules: Mapping[str, LoRAWeights], dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The kohya tensor dict, each tensor contiguous on the CPU in `dtype` (alpha too, as kohya stores it)."""

    def cast(t: torch.Tensor) -> torch.Tensor:
        return t.detach().to(device="cpu", dtype=dtype or t.dtype).contiguous()

    tensors = {}
    for key in sorted(modules):
        module = modules[key]
        tensors[f"{key}.lora_down.weight"] = cast(module.down)
        tensors[f"{key}.lora_up.weight"] = cast(module.up)
        tensors[f"{key}.alpha"] = torch.tensor(module.alpha, dtype=dtype or module.down.dtype)
    return tensors


OVERSAMPLE = 16  # extra directions the randomized SVD carries past the rank (Halko, Martinsson & Tropp)
POWER_ITERATIONS = 4  # each sharpens a slowly falling spectrum; two matrix products each, cheap beside an SVD


# The quantile kohya clamps SVD factors at (extract, SVD merge). The functions here default to 1, no clamp: the best
# approximation of the rank. The `lora` command line and the WebUI's tools pass kohya's, for kohya's numbers.
KOHYA_CLAMP = 0.99


def truncated_svd(matrix: torch.Tensor, rank: int, randomized: bool = False):
    """U, S, Vh holding at least the leading `rank` singular triplets of `matrix`: an exact SVD, or with `randomized`
    a seeded `torch.svd_lowrank` where the matrix is large against the rank (else the exact one)."""
    q = rank + OVERSAMPLE
    if randomized and q < min(matrix.shape) // 2:
        with torch.random.fork_rng(devices=[matrix.device] if matrix.is_cuda else []):
            torch.manual_seed(0)
            u, s, v = torch.svd_lowrank(matrix, q=q, niter=POWER_ITERATIONS)
        return u, s, v.mT
    return torch.linalg.svd(matrix, full_matrices=False)


def low_rank(
    delta: torch.Tensor, rank: int, clamp_quantile: float = 1.0, randomized: bool = False
) -> tuple[LoRAWeights, float]:
    """Best rank-`rank` factorisation of `delta` (SVD), alpha = rank, as kohya's extract and SVD merge do, and the
    fraction of the delta's Frobenius norm it keeps (before the clamp)."""
    matrix = delta.float().flatten(1)
    rank = max(1, min(rank, delta.shape[0], delta.shape[1]))  # kohya: at most the channel counts
    u, s, vh = truncated_svd(matrix, rank, randomized)
    norm = float(matrix.norm())
    kept = float(s[:rank].norm()) / norm if norm > 0 else 1.0
    return from_svd(u, s, vh, rank, tuple(delta.shape), clamp_quantile), kept


def from_svd(
    u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, rank: int, shape: tuple[int, ...], clamp_quantile: float
) -> LoRAWeights:
    """The LoRA (alpha = rank) of the first `rank` singular triplets of a delta shaped `shape`; zero directions pad
    it when the spectrum is shorter than `rank`.

    kohya clamps both factors at a quantile of their values to drop outliers a truncated SVD produces; when the
    truncation drops nothing (rank >= the delta's numerical rank) there are no such outliers and clamping would
    only damage an exact result, so it is skipped.
    """
    truncated = len(s) > rank and s[rank] > 1e-6 * max(float(s[0]), 1e-30)
    up = u[:, :rank] * s[:rank]
    down = vh[:rank]
    if up.shape[1] < rank:
        up = torch.cat([up, up.new_zeros(up.shape[0], rank - up.shape[1])], dim=1)
        down = torch.cat([down, down.new_zeros(rank - down.shape[0], down.shape[1])])
    if truncated and clamp_quantile < 1:
        high = torch.quantile(torch.cat([up.flatten(), down.flatten()]), clamp_quantile)
        up, down = up.clamp(-high, high), down.clamp(-high, high)
    if len(shape) == 4:
        up = up.reshape(shape[0], rank, 1, 1)
        down = down.reshape(rank, *shape[1:])
    return LoRAWeights(down.contiguous(), up.contiguous(), float(rank))


def factored_svd(up: torch.Tensor, down: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """U, S, Vh of `up @ down` (flattened), from QR of both factors and an SVD of the rank x rank core: the same
    values as an SVD of the dense matrix without its zeros, at a fraction of the cost."""
    q1, r1 = torch.linalg.qr(up.float().flatten(1))
    q2, r2 = torch.linalg.qr(down.float().flatten(1).T)
    u, s, vh = torch.linalg.svd(r1 @ r2.T, full_matrices=False)  # as many directions as values
    return q1 @ u, s, (q2 @ vh.T).T
