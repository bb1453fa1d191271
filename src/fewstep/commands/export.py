"""``fewstep export --format diffusers STUDENT_DIR OUT_DIR``: a distilled student for diffusers
users (see :mod:`fewstep.interop.diffusers_export`)."""
from __future__ import annotations

FORMATS = ("diffusers", "diffusers-lora")


def add_parser(sub) -> None:
    from fewstep.train.options import cli_number

    p = sub.add_parser(
        "export", help="export a distilled student (e.g. for diffusers' from_pretrained)",
        description="Write a distilled student as a diffusers model folder: FewstepUNet (config.json + "
                    "safetensors weights, loadable with FewstepUNet.from_pretrained), scheduler/ (an "
                    "EulerDiscreteScheduler config) and fewstep_sampling.json (the student's sigma grids and "
                    "sampling rule). See the README for the sampling loop.")
    p.add_argument("--format", choices=FORMATS, default="diffusers",
                   help="output format: diffusers (default), or diffusers-lora (the LoRA adapters of an lcm "
                        "--lora-rank student of a diffusers teacher, for UNet2DConditionModel.load_lora_adapter)")
    p.add_argument("student", metavar="STUDENT_DIR", help="run folder written by 'fewstep distill'")
    p.add_argument("out", metavar="OUT_DIR", help="folder to create (absent or empty)")
    p.add_argument("--nfe", type=cli_number, help="progressive students: the round of this many steps (default: the fewest)")
    p.set_defaults(func=cmd_export)


def cmd_export(a) -> int:
    from fewstep.errors import UserError
    from fewstep.train.options import Option, check_args
    from fewstep.train.runfolder import check_output

    check_args(a, (Option("nfe", int, None, "", low=1, none="the fewest", example=1),))
    check_output(a.out, flag="OUT_DIR", allow=lambda p: True)  # a non-empty folder: the exporter says so

    if a.format == "diffusers-lora":
        from fewstep.interop.diffusers_teacher import export_lora

        if a.nfe is not None:
            raise UserError("--nfe picks a progressive round; LoRA adapters have none: leave it out")
        print(f"diffusers LoRA adapters written to {export_lora(a.student, a.out)} (load them with "
              f"unet.load_lora_adapter(OUT_DIR, prefix=None, weight_name='pytorch_lora_weights.safetensors'))")
        return 0
    try:
        from fewstep.interop.diffusers_export import export_diffusers
    except ImportError:
        raise UserError("diffusers is not installed: pip install diffusers to export for it") from None
    print(f"diffusers folder written to {export_diffusers(a.student, a.out, a.nfe)}")
    return 0
