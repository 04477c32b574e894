"""A batch whose rows use different LoRA adapters, through each LoRA Linear layer in a fixed number of
operations whatever the number of adapters (punica's and S-LoRA's batched LoRA, in dense form).

peft's mixed-adapter forward (`adapter_names=`, `lora.Linear._mixed_batch_forward`) splits the batch by
adapter in every layer: k adapters cost k small matmul pairs plus the indexing around them, per layer and
step. Here a layer stacks the lora_A (and the transposed lora_B) weights of the batch's adapters, ranks one
after the other (ranks may differ, and an adapter that skips the layer adds none), and a row's mask keeps
its own adapter's columns at that adapter's scaling (rslora and rank patterns included: peft's `scaling`)
and zeroes the others:

    result = base_layer(x) + ((x @ A.T) * mask) @ B

The stacks and masks of a batch's layout are built once and reused for its later steps, until the layout
changes or `forget` (the adapters changed). A layer whose adapters in the batch are not plain LoRA (a
variant such as DoRA, a lora_bias), or a call with a variant's arguments, takes peft's own path.
"""

from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from peft.tuners.lora import Linear as LoraLinear
from peft.tuners.lora.layer import VARIANT_KWARG_KEYS
from torch import nn

PLANS_KEPT = 2
"""Layouts remembered per layer: the batch decoding, and the rows being prefilled to join it."""
PEFT: Literal["peft"] = "peft"
"""A layout peft's own mixed-adapter forward takes."""


@dataclass(frozen=True)
class _Plan:
    a: torch.Tensor
    """[R, in]: the adapters' lora_A weights, stacked."""
    b: torch.Tensor
    """[R, out]: their lora_B weights, transposed and stacked."""
    mask: torch.Tensor
    """[rows, R]: each row's scaling on its adapter's columns, 0 elsewhere."""


class _MixedForward:
    """A layer's `_mixed_batch_forward`, with the plans of the layouts it saw last."""

    def __init__(self, layer: LoraLinear) -> None:
        self.layer = layer
        self.plans: OrderedDict[tuple[str, ...], _Plan | None | Literal["peft"]] = OrderedDict()
        """None: no adapter of the batch has this layer, whose base layer alone answers."""

    def __call__(self, x: torch.Tensor, *args: Any, adapter_names: list[str], **kwargs: Any) -> torch.Tensor:
        layer = self.layer
        variant = {key: kwargs.pop(key) for key in VARIANT_KWARG_KEYS if key in kwargs}
        key = tuple(adapter_names)
        if key not in self.plans:
            self.plans[key] = self._plan(adapter_names)
            while len(self.plans) > PLANS_KEPT:
                self.plans.popitem(last=False)
        plan = self.plans[key]
        if isinstance(plan, str) or any(value is not None for value in variant.values()):
            return LoraLinear._mixed_batch_forward(
                layer, x, *args, adapter_names=adapter_names, **variant, **kwargs
            )
        result = layer.base_layer(x, *args, **kwargs)
        if plan is None:
            return result
        lora = (x.to(plan.a.dtype) @ plan.a.T) * plan.mask.view(len(key), *[1] * (x.dim() - 2), -1)
        return result + (lora @ plan.b).to(result.dtype)

    def _plan(self, adapter_names: list[str]) -> _Plan | None | Literal["peft"]:
        layer = self.layer
        names = list(dict.fromkeys(name for name in adapter_names if name in layer.lora_A))
        if any(name in layer.lora_variant or layer.lora_bias.get(name) for name in names):
            return PEFT
        if not names:
            return None
        a_weights = [_weight(layer.lora_A[name]) for name in names]
        a = torch.cat(a_weights)
        b = torch.cat([_weight(layer.lora_B[name]).T for name in names]).contiguous()
        ranks = torch.tensor([weight.shape[0] for weight in a_weights])
        owner = torch.repeat_interleave(torch.arange(len(names)), ranks)
        scaling = torch.tensor([float(layer.scaling[name]) for name in names], dtype=a.dtype)
        rows = torch.tensor([names.index(name) if name in names else -1 for name in adapter_names])
        mask = (rows[:, None] == owner[None, :]).to(a.dtype) * scaling[owner][None, :]
        return _Plan(a, b, mask.to(a.device))


def _weight(linear: nn.Module) -> torch.Tensor:
    weight = linear.weight
    assert isinstance(weight, torch.Tensor)
    return weight


class MixedLoRA:
    """The batched mixed-adapter forward of one PeftModel's LoRA Linear layers."""

    def __init__(self) -> None:
        self.forwards: list[_MixedForward] = []

    def install(self, layers: Iterable[object]) -> None:
        """Take over the mixed-adapter forward of the LoRA Linear layers among `layers` (those it has not
        yet), and forget every plan: call it whenever the model's adapters change."""
        self.forwards = []
        for module in layers:
            if type(module) is not LoraLinear:  # subclasses (quantised bases, ...) keep peft's own path
                continue
            forward = module.__dict__.get("_mixed_batch_forward")
            if not isinstance(forward, _MixedForward):
                forward = _MixedForward(module)
                module._mixed_batch_forward = forward  # an instance attribute: peft calls it by name
            forward.plans.clear()
            self.forwards.append(forward)

    def forget(self) -> None:
        """Drop every layer's plans: an adapter's weights or scaling changed in place."""
        for forward in self.forwards:
            forward.plans.clear()
