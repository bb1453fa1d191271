"""``fewstep sample RUN_OR_SPEC --nfe k --out FILE.npz``: sample a run folder or an exact teacher."""
from __future__ import annotations

from pathlib import Path

from ..errors import UserError


def _checks() -> tuple:
    """The rules of this command's values (:class:`fewstep.train.options.Option`)."""
    from ..train.options import Option, option

    return (Option("nfe", int, None, "", low=1, example=8), Option("n", int, None, "", low=1, none="all", example=1000),
            Option("guidance", float, None, "", low=0.0, none="1", example=2.0),
            Option("label", int, None, "", none="none", example=0),
            Option("eta", float, None, "", low=0.0, none="the sampler's", example=1.0),
            Option("dg_weight", float, None, "", low=0.0, none="the run's", example=1.0), option("seed"),
            option("device"))


def add_parser(sub) -> None:
    from ..train.options import cli_number

    p = sub.add_parser("sample", help="sample a run folder or an exact teacher",
                       description="Sample RUN_OR_SPEC (a run folder or gmm:FILE.npz) and write FILE.npz "
                                   "(array 'samples', plus 'labels' for a conditional model) and a PNG beside it.")
    p.add_argument("model", metavar="RUN_OR_SPEC", help="run folder, or gmm:FILE.npz for an exact Gaussian mixture")
    p.add_argument("--sampler", help="sampler name (default: the model's own); see 'fewstep samplers'")
    p.add_argument("--nfe", type=cli_number, help="network evaluations to spend (required, except for a generator "
                                                  "run of fewstep distill sds)")
    p.add_argument("--n", type=cli_number, help="number of samples (default 1000; a generator run: all its points or "
                                                "images, 32 views of a field)")
    p.add_argument("--grid", help="sigma grid: karras, logsnr, polyexponential, vp-time, time, time-leading, "
                                  "time-trailing, or FILE.json (default: the sampler's measured best for --nfe)")
    p.add_argument("--afs", action="store_true", help="answer the first evaluation analytically (one fewer)")
    p.add_argument("--guidance", type=cli_number, help="classifier-free guidance scale (conditional models)")
    p.add_argument("--label", type=cli_number, help="class label for all samples (conditional models)")
    p.add_argument("--eta", type=cli_number, help="stochasticity of ddim / analytic_dpm (0: deterministic, 1: the "
                                                  "DDPM posterior)")
    p.add_argument("--covariance", metavar="COV_RUN", help="a 'fewstep distill covariance' run of this teacher: the "
                                                          "learned per-dimension optimal variance (SN-/NPR-DPM) in "
                                                          "ddpm, ddim or analytic_dpm")
    p.add_argument("--discriminator", metavar="DG_RUN", help="a 'fewstep distill discriminator' run of this teacher: "
                                                             "discriminator guidance in any sampler (one discriminator "
                                                             "gradient per evaluation)")
    p.add_argument("--dg-weight", type=cli_number, help="discriminator guidance weight (default: the run's dg_weight)")
    p.add_argument("--prompt", help="a text-conditional model (trained on --data captions:...): the prompt of every "
                                    "sample (add --guidance w for classifier-free guidance)")
    p.add_argument("--text", help="a speech model (fewstep train --data speech:N --net prodiff, or its students): "
                                  "the sentence to speak; --out is then a .wav file (Griffin-Lim), with the mel "
                                  "spectrogram as a PNG beside it")
    p.add_argument("--voice", help="speech: the espeak-ng voice whose phonemes are read and whose speaker the model "
                                   "takes (default en-us; the voices of the data: en-us, en-us+m3, en-us+f2, "
                                   "en-us+f4, en-us+m7)")
    p.add_argument("--pace", type=cli_number, help="speech: speaking rate, the predicted durations divided by it "
                                                   "(default 1)")
    p.add_argument("--out", required=True, help="output .npz file (a .wav file with --text)")
    p.add_argument("--seed", type=cli_number, default=0, help="random seed (default 0)")
    p.add_argument("--device", help="cpu, cuda or cuda:N")
    p.set_defaults(func=cmd_sample)


