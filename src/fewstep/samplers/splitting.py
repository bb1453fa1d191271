"""Splitting samplers for guided sampling: LTSP and STSP (Wizadwongsa & Suwajanakorn 2023,
"Accelerating guided diffusion sampling with splitting numerical methods", ICLR 2023;
official code github.com/sWizad/split-diffusion, ``ltsp_sample`` / ``stsp_sample``).

The paper's ODE. In DDIM's variables xbar = x / sqrt(alpha_bar), sigma = sqrt(1 - alpha_bar)
/ sqrt(alpha_bar) (this project's sigma-space y = x0 + sigma eps), guided sampling solves

    dy/dsigma = eps(y, sigma) + g(y, sigma),    g = -sqrt(1 - alpha_bar) grad_x log p(c | x)

(their eq. for the classifier-guided eps_hat = eps - sqrt(1 - alpha_bar) grad log p(c | x)),
and their finding is that high-order multistep methods (PLMS) help the "diffusion" part
eps but not the condition part g, whose high derivatives are large. Operator splitting
solves the two sub-problems

    (F)  dy/dsigma = f(y, sigma) = eps(y, sigma)     PLMS: Adams-Bashforth on eps
    (G)  dy/dsigma = g(y, sigma)                      Euler (one first-order step)

one after the other, with h = sigma_{i+1} - sigma_i (< 0):

    Lie-Trotter (LTSP):  y_{i+1} = F_h(G_h(y_i)):
        y'      = y_i + h g(y_i, sigma_i)
        y_{i+1} = y' + h AB(e_i, e_{i-1}, ..),      e_i = f(y', sigma_i)
    Strang (STSP):       y_{i+1} = G_{h/2}(F_h(G_{h/2}(y_i))):
        y'      = y_i + (h/2) g(y_i, sigma_i)
        y''     = y' + h AB(e_i, ..),               e_i = f(y', sigma_i)
        y_{i+1} = y'' + (h/2) g(y'', sigma_{i+1})

(as the official code: the first half step evaluates g at sigma_i, the second at
sigma_{i+1}; the multistep history holds the eps of the diffusion sub-steps, at the
points y'; Adams-Bashforth of orders 1, 2, 3, 4 as the history grows, equal-step
coefficients (their ``plms_mixer``) or, with ``variable_step=True``, those of the actual
grid). One deliberate difference: the official code scales the closing half step's classifier
gradient (taken at sigma_{i+1}) by sqrt(1 - alpha_bar) of the step's midpoint level; here g is one
function evaluated at one point, (y'', sigma_{i+1}) (the CFG term has no separate prefactor).

Classifier-free guidance here. ``CFGDenoiser`` gives D_w = D_u + w (D_c - D_u) (D_c =
D(y, sigma, c), D_u = D(y, sigma, null)); with eps_x = (y - D_x) / sigma the guided
probability-flow ODE dy/dsigma = (y - D_w) / sigma is

    dy/dsigma = eps_c + (w - 1) (eps_c - eps_u)
              = f + g,   f = eps_c = (y - D_c) / sigma,   g = (w - 1) (D_u - D_c) / sigma,

and since eps_c - eps_u = -sigma grad_y log p_sigma(c | y) (the implicit classifier),
g = -(w - 1) sigma grad_y log p_sigma(c | y) is exactly the paper's condition term with
guidance scale w - 1 over the conditional model (``base="cond"``, the default: w = 1 makes
g = 0). ``base="uncond"`` splits f = eps_u, g = w (eps_c - eps_u): classifier guidance of
scale w over the unconditional model, the paper's other setting (w = 0 makes g = 0).

Evaluations. Here g needs both halves at one point (one batched CFG call, ``inner`` on
[y; y] with [labels; null], as ``CFGDenoiser`` does: 1 NFE, 2 network passes per sample)
and f needs only D_c (one ``inner`` call with the labels: 1 NFE, 1 pass). So a step
costs more than PLMS on D_w (1 NFE, 2 passes):

    LTSP:               2 NFE per step (3 passes).
    STSP, fsal=True:    2 NFE per step (3 passes) + 1 for the first half step, - 1 when
                        the grid ends at 0. Default: the second half step of step i and
                        the first of step i + 1 are both Euler steps of G at sigma_{i+1};
                        they are merged into one step of (h_i + h_{i+1}) / 2 from y''
                        (first same as last), the classical way to run Strang.
    STSP, fsal=False:   3 NFE per step (5 passes), - 1 when the grid ends at 0: the
                        paper's code literally (the second half step evaluates g at
                        y'', the next step's first half step again at y_{i+1}).

On a step that lands on sigma = 0, g is never evaluated at 0 (it divides by sigma): the
closing half step reuses the latest g (evaluated at the step's start level).

Order. Both are first order, not 1 and 2: the guidance sub-problem is solved by Euler,
whose local error O(h^2) survives any composition. Taylor expansion of one Strang step
against the exact flow of f + g leaves, at h^2, only (h^2 / 4) g_y g: Euler's own error on
G (the commutator [f, g] and the time derivatives cancel as in exact Strang), while
Lie-Trotter keeps (h^2 / 2) ((f_y g - g_y f) - g_y g - g_t). Strang's error constant is
smaller, its order is not (the diffusion part alone would be 4th order on a grid uniform
in sigma, 2nd on Karras grids with the equal-step coefficients, :mod:`.pndm`). Measured on
the exact guided mixture (tests/test_samplers_splitting.py, Karras 20 -> 0.02, 128 -> 256
steps): 0.95-1.0 for both at w = 1.5-8 (median per-sample error; at w = 8 the RMS too), with
STSP's error 1.8-3x below LTSP's.

Without guidance to split (the denoiser is not a ``CFGDenoiser``, no ``labels`` in
``extra_args``, or w = 1 with base "cond" / w = 0 with base "uncond") g = 0 and both
samplers *are* Adams-Bashforth on the denoiser given: they run :func:`.pndm.sample_ipndm`
(same ``max_order``, ``variable_step``), one evaluation per step, with a warning (the
registered cost assumes guidance: through ``sample(nfe=...)`` such a run spends about
half the budget). A ``CFGDenoiser`` under another wrapper (``NFECounter(CFGDenoiser(..))``,
decoupled levels) is not split either (the split would bypass the wrapper): wrap the
inner denoiser instead, ``CFGDenoiser(NFECounter(D), w)``.
"""
from __future__ import annotations

