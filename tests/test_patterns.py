"""Patterns: presets exactly as DESIGN.md §3, hand-checked index maps, the mask validator."""

import pytest
import torch

from sparsekit import PatternError, check_mask, get_pattern
from sparsekit.patterns import BlockSpec, Pattern, ScopeSpec, block_col_indices, block_param_rc

SEED_PATTERNS = ["2:4", "2:4-pairs", "coupled-2:4", "rowpair-16"]


def test_nm_block_col_indices_hand_checked():
    blk = get_pattern("2:4").scope.block
    cols = block_col_indices(blk, 8)  # grid (1, 8) -> (8, 1)
    assert cols.tolist() == [[c] for c in range(8)]


def test_pairs_block_col_indices_hand_checked():
    blk = get_pattern("2:4-pairs").scope.block
    assert block_col_indices(blk, 8).tolist() == [[0, 1], [2, 3], [4, 5], [6, 7]]


def test_coupled_block_col_indices_hand_checked():
    blk = get_pattern("coupled-2:4").scope.block
    cols = block_col_indices(blk, 32)  # grid (1, 2, 8, 1) -> (2, 8, 1, 2)
    assert cols.shape == (2, 8, 1, 2)
    # element (r, g, i, j) = W[r, 16g + i + 8j]: block (g, i) holds columns 16g+i and 16g+i+8
    for g in range(2):
        for i in range(8):
            assert cols[g, i, 0].tolist() == [16 * g + i, 16 * g + i + 8]


def test_rowpair_block_param_rc_hand_checked():
    blk = get_pattern("rowpair-16").scope.block
    rows, cols = block_param_rc(blk, 32)  # grid (8, 2, 2), 16 elements per block
    assert rows.shape == (8, 2, 2, 16)
    for i in range(8):
        for j in range(2):
            for k in range(2):
                assert rows[i, j, k].unique().tolist() == [i + 8 * j]
                assert cols[i, j, k].tolist() == list(range(16 * k, 16 * k + 16))


def test_rowpair_scopes_pair_rows_i_and_i_plus_8():
    lay = get_pattern("rowpair-16").resolve(32, 48)
    assert lay.blocks_per_scope == 2 and lay.nnz == 1 and not lay.row_local
    r = lay.rows[:, :, 0]  # (S, 2)
    assert torch.equal(r[:, 1] - r[:, 0], torch.full((lay.num_scopes,), 8))
    assert lay.num_scopes == 2 * 8 * 3


@pytest.mark.parametrize("name", [*SEED_PATTERNS, "3:8", "50%", "1:3"])
def test_layout_covers_every_element_once(name):
    M, K = 32, 48
    lay = get_pattern(name).resolve(M, K)
    flat = (lay.rows * K + lay.cols).flatten().sort().values
    assert torch.equal(flat, torch.arange(M * K))


@pytest.mark.parametrize("name", [*SEED_PATTERNS, "3:8"])
def test_validator_accepts_projection_and_rejects_flips(name):
    M, K = 32, 48
    lay = get_pattern(name).resolve(M, K)
    mask = lay.project(torch.rand(M, K, generator=torch.Generator().manual_seed(1)))
    check_mask(mask, lay)
    assert abs(mask.float().mean().item() - lay.nnz / lay.blocks_per_scope) < 1e-9
    bad = mask.clone()
    bad[0, 0] = ~bad[0, 0]
    with pytest.raises(PatternError):
        check_mask(bad, lay)


@pytest.mark.parametrize("name", ["2:4", "rowpair-16", "4:8", "16:32", "50%"])
def test_keep_top_is_the_stable_descending_sort_with_ties(name):
    """Both paths of keep_top (pairwise ranking for small scopes, sort for large) keep the nnz best blocks of
    every scope, ties to the lower block index: checked against a brute-force rank per scope."""
    M, K = 16, 64
    lay = get_pattern(name).resolve(M, K)
    g = torch.Generator().manual_seed(3)
    for scores in (torch.randn(M, K, generator=g), torch.randint(0, 3, (M, K), generator=g).float()):
        bs = lay.block_scores(scores)  # (S, B)
        keep = lay.keep_top(bs)
        for s in range(bs.shape[0]):
            v = bs[s].tolist()
            rank = [sum(v[j] > v[i] or (v[j] == v[i] and j < i) for j in range(len(v))) for i in range(len(v))]
            assert keep[s].tolist() == [r < lay.nnz for r in rank]


def test_unknown_and_malformed_patterns():
    with pytest.raises(PatternError, match="unknown pattern"):
        get_pattern("2:4-pears")
    with pytest.raises(PatternError, match="0 < N < M"):
        get_pattern("4:4")
    with pytest.raises(PatternError, match="does not tile"):
        get_pattern("2:4").resolve(8, 10)
    with pytest.raises(PatternError, match="K divisible by 16"):
        get_pattern("coupled-2:4").resolve(8, 40)
    with pytest.raises(PatternError, match="chunks of 16 rows"):
        get_pattern("rowpair-16").resolve(24, 32)
    with pytest.raises(PatternError, match="nnz"):
        Pattern(ScopeSpec(BlockSpec((1, 1)), (1, 4)), 5).resolve(4, 8)
    with pytest.raises(PatternError, match="exactly once"):
        Pattern(ScopeSpec(BlockSpec((1, 1), view_size=(1, "K"), view_stride=("K", 0)), (1, 4)), 2).resolve(4, 8)