def cmd_sample(a) -> int:
    import numpy as np
    import torch

    from ..model import load
    from ..plots import save_samples_png
    from ..io import atomic_write

    from ..train.options import check_args, check_batch_memory
    from ..train.runfolder import check_output

    out = Path(a.out)
    if a.text is not None or a.voice is not None or a.pace is not None:
        return _speak(a, out)
    if out.suffix != ".npz":
        raise UserError(f"--out {out}: the output must be a .npz file")
    from ..model import GENERATOR_ROLE
    from ..train.job import role_of

    generator = role_of(a.model) == GENERATOR_ROLE
    if a.n is None and not generator:
        a.n = 1000
    check_args(a, _checks())
    check_output(out, file=True)
    check_output(out.with_suffix(".png"), flag="--out (its PNG)", file=True)
    if generator:
        return _sample_generator(a, out)
    if a.nfe is None:
        raise UserError("--nfe is required: the network evaluations to spend, e.g. --nfe 8")
    model = load(a.model, device=a.device)
    if a.dg_weight is not None and a.discriminator is None:
        raise UserError("--dg-weight is the weight of --discriminator DG_RUN; give the discriminator too")
    if a.discriminator is not None:
        model = model.with_discriminator(a.discriminator, a.dg_weight)
    options = sampler_extras(a, model)
    check_batch_memory("--n", a.n, model.shape, copies=4, fix="sample fewer at a time (--n) and join the files")
    labels = torch.full((a.n,), a.label, dtype=torch.long) if a.label is not None else None
    if a.prompt is not None:
        if a.label is not None:
            raise UserError("--prompt and --label: a text model takes a prompt, a class model a label; give one")
        if not hasattr(model, "prompt"):
            raise UserError(f"{a.model} is not text-conditional: it takes no --prompt")
        labels = model.prompt([a.prompt]).expand(a.n, -1, -1)
    x_T = None
    if str(a.grid).endswith(".json"):  # a grid file (e.g. from fewstep schedule): start as noise at its first level
        from ..grids import load as load_grid

        x_T = model.noise(a.n, a.seed) * (float(load_grid(a.grid)[0]) / model.sigma_max)
    x, labels = model.sample(a.n, a.nfe, sampler=a.sampler, seed=a.seed, labels=labels, grid=a.grid,
                             x=x_T, guidance=a.guidance, **({"afs": True} if a.afs else {}), **options)
    choice = getattr(x, "choice", None)
    if choice is not None:
        print(f"sampled with {choice.describe()}")
    latent = getattr(model, "autoencoder", None) is not None
    if latent:  # a latent model: the decoded images, and the latents beside them
        latents, x = x, model.decode(x)
    arrays = {"samples": x.float().cpu().numpy()}
    if latent:
        arrays["latents"] = latents.float().cpu().numpy()
    if labels is not None:
        arrays["labels"] = labels.cpu().numpy()
    out.parent.mkdir(parents=True, exist_ok=True)

    def write(tmp):
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)

    atomic_write(out, write)
    png = save_samples_png(x, out.with_suffix(".png"), labels=labels,
                           title=f"{choice.sampler if choice else a.sampler or model.default_sampler}, "
                                 f"{a.nfe} NFE")
    print(f"wrote {out} and {png}")
    return 0


SAMPLER_FLAGS = ("sampler", "nfe", "grid", "afs", "guidance", "label", "eta", "covariance", "discriminator", "dg_weight")


def _sample_generator(a, out: Path) -> int:
    """A score-distilled generator's outputs: its points or images, or --n random views of its field."""
    import numpy as np

    from ..io import atomic_write
    from ..model import load_generator
    from ..plots import save_samples_png

    given = [f for f in SAMPLER_FLAGS if getattr(a, f, None) not in (None, False)]
    if given:
        raise UserError(f"--{given[0].replace('_', '-')}: {a.model} is a generator (fewstep distill sds), sampled "
                        f"without a sampler; give only --n, --seed, --device and --out")
    run = load_generator(a.model, device=a.device)
    n = a.n if a.n is not None else run.module.config.get("count", 32)
    x = run.sample(n, a.seed).float().cpu()
    out.parent.mkdir(parents=True, exist_ok=True)

    def write(tmp):
        with open(tmp, "wb") as f:
            np.savez(f, samples=x.numpy())

    atomic_write(out, write)
    what = {"nerf": f"{n} random views of the field"}.get(run.kind, f"{len(x)} {run.kind} outputs")
    png = save_samples_png(x, out.with_suffix(".png"), title=f"sds {run.kind}")
    print(f"wrote {what} to {out} and {png}")
    return 0


