"""The SVD-parameterised adapters on :class:`lowrank.nn.svd_adapter.SVDAdapter`
(``delta W = s B C A``), each a conversion kind.

============  =================================  ==========  =======================  ========
kind          B (out x r) / A (r x in)           C           trains                   base
============  =================================  ==========  =======================  ========
``lora_xs``   ``U_r`` / ``S_r V_r^T`` of W        r x r       C                        W
``lora_sb``   ``U_r`` / ``V_r^T`` of the update   r x r       C                        W
``sorsa``     ``U_r`` / ``V_r^T`` of W            diag S_r    B, C, A (+ regulariser)  residual
``svfit``     ``U_r`` / ``V_r^T`` of W            diag S_r    C                        residual
``loldu``     ``P L_r`` / ``U_r`` (LDU of W)      diag D_r    C and the scale s        residual
============  =================================  ==========  =======================  ========

- **LoRA-XS** (Bałazy et al. 2024): the truncated SVD of the weight, ``W ~ U_r S_r V_r^T``,
  gives the frozen factors, ``B = U_r`` and ``A = S_r V_r^T`` (the singular values on the
  input side, as the authors' implementation does), and only the ``r x r`` core trains,
  starting from ``N(0, sigma^2)`` with ``sigma = 1e-5``; ``s = alpha / r``. The base weight
  is unchanged.
- **LoRA-SB** (Ponkshe et al. 2024, "Initialization using Update Approximation is a Silver
  Bullet for Extremely Efficient Low-Rank Fine-Tuning", arXiv 2411.19557): LoRA-XS's form
  started from the first step full fine-tuning would take. The gradient ``G`` of the loss
  with respect to each targeted weight is averaged over the calibration batches
  (:func:`first_update`); the first update is Adam's first step, ``dW = -lr sign(G)``
  (``update="gradient"`` for SGD's ``-lr G``), with ``lr`` the learning rate of that first
  step (the authors take the first step of a linear warm-up, ``lr / warmup_steps``). Its
  truncated SVD ``dW ~ U_r S_r V_r^T`` gives ``B = U_r``, ``C = S_r / s``, ``A = V_r^T`` with
  ``s = alpha / r = 1`` (``alpha = r``, as the authors' code sets it); the base weight is
  unchanged, so the adapted weight starts at ``W + (best rank-r approximation of dW)``, and
  with ``B``, ``A`` orthonormal each step on ``C`` moves ``W`` by the projection
  ``U_r U_r^T G V_r V_r^T`` of the full gradient, the closest update the form allows. (The
  authors' code sums per-sample gradients with the model in training mode; here the model
  is in eval mode, so the estimate is deterministic. ``sign`` of a sum and of a mean agree.)
- **SORSA** (Cao 2024, "SORSA: Singular Values and Orthonormal Regularized Singular Vectors
  Adaptation of Large Language Models", arXiv 2409.00055): PiSSA's split, the principal part
  ``U_p diag(S_p) V_p^T`` (``B = U_p``, ``C = S_p``, ``A = V_p^T``) trains in all three
  factors and the residual ``W - U_p diag(S_p) V_p^T`` is the frozen base. The orthonormal
  regulariser ``L_reg = ||U_p^T U_p - I||_F + ||V_p^T V_p - I||_F`` (Frobenius norms, not
  squared; :func:`sorsa_regularizer`) is descended in its own gradient step, not through
  the optimizer: ``W_{p,t+1} = W_{p,t} - eta_t (optimizer step on the loss) - gamma_t grad
  L_reg``, ``gamma_t = gamma eta_t / eta_0`` (:func:`sorsa_step`, or :func:`sorsa_hook` on
  the optimizer; ``gamma = 4e-4`` in the paper).
- **SVFit** (Sun et al. 2024): the same split; only the top-``r`` singular values train.
- **LoLDU** (Shi et al. 2024): the LU factorisation with partial pivoting ``W = P L D U``
  (``L`` unit lower, ``D`` diagonal, ``U`` unit upper) gives the frozen ``B = P L_r``
  (the first ``r`` columns) and ``A = U_r`` (the first ``r`` rows); the diagonal ``D_r``
  and the scale ``s`` train, and the base becomes ``W - s P L_r diag(D_r) U_r``. The
  diagonal starts as ``D_r`` (``init_diagonal="lu"``) or as in the paper's ablation:
  ``"constant"`` (the mean of ``D_r``), ``"uniform"`` (in ``+-mean/2``) or ``"normal"``
  (``D_r``'s mean and standard deviation); the base is the residual of the values it starts
  from, so the layer's function is unchanged at init.

Every init but LoRA-XS and LoRA-SB keeps the layer's function (to rounding); LoRA-XS moves
it by ``s B C A`` with ``C ~ 1e-5``, LoRA-SB by the approximated first step. Through
:func:`lowrank.nn.convert` the SVDs of all targeted layers are computed by one batched
:func:`lowrank.linalg.rsvd` call per weight shape (``svd="exact"`` for
``torch.linalg.svd``), before any layer changes. Each adapter exports to PEFT as plain LoRA
(:func:`lowrank.nn.lora.save_peft`), exactly.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lowrank import _validate as check
from lowrank.nn import calibration as calib
from lowrank.nn._base import check_dropout, config_dtype
from lowrank.nn.registry import ConversionContext, KindConfig
from lowrank.nn.svd_adapter import SVDS, SVDAdapter, register_svd_kind, top_singular_triplets

Triplets = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
UPDATES = ("sign", "gradient")
LOW_PRECISION = (torch.float16, torch.bfloat16)
DIAGONAL_INITS = ("lu", "constant", "uniform", "normal")


def _triplets(base: nn.Linear, rank: int, triplets, svd: str, n_iter: int, seed) -> Triplets:
    """The top-``rank`` singular triplets of ``base.weight``: given, or computed."""
    if triplets is None:
        return top_singular_triplets({"w": base.weight}, rank, svd=svd, n_iter=n_iter,
                                     seed=seed)["w"]  # fmt: skip
    u, s, vh = triplets
    if u.shape[-1] < rank or s.shape[-1] < rank or vh.shape[-2] < rank:
        raise ValueError(f"triplets must hold at least rank = {rank} singular triplets")
    return u[:, :rank], s[:rank], vh[:rank]


def _check_svd(svd: str, n_iter: int) -> int:
    if svd not in SVDS:
        raise ValueError(f"svd must be one of {SVDS}, got {svd!r}")
    return check.iterations("n_iter", n_iter)


_FLOAT32_MAX = torch.finfo(torch.float32).max


def _check_alpha(alpha: Any, rank: int) -> float:
    """``alpha`` (default ``rank``) such that the scale ``alpha / rank`` is finite in float32,
    the scale's precision at least."""
    if alpha is None:
        return float(rank)
    return check.real("alpha", alpha, -_FLOAT32_MAX * rank, _FLOAT32_MAX * rank)


