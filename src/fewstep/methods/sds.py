"""Score distillation sampling into a generator (Poole et al. 2022, DreamFusion; survey
sec. 3.1, eq. 46), score Jacobian chaining (Wang et al. 2022, SJC; official code
github:pals-ttic/sjc, ``run_sjc.py``) and coarse-to-fine (Lin et al. 2022, Magic3D).

A differentiable generator x = g(phi) (:mod:`fewstep.nets.generators`: learnable points, an
image, or a radiance field rendered from random cameras) is pulled towards high density of a
frozen diffusion teacher. DreamFusion's SDS gradient (their eq. 3, the survey's eq. 46)

    grad_phi L_SDS = E_{t, eps} [ w(t) (eps_hat(x_t; c, t) - eps) dx/dphi ],

the teacher's U-Net Jacobian omitted. In fewstep's sigma-space (y = x + sigma eps, the
teacher a denoiser D(y, sigma) -> x0, eps_hat = (y - D) / sigma) this is

    eps_hat - eps = (x - D(x + sigma eps, sigma; c)) / sigma,

the same eps in every process's convention (a VP teacher's x_t = alpha (x + sigma eps)).
Implemented as the per-row loss 0.5 || x - stopgrad(x - g) ||^2 with g = w (eps_hat - eps),
whose gradient in x is g exactly and whose value is 0.5 ||g||^2 (the logged loss).

- **Levels**: t ~ U(t_min, t_max), DreamFusion's U(0.02, 0.98), mapped to sigma through the
  continuous cosine VP schedule of Imagen, DreamFusion's teacher: alpha_t = cos(pi t / 2),
  sigma_vp = sin(pi t / 2), so sigma = tan(pi t / 2) (0.031 to 31.8); clipped to the
  teacher's range [sigma_min, sigma_max].
- **Weighting** w(t): ``dreamfusion`` w = sigma_vp^2 = sigma^2 / (1 + sigma^2) (DreamFusion's
  choice, as the community implementations' ``1 - alphas_cumprod``); ``uniform`` w = 1.
- **Guidance**: classifier-free guidance of the teacher, eps_hat = eps(null) + w (eps(c) -
  eps(null)), which in sigma-space is D_w = D(null) + w (D(c) - D(null))
  (:class:`fewstep.denoiser.CFGDenoiser`); DreamFusion used w = 100. ``--label c`` is the
  "prompt" (a class of a conditional teacher); without it the null class.
- **SJC** (``--estimator sjc``): the perturb-and-average score (PAAS),
  PAAS(x, sqrt(2) sigma) = E_n[ D(x + sigma n, sigma) - x ] / sigma^2, a score estimate at a
  clean, out-of-distribution render x, made by first noising it to a level the teacher knows;
  chained through the Jacobian of the render: the ascent direction sigma PAAS, i.e. the
  descent gradient g = (x - D(x + sigma n, sigma)) / sigma (their code's ``var_red`` form,
  averaged over ``--paas-samples`` draws), unweighted, sigma from the same t range. SJC's
  emptiness regulariser on the field (``--emptiness``, their ``emptiness_weight`` on
  log(1 + 10 w) over the render's weights, times 20 after half the steps) is an option of
  the NeRF generator for either estimator.
- **Coarse-to-fine** (Magic3D): ``--fine-steps N`` adds a second stage initialised from the
  first: the field rendered at ``--fine-render-size`` (the first at ``--render-size``), a voxel
  grid trilinearly upsampled to ``--fine-resolution``.

Where this differs from the papers (stated in the issue note too): teachers are the project's
own (a class label is the prompt, no text encoder); the renderer has no shading, no
view-dependent prompts and no background network (the data's background colour); AdamW of the
shared loop (weight decay 0) for DreamFusion's Distributed Shampoo / SJC's Adamax; SJC's
emptiness term uses the render's per-sample weights as theirs, its depth-contrast term is not
implemented; Magic3D's second stage uses a mesh and a latent teacher, here the same field
family at a higher resolution and the same teacher.

Outputs: the generator's parameters (``model.safetensors``), ``model.json`` (``"role":
"generator"``, :func:`fewstep.model.load_generator`), ``eval.json`` and, for images and
fields, a PNG (a turntable strip of 8 views for a field). ``fewstep sample RUN --n N --out
F.npz`` writes the points, the images, or N random views.
"""
from __future__ import annotations

