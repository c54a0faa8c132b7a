"""The ``lowrank`` op namespace and the registration pattern every op follows.

An op is a schema defined here plus per-device kernels registered with
``Library.impl`` (about 1.2 us of dispatch), a fake kernel for meta tensors and
``torch.compile``, and an autograd kernel installed by :func:`register_autograd`.
That kernel adds about 1 us when no input needs a gradient, against ~15 us for
``torch.library.register_autograd`` and ~9 us for the ``custom_op`` decorator
(2-core CI machine, torch 2.13; ``bench/bench_dispatch.py`` measures a trivial
op defined this way).
"""

from __future__ import annotations

from typing import Callable

import torch

_LIBRARIES: dict[str, torch.library.Library] = {}
_DEVICE_KEYS = {"cpu": "CPU", "cuda": "CUDA"}


def _library(namespace: str) -> torch.library.Library:
    if namespace not in _LIBRARIES:
        _LIBRARIES[namespace] = torch.library.Library(namespace, "FRAGMENT")
    return _LIBRARIES[namespace]


def _split(op: torch._ops.OpOverload) -> tuple[torch.library.Library, str]:
    namespace, name = op._schema.name.split("::")
    return _library(namespace), name


def define(schema: str, namespace: str = "lowrank") -> torch._ops.OpOverload:
    """Defines ``<namespace>::<schema>`` and returns its default overload."""
    _library(namespace).define(schema)
    name = schema.split("(", 1)[0]
    return getattr(getattr(torch.ops, namespace), name).default


def register_kernel(op: torch._ops.OpOverload, device: str) -> Callable:
    """Decorator: registers the function as ``op``'s kernel for ``device`` ("cpu" or "cuda")."""

    def wrap(fn: Callable) -> Callable:
        lib, name = _split(op)
        lib.impl(name, fn, _DEVICE_KEYS[device])
        return fn

    return wrap


def register_fake(op: torch._ops.OpOverload) -> Callable:
    """Decorator: registers the function as ``op``'s fake (meta / compile-time) kernel."""
    return torch.library.register_fake(op._schema.name, lib=_split(op)[0])


def register_autograd(op: torch._ops.OpOverload, function: type[torch.autograd.Function]) -> None:
    """Routes ``op`` through ``function`` (an ``autograd.Function``) when a gradient is needed.

    ``function.forward`` must call ``op`` inside :func:`below_autograd`. Without
    any input that requires grad, the call goes straight to the device kernel.
    """
    after_autograd = torch._C._after_autograd_keyset
    handle = op._handle
    grad_enabled = torch.is_grad_enabled
    tensor_positions = tuple(
        i for i, arg in enumerate(op._schema.arguments) if _is_tensor_type(arg.type)
    )

    def kernel(keyset, *args):
        if grad_enabled():
            for i in tensor_positions:
                if i < len(args) and args[i] is not None and args[i].requires_grad:
                    return function.apply(*args)
        return handle.redispatch_boxed(keyset & after_autograd, *args)

    lib, name = _split(op)
    lib.impl(name, kernel, "Autograd", with_keyset=True)


def _is_tensor_type(t) -> bool:
    """Tensor or Tensor? in a schema (the arguments that can require grad)."""
    if isinstance(t, torch.OptionalType):
        t = t.getElementType()
    return isinstance(t, torch.TensorType)


def below_autograd():
    """Context in which an op call skips the autograd kernel (inside ``Function.forward``)."""
    return torch._C._AutoDispatchBelowAutograd()
