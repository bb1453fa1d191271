"""Classifier-based feature distillation (Sun, Chen, Wang, Ye, Feng & Chen 2022, "Accelerating
diffusion sampling with classifier-based feature distillation", arXiv 2211.12039, ICME 2023;
official code github.com/zju-SWJ/RCFD, ``diffusion.py`` ``RCFD``).

Progressive distillation (:mod:`fewstep.methods.progressive`: the same rounds N -> N/2 -> ...,
the same two-DDIM-step target x~, its ``run_rounds``) in which the student's one-step output
x_S = x_student(y, s) is aligned with the teacher's two-step output x~ not pixel by pixel but
through a frozen classifier f (the project's own, :func:`fewstep.metrics.features.classifier_for`
of the teacher's data, or a saved classifier file). With g(x) the classifier's pooled
penultimate features (``SmallClassifier.features``; ``--cfd-space logits``: its class logits
instead) and tau the temperature, the paper's feature-distillation loss is

    L_CFD = KL( softmax(g(x~) / tau) || softmax(g(x_S)) )
          = sum_j p_j (log p_j - log q_j),   p = softmax(g(x~) / tau),  q = softmax(g(x_S))

per sample: the teacher's feature distribution is *sharpened* (tau < 1; the paper's 0.9) and
the student's is not divided by tau (no tau^2 factor either), so L_CFD = 0 exactly where
softmax(g(x_S)) = softmax(g(x~) / tau), and at tau = 1 where the features agree. Its
dataset-oriented loss on the student's class probabilities P = softmax(logits(x_S)) adds

    L_ent = -sum_k P_k log P_k              (per sample: each image should look like one class)
    L_div =  sum_k Pbar_k log Pbar_k,  Pbar = the batch mean of P  (the classes should be used evenly)

as L = L_CFD + beta (gamma L_ent + (1 - gamma) L_div); here ``--entropy-weight`` = beta gamma and
``--diversity-weight`` = beta (1 - gamma) (the paper's CIFAR-10 settings: beta = 0 with DenseNet-201,
the default here; beta = 0.003, gamma = 0.75 with ResNet-18, i.e. 0.00225 and 0.00075). The paper
trains on L alone (``--pixel-weight`` 0, the default); a positive weight adds the PD loss
w(s) ||x_S - x~||^2 beside it. L_div is one number per batch (each process's slice), added to
every sample's loss so that the batch mean carries it. The images go to the classifier clamped to
[-1, 1], as the classifier sees them everywhere in fewstep (a pixel outside gets no gradient
from it).

Which rounds: the official recipe distils with plain PD down to 8 steps and with CFD from the
8-step model on; ``--cfd-from 4`` (default) trains the rounds of 4 student steps and fewer with L,
the larger ones (and a copy round, one teacher step per student step from a fresh net) with the
PD loss. Every round's model.json records the CFD settings (``cfd``) and the classifier
evaluations of its loss (``cost.classifier_evals``: two per sample and step, x~ and x_S).
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import UserError
from ..train.job import Top
from ..train.options import Option, power_of_two, table_defaults, table_help
from .common import PD_OPTIONS, data_spec

OPTIONS = (
    *PD_OPTIONS,  # the rounds are progressive distillation's: its options, as they are there
    Option("temperature", float, 0.9, "temperature tau of the teacher's feature distribution softmax(g(x~) / tau), "
           "below 1 sharpens it (default 0.9, the paper's)", low=0.0, above=True),
    Option("entropy_weight", float, 0.0, "weight of the entropy of the student's class probabilities (the paper's "
           "beta gamma; default 0)", low=0.0),
    Option("diversity_weight", float, 0.0, "weight of the negative entropy of the batch's mean class probabilities "
           "(the paper's beta (1 - gamma); default 0)", low=0.0),
    Option("pixel_weight", float, 0.0, "weight of the PD pixel loss beside the classifier loss (default 0: the "
           "classifier loss only, the paper's)", low=0.0),
    Option("classifier", str, None, "the classifier: a saved classifier file (.safetensors), or a or b (the "
           "project's two architectures for the data)", none="the project's classifier for the teacher's data",
           example="a"),
    Option("cfd_space", str, "features", "what the KL compares: features (softmax over the classifier's pooled "
           "features, the paper's) or logits (over its class logits)", choices=("features", "logits")),
    Option("cfd_from", int, 4, "rounds whose student takes this many steps or fewer use the CFD loss, larger ones "
           "plain PD (a power of two; default 4: CFD from the 8-step model on, as the paper)", test=power_of_two,
           must="a power of two (1, 2, 4, ...)"),
)
DEFAULTS = table_defaults(OPTIONS)
HELP = table_help(OPTIONS)
KINDS = ("image",)  # the classifier sees images


def check_options(cfg: dict) -> None:
    """The rules between options, checked before anything is written: progressive's, and at
    least one round trained with the CFD loss."""
    from . import get

    get("progressive").check_options(cfg)
    if int(cfg["cfd_from"]) < int(cfg["end_steps"]):
        raise UserError(f"--cfd-from {cfg['cfd_from']} is below --end-steps {cfg['end_steps']}: no round would use "
                        f"the classifier loss; give --cfd-from {cfg['end_steps']} or more (or fewstep distill "
                        f"progressive)")


# ------------------------------------------------------------------------------ the loss
def classifier_outputs(clf, x: Tensor) -> tuple:
    """(pooled features g(x) [B, F], class logits [B, K]) of a ``SmallClassifier`` with the
    gradient to ``x`` kept (its ``features`` / ``forward`` detach their input, being metrics);
    the input clamped to [-1, 1] as there."""
    p = next(clf.parameters())
    feats = clf.body(x.to(p.dtype).clamp(-1.0, 1.0)).mean((2, 3))
    return feats, clf.head(feats)


def cfd_kl(student: Tensor, teacher: Tensor, temperature: float) -> Tensor:
    """Per sample KL(softmax(teacher / tau) || softmax(student)) over the last dimension (the
    paper's L_CFD: the teacher's distribution sharpened by tau, the student's as it is)."""
    log_p = F.log_softmax(teacher.detach() / float(temperature), dim=-1)
    log_q = F.log_softmax(student, dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def entropy(logits: Tensor) -> Tensor:
    """Per sample L_ent = -sum_k P_k log P_k, P = softmax(logits)."""
    log_p = F.log_softmax(logits, dim=-1)
    return -(log_p.exp() * log_p).sum(-1)


def diversity(logits: Tensor) -> Tensor:
    """The batch's L_div = sum_k Pbar_k log Pbar_k, Pbar = mean_b softmax(logits_b) (a scalar;
    its minimum -log K when the batch uses the K classes evenly)."""
    pbar = F.softmax(logits, dim=-1).mean(0)
    return torch.special.xlogy(pbar, pbar).sum()


def cfd_loss(clf, x_student: Tensor, x_tilde: Tensor, temperature: float, entropy_weight: float = 0.0,
             diversity_weight: float = 0.0, space: str = "features") -> Tensor:
    """Per sample L_CFD + entropy_weight L_ent + diversity_weight L_div (module docstring) of the
    student's x0 prediction ``x_student`` against the teacher's target ``x_tilde``."""
    with torch.no_grad():
        t_feats, t_logits = classifier_outputs(clf, x_tilde)
    s_feats, s_logits = classifier_outputs(clf, x_student)
    if space == "features":
        loss = cfd_kl(s_feats, t_feats, temperature)
    else:
        loss = cfd_kl(s_logits, t_logits, temperature)
    if entropy_weight:
        loss = loss + float(entropy_weight) * entropy(s_logits)
    if diversity_weight:
        loss = loss + float(diversity_weight) * diversity(s_logits)
    return loss.to(x_student.dtype)


# ------------------------------------------------------------------------ the classifier
def resolve_classifier(cfg: dict, teacher) -> tuple:
    """(the frozen classifier, what it is: a dict for model.json) from ``--classifier``: a
    saved file, or a / b, or (None) the project's classifier of the teacher's data; its images
    must be the teacher's."""
    from ..metrics.features import classifier_for, load_classifier

    given = cfg.get("classifier")
    if given is not None and given not in ("a", "b"):
        path = Path(given).expanduser()
        if not path.is_file():
            raise UserError(f"--classifier {given}: no such file; give a classifier file "
                            f"(fewstep.metrics.features.save_classifier), a or b, or leave it out")
        clf, source = load_classifier(path), {"file": str(path)}
    else:
        arch = given or "a"
        spec = data_spec(cfg.get("data"), teacher)
        if spec is None:
            raise UserError(f"teacher {teacher.name} does not name its data set, so there is no classifier for it; "
                            f"give --data or --classifier FILE")
        try:
            clf = classifier_for(str(spec), arch=arch)
        except UserError as e:
            raise UserError(f"--classifier: {e}; or give --classifier FILE") from None
        source = {"data": str(spec), "arch": arch}
    if tuple(clf.image_shape) != tuple(teacher.shape):
        what = source.get("file") or f"{source['data']}, architecture {source['arch']}"
        raise UserError(f"the classifier ({what}) is for images {list(clf.image_shape)}, the teacher's are "
                        f"{list(teacher.shape)}; give --classifier for the teacher's images")
    clf.eval().requires_grad_(False)
    info = {**source, "config": dict(clf.config)}
    acc = getattr(clf, "train_info", {}).get("val_accuracy")
    if acc is not None:
        info["val_accuracy"] = float(acc)
    return clf, info


# ------------------------------------------------------------------------------- stages
def settings(cfg: dict, classifier: dict) -> dict:
    """The CFD settings a round's model.json records."""
    return {"temperature": float(cfg["temperature"]), "entropy_weight": float(cfg["entropy_weight"]),
            "diversity_weight": float(cfg["diversity_weight"]), "pixel_weight": float(cfg["pixel_weight"]),
            "space": cfg["cfd_space"], "cfd_from": int(cfg["cfd_from"]), "classifier": classifier}


def stages(job):
    """Progressive distillation's rounds (``rounds/steps_NNNN``, :func:`~fewstep.methods.progressive.run_rounds`)
    with the CFD loss in the rounds of ``--cfd-from`` student steps or fewer; the top folder
    samples with the round matching --nfe."""
    from . import get

    P = get("progressive")
    cfg = job.cfg
    p = P.prepare(job, "cfd", KINDS)
    clf, clf_info = resolve_classifier(cfg, p.teacher)
    tau, w_ent, w_div = float(cfg["temperature"]), float(cfg["entropy_weight"]), float(cfg["diversity_weight"])
    space, cfd_from = cfg["cfd_space"], int(cfg["cfd_from"])
    evals = 2 * int(cfg["steps"]) * int(cfg["batch_size"])  # x~ and x_S through the classifier, per step and sample

    def extra(pred, x_tilde, batch, sigma):
        return cfd_loss(clf, pred, x_tilde, tau, w_ent, w_div, space)

    def round_loss(N, k):
        if k == 2 and N <= cfd_from:
            return float(cfg["pixel_weight"]), extra, {"cfd": {**settings(cfg, clf_info), "loss": "cfd"},
                                                        "cost": {"classifier_evals": evals}}
        return 1.0, None, {"cfd": {**settings(cfg, clf_info), "loss": "pd"}, "cost": {"classifier_evals": 0}}

    done = P.run_rounds(job, p.teacher, p.rounds, p.base, p.data, p.cond, p.process, p.prediction, p.net_cfg, p.copy,
                        method="cfd", round_loss=round_loss, frozen={"classifier": clf})

    def describe_top():
        meta = P._top_meta(done)
        meta["cost"]["classifier_evals"] = sum(m.get("cost", {}).get("classifier_evals", 0) for _, _, m in done)
        meta["cfd"] = {**settings(cfg, clf_info), "loss": "cfd",
                       "cfd_rounds": [N for N, _, m in done if m.get("cfd", {}).get("loss") == "cfd"]}
        return meta

    return Top(done[-1][1], describe_top)
