"""Brute-force float64 references that cannot be wrong in the same way as the algorithms (DESIGN.md §6)."""

from __future__ import annotations

import itertools

import torch
from torch import Tensor

from sparsekit.patterns import Layout


def tiny_problem(M: int, K: int, seed: int = 0, tokens: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """``(W (M, K), H (K, K), X (N, K))`` float64 with correlated, unevenly scaled inputs; H = XᵀX/N full rank."""
    g = torch.Generator().manual_seed(seed)
    N = tokens or 4 * K
    scale = torch.exp(torch.randn(K, generator=g, dtype=torch.float64))  # heavy-ish channel scales
    mix = torch.eye(K, dtype=torch.float64) + 0.3 * torch.randn(K, K, generator=g, dtype=torch.float64)
    X = (torch.randn(N, K, generator=g, dtype=torch.float64) @ mix) * scale
    W = torch.randn(M, K, generator=g, dtype=torch.float64)
    return W, X.T @ X / N, X


def optimal_loss_for_mask(W: Tensor, H: Tensor, mask: Tensor) -> Tensor:
    """Per-row ``min_{w'_P = 0} (w' − w) H (w' − w)ᵀ = w_P (H⁻¹_PP)⁻¹ w_Pᵀ`` (H full rank): ``(M,)``."""
    Hinv = torch.linalg.inv(H.double())
    out = torch.zeros(W.shape[0], dtype=torch.float64)
    for r in range(W.shape[0]):
        P = (~mask[r]).nonzero().flatten()
        if len(P):
            wP = W[r, P].double()
            out[r] = wP @ torch.linalg.solve(Hinv[P][:, P], wP)
    return out


def refit(W: Tensor, H: Tensor, mask: Tensor) -> Tensor:
    """The optimal weights for ``mask``: ``w'_R = w_R + H_RR⁻¹ H_RP w_P``, ``w'_P = 0`` (float64 solve)."""
    W = W.double()
    H = H.double()
    out = torch.zeros_like(W)
    for r in range(W.shape[0]):
        R = mask[r].nonzero().flatten()
        P = (~mask[r]).nonzero().flatten()
        if len(R):
            out[r, R] = W[r, R] + torch.linalg.solve(H[R][:, R], H[R][:, P] @ W[r, P])
    return out


def brute_force_optimum(W: Tensor, H: Tensor, layout: Layout) -> tuple[float, Tensor]:
    """Global optimum over every valid mask with optimal refit: ``(relative error, mask)``.

    Rows are grouped by the scopes that couple them (one row, or the two rows of a ``rowpair-16`` scope);
    each group enumerates the product of its scopes' subsets. Only for tiny layers.
    """
    M, K = W.shape
    rows, cols = layout.rows.cpu(), layout.cols.cpu()
    B, nnz = layout.blocks_per_scope, layout.nnz
    # connected row groups
    parent = list(range(M))

    def find(a: int) -> int:
        while parent[a] != a:
            a = parent[a]
        return a

    for s in range(layout.num_scopes):
        rs = rows[s].flatten().unique().tolist()
        for r in rs[1:]:
            parent[find(r)] = find(rs[0])
    groups: dict[int, list[int]] = {}
    for r in range(M):
        groups.setdefault(find(r), []).append(r)
    scope_row = rows[:, 0, 0]
    best_mask = torch.zeros(M, K, dtype=torch.bool)
    total = 0.0
    choices = list(itertools.combinations(range(B), nnz))
    for grp in groups.values():
        sc = [s for s in range(layout.num_scopes) if find(int(scope_row[s])) == find(grp[0])]
        best = (float("inf"), None)
        for combo in itertools.product(choices, repeat=len(sc)):
            mask = torch.zeros(M, K, dtype=torch.bool)
            for s, keep in zip(sc, combo):
                for b in keep:
                    mask[rows[s, b], cols[s, b]] = True
            loss = optimal_loss_for_mask(W[grp], H, mask[grp]).sum().item()
            if loss < best[0]:
                best = (loss, mask)
        total += best[0]
        best_mask |= best[1]
    den = ((W.double() @ H.double()) * W.double()).sum().item()
    return (total / den) ** 0.5, best_mask


def sparsegpt_plain(W: Tensor, H: Tensor, n: int, m: int, damp: float = 0.01) -> Tensor:
    """The published SparseGPT column loop for ``n:m``, float64, no lazy batching."""
    W = W.double().clone()
    K = W.shape[1]
    Hd = H.double().clone()
    Hd.diagonal().add_(damp * Hd.diagonal().mean())
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(Hd)), upper=True)
    pruned = torch.zeros_like(W, dtype=torch.bool)
    for i in range(K):
        if i % m == 0:
            tmp = W[:, i : i + m] ** 2 / U.diagonal()[i : i + m] ** 2
            pruned[:, i : i + m].scatter_(1, torch.topk(tmp, m - n, dim=1, largest=False).indices, True)
        q = W[:, i].clone()
        q[pruned[:, i]] = 0
        err = (W[:, i] - q) / U[i, i]
        W[:, i:] -= err[:, None] * U[i, i:][None]
        W[:, i] = q
    return W


