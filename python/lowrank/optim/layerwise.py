"""Layer-wise updates: each parameter updated during ``backward``, its gradient freed at once.

A standard step holds every gradient of the model at once: ``backward`` fills them all,
then ``optimizer.step()`` reads them. :func:`layerwise` instead updates each parameter in
its post-accumulate-grad hook (``Tensor.register_post_accumulate_grad_hook``), as soon as
its gradient is complete, and frees the gradient there, so at most one parameter's
gradient is alive at a time; ``backward`` is then the whole step (do not call
``optimizer.step()``). It works with any optimizer (:class:`~lowrank.optim.GaLore`,
:class:`~lowrank.optim.GaLoreAdamW`, torch's), each parameter stepped on its own by
:func:`~lowrank.optim.wrapper.step_only` (a GaLore refresh then decomposes one gradient at
a time: with the randomized SVD each refresh draws its own sketch, so the projectors are
those of another random draw than a standard step's; with ``svd="exact"`` the updates are
the standard step's).

What a step needs all gradients for is not possible: clipping by the global gradient norm,
an optimizer closure, accumulating gradients over several ``backward`` calls (each
``backward`` updates), a step skipped for a non-finite loss.

**DistributedDataParallel.** In a post-accumulate-grad hook the gradient is still the
process's own: DDP averages it across processes later, bucket by bucket, and writes the
average back into ``.grad`` at the end of ``backward``. Updating there (as a layer-wise
loop over hooks does) would apply each process's local gradient and let the replicas
drift apart. So with ``ddp=`` the update moves into a DDP communication hook: when a
bucket's gradients are ready, the hook all-reduces the bucket, divides it by the number of
processes, updates the bucket's parameters with the averaged gradients, and the
gradients are released at the end of ``backward``; every process then applies the same
update, which is that of DDP with a standard step. DDP itself keeps every gradient in its
bucket buffers (allocated when the model is wrapped), so under DDP the gradient memory is
DDP's; the layer-wise mode there brings the update into ``backward`` (overlapped with the
communication of later buckets), not the single-layer gradient peak. DDP's
``find_unused_parameters=True`` is refused: there a parameter no process used reaches the
bucket as zeros, which this hook cannot tell from a zero gradient, and updating it (weight
decay, momentum) would differ from the standard step, which skips it.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from lowrank.optim.wrapper import step_only

__all__ = ["LayerwiseUpdates", "layerwise"]


class LayerwiseUpdates:
    """The hooks :func:`layerwise` installed: :meth:`remove` takes them out (outside DDP)."""

    def __init__(self, optimizer: torch.optim.Optimizer,
                 ddp: DistributedDataParallel | None) -> None:  # fmt: skip
        self.optimizer = optimizer
        self.ddp = ddp
        self._params = [p for group in optimizer.param_groups for p in group["params"]
                        if p.requires_grad]  # fmt: skip
        self._handles = []
        self._released = True  # no end-of-backward release pending
        if ddp is None:
            for p in self._params:
                self._handles.append(p.register_post_accumulate_grad_hook(self._update))
        else:
            self._ids = {id(p) for p in self._params}
            ddp.register_comm_hook(None, self._bucket_hook)

    def remove(self) -> None:
        """Removes the hooks; ``optimizer.step()`` is the step again. DDP cannot drop a
        communication hook, so under DDP this raises ``RuntimeError``."""
        if self.ddp is not None:
            raise RuntimeError("DistributedDataParallel keeps its communication hook; wrap "
                               "the module in a new DistributedDataParallel instead")  # fmt: skip
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _update(self, param: torch.Tensor) -> None:
        step_only(self.optimizer, [param])
        param.grad = None

    # unannotated: DDP compares the annotations with its own types, and this module's
    # annotations are strings
    def _bucket_hook(self, _state, bucket):
        """DDP's communication hook: average the bucket, update its parameters."""
        group = self.ddp.process_group
        buffer = bucket.buffer()
        buffer.div_(group.size())  # as DDP's own reduction: each share, then the sum
        dist.all_reduce(buffer, group=group)
        stepped = []
        for p, grad in zip(bucket.parameters(), bucket.gradients()):
            if id(p) in self._ids:
                p.grad = grad  # the averaged gradient (a view into the bucket)
                stepped.append(p)
        step_only(self.optimizer, stepped)
        for p in stepped:
            p.grad = None
        if self._released:
            self._released = False
            _queue_at_end_of_backward(self._release_after_ddp)
        done = torch.futures.Future()
        done.set_result(buffer)
        return done

    def _release_after_ddp(self) -> None:
        # DDP queues the callback that writes its buckets back into .grad when its last
        # bucket is ready, after this one: queued from here, the release runs after it
        # (the engine runs callbacks in order, those queued while running included)
        _queue_at_end_of_backward(self._release)

    def _release(self) -> None:
        for p in self._params:
            p.grad = None
        self._released = True


def _queue_at_end_of_backward(callback) -> None:
    """Runs ``callback`` when the running ``backward`` ends (as DDP's own callbacks)."""
    torch.autograd.Variable._execution_engine.queue_callback(callback)


def layerwise(optimizer: torch.optim.Optimizer,
              ddp: DistributedDataParallel | None = None) -> LayerwiseUpdates:  # fmt: skip
    """Updates every parameter of ``optimizer`` during ``backward``, as soon as its gradient
    is complete, and frees the gradient (module docstring); ``backward`` is then the step.

    Args:
        optimizer: any ``torch.optim.Optimizer`` (e.g. :class:`~lowrank.optim.GaLore`).
        ddp: the ``DistributedDataParallel`` module the parameters are trained in, if any:
            the updates then use DDP's averaged gradients (a communication hook, registered
            here: call this before the first ``backward``).

    Returns:
        the installed hooks (:meth:`LayerwiseUpdates.remove`).

    Raises:
        TypeError: ``optimizer`` is not an optimizer, ``ddp`` not a DistributedDataParallel.
        ValueError: a process group of several processes is initialised and no ``ddp`` is
            given (the hooks would update each process with its own gradient), or ``ddp``
            finds unused parameters.
    """
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got "
                        f"{type(optimizer).__name__}")  # fmt: skip
    if ddp is not None:
        if not isinstance(ddp, DistributedDataParallel):
            raise TypeError(f"ddp must be a DistributedDataParallel module, got "
                            f"{type(ddp).__name__}")  # fmt: skip
        if ddp.find_unused_parameters:
            raise ValueError("ddp has find_unused_parameters=True: a parameter no process "
                             "used reaches DDP's bucket as zeros, which the layer-wise "
                             "update cannot tell from a zero gradient (it would update it "
                             "where a standard step skips it)")  # fmt: skip
    elif dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        raise ValueError(f"a process group of {dist.get_world_size()} processes is "
                         "initialised but no ddp is given: in a parameter's hook its gradient "
                         "is this process's own, before DistributedDataParallel averages it, "
                         "so each process would apply a different update; pass the "
                         "DistributedDataParallel module as ddp=")  # fmt: skip
    return LayerwiseUpdates(optimizer, ddp)