def _check_sigma(sigma: Any, dtype: torch.dtype) -> float:
    """LoRA-XS's init standard deviation: its normal draws must stay finite in ``dtype``."""
    return check.real("sigma", sigma, 0.0, torch.finfo(dtype).max / 16)


class LoRAXSAdapter(SVDAdapter):
    """LoRA-XS (module docstring): ``B = U_r``, ``A = S_r V_r^T`` frozen, ``C`` (``r x r``)
    trains from ``N(0, sigma^2)``, ``s = alpha / rank`` (default ``alpha = rank``).

    ``triplets``: the base weight's top singular triplets ``(U, S, Vh)`` if already
    computed (``convert`` passes the batched ones); else computed here with ``svd``,
    ``n_iter`` and ``seed`` (:func:`top_singular_triplets`)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float | None = None, *,
                 sigma: float = 1e-5, svd: str = "randomized", n_iter: int = 2,
                 seed: int | None = 0, dropout: float = 0.0, dtype: torch.dtype | None = None,
                 triplets: Triplets | None = None) -> None:  # fmt: skip
        alpha = _check_alpha(alpha, rank)
        if dtype is None and isinstance(base, nn.Linear):
            sigma = _check_sigma(sigma, base.weight.dtype)
        elif isinstance(dtype, torch.dtype) and dtype.is_floating_point:
            sigma = _check_sigma(sigma, dtype)
        n_iter = _check_svd(svd, n_iter)
        super().__init__(base, rank, trainable=("C",), scale=alpha / rank, dropout=dropout,
                         dtype=dtype)  # fmt: skip
        if self.A.is_meta:
            return
        u, s, vh = _triplets(self.base, self.rank, triplets, svd, n_iter, seed)
        generator = torch.Generator(device=self.C.device)
        generator.manual_seed(seed if seed is not None else generator.seed())
        core = torch.empty_like(self.C).normal_(0.0, sigma, generator=generator)
        self.set_factors(u, core, s[:, None] * vh)


class LoRASBAdapter(SVDAdapter):
    """LoRA-SB (module docstring): from ``update``, the ``(out, in)`` first update ``dW`` of
    full fine-tuning (:func:`first_update`), or its top singular ``triplets``
    ``dW ~ U_r S_r V_r^T``: ``B = U_r``, ``C = diag(S_r) / s``, ``A = V_r^T`` with ``s = 1``;
    only ``C`` trains. The base is unchanged: the adapter starts as the best rank-``r``
    approximation of the update."""

    def __init__(self, base: nn.Linear, rank: int, update: torch.Tensor | None = None, *,
                 svd: str = "randomized", n_iter: int = 2, seed: int | None = 0,
                 dropout: float = 0.0, dtype: torch.dtype | None = None,
                 triplets: Triplets | None = None) -> None:  # fmt: skip
        n_iter = _check_svd(svd, n_iter)
        super().__init__(base, rank, trainable=("C",), dropout=dropout, dtype=dtype)
        if self.A.is_meta:
            return
        if triplets is None:
            if update is None:
                raise ValueError("LoRA-SB needs the first update (update=) or its singular "
                                 "triplets (triplets=), e.g. from first_update(...)")  # fmt: skip
            check.tensor("update", update)
            shape = tuple(self.base.weight.shape)
            if tuple(update.shape) != shape:
                raise ValueError(f"update must have the base weight's shape {shape}, got "
                                 f"{tuple(update.shape)}")  # fmt: skip
            if not bool(torch.isfinite(update).all()):
                raise ValueError("update contains NaN or Inf")
            # the SVD of the update scaled to entries of at most 1 (no overflow in its
            # products), its singular values scaled back
            size = update.detach().abs().amax().double().clamp_min(torch.finfo(update.dtype).tiny)
            u, s, vh = top_singular_triplets({"u": update / size.to(update.dtype)}, self.rank,
                                             svd=svd, n_iter=n_iter, seed=seed)["u"]  # fmt: skip
            triplets = (u, (s.double() * size).to(s.dtype), vh)
        u, s, vh = _triplets(self.base, self.rank, triplets, svd, n_iter, seed)
        core = torch.diag(s) / float(self.scale)
        if not bool(torch.isfinite(core.to(self.C.dtype)).all()):
            raise ValueError(f"the singular values of the update (or triplets) overflow the "
                             f"adapter's dtype {self.C.dtype}")  # fmt: skip
        self.set_factors(u, core, vh)


class SORSAAdapter(SVDAdapter):
    """SORSA (module docstring): ``B = U_p``, ``C = S_p`` (diagonal), ``A = V_p^T`` from the
    top-``r`` SVD of the weight, all trainable, on the residual base ``W - U_p diag(S_p)
    V_p^T``; train with :func:`sorsa_hook` on the optimizer (or call :func:`sorsa_step`
    with ``gamma_t`` at each step)."""

    def __init__(self, base: nn.Linear, rank: int, *, svd: str = "randomized", n_iter: int = 2,
                 seed: int | None = 0, dropout: float = 0.0, dtype: torch.dtype | None = None,
                 triplets: Triplets | None = None) -> None:  # fmt: skip
        n_iter = _check_svd(svd, n_iter)
        super().__init__(base, rank, diagonal=True, trainable=("B", "C", "A"), dropout=dropout,
                         dtype=dtype)  # fmt: skip
        if self.A.is_meta:
            self.set_factors(self.B, self.C, self.A, residual=True)
            return
        u, s, vh = _triplets(self.base, self.rank, triplets, svd, n_iter, seed)
        self.set_factors(u, s, vh, residual=True)


class SVFitAdapter(SVDAdapter):
    """SVFit (module docstring): ``B = U_r``, ``A = V_r^T`` frozen, the top singular values
    ``C = S_r`` train, on the residual base."""

    def __init__(self, base: nn.Linear, rank: int, *, svd: str = "randomized", n_iter: int = 2,
                 seed: int | None = 0, dropout: float = 0.0, dtype: torch.dtype | None = None,
                 triplets: Triplets | None = None) -> None:  # fmt: skip
        n_iter = _check_svd(svd, n_iter)
        super().__init__(base, rank, diagonal=True, trainable=("C",), dropout=dropout,
                         dtype=dtype)  # fmt: skip
        if self.A.is_meta:
            self.set_factors(self.B, self.C, self.A, residual=True)
            return
        u, s, vh = _triplets(self.base, self.rank, triplets, svd, n_iter, seed)
        self.set_factors(u, s, vh, residual=True)


def ldu_factors(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, ...]:
    """``(P L_r, D_r, U_r)`` of the LU factorisation with partial pivoting ``W = P L D U``
    (``L`` unit lower, ``D`` diagonal, ``U`` unit upper), batched over leading dimensions,
    in float32 (float64 stays float64). A zero pivot leaves its row of ``U`` as computed
    (zero), so ``P L_r diag(D_r) U_r`` is still the leading part of ``W``."""
    work = weight.detach().to(torch.float64 if weight.dtype == torch.float64 else torch.float32)
    p, lower, upper = torch.linalg.lu(work)
    d = upper.diagonal(dim1=-2, dim2=-1)[..., :rank]
    safe = torch.where(d == 0, torch.ones_like(d), d)
    unit_upper = upper[..., :rank, :] / safe[..., :, None]
    return p @ lower[..., :, :rank], d, unit_upper


class LoLDUAdapter(SVDAdapter):
    """LoLDU (module docstring): ``B = P L_r``, ``A = U_r`` frozen; the diagonal ``C`` and
    the scale ``s`` (from ``alpha / rank``, default 1) train, on the residual base.

    ``factors``: ``(P L_r, D_r, U_r)`` if already computed (:func:`ldu_factors`)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float | None = None, *,
                 init_diagonal: str = "lu", train_scale: bool = True, seed: int | None = 0,
                 dropout: float = 0.0, dtype: torch.dtype | None = None,
                 factors: tuple[torch.Tensor, ...] | None = None) -> None:  # fmt: skip
        if init_diagonal not in DIAGONAL_INITS:
            raise ValueError(f"init_diagonal must be one of {DIAGONAL_INITS}, got "
                             f"{init_diagonal!r}")  # fmt: skip
        alpha = _check_alpha(alpha, rank)
        trainable = ("C", "scale") if train_scale else ("C",)
        super().__init__(base, rank, diagonal=True, trainable=trainable, scale=alpha / rank,
                         dropout=dropout, dtype=dtype)  # fmt: skip
        if self.A.is_meta:
            self.set_factors(self.B, self.C, self.A, residual=True)
            return
        lower, d, upper = factors if factors is not None else ldu_factors(self.base.weight, rank)
        d = d[:rank].clone()
        if init_diagonal != "lu":
            mean, std = float(d.mean()), float(d.std()) if rank > 1 else 0.0
            generator = torch.Generator(device=d.device).manual_seed(seed or 0)
            if init_diagonal == "constant":
                d.fill_(mean)
            elif init_diagonal == "uniform":
                half = abs(mean) / 2
                d.uniform_(-half, half, generator=generator)
            else:
                d.normal_(mean, std, generator=generator)
        # the adapter starts as s P L_r diag(D_r) U_r (as the authors' code does), the base
        # as the rest
        self.set_factors(lower[:, :rank], d, upper[:rank], residual=True)


