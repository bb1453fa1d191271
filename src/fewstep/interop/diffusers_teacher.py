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
MODEL_CLASSES = ("UNet2DModel", "UNet2DConditionModel")
TEXT_CLASSES = ("UNet2DConditionModel",)  # called with encoder_hidden_states: a text encoder in fewstep.json


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


def guidance_embedding(w: torch.Tensor, dim: int) -> torch.Tensor:
    """LCM's w embedding (Luo et al. 2023; the code the diffusers LCM pipeline computes): the
    transformer sinusoidal code of 1000 w, ``[sin(1000 w f_i), cos(1000 w f_i)]`` with
    f_i = 10000^(-i / (dim/2 - 1)), i < dim/2, zero-padded to ``dim``."""
    half = dim // 2
    freq = torch.exp(-torch.log(torch.tensor(10000.0)) * torch.arange(half, dtype=torch.float32, device=w.device)
                     / max(half - 1, 1))
    angle = 1000.0 * w.float()[:, None] * freq[None]
    out = torch.cat([angle.sin(), angle.cos()], dim=1)
    return torch.nn.functional.pad(out, (0, dim % 2))


class DiffusersTextNet(nn.Module):
    """Adapter of a text-conditional ``UNet2DConditionModel``: ``net(x, c_noise, labels=ctx,
    cond=w)`` -> ``model(x, t, encoder_hidden_states=states, encoder_attention_mask=mask,
    timestep_cond=...).sample`` with ``ctx`` fewstep's text context [B, L, D + 1]
    (:func:`fewstep.nets.unet.text_context`); a row of -1 or no labels is the null prompt
    (``null_context``, the encoding of "" by the encoder fewstep.json names). ``cond`` (a
    guidance w) goes in through the model's ``time_cond_proj_dim`` as LCM's w embedding
    (``get_guidance_scale_embedding(w - 1)``, the sinusoidal code the diffusers LCM pipeline
    uses); a model without it takes no w."""

    takes_context = True

    def __init__(self, model: nn.Module, null_context: torch.Tensor):
        super().__init__()
        self.model = model
        self.register_buffer("null_context", null_context.float().clone())

    @property
    def takes_w(self) -> bool:
        return bool(getattr(self.model.config, "time_cond_proj_dim", None))

    def forward(self, x, c_noise, labels=None, cond=None):
        L, D1 = self.null_context.shape
        B = x.shape[0]
        ctx = self.null_context.expand(B, L, D1) if labels is None else torch.as_tensor(labels, device=x.device)
        if ctx.ndim != 3 or tuple(ctx.shape[1:]) != (L, D1) or ctx.shape[0] != B:
            raise UserError(f"this diffusers UNet2DConditionModel takes text contexts [batch, {L}, {D1}]; give a "
                            f"prompt, got {list(ctx.shape)}")
        null = (ctx[..., -1] < 0).all(1)
        if bool(null.any()):
            ctx = torch.where(null[:, None, None], self.null_context.to(ctx.dtype).expand_as(ctx), ctx)
        states, mask = ctx[..., :-1].to(x.dtype), ctx[..., -1] > 0.5
        kw = {}
        if cond is not None:
            if not self.takes_w:
                raise UserError("this diffusers UNet2DConditionModel has no time_cond_proj_dim: it takes no w input")
            w = torch.as_tensor(cond, device=x.device).float().reshape(-1).expand(B)
            kw["timestep_cond"] = guidance_embedding(w - 1, int(self.model.config.time_cond_proj_dim)).to(x.dtype)
        out = self.model(x, c_noise.to(x.dtype), encoder_hidden_states=states, encoder_attention_mask=mask, **kw)
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
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    text = None
    if cls_name in TEXT_CLASSES:
        text, null_ctx = _text_encoder(path, model_dir, int(mcfg.get("cross_attention_dim") or 0))
        null = None
        net = DiffusersTextNet(model, null_ctx).to(dev).eval()
    else:
        null = _null_class(path, model_dir, rows)
        net = DiffusersNet(model, null).to(dev).eval()
    D = ModelDenoiser(net, process, PREDICTION_TYPES[pred])
    if scfg.get("clip_sample", False):
        D = ClippedDenoiser(D, scfg.get("clip_sample_range", 1.0))
    size = mcfg.get("sample_size", 32)
    size = (size, size) if isinstance(size, int) else tuple(size)
    shape = (int(mcfg.get("in_channels", 3)), *size)
    spacing = scfg.get("timestep_spacing", "leading")
    meta = {"role": "diffusers-teacher", "scheduler": scfg, "model_class": cls_name, "null_class": null,
            "default_grid": f"time-{spacing}" if spacing in ("leading", "trailing", "linspace") else "karras",
            "source": str(path)}
    if text is not None:
        meta["text_encoder"] = text
        rows = 0
    return Model(D, process, shape, process.sigma_min, process.sigma_max,
                 rows - 1 if null is not None else rows, "dpmpp_2m", "image", f"diffusers:{path}", meta,
                 device=dev)


