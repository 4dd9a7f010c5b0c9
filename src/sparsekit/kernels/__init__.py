"""GPU fast paths, each next to the torch reference it is tested against (STYLE.md: kernel + wrapper + reference).

Modules (imported on demand; importing this package never initialises CUDA or imports Triton):

- :mod:`sparsekit.kernels.sparsegpt_nm` — SparseGPT: one fused Triton program per lazy batch (N:M, pairs).
- :mod:`sparsekit.kernels.obs_update` — True OBS's per-step update (``Z``, the weight update, ``U``'s new columns,
  the diagonal downdate) in one Triton kernel that never stores ``Z``.
- :mod:`sparsekit.kernels.obs_linalg` — the batched linear algebra of True OBS and OBS-ord: 16-bit GEMMs with
  float32 accumulation and result, an explicit TF32 context, and a blocked batched inverse Cholesky factor.

Every fast path has a torch reference in the same file; CPU runs use the reference (or the same torch code),
the GPU tests (``tests/test_obs_linalg.py``, ``tests/test_sparsegpt_kernel.py``, ``tests/test_obs_update.py``,
marked ``gpu``; the last also runs its kernel in Triton's CPU interpreter where Triton is installed) compare them.
"""
