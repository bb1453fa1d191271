"""``run_bench``: every sampler and distilled student of one teacher, on the same noise,
measured with the same metrics, written as results + figures + report.html.

For a teacher (run folder or ``gmm:FILE.npz``) and n:

1. real data: two disjoint sets of n held-out samples (``A`` is what every method is
   compared with, ``B`` gives the data-to-data floor of each metric at this n);
2. noise ``eps`` [n, ...] from ``seed``; every method starts from ``sigma_max * eps`` of
   its own model (a student whose latent has another shape draws its own, same seed);
3. the reference: the teacher's probability-flow ODE solved accurately from that noise
   (the exact flow map for a GaussianMixture, adaptive RK45 otherwise); every method's
   ``flow_error`` is its RMS distance to it;
4. each sampler at each NFE budget, each student with its own sampling rule at each NFE
   it supports; the evaluations actually spent are counted;
5. metrics against ``A`` (points: sliced-W2, MMD, energy distance, FD of coordinates,
   precision/recall; images: FD / precision / recall on the set's classifier features,
   the classifier score, pixel sliced-W2; point clouds [n, N, 3]: MMD-CD, COV-CD and
   1-NNA-CD on the first 100 clouds), and the teacher's NLL in bits/dim on held-out data
   through the probability-flow ODE.

A class-conditional teacher (C classes) is benchmarked on one fixed label vector [n]
(:func:`bench_labels`: drawn from ``seed`` with the class prior of an exact mixture,
uniformly otherwise, or all ``label``): every sampler, student and the reference sample
with those labels, and ``A`` / ``B`` are conditioned on them (x ~ p(x | c) per label for
an exact mixture; held-out samples with the same label counts for a labelled data set).
Beside each overall row come per-class rows (``"class": c``; ``None`` on the overall
row): every metric on the samples of class c against A's class-c subset. ``guidance=w``
samples the teacher with classifier-free guidance w and solves the reference with it
(the exact guided flow for a mixture, whose A / B are then samples of that guided flow
from fresh noise; a trained teacher's data is p(x | c), not the guided distribution).
Students distilled at another guidance are skipped with a note.

A text-conditional teacher (a latent model on ``latents:AE,captions:SOURCE``) is benchmarked
in image space (:func:`text_sets`): ``A`` is n held-out images of SOURCE (its test split),
each method samples from the same noise with those images' captions (the held-out caption
templates) as its prompts, or with one ``prompt`` for every sample, and its latents are
decoded by the teacher's autoencoder before any metric (the flow error too: decoded against
the decoded reference). Where SOURCE has classes, ``label_accuracy`` is prompt adherence:
the set classifier's accuracy on the class each caption names. Students must be text
models with the same encoder; an LCM student takes ``guidance`` as its w input.

A teacher of a family before diffusion (``fewstep train --family``, :mod:`fewstep.families`)
is benchmarked by its own sampling rule at its own cost (the row "FAMILY (own rule)": an
ARM's d evaluations per sample, Langevin's steps); samplers run only where it has a score
over a range of levels (NCSN) or are named; an ARM's, SM's or EBM's single level has no
probability-flow reference, and the NLL is the ARM's exact one (none for SM / EBM).
"""
from __future__ import annotations

import json
import math
import os
import platform
import shlex
import time
import warnings
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from fewstep.errors import UserError
from fewstep.report.results import Results

DEFAULT_SAMPLERS = ("auto", "euler", "heun", "dpm_solver_2", "dpmpp_2m", "dpmpp_3m", "unipc", "deis", "ipndm")
DEFAULT_NFE = (1, 2, 4, 8)
DEFAULT_N = {"points": 2000, "image": 500}
DEFAULT_NLL_N = {"points": 250, "image": 32}
REFERENCE_TOL = {"points": 1e-5, "image": 1e-4}
_BIN_WIDTH = {"digits": 1 / 8}  # digits hold values v / 8 - 1, v in 0..16
_8BIT = ("mnist:", "cifar10:")
CLOUD_SET_SIZE = 100  # clouds per set for MMD-CD / COV-CD / 1-NNA-CD (pairwise Chamfer costs n^2 N^2)
MIN_CLASS_N = 10  # fewer samples of a class than this: no per-class rows for it


# ------------------------------------------------------------------------------ inputs
def deterministic_samplers() -> list[str]:
    """Every registered sampler that is neither stochastic nor adaptive."""
    from fewstep.samplers import info, names

    return [s for s in names() if not info(s).stochastic and not info(s).adaptive]


def _data_spec(teacher, spec: str, override: Optional[str]) -> str:
    if override:
        return override
    root = Path(spec)
    cfg = root / "config.json"
    if cfg.is_file():
        try:
            data = json.loads(cfg.read_text()).get("data")
            if isinstance(data, str) and data:
                return data
        except ValueError:
            pass
    name = (teacher.meta.get("data") or {}).get("name")
    if not name:
        raise UserError(f"cannot tell which data teacher {spec} was trained on; give --data")
    return name


