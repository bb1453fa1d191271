"""Class-conditional shortcut models and MeanFlow with classifier-free guidance, against truth:
the guided targets' algebra (closed forms with label-dependent constant fields; MeanFlow's
fixed point is guidance at omega / (1 - kappa), as the paper says), guidance at sampling is one
CFG combination per step, and students distilled from the exact class-conditional mixture at
guidance 2 sample the *guided* teacher's distribution (energy distance to its 128-step Heun
samples several times below the plain data's), class by class; bad combinations one line."""
import pytest
import torch
from torch import nn

from _exact import SMALL_MLP as NET
from fewstep.errors import UserError
from fewstep.methods import distill
from fewstep.methods.meanflow import guided_velocity
from fewstep.methods.shortcut import shortcut_target
from fewstep.metrics import energy_distance
from fewstep.model import guided_field, load, meanflow_sample, shortcut_sample
from fewstep.process import LinearFlow

CNET = {**NET, "num_classes": 3}
LOOP = {"net": CNET, "batch_size": 256, "lr": 3e-3, "warmup": 20, "ema_decay": 0.99, "device": "cpu",
        "eval_samples": 200}
W = 2.0
# a field that depends only on the label: class c -> A[c], null (-1) -> A[3]
A = torch.tensor([[1.0, 0.0], [0.0, 2.0], [-1.0, -1.0], [0.5, 0.25]], dtype=torch.float64)


class ByLabel(nn.Module):
    """The nets' call signature; output A[label] whatever x, level and cond."""

    def forward(self, x, c_noise, labels=None, cond=None):
        idx = torch.where(labels < 0, torch.full_like(labels, 3), labels)
        return A[idx].to(x.dtype)


def test_shortcut_guided_target_guides_only_the_finest_level_and_only_classes():
    """The bootstrap target with guidance w: rows whose half step is the flow (d <= 1/M) take
    s_null + w (s_c - s_null); coarser rows and null-label rows the plain (constant) field."""
    M = 8
    labels = torch.tensor([0, 1, 2, -1, 0, 1])
    d = torch.tensor([1 / M, 1 / M, 1 / M, 1 / M, 2 / M, 0.5], dtype=torch.float64)
    x, t = torch.zeros(6, 2, dtype=torch.float64), torch.ones(6, dtype=torch.float64)
    got = shortcut_target(ByLabel(), LinearFlow(), x, t, d, M, labels, W)
    guided = A[3] + W * (A[labels[:3]] - A[3])
    want = torch.cat([guided, A[3:4], A[labels[4:]]])
    assert torch.allclose(got, want, atol=1e-12)
    assert torch.allclose(shortcut_target(ByLabel(), LinearFlow(), x, t, d, M, labels, 1.0),
                          A[torch.where(labels < 0, 3, labels)], atol=1e-12)


def test_meanflow_guided_velocity_and_its_fixed_point():
    """v~ = omega v + kappa u_c + (1 - omega - kappa) u_null on labelled rows inside the t window,
    v elsewhere; and where u_c = u_null + omega / (1 - kappa) (v - u_null) (CFG at the effective scale),
    v~ = u_c: the student that fits v~ is that guided field."""
    g = torch.Generator().manual_seed(0)
    n = 8
    v, u_c, u_n = (torch.randn(n, 2, generator=g, dtype=torch.float64) for _ in range(3))
    t = torch.linspace(0.05, 0.95, n, dtype=torch.float64)
    labels = torch.tensor([0, 1, -1, 2, 0, 1, 2, 0])
    omega, kappa = 1.5, 0.25
    got = guided_velocity(v, t, labels, lambda r: u_c[r], lambda r: u_n[r], omega, kappa, 0.2, 0.8)
    inside = (labels >= 0) & (t >= 0.2) & (t <= 0.8)
    want = torch.where(inside[:, None], omega * v + kappa * u_c + (1 - omega - kappa) * u_n, v)
    assert torch.allclose(got, want, atol=1e-12) and bool(inside.any()) and bool((~inside).any())
    fixed = u_n + omega / (1 - kappa) * (v - u_n)
    at_fixed = guided_velocity(v, t, labels, lambda r: fixed[r], lambda r: u_n[r], omega, kappa)
    rows = labels >= 0
    assert torch.allclose(at_fixed[rows], fixed[rows], atol=1e-12)
    assert guided_velocity(v, t, labels, None, None, 1.0, 0.0) is v  # no guidance: v itself


def test_guidance_at_sampling_is_one_cfg_combination_per_step():
    """One step of either own rule at guidance w moves x by -(f_null + w (f_c - f_null))."""
    from fewstep.denoiser import ModelDenoiser
    from fewstep.model import MeanFlowDenoiser

    labels = torch.tensor([0, 1, 2])
    x = torch.zeros(3, 2, dtype=torch.float64)
    step = A[3] + W * (A[labels] - A[3])
    D = ModelDenoiser(ByLabel(), LinearFlow(), "flow", 0.5)
    assert torch.allclose(shortcut_sample(D, x, 1, 8, {"labels": labels}, W), -step, atol=1e-12)
    mf = MeanFlowDenoiser(ByLabel())
    assert torch.allclose(meanflow_sample(mf, x, torch.tensor([1.0, 0.0]), {"labels": labels}, W), -step,
                          atol=1e-12)
    f = guided_field(lambda x_, t_, labels=None: A[torch.where(labels < 0, 3, labels)], W)
    assert torch.allclose(f(x, torch.ones(3), labels=labels), step, atol=1e-12)