SPEECH_DEFAULT_NFE = 8  # a speech teacher's steps when --nfe is not given (a student: its fewest)


def _speak(a, out: Path) -> int:
    """``--text``: a speech model's wav (and mel PNG) of one sentence."""
    import time

    from ..model import load
    from ..plots import save_mels_png
    from ..train.options import check_args
    from ..train.runfolder import check_output
    from ..tts import context_of, speak, speech_net, write_wav

    if a.text is None:
        raise UserError("--voice and --pace shape speech from --text; give --text \"...\" too")
    if out.suffix != ".wav":
        raise UserError(f"--out {out}: with --text the output is a .wav file")
    given = [f for f in ("n", "label", "guidance", "covariance", "discriminator", "dg_weight", "afs", "eta")
             if getattr(a, f, None) not in (None, False)]
    if given:
        raise UserError(f"--{given[0].replace('_', '-')} does not apply to --text (one sentence, a speech model)")
    check_args(a, _checks())
    if a.pace is not None and not 0.25 <= float(a.pace) <= 4.0:
        raise UserError(f"--pace must lie in [0.25, 4] (1 = the model's own speed), got {a.pace}")
    check_output(out, file=True)
    check_output(out.with_suffix(".png"), flag="--out (its PNG)", file=True)
    model = load(a.model, device=a.device)
    speech_net(model)  # a speech model, else one line
    nfe = a.nfe
    if nfe is None:
        rounds = model.sampling.get("variants") or model.sampling.get("grids") or {}
        nfe = min(int(k) for k in rounds) if rounds else SPEECH_DEFAULT_NFE
    t0 = time.time()
    ctx, _ = context_of(model, [a.text], voice=a.voice or "en-us", pace=float(a.pace or 1.0))
    spoken = speak(model, ctx, nfe=int(nfe), sampler=a.sampler, grid=a.grid, seed=int(a.seed))[0]
    write_wav(out, spoken["wav"])
    png = save_mels_png({f"{nfe} NFE": [spoken["mel"]]}, out.with_suffix(".png"), n=1)
    seconds = len(spoken["wav"]) / 22050.0
    print(f"wrote {seconds:.2f} s of speech to {out} ({nfe} NFE, {time.time() - t0:.1f} s) and {png}")
    return 0


COVARIANCE_SAMPLERS = ("ddpm", "ddim", "analytic_dpm")  # the DDIM family: the optimal variance of Bao et al. 2022a
ETA_SAMPLERS = ("ddim", "analytic_dpm")


def sampler_extras(a, model) -> dict:
    """The sampler options of ``--eta`` and ``--covariance`` (checked against ``--sampler`` and
    the model, one line each); the covariance head is loaded here."""
    opts = {}
    if a.eta is not None:
        if a.sampler not in ETA_SAMPLERS:
            raise UserError(f"--eta is an option of {' and '.join(ETA_SAMPLERS)}; give --sampler ddim (or drop --eta)")
        opts["eta"] = float(a.eta)
    if a.covariance is not None:
        from ..model import load_covariance

        if a.sampler not in COVARIANCE_SAMPLERS:
            raise UserError(f"--covariance sets the variance of {', '.join(COVARIANCE_SAMPLERS)}; give --sampler ddpm "
                            f"(or ddim --eta E, analytic_dpm)")
        head = load_covariance(a.covariance, device=str(model.device))
        if list(head.aux.meta["data"]["shape"]) != list(model.shape):
            raise UserError(f"--covariance {a.covariance} was trained on samples of shape "
                            f"{head.aux.meta['data']['shape']}, the model's are {list(model.shape)}; give a head of "
                            f"this teacher")
        opts["covariance"] = head
        if model.kind == "image":
            opts["data_range"] = (-1.0, 1.0)  # the project's images; Cov[x0|y] clipped to 1 as the paper's code
    return opts
