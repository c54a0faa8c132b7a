"""LoRA-Pro: LoRA's gradients adjusted so that the low-rank step follows full fine-tuning.

Wang et al. 2024 ("LoRA-Pro: Are Low-Rank Adapters Properly Optimized?"). For an adapter
``W = W0 + s B A`` (``B``: ``m x r``, ``A``: ``r x n``, ``s = alpha / rank``) a step that
moves ``A`` by ``-lr g^A`` and ``B`` by ``-lr g^B`` moves ``W``, to first order, by
``-lr g~`` with the *equivalent gradient* ``g~ = s (B g^A + g^B A)``. Plain LoRA uses
``g^A = dL/dA = s B^T g``, ``g^B = dL/dB = s g A^T`` (``g = dL/dW``, the full gradient,
never formed). LoRA-Pro chooses ``g^A``, ``g^B`` so that ``g~`` is the closest (Frobenius)
to ``g`` among all equivalent gradients; the paper's Theorem 2.1 gives the minimisers

    g^A = (1/s^2) (B^T B)^{-1} dL/dA + X A
    g^B = (1/s^2) [I - B (B^T B)^{-1} B^T] dL/dB (A A^T)^{-1} - B X

for any ``r x r`` ``X`` (``X`` does not change ``g~``), and Theorem 2.2 picks the ``X``
that keeps ``(g^A, g^B)`` closest to ``(dL/dA, dL/dB)``: the solution of the Sylvester
equation ``B^T B X + X A A^T = -(1/s^2) (B^T B)^{-1} dL/dA A^T``. Everything is ``r x r``:
the two Gram matrices are diagonalised once (``eigh``), which gives their inverses and
solves the Sylvester equation in closed form (``X = U [(U^T C V) / (p_i + q_j)] V^T`` with
``B^T B = U diag(p) U^T``, ``A A^T = V diag(q) V^T``). Where a Gram matrix is singular
(``B = 0`` at LoRA's usual init) its pseudo-inverse is used, which gives the minimum-norm
least-squares solution; ``x="zero"`` takes ``X = 0`` instead of the Sylvester solution.

:class:`LoRAPro` is the optimizer: it finds every :class:`~lowrank.nn.LoRAAdapter` in a
model and updates its ``A``, ``B`` with the adjusted gradients, and every other trainable
parameter of the model by plain AdamW (or SGD). Two update rules (``mode=``):

- ``"adamw"`` (the paper's AdamW variant): Adam's moments are kept for the equivalent
  gradient ``g~`` of each adapted layer (full ``m x n`` moments, as the paper: LoRA-Pro
  with AdamW holds the optimizer state of full fine-tuning for the adapted layers). The
  bias-corrected Adam direction ``D = m^ / (sqrt(v^) + eps)`` is then treated as the full
  gradient: its LoRA gradients ``s B^T D`` and ``s D A^T`` are adjusted as above, and
  ``A -= lr g^A``, ``B -= lr g^B``, so the layer's weight moves by the best low-rank
  approximation of AdamW's full fine-tuning step.
- ``"sgd"``: ``A -= lr g^A``, ``B -= lr g^B`` with the adjusted gradients themselves (the
  paper's SGD analysis; no state).

Weight decay is decoupled (``p -= lr * weight_decay * p``, after the update) in both.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from lowrank import _validate as check
from lowrank.optim.projector import restore_saved_dtypes

__all__ = ["LoRAPro", "equivalent_gradient", "lora_pro_gradients"]

MODES = ("adamw", "sgd")
X_CHOICES = ("sylvester", "zero")


def _work_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _gram_eigh(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(eigenvalues, eigenvectors, mask of the eigenvalues treated as nonzero)`` of a
    symmetric positive semi-definite ``r x r`` Gram matrix."""
    values, vectors = torch.linalg.eigh((m + m.mT) / 2)
    values = values.clamp_min(0.0)
    tol = values.amax().clamp_min(torch.finfo(values.dtype).tiny) * (
        m.shape[-1] * torch.finfo(values.dtype).eps
    )
    keep = values > tol
    return values, vectors, keep


