"""The speech path (issue 18): the ProDiff-style net, its masking of variable lengths, the
teacher's loss, progressive distillation's target on speech, and text to wav.

Truths checked: the length regulator's output has exactly sum(durations) real frames, for
given and for predicted durations; a padded utterance's loss and outputs are those of the
same utterance alone (float32 rounding only: the masked convolutions see the same numbers,
and the means run over real frames); progressive distillation's target on a speech batch is
x~ = (y'' - (s''/s) y) / (1 - s''/s) of two teacher DDIM steps, and one student DDIM step to
x~ lands on y''; a missing espeak-ng is one line with the install hint (exit 2); the wav a
speech model writes for a sentence is 22050 Hz, not silent, and holds its energy in the
speech band.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch

from fewstep.data import speech as S
from fewstep.nets import build_net
from fewstep.nets.prodiff import DURATION, frame_lengths, frame_mask

HAVE_ESPEAK = shutil.which("espeak-ng") is not None
needs_espeak = pytest.mark.skipif(not HAVE_ESPEAK, reason="espeak-ng is installed by .ci/run")

TINY = dict(kind="prodiff", mel_bins=80, num_phonemes=len(S.PHONEMES), num_speakers=len(S.VOICES), hidden=32,
            encoder_layers=1, heads=2, predictor_hidden=32, residual_layers=3, residual_channels=32, dropout=0.0)


def _net(seed=0):
    torch.manual_seed(seed)
    net = build_net(TINY)
    for p in net.out.parameters():  # the zero-initialised output layer would hide every difference
        torch.nn.init.normal_(p, std=0.1)
    return net.eval()


@pytest.fixture(scope="module")
def data():
    if not HAVE_ESPEAK:
        pytest.skip("espeak-ng is installed by .ci/run")
    from fewstep.data.registry import load_dataset

    return load_dataset("speech:6", seed=3)


@needs_espeak
def test_regulated_length_is_the_sum_of_durations(data):
    """Given durations (the data's) and the predictor's own: the frame mask counts sum_p d_p."""
    net = _net()
    _, ctx, mask = data.take(torch.arange(len(data)))
    cond, fmask, _, _ = net.condition(ctx, int(frame_lengths(ctx).max()))
    assert torch.equal(fmask.sum(1), ctx[..., DURATION].long().sum(1))
    assert torch.equal(fmask, mask) and torch.equal(frame_lengths(ctx), data.lengths[:len(data)])
    assert cond.shape[-1] == int(data.lengths.max())
    ids = ctx[..., 0].long()
    pred = net.predict(ids, torch.zeros(len(ids), dtype=torch.long), pace=0.05)  # slow: some frames even untrained
    _, pmask, _, _ = net.condition(pred, int(frame_lengths(pred).max()))
    assert torch.equal(pmask.sum(1), pred[..., DURATION].long().sum(1))
    assert bool((pred[..., DURATION][ids == 0] == 0).all())  # padding phonemes get no frames


@needs_espeak
def test_padding_changes_neither_outputs_nor_losses(data):
    """Utterance 0 alone vs padded in a batch with longer ones (garbage in the padding)."""
    from fewstep.denoiser import ModelDenoiser
    from fewstep.process import make_process
    from fewstep.train.losses import DenoisingLoss

    net = _net()
    order = torch.argsort(data.lengths)
    short = order[:1]
    x_b, ctx_b, mask_b = data.take(order)
    x_1, ctx_1, mask_1 = data.take(short)
    F1, P1 = x_1.shape[1], ctx_1.shape[1]
    assert x_b.shape[1] > F1 and bool(mask_1.all())
    g = torch.Generator().manual_seed(0)
    eps_b = torch.randn(x_b.shape, generator=g)
    x_b, eps_b = x_b.clone(), eps_b.clone()
    x_b[0, F1:] = 7.0            # garbage where utterance 0 is padded
    eps_b[0, F1:] = -3.0
    c = torch.full((len(order),), 0.3)
    with torch.no_grad():
        out_b = net(x_b + eps_b, c, labels=ctx_b)
        out_1 = net(x_1 + eps_b[:1, :F1], c[:1], labels=ctx_1)
    assert torch.allclose(out_b[0, :F1], out_1[0], atol=1e-5, rtol=1e-4)
    assert bool((out_b[0, F1:] == 0).all())
    D = ModelDenoiser(net, make_process("vp_cosine"), "x0")
    loss = DenoisingLoss("simple")
    t = torch.full((len(order),), 0.4)
    with torch.no_grad():
        lb = loss(D, x_b, t, eps_b, mask=mask_b, auxiliary=True, labels=ctx_b)
        l1 = loss(D, x_1, t[:1], eps_b[:1, :F1], mask=mask_1, auxiliary=True, labels=ctx_1)
        unmasked = loss(D, x_b, t, eps_b, labels=ctx_b)
    assert torch.allclose(lb[0], l1[0], rtol=1e-4)
    assert not torch.allclose(unmasked[0], l1[0], rtol=1e-3)  # without the mask the padding would count
    assert ctx_b.shape[1] >= P1


@needs_espeak
def test_pd_target_is_two_teacher_ddim_steps(data):
    from fewstep.denoiser import ModelDenoiser
    from fewstep.methods.progressive import level_grid, target
    from fewstep.process import make_process

    process = make_process("vp_cosine")
    T = ModelDenoiser(_net(1), process, "x0")
    x0, ctx, mask = data.take(torch.arange(4))
    grid = level_grid(process, 8, float(process.sigma_max))
    rows = torch.stack([grid[[1, 2, 3]], grid[[1, 2, 3]], grid[[4, 5, 6]], grid[[4, 5, 6]]]).float()
    y = x0 + rows[:, 0, None, None] * torch.randn(x0.shape, generator=torch.Generator().manual_seed(2))
    got = target(T, y, rows, ctx)
    with torch.no_grad():
        s0, s1, s2 = (rows[:, j, None, None] for j in range(3))
        y1 = y + (s1 - s0) * (y - T(y, rows[:, 0], labels=ctx)) / s0
        y2 = y1 + (s2 - s1) * (y1 - T(y1, rows[:, 1], labels=ctx)) / s1
    want = (y2 - (s2 / s0) * y) / (1 - s2 / s0)
    m = mask[..., None]
    assert torch.allclose(got * m, want * m, atol=1e-4, rtol=1e-4)
    student_step = y + (s2 - s0) * (y - got) / s0           # one DDIM step predicting x~
    assert torch.allclose(student_step * m, y2 * m, atol=1e-4, rtol=1e-4)
    # padded frames: the teacher says 0, so the target is 0 up to the rounding of (y'' - r y) / (1 - r)
    assert float(got[~mask].abs().max()) < 1e-5 * float(y.abs().max())


def test_missing_espeak_is_one_line_exit_2(tmp_path):
    env = {**os.environ, "PATH": str(tmp_path)}  # no espeak-ng on this PATH
    run = tmp_path / "run"
    p = subprocess.run([sys.executable, "-m", "fewstep", "train", "--data", "speech:4", "--net", "prodiff", "--out",
                        str(run)], capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 2, p.stderr
    lines = [ln for ln in p.stderr.strip().splitlines() if ln]
    assert len(lines) == 1 and "apt-get install espeak-ng" in lines[0] and "Traceback" not in p.stderr
    assert not run.exists()


def test_prodiff_net_refuses_other_data_and_bad_contexts(tmp_path):
    from fewstep.errors import UserError

    net = _net()
    with pytest.raises(UserError, match="context"):
        net(torch.zeros(2, 10, 80), torch.zeros(2), labels=torch.zeros(2))
    with pytest.raises(UserError, match="needs the utterances' context"):
        net(torch.zeros(2, 10, 80), torch.zeros(2))
    p = subprocess.run([sys.executable, "-m", "fewstep", "train", "--data", "moons", "--net", "prodiff", "--out",
                        str(tmp_path / "r")], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "prodiff denoises speech" in p.stderr and not (tmp_path / "r").exists()


@needs_espeak
def test_text_to_wav_is_speech_like(tmp_path):
    """A teacher trained briefly on 24 utterances, then distilled 2 -> 1 step; its wav for
    a sentence: 22050 Hz, about the length espeak-ng speaks it, not silent, mostly in 80-4000 Hz."""
    from fewstep.metrics.audio import audio_summary, read_wav

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    teacher, student = tmp_path / "t", tmp_path / "s"
    net = '{"kind": "prodiff", "hidden": 64, "encoder_layers": 1, "residual_layers": 4, "residual_channels": 64}'
    cmd = [sys.executable, "-m", "fewstep"]
    p = subprocess.run(cmd + ["train", "--data", "speech:24", "--net", net, "--process", "vp_cosine", "--prediction",
                              "x0", "--steps", "150", "--batch-size", "8", "--lr", "2e-3", "--out", str(teacher),
                              "--quiet"], capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    p = subprocess.run(cmd + ["distill", "progressive", "--teacher", str(teacher), "--start-steps", "2",
                              "--end-steps", "1", "--steps", "20", "--batch-size", "4", "--out", str(student),
                              "--quiet"], capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    wav = tmp_path / "x.wav"
    p = subprocess.run(cmd + ["sample", str(student), "--text", "The sun was warm on the water.", "--pace", "0.8",
                              "--out", str(wav)], capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    assert wav.is_file() and wav.with_suffix(".png").is_file()
    x, rate = read_wav(wav)
    info = audio_summary(x, rate)
    assert rate == S.SAMPLE_RATE
    assert 0.5 < info["seconds"] < 6.0
    assert info["rms_db"] > -45.0          # espeak-ng's own speech sits near -20 dB
    assert info["speech_band"] > 0.5       # a speech spectrum, not hiss
    p = subprocess.run(cmd + ["sample", str(student), "--nfe", "1", "--out", str(tmp_path / "y.npz")],
                       capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 2 and "--text" in p.stderr
