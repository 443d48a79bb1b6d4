"""One optimizer over stacked ``[P, ...]`` parameters with per-member hyperparameters.

Adam, AdamW and SGD are element-wise, so one optimizer over stacked parameters is P independent
optimizers once every hyperparameter is a ``[P]`` tensor broadcast over its member's slice:
learning rate, momentum, L2 strength (decoupled or coupled), gradient-clipping norm. The update
follows droptune's single-model path step for step:

1. coupled L2: ``g += 2λ·w`` on decayed weights (the gradient of the penalty ``λ·Σw²`` that
   ``RegularizedModule`` adds to the loss);
2. gradient clipping by each member's total norm (Lightning's ``gradient_clip_val``);
3. decoupled L2: ``w ← w·(1 − lr·λ)`` on decayed weights (AdamW's rule; the same for Adam and
   SGD through droptune's ``RegularizationCallback``);
4. the Adam / SGD-with-momentum update (PyTorch's defaults: betas 0.9/0.999, eps 1e-8, no
   amsgrad, no nesterov, no dampening).

A member whose ``active`` weight is 0 is frozen: its parameters, moments and step count stay
bit-for-bit what they were (every change is multiplied by 0 or interpolated with weight 0).

Adam's update is memory-bound: spelled out in tensor operations it reads and writes every
parameter about ten times. When every row of the stacks is training and all members share one
learning rate (the common case, and always the case after finished members are compacted
away), the step goes through PyTorch's fused Adam kernel instead (``torch._fused_adam_``, the
kernel behind ``torch.optim.Adam(fused=True)``): one pass over parameters, gradients and
moments, the same formula. Otherwise (frozen rows still in the stacks, per-member learning
rates, SGD) the element-wise path above runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor


__all__ = ["StackedOptimizer", "stacked_max_norm_"]


def _per_member(values: Tensor, like: Tensor) -> Tensor:
    """A ``[P]`` tensor viewed as ``[P, 1, ..., 1]`` to broadcast over ``like``."""
    return values.view(-1, *([1] * (like.dim() - 1)))


class StackedOptimizer:
    """Adam(W) or SGD over stacked parameters, one set of hyperparameters per member.

    Args:
        params: Stacked parameters, each ``[P, ...]``.
        decayed: For each parameter, whether L2 acts on it (weights yes; biases and norm
            parameters no).
        kind: ``adam`` (Adam and AdamW: the same update here, L2 is applied explicitly) or
            ``sgd``.
        lr, momentum: ``[P]`` learning rates and SGD momenta. Hyperparameter tensors are
            best float64 (each per-member factor is computed once and rounded to the parameter
            dtype, like torch's scalar arithmetic).
        decoupled, coupled: ``[P]`` L2 strengths; a member has one of the two non-zero.
        clip: ``[P]`` gradient-norm limits (``inf`` for none), or None when no member clips.
        fused: Use the fused Adam kernel when every row trains with one learning rate; default
            (None): on CUDA devices only (on the CPU the element-wise path is as fast).
    """

    def __init__(
        self,
        params: Sequence[Tensor],
        decayed: Sequence[bool],
        *,
        kind: Literal["adam", "sgd"],
        lr: Tensor,
        momentum: Tensor,
        decoupled: Tensor,
        coupled: Tensor,
        clip: Tensor | None = None,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        fused: bool | None = None,
    ) -> None:
        if len(params) != len(decayed):
            raise ValueError("one decayed flag per parameter is needed")
        self.params = list(params)
        self.decayed = list(decayed)
        self.kind = kind
        self.lr, self.momentum = lr, momentum
        self.decoupled, self.coupled, self.clip = decoupled, coupled, clip
        self.betas, self.eps = betas, eps
        self.active = torch.ones_like(lr)
        self.steps = torch.zeros_like(lr)
        device = self.params[0].device if self.params else lr.device
        self.fused = (device.type == "cuda") if fused is None else fused
        if self.fused and not hasattr(torch, "_fused_adam_"):
            self.fused = False
        # host copies: the fast path is chosen without a device sync
        self._lr_host: list[float] = lr.tolist()
        self._active_host: list[bool] = [True] * len(self._lr_host)
        self.use_decoupled = bool((decoupled > 0).any())
        self.use_coupled = bool((coupled > 0).any())
        self.state: list[list[Tensor]] = [
            [torch.zeros_like(p) for _ in range(2 if kind == "adam" else 1)] for p in self.params
        ]

    def set_active(self, mask: Tensor | Sequence[bool]) -> None:
        """Members whose mask is False are frozen from the next step on."""
        if isinstance(mask, Tensor):
            self._active_host = [bool(v) for v in mask.tolist()]
            self.active = mask.to(self.lr)
        else:
            self._active_host = [bool(v) for v in mask]
            self.active = torch.tensor(self._active_host, device=self.lr.device).to(self.lr)

    def set_lr(self, lr: float) -> None:
        """One learning rate for every member from the next step on (a user's scheduler)."""
        self.lr = torch.full_like(self.lr, lr)
        self._lr_host = [lr] * len(self._lr_host)

    def zero_grad(self) -> None:
        for param in self.params:
            param.grad = None

    def keep(self, index: Tensor, params: Sequence[Tensor]) -> None:
        """Keep the members at ``index``; ``params`` are the network's re-indexed parameters."""
        self.params = list(params)
        for name in ("lr", "momentum", "decoupled", "coupled", "active", "steps"):
            setattr(self, name, getattr(self, name).index_select(0, index))
        rows = index.tolist()
        self._lr_host = [self._lr_host[row] for row in rows]
        self._active_host = [self._active_host[row] for row in rows]
        if self.clip is not None:
            self.clip = self.clip.index_select(0, index)
        self.state = [[s.index_select(0, index) for s in slots] for slots in self.state]

    @torch.no_grad()
    def step(self) -> None:
        dtype = self.params[0].dtype
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        if self.use_coupled:
            twice = (2.0 * self.coupled).to(dtype)
            grads = [
                g.add(p * _per_member(twice, p)) if decay else g
                for p, g, decay in zip(self.params, grads, self.decayed, strict=True)
            ]
        if self.clip is not None:
            squares = torch.stack([g.pow(2).flatten(1).sum(1) for g in grads]).sum(0)
            coef = (self.clip / (squares.sqrt() + 1e-6)).clamp(max=1.0).to(dtype)
            grads = [g * _per_member(coef, g) for g in grads]
        active = self.active
        if self.use_decoupled:
            shrink = (1.0 - self.lr * self.decoupled * active).to(dtype)
            for param, decay in zip(self.params, self.decayed, strict=True):
                if decay:
                    param.mul_(_per_member(shrink, param))
        if self._fusable(dtype):
            self._fused_adam(grads)
        elif self.kind == "adam":
            self._adam(grads, active, dtype)
        else:
            self._sgd(grads, active, dtype)

    def _adam(self, grads: list[Tensor], active: Tensor, dtype: torch.dtype) -> None:
        beta1, beta2 = self.betas
        self.steps += active
        steps = self.steps.clamp(min=1.0)  # a member frozen before its first step
        # per-member factors in float64, rounded once to the parameter dtype
        step_size = (self.lr * active / (1.0 - beta1**steps)).to(dtype)
        correction2 = (1.0 - beta2**steps).sqrt().to(dtype)
        w1, w2 = ((1.0 - beta1) * active).to(dtype), ((1.0 - beta2) * active).to(dtype)
        for param, grad, (exp_avg, exp_avg_sq) in zip(self.params, grads, self.state, strict=True):
            exp_avg.lerp_(grad, _per_member(w1, param))
            exp_avg_sq.lerp_(grad * grad, _per_member(w2, param))
            denom = (exp_avg_sq.sqrt() / _per_member(correction2, param)).add_(self.eps)
            param.sub_(exp_avg.div(denom).mul_(_per_member(step_size, param)))

    def _fusable(self, dtype: torch.dtype) -> bool:
        return (
            self.fused
            and self.kind == "adam"
            and dtype in (torch.float32, torch.float64)
            and all(self._active_host)
            and len(set(self._lr_host)) == 1
        )

    def _fused_adam(self, grads: list[Tensor]) -> None:
        """Every row trains, one learning rate: all members are at the same step (they started
        together and none is frozen), so one fused kernel call updates the whole stacks."""
        beta1, beta2 = self.betas
        self.steps += 1.0
        step = self.steps[:1].to(torch.float32).reshape(())
        torch._fused_adam_(
            self.params,
            [g.contiguous() for g in grads],
            [slots[0] for slots in self.state],
            [slots[1] for slots in self.state],
            [],
            [step] * len(self.params),
            lr=self._lr_host[0],
            beta1=beta1,
            beta2=beta2,
            weight_decay=0.0,
            eps=self.eps,
            amsgrad=False,
            maximize=False,
        )

    def _sgd(self, grads: list[Tensor], active: Tensor, dtype: torch.dtype) -> None:
        keep = torch.where(active > 0, self.momentum, torch.ones_like(self.momentum)).to(dtype)
        step_size = (self.lr * active).to(dtype)
        weight = active.to(dtype)
        for param, grad, (buffer,) in zip(self.params, grads, self.state, strict=True):
            buffer.mul_(_per_member(keep, param))
            buffer.add_(grad * _per_member(weight, param))
            param.sub_(buffer * _per_member(step_size, param))


@torch.no_grad()
def stacked_max_norm_(weights: Sequence[Tensor], limit: Tensor, active: Tensor) -> None:
    """Max-norm per member: the incoming weights of each unit (a row of a ``[P, out, in]``
    weight, a filter of a ``[P, out, in, k...]`` one) projected onto ``‖w‖ ≤ limit[i]``
    exactly as :func:`torch.renorm` does (scale ``limit / (‖w‖ + 1e-7)`` when ``‖w‖ > limit``).
    ``limit`` is ``inf`` for members without max-norm; frozen members are left alone."""
    on = active > 0
    for weight in weights:
        norms = weight.flatten(2).norm(dim=2)  # [P, out]
        bound = limit.view(-1, 1).to(norms.dtype)
        over = (norms > bound) & on.view(-1, 1)
        factor = torch.where(over, bound / (norms + 1e-7), torch.ones_like(norms))
        weight.mul_(factor.view(*factor.shape, *([1] * (weight.dim() - 2))))
