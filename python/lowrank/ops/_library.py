"""The ``lowrank`` op namespace and the registration pattern every op follows.

An op is a schema defined here plus per-device kernels registered with
``Library.impl`` (about 1.2 us of dispatch), a fake kernel for meta tensors and
``torch.compile``, and an autograd kernel installed by :func:`register_autograd`.
That kernel adds about 1 us when no input needs a gradient, against ~15 us for
``torch.library.register_autograd`` and ~9 us for the ``custom_op`` decorator
(2-core CI machine, torch 2.13; ``lowrank/bench/bench_dispatch.py`` measures a trivial
op defined this way).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch._subclasses.fake_tensor import is_fake
from torch.autograd import forward_ad

_LIBRARIES: dict[str, torch.library.Library] = {}
_DEVICE_KEYS = {"cpu": "CPU", "cuda": "CUDA"}


def _library(namespace: str) -> torch.library.Library:
    if namespace not in _LIBRARIES:
        _LIBRARIES[namespace] = torch.library.Library(namespace, "FRAGMENT")
    return _LIBRARIES[namespace]


def _split(op: torch._ops.OpOverload) -> tuple[torch.library.Library, str]:
    namespace, name = op._schema.name.split("::")
    return _library(namespace), name


# torch's argument parser reports a wrong argument type as RuntimeError; the Python entry
# points re-raise it as the TypeError it is (the message already names the argument).
_PARSER_ERRORS = ("Expected a value of type", "expected at most", "missing value for argument",
                  "Overflow when unpacking")  # fmt: skip


def call(op: torch._ops.OpOverload, *args):
    """``op(*args)``, with torch's argument-parsing errors raised as TypeError."""
    try:
        return op(*args)
    except RuntimeError as error:
        text = str(error)
        if any(marker in text for marker in _PARSER_ERRORS):
            raise TypeError(text.split("\n", 1)[0]) from None
        raise


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


def register_autograd(
    op: torch._ops.OpOverload,
    function: type[torch.autograd.Function],
    jvp: Callable[[tuple, tuple], torch.Tensor] | None = None,
) -> None:
    """Routes ``op`` through ``function`` (an ``autograd.Function``) when a gradient is needed.

    ``function.forward`` must call ``op`` inside :func:`below_autograd`. Without
    any input that requires grad, the call goes straight to the device kernel.

    Forward mode (``torch.autograd.forward_ad``, ``torch.func.jvp``): when an input carries
    a tangent, ``jvp(primals, tangents)`` (the op's arguments, and their tangents with
    None for those without) gives the output's tangent, built from ops so that reverse
    mode still sees it; an op without ``jvp`` raises rather than drop the tangent.
    """
    after_autograd = torch._C._after_autograd_keyset
    handle = op._handle
    grad_enabled = torch.is_grad_enabled
    tensor_positions = tuple(
        i for i, arg in enumerate(op._schema.arguments) if _is_tensor_type(arg.type)
    )
    name = op._schema.name.split("::")[1]
    defaults = [arg.default_value for arg in op._schema.arguments]

    def forward_mode(args):
        """The dual output when some input has a tangent at the current level, else None."""
        args = (*args, *defaults[len(args) :])  # trailing defaults may be left out
        tangents, primals = [None] * len(args), list(args)
        for i in tensor_positions:
            if i < len(args) and args[i] is not None:
                primals[i], tangents[i] = forward_ad.unpack_dual(args[i])
        if all(t is None for t in tangents):
            return None
        if jvp is None:
            raise NotImplementedError(
                f"lowrank.{name} has no forward-mode derivative (torch.func.jvp, forward_ad); "
                "use reverse mode"
            )
        primal = op(*primals)
        return forward_ad.make_dual(primal, jvp(tuple(primals), tuple(tangents)))

    def kernel(keyset, *args):
        if forward_ad._current_level >= 0:
            dual = forward_mode(args)
            if dual is not None:
                return dual
        if grad_enabled():
            for i in tensor_positions:
                if i < len(args) and args[i] is not None and args[i].requires_grad:
                    return function.apply(*args)
        return handle.redispatch_boxed(keyset & after_autograd, *args)

    lib, name = _split(op)
    lib.impl(name, kernel, "Autograd", with_keyset=True)


