"""A distilled student out to diffusers: ``fewstep export --format diffusers STUDENT OUT``.

What is written (``OUT``)::

    config.json + diffusion_pytorch_model.safetensors   FewstepUNet (ModelMixin + ConfigMixin)
    scheduler/scheduler_config.json                     EulerDiscreteScheduler (v_prediction,
                                                        timestep_type continuous)
    fewstep_sampling.json                               the student's own sigma grids and rule

so that ``FewstepUNet.from_pretrained(OUT)`` and ``EulerDiscreteScheduler.from_pretrained(OUT,
subfolder="scheduler")`` give the network and a scheduler that runs it on the student's exact
levels (``scheduler.set_timesteps(sigmas=grid)``, the standard diffusers loop).

Why a fewstep class, not a ``UNet2DModel``: our students are MLPs (points) or fewstep's UNet,
with their own parametrization (a process x eps/x0/v/EDM prediction, or a consistency
function with c_skip/c_out); no diffusers model class holds them. A student of a
``diffusers:PATH`` teacher is a fewstep network too (the methods build students from
fewstep's nets), so one export serves every student. FewstepUNet keeps the network's
weights as they are and exposes the student in one calling convention that a stock
diffusers scheduler understands, which serves users better than a lossy conversion.

The calling convention (diffusers' Euler schedulers with ``prediction_type="v_prediction"``
and ``timestep_type="continuous"``): with y the sigma-space sample (y = x0 + sigma eps),

    sample   x_in = y / sqrt(sigma^2 + 1)                 (``scheduler.scale_model_input``)
    timestep t = ln(sigma) / 4                             (``scheduler.timesteps``)
    output   v = (y / (sigma^2 + 1) - D(y, sigma)) sqrt(sigma^2 + 1) / sigma

where D is the student's denoiser (``fewstep.load(STUDENT).denoiser``), so the scheduler's
x0 = y / (sigma^2 + 1) - sigma / sqrt(sigma^2 + 1) v is D(y, sigma) again and its step is
Euler = DDIM in sigma-space, the sampling rule of progressive students. Consistency and
knowledge students (rule ``consistency``) take the step's ``pred_original_sample`` and add
fresh noise sqrt(tau^2 - epsilon^2) z for the next level (multistep consistency sampling,
Song et al. 2023, Algorithm 1): the README's loop, which a test runs against
``fewstep.load(STUDENT).sample``.
"""
from __future__ import annotations

import inspect
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from diffusers import ConfigMixin, EulerDiscreteScheduler, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.utils import BaseOutput

from ..errors import UserError

FORMAT = "fewstep-diffusers-1"
RULES = ("euler", "consistency")
META_KEYS = ("net", "denoiser", "process", "prediction", "sigma_data")


@dataclass
class FewstepUNetOutput(BaseOutput):
    """``sample``: the v-prediction (module docstring) for the scheduler's ``step``."""

    sample: torch.Tensor


class FewstepUNet(ModelMixin, ConfigMixin):
    """A fewstep student network as a diffusers model (module docstring for the call).

    ``student`` holds the parts of the student's ``model.json`` that rebuild its denoiser
    (``net``, ``process``, ``prediction``, ``sigma_data`` and, for consistency students,
    ``denoiser``); ``sample_shape`` is one sample's shape."""

    config_name = "config.json"

    @register_to_config
    def __init__(self, student: dict, sample_shape: list):
        super().__init__()
        from ..model import denoiser_from_meta

        D, into = denoiser_from_meta(student)
        if into is D:
            raise UserError("a generator student (--latent-dim) has no diffusers export")
        self.net = into
        self.__dict__["_denoiser"] = D  # shares self.net; not a submodule (one copy of the weights)

    def denoise(self, y: torch.Tensor, sigma) -> torch.Tensor:
        """The student's D(y, sigma) in sigma-space (y = x0 + sigma eps), as fewstep calls it."""
        return self._denoiser(y, sigma)

    def forward(self, sample: torch.Tensor, timestep, return_dict: bool = True):
        t = torch.as_tensor(timestep, device=sample.device).to(torch.float64).reshape(-1)
        sigma = torch.exp(4.0 * t).expand(sample.shape[0])
        scale = torch.sqrt(sigma**2 + 1).reshape((-1,) + (1,) * (sample.ndim - 1))
        y = sample.to(torch.float64) * scale
        x0 = self.denoise(y.to(sample.dtype), sigma.to(sample.dtype)).to(torch.float64)
        v = (y / scale**2 - x0) * scale / sigma.reshape(scale.shape)
        v = v.to(sample.dtype)
        return FewstepUNetOutput(sample=v) if return_dict else (v,)