def exact_greedy(
    W: Tensor, H: Tensor, layout: Layout, order: str = "left_to_right", damp: float = 0.01
) -> tuple[Tensor, Tensor]:
    """Exact greedy OBS re-solved from scratch at every step, float64: ``(W_final (M, K), mask (M, K))``.

    Damped ``Hd = H + damp·mean(diag H)·I`` (the seed's rule). Rows are grouped by the scopes that couple them
    (one row, or the two rows of a ``rowpair-16`` scope). In each group, one scope per step: the next in column
    order (``left_to_right``) or the undecided scope whose cheapest choice costs most (``largest_first``). A
    choice (a set of blocks to prune) costs ``Σ_rows w_S (C_SS)⁻¹ w_Sᵀ`` with, per row, ``w`` the optimal refit
    of the original row given everything pruned so far and ``C = inv(Hd_RR)`` over its remaining columns; the
    cheapest choice is pruned. The result is the optimal refit of the final mask.
    """
    W = W.double()
    Hd = H.double().clone()
    Hd.diagonal().add_(damp * Hd.diagonal().mean())
    M, K = W.shape
    rows, cols = layout.rows.cpu(), layout.cols.cpu()
    S, B, _ = rows.shape
    p = B - layout.nnz
    mask = torch.ones(M, K, dtype=torch.bool)
    owner = rows.flatten(1).min(1).values
    first = cols.flatten(1).min(1).values
    choices = list(itertools.combinations(range(B), p))

    def state(r: int) -> tuple[Tensor, Tensor]:
        Rk = mask[r].nonzero().flatten()
        w = refit(W[r : r + 1], Hd, mask[r : r + 1])[0]
        C = torch.zeros(K, K, dtype=torch.float64)
        C[Rk.unsqueeze(1), Rk.unsqueeze(0)] = torch.linalg.inv(Hd[Rk][:, Rk])
        return w, C

    def cheapest(s: int, st: dict[int, tuple[Tensor, Tensor]]) -> tuple[float, tuple[int, ...]]:
        best = (float("inf"), ())
        for ch in choices:
            cost = 0.0
            per_row: dict[int, list[int]] = {}
            for b in ch:
                for r_, c_ in zip(rows[s, b].tolist(), cols[s, b].tolist()):
                    per_row.setdefault(r_, []).append(c_)
            for r_, cs in per_row.items():
                w, C = st[r_]
                idx = torch.tensor(cs)
                cost += float(w[idx] @ torch.linalg.solve(C[idx][:, idx], w[idx]))
            if cost < best[0]:
                best = (cost, ch)
        return best

    for g in owner.unique().tolist():
        scopes = [s for s in torch.argsort(first, stable=True).tolist() if owner[s] == g]
        grp_rows = sorted(set(rows[scopes].flatten().tolist()))
        while scopes:
            st = {r: state(r) for r in grp_rows}
            if order == "left_to_right":
                s = scopes[0]
                _, ch = cheapest(s, st)
            else:
                evals = [(cheapest(s_, st), s_) for s_ in scopes]
                (_, ch), s = max(evals, key=lambda x: x[0][0])
            for b in ch:
                mask[rows[s, b], cols[s, b]] = False
            scopes.remove(s)
    return refit(W, Hd, mask), mask
