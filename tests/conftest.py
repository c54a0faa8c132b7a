"""Shared test fixtures: devices, poisoned outputs, hypothesis profiles, the adapters' toy
model."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, settings
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from lowrank import _native

settings.register_profile(
    "ci",
    max_examples=40,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("dev", max_examples=150, deadline=None)
settings.register_profile(
    "sanitize", max_examples=5, deadline=None, derandomize=True,
    suppress_health_check=list(HealthCheck),
)  # fmt: skip
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

HAS_GPU = torch.cuda.is_available()
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]
# The implementations lowrank.dispatch chooses between; tests check each one.
IMPLS = ["native", "composite"]


def pytest_configure(config):
    # Dispatch choices measured by the tests stay out of the user's cache folder.
    if "LOWRANK_CACHE_DIR" not in os.environ:
        os.environ["LOWRANK_CACHE_DIR"] = ""


def pytest_collection_modifyitems(config, items):
    skip_cuda = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords and not HAS_GPU:
            item.add_marker(skip_cuda)


@pytest.fixture(autouse=True)
def poison_outputs():
    """Native outputs start as NaN, so an element a kernel never writes fails the test."""
    previous = _native.POISON_OUTPUTS
    _native.POISON_OUTPUTS = True
    yield
    _native.POISON_OUTPUTS = previous


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64 (NaN never passes a comparison with it)."""
    out, ref = out.detach().double(), ref.detach().double()
    err = (out - ref).norm() / ref.norm().clamp_min(1e-300)
    return float(err) if torch.isfinite(out).all() else float("inf")


def assert_close_lowp(out: torch.Tensor, ref64: torch.Tensor, ref_lowp: torch.Tensor, c=2.0):
    """Low-precision check: ``|out - ref64| <= c * |ref_lowp - ref64| + atol``: the error is
    judged against the reference's own rounding in that dtype (docs/architecture.md)."""
    assert torch.isfinite(out).all()
    err = (out.double() - ref64).abs()
    ref_err = (ref_lowp.double() - ref64).abs()
    atol = 1e-2 * ref64.abs().max().clamp_min(1.0)
    assert bool((err <= c * ref_err + atol).all()), float((err - c * ref_err).max())


class RecordShapes(TorchDispatchMode):
    """Records the shape of every tensor an op computes (views excluded): to check that a
    layer never forms some matrix, forward or backward."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if torch.Tag.view_copy in func.tags or func.is_view or "detach" in str(func):
            return out  # views of existing tensors compute nothing
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.shapes.append(tuple(t.shape))
        return out


class Toy(nn.Module):
    """The adapters' toy model: ``a`` (16 -> 24), tanh, ``b`` (24 -> 8)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(16, 24)
        self.b = nn.Linear(24, 8)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


def toy(dtype=torch.float32) -> Toy:
    """A :class:`Toy` seeded with 0, in ``dtype``."""
    torch.manual_seed(0)
    return Toy().to(dtype)