import warnings

import torch

from ..denoiser import CFGDenoiser, cfg_halves
from ..errors import UserError
from . import register
from ._common import batch_sigma, report
from ._expint import check_choice
from .pndm import _ab_plan, adams_bashforth, sample_ipndm

BASES = ("cond", "uncond")


def _ltsp_cost(steps, **_):
    return 2 * max(0, int(steps))


def _stsp_cost(steps, final_zero=True, fsal=True, **_):
    steps = max(0, int(steps))
    if steps == 0:
        return 0
    end = 0 if final_zero else 1
    return (2 * steps + end) if fsal else (3 * steps - 1 + end)


def _find_cfg(denoiser, depth: int = 6):
    """A CFGDenoiser somewhere under wrappers (``inner`` / ``denoiser`` attributes held by
    the wrapper itself, not forwarded), or None."""
    obj = denoiser
    for _ in range(depth):
        if isinstance(obj, CFGDenoiser):
            return obj
        own = dict(vars(obj)) if hasattr(obj, "__dict__") else {}
        own.update(own.get("_modules") or {})
        obj = own.get("inner", own.get("denoiser"))
        if obj is None:
            return None
    return None


class _Split:
    """The two parts of the guided slope at a point: ``f`` (the diffusion part, one inner
    call) and ``g`` (the guidance part, one batched inner call, which also gives D_w)."""

    def __init__(self, cfg: CFGDenoiser, labels, cond: dict, base: str):
        self.inner, self.w, self.base, self.null_label = cfg.inner, cfg.scale, base, cfg.null_label
        self.labels = labels
        self.null = torch.full_like(labels, cfg.null_label)
        self.cond = cond
        self.gw = self.w - 1.0 if base == "cond" else self.w

    def f(self, y, s):
        """eps of the diffusion part at (y, s): (y - D_c) / s (or D_u for base "uncond")."""
        lab = self.labels if self.base == "cond" else self.null
        d = self.inner(y, batch_sigma(s, y), labels=lab, **self.cond)
        return (y - d).div_(s)

    def g(self, y, s):
        """(g(y, s), D_w(y, s)): g = gw (D_u - D_c) / s, one batched call as CFGDenoiser."""
        d_c, d_u = cfg_halves(self.inner, y, batch_sigma(s, y), self.labels, self.null_label, **self.cond)
        d_w = d_u + self.w * (d_c - d_u)
        return (d_u - d_c).mul_(self.gw / s), d_w


def _split_or_none(name, denoiser, x, extra_args, base, max_order):
    """The _Split of a guided denoiser, or None (then warn: the plain method runs)."""
    check_choice("base", base, BASES)
    if not 1 <= int(max_order) <= 4:
        raise UserError(f"{name}: max_order={max_order}; choose 1, 2, 3 or 4")
    extra = dict(extra_args or {})
    labels = extra.pop("labels", None)
    cfg = denoiser if isinstance(denoiser, CFGDenoiser) else None
    if cfg is not None and labels is not None:
        trivial = cfg.scale == 1.0 if base == "cond" else cfg.scale == 0.0
        if not trivial:
            labels = torch.as_tensor(labels, device=x.device)
            return _Split(cfg, labels.expand(x.shape[0]) if labels.ndim == 0 else labels, extra, base)
        why = f"guidance w = {cfg.scale:g} leaves no guidance term (base '{base}')"
    elif cfg is not None:
        why = "no labels in extra_args (the CFGDenoiser runs unguided)"
    elif _find_cfg(denoiser) is not None:
        why = (f"the CFGDenoiser is wrapped in {type(denoiser).__name__} (the split would bypass it; "
               "wrap its inner denoiser instead)")
    else:
        why = "the denoiser is not a CFGDenoiser (no guidance to split)"
    warnings.warn(f"{name}: {why}: running ipndm (Adams-Bashforth, max_order={max_order}), one evaluation "
                  "per step, not the registered two", stacklevel=3)
    return None


