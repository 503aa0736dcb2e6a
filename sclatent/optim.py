"""Adam over one flat parameter buffer: the optimiser of the trainer.

Small models (the count VAEs have ~0.4M parameters) spend a visible part of each CPU step in the
optimiser's per-parameter Python and kernel launches, and ``torch.optim.Adam``'s first use imports
``torch._dynamo`` (1.6 s here). With every parameter a view into one buffer, and every gradient a
view into another, a step is one fused Adam kernel on one tensor and zeroing the gradients is one
``zero_``. The update is torch's Adam (L2 weight decay added to the gradient, bias-corrected
moments), tested against ``torch.optim.Adam``.
"""

from __future__ import annotations

import math

import torch


class FlatAdam:
    """Adam on ``parameters``, re-homed into one flat buffer until :meth:`~FlatAdam.release`.

    Autograd accumulates into the existing gradient views in place, so they fill the flat
    gradient. One difference from ``torch.optim.Adam``: a parameter that gets no gradient in a
    step is updated with a zero gradient (weight decay, momentum) rather than skipped. Parameters
    on several devices or dtypes are left as they are and handed to ``torch.optim.Adam``.

    Parameters
    ----------
    parameters
        The tensors to optimise (``requires_grad``).
    lr, betas, eps, weight_decay
        As in ``torch.optim.Adam``.
    """

    def __init__(
        self,
        parameters: list[torch.Tensor],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ) -> None:
        self.parameters = list(parameters)
        self.lr, self.betas, self.eps, self.weight_decay = lr, betas, eps, weight_decay
        self.steps = 0
        self.flat: torch.Tensor | None = None
        self._fallback: torch.optim.Optimizer | None = None
        kinds = {(p.device, p.dtype) for p in self.parameters}
        if len(kinds) != 1 or any(p.is_sparse for p in self.parameters):
            self._fallback = torch.optim.Adam(self.parameters, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
            return
        with torch.no_grad():
            flat = torch.cat([p.detach().reshape(-1) for p in self.parameters])
        grad = torch.zeros_like(flat)
        offset = 0
        for p in self.parameters:
            n = p.numel()
            p.data = flat[offset : offset + n].view_as(p)
            p.grad = grad[offset : offset + n].view_as(p)
            offset += n
        self.flat, self.grad = flat, grad
        self.exp_avg = torch.zeros_like(flat)
        self.exp_avg_sq = torch.zeros_like(flat)
        self._step_tensor = torch.zeros((), dtype=torch.float32, device=flat.device)
        self._fused = hasattr(torch, "_fused_adam_") and flat.device.type in ("cpu", "cuda")

    def zero_grad(self) -> None:
        if self._fallback is not None:
            self._fallback.zero_grad(set_to_none=True)
        else:
            self.grad.zero_()

    @torch.no_grad()
    def step(self) -> None:
        if self._fallback is not None:
            self._fallback.step()
            return
        self.steps += 1
        beta1, beta2 = self.betas
        if self._fused:
            try:
                self._step_tensor += 1
                torch._fused_adam_(
                    [self.flat],
                    [self.grad],
                    [self.exp_avg],
                    [self.exp_avg_sq],
                    [],
                    [self._step_tensor],
                    lr=self.lr,
                    beta1=beta1,
                    beta2=beta2,
                    weight_decay=self.weight_decay,
                    eps=self.eps,
                    amsgrad=False,
                    maximize=False,
                )
                return
            except (RuntimeError, TypeError, NotImplementedError):  # no fused kernel in this torch build
                self._fused = False
                self._step_tensor -= 1
        grad = self.grad.add(self.flat, alpha=self.weight_decay) if self.weight_decay else self.grad
        self.exp_avg.lerp_(grad, 1.0 - beta1)
        self.exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
        bias_correction1 = 1.0 - beta1**self.steps
        bias_correction2 = 1.0 - beta2**self.steps
        denominator = (self.exp_avg_sq.sqrt() / math.sqrt(bias_correction2)).add_(self.eps)
        self.flat.addcdiv_(self.exp_avg, denominator, value=-self.lr / bias_correction1)

    def state_dict(self) -> dict:
        """The optimiser's state as tensors and plain values (for a checkpoint; the settings are not in it).

        Returns
        -------
        dict
            Flat path: ``{"kind": "flat", "steps": int, "step": () float32 tensor, "exp_avg": (P,),
            "exp_avg_sq": (P,)}`` with ``P`` the number of optimised scalars. Fallback path:
            ``{"kind": "adam", "adam": torch.optim.Adam.state_dict()}``. Tensors are copies on the CPU.
        """
        if self._fallback is not None:
            saved = self._fallback.state_dict()
            state = {
                index: {
                    key: value.detach().cpu().clone() if torch.is_tensor(value) else value
                    for key, value in entry.items()
                }
                for index, entry in saved["state"].items()
            }
            return {"kind": "adam", "adam": {"state": state, "param_groups": saved["param_groups"]}}
        return {
            "kind": "flat",
            "steps": self.steps,
            "step": self._step_tensor.detach().cpu().clone(),
            "exp_avg": self.exp_avg.detach().cpu().clone(),
            "exp_avg_sq": self.exp_avg_sq.detach().cpu().clone(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from :meth:`state_dict` of an optimiser over parameters of the same shapes.

        Raises
        ------
        ValueError
            ``state`` is of the other path (flat vs fallback) or of another parameter count.
        """
        kind = state.get("kind") if isinstance(state, dict) else None
        expected = "adam" if self._fallback is not None else "flat"
        if kind != expected:
            raise ValueError(
                f"optimiser state of kind {kind!r} cannot be loaded into a FlatAdam on the {expected!r} path "
                "(parameters on other devices or dtypes than when it was saved?)."
            )
        if self._fallback is not None:
            self._fallback.load_state_dict(state["adam"])
            return
        n = self.flat.numel()
        for key in ("exp_avg", "exp_avg_sq"):
            if not torch.is_tensor(state[key]) or state[key].shape != (n,):
                raise ValueError(
                    f"optimiser state {key!r} does not hold {n} values; the parameters differ from the saved ones."
                )
        with torch.no_grad():
            self.exp_avg.copy_(state["exp_avg"])
            self.exp_avg_sq.copy_(state["exp_avg_sq"])
            self._step_tensor.copy_(state["step"])
        self.steps = int(state["steps"])

    def release(self) -> None:
        """Give every parameter its own storage back (and drop the gradients)."""
        if self.flat is None:
            for p in self.parameters:
                p.grad = None
            return
        for p in self.parameters:
            p.data = p.data.clone()
            p.grad = None
        self.flat = None