def _declared(path: Path, model_dir: Path) -> dict:
    """fewstep.json's object (model folder first, then the pipeline folder), or {}."""
    for f in (model_dir / NULL_CLASS_FILE, path / NULL_CLASS_FILE):
        if f.is_file():
            try:
                decl = json.loads(f.read_text())
            except (OSError, UnicodeDecodeError, ValueError) as e:
                raise UserError(f"diffusers:{path}: {f} is not readable JSON ({_brief(e)})") from None
            return decl if isinstance(decl, dict) else {}
    return {}


def _text_encoder(path: Path, model_dir: Path, width: int):
    """(the text encoder config fewstep.json declares, the null prompt's context) of a
    UNet2DConditionModel; one line when none is declared or its width is not the model's
    cross_attention_dim."""
    from ..nets.text import build_text_encoder
    from ..nets.unet import text_context

    spec = _declared(path, model_dir).get("text_encoder")
    if not spec:
        raise UserError(f"diffusers:{path}: a UNet2DConditionModel needs the encoder of its prompts; write "
                        f'{{"text_encoder": {{"kind": "minilm"}}}} (or "hash", "file") into {NULL_CLASS_FILE} beside '
                        f"its config.json")
    encoder = build_text_encoder(spec)
    if encoder.dim != width:
        raise UserError(f"diffusers:{path}: its cross_attention_dim is {width}, the text encoder of "
                        f"{NULL_CLASS_FILE} gives {encoder.dim} features; declare an encoder of that width")
    with torch.no_grad():
        e = encoder.encode([""])
    return encoder.config, text_context(e.states.cpu(), e.mask.cpu())[0]


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


# LCM-LoRA's targets in a UNet2DConditionModel (attention, feed-forward, resnet convolutions and the
# time-embedding projections: the modules the LCM-LoRA training script adapts), where present
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1",
                "conv2", "conv_shortcut", "time_emb_proj")


def add_diffusers_lora(net: nn.Module, rank: int, alpha: float = None) -> dict:
    """Rank-``rank`` LoRA adapters on the diffusers model inside ``net`` (a DiffusersTextNet or
    DiffusersNet) through diffusers' own ``add_adapter`` (peft), the base frozen: the adapters a
    diffusers user loads onto the teacher's UNet with ``load_lora_adapter``. Returns the spec."""
    try:
        from peft import LoraConfig
    except ImportError:
        raise UserError("LoRA adapters need peft; install it with pip install 'fewstep[lora]'") from None
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise UserError(f"--lora-rank must be a whole number >= 1, got {rank!r}")
    alpha = float(rank if alpha is None else alpha)
    names = {n.rsplit(".", 1)[-1] for n, _ in net.model.named_modules()} | \
        {".".join(n.split(".")[-2:]) for n, _ in net.model.named_modules()}
    targets = [t for t in LORA_TARGETS if t in names]
    net.model.requires_grad_(False)
    net.model.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=targets))
    return {"rank": int(rank), "alpha": alpha, "targets": targets, "diffusers": True}


def diffusers_student_net(source: str, lora: dict = None) -> nn.Module:
    """A student's net built on the diffusers teacher at ``source`` (its model and text encoder
    from the teacher's folder, the LoRA adapters of ``lora`` added); its weights load after."""
    teacher = load_diffusers_teacher(source, device="cpu")
    D = teacher.denoiser
    net = getattr(D, "inner", D).net
    if lora:
        add_diffusers_lora(net, int(lora["rank"]), float(lora["alpha"]))
    return net


def export_lora(student_dir: str, out: str) -> str:
    """The LoRA adapters of an ``lcm --lora-rank`` student of a diffusers teacher as a diffusers
    LoRA folder (``save_lora_adapter``): ``UNet2DConditionModel.from_pretrained(teacher/unet)``
    then ``load_lora_adapter(out, prefix=None)`` is the student's network."""
    from ..model import load

    model = load(student_dir, device="cpu")
    lora = model.meta.get("lora") or {}
    if not lora.get("diffusers"):
        raise UserError(f"{student_dir} holds no LoRA adapters of a diffusers teacher (fewstep distill lcm "
                        f"--teacher diffusers:PATH --lora-rank r)")
    net = model.denoiser.net if hasattr(model.denoiser, "net") else model.denoiser.inner.net
    Path(out).mkdir(parents=True, exist_ok=True)
    net.model.save_lora_adapter(str(out))
    (Path(out) / "fewstep_lora.json").write_text(json.dumps({"teacher": model.meta.get("teacher"), "lora": lora,
                                                               "w_input": model.meta.get("w_input")}, indent=1))
    return str(out)