def lora_pro_gradients(
    a: torch.Tensor,
    b: torch.Tensor,
    grad_a: torch.Tensor,
    grad_b: torch.Tensor,
    scale: float,
    x: str = "sylvester",
) -> tuple[torch.Tensor, torch.Tensor]:
    """LoRA-Pro's adjusted gradients ``(g^A, g^B)`` (module docstring) of an adapter
    ``W0 + scale * b @ a`` from its LoRA gradients ``grad_a = dL/dA`` (``r x n``) and
    ``grad_b = dL/dB`` (``m x r``): the pair whose equivalent gradient
    ``scale (b g^A + g^B a)`` is the closest to the full gradient, and among those (with
    ``x="sylvester"``) the closest to ``(grad_a, grad_b)``. Computed in float32 (float64 for
    float64 inputs) and returned in the factors' dtypes."""
    if x not in X_CHOICES:
        raise ValueError(f"x must be one of {X_CHOICES}, got {x!r}")
    for name, t in (("a", a), ("b", b), ("grad_a", grad_a), ("grad_b", grad_b)):
        check.ndim(name, check.floating(name, t), 2)
    check.size("b", b, 1, a.shape[0], "the rank, a.shape[0]")
    for name, t, like in (("grad_a", grad_a, a), ("grad_b", grad_b, b)):
        if t.shape != like.shape:
            raise ValueError(f"{name} must have shape {tuple(like.shape)}, got {tuple(t.shape)}")
    scale = check.real("scale", scale)
    if scale == 0.0:
        raise ValueError("scale must be nonzero")
    dt = _work_dtype(a)
    a_, b_, ga, gb = (t.detach().to(dt) for t in (a, b, grad_a, grad_b))
    p, u, keep_p = _gram_eigh(b_.mT @ b_)  # B^T B = U diag(p) U^T
    q, v, keep_q = _gram_eigh(a_ @ a_.mT)  # A A^T = V diag(q) V^T
    inv_p = torch.where(keep_p, 1.0 / torch.where(keep_p, p, 1.0), 0.0)
    inv_q = torch.where(keep_q, 1.0 / torch.where(keep_q, q, 1.0), 0.0)
    btb_inv = (u * inv_p) @ u.mT
    aat_inv = (v * inv_q) @ v.mT
    s2 = 1.0 / (scale * scale)
    new_a = s2 * (btb_inv @ ga)
    gb_aat = gb @ aat_inv
    new_b = s2 * (gb_aat - b_ @ (btb_inv @ (b_.mT @ gb_aat)))
    if x == "sylvester":
        c = -(new_a @ a_.mT)  # -(1/s^2) (B^T B)^{-1} dL/dA A^T
        denom = p[:, None] + q[None, :]
        ok = denom > (p.amax() + q.amax()).clamp_min(torch.finfo(dt).tiny) * (
            a_.shape[0] * torch.finfo(dt).eps
        )
        y = torch.where(ok, (u.mT @ c @ v) / torch.where(ok, denom, 1.0), 0.0)
        xm = u @ y @ v.mT
        new_a = new_a + xm @ a_
        new_b = new_b - b_ @ xm
    return new_a.to(grad_a.dtype), new_b.to(grad_b.dtype)


def equivalent_gradient(
    a: torch.Tensor, b: torch.Tensor, grad_a: torch.Tensor, grad_b: torch.Tensor, scale: float
) -> torch.Tensor:
    """``scale * (b @ grad_a + grad_b @ a)``: the ``m x n`` change of ``W`` per unit step
    when ``A`` and ``B`` move along ``grad_a`` and ``grad_b`` (formed; for analysis)."""
    return scale * (b @ grad_a + grad_b @ a)


