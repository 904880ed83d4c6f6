"""`model.zero_grad()` over a list of the model's parameters taken once, while a Trainer trains it.

transformers' Trainer calls ``model.zero_grad()`` after every optimizer step. torch's `Module.zero_grad` finds
the parameters by walking the module tree and naming every module on the way: a LoRA model has some 2,000
modules (PEFT gives every adapted linear layer ten), so each step paid a 2,000-module walk for 627
parameters, 4.8 ms on this 2-core host. On an H200 that walk was most of the time the GPU sat idle in a
replayed default LoRA step: 68 of the 85 ms of idle gaps over three profiled steps
(bench/results/profile_step_gpu-2026-11-29T0315Z-default-stack-h200.json, `host_during_idle`).

`listed_zero_grad` gives the model, for the length of the training, its own class with `ListedZeroGrad`'s
zero_grad mixed in: the same loop as torch's over the parameters listed when training starts (a Trainer's
model gains no parameter while it trains; its optimizer holds them). Afterwards the model has its own class
again. Names, isinstance checks and state dicts are as before; a copy made meanwhile (deepcopy, pickle) is
of the model's own class. A model wrapped by an engine (DDP, FSDP, DeepSpeed) gets the engine's zero_grad
call, not its own, and keeps torch's walk.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from torch import nn


class ListedZeroGrad(nn.Module):
    """torch's `Module.zero_grad`, over ``_listed_parameters`` instead of a walk of the module tree."""

    _listed_parameters: list[nn.Parameter]
    listed_base: type[nn.Module]  # the model's own class (set on each listed class)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self._listed_parameters:
            if p.grad is None:
                continue
            if set_to_none:
                p.grad = None
            else:
                if p.grad.grad_fn is not None:
                    p.grad.detach_()
                else:
                    p.grad.requires_grad_(False)
                p.grad.zero_()

    def __reduce_ex__(self, protocol: Any) -> Any:
        # a copy (deepcopy, pickle) is of the model's own class, without the list
        state = {k: v for k, v in self.__dict__.items() if k != "_listed_parameters"}
        return (_restore, (self.listed_base, state))


_LISTED_CLASSES: dict[type, type] = {}  # model class -> its listed class, made once a process


def listed_class(cls: type[nn.Module]) -> type[nn.Module]:
    """``cls`` with `ListedZeroGrad`'s zero_grad; the same name, so a saved config names ``cls``."""
    if cls not in _LISTED_CLASSES:
        namespace = {"listed_base": cls, "__module__": cls.__module__, "__qualname__": cls.__qualname__}
        _LISTED_CLASSES[cls] = type(cls)(cls.__name__, (ListedZeroGrad, cls), namespace)
    return _LISTED_CLASSES[cls]


def _restore(base: type[nn.Module], state: dict[str, Any]) -> nn.Module:
    module = base.__new__(base)
    module.__dict__.update(state)
    return module


@contextmanager
def listed_zero_grad(model: nn.Module | None) -> Iterator[None]:
    """While inside, ``model.zero_grad()`` goes over the parameters ``model`` has now (see the module doc)."""
    if model is None or isinstance(model, ListedZeroGrad):  # no model yet, or already listed (a nested train)
        yield
        return
    base = type(model)
    model._listed_parameters = list(model.parameters())
    model.__class__ = listed_class(base)
    try:
        yield
    finally:
        if type(model) is listed_class(base):
            model.__class__ = base
        model.__dict__.pop("_listed_parameters", None)