import math

import torch

from ..errors import UserError
from ..train.job import Plan, Task, Top
from ..train.options import Option, table_defaults, table_help
from .common import conditioning, gmm_sigma_data, is_exact, load_teacher

GENERATOR_KINDS = ("points", "image", "nerf")
EMPTINESS_SCALE, EMPTINESS_MULTIPLIER = 10.0, 20.0  # SJC's emptiness_scale and its late-stage multiplier
OPTIONS = (
    Option("generator", str, "points", "what is optimised: points (learnable samples), image (pixels or a CNN from "
           "fixed latents) or nerf (a radiance field rendered from random views)", choices=GENERATOR_KINDS),
    Option("label", int, None, "the class (the 'prompt') of a conditional teacher; default the null class",
           low=0, none="the null class", example=0),
    Option("estimator", str, "sds", "sds (DreamFusion's eps_hat - eps, weighted) or sjc (Wang et al.'s "
           "perturb-and-average score, unweighted)", choices=("sds", "sjc")),
    Option("weighting", str, None, "w(t) of sds: dreamfusion (sigma_vp^2) or uniform (1); sjc is unweighted",
           choices=("dreamfusion", "uniform"), none="dreamfusion for sds, uniform for sjc", example="uniform"),
    Option("t_min", float, 0.02, "lowest diffusion time t (cosine VP schedule, sigma = tan(pi t / 2); default "
           "DreamFusion's 0.02)", low=0.0, above=True, high=1.0),
    Option("t_max", float, 0.98, "highest diffusion time t (default DreamFusion's 0.98)", low=0.0, above=True,
           high=1.0),
    Option("paas_samples", int, 1, "sjc: noise draws averaged per estimate (default 1, as SJC's code)", low=1),
    Option("count", int, None, "points or images to optimise (default 64 points, 4 images)", low=1,
           none="64 points, 4 images", example=64),
    Option("init_std", float, None, "points: std of their N(0, s^2) start (default the teacher's data std); image: "
           "of the raw pixels", low=0.0, above=True, none="the data std (points), 0.1 (pixels)", example=1.0),
    Option("image_param", str, "pixels", "image generator: pixels (tanh of a pixel grid) or cnn (tanh of a small "
           "CNN from fixed latents)", choices=("pixels", "cnn")),
    Option("field", str, "voxel", "nerf: voxel (a density and colour grid, trilinear) or mlp (positional encoding)",
           choices=("voxel", "mlp")),
    Option("resolution", int, 32, "nerf voxel grid cells per side (default 32)", low=2),
    Option("render_size", int, None, "nerf: render size in pixels (default the teacher's; renders are resized "
           "bilinearly to the teacher's size)", low=4, none="the teacher's size", example=16),
    Option("ray_samples", int, 48, "nerf: samples per ray (default 48)", low=2),
    Option("radius", float, 3.0, "nerf: camera distance from the origin (default 3)", low=0.0, above=True),
    Option("fov", float, 45.0, "nerf: field of view in degrees (default 45)", low=1.0, high=179.0),
    Option("elevation_min", float, -15.0, "nerf: lowest camera elevation in degrees (default -15)", low=-90.0,
           high=90.0),
    Option("elevation_max", float, 60.0, "nerf: highest camera elevation in degrees (default 60)", low=-90.0,
           high=90.0),
    Option("emptiness", float, 0.0, "nerf: weight of SJC's emptiness loss log(1 + 10 w) (default 0; SJC used 1e4 "
           "with its own scale)", low=0.0),
    Option("fine_steps", int, 0, "coarse-to-fine (Magic3D): steps of a second stage at --fine-render-size, "
           "started from the first (default 0: one stage)", low=0),
    Option("fine_render_size", int, None, "nerf: the second stage's render size (default the teacher's)", low=4,
           none="the teacher's size", example=32),
    Option("fine_resolution", int, None, "nerf voxel grid: the second stage's resolution (default twice "
           "--resolution)", low=2, none="twice --resolution", example=64),
    Option("eval_views", int, 32, "nerf: random views rendered for eval.json and 'fewstep sample' (default 32)",
           low=1),
)
DEFAULTS = table_defaults(OPTIONS)
HELP = table_help(OPTIONS)
# an optimisation, not a network fit: keep the last weights, no clipping or warm-up, larger steps
COMMON_OVERRIDES = {"ema_decay": 0.0, "grad_clip": 0.0, "warmup": 0, "lr": 0.01, "batch_size": 16,
                    "steps": 2000}


