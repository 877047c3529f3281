"""SGD with momentum, Nesterov and weight decay: the update torch.optim.SGD makes, without torch.optim.

Why not torch.optim.SGD: building, stepping or saving any torch.optim optimizer imports
torch._dynamo (its wrappers switch the compiler off), and in a process that never compiles
anything that import is 76 MB of private memory and 0.8 s per trial (benchmarks/RESULTS.md,
target 5: memory per concurrent trial). tests/test_optim.py holds this class to
torch.optim.SGD's parameters, step for step. DDP trials import torch._dynamo anyway (DDP's
constructor does); there this class simply does what torch.optim.SGD would.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


class SGD:
    """Momentum SGD over a list of parameters, with the learning rate set per step by the loop."""

    def __init__(self, params: Iterable[torch.Tensor], lr: float, momentum: float = 0.0,
                 weight_decay: float = 0.0, nesterov: bool = False):
        if nesterov and momentum <= 0:
            raise ValueError("Nesterov momentum needs momentum > 0")
        self.params = [p for p in params if p.requires_grad]
        self.lr = lr  # the loop sets it every step (its schedule is a function of the step)
        self.momentum = momentum
        self.weight_decay = weight_decay
        self.nesterov = nesterov
        self.momentum_buffers: list[torch.Tensor] | None = None  # created by the first step, as torch does

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None  # set_to_none, torch's default: the next backward writes, not adds

    @torch.no_grad()
    def step(self) -> None:
        # The _foreach_ ops are the ones torch.optim.SGD's multi-tensor path runs: one call per
        # operation for all ten LeNet tensors, instead of ten.
        params, grads = self.params, [p.grad for p in self.params]
        if any(g is None for g in grads):
            raise RuntimeError("every parameter needs a gradient before step() (a frozen layer is not supported)")
        if self.weight_decay:
            grads = torch._foreach_add(grads, params, alpha=self.weight_decay)
        if self.momentum:
            if self.momentum_buffers is None:
                self.momentum_buffers = [g.detach().clone() for g in grads]
            else:
                torch._foreach_mul_(self.momentum_buffers, self.momentum)
                torch._foreach_add_(self.momentum_buffers, grads)
            if self.nesterov:
                grads = torch._foreach_add(grads, self.momentum_buffers, alpha=self.momentum)
            else:
                grads = self.momentum_buffers
        torch._foreach_add_(params, grads, alpha=-self.lr)

    def state_dict(self) -> dict:
        """What a checkpoint needs to carry on: the momentum buffers (the rest is configuration)."""
        return {"momentum_buffers": self.momentum_buffers}

    def load_state_dict(self, state: dict) -> None:
        buffers = state["momentum_buffers"]
        if buffers is not None and [b.shape for b in buffers] != [p.shape for p in self.params]:
            raise ValueError("the checkpoint's momentum buffers do not match this model's parameters")
        self.momentum_buffers = None if buffers is None else [
            b.to(device=p.device, dtype=p.dtype) for b, p in zip(buffers, self.params)]
