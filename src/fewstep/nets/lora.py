"""Low-rank adapters (LoRA, Hu et al. 2022) on a frozen network, through ``peft`` (the adapter
library diffusers itself uses): every targeted ``Linear`` / ``Conv`` layer W gains
W + (alpha / r) B A with A [r, in] random, B [out, r] zero (so the adapted net starts exactly
as the base), and only A and B train. LCM-LoRA (Luo et al. 2023b) distils a teacher into such
adapters.

``add_lora(net, rank, alpha, targets)`` injects them in place and freezes the base (returns
the JSON-able spec that :func:`fewstep.model.load` replays before loading the weights);
``lora_state`` is the adapters alone (the peft state dict); ``lora_parameters`` counts them.
"""
from __future__ import annotations

from typing import Optional, Sequence

from torch import nn

from ..errors import UserError

ADAPTED = (nn.Linear, nn.Conv1d, nn.Conv2d)


def _peft():
    try:
        import peft
    except ImportError:
        raise UserError("LoRA adapters need peft; install it with pip install 'fewstep[lora]' (or pip install "
                        "peft)") from None
    return peft


def lora_targets(net: nn.Module, exclude: Sequence[str] = ()) -> list[str]:
    """Names of the Linear / Conv layers of ``net`` outside the modules named in ``exclude``."""
    def kept(name: str) -> bool:
        return not any(name == e or name.startswith(e + ".") for e in exclude)

    return [n for n, m in net.named_modules() if type(m) in ADAPTED and n and kept(n)]  # not subclasses (Downsample)


def add_lora(net: nn.Module, rank: int, alpha: Optional[float] = None, targets: Optional[Sequence[str]] = None,
             train: Sequence[str] = ()) -> dict:
    """Inject rank-``rank`` adapters (scale alpha / rank; alpha defaults to rank) into the
    layers ``targets`` (default: every Linear / Conv outside ``train``), freeze everything
    else except the modules named in ``train`` (trained in full, e.g. a new input embedding).
    Returns the spec ``{"rank", "alpha", "targets", "train"}``."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise UserError(f"--lora-rank must be a whole number >= 1, got {rank!r}")
    alpha = float(rank if alpha is None else alpha)
    targets = list(targets) if targets is not None else lora_targets(net, exclude=train)
    if not targets:
        raise UserError("LoRA: the network has no Linear or Conv layers to adapt")
    peft = _peft()
    net.requires_grad_(False)
    peft.inject_adapter_in_model(peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0),
                                 net)
    modules = dict(net.named_modules())
    for name in train:
        if name not in modules:
            raise UserError(f"LoRA: no module {name!r} to train in full")
        modules[name].requires_grad_(True)
    return {"rank": int(rank), "alpha": alpha, "targets": targets, "train": list(train)}


def lora_state(net: nn.Module) -> dict:
    """The adapters' tensors alone (peft's ``get_peft_model_state_dict``)."""
    return _peft().get_peft_model_state_dict(net)


def lora_parameters(net: nn.Module) -> int:
    """Number of values in the LoRA adapters of ``net``."""
    return sum(p.numel() for n, p in net.named_parameters() if ".lora_A." in n or ".lora_B." in n)