# ---- LoRA-SB's first update ---------------------------------------------------------------------


def default_loss(batch: Any, output: Any) -> torch.Tensor:
    """The loss a model returns: ``output.loss`` or ``output["loss"]`` (Hugging Face
    models given labels), else the output itself when it is a scalar."""
    loss = getattr(output, "loss", None)
    if loss is None and isinstance(output, Mapping):
        loss = output.get("loss")
    if loss is None and isinstance(output, torch.Tensor) and output.numel() == 1:
        loss = output
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise ValueError("the model's output has no scalar loss (no .loss, no 'loss' key, not "
                         "a scalar): give loss=callable(batch, output) -> scalar")  # fmt: skip
    return loss.reshape(())


def first_update(
    model: nn.Module,
    batches: list,
    layers: Mapping[str, nn.Linear],
    *,
    lr: float = 1e-3,
    update: str = "sign",
    loss: Callable[[Any, Any], torch.Tensor] | None = None,
    progress: bool = True,
) -> dict[str, torch.Tensor]:
    """The first update full fine-tuning would make to each layer's weight, ``{name:
    (out, in) tensor}`` in float32 (float64 weights stay float64).

    The gradient of ``loss(batch, model output)`` (default :func:`default_loss`) with respect
    to each layer's weight is averaged over ``batches`` (the model in eval mode, so the
    estimate is deterministic; each batch called as :func:`lowrank.nn.calibration.call_model`
    does); the update is ``-lr * sign(G)`` (``update="sign"``: Adam's first step) or
    ``-lr * G`` (``"gradient"``: SGD's). No parameter's ``.grad`` or ``requires_grad`` is
    left changed."""
    if update not in UPDATES:
        raise ValueError(f"update must be one of {UPDATES}, got {update!r}")
    lr = check.real("lr", lr, 0.0)
    if lr == 0.0:
        raise ValueError("lr must be positive")
    loss = default_loss if loss is None else loss
    if not callable(loss):
        raise TypeError(f"loss must be callable (batch, output) -> scalar, got {loss!r}")
    names = list(layers)
    weights = [layers[n].weight for n in names]
    flags = [w.requires_grad for w in weights]
    sums: list[torch.Tensor | None] = [None] * len(names)
    count = 0
    training = model.training
    try:
        model.eval()
        for w in weights:
            w.requires_grad_(True)
        with torch.enable_grad():
            for batch in calib._bar(batches, progress, "lora_sb: first update"):
                value = loss(batch, calib.call_model(model, batch))
                if not isinstance(value, torch.Tensor) or value.numel() != 1:
                    raise ValueError("loss must return a scalar tensor")
                if not bool(torch.isfinite(value)):
                    raise ValueError("the loss on a calibration batch is NaN or Inf")
                grads = torch.autograd.grad(value.reshape(()), weights, allow_unused=True)
                for i, g in enumerate(grads):
                    if g is not None:
                        g = g.double() if g.dtype == torch.float64 else g.float()
                        sums[i] = g if sums[i] is None else sums[i] + g
                count += 1
    finally:
        model.train(training)
        for w, flag in zip(weights, flags):
            w.requires_grad_(flag)
    if count == 0:
        raise ValueError("calibration holds no batches")
    unused = [n for n, s in zip(names, sums) if s is None]
    if unused:
        raise ValueError(f"the loss does not depend on the layers {unused[:5]}: are they used "
                         "by the model's forward?")  # fmt: skip
    result = {}
    for name, total in zip(names, sums):
        mean = total / count
        result[name] = -lr * (torch.sign(mean) if update == "sign" else mean)
        if not bool(torch.isfinite(result[name]).all()):
            raise ValueError(f"lr = {lr:g} makes the first update of {name} overflow "
                             f"{result[name].dtype}")  # fmt: skip
    return result


