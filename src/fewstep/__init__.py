"""fewstep: fast diffusion sampling and distillation."""
__version__ = "0.1.0"