def scheduler() -> EulerDiscreteScheduler:
    """The scheduler whose loop runs a FewstepUNet on given sigmas (module docstring)."""
    return EulerDiscreteScheduler(prediction_type="v_prediction", timestep_type="continuous",
                                  final_sigmas_type="zero", timestep_spacing="linspace")


def _rule(model, nfe: Optional[int]):
    """(the model whose network is exported, its sampling rule) for ``nfe`` (progressive
    students: the round of that many steps; default the fewest)."""
    rule = model.sampling
    if rule.get("variants"):
        nfes = sorted(int(k) for k in rule["variants"])
        k = nfes[0] if nfe is None else int(nfe)
        if k not in nfes:
            raise UserError(f"--nfe {nfe}: {model.name} has rounds for {', '.join(map(str, nfes))} steps; pick one")
        return _rule(model.variant(k), None)
    if nfe is not None and str(int(nfe)) not in rule.get("grids", {}):
        raise UserError(f"--nfe {nfe}: {model.name} has grids for {', '.join(rule.get('grids', {}))} steps")
    return model, rule


def sampling_json(model, rule: dict) -> dict:
    """``fewstep_sampling.json``: the student's own grids (sigma-space, decreasing, ending at
    0) and what the loop needs to follow its rule."""
    from ..samplers import get

    out = {"format": FORMAT, "student": model.name, "method": model.meta.get("method"), "sampler": rule["sampler"],
           "grids": rule["grids"], "shape": list(model.shape), "sigma_max": model.sigma_max,
           "start": "x = grids[k][0] * randn(n, *shape): the sigma-space noise of fewstep",
           "model_call": "x_in = y / sqrt(sigma^2 + 1), timestep = ln(sigma) / 4, output v with "
                         "x0 = y / (sigma^2 + 1) - sigma / sqrt(sigma^2 + 1) v (EulerDiscreteScheduler, "
                         "prediction_type v_prediction, timestep_type continuous)"}
    if rule["sampler"] == "consistency":
        default = inspect.signature(get("consistency")).parameters["epsilon"].default
        out["epsilon"] = float(rule.get("options", {}).get("epsilon", default))
    return out


def export_diffusers(student: str, out: str, nfe: Optional[int] = None) -> str:
    """Write ``out`` (module docstring) from the student run folder ``student``; nothing is
    left behind on failure. Returns the folder."""
    from ..model import load

    dest = Path(out)
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise UserError(f"{dest} exists and is not an empty folder; choose a new output folder")
    model = load(student, device="cpu")
    if model.meta.get("role") != "student" or not model.sampling:
        raise UserError(f"{student} is not a distilled student (no sampling rule in model.json); "
                        f"export the run folder of 'fewstep distill'")
    model, rule = _rule(model, nfe)
    if rule.get("sampler") not in RULES or not rule.get("grids"):
        raise UserError(f"{model.name} samples with '{rule.get('sampler')}'; the diffusers export runs students "
                        f"sampled by {' or '.join(RULES)} on fixed grids")
    if (model.meta.get("denoiser") or {}).get("kind") == "generator":
        raise UserError(f"{model.name} is a generator student (--latent-dim): its latent is not an image of the "
                        f"data's shape, so no diffusers scheduler can run it; distil without --latent-dim")
    meta = {k: model.meta[k] for k in META_KEYS if k in model.meta}
    unet = FewstepUNet(meta, list(model.shape))
    inner = model.denoiser.net if hasattr(model.denoiser, "net") else model.denoiser
    unet.net.load_state_dict(inner.state_dict())
    tmp = dest.parent / f".{dest.name}.tmp-export"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        unet.save_pretrained(tmp, safe_serialization=True)
        scheduler().save_pretrained(tmp / "scheduler")
        (tmp / "fewstep_sampling.json").write_text(json.dumps(sampling_json(model, rule), indent=2) + "\n")
        if dest.is_dir():
            dest.rmdir()
        tmp.replace(dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return str(dest)


__all__ = ["FewstepUNet", "FewstepUNetOutput", "export_diffusers", "scheduler", "sampling_json"]
