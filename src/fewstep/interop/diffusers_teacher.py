"""A diffusers model as a fewstep teacher: ``fewstep.load("diffusers:PATH")``.

PATH is a folder written by ``save_pretrained``: either a pipeline folder (``unet/`` and
``scheduler/`` subfolders) or a model folder (``config.json`` of a ``UNet2DModel``) with
``scheduler_config.json`` beside it. Only the model classes in :data:`MODEL_CLASSES` load: a
``_class_name`` naming any other diffusers class is refused with one line. The scheduler
config gives the discrete VP schedule (``trained_betas`` or
``beta_start``/``beta_end``/``beta_schedule``/``num_train_timesteps``), the prediction type
(``epsilon`` -> eps, ``v_prediction`` -> v, ``sample`` -> x0), clipping (``clip_sample``,
``clip_sample_range``) and the timestep spacing, and maps it onto the sigma-space core:

    x_t = sqrt(abar_t) (x0 + sigma_t eps),  sigma_t = sqrt((1 - abar_t) / abar_t),

with t the (possibly fractional) diffusers timestep that the UNet receives, exactly as
diffusers' Euler-type schedulers call it.

Class labels and the null class. A ``UNet2DModel`` with ``num_class_embeds = N`` has N rows
and no marker of which (if any) is the unconditional one that classifier-free guidance and
label dropout need. A model trained with a null class says so in ``fewstep.json`` beside its
``config.json`` (or in the pipeline folder): ``{"null_class": K}``. Then the teacher has N - 1
classes, fewstep's labels 0..N-2 are the other rows in order (label c is row c + (c >= K)) and
label -1 (null) is row K; with K = N - 1 (the convention of fewstep's own nets) the labels are
the rows. Without it the N rows are N classes and guidance is refused in one line.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from ..errors import UserError

PREDICTION_TYPES = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}
# the model classes a diffusers teacher may be: called as model(x, t, class_labels=...).sample on
# [B, C, H, W] images (UNet2DConditionModel needs text embeddings; others are not denoisers of images)
MODEL_CLASSES = ("UNet2DModel",)


def _brief(e: Exception) -> str:
    return " ".join(str(e).split())[:160]


NULL_CLASS_FILE = "fewstep.json"
NO_NULL = ("has no null class (label -1), so it has no unconditional branch for classifier-free guidance; if it "
           f"was trained with one, write {{\"null_class\": K}} (its row) into {NULL_CLASS_FILE} beside its "
           "config.json, else leave out --guidance / --label-dropout")


class DiffusersNet(nn.Module):
    """Adapter: ``net(x, c_noise, labels=None, cond=None)`` -> ``model(x, t).sample``; labels
    are mapped onto the class-embedding rows around the null row (module docstring)."""

    def __init__(self, model: nn.Module, null_class=None):
        super().__init__()
        self.model, self.null_class = model, null_class

    def rows(self, labels):
        """fewstep labels (-1 = null) -> the model's class-embedding rows."""
        labels = torch.as_tensor(labels)
        if self.null_class is None:
            if bool((labels < 0).any()):
                raise UserError("this diffusers model " + NO_NULL)
            return labels
        k = int(self.null_class)
        return torch.where(labels < 0, torch.full_like(labels, k), labels + (labels >= k).to(labels.dtype))

    def forward(self, x, c_noise, labels=None, cond=None):
        kw = {"class_labels": self.rows(labels).to(x.device)} if labels is not None else {}
        out = self.model(x, c_noise.to(x.dtype), **kw)
        return out.sample if hasattr(out, "sample") else out[0]


class ClippedDenoiser(nn.Module):
    """x0 clipped to [-r, r] (diffusers' ``clip_sample``), keeping the sampler contract."""

    def __init__(self, inner, r: float):
        super().__init__()
        self.inner, self.r = inner, float(r)

    def forward(self, y, sigma, **cond):
        return self.inner(y, sigma, **cond).clamp(-self.r, self.r)


def _find(path: Path):
    """(model folder, scheduler config file) inside a save_pretrained folder."""
    if (path / "unet" / "config.json").is_file():
        model_dir = path / "unet"
    elif (path / "config.json").is_file():
        model_dir = path
    else:
        raise UserError(f"diffusers:{path}: no unet/config.json or config.json there; give a folder "
                        f"written by save_pretrained")
    for cand in (path / "scheduler" / "scheduler_config.json", path / "scheduler_config.json",
                 model_dir / "scheduler_config.json"):
        if cand.is_file():
            return model_dir, cand
    raise UserError(f"diffusers:{path}: no scheduler config (scheduler/scheduler_config.json or "
                    f"scheduler_config.json); save the scheduler with save_pretrained beside the model")