@register("ltsp", order=1, cost=_ltsp_cost, afs=False)
@torch.no_grad()
def sample_ltsp(denoiser, x, sigmas, *, max_order=4, variable_step=False, base="cond", callback=None,
                extra_args=None):
    """Lie-Trotter splitting + PLMS (LTSP, Wizadwongsa & Suwajanakorn 2023; module docstring):
    per step an Euler step of the guidance part g at (y_i, sigma_i), then an
    Adams-Bashforth step (orders 1..``max_order``) of the diffusion part f from there.
    2 NFE per step (a batched CFG call for g, a conditional call for f; 3 network passes).
    First order. Without guidance (plain denoiser, no labels, w = 1) it is ipndm.
    ``callback`` sees y_i and the guided D_w(y_i, sigma_i)."""
    split = _split_or_none("ltsp", denoiser, x, extra_args, base, max_order)
    if split is None:
        return sample_ipndm(denoiser, x, sigmas, max_order=max_order, variable_step=variable_step,
                            callback=callback, extra_args=extra_args)
    sig = sigmas.tolist()
    plan = _ab_plan(sig, int(max_order), variable_step)
    hist = []
    for i, coeffs in enumerate(plan):
        s, s_next = sig[i], sig[i + 1]
        h = s_next - s
        g, d_w = split.g(x, s)
        report(callback, i, x, s, s_next, d_w)
        x = x.add(g, alpha=h)
        hist = (hist + [split.f(x, s)])[-4:]
        x = x.add(adams_bashforth(hist, coeffs), alpha=h)
    return x


@register("stsp", order=1, cost=_stsp_cost, afs=False)
@torch.no_grad()
def sample_stsp(denoiser, x, sigmas, *, max_order=4, variable_step=False, base="cond", fsal=True,
                callback=None, extra_args=None):
    """Strang splitting + PLMS (STSP, Wizadwongsa & Suwajanakorn 2023; module docstring):
    per step half an Euler step of the guidance part g at sigma_i, an Adams-Bashforth
    step (orders 1..``max_order``) of the diffusion part f, half an Euler step of g at
    sigma_{i+1}. ``fsal=True`` merges each closing half step with the next opening one
    (one g evaluation per step: 2 NFE per step + 1, - 1 when the grid ends at 0);
    ``fsal=False`` is the paper's code literally (3 NFE per step, - 1 at a final 0).
    First order (Euler on g), with a smaller error constant than LTSP. Without guidance
    it is ipndm. ``callback`` sees y_i (on the grid) and the guided D_w of the latest g
    evaluation (at level sigma_i)."""
    split = _split_or_none("stsp", denoiser, x, extra_args, base, max_order)
    if split is None:
        return sample_ipndm(denoiser, x, sigmas, max_order=max_order, variable_step=variable_step,
                            callback=callback, extra_args=extra_args)
    sig = sigmas.tolist()
    n = len(sig) - 1
    plan = _ab_plan(sig, int(max_order), variable_step)
    hist = []
    g = d_w = None
    carry = 0.0  # fsal: the pending closing half step (h_{i-1} / 2) g of the previous step
    for i, coeffs in enumerate(plan):
        s, s_next = sig[i], sig[i + 1]
        h = s_next - s
        if i == 0 or not fsal:
            g, d_w = split.g(x, s)
            report(callback, i, x, s, s_next, d_w)
            x = x.add(g, alpha=0.5 * h)
        else:  # merged: y'' + (h_{i-1} / 2 + h_i / 2) g(y'', sigma_i)
            if callback is not None:
                report(callback, i, x.add(g, alpha=carry), s, s_next, d_w)
            x = x.add(g, alpha=carry + 0.5 * h)
        hist = (hist + [split.f(x, s)])[-4:]
        x = x.add(adams_bashforth(hist, coeffs), alpha=h)
        if s_next > 0:
            g, d_w = split.g(x, s_next)
        # else: the closing half step onto sigma = 0 reuses the latest g (never evaluated at 0)
        if i == n - 1 or not fsal:
            x = x.add(g, alpha=0.5 * h)
        else:
            carry = 0.5 * h
    return x
