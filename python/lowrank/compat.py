"""Drop-in replacements with the signatures and conventions of the functions they replace.

- :func:`svd_lowrank` and :func:`pca_lowrank`: ``torch.svd_lowrank`` / ``torch.pca_lowrank``
  (``U, S, V`` with ``A ~ U diag(S) V^H``; random numbers from torch's global generator,
  so ``torch.manual_seed`` makes them repeatable). They run :func:`lowrank.linalg.rsvd`,
  which oversamples (``q + 10`` sketch columns, capped by the matrix size) where torch
  uses exactly ``q``: the first ``q`` triplets are more accurate for the same ``niter``.
  Real and complex input (dense; sparse input must be real).
- :func:`randomized_svd`: ``sklearn.utils.extmath.randomized_svd`` (NumPy or SciPy sparse in,
  NumPy out, ``Vh`` rows; scikit-learn's dtype rules, ``n_iter="auto"`` and sign
  convention: the largest entry of each column of ``U`` is positive).

Replace ``torch.svd_lowrank(A, q=64)`` with ``lowrank.compat.svd_lowrank(A, q=64)``, or
``from sklearn.utils.extmath import randomized_svd`` with
``from lowrank.compat import randomized_svd``.
"""

from __future__ import annotations

import numbers
import warnings

import numpy as np
import torch

from lowrank import _validate as check
from lowrank.linalg.pca import pca
from lowrank.linalg.rsvd import from_numpy, rsvd

OVERSAMPLE = 10


def _torch_seed(device: torch.device) -> int:
    """A seed drawn from torch's global generator of ``device`` (repeatable after
    ``torch.manual_seed``, as torch's own functions are)."""
    generator = None
    if device.type == "cuda":
        generator = torch.cuda.default_generators[device.index or 0]
    return int(torch.randint(0, 2**62, (1,), generator=generator, device="cpu"
                             if generator is None else device))  # fmt: skip


def _shape(a) -> tuple[int, int]:
    if not isinstance(a, torch.Tensor):
        raise TypeError(f"A must be a torch.Tensor, got {type(a).__name__}")
    if a.dim() < 2:
        raise ValueError(f"A must have at least 2 dimensions, got shape {tuple(a.shape)}")
    return int(a.shape[-2]), int(a.shape[-1])


def svd_lowrank(A: torch.Tensor, q: int | None = 6, niter: int | None = 2,
                M: torch.Tensor | None = None):  # fmt: skip
    """``torch.svd_lowrank``: ``(U, S, V)`` of rank ``k = min(q, m, n)`` with
    ``A - M ~ U diag(S) V^H``; ``A`` dense (batched, real or complex) or sparse (real),
    ``M`` (optional) broadcast to ``A``'s shape. ``niter`` power iterations, ``q + 10``
    sketch columns."""
    m, n = _shape(A)
    q = 6 if q is None else check.integer("q", q, 0)
    niter = 2 if niter is None else check.iterations("niter", max(0, check.integer("niter", niter)))
    k = min(q, m, n)
    if M is not None:
        M = check.tensor("M", M)
        dense = A.to_dense() if A.layout != torch.strided else A
        A = dense - M.broadcast_to(dense.shape)
    if k == 0:
        return _empty(A, m, n, 0)
    u, s, vh = rsvd(A, k, oversample=min(OVERSAMPLE, min(m, n) - k), n_iter=niter,
                    seed=_torch_seed(A.device))  # fmt: skip
    return u, s, vh.mH


