"""Exponential moving average of a model's parameters (stepped after every optimizer step).

The reference created an EMA object but never called its update (spec 8.13); here ``update`` is
called by the trainer after each successful optimizer step and the average is saved as ``ema/``.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch


class EMA:
    """fp32 shadow copy of the trainable parameters: ``shadow = decay * shadow + (1 - decay) * param``.

    ``warmup`` uses the usual ``min(decay, (1 + n) / (10 + n))`` ramp so early averages are not dominated
    by the random initialisation; ``num_updates`` counts the optimizer steps seen.
    """

    def __init__(self, model: torch.nn.Module, decay: float = 0.9999, warmup: bool = True):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay {decay} is out of range; expected 0 <= decay < 1 (e.g. 0.9999).")
        self.decay = decay
        self.warmup = warmup
        self.num_updates = 0
        self.shadow = {
            name: p.detach().to(torch.float32).clone() for name, p in model.named_parameters() if p.requires_grad
        }

    def current_decay(self) -> float:
        if not self.warmup:
            return self.decay
        return min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        decay = self.current_decay()
        params = dict(model.named_parameters())
        missing = self.shadow.keys() - params.keys()
        if missing:  # e.g. a wrapper renamed the parameters: never let the average silently stand still
            raise ValueError(f"EMA.update got a model without the averaged parameters {sorted(missing)[:4]}; pass the "
                             f"unwrapped model the EMA was created from.")
        for name, shadow in self.shadow.items():
            shadow.lerp_(params[name].detach().to(torch.float32), 1.0 - decay)
        self.num_updates += 1

    def model_state_dict(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """``model.state_dict()`` with the averaged values in place of the trained parameters."""
        state = model.state_dict()
        for name, value in self.shadow.items():
            state[name] = value.to(state[name].dtype)
        return state

    @contextlib.contextmanager
    def applied_to(self, model: torch.nn.Module) -> Iterator[torch.nn.Module]:
        """Run the body with the averaged values in ``model``'s parameters, then put the trained ones back exactly.

        No second copy of the model is made: each parameter's storage is exchanged with its shadow tensor
        (same dtype and device: a pointer swap, no copy), so the trained values come back bit for bit.
        A parameter stored in another dtype than the fp32 shadow (e.g. bf16 under DeepSpeed) gets a cast
        copy of its average for the duration. The optimizer keeps its ``Parameter`` objects, so the body
        must not step it. Raises ValueError when ``model`` lacks an averaged parameter.
        """
        params = dict(model.named_parameters())
        missing = self.shadow.keys() - params.keys()
        if missing:
            raise ValueError(f"EMA.applied_to got a model without the averaged parameters {sorted(missing)[:4]}; pass "
                             f"the unwrapped model the EMA was created from.")
        trained: dict[str, torch.Tensor] = {}
        try:
            for name, shadow in self.shadow.items():
                param = params[name]
                trained[name] = param.data
                same = shadow.dtype == param.dtype and shadow.device == param.device and shadow.shape == param.shape
                param.data = shadow if same else shadow.to(param.device, param.dtype)
            yield model
        finally:
            for name, data in trained.items():
                params[name].data = data

    def state_dict(self) -> dict:
        return {"decay": self.decay, "warmup": self.warmup, "num_updates": self.num_updates, "shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        if state["shadow"].keys() != self.shadow.keys():
            missing = sorted(self.shadow.keys() - state["shadow"].keys())
            extra = sorted(state["shadow"].keys() - self.shadow.keys())
            raise ValueError(f"EMA state does not match the model: missing {missing[:8]}, unexpected {extra[:8]}.")
        self.num_updates = int(state["num_updates"])
        for name, value in state["shadow"].items():
            self.shadow[name].copy_(value)