# ---- SORSA's regulariser ------------------------------------------------------------------------


def _sorsa_layers(model: nn.Module) -> list[SORSAAdapter]:
    return [m for m in model.modules() if isinstance(m, SORSAAdapter)]


def _work(t: torch.Tensor) -> torch.Tensor:
    """``t`` in float32 at least (float64 stays float64), for the regulariser's arithmetic."""
    return t.double() if t.dtype == torch.float64 else t.float()


def sorsa_regularizer(model: nn.Module) -> torch.Tensor:
    """SORSA's orthonormal regulariser (Cao 2024, arXiv 2409.00055), summed over the model's
    :class:`SORSAAdapter` layers::

        L_reg = ||U_p^T U_p - I||_F + ||V_p^T V_p - I||_F      (U_p = B, V_p^T = A)

    the Frobenius norms themselves, not their squares. Differentiable (its gradient is what
    :func:`sorsa_step` descends), in float32 at least; 0 for a model without SORSA layers."""
    total = torch.zeros(())
    for layer in _sorsa_layers(model):
        b, a = _work(layer.B), _work(layer.A)
        eye = torch.eye(layer.rank, device=b.device, dtype=b.dtype)
        value = torch.linalg.matrix_norm(b.T @ b - eye) + torch.linalg.matrix_norm(a @ a.T - eye)
        total = total.to(value) + value
    return total