def process_from_scheduler_config(cfg: dict):
    """The discrete VP process of a diffusers scheduler config."""
    from ..process import VPDiscrete

    if cfg.get("trained_betas") is not None:
        return VPDiscrete(cfg["trained_betas"])
    return VPDiscrete.diffusers(int(cfg.get("num_train_timesteps", 1000)), float(cfg.get("beta_start", 1e-4)),
                                float(cfg.get("beta_end", 0.02)), cfg.get("beta_schedule", "linear"))


def load_diffusers_teacher(spec_path: str, device=None):
    """Load ``diffusers:PATH`` as a :class:`fewstep.model.Model`."""
    from ..denoiser import ModelDenoiser
    from ..model import Model

    path = Path(spec_path)
    if not path.is_dir():
        raise UserError(f"diffusers:{path} not found; give the folder written by save_pretrained")
    model_dir, sched_file = _find(path)
    try:
        import diffusers
    except ImportError:
        raise UserError("diffusers is not installed; pip install diffusers to load diffusers: teachers") from None
    try:
        mcfg = json.loads((model_dir / "config.json").read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise UserError(f"diffusers:{path}: {model_dir / 'config.json'} is not readable JSON ({_brief(e)}); "
                        "write it again with save_pretrained") from None
    if not isinstance(mcfg, dict):
        raise UserError(f"diffusers:{path}: {model_dir / 'config.json'} must hold a JSON object (a model config)")
    cls_name = mcfg.get("_class_name", "UNet2DModel")
    # only the classes this loader calls as model(x, t[, class_labels]).sample: a config must not
    # make it instantiate whatever diffusers exports (pipelines, other models, mixins)
    if not isinstance(cls_name, str) or cls_name not in MODEL_CLASSES:
        raise UserError(f"diffusers:{path}: _class_name {cls_name!r} in {model_dir / 'config.json'} is not a model "
                        f"class this loader supports; supported: {', '.join(MODEL_CLASSES)}")
    cls = getattr(diffusers, cls_name, None)
    if cls is None:
        raise UserError(f"diffusers:{path}: diffusers {diffusers.__version__} has no model class {cls_name}; "
                        "update diffusers")
    try:
        model = cls.from_pretrained(str(model_dir), use_safetensors=True)
    except Exception as e:  # never fall back to pickle weights
        raise UserError(f"diffusers:{path}: cannot load {cls_name} from safetensors weights "
                        f"({type(e).__name__}: {str(e).splitlines()[0][:160]})") from None
    scfg = json.loads(sched_file.read_text())
    pred = scfg.get("prediction_type", "epsilon")
    if pred not in PREDICTION_TYPES:
        raise UserError(f"diffusers:{path}: prediction_type '{pred}' is not supported; "
                        f"valid: {', '.join(PREDICTION_TYPES)}")
    process = process_from_scheduler_config(scfg)
    rows = int(mcfg.get("num_class_embeds") or 0)
    null = _null_class(path, model_dir, rows)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    net = DiffusersNet(model, null).to(dev).eval()
    D = ModelDenoiser(net, process, PREDICTION_TYPES[pred])
    if scfg.get("clip_sample", False):
        D = ClippedDenoiser(D, scfg.get("clip_sample_range", 1.0))
    size = mcfg.get("sample_size", 32)
    size = (size, size) if isinstance(size, int) else tuple(size)
    shape = (int(mcfg.get("in_channels", 3)), *size)
    spacing = scfg.get("timestep_spacing", "leading")
    meta = {"role": "diffusers-teacher", "scheduler": scfg, "model_class": cls_name, "null_class": null,
            "default_grid": f"time-{spacing}" if spacing in ("leading", "trailing", "linspace") else "karras"}
    return Model(D, process, shape, process.sigma_min, process.sigma_max,
                 rows - 1 if null is not None else rows, "dpmpp_2m", "image", f"diffusers:{path}", meta,
                 device=dev)


def _null_class(path: Path, model_dir: Path, rows: int):
    """The null class row declared in fewstep.json (model folder first, then the pipeline
    folder), or None."""
    for f in (model_dir / NULL_CLASS_FILE, path / NULL_CLASS_FILE):
        if not f.is_file():
            continue
        try:
            decl = json.loads(f.read_text())
        except (OSError, UnicodeDecodeError, ValueError) as e:
            raise UserError(f"diffusers:{path}: {f} is not readable JSON ({_brief(e)}); write "
                            f'{{"null_class": K}}') from None
        k = decl.get("null_class") if isinstance(decl, dict) else None
        if isinstance(k, bool) or not isinstance(k, int) or rows < 2 or not 0 <= k < rows:
            raise UserError(f"diffusers:{path}: {f} must hold {{\"null_class\": K}} with K a whole number from 0 to "
                            f"{rows - 1} (the model has {rows} class rows)" if rows >= 2 else
                            f"diffusers:{path}: {f} declares a null class but the model has {rows} class rows "
                            f"(num_class_embeds); a null class needs at least 2; remove {f}")
        return k
    return None
