"""Bridges to other libraries' samplers, for parity tests and benchmarks.

:mod:`fewstep.interop.diffusers_schedulers` drives diffusers' stateful schedulers
(``set_timesteps`` / ``step``) with any sigma-space denoiser ``D(y, sigma) -> x0`` (the
exact Gaussian-mixture teacher, or a network wrapped by :class:`fewstep.denoiser.ModelDenoiser`)
and returns the result in sigma-space, so that a scheduler and one of our samplers can be
compared from the same start on the same teacher. diffusers itself stays optional: nothing
here imports it until :func:`~fewstep.interop.diffusers_schedulers.make_scheduler` is called.

:mod:`fewstep.interop.diffusers_teacher` loads a diffusers model as a teacher
(``fewstep.load("diffusers:PATH")``); :mod:`fewstep.interop.diffusers_export` writes a
distilled student for diffusers' ``from_pretrained`` (``fewstep export --format diffusers``).
"""