def orthonormality_error(model: nn.Module) -> float:
    """The largest ``max(||B^T B - I||_F, ||A A^T - I||_F)`` over the SORSA layers."""
    worst = 0.0
    with torch.no_grad():
        for layer in _sorsa_layers(model):
            b, a = layer.B.double(), layer.A.double()
            eye = torch.eye(layer.rank, dtype=torch.float64, device=b.device)
            worst = max(worst, float((b.T @ b - eye).norm()), float((a @ a.T - eye).norm()))
    return worst


@torch.no_grad()
def sorsa_step(model: nn.Module, gamma: float) -> None:
    """One gradient-descent step of size ``gamma`` on :func:`sorsa_regularizer`, separate from
    the optimizer's, in every :class:`SORSAAdapter` of ``model``::

        B <- B - gamma * 2 B M_B / ||M_B||_F        M_B = B^T B - I
        A <- A - gamma * 2 M_A A / ||M_A||_F        M_A = A A^T - I

    (the gradients of the two norms; a factor that is already orthonormal does not move,
    the norm's subgradient 0 there). Computed in float32 at least."""
    gamma = check.real("gamma", gamma, 0.0)
    for layer in _sorsa_layers(model):
        b, a = _work(layer.B), _work(layer.A)
        eye = torch.eye(layer.rank, device=b.device, dtype=b.dtype)
        m_b, m_a = b.T @ b - eye, a @ a.T - eye
        norm_b, norm_a = torch.linalg.matrix_norm(m_b), torch.linalg.matrix_norm(m_a)
        step_b = (2 * gamma) * (b @ m_b) / torch.where(norm_b > 0, norm_b, 1.0)
        step_a = (2 * gamma) * (m_a @ a) / torch.where(norm_a > 0, norm_a, 1.0)
        layer.B.copy_(b - step_b)
        layer.A.copy_(a - step_a)