def check_options(cfg: dict) -> None:
    if cfg.get("net") is not None:
        raise UserError("--net: sds optimises a generator (--generator points|image|nerf), not a network; drop --net")
    if float(cfg["t_min"]) >= float(cfg["t_max"]):
        raise UserError(f"--t-min {cfg['t_min']} must be below --t-max {cfg['t_max']}")
    if float(cfg["elevation_min"]) > float(cfg["elevation_max"]):
        raise UserError(f"--elevation-min {cfg['elevation_min']} is above --elevation-max {cfg['elevation_max']}")
    if cfg["estimator"] == "sjc" and cfg["weighting"] not in (None, "uniform"):
        raise UserError(f"--weighting {cfg['weighting']}: SJC's estimator is unweighted; drop --weighting or use "
                        f"--estimator sds")
    if cfg["estimator"] != "sjc" and int(cfg["paas_samples"]) != 1:
        raise UserError("--paas-samples is an option of --estimator sjc")
    nerf_only = ("render_size", "fine_render_size", "fine_resolution")
    if cfg["generator"] != "nerf":
        for key in nerf_only + ("emptiness",):
            if cfg[key] not in (None, 0, 0.0):
                raise UserError(f"--{key.replace('_', '-')} is an option of --generator nerf")
        if int(cfg["fine_steps"]):
            raise UserError("--fine-steps (coarse-to-fine) is an option of --generator nerf")
    else:
        for key in ("count", "init_std"):
            if cfg[key] is not None:
                raise UserError(f"--{key.replace('_', '-')} is an option of --generator points or image (a field "
                                f"starts near-empty)")
    if cfg["generator"] != "image" and cfg["image_param"] != "pixels":
        raise UserError("--image-param is an option of --generator image")


# ------------------------------------------------------------------------ the idea
def sigma_of_t(t: torch.Tensor) -> torch.Tensor:
    """sigma = tan(pi t / 2): the cosine VP schedule (alpha = cos, sigma_vp = sin) in sigma-space."""
    return torch.tan(0.5 * math.pi * t)


def weight(sigma: torch.Tensor, weighting: str) -> torch.Tensor:
    """w(t): ``dreamfusion`` sigma_vp^2 = sigma^2 / (1 + sigma^2), ``uniform`` 1."""
    if weighting == "dreamfusion":
        return sigma**2 / (1 + sigma**2)
    return torch.ones_like(sigma)


