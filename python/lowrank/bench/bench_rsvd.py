"""Randomized SVD against torch.svd_lowrank, scikit-learn and the exact SVD.

Every case reports time and the Frobenius error relative to the optimal rank-k
error (Eckart-Young, from the exact singular values), and lowrank's "products
floor": the time of the ``2 + 2 n_iter`` products with A alone, the cost no
randomized SVD of that width can avoid. Baselines run at the same sketch width
``k + oversample`` and the same number of power iterations.
"""

from __future__ import annotations

import numpy as np
import torch

from lowrank.bench.harness import Result, time_ms, time_ms_many
from lowrank.linalg import rsvd


def decaying(m: int, n: int, dtype, device, seed: int = 0, decay: float = 40.0):
    """A with singular values exp(-i / decay) plus a small noise floor."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    k = min(m, n, 1024)
    u, _ = torch.linalg.qr(torch.randn(m, k, generator=g))
    v, _ = torch.linalg.qr(torch.randn(n, k, generator=g))
    s = torch.exp(-torch.arange(k, dtype=torch.float32) / decay)
    a = (u * s) @ v.T + 1e-4 * torch.randn(m, n, generator=g) / m**0.5
    return a.to(device=device, dtype=dtype)


def relative_to_optimal(a, u, s, vh, optimal):
    err = torch.linalg.matrix_norm(
        a.double() - (u.double() * s.double()[..., None, :]) @ vh.double()
    )
    return float((err / optimal).max())


def optimal_errors(a, k):
    s = torch.linalg.svdvals(a.double())
    return s[..., k:].square().sum(-1).sqrt()


def products_floor(a, l, n_iter):
    omega = torch.randn(a.shape[-1], l, device=a.device, dtype=a.dtype)

    def run(i):
        y = a @ omega
        for _ in range(n_iter):
            y = a @ (y.mT @ a).mT
        return (y.mT @ a).mT

    return run


def single_case(device, m, n, k, dtype, oversample=10, n_iter=2, extra=True):
    a = decaying(m, n, dtype, device)
    label = f"{m}x{n} k={k} {str(dtype).replace('torch.', '')}"
    optimal = optimal_errors(a, k)
    l = k + oversample
    results = []

    def record(impl, fn, decompose):
        ms = time_ms(fn, device, min_run_time=1.0, cuda_reps=10)
        u, s, vh = decompose()
        ratio = relative_to_optimal(a, u, s, vh, optimal)
        results.append(Result("rsvd", label, impl, ms, {"error_vs_optimal": ratio}))

    def ours():
        return rsvd(a, k, oversample=oversample, n_iter=n_iter, seed=0)

    # torch.svd_lowrank rejects float16/bfloat16: its caller has to upcast.
    low = dtype in (torch.float16, torch.bfloat16)

    def theirs():
        u, s, v = torch.svd_lowrank(a.float() if low else a, q=l, niter=n_iter)
        return u[..., :k], s[..., :k], v[..., :k].mT

    record("lowrank", lambda i: ours(), ours)
    record("torch.svd_lowrank" + (" (upcast)" if low else ""), lambda i: theirs(), theirs)
    floor = time_ms(products_floor(a, l, n_iter), device, min_run_time=1.0, cuda_reps=10)
    results.append(Result("rsvd", label, "products floor", floor, {"error_vs_optimal": None}))
    if extra and device.type == "cpu":
        try:
            from sklearn.utils.extmath import randomized_svd
        except ImportError:
            randomized_svd = None
        if randomized_svd is not None:
            a_np = a.numpy()

            def sk():
                u, s, vt = randomized_svd(a_np, k, n_oversamples=oversample, n_iter=n_iter,
                                          random_state=0)  # fmt: skip
                return torch.from_numpy(u), torch.from_numpy(s), torch.from_numpy(vt)

            record("sklearn randomized_svd", lambda i: sk(), sk)
    if extra:

        def exact():
            u, s, vh = torch.linalg.svd(a, full_matrices=False)
            return u[..., :k], s[..., :k], vh[..., :k, :]

        record("torch.linalg.svd", lambda i: exact(), exact)
    return results


def batched_group(device, m, n, count, k):
    a = torch.stack([decaying(m, n, torch.float32, "cpu", seed=i) for i in range(count)])
    a = a.to(device)
    label = f"batch {count}x{m}x{n} k={k}"

    def ours(i):
        return rsvd(a, k, seed=0)

    def loop(i):
        return [torch.svd_lowrank(a[j], q=k + 10, niter=2) for j in range(count)]

    def exact(i):
        return torch.linalg.svd(a, full_matrices=False)

    impls = [("lowrank", ours), ("loop torch.svd_lowrank", loop), ("torch.linalg.svd", exact)]
    return [Result("rsvd", label, impl, time_ms(fn, device, cuda_reps=3)) for impl, fn in impls]


def batched_case(device, quick):
    """168 LLaMA-1B-shaped projections (2048x2048 and 2048x5461), rank 128."""
    if quick:
        return batched_group(device, 512, 512, 8, 16)
    return batched_group(device, 2048, 2048, 112, 128) + batched_group(device, 2048, 5461, 56, 128)


def dropin_cases(device, size: int, k: int) -> list[Result]:
    """lowrank.compat against the functions it replaces, called with the same arguments;
    error relative to the optimal rank-k error."""
    import lowrank.compat as compat

    a = decaying(size, size, torch.float32, device)
    optimal = optimal_errors(a, k)
    label = f"{size}x{size} k={k}"
    fns = {
        "lowrank": lambda i: compat.svd_lowrank(a, q=k, niter=2),
        "torch.svd_lowrank": lambda i: torch.svd_lowrank(a, q=k, niter=2),
    }
    times = time_ms_many(fns, device, min_run_time=1.0)
    results = []
    for impl, fn in fns.items():
        u, s, v = fn(0)
        error = relative_to_optimal(a, u, s, v.mT, optimal)
        results.append(Result("compat", f"svd_lowrank {label}", impl, times[impl],
                              {"error_vs_optimal": error}))  # fmt: skip
    fns = {
        "lowrank": lambda i: compat.pca_lowrank(a, q=k, niter=2),
        "torch.pca_lowrank": lambda i: torch.pca_lowrank(a, q=k, niter=2),
    }
    centred_optimal = optimal_errors(a - a.mean(0), k)
    times = time_ms_many(fns, device, min_run_time=1.0)
    for impl, fn in fns.items():
        u, s, v = fn(0)
        error = relative_to_optimal(a - a.mean(0), u, s, v.mT, centred_optimal)
        results.append(Result("compat", f"pca_lowrank {label}", impl, times[impl],
                              {"error_vs_optimal": error}))  # fmt: skip
    if device.type != "cpu":
        return results
    try:
        from sklearn.utils.extmath import randomized_svd
    except ImportError:
        return results
    a_np = a.numpy()
    fns = {
        "lowrank": lambda i: compat.randomized_svd(a_np, k, random_state=0),
        "sklearn randomized_svd": lambda i: randomized_svd(a_np, k, random_state=0),
    }
    times = time_ms_many(fns, device, min_run_time=1.0, warmup=1)
    for impl, fn in fns.items():
        u, s, vh = (torch.from_numpy(x) for x in fn(0))
        error = relative_to_optimal(a, u, s, vh, optimal)
        results.append(Result("compat", f"randomized_svd {label} (n_iter auto)", impl,
                              times[impl], {"error_vs_optimal": error}))  # fmt: skip
    return results


def pca_dataset(m: int, n: int, seed: int = 0) -> torch.Tensor:
    """``m`` samples of ``n`` features: 100 latent factors of decaying scale, mixed, plus
    noise, and a mean."""
    g = torch.Generator().manual_seed(seed)
    latent = torch.randn(m, 100, generator=g) * torch.logspace(0, -2, 100)
    mixing = torch.randn(100, n, generator=g) / 10
    return latent @ mixing + 0.01 * torch.randn(m, n, generator=g) + torch.randn(n, generator=g)


def pca_case(m: int, n: int, k: int) -> list[Result]:
    """lowrank.sklearn.PCA against scikit-learn's PCA on the same float32 data: time, and the
    largest relative deviation of the explained-variance ratios from the exact ones."""
    try:
        from sklearn import decomposition
    except ImportError:
        return []
    from lowrank import sklearn as lk

    x = pca_dataset(m, n).numpy()
    estimators = {
        "lowrank": lambda: lk.PCA(k, svd_solver="randomized", random_state=0),
        "lowrank auto (covariance_eigh)": lambda: lk.PCA(k, random_state=0),
        "sklearn randomized": lambda: decomposition.PCA(k, svd_solver="randomized", random_state=0),
        "sklearn auto (covariance_eigh)": lambda: decomposition.PCA(k, random_state=0),
        "sklearn full": lambda: decomposition.PCA(k, svd_solver="full"),
    }
    fitted = {}

    def fit(name):
        fitted[name] = estimators[name]().fit(x)

    times = time_ms_many({name: (lambda i, name=name: fit(name)) for name in estimators}, "cpu",
                         min_run_time=0.0, warmup=0, min_rounds=3)  # fmt: skip
    exact = fitted["sklearn full"].explained_variance_ratio_.astype(np.float64)
    label = f"PCA {m}x{n} float32, {k} components"
    results = []
    for name, ms in times.items():
        ratio = fitted[name].explained_variance_ratio_.astype(np.float64)
        deviation = float(np.max(np.abs(ratio - exact) / exact))
        results.append(Result("sklearn", label, name, ms, {"evr_rel_dev": deviation}))
    return results


def run(device: torch.device, quick: bool) -> list[Result]:
    results = []
    if device.type == "cuda":
        results += single_case(device, 16384, 16384, 64, torch.float32, extra=False)
        results += single_case(device, 4096, 4096, 64, torch.bfloat16, extra=False)
        results += batched_case(device, quick)
    else:
        size = 2048 if quick else 4096
        results += single_case(device, size, size, 64, torch.float32, extra=not quick)
        results += single_case(device, 1024, 1024, 64, torch.bfloat16, extra=False)
        results += dropin_cases(device, size, 64)
        results += pca_case(10000, 200, 20) if quick else pca_case(100000, 1000, 50)
    return results