_AUTOCAST_KEYS = {"cpu": "AutocastCPU", "cuda": "AutocastCUDA"}


def register_autocast(op: torch._ops.OpOverload, like: int | None = None) -> None:
    """Under ``torch.autocast``, ``op`` casts its floating tensor arguments to the autocast
    dtype (as ``F.linear`` does), so float32 master weights meet bfloat16/float16
    activations. ``like``: the position of an argument written in place, whose dtype the
    others take instead."""
    lib, name = _split(op)
    for device, key in _AUTOCAST_KEYS.items():
        exclude = torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, key))

        def kernel(*args, device=device, exclude=exclude):
            dtype = args[like].dtype if like is not None else _autocast_dtype(device)
            cast = [a.to(dtype) if isinstance(a, torch.Tensor) and a.is_floating_point()
                    and i != like else a for i, a in enumerate(args)]  # fmt: skip
            with torch._C._ExcludeDispatchKeyGuard(exclude):
                return op(*cast)

        lib.impl(name, kernel, key)


def autocast_cast(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """For Python-level ops composed of registered ones: under ``torch.autocast`` on the
    tensors' device, the floating tensors cast to the autocast dtype (as
    :func:`register_autocast` does); otherwise unchanged."""
    device = tensors[0].device.type
    if device not in _AUTOCAST_KEYS or not torch.is_autocast_enabled(device):
        return tensors
    dtype = _autocast_dtype(device)
    return tuple(t.to(dtype) if t.is_floating_point() else t for t in tensors)


def _autocast_dtype(device: str) -> torch.dtype:
    if hasattr(torch, "get_autocast_dtype"):
        return torch.get_autocast_dtype(device)
    return torch.get_autocast_cpu_dtype() if device == "cpu" else torch.get_autocast_gpu_dtype()


def multilinear_jvp(op: Callable, positions: tuple[int, ...]) -> Callable:
    """The tangent of an op linear in each argument at ``positions`` separately (the
    product rule): the sum, over arguments with a tangent, of the op with that argument
    replaced by its tangent."""

    def jvp(primals: tuple, tangents: tuple) -> torch.Tensor:
        out = None
        for i in positions:
            if tangents[i] is not None:
                args = list(primals)
                args[i] = tangents[i]
                term = op(*args)
                out = term if out is None else out + term
        return out

    return jvp


def _is_tensor_type(t) -> bool:
    """Tensor or Tensor? in a schema (the arguments that can require grad)."""
    if isinstance(t, torch.OptionalType):
        t = t.getElementType()
    return isinstance(t, torch.TensorType)


def register_not_differentiable(op: torch._ops.OpOverload, hint: str = "") -> None:
    """For ops with no derivative (the ``*_backward`` ops): a gradient or tangent asked of
    them raises instead of silently coming back missing or zero."""
    name = op._schema.name.split("::")[1]
    message = f"lowrank.{name} is not differentiable" + (f"; {hint}" if hint else "")

    class NotDifferentiable(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *args):
            with below_autograd():
                return op(*args)

        @staticmethod
        def backward(ctx, *grads):
            raise RuntimeError(message)

    def refuse(primals, tangents):
        raise NotImplementedError(message)

    register_autograd(op, NotDifferentiable, refuse)


def run_below(op: torch._ops.OpOverload, *args):
    """``op(*args)`` past the autograd kernel (inside ``Function.forward``), as a tensor of
    its own: autograd forbids modifying in place a custom Function's output that is a view
    of an intermediate, so an output that is one is copied."""
    with below_autograd():
        out = op(*args)
    return out if out._base is None else out.clone()


_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)


def tracing(t: torch.Tensor) -> bool:
    """True while ``t`` stands for a value being traced rather than computed
    (``torch.compile``, ``torch.export``, ``opcheck``: fake, functional or meta tensors, sizes
    that may be symbolic), so nothing can be measured on it."""
    if type(t) in _PLAIN_TENSORS:  # the eager hot path: tracing wraps tensors in subclasses
        return t.is_meta
    return torch.compiler.is_compiling() or t.is_meta or is_fake(t)


def below_autograd():
    """Context in which an op call skips the autograd kernel (inside ``Function.forward``)."""
    return torch._C._AutoDispatchBelowAutograd()
