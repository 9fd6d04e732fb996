"""AdamW with decoupled weight decay: the CPU update of ``torch.optim.AdamW``, without ``torch.optim``.

``torch.optim`` imports ``torch._dynamo`` (the compiler stack and sympy) on an optimizer's
first ``zero_grad``/``step``: about 9 s on a 2-core CPU, paid by every process that trains
an aligner or a learned aggregator (``index build``, ``evaluate``). The update below is the
single-tensor path that ``torch.optim.AdamW`` takes for CPU tensors, operation for
operation, so training gives the same weights bit for bit (tests/test_aligner.py checks it).
Import this module lazily: it imports torch.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

__all__ = ["AdamW"]


class AdamW:
    """Adam with decoupled weight decay (Loshchilov & Hutter), as ``torch.optim.AdamW`` (no amsgrad).

    Parameters
    ----------
    params
        Tensors to optimise (``requires_grad=True``).
    lr, betas, eps, weight_decay
        As in ``torch.optim.AdamW`` (same defaults).
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
    ) -> None:
        self.params = list(params)
        self.lr, self.betas, self.eps, self.weight_decay = float(lr), betas, float(eps), float(weight_decay)
        # per parameter: step count, first and second moment
        self.state: list[tuple[int, torch.Tensor, torch.Tensor] | None] = [None] * len(self.params)

    def zero_grad(self) -> None:
        """Drop the gradients (``set_to_none``, as torch does by default)."""
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        """One update of every parameter that has a gradient."""
        beta1, beta2 = self.betas
        for i, param in enumerate(self.params):
            grad = param.grad
            if grad is None:
                continue
            state = self.state[i]
            if state is None:
                state = (0, torch.zeros_like(param), torch.zeros_like(param))
            step, exp_avg, exp_avg_sq = state
            step += 1
            self.state[i] = (step, exp_avg, exp_avg_sq)
            if self.weight_decay != 0:
                param.mul_(1 - self.lr * self.weight_decay)
            exp_avg.lerp_(grad, 1 - beta1)
            exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            # torch keeps the step in a float32 tensor and reads it back as a Python float
            step_f = float(step)
            bias_correction1 = 1 - beta1**step_f
            bias_correction2 = 1 - beta2**step_f
            step_size = self.lr / bias_correction1
            denom = (exp_avg_sq.sqrt() / bias_correction2**0.5).add_(self.eps)
            param.addcdiv_(exp_avg, denom, value=-step_size)