def _b(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.reshape((-1,) + (1,) * (like.ndim - 1))


@torch.no_grad()
def sds_gradient(D, x: torch.Tensor, sigma: torch.Tensor, eps: torch.Tensor, labels=None,
                 weighting: str = "dreamfusion") -> torch.Tensor:
    """DreamFusion's w(t) (eps_hat(x + sigma eps) - eps) = w (x - D(x + sigma eps, sigma)) / sigma."""
    s = _b(sigma, x)
    kw = {} if labels is None else {"labels": labels}
    den = D(x + s * eps, sigma, **kw)
    return _b(weight(sigma, weighting), x) * (x - den) / s


@torch.no_grad()
def paas(D, x: torch.Tensor, sigma: torch.Tensor, noise: torch.Tensor, labels=None) -> torch.Tensor:
    """SJC's perturb-and-average score, PAAS(x, sqrt(2) sigma) =
    mean_k (D(x + sigma n_k, sigma) - x) / sigma^2 over the draws ``noise [K, *x.shape]``."""
    s = _b(sigma, x)
    kw = {} if labels is None else {"labels": labels}
    total = torch.zeros_like(x)
    for n in noise:
        total += D(x + s * n, sigma, **kw) - x
    return total / (len(noise) * s**2)


def sjc_gradient(D, x: torch.Tensor, sigma: torch.Tensor, noise: torch.Tensor, labels=None) -> torch.Tensor:
    """The descent gradient SJC chains into the render: -sigma PAAS(x, sqrt(2) sigma)."""
    return -_b(sigma, x) * paas(D, x, sigma, noise, labels)


def row_loss(D, x: torch.Tensor, sigma: torch.Tensor, noise: torch.Tensor, labels=None, estimator: str = "sds",
             weighting: str = "dreamfusion") -> torch.Tensor:
    """Per row 0.5 || x - stopgrad(x - g) ||^2 with g the SDS or SJC direction at the rows'
    levels (``noise [B, K, *shape]``: sds uses the first draw): its gradient in x is g exactly,
    the teacher's Jacobian omitted (the teacher runs without a graph)."""
    xd = x.detach()
    if estimator == "sds":
        g = sds_gradient(D, xd, sigma, noise[:, 0].to(x.dtype), labels, weighting)
    else:
        g = sjc_gradient(D, xd, sigma, noise.transpose(0, 1).to(x.dtype), labels)
    return 0.5 * ((x - (xd - g)) ** 2).flatten(1).sum(1)


def emptiness(weights: torch.Tensor) -> torch.Tensor:
    """SJC's emptiness loss per view: mean over the render's weights of log(1 + 10 w)."""
    return torch.log1p(EMPTINESS_SCALE * weights).flatten(1).mean(1)


# ----------------------------------------------------------------------------- stages
def _generator_config(cfg: dict, teacher, stage: str) -> dict:
    shape = [int(s) for s in teacher.shape]
    kind = cfg["generator"]
    if kind == "points":
        std = cfg["init_std"] if cfg["init_std"] is not None else _data_std(teacher)
        return {"kind": "points", "count": int(cfg["count"] or 64), "shape": shape, "init_std": float(std),
                "seed": int(cfg["seed"])}
    if teacher.kind != "image" or len(shape) != 3 or shape[1] != shape[2]:
        raise UserError(f"--generator {kind} needs a teacher of square images [C, H, H]; {teacher.name} models "
                        f"{teacher.kind} of shape {shape}; use --generator points")
    C, H = shape[0], shape[1]
    if kind == "image":
        return {"kind": "image", "count": int(cfg["count"] or 4), "channels": C, "size": H,
                "param": cfg["image_param"], "init_std": float(cfg["init_std"] or 0.1), "seed": int(cfg["seed"])}
    fine = stage == "fine"
    size = int((cfg["fine_render_size"] if fine else cfg["render_size"]) or H)
    res = int(cfg["resolution"]) if not fine else int(cfg["fine_resolution"] or 2 * int(cfg["resolution"]))
    field = ({"kind": "voxel", "resolution": res, "channels": C, "seed": int(cfg["seed"])} if cfg["field"] == "voxel"
             else {"kind": "mlp", "channels": C, "seed": int(cfg["seed"])})
    return {"kind": "nerf", "field": field, "channels": C, "size": H, "render_size": size,
            "samples": int(cfg["ray_samples"]), "background": -1.0, "radius": float(cfg["radius"]),
            "fov": float(cfg["fov"]), "elevation": [float(cfg["elevation_min"]), float(cfg["elevation_max"])]}


def _data_std(teacher) -> float:
    sd = getattr(teacher.denoiser, "sigma_data", None)
    if sd is None and is_exact(teacher):
        sd = gmm_sigma_data(teacher.denoiser)
    return float(sd or 1.0)


def _labels(cfg: dict, teacher, cond):
    """The label every row carries: ``--label`` (checked against the teacher's classes), the null
    class -1 for a conditional teacher without one, None for an unconditional teacher."""
    c = cfg["label"]
    if c is not None and not cond.on:
        raise UserError(f"--label {c}: the teacher {teacher.name} is unconditional (no classes); drop --label")
    if c is not None and not 0 <= int(c) < cond.num_classes:
        raise UserError(f"--label {c}: the teacher {teacher.name} has classes 0..{cond.num_classes - 1}")
    if cond.on and c is None and cond.guidance != 1.0:
        raise UserError(f"--guidance {cond.guidance} guides towards a class: give --label (the 'prompt')")
    if not cond.on:
        return None
    return -1 if c is None else int(c)


def _build(gen_cfg: dict, init=None):
    from ..nets.generators import build_generator

    gen = build_generator(gen_cfg)
    if init is not None:  # coarse-to-fine: the second stage starts from the first's field
        field = init.field
        if gen_cfg["field"]["kind"] == "voxel":
            field = field.upsampled(int(gen_cfg["field"]["resolution"]))
        gen.field.load_state_dict(field.state_dict())
    return gen


def stages(job):
    """One stage (or coarse then fine for a field, Magic3D): the generator under the SDS or
    SJC gradient of the frozen teacher."""
    cfg = job.cfg
    teacher = load_teacher(cfg["teacher"], job.device, cfg=cfg, kinds=("points", "image"), method="sds")
    cond = conditioning(cfg, teacher)
    label = _labels(cfg, teacher, cond)
    D = cond.teacher(teacher.denoiser)  # guided when --guidance != 1
    smin, smax = float(teacher.sigma_min), float(teacher.sigma_max)
    lo = max(float(sigma_of_t(torch.tensor(float(cfg["t_min"]), dtype=torch.float64))), smin)
    hi = min(float(sigma_of_t(torch.tensor(float(cfg["t_max"]), dtype=torch.float64))), smax)
    if not lo < hi:
        raise UserError(f"--t-min/--t-max give levels [{lo:.4g}, {hi:.4g}] outside the teacher's range "
                        f"[{smin:.4g}, {smax:.4g}]; widen the t range")
    # t ~ U(t_min, t_max), then clipped: the clipped t-range keeps the law of t inside the teacher's levels
    t_lo, t_hi = (2 / math.pi * math.atan(v) for v in (lo, hi))
    weighting = cfg["weighting"] or ("dreamfusion" if cfg["estimator"] == "sds" else "uniform")
    shape = tuple(teacher.shape)
    kind = cfg["generator"]
    two = kind == "nerf" and int(cfg["fine_steps"]) > 0
    total_steps = int(cfg["steps"]) + (int(cfg["fine_steps"]) if two else 0)

    def plan_for(stage_name: str, init=None, step0: int = 0):
        def plan(st):
            gen_cfg = _generator_config(cfg, teacher, stage_name)
            gen = _build(gen_cfg, init)
            B, K = int(cfg["batch_size"]), int(cfg["paas_samples"])
            count = gen.config.get("count")

            def draw(g, step):
                batch = {"t": t_lo + (t_hi - t_lo) * torch.rand(B, generator=g, dtype=torch.float64),
                         "noise": torch.randn((B, K) + shape, generator=g)}
                if kind == "nerf":
                    cams = gen.draw_cameras(B, g)
                    batch.update(origin=cams.origin, rotation=cams.rotation,
                                 seed=torch.randint(0, 2**62, (B,), generator=g),
                                 late=torch.full((B,), float(step0 + step >= total_steps / 2)))
                else:  # every item equally often: rows cycle through the count
                    batch["index"] = (step * B + torch.arange(B)) % int(count)
                if label is not None:
                    batch["labels"] = torch.full((B,), label, dtype=torch.long)
                return batch

            def loss(model, b):
                """0.5 || x - sg(x - g) ||^2 per row: its gradient in x is the SDS / SJC direction g."""
                extra = 0.0
                if kind == "nerf":
                    gj = torch.Generator(device=b["seed"].device).manual_seed(int(b["seed"][0]))
                    # through the (accelerate-wrapped) module's forward, so gradients sync across processes
                    x, out = model(b["origin"], b["rotation"], generator=gj, details=True)
                    if float(cfg["emptiness"]) > 0:
                        scale = 1 + (EMPTINESS_MULTIPLIER - 1) * b["late"].to(x.dtype)
                        extra = float(cfg["emptiness"]) * scale * emptiness(out.get("weights", out["opacity"]))
                else:
                    x = model(b["index"])
                sigma = sigma_of_t(b["t"]).to(x.dtype)
                return row_loss(D, x, sigma, b["noise"], b.get("labels"), cfg["estimator"], weighting) + extra

            def describe(module):
                from ..io import write_json

                ev = evaluate(module, teacher, cfg, label)
                write_png(module, st.folder, kind, label)
                write_json(st.folder / "eval.json", ev)
                return {
                    "format": "fewstep-model-1",
                    "role": "generator",
                    "method": "sds",
                    "estimator": cfg["estimator"],
                    "weighting": weighting,
                    "stage": stage_name,
                    "teacher": cfg["teacher"],
                    "net": dict(module.config),
                    "data": {"name": teacher.name, "kind": teacher.kind, "shape": list(shape),
                             "num_classes": cond.num_classes},
                    "label": label,
                    "guidance": cond.guidance,
                    "sigma_min": lo,
                    "sigma_max": hi,
                    "t_range": [float(cfg["t_min"]), float(cfg["t_max"])],
                    "config": dict(cfg),
                    "eval": {k: v for k, v in ev.items() if not isinstance(v, (list, dict))},
                    "cost": {"seconds": st.seconds, "teacher_evals_per_step":
                             int(cfg["batch_size"]) * (int(cfg["paas_samples"]) if cfg["estimator"] == "sjc" else 1)
                             * (2 if cond.guidance != 1.0 else 1)},
                }

            return Plan(Task(student=gen, draw=draw, loss=loss), describe)

        return plan

    if not two:
        job.stage("", plan_for("single"))
        return
    coarse = job.stage("coarse", plan_for("coarse"))
    job.stage("fine", plan_for("fine", init=coarse.module, step0=int(cfg["steps"])), steps=int(cfg["fine_steps"]))
    fine_meta = lambda: {**_read_meta(job.root / "fine"), "stages": ["coarse", "fine"]}  # noqa: E731
    job.publish(Top("fine", fine_meta))


def _read_meta(folder) -> dict:
    from ..io import read_json

    return read_json(folder / "model.json")


# ------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate(module, teacher, cfg: dict, label) -> dict:
    """eval.json: for points under an exact mixture, each point's log-density against the local
    mode it climbs to (gradient ascent on the exact density) and the share whose most likely
    class is the asked label; for images and renders, range and saturation statistics (the
    classifier's verdict is the benchmark's, bench/sds.py)."""
    kind = module.config["kind"]
    g = torch.Generator().manual_seed(int(cfg["seed"]) + 404)
    if kind == "nerf":
        x = module.outputs(int(cfg["eval_views"]), g).float().cpu()
    else:
        x = module.outputs(module.config["count"], g).float().cpu()
    ev = {"generator": kind, "outputs": int(len(x)), "finite": bool(torch.isfinite(x).all())}
    if kind == "points" and is_exact(teacher):
        ev.update(mode_gaps(teacher.denoiser, x.double(), label))
    if kind != "points":
        ev.update(mean=float(x.mean()), std=float(x.std()), saturated=float((x > 0.95).float().mean()),
                  background=float((x <= -0.95).float().mean()))
    return ev


def climb(gmm, x: torch.Tensor, steps: int = 400) -> torch.Tensor:
    """The local mode of the exact density each point climbs to: mean-shift-like ascent
    x <- D(x, s) = x + s^2 grad log p_s(x) (Tweedie), a gradient step of s^2 on log p_s, with s a
    tenth of the smallest component std (p_s ~ p)."""
    s = 0.1 * float(torch.linalg.eigvalsh(gmm.covs).clamp_min(0).min().sqrt())
    sig = torch.full((len(x),), s, dtype=torch.float64)
    for _ in range(steps):
        x = gmm(x, sig)
    return x


def mode_gaps(gmm, x: torch.Tensor, label) -> dict:
    """log p(mode) - log p(x) per point (the ascent of :func:`climb` from it), and for a label
    the share of points whose most probable class is that label."""
    zero = torch.zeros(len(x), dtype=torch.float64)
    modes = climb(gmm, x.clone())
    gap = gmm.log_prob(modes, zero) - gmm.log_prob(x, zero)
    out = {"log_density": float(gmm.log_prob(x, zero).mean()), "mode_gap_mean": float(gap.mean()),
           "mode_gap_median": float(gap.median()), "mode_gap_max": float(gap.max())}
    if gmm.num_classes:
        per = torch.stack([gmm.log_prob(x, zero, torch.full((len(x),), c)) + torch.log(gmm.class_weights[c])
                           for c in range(gmm.num_classes)], dim=1)
        cls = per.argmax(1)
        out["class_share"] = [float((cls == c).double().mean()) for c in range(gmm.num_classes)]
        if label is not None and label >= 0:
            out["label_share"] = float((cls == label).double().mean())
    return out


def write_png(module, folder, kind: str, label) -> None:
    """The picture beside the weights: the image generator's images, a field's turntable
    strip (8 views at 20 degrees elevation); nothing for points (eval.json says it)."""
    if kind == "points":
        return
    from ..plots import save_samples_png, save_strip_png

    if kind == "nerf":
        save_strip_png(module.turntable(8).float().cpu(), folder / "turntable.png")
    else:
        x = module.outputs(module.config["count"]).float().cpu()
        save_samples_png(x, folder / "images.png", title=f"SDS images{'' if label is None else f', label {label}'}")
