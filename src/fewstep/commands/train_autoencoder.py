"""``fewstep train-autoencoder --data D --out DIR ...``: train the KL-regularised autoencoder of
latent diffusion (:mod:`fewstep.train.autoencoder`) into a run folder.

The loop options (``--steps``, ``--lr``, ...) are those of :mod:`fewstep.train.options`, as for
``fewstep train`` and every ``fewstep distill METHOD``; the batch size and EMA default differ
(:data:`fewstep.train.autoencoder.AUTOENCODER_LOOP_OVERRIDES`).
"""
from __future__ import annotations

# the autoencoder's own options with a flag (the others: --config FILE)
KEYS = ("data", "n_data", "latent_channels", "kl_weight", "reconstruction")


def add_parser(sub) -> None:
    from ..train.autoencoder import AUTOENCODER_DEFAULTS, AUTOENCODER_LOOP_OVERRIDES
    from ..train.options import add_loop_arguments, cli_number

    p = sub.add_parser("train-autoencoder", help="train a KL-regularised autoencoder for latent diffusion",
                       description="Train the first stage of latent diffusion (Rombach et al. 2022): an encoder to a "
                                   "diagonal Gaussian posterior and a decoder, by reconstruction error plus a small KL "
                                   "term; stores the scale factor 1 / std(z) that gives the latents unit variance. "
                                   "Options not given come from --config, else the defaults "
                                   "(fewstep.train.autoencoder).")
    p.add_argument("--data", required=True, help="image dataset: fashion, digits, shapes16, shapes32, mnist:DIR, or a "
                   ".npy/.npz file / PNG folder")
    p.add_argument("--n-data", type=cli_number, help="number of training images (default: the dataset's)")
    p.add_argument("--latent-channels", type=cli_number, metavar="C",
                   help=f"latent channels (default {AUTOENCODER_DEFAULTS['latent_channels']})")
    p.add_argument("--kl-weight", type=cli_number, metavar="W",
                   help=f"KL weight against the summed reconstruction error (default "
                        f"{AUTOENCODER_DEFAULTS['kl_weight']:g}, LDM's KL-f4/f8)")
    p.add_argument("--reconstruction", help="reconstruction loss: l1 (LDM's, default) or mse")
    p.add_argument("--out", required=True, help="run folder to create (or to continue with --resume)")
    p.add_argument("--config", help="JSON file of autoencoder options (also base_channels, channel_mult, "
                   "num_res_blocks, scale_images, eval_images)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its last checkpoint: repeat the command that started it and "
                        "add --resume")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    notes = {k: "an autoencoder's own default" for k in AUTOENCODER_LOOP_OVERRIDES}
    add_loop_arguments(p, AUTOENCODER_DEFAULTS, notes)
    p.set_defaults(func=cmd_train_autoencoder)


def cmd_train_autoencoder(a) -> int:
    from ..train.autoencoder import train_autoencoder
    from ..train.options import LOOP_NAMES

    overrides = {k: getattr(a, k) for k in KEYS + LOOP_NAMES}
    if not a.resume:  # a new run: --out checked before any work
        from ..train.runfolder import check_output

        check_output(a.out, kind="autoencoder")
    out = train_autoencoder(overrides, a.out, resume=a.resume, progress=not a.quiet, config_file=a.config)
    print(f"autoencoder written to {out}")
    return 0