@pytest.mark.parametrize("method, extra", [
    ("meanflow", {"steps": 1500}),
    ("shortcut", {"steps": 600, "base_steps": 8, "target_ema": 0.9, "pairs": 4000, "pair_nfe": 32}),
])
def test_distilled_at_guidance_two_samples_the_guided_teacher(method, extra, cspec, tmp_path):
    """From the exact class-conditional mixture at --guidance 2 (MeanFlow: the teacher's guided
    velocity; shortcut: pairs from the guided teacher): the 2-step samples of each class lie far
    closer to the guided teacher's samples of that class than the unguided teacher's do (energy
    distance, 500 per class: unguided 0.045 / 0.15 / 0.31; MeanFlow 0.005 / 0.013 / 0.012 after 1500
    steps (400 steps: 0.16 / 0.39 / 0.33, under-trained), shortcut -0.001 / 0.004 / 0.010 after 600;
    bar: half the unguided distance per class); model.json says the guidance is built in, and
    another --guidance is refused."""
    out = distill(method, {**LOOP, "teacher": cspec, "guidance": W, **extra}, str(tmp_path / "r"), progress=False)
    m = load(out)
    assert m.meta["guidance"] == W and m.meta["data"]["num_classes"] == 3
    teacher = load(cspec)
    n = 1500
    labels = torch.arange(n) % 3
    ref = teacher.sample(n, 128, sampler="heun", labels=labels, guidance=W, seed=5)[0]
    plain = teacher.sample(n, 128, sampler="heun", labels=labels, seed=6)[0]
    x = m.sample(n, 2, labels=labels, seed=7)[0]
    e_student = [energy_distance(x[labels == c], ref[labels == c]) for c in range(3)]
    e_plain = [energy_distance(plain[labels == c], ref[labels == c]) for c in range(3)]
    assert all(s < 0.5 * p for s, p in zip(e_student, e_plain)), (e_student, e_plain)
    with pytest.raises(UserError, match="built in"):
        m.sample(4, 1, labels=torch.zeros(4, dtype=torch.long), guidance=3.0)


@pytest.mark.parametrize("method, cfg, match", [
    ("meanflow", {"kappa": 0.5}, "unconditional"),
    ("meanflow", {"guidance": 2.0}, "label-dropout"),
    ("meanflow", {"guidance_start": 0.8, "guidance_end": 0.2}, "guidance-start"),
    ("shortcut", {"guidance": 2.0}, "label-dropout"),
])
def test_bad_conditional_options_are_one_line(method, cfg, match, cspec, tmp_path):
    net = NET if match == "unconditional" else CNET
    with pytest.raises(UserError, match=match):
        distill(method, {**LOOP, "net": net, "data": cspec, "steps": 2, **cfg}, str(tmp_path / "r"), progress=False)
    assert not (tmp_path / "r").exists()


def test_kappa_with_a_teacher_is_refused(cspec, tmp_path):
    with pytest.raises(UserError, match="kappa"):
        distill("meanflow", {**LOOP, "teacher": cspec, "kappa": 0.5, "steps": 2}, str(tmp_path / "r"),
                progress=False)
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("method", ["shortcut", "meanflow"])
def test_a_student_with_a_null_branch_is_guided_at_sampling(method, cspec, tmp_path):
    """Distilled at w = 1 with --label-dropout: ``sample(..., guidance=3)`` runs the own rule with
    CFG at each step (the rule's function at w = 3 on the same noise), not the unguided rule."""
    from fewstep.model import _unwrap

    extra = {"base_steps": 8, "pairs": 500, "pair_nfe": 8} if method == "shortcut" else {}
    out = distill(method, {**LOOP, "teacher": cspec, "label_dropout": 0.1, "steps": 20, **extra},
                  str(tmp_path / "r"), progress=False)
    m = load(out)
    labels = torch.tensor([0, 1, 2, 0])
    x, _ = m.sample(4, 1, labels=labels, seed=3, guidance=3.0)
    z = m.noise(4, 3) / m.sigma_max
    D = _unwrap(m.denoiser, lambda d: hasattr(d, "net"))
    with torch.no_grad():
        if method == "shortcut":
            want = shortcut_sample(D, z, 1, 8, {"labels": labels}, 3.0)
        else:
            want = meanflow_sample(D, z, torch.tensor([1.0, 0.0]), {"labels": labels}, 3.0)
    assert torch.allclose(x, want, atol=1e-5)
    assert not torch.allclose(x, m.sample(4, 1, labels=labels, seed=3)[0], atol=1e-3)