class LoRAPro(torch.optim.Optimizer):
    """LoRA-Pro (module docstring): the :class:`~lowrank.nn.LoRAAdapter` layers of
    ``model`` trained with the adjusted gradients, every other trainable parameter of
    ``model`` by plain AdamW (``mode="adamw"``) or SGD (``mode="sgd"``).

    Args:
        model: the model holding the adapters (e.g. after ``convert(model, "lora", ...)``).
        lr: the learning rate.
        betas, eps: Adam's (``mode="adamw"``).
        weight_decay: decoupled weight decay.
        mode: ``"adamw"`` or ``"sgd"``.
        x: ``"sylvester"`` (the paper's choice of ``X``) or ``"zero"``.

    The adapters must not be merged while training. Use like any optimizer::

        model = lowrank.nn.convert(model, "lora", rank=8)
        opt = lowrank.optim.LoRAPro(model, lr=1e-3)
        loss.backward(); opt.step(); opt.zero_grad()
    """

    def __init__(
        self,
        model: nn.Module,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        mode: str = "adamw",
        x: str = "sylvester",
    ) -> None:
        from lowrank.nn.lora import LoRAAdapter

        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        lr = check.real("lr", lr, 0.0)
        eps = check.real("eps", eps, 0.0)
        weight_decay = check.real("weight_decay", weight_decay, 0.0)
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise TypeError(f"betas must be a pair of numbers, got {betas!r}")
        betas = (
            check.real("betas[0]", betas[0], 0.0, 1.0),
            check.real("betas[1]", betas[1], 0.0, 1.0),
        )
        if betas[0] >= 1.0 or betas[1] >= 1.0:
            raise ValueError(f"betas must be in [0, 1), got {betas}")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if x not in X_CHOICES:
            raise ValueError(f"x must be one of {X_CHOICES}, got {x!r}")
        adapters = [m for m in model.modules() if isinstance(m, LoRAAdapter)]
        if not adapters:
            raise ValueError("model holds no LoRAAdapter (convert it with kind 'lora' first)")
        self._pairs: list[tuple[nn.Module, torch.Tensor, torch.Tensor]] = []
        paired: set[int] = set()
        factors: list[torch.Tensor] = []
        for m in adapters:
            if m.A.requires_grad and m.B.requires_grad:
                self._pairs.append((m, m.A, m.B))
                paired.update((id(m.A), id(m.B)))
                factors += [m.A, m.B]
        if not factors:
            raise ValueError("model's LoRAAdapter factors A and B do not require gradients")
        others = [p for p in model.parameters() if p.requires_grad and id(p) not in paired]
        defaults = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay}
        groups: list[dict[str, Any]] = [{"params": factors, "lora_pro": True}]
        if others:
            groups.append({"params": others, "lora_pro": False})
        super().__init__(groups, defaults)
        self.mode = mode
        self.x = x

    @torch.no_grad()
    def step(self, closure=None):
        """One update of every parameter with a gradient (module docstring)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        group = next(g for g in self.param_groups if g["lora_pro"])
        for module, a, b in self._pairs:
            if a.grad is None or b.grad is None:
                continue
            if module.merged:
                raise RuntimeError("LoRAPro.step: unmerge the adapters before training them")
            self._adapter_step(group, a, b, module.scale)
        for g in self.param_groups:
            if not g["lora_pro"]:
                for p in g["params"]:
                    if p.grad is not None:
                        self._plain_step(g, p)
        return loss

    def _adapter_step(self, group, a: torch.Tensor, b: torch.Tensor, scale: float) -> None:
        lr, wd = group["lr"], group["weight_decay"]
        grad_a, grad_b = a.grad, b.grad
        if self.mode == "adamw":
            state = self.state[a]
            dt = _work_dtype(a)
            equiv = equivalent_gradient(a.to(dt), b.to(dt),
                                        *lora_pro_gradients(a, b, grad_a.to(dt), grad_b.to(dt),
                                                            scale, "zero"), scale)  # fmt: skip
            t = _update_moments(state, equiv, group["betas"])
            beta1, beta2 = group["betas"]
            denom = (state["exp_avg_sq"] / (1 - beta2**t)).sqrt_().add_(group["eps"])
            direction = (state["exp_avg"] / (1 - beta1**t)) / denom
            bd, ad = b.to(dt), a.to(dt)
            grad_a = scale * (bd.mT @ direction)
            grad_b = scale * (direction @ ad.mT)
        new_a, new_b = lora_pro_gradients(a, b, grad_a, grad_b, scale, self.x)
        a.sub_(new_a.to(a.dtype), alpha=lr)
        b.sub_(new_b.to(b.dtype), alpha=lr)
        if wd:
            a.mul_(1 - lr * wd)
            b.mul_(1 - lr * wd)

    def load_state_dict(self, state_dict: dict) -> None:
        """Loads the state, keeping the moments in the dtype they were saved in (float32 for
        the equivalent gradients of float16/bfloat16 adapters)."""
        super().load_state_dict(state_dict)
        restore_saved_dtypes(self, state_dict)

    def _plain_step(self, group, p: torch.Tensor) -> None:
        lr, wd = group["lr"], group["weight_decay"]
        if self.mode == "sgd":
            p.sub_(p.grad, alpha=lr)
        else:
            state = self.state[p]
            t = _update_moments(state, p.grad, group["betas"], like=p)
            beta1, beta2 = group["betas"]
            step_size = lr / (1 - beta1**t)
            denom = (state["exp_avg_sq"].sqrt() / math.sqrt(1 - beta2**t)).add_(group["eps"])
            p.addcdiv_(state["exp_avg"], denom, value=-step_size)
        if wd:
            p.mul_(1 - lr * wd)


def _update_moments(state: dict, grad: torch.Tensor, betas: tuple[float, float],
                    like: torch.Tensor | None = None) -> float:  # fmt: skip
    """Adam's step count and first and second moments of ``grad`` in ``state`` (created as
    zeros shaped as ``like``, default ``grad``, on the first step), updated in place; returns
    the step count ``t`` for the bias corrections."""
    if not state:
        like = grad if like is None else like
        state["step"] = torch.zeros((), dtype=torch.float64)
        state["exp_avg"] = torch.zeros_like(like)
        state["exp_avg_sq"] = torch.zeros_like(like)
    state["step"] += 1
    beta1, beta2 = betas
    state["exp_avg"].lerp_(grad, 1 - beta1)
    state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    return float(state["step"])