def pca_lowrank(A: torch.Tensor, q: int | None = None, center: bool = True, niter: int = 2):
    """``torch.pca_lowrank``: ``(U, S, V)`` of ``A`` minus its column means (``center``),
    ``q`` defaulting to ``min(6, m, n)``. Sparse ``A`` (COO or CSR) is centred implicitly,
    never densified (torch densifies the mean, and rejects CSR)."""
    m, n = _shape(A)
    if q is None:
        q = min(6, m, n)
    else:
        q = check.integer("q", q)
        if not 0 <= q <= min(m, n):
            raise ValueError(f"q(={q}) must be non-negative integer and not greater than "
                             f"min(m, n)={min(m, n)}")  # fmt: skip
    niter = check.integer("niter", niter)
    if niter < 0:
        raise ValueError(f"niter(={niter}) must be non-negative integer")
    if q == 0:
        return _empty(A, m, n, 0)
    if not center:
        return svd_lowrank(A, q, niter)
    oversample = min(OVERSAMPLE, min(m, n) - q)
    seed = _torch_seed(A.device)
    if A.layout != torch.strided:
        if A.dim() != 2:
            raise ValueError("pca_lowrank input is expected to be 2-dimensional tensor")
        u, s, vh = pca(A, q, oversample=oversample, n_iter=niter, seed=seed)
    else:
        u, s, vh = rsvd(A - A.mean(dim=-2, keepdim=True), q, oversample=oversample,
                        n_iter=niter, seed=seed)  # fmt: skip
    return u, s, vh.mH


def _empty(a, m, n, k):
    dtype = a.dtype if a.dtype.is_floating_point or a.dtype.is_complex else torch.float32
    lead = tuple(a.shape[:-2])
    kw = {"dtype": dtype, "device": a.device}
    return (
        torch.zeros(*lead, m, k, **kw),
        torch.zeros(*lead, k, dtype=dtype.to_real(), device=a.device),
        torch.zeros(*lead, n, k, **kw),
    )


# ---- scikit-learn --------------------------------------------------------------------------------

# scikit-learn's power_iteration_normalizer names -> rsvd's normalizer names.
SKLEARN_NORMALIZERS = {"auto": "auto", "QR": "qr", "LU": "lu", "none": "none"}


def sklearn_normalizer(value) -> str:
    """rsvd's ``normalizer`` for scikit-learn's ``power_iteration_normalizer`` (``"auto"``,
    ``"QR"``, ``"LU"`` or ``"none"``); ValueError for anything else."""
    if not isinstance(value, str) or value not in SKLEARN_NORMALIZERS:
        raise ValueError(f"power_iteration_normalizer must be one of "
                         f"{sorted(SKLEARN_NORMALIZERS)}, got {value!r}")  # fmt: skip
    return SKLEARN_NORMALIZERS[value]


def seed_from(random_state) -> int:
    """A seed from scikit-learn's ``random_state`` argument: None (NumPy's global
    generator), an int, a ``np.random.RandomState`` or a ``np.random.Generator``."""
    if random_state is None or random_state is np.random:
        return int(np.random.mtrand._rand.randint(0, 2**31 - 1))
    if isinstance(random_state, numbers.Integral) and not isinstance(random_state, bool):
        return int(random_state)
    if isinstance(random_state, np.random.RandomState):
        return int(random_state.randint(0, 2**31 - 1))
    if isinstance(random_state, np.random.Generator):
        return int(random_state.integers(0, 2**31 - 1))
    raise ValueError(f"random_state must be None, an int, a RandomState or a Generator, got "
                     f"{random_state!r}")  # fmt: skip