def sorsa_hook(optimizer: torch.optim.Optimizer, model: nn.Module, gamma: float = 4e-4):
    """Adds SORSA's regulariser step to every ``optimizer.step()``: the paper's update

        W_{p,t+1} = W_{p,t} - eta_t (the optimizer's step on the loss) - gamma_t grad L_reg(W_{p,t})
        gamma_t = gamma * eta_t / eta_0

    with ``eta_t`` the first parameter group's learning rate at the step and ``eta_0`` its
    ``initial_lr`` (set by a learning-rate scheduler; else its ``lr`` when the hook was
    added), so the regulariser follows the schedule; ``gamma = 4e-4`` is the paper's. The
    regulariser's step (:func:`sorsa_step`) runs just before the optimizer's (a step
    pre-hook), so both gradients are taken at ``W_{p,t}``. Returns the hook's handle
    (``.remove()`` to stop).

    The authors' released trainer instead adds ``gamma / eta_0`` times the gradient of the
    regulariser *averaged over all adapted matrices* to the loss's gradient before AdamW's
    step, so that Adam normalises it; the separate descent step here is the paper's equation
    (the two coincide for plain SGD up to that averaging).

    Warns (``UserWarning``, once here) when a SORSA layer holds ``B`` or ``A`` in float16 or
    bfloat16: the regulariser's step, ``2 gamma_t`` times a unit-norm direction, is far
    below the rounding of their entries and is mostly lost. The adapters' ``dtype`` option
    (``convert(model, "sorsa", ..., dtype=torch.float32)``) keeps them in float32 with the
    base layers in low precision."""
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got "
                        f"{type(optimizer).__name__}")  # fmt: skip
    gamma = check.real("gamma", gamma, 0.0)
    layers = _sorsa_layers(model)
    if not layers:
        raise ValueError("model holds no SORSAAdapter")
    low = sorted({str(p.dtype).removeprefix("torch.") for m in layers for p in (m.B, m.A)
                  if p.dtype in LOW_PRECISION})  # fmt: skip
    if low and gamma > 0:
        warnings.warn(f"SORSA adapters hold B and A in {' and '.join(low)}: the orthonormal "
                      f"regulariser's step (2 gamma_t times a unit-norm direction, gamma = "
                      f"{gamma:g}) is below the rounding of their entries and is mostly lost. "
                      "Keep the adapters in float32 with the kind's dtype option, "
                      "convert(model, 'sorsa', ..., dtype=torch.float32) (the base layers "
                      "may stay in low precision)", UserWarning, stacklevel=2)  # fmt: skip
    lr_when_added = float(optimizer.param_groups[0]["lr"])

    def hook(opt, _args, _kwargs):
        group = opt.param_groups[0]
        lr, lr0 = float(group["lr"]), float(group.get("initial_lr", lr_when_added))
        sorsa_step(model, gamma * (lr / lr0 if lr0 > 0 else 1.0))

    return optimizer.register_step_pre_hook(hook)


# ---- the conversion kinds -----------------------------------------------------------------------


@dataclass
class _SVDKindConfig(KindConfig):
    """The options every SVD-based kind shares: ``rank`` (8), ``dropout``, ``dtype`` (the
    adapters'; default the base's), ``seed``, and for the SVD ``svd`` (``"randomized"``:
    :func:`lowrank.linalg.rsvd` with ``n_iter`` power iterations; ``"exact"``)."""

    rank: int = 8
    dropout: float = 0.0
    dtype: torch.dtype | None = None
    seed: int | None = 0
    svd: str = "randomized"
    n_iter: int = 2

    def __post_init__(self):
        self.rank = check.positive_int("rank", self.rank)
        self.dropout = check_dropout(self.dropout)
        self.dtype = config_dtype(self.dtype)
        if self.seed is not None:
            self.seed = check.integer("seed", self.seed, 0)
        self.n_iter = _check_svd(self.svd, self.n_iter)


@dataclass
class LoRAXSConfig(_SVDKindConfig):
    """``convert(model, "lora_xs", ...)``: :class:`LoRAXSAdapter`'s options (``alpha``
    default ``rank``, ``sigma`` 1e-5) and the shared ones (:class:`_SVDKindConfig`)."""

    alpha: float | None = None
    sigma: float = 1e-5

    def __post_init__(self):
        super().__post_init__()
        if self.alpha is not None:
            self.alpha = _check_alpha(self.alpha, self.rank)
        self.sigma = _check_sigma(self.sigma, self.dtype or torch.float32)


