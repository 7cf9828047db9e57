"""Greedy k-center coreset selection (PatchCore's memory thinning) on a random projection."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch

CORESET_BLOCK = 1024  # rows refreshed together in the greedy selection: a (block, m) distance matrix per refresh


def random_projection(dim_in: int, dim_out: int, generator: torch.Generator) -> torch.Tensor:
    """(dim_in, dim_out) Gaussian Johnson-Lindenstrauss matrix: distances are kept up to a small distortion."""
    return torch.randn(dim_in, dim_out, generator=generator) / math.sqrt(dim_out)


@contextmanager
def one_thread() -> Iterator[None]:
    """Torch on one thread for a while: the greedy loop's thousands of small products run 5-10x slower on two
    threads of a busy CPU (each waits for its second thread), and no faster on an idle one."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def greedy_coreset(points: torch.Tensor, n_select: int, first: int, block: int = CORESET_BLOCK) -> torch.Tensor:
    """(n_select,) row indices of points (N, D) by iterative farthest-point selection, starting at row `first`.

    Exact greedy, made fast by lazy refreshes: each block of rows keeps its nearest-centre distances as of some
    earlier centre count and their maximum, an upper bound that only shrinks. Only the block with the highest bound
    is brought up to date (one matrix product with all centres it has not seen), until the top block is current;
    its farthest row is then the farthest overall. Blocks that cannot hold the farthest row are never touched.
    Work still grows as N x n_select (on ELPV features few blocks drop out): 1.6M -> 16k patches at 128 dims
    take ~200 s of CPU on one thread.
    """
    n = points.shape[0]
    if not 0 < n_select <= n:
        raise ValueError(f"cannot select {n_select} of {n} points")
    with one_thread():
        return _greedy(points, n_select, first, block)


def _greedy(points: torch.Tensor, n_select: int, first: int, block: int) -> torch.Tensor:
    n = points.shape[0]
    sq_norms = points.square().sum(dim=1)  # (N,)
    starts = list(range(0, n, block))
    nearest = torch.full((n,), math.inf)  # squared distance to the nearest centre seen by the row's block
    seen = [0] * len(starts)  # centres each block has been refreshed with
    bound = torch.full((len(starts),), math.inf)  # max of `nearest` per block
    chosen = torch.empty(n_select, dtype=torch.long)
    chosen[0] = first
    for count in range(1, n_select):
        while True:
            b = int(bound.argmax())
            if seen[b] == count:
                break
            lo, hi = starts[b], min(starts[b] + block, n)
            centres = chosen[seen[b] : count]
            # ||x - c||^2 = ||x||^2 + min over c of (||c||^2 - 2 x.c): one fused matrix product per refresh
            partial = torch.addmm(sq_norms[centres][None], points[lo:hi], points[centres].T, alpha=-2.0).amin(dim=1)
            nearest[lo:hi] = torch.minimum(nearest[lo:hi], (partial + sq_norms[lo:hi]).clamp_min(0.0))
            bound[b] = nearest[lo:hi].max()
            seen[b] = count
        chosen[count] = starts[b] + int(nearest[starts[b] : starts[b] + block].argmax())
    return chosen