def real_sets(teacher, spec: str, n: Optional[int], seed: int, data: Optional[str] = None):
    """(A, B, data_spec): two disjoint held-out real sets of equal size n (or fewer for
    a small finite set: half of it each); for a set with an official test split, A is n
    test images and B n training images (the data floor is then train against test)."""
    from fewstep.data.registry import load_dataset, test_split

    kind = teacher.kind
    n = int(n or DEFAULT_N.get(kind, 1000))
    if spec.startswith("gmm:"):
        x = teacher.denoiser.sample(2 * n, generator=torch.Generator().manual_seed(seed + 1000))
        return x[:n], x[n:], spec
    dspec = _data_spec(teacher, spec, data)
    test = test_split(dspec)
    if test is not None:  # A from the official test split, B from the training images: the floor is train vs test
        a = load_dataset(test, n=n, seed=seed + 1000).x
        b = load_dataset(dspec, n=len(a), seed=seed + 1001).x
        if tuple(a.shape[1:]) != tuple(teacher.shape):
            raise UserError(f"data '{dspec}' has samples of shape {list(a.shape[1:])} but the teacher makes "
                            f"{list(teacher.shape)}; give the teacher's dataset with --data")
        return a, b, dspec
    ds = load_dataset(dspec, n=2 * n, seed=seed + 1000)
    x = ds.x[torch.randperm(len(ds.x), generator=torch.Generator().manual_seed(seed + 1001))]
    if tuple(x.shape[1:]) != tuple(teacher.shape):
        raise UserError(f"data '{dspec}' has samples of shape {list(x.shape[1:])} but the teacher makes "
                        f"{list(teacher.shape)}; give the teacher's dataset with --data")
    half = min(n, len(x) // 2)
    if half < 10:
        raise UserError(f"data '{dspec}' has {len(x)} samples; the benchmark needs at least 20")
    return x[:half], x[half:2 * half], dspec


def check_class_options(model, label: Optional[int], guidance: Optional[float],
                        prompt: Optional[str] = None) -> None:
    """``--label`` / ``--guidance`` / ``--prompt`` that the teacher can take, else one UserError."""
    name = model.name or "the teacher"
    if guidance is not None and not math.isfinite(float(guidance)):
        raise UserError(f"--guidance must be a finite number, got {guidance}")
    text = bool(model.meta.get("text_encoder"))
    if prompt is not None and not text:
        raise UserError(f"--prompt: teacher {name} is not text-conditional; it takes no --prompt"
                        + (" (give --label for its classes)" if model.num_classes else ""))
    if text:
        if label is not None:
            raise UserError(f"--label {label}: teacher {name} is text-conditional; give --prompt \"...\" (or "
                            "nothing: the held-out images' captions)")
        model.check_conditioning(None, guidance)
        return
    if label is not None:
        if not model.num_classes:
            raise UserError(f"--label {label}: teacher {name} is unconditional; it takes no --label")
        if not 0 <= int(label) < model.num_classes:
            raise UserError(f"--label {label}: teacher {name} has classes 0..{model.num_classes - 1}")
    if guidance is not None and not model.num_classes:
        raise UserError(f"--guidance {guidance}: teacher {name} is unconditional; --guidance needs a "
                        "class-conditional teacher")
    model.check_conditioning(None, guidance)


def text_sets(teacher, spec: str, n: int, seed: int, data: Optional[str] = None,
              prompt: Optional[str] = None, notes: Optional[list] = None):
    """(A, B, feature data spec, text contexts [n, L, D + 1], A's classes [n] or None, B's
    classes or None, how) of a
    text-conditional teacher trained on ``latents:AE,captions:SOURCE`` (or ``captions:SOURCE``):
    A = n held-out images of SOURCE (its test split, captioned with the held-out templates; a
    captioned folder without one: half of it) in image space, B = as many other images (the
    training split: the data floor), the prompts = A's captions, or ``prompt`` for all."""
    from fewstep.data.registry import _caption_spec, caption_data, held_out, load_dataset, test_split

    notes = [] if notes is None else notes
    dspec = _data_spec(teacher, spec, data)
    inner = dspec.partition(",")[2] if dspec.startswith("latents:") else dspec
    if not inner.startswith("captions:"):
        raise UserError(f"teacher {spec} is text-conditional but its data '{dspec}' has no captions; give "
                        "--data latents:AE,captions:SOURCE (or captions:SOURCE)")
    source = _caption_spec(inner)[0]
    if test_split(source) is not None:
        a = held_out(inner, n, seed + 1000)[0]
        bset = load_dataset(source, n=len(a.x), seed=seed + 1001)
        b, b_classes = bset.x, None if bset.labels is None else bset.labels.long()
        where = f"{len(a.x)} test images of {source} (held-out caption templates)"
    else:
        both = caption_data(inner, 2 * n, seed + 1000)
        half = len(both.x) // 2
        if half < 10:
            raise UserError(f"data '{inner}' has {len(both.x)} captioned images; the benchmark needs at least 20")
        idx = torch.arange(half)
        _, ctx_all, _ = both.take(torch.arange(2 * half))
        b = both.x[half:2 * half]
        a_x, ctx = both.x[:half], ctx_all[:half]
        classes = None if both.class_labels is None else both.class_labels[idx].long()
        b_classes = None if both.class_labels is None else both.class_labels[half:2 * half].long()
        notes.append(f"Text prompts: the captions of {half} images of {source} (no test split: half of its images), "
                     f"against the other {half}.")
        ctx, classes, how = _one_prompt(teacher, prompt, half, ctx, classes, notes)
        return a_x, b, source, ctx, classes, b_classes, how
    _, ctx, _ = a.take(torch.arange(len(a.x)))
    classes = None if a.class_labels is None else a.class_labels.long()
    if prompt is None:
        notes.append(f"Text prompts: the captions of {where}; images decoded by the teacher's autoencoder; "
                     "the data row is as many training images against them."
                     + (" label_accuracy is prompt adherence: the classifier's accuracy on each caption's class."
                        if classes is not None else ""))
    ctx, classes, how = _one_prompt(teacher, prompt, len(a.x), ctx, classes, notes)
    return a.x, b, source, ctx, classes, b_classes, how


def _one_prompt(teacher, prompt: Optional[str], n: int, ctx: Tensor, classes, notes: list):
    """(contexts, classes, how): the data's captions, or ``prompt`` for all n samples."""
    if prompt is None:
        return ctx, classes, "held-out captions"
    if not str(prompt).strip():
        raise UserError("--prompt is empty; give a prompt, or leave it out for the held-out images' captions")
    notes.append(f"One prompt for every sample: \"{prompt}\". FD and the other data metrics compare with the whole "
                 "held-out set, not p(x | prompt); the flow error (against the reference with the same prompt) "
                 "measures the solvers.")
    return teacher.prompt([str(prompt)]).cpu().expand(n, -1, -1).contiguous(), None, f"prompt \"{prompt}\""


def bench_labels(model, spec: str, n: int, seed: int, label: Optional[int] = None) -> tuple[Tensor, str]:
    """(labels [n] LongTensor, how they were drawn) for a class-conditional teacher: all
    ``label``, else drawn from ``seed`` with an exact mixture's class prior, else uniform."""
    if label is not None:
        return torch.full((n,), int(label), dtype=torch.long), f"all class {int(label)}"
    g = torch.Generator().manual_seed(seed + 2000)
    if spec.startswith("gmm:"):
        return model.denoiser.sample_labels(n, generator=g), "drawn with the mixture's class prior"
    return torch.randint(0, model.num_classes, (n,), generator=g), "drawn uniformly over the classes"


def conditional_sets(teacher, spec: str, labels: Tensor, seed: int, data: Optional[str] = None,
                     guidance: Optional[float] = None, notes: Optional[list] = None):
    """(A, B, data_spec, labels): two disjoint real sets whose i-th samples both have class
    labels[i]. An exact mixture draws x ~ p(x | c) per label (with ``guidance`` w != 1:
    samples of the exact guided flow from fresh noise); a labelled data set gives held-out
    samples with the same label counts (n shrinks, keeping the first labels, when a
    finite set holds too few of some class); with an official test split, A comes from it."""
    notes = [] if notes is None else notes
    n = len(labels)
    if spec.startswith("gmm:"):
        gmm = teacher.denoiser
        g = torch.Generator().manual_seed(seed + 1000)
        if guidance is None or float(guidance) == 1.0:
            return gmm.sample(n, g, labels=labels), gmm.sample(n, g, labels=labels), spec, labels
        two = []
        for _ in range(2):
            z = teacher.sigma_max * torch.randn(n, gmm.dim, generator=g, dtype=torch.float64)
            two.append(gmm.flow(z, teacher.sigma_max, 0.0, rtol=1e-6, labels=labels, guidance=float(guidance)))
        return two[0], two[1], spec, labels
    from fewstep.data.registry import load_dataset, test_split

    C = teacher.num_classes
    dspec = _data_spec(teacher, spec, data)
    pool_n = 4 * n
    for _ in range(3):
        ds = load_dataset(dspec, n=pool_n, seed=seed + 1000)
        if ds.labels is None:
            raise UserError(f"data '{dspec}' has no labels but the teacher is class-conditional ({C} classes); "
                            "give its labelled dataset with --data")
        if ds.num_classes and ds.num_classes != C:
            raise UserError(f"data '{dspec}' has {ds.num_classes} classes but the teacher {C}; give the teacher's "
                            "dataset with --data")
        if tuple(ds.x.shape[1:]) != tuple(teacher.shape):
            raise UserError(f"data '{dspec}' has samples of shape {list(ds.x.shape[1:])} but the teacher makes "
                            f"{list(teacher.shape)}; give the teacher's dataset with --data")
        avail = torch.bincount(ds.labels.long(), minlength=C)[:C]
        if bool((avail >= 2 * torch.bincount(labels, minlength=C)).all()) or len(ds.x) < pool_n:
            break  # enough of every class, or a finite set that holds no more
        pool_n *= 4
    m = n
    while True:
        need = 2 * torch.bincount(labels[:m], minlength=C)
        if bool((avail >= need).all()):
            break
        ratio = float((avail[need > 0].double() / need[need > 0].double()).min())
        m = min(m - 1, int(m * ratio))
        if m < 10:
            raise UserError(f"data '{dspec}' holds too few samples of some class for these labels "
                            f"({avail.tolist()} per class); the benchmark needs at least 20")
    if m < n:
        notes.append(f"n reduced from {n} to {m}: data '{dspec}' holds {avail.tolist()} samples per class, and "
                     "each class needs twice its label count (sets A and B).")
        labels = labels[:m]
    perm = torch.randperm(len(ds.x), generator=torch.Generator().manual_seed(seed + 1001))
    x, y = ds.x[perm], ds.labels.long()[perm]
    a, b = x.new_empty((m,) + tuple(x.shape[1:])), x.new_empty((m,) + tuple(x.shape[1:]))
    for c in range(C):
        pos = (labels == c).nonzero().flatten()
        if len(pos):
            src = (y == c).nonzero().flatten()
            a[pos], b[pos] = x[src[:len(pos)]], x[src[len(pos):2 * len(pos)]]
    test = test_split(dspec)
    if test is not None:  # A from the official test split (B stays training images: the floor is train vs test)
        t = load_dataset(test, seed=seed + 1002)
        tperm = torch.randperm(len(t.x), generator=torch.Generator().manual_seed(seed + 1003))
        tx, ty = t.x[tperm], t.labels.long()[tperm]
        for c in range(C):
            pos = (labels == c).nonzero().flatten()
            src = (ty == c).nonzero().flatten()
            if len(src) < len(pos):
                raise UserError(f"the test split '{test}' holds {len(src)} samples of class {c}, fewer than the "
                                f"{len(pos)} the benchmark asks; lower --n")
            a[pos] = tx[src[:len(pos)]]
    return a, b, dspec, labels


def discover_students(teacher_spec: str) -> list[str]:
    """Student run folders beside the teacher: siblings, ``students/*`` next to it or in
    it, whose model.json has ``role`` 'student' and names this teacher (or no teacher)."""
    t = Path(teacher_spec[4:] if teacher_spec.startswith("gmm:") else teacher_spec).resolve()
    roots = [t.parent, t.parent / "students", t / "students"]
    found = []
    for root in roots:
        if not root.is_dir():
            continue
        for p in sorted(root.iterdir()):
            meta_path = p / "model.json"
            if p.resolve() == t or not meta_path.is_file():
                continue
            try:
                meta = json.loads(meta_path.read_text())
            except ValueError:
                continue
            if meta.get("role") != "student":
                continue
            named = meta.get("teacher")
            if named:
                named = str(named)
                path_part = named[4:] if named.startswith("gmm:") else named
                cand = [Path(path_part), p / path_part, Path.cwd() / path_part]
                if not any(c.exists() and c.resolve() == t for c in cand):
                    continue
            shown = os.path.relpath(p) if p.resolve().is_relative_to(Path.cwd().resolve()) else str(p)
            if shown not in found:
                found.append(shown)
    return found


# ----------------------------------------------------------------------------- metrics
class Evaluator:
    """Metrics of a sample set against the real set A (features computed once for A)."""

    def __init__(self, real: Tensor, kind: str, data_spec: str, notes: list):
        from fewstep.metrics.features import classifier_for, feature_extractor, has_cross_check, logits_extractor

        self.real = real.detach().cpu()
        self.kind = "clouds" if kind != "image" and self.real.ndim == 3 else kind
        self.features = self.logits = self.check = None
        if kind == "image":
            try:
                clf = classifier_for(data_spec, progress=True)
                self.features, self.logits = feature_extractor(clf), logits_extractor(clf)
                info = getattr(clf, "train_info", {})
                where = "test" if "test_accuracy" in info else "held-out"
                notes.append(f"Image features: a {clf.num_features}-feature classifier trained here on "
                             f"'{data_spec}' ({where} accuracy {info.get('val_accuracy', float('nan')):.3f}); "
                             "FD and class score are NOT comparable with CIFAR-10 FID/IS.")
                if has_cross_check(data_spec):
                    self.check = feature_extractor(classifier_for(data_spec, arch="b"))
                    notes.append("FD (check): the same distance on the features of a second, differently built "
                                 "classifier (5x5 convolutions, max-pooling), a cross-check for a method that "
                                 "trains against the first.")
            except UserError as e:
                notes.append(f"No classifier features ({e}); FD and precision/recall use raw pixels.")
        self.real_f = None if self.kind == "clouds" else self._feat(self.real)
        self.real_check = None if self.check is None else self.check(self.real.detach().cpu())

    def subset(self, idx: Tensor) -> "Evaluator":
        """The same metrics against ``real[idx]`` (e.g. one class), features reused."""
        sub = object.__new__(Evaluator)
        sub.kind, sub.features, sub.logits, sub.check = self.kind, self.features, self.logits, self.check
        sub.real = self.real[idx]
        sub.real_f = None if self.real_f is None else self.real_f[idx]
        sub.real_check = None if self.real_check is None else self.real_check[idx]
        return sub

    def _feat(self, x: Tensor) -> Tensor:
        x = x.detach().cpu()
        return self.features(x) if self.features is not None else x.reshape(len(x), -1).double()

    def __call__(self, x: Tensor, flow_ref: Optional[Tensor] = None, labels: Optional[Tensor] = None) -> dict:
        """The metrics of samples ``x``; ``labels``: the classes they were asked for (images:
        ``label_accuracy``, the share the classifier puts in the asked class)."""
        from fewstep.metrics import (classifier_score, cloud_set_metrics, energy_distance, frechet_distance, mmd,
                                     precision_recall, rms, sliced_w2)

        x = x.detach().cpu()
        if not torch.isfinite(x).all():
            return {"fd": None, "note": "non-finite samples"}
        if self.kind == "clouds":
            k = min(len(x), len(self.real), CLOUD_SET_SIZE)
            m = cloud_set_metrics(x[:k], self.real[:k])
            if flow_ref is not None:
                m["flow_error"] = rms(x, flow_ref.detach().cpu())
            return m
        f = self._feat(x)
        m = {"fd": frechet_distance(f, self.real_f)}
        if self.check is not None:
            m["fd_check"] = frechet_distance(self.check(x), self.real_check)
        if self.logits is not None:
            m["class_score"] = classifier_score(x, self.logits)
            if labels is not None:
                m["label_accuracy"] = float((self.logits(x).argmax(1) == labels.cpu()).double().mean())
        m.update(precision_recall(f, self.real_f, k=3))
        m["sliced_w2"] = sliced_w2(x, self.real)
        if self.kind == "points":
            m["mmd"] = mmd(x, self.real)
            m["energy"] = energy_distance(x, self.real)
        if flow_ref is not None:
            m["flow_error"] = rms(x, flow_ref.detach().cpu())
        return m


# ----------------------------------------------------------------------------- sampling
def _start(model, eps: Tensor, seed: int) -> Tensor:
    """sigma_max * eps for this model, or its own noise (same seed) if its latent differs."""
    latent = tuple(getattr(model, "latent_shape", model.shape))
    if latent == tuple(eps.shape[1:]):
        return (model.sigma_max * eps).to(model.device, model.dtype)
    return model.noise(len(eps), seed=seed)


def _sample_counted(model, nfe: int, sampler: Optional[str], x: Tensor, seed: int, labels=None,
                    guidance: Optional[float] = None, **options):
    """(samples, evaluations spent or None): the model's denoiser is wrapped in a counter."""
    from fewstep.denoiser import NFECounter

    inner = model.denoiser
    counter = NFECounter(inner)
    model.denoiser = counter
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out, _ = model.sample(len(x), nfe, sampler=sampler, seed=seed, x=x, labels=labels, guidance=guidance,
                                  **options)
    finally:
        model.denoiser = inner
    return out, (counter.nfe or None)


def _bin_width(data_spec: str) -> Optional[float]:
    if data_spec in _BIN_WIDTH:
        return _BIN_WIDTH[data_spec]
    if data_spec.startswith(_8BIT) or Path(data_spec).is_dir() or data_spec.endswith(".png"):
        return 2 / 255
    return None


def teacher_nll(teacher, spec: str, held: Tensor, data_spec: str, progress: bool) -> dict:
    """Bits/dim of held-out data under the teacher (probability-flow ODE)."""
    from fewstep.metrics.likelihood import EXACT_MAX_DIM, bits_per_dim, dequantize, nll

    d = held[0].numel()
    x = held.to(teacher.device, teacher.dtype)
    bw = _bin_width(data_spec) if teacher.kind == "image" else None
    if bw is not None:
        x = dequantize(x, bw)
    t0 = time.time()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        v = nll(teacher.denoiser, x, teacher.sigma_min, teacher.sigma_max, progress=progress,
                rtol=1e-5 if teacher.kind == "points" else 1e-4, atol=1e-5 if teacher.kind == "points" else 1e-4)
    out = {"teacher_nll_bits_per_dim": bits_per_dim(v, d, bw),
           "teacher_nll_stderr_bits_per_dim": float(v.std() / math.sqrt(len(v))) / d / math.log(2) if len(v) > 1
           else None,
           "nll_samples": len(v), "nll_divergence": "exact" if d <= EXACT_MAX_DIM else "hutchinson (1 probe)",
           "nll_sigma_min": teacher.sigma_min, "nll_seconds": time.time() - t0}
    if spec.startswith("gmm:"):
        exact = -teacher.denoiser.log_prob(held, teacher.sigma_min)
        out["exact_nll_bits_per_dim"] = bits_per_dim(exact, d)
    return out


def family_nll(model, held: Tensor, data_spec: str) -> dict:
    """Bits/dim of held-out data under a family's exact likelihood (the ARM's). An image ARM
    is a discrete model over its own bins (its ``log_prob`` is ``log P - d log w`` with its
    bin width w), so its bits/dim are ``-log2 P / d`` with that w: the discrete likelihood of
    the data's values, which the ARM maps one to one onto its bins, whatever the data's own
    quantum (digits' 1/8, 8-bit's 2/255); comparable with the dequantised NLL of a diffusion
    teacher on the same data."""
    from fewstep.metrics.likelihood import bits_per_dim

    d = held[0].numel()
    t0 = time.time()
    with torch.no_grad():
        v = -model.log_prob(held.to(model.device, model.dtype)).double().cpu()
    arm = model.meta.get("arm") or {}
    if model.kind == "image" and arm.get("range") and arm.get("bins"):
        bw = (float(arm["range"][1]) - float(arm["range"][0])) / (int(arm["bins"]) - 1)  # the ARM's own bins
    else:
        bw = _bin_width(data_spec) if model.kind == "image" else None
    return {"teacher_nll_bits_per_dim": bits_per_dim(v, d, bw),
            "teacher_nll_stderr_bits_per_dim": float(v.std() / math.sqrt(len(v))) / d / math.log(2)
            if len(v) > 1 else None, "nll_samples": len(v), "nll_divergence": "exact (autoregressive)",
            "nll_seconds": time.time() - t0}


# ------------------------------------------------------------------------------- bench
def run_bench(teacher: str, samplers: Union[None, str, Sequence[str]] = None,
              students: Union[None, str, Sequence[str]] = "auto", nfe: Sequence[int] = DEFAULT_NFE,
              out: str = "runs/bench", n: Optional[int] = None, seed: int = 0, data: Optional[str] = None,
              nll_n: Optional[int] = None, reference: bool = True, device: Optional[str] = None,
              progress: bool = True, command: Optional[str] = None,
              grids: Sequence[str] = (), label: Optional[int] = None, guidance: Optional[float] = None,
              reference_labels: Optional[Tensor] = None, discriminator: Optional[str] = None,
              dg_weight: Optional[float] = None, prompt: Optional[str] = None) -> tuple[Results, Path]:
    """Run the benchmark (see the module docstring); returns (results, report.html path).

    ``samplers``: names, ``'default'`` (None), ``'all'`` (every deterministic sampler) or
    ``'none'``; ``students``: run folders, ``'auto'`` (:func:`discover_students`) or
    ``'none'``; ``nll_n``: held-out samples for the teacher NLL (0 skips it); ``grids``:
    grid files written by ``fewstep schedule``, each run as the method "SAMPLER @ FILE" with
    its sampler at its NFE (learned grids beside the fixed ones). For a class-conditional
    teacher: ``label`` (every sample of class ``label``), ``guidance`` (classifier-free
    guidance of the teacher's samplers and reference); ``reference_labels`` conditions the
    reference on other labels than the methods (a check that labels are used; tests only).
    ``discriminator``: a ``fewstep distill discriminator`` run of the teacher: every sampler
    also runs with discriminator guidance (weight ``dg_weight``, default the run's), as the
    method "SAMPLER + DG" beside the plain one (Kim et al. 2022; its cost is in the seconds).
    A text-conditional teacher: ``prompt`` (one prompt for every sample; default the held-out
    images' captions, :func:`text_sets`), ``guidance`` as for classes.
    """
    from tqdm.auto import tqdm

    from fewstep.model import load
    from fewstep.samplers import info

    t_start = time.time()
    teacher_spec = str(teacher)
    samplers_given = samplers
    samplers = _sampler_list(samplers)
    for s in samplers:
        if s != "auto":  # the measured default (fewstep.samplers.recommend)
            info(s)  # unknown names fail before any work
    learned = _grid_jobs(grids)
    nfes = sorted({int(k) for k in nfe})
    if not nfes or nfes[0] < 1:
        raise UserError(f"--nfe {','.join(map(str, nfe))}: give positive integers, e.g. 1,2,4,8")
    if guidance is not None and not math.isfinite(float(guidance)):
        raise UserError(f"--guidance must be a finite number, got {guidance}")
    student_specs = _student_list(students, teacher_spec)
    model = load(teacher_spec, device=device)
    check_class_options(model, label, guidance, prompt)
    text = bool(model.meta.get("text_encoder"))
    family = (model.meta or {}).get("family", "diffusion")
    single = family in ("arm", "sm", "ebm")  # no score over a range of levels: no flow, no ODE reference
    if single:
        reference = False
        samplers = [] if samplers_given is None else samplers
        if model.denoiser is None and samplers:
            raise UserError(f"{teacher_spec} is an autoregressive model: it has no denoiser for the samplers "
                            f"({', '.join(samplers)}); give --samplers none")
    if dg_weight is not None and discriminator is None:
        raise UserError("--dg-weight is the weight of --discriminator DG_RUN; give the discriminator too")
    guided = model.with_discriminator(discriminator, dg_weight) if discriminator is not None else None
    C = int(model.num_classes or 0)
    w = None if guidance is None else float(guidance)
    studs = [(s, load(s, device=device)) for s in student_specs]
    for s, st in studs:
        if tuple(st.shape) != tuple(model.shape):
            raise UserError(f"student {s} makes samples of shape {list(st.shape)}, the teacher {list(model.shape)}")
    out = Path(out)  # created only when the results are written: an interrupted run leaves nothing

    notes: list[str] = []
    labels, classes, cond_labels, b_labels = None, None, None, None
    if text:
        n0 = int(n or DEFAULT_N.get(model.kind, 1000))
        real_a, real_b, dspec, cond_labels, labels, b_labels, how = text_sets(model, teacher_spec, n0, seed, data, prompt, notes)
        classes = {"prompts": how}
        if w is not None and w != 1.0:
            notes.append(f"Guidance w = {w:g}: the teacher's samplers and the reference use classifier-free guidance "
                         "on the text; the held-out images are p(x | caption), not the guided distribution.")
    elif C:
        n0 = int(n or DEFAULT_N.get(model.kind, 1000))
        labels, how = bench_labels(model, teacher_spec, n0, seed, label)
        real_a, real_b, dspec, labels = conditional_sets(model, teacher_spec, labels, seed, data, w, notes)
        counts = torch.bincount(labels, minlength=C).tolist()
        classes = {"num_classes": C, "labels": how, "counts": counts}
        cond_labels = b_labels = labels
        if w is not None and w != 1.0:
            notes.append(f"Guidance w = {w:g}: the teacher's samplers and the reference use classifier-free "
                         "guidance. " + ("The data sets A and B are samples of the exact guided flow (fresh noise), "
                                         "so the data metrics measure distance to the guided distribution."
                                         if teacher_spec.startswith("gmm:") else
                                         "The held-out data is p(x | c), NOT the guided distribution: data metrics "
                                         "measure distance to the data; the flow error measures the solvers."))
    else:
        real_a, real_b, dspec = real_sets(model, teacher_spec, n, seed, data)
    n = len(real_a)
    say = print if progress else (lambda *a, **k: None)
    say(f"[bench] teacher {teacher_spec}, data {dspec}, n = {n}, {len(samplers)} samplers, "
        f"{len(studs)} students, NFE {','.join(map(str, nfes))}"
        + (f", {C} classes" + (f", guidance {w:g}" if w is not None else "") if C else ""))
    evaluate = Evaluator(real_a, model.kind, dspec, notes)
    per_class = []  # (class, indices, evaluator of A's class subset)
    for c in range(C):
        idx = (labels == c).nonzero().flatten()
        if 0 < len(idx) < MIN_CLASS_N:
            notes.append(f"Class {c} has only {len(idx)} of the {n} samples: no per-class rows for it.")
        elif len(idx):
            per_class.append((c, idx, evaluate.subset(idx)))
    eps = torch.randn((n,) + tuple(model.latent_shape), generator=torch.Generator().manual_seed(seed),
                      dtype=torch.float64)
    decode = (lambda m, x: m.decode(x)) if text else (lambda m, x: x)  # latents to images for every metric
    x_T = _start(model, eps, seed) if model.denoiser is not None else None
    rows, skipped, panels = [], [], {}

    def add_rows(base: dict, x: Tensor, flow_ref: Optional[Tensor], with_flow: bool = True, asked=None):
        """The overall row, then one per class: each metric on the class's samples; ``asked``:
        the classes x was asked for, if not ``labels`` (the data row of a text teacher)."""
        m = evaluate(x, flow_ref, labels=labels if asked is None else asked)  # the classifier's accuracy
        if not with_flow:
            m.pop("flow_error", None)
        note = m.pop("note", None)
        seconds = base.pop("seconds", None)
        rows.append({**base, "class": None, **m, **({"seconds": seconds} if seconds is not None else {})})
        if note:
            return note
        for c, idx, ev in per_class:
            mc = ev(x[idx.to(x.device)], None if flow_ref is None else flow_ref[idx.to(flow_ref.device)],
                    labels=None if labels is None else labels[idx.to(labels.device)])
            if not with_flow:
                mc.pop("flow_error", None)
            mc.pop("note", None)
            rows.append({**base, "class": c, **mc})
        return None

    def record(method, kind, k, used, x, seconds, flow_ref):
        note = add_rows({"method": method, "kind": kind, "nfe": k, "nfe_used": used, "seconds": seconds}, x, flow_ref)
        if note:
            skipped.append({"method": method, "nfe": k, "reason": note})
        panels.setdefault(method, {})[f"NFE {k}" if k is not None else method] = _panel(x, evaluate.kind)

    add_rows({"method": "data (held-out)", "kind": "data", "nfe": None, "nfe_used": None}, real_b, None, False,
             asked=b_labels if labels is not None and b_labels is not None else None)
    ref = None
    if reference:
        say("[bench] the reference: the teacher's ODE solved accurately from the same noise")
        ref_labels = cond_labels if reference_labels is None or labels is None else torch.as_tensor(reference_labels)
        t0 = time.time()
        if teacher_spec.startswith("gmm:"):
            ref = model.denoiser.flow(x_T, model.sigma_max, 0.0, rtol=1e-8, labels=ref_labels, guidance=w)
            used, rlabel = None, "exact flow" + (f" (guidance {w:g})" if w is not None and C else "")
        else:
            tol = REFERENCE_TOL.get(model.kind, 1e-5)
            ref, used = _sample_counted(model, 100000, "rk45", x_T, seed, labels=ref_labels, guidance=w,
                                        rtol=tol, atol=tol)
            rlabel = f"teacher ODE (rk45, tol {tol:g}" + (f", guidance {w:g})" if w is not None and (C or text) else ")")
            ref = decode(model, ref)
        add_rows({"method": rlabel, "kind": "reference", "nfe": None, "nfe_used": used,
                  "seconds": time.time() - t0}, ref, None, False)
        panels["reference"] = {"data": _panel(real_a, evaluate.kind), rlabel: _panel(ref, evaluate.kind)}

    jobs = [(s, "sampler", model, k, w) for s in samplers for k in nfes]
    dg = {}  # "SAMPLER + DG" -> SAMPLER
    if guided is not None:
        for s in samplers:
            dg[f"{s} + DG"] = s
            jobs += [(f"{s} + DG", "sampler", guided, k, w) for k in nfes]
        notes.append(f"SAMPLER + DG: discriminator guidance (Kim et al. 2022) with {discriminator} at weight "
                     f"{guided.denoiser.weight:g}: one discriminator gradient per evaluation, in the seconds.")
    if family != "diffusion":  # the family's own rule at its own cost
        own = model.sampling.get("sampler") if hasattr(model, "sampling") else model.default_sampler
        jobs.append((f"{family} (own rule: {own})", "family", model, int(model.meta["default_nfe"]), None))
    jobs += [(name, "sampler", model, k, w) for name, (_, _, k) in learned.items()]  # learned grids
    for spec, st in studs:
        name = _student_name(spec, st)
        why, st_w = _student_text(st, model, w) if text else _student_conditioning(st, C, w)
        if why:
            skipped.append({"method": name, "nfe": None, "reason": why})
            continue
        if st_w is not None and st.meta.get("guidance") is not None:
            notes.append(f"{name} was distilled at guidance {float(st.meta['guidance']):g} with a null label: it is "
                         f"sampled here with classifier-free guidance {st_w:g} on top.")
        rule = st.rule_nfes() if hasattr(st, "rule_nfes") else []
        for k in nfes:
            if rule and k not in rule:
                skipped.append({"method": name, "nfe": k, "reason": f"its own rule samples with "
                                f"{', '.join(map(str, rule))} evaluations"})
            else:
                jobs.append((name, "student", st, k, st_w))
    bar = tqdm(jobs, desc="bench", disable=not progress, leave=True)
    for method, kind, m, k, mw in bar:
        bar.set_postfix_str(f"{method} @ {k}")
        t0 = time.time()
        cond = {"labels": cond_labels, "guidance": mw} if C or text else {}
        try:
            if method in learned:  # a learned grid: its sampler, from noise at its first level
                sname, gpath, _ = learned[method]
                first = float(json.loads(Path(gpath).read_text())["sigmas"][0])
                x, used = _sample_counted(m, k, sname, _start(m, eps, seed) * (first / m.sigma_max), seed,
                                          grid=gpath, **cond)
            elif m.denoiser is None:  # an ARM: its own rule, its own noise, d evaluations per sample
                x, used = m.sample(n, k, seed=seed)[0], k
            else:
                x, used = _sample_counted(m, k, dg.get(method, method) if kind == "sampler" else None,
                                          _start(m, eps, seed), seed, **cond)
        except UserError as e:
            skipped.append({"method": method, "nfe": k, "reason": str(e)})
            continue
        x = decode(m, x)
        seconds = time.time() - t0
        used = used if used is not None else k
        if kind == "sampler" and any(r["method"] == method and r["nfe_used"] == used for r in rows):
            skipped.append({"method": method, "nfe": k, "reason": f"spends {used} evaluations, as at a "
                            "smaller budget (its steps cost more than one evaluation)"})
            continue
        same_noise = tuple(getattr(m, "latent_shape", m.shape)) == tuple(eps.shape[1:])
        record(method, kind, k, used, x, seconds, ref if same_noise and ref is not None else None)
    bar.close()

    summary = {}
    nll_n = DEFAULT_NLL_N.get(model.kind, 0) if nll_n is None else int(nll_n)
    if nll_n > 0 and (model.num_classes or text):
        notes.append(f"The teacher is {'text' if text else 'class'}-conditional: its NLL is not computed "
                     "(it needs p(x), not p(x | c)).")
    elif nll_n > 0 and single and not getattr(model, "has_log_prob", False) or nll_n > 0 and family == "ebm":
        notes.append(f"The {family} teacher has no normalised density at a range of levels: no NLL.")
    elif nll_n > 0 and single:
        summary = family_nll(model, real_b[:nll_n], dspec)
    elif nll_n > 0:
        say(f"[bench] teacher NLL of {min(nll_n, len(real_b))} held-out samples (probability-flow ODE)")
        summary = teacher_nll(model, teacher_spec, real_b[:nll_n], dspec, progress)
    primary = {"points": "sliced_w2", "clouds": "mmd_cd"}.get(evaluate.kind, "fd")
    meta = {"teacher": teacher_spec, "data": dspec, "kind": evaluate.kind, "n": n, "seed": seed,
            "samplers": samplers, "students": student_specs, "nfe": nfes, "primary": primary,
            "command": command or _command(teacher_spec, samplers, student_specs, nfes, out, n, seed, label, w, prompt),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads, "
                       f"device {model.device}",
            "date": time.strftime("%Y-%m-%d"), "summary": summary, "notes": notes,
            "made_by": {k: v for k, v in [(teacher_spec, provenance(teacher_spec))]
                        + [(s, provenance(s)) for s in student_specs] if v}}
    if C:
        meta.update(classes=classes, label=label, guidance=w)
    if text:
        meta.update(prompts=classes["prompts"], prompt=prompt, guidance=w)
    results = Results(meta, rows, skipped, samples=panels)
    results.meta["seconds"] = time.time() - t_start
    path = write_report(results, out, panels)
    say(f"[bench] done in {time.time() - t_start:.0f} s: {path}")
    return results, path


def _student_conditioning(st, C: int, w: Optional[float]) -> tuple[Optional[str], Optional[float]]:
    """(why the student is not run, or None; the guidance to sample it with) on a teacher
    with C classes benchmarked at guidance w (None: none, i.e. w = 1)."""
    sc = int(st.num_classes or 0)
    if sc != C:
        return (f"it has {sc or 'no'} classes, the teacher {C or 'none'}" if C else
                f"it is class-conditional ({sc} classes) but the teacher is not"), None
    if not C:
        return None, None
    baked = st.meta.get("guidance")
    want = 1.0 if w is None else w
    if st.meta.get("w_input"):
        return None, want  # guided distillation: w is the student's input (1 = plain conditional)
    if baked is None:
        return None, w  # no guidance built in: guided like the teacher
    if float(baked) == want:
        return None, None  # its own, built-in guidance is this bench's
    try:
        st.check_conditioning(None, want)  # distilled at w = 1 with a null branch: guidance w on it
    except UserError:
        return (f"distilled at guidance {float(baked):g} (built in), but this benchmark's teacher and reference "
                f"are at guidance {want:g}; bench it with --guidance {float(baked):g}"), None
    return None, want


def _student_text(st, teacher, w: Optional[float]) -> tuple[Optional[str], Optional[float]]:
    """(why the student is not run, or None; its guidance) on a text-conditional teacher."""
    enc = st.meta.get("text_encoder")
    if not enc:
        return "it is not text-conditional, the teacher is", None
    if enc != teacher.meta.get("text_encoder"):
        return f"its text encoder {enc} is not the teacher's {teacher.meta.get('text_encoder')}", None
    want = 1.0 if w is None else w
    if st.meta.get("w_input"):
        return None, want  # LCM: w is the student's input
    baked = st.meta.get("guidance")
    if baked is not None and float(baked) != want:
        return (f"distilled at guidance {float(baked):g} (built in), but this benchmark is at guidance {want:g}; "
                f"bench it with --guidance {float(baked):g}"), None
    return None, None if baked is not None else w


def write_report(results: Results, out, panels: Optional[dict] = None) -> Path:
    """results.json, results.csv, pareto.png, samples_*.png and report.html in ``out``."""
    from fewstep.report.figures import pareto_plot, samples_plot, slug
    from fewstep.report.html import write_html

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    results.save(out)
    pareto = pareto_plot(results.overall(), out / "pareto.png")  # per-class rows: in the tables only
    lim = None
    pngs = []
    for method, pan in (panels or {}).items():
        if results.meta.get("kind") in ("points", "clouds"):
            lim = _plot_limit(pan)
        pngs.append((method, samples_plot(method, pan, out / f"samples_{slug(method)}.png", lim=lim)))
    return write_html(results, out, pareto, pngs)


def _panel(x: Tensor, kind: str) -> Tensor:
    """What the sample figure shows: up to 2000 points or images, or one point cloud."""
    x = x.detach().cpu()
    return x[0] if kind == "clouds" else x[:2000]


def _plot_limit(panels: dict) -> float:
    x = next(iter(panels.values()))
    return float(x.detach().float().abs().quantile(0.99)) * 1.3 + 1e-3 if x.numel() else 3.0


def _grid_jobs(grids) -> dict:
    """method name -> (sampler, grid file, NFE) for grid files written by ``fewstep schedule``."""
    from fewstep.grids import load as load_grid

    out = {}
    for g in grids or ():
        load_grid(g)  # missing or broken files fail before any work
        meta = json.loads(Path(g).read_text())
        if not isinstance(meta, dict) or "sampler" not in meta or "nfe" not in meta:
            raise UserError(f"grid file {g} names no sampler and NFE; write it with 'fewstep schedule'")
        out[f"{meta['sampler']} @ {Path(g).name}"] = (meta["sampler"], str(g), int(meta["nfe"]))
    return out


def _sampler_list(samplers) -> list[str]:
    if samplers is None or samplers == "default":
        from fewstep.samplers import names

        return [s for s in DEFAULT_SAMPLERS if s == "auto" or s in names()]
    if samplers == "all":
        return deterministic_samplers()
    if samplers == "none":
        return []
    if isinstance(samplers, str):
        samplers = [s for s in samplers.split(",") if s]
    return list(dict.fromkeys(samplers))


def _student_list(students, teacher_spec: str) -> list[str]:
    if students is None or students == "none":
        return []
    if students == "auto":
        return discover_students(teacher_spec)
    if isinstance(students, str):
        students = [s for s in students.split(",") if s]
    for s in students:
        if not Path(s).is_dir():
            raise UserError(f"student run folder {s} not found")
    return list(dict.fromkeys(students))


def _student_name(spec: str, st) -> str:
    method = st.meta.get("method") or "student"
    base = Path(spec).name
    return base if method in base else f"{method}:{base}"


def provenance(spec: str) -> Optional[str]:
    """The command that made run folder ``spec``, rebuilt from its config.json: ``fewstep
    train`` or ``fewstep distill METHOD`` with the options that differ from the defaults
    (None for a ``gmm:`` spec or a folder without config.json)."""
    cfg_path = Path(spec) / "config.json"
    if spec.startswith("gmm:") or not cfg_path.is_file():
        return None
    try:
        cfg = json.loads(cfg_path.read_text())
        method = cfg.get("method")
        if method:
            from fewstep.methods import defaults

            base, cmd = defaults(method), [f"fewstep distill {method}"]
        else:
            from fewstep.train.config import TRAIN_DEFAULTS

            base, cmd = {**TRAIN_DEFAULTS, "data": None}, ["fewstep train"]
    except Exception:  # an unreadable config or a method this version does not know
        return None
    for k, v in cfg.items():
        if k in ("method", "device", "net") or v is None or isinstance(v, (dict, list)) or v == base.get(k):
            continue
        flag = f"--{k.replace('_', '-')}"
        cmd.append(flag if v is True else f"{flag} {v}")
    return " ".join(cmd + [f"--out {spec}"])


def _command(teacher, samplers, students, nfes, out, n, seed, label=None, guidance=None, prompt=None) -> str:
    parts = ["fewstep bench", f"--teacher {teacher}", f"--samplers {','.join(samplers) or 'none'}",
             f"--students {','.join(students) or 'none'}", f"--nfe {','.join(map(str, nfes))}",
             f"--n {n}", f"--seed {seed}", f"--out {out}"]
    parts += [f"--label {label}"] if label is not None else []
    parts += [f"--guidance {guidance:g}"] if guidance is not None else []
    parts += [f"--prompt {shlex.quote(prompt)}"] if prompt is not None else []
    return " ".join(parts)