@dataclass
class LoRASBConfig(_SVDKindConfig):
    """``convert(model, "lora_sb", calibration=batches, ...)``: the first update is estimated
    on the calibration batches by :func:`first_update` with ``lr`` (the learning rate of full
    fine-tuning's first step: with a linear warm-up over ``k`` steps, ``peak_lr / k``),
    ``update`` and ``loss`` (a callable ``(batch, output) -> scalar``; default the model
    output's ``.loss``)."""

    lr: float = 1e-3
    update: str = "sign"
    loss: Callable[[Any, Any], torch.Tensor] | None = None

    def __post_init__(self):
        super().__post_init__()
        self.lr = check.real("lr", self.lr, 0.0)
        if self.lr == 0.0:
            raise ValueError("lr must be positive")
        if self.update not in UPDATES:
            raise ValueError(f"update must be one of {UPDATES}, got {self.update!r}")
        if self.loss is not None and not callable(self.loss):
            raise TypeError(f"loss must be callable (batch, output) -> scalar, got {self.loss!r}")

    def to_dict(self) -> dict[str, Any]:
        d = super().to_dict()
        if self.loss is not None:  # JSON holds the function's name, not the function
            d["loss"] = getattr(self.loss, "__qualname__", repr(self.loss))
        return d


@dataclass
class SORSAConfig(_SVDKindConfig):
    """``convert(model, "sorsa", ...)``: :class:`SORSAAdapter`; the regulariser's ``gamma`` is
    given to :func:`sorsa_hook` (or :func:`sorsa_step`) at training time."""


@dataclass
class SVFitConfig(_SVDKindConfig):
    """``convert(model, "svfit", ...)``: :class:`SVFitAdapter`."""


@dataclass
class LoLDUConfig(_SVDKindConfig):
    """``convert(model, "loldu", ...)``: :class:`LoLDUAdapter`'s options (``alpha`` default
    ``rank``, ``init_diagonal``, ``train_scale``); ``svd``/``n_iter`` are unused (LU)."""

    alpha: float | None = None
    init_diagonal: str = "lu"
    train_scale: bool = True

    def __post_init__(self):
        super().__post_init__()
        if self.alpha is not None:
            self.alpha = _check_alpha(self.alpha, self.rank)
        if self.init_diagonal not in DIAGONAL_INITS:
            raise ValueError(f"init_diagonal must be one of {DIAGONAL_INITS}, got "
                             f"{self.init_diagonal!r}")  # fmt: skip
        if not isinstance(self.train_scale, bool):
            raise TypeError(f"train_scale must be a bool, got {self.train_scale!r}")


def _check_ranks(context: ConversionContext, rank: int) -> None:
    """Every targeted layer must hold ``rank`` components: checked before any change."""
    for name, (out_f, in_f) in context.shapes.items():
        if rank > min(out_f, in_f):
            raise ValueError(f"rank must be at most min(in, out) of every targeted layer: "
                             f"{name} is {out_f}x{in_f}, rank = {rank}")  # fmt: skip


def _weights(context: ConversionContext) -> dict[str, torch.Tensor]:
    return {n: linear.weight for n, linear in context.linears.items()}


def _meta(context: ConversionContext) -> bool:
    return any(linear.weight.is_meta for linear in context.linears.values())


def _svd_plan(layer_cls, extra: Callable[[KindConfig], dict],
              check_layer: Callable[[KindConfig, nn.Linear], None] | None = None):  # fmt: skip
    """The plan of a kind whose init is the weights' top-``r`` SVD: every layer checked
    (``check_layer``) and all triplets computed first, one batched call per shape, then each
    layer from its own."""

    def plan(context: ConversionContext, config: _SVDKindConfig):
        _check_ranks(context, config.rank)
        for linear in context.linears.values() if check_layer else ():
            check_layer(config, linear)
        triplets = {}
        if not _meta(context):
            triplets = top_singular_triplets(_weights(context), config.rank, svd=config.svd,
                                             n_iter=config.n_iter, seed=config.seed)  # fmt: skip
        context.report.allocation = f"top-{config.rank} SVD ({config.svd}), batched by shape"
        options = {"dropout": config.dropout, "dtype": config.dtype, "seed": config.seed,
                   **extra(config)}  # fmt: skip

        def make(name, linear):
            layer = layer_cls(linear, config.rank, triplets=triplets.get(name), **options)
            return layer, f"rank {config.rank}"

        return make

    return plan