def as_tensor_2d(M) -> tuple[torch.Tensor, np.dtype]:
    """``M`` (array-like or SciPy sparse) as a 2-D float tensor (sparse CSR for sparse
    input) and the NumPy dtype of the results: float32 stays float32, anything else is
    computed in float64 (scikit-learn's rules). NaN or Inf raise ``ValueError``."""
    try:
        import scipy.sparse as sp
    except ImportError:  # pragma: no cover - scipy comes with scikit-learn
        sp = None
    if sp is not None and sp.issparse(M):
        csr = M.tocsr()
        if csr.ndim != 2:
            raise ValueError(f"M: expected 2D input, got shape {csr.shape}")
        dtype = np.dtype(np.float32) if csr.dtype == np.float32 else np.dtype(np.float64)
        data = np.asarray(csr.data, dtype=dtype)
        if not np.isfinite(data).all():
            raise ValueError("M: input contains NaN or infinity.")
        with warnings.catch_warnings():  # torch calls its CSR support beta, once per process
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
            tensor = torch.sparse_csr_tensor(torch.from_numpy(csr.indptr.astype(np.int64)),
                                             torch.from_numpy(csr.indices.astype(np.int64)),
                                             torch.from_numpy(data), size=csr.shape,
                                             check_invariants=True)  # fmt: skip
        return tensor, dtype
    if isinstance(M, torch.Tensor):
        M = M.detach().cpu().numpy()
    array = np.asarray(M)
    if array.dtype == object:
        array = array.astype(np.float64)
    if np.iscomplexobj(array):
        raise ValueError("M: complex data not supported")
    if array.ndim != 2:
        raise ValueError(f"M: expected 2D array, got {array.ndim}D array instead")
    if min(array.shape) == 0:
        raise ValueError(f"M: found array with shape {array.shape}: at least one sample and one "
                         "feature are required")  # fmt: skip
    dtype = np.dtype(np.float32) if array.dtype == np.float32 else np.dtype(np.float64)
    array = array.astype(dtype, copy=False)
    if not np.isfinite(array).all():
        raise ValueError("M: input contains NaN or infinity.")
    return from_numpy(array), dtype


def randomized_svd(M, n_components, *, n_oversamples=10, n_iter="auto",
                   power_iteration_normalizer="auto", transpose="auto", flip_sign=True,
                   random_state=None, svd_lapack_driver="gesdd"):  # fmt: skip
    """``sklearn.utils.extmath.randomized_svd``: ``(U, s, Vh)`` as NumPy arrays.

    ``n_iter="auto"`` is 7 when ``n_components < 0.1 min(M.shape)``, else 4;
    ``power_iteration_normalizer`` ``"auto"`` (CholeskyQR2 with fallbacks: stable without
    LU's cost), ``"QR"``, ``"LU"`` or ``"none"``. ``transpose`` and ``svd_lapack_driver`` are
    accepted for compatibility: the wider side is chosen automatically and the small SVD
    runs in torch. ``n_components`` above ``min(M.shape)`` gives ``min(M.shape)``
    components, as scikit-learn does.
    """
    n_components = check.integer("n_components", n_components, 1)
    n_oversamples = check.integer("n_oversamples", n_oversamples, 0)
    if not (isinstance(n_iter, str) and n_iter == "auto"):
        n_iter = check.iterations("n_iter", n_iter)
    normalizer = sklearn_normalizer(power_iteration_normalizer)
    if not (isinstance(transpose, (bool, np.bool_)) or transpose == "auto"):
        raise ValueError(f"transpose must be a bool or 'auto', got {transpose!r}")
    if not isinstance(flip_sign, (bool, np.bool_)):
        raise ValueError(f"flip_sign must be a bool, got {flip_sign!r}")
    if svd_lapack_driver not in ("gesdd", "gesvd"):
        raise ValueError(f"svd_lapack_driver must be 'gesdd' or 'gesvd', got {svd_lapack_driver!r}")
    seed = seed_from(random_state)
    tensor, dtype = as_tensor_2d(M)
    m, n = tensor.shape
    k = min(n_components, m, n)
    # n_iter="auto" is rsvd's own (scikit-learn's rule; n_components > min(m, n) gives 4 both
    # ways, as k = min(m, n) does).
    u, s, vh = rsvd(tensor, k, oversample=min(n_oversamples, min(m, n) - k), n_iter=n_iter,
                    normalizer=normalizer, seed=seed)  # fmt: skip
    # rsvd's sign convention is scikit-learn's flip_sign=True one: each column of U has its
    # largest-magnitude entry positive (flip_sign=False leaves signs unspecified).
    return (u.numpy().astype(dtype, copy=False), s.numpy().astype(dtype, copy=False),
            vh.numpy().astype(dtype, copy=False))  # fmt: skip