def _lora_sb_plan(context: ConversionContext, config: LoRASBConfig):
    _check_ranks(context, config.rank)
    if context.batches is None:
        raise ValueError("lora_sb needs calibration batches (calibration=) to estimate the "
                         "first update")  # fmt: skip
    # the update at lr = 1 (entries +-1 for "sign"), its singular values then scaled by lr:
    # the same triplets as those of the update itself, with no overflow in the SVD's products
    updates = first_update(context.model, context.batches, context.linears, lr=1.0,
                           update=config.update, loss=config.loss,
                           progress=context.progress)  # fmt: skip
    triplets = top_singular_triplets(updates, config.rank, svd=config.svd, n_iter=config.n_iter,
                                     seed=config.seed)  # fmt: skip
    for name, (u, s, vh) in triplets.items():
        s = s * config.lr
        dtype = config.dtype or context.linears[name].weight.dtype
        if not bool(torch.isfinite(s.to(dtype)).all()):
            raise ValueError(f"lr = {config.lr:g} makes the first update of {name} overflow "
                             f"{dtype}")  # fmt: skip
        triplets[name] = (u, s, vh)
    context.report.allocation = (f"first update -lr {config.update}(grad) over "
                                 f"{len(context.batches)} batches, "
                                 f"top-{config.rank} SVD")  # fmt: skip

    def make(name, linear):
        layer = LoRASBAdapter(linear, config.rank, triplets=triplets[name],
                              dropout=config.dropout, dtype=config.dtype)  # fmt: skip
        return layer, f"rank {config.rank}"

    return make


def _loldu_plan(context: ConversionContext, config: LoLDUConfig):
    _check_ranks(context, config.rank)
    factors: dict[str, tuple] = {}
    if not _meta(context):
        groups: dict[tuple, list[str]] = {}
        for name, w in _weights(context).items():
            groups.setdefault((tuple(w.shape), w.dtype, w.device), []).append(name)
        for names in groups.values():  # one batched LU per shape
            lower, d, upper = ldu_factors(torch.stack([context.linears[n].weight for n in names]),
                                          config.rank)  # fmt: skip
            for i, name in enumerate(names):
                factors[name] = (lower[i], d[i], upper[i])
    context.report.allocation = f"LU with partial pivoting, rank {config.rank}, batched by shape"

    def make(name, linear):
        layer = LoLDUAdapter(linear, config.rank, config.alpha,
                             init_diagonal=config.init_diagonal, train_scale=config.train_scale,
                             seed=config.seed, dropout=config.dropout, dtype=config.dtype,
                             factors=factors.get(name))  # fmt: skip
        return layer, f"rank {config.rank}"

    return make


def _svd_options(config):
    return {"svd": config.svd, "n_iter": config.n_iter}


def _lora_xs_options(config: LoRAXSConfig) -> dict:
    return {"alpha": config.alpha, "sigma": config.sigma, **_svd_options(config)}


def _lora_xs_check(config: LoRAXSConfig, linear: nn.Linear) -> None:
    _check_sigma(config.sigma, config.dtype or linear.weight.dtype)


register_svd_kind("lora_xs", config=LoRAXSConfig, layer=LoRAXSAdapter,
                  plan=_svd_plan(LoRAXSAdapter, _lora_xs_options, _lora_xs_check))  # fmt: skip
# LoRA-SB reads the calibration batches itself (gradients), not the input statistics.
register_svd_kind("lora_sb", config=LoRASBConfig, layer=LoRASBAdapter, plan=_lora_sb_plan)
register_svd_kind("sorsa", config=SORSAConfig, layer=SORSAAdapter,
                  plan=_svd_plan(SORSAAdapter, _svd_options))  # fmt: skip
register_svd_kind("svfit", config=SVFitConfig, layer=SVFitAdapter,
                  plan=_svd_plan(SVFitAdapter, _svd_options))  # fmt: skip
register_svd_kind("loldu", config=LoLDUConfig, layer=LoLDUAdapter, plan=_loldu_plan)

__all__ = [
    "LoLDUAdapter",
    "LoLDUConfig",
    "LoRASBAdapter",
    "LoRASBConfig",
    "LoRAXSAdapter",
    "LoRAXSConfig",
    "SORSAAdapter",
    "SORSAConfig",
    "SVFitAdapter",
    "SVFitConfig",
    "default_loss",
    "first_update",
    "ldu_factors",
    "orthonormality_error",
    "sorsa_hook",
    "sorsa_regularizer",
    "sorsa_step",
]
