"""Text-conditional teachers and their LCM students (issue 23) at toy size: captioned 8x8
digits (``captions:digits,encoder=hash``: the toy hash encoder, so no model is loaded) through
``fewstep train`` (a UNet attending to the captions, prompts dropped to the null prompt for
classifier-free guidance), ``fewstep distill lcm`` (w as the student's input) and ``fewstep
sample --prompt``. Checked: the prompt, the null prompt and the w input each change the output;
the held-out captions use only the held-out templates; a prompt for a model without text is
one line, exit 2."""
import json

import pytest
import torch

from fewstep.cli import main
from fewstep.model import load

DATA = "captions:digits,encoder=hash"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("text")
    t, s = root / "t", root / "s"
    assert main(["train", "--data", DATA, "--steps", "40", "--batch-size", "32", "--ema-decay", "0", "--out", str(t),
                 "--quiet"]) == 0
    assert main(["distill", "lcm", "--teacher", str(t), "--steps", "20", "--batch-size", "16", "--levels", "10",
                 "--ema-decay", "0", "--out", str(s), "--quiet"]) == 0
    return t, s


def test_captions_hold_out_their_templates():
    from fewstep.data import captions as C
    from fewstep.data.registry import held_out, load_dataset

    train = load_dataset(DATA, n=300, seed=0)
    assert train.table.shape[0] == len(set(train.captions)) and train.x.shape[1:] == (1, 8, 8)

    def template_of(text):  # a template matches when its fixed words all occur
        return [i for i, t in enumerate(C.ALL_TEMPLATES)
                if all(w in text for w in t.replace("{", " {").split() if "{" not in w and w not in ("a", "an"))]

    assert all(set(template_of(c)) & set(range(len(C.TEMPLATES))) for c in train.captions[:50])
    try:
        test, where = held_out("captions:fashion,encoder=hash", 50, 0)
    except Exception as e:  # Fashion-MNIST comes from a Debian package (.ci/run installs it)
        pytest.skip(f"no Fashion-MNIST here ({e})")
    assert where == "test"
    assert all(set(template_of(c)) & set(range(len(C.TEMPLATES), len(C.ALL_TEMPLATES))) for c in test.captions)


def test_prompt_null_prompt_and_w_change_the_output(runs):
    t, s = runs
    meta = json.loads((t / "model.json").read_text())
    assert meta["text_encoder"]["kind"] == "hash" and meta["net"]["context_dim"] == 64
    teacher, student = load(str(t)), load(str(s))
    ctx = teacher.prompt(["a bright small class 3, upright"] * 4)
    other = teacher.prompt(["a dark large class 8, wide"] * 4)
    y, sig = torch.randn(4, 1, 8, 8), torch.full((4,), 1.0)
    with torch.no_grad():
        a = teacher.denoiser(y, sig, labels=ctx)
        b = teacher.denoiser(y, sig, labels=other)
        null = teacher.denoiser(y, sig, labels=torch.full_like(ctx, -1))
        w1 = student.denoiser(y, sig, labels=ctx, cond=torch.full((4,), 1.0))
        w6 = student.denoiser(y, sig, labels=ctx, cond=torch.full((4,), 6.0))
    assert float((a - b).abs().max()) > 1e-4 and float((a - null).abs().max()) > 1e-4
    assert float((w1 - w6).abs().max()) > 1e-4
    x1, _ = student.sample(4, 2, labels=ctx, guidance=1.0, seed=0)
    x6, _ = student.sample(4, 2, labels=ctx, guidance=6.0, seed=0)
    assert x1.shape == (4, 1, 8, 8) and float((x1 - x6).abs().max()) > 1e-4


def test_sample_with_a_prompt_and_refusals(runs, tmp_path, capsys, gmm_spec):
    _, s = runs
    out = tmp_path / "x.npz"
    assert main(["sample", str(s), "--nfe", "2", "--n", "4", "--prompt", "a bright class 1", "--guidance", "3",
                 "--out", str(out)]) == 0
    assert out.is_file()
    assert main(["sample", gmm_spec, "--nfe", "2", "--n", "4", "--prompt", "a shoe", "--out",
                 str(tmp_path / "y.npz")]) == 2
    assert "takes no --prompt" in capsys.readouterr().err
    assert main(["sample", str(s), "--nfe", "2", "--n", "4", "--label", "3", "--out", str(tmp_path / "z.npz")]) == 2
    assert "--prompt" in capsys.readouterr().err


def test_bench_of_a_text_teacher(runs, tmp_path, capsys):
    """``fewstep bench`` on a text teacher: every method samples with the held-out captions
    (or one --prompt), its LCM student is run with w as its input, and prompt adherence is
    the classifier's accuracy on the caption's class (the data row: on the images' own)."""
    t, s = runs
    out = tmp_path / "b"
    assert main(["bench", "--teacher", str(t), "--students", str(s), "--samplers", "euler", "--nfe", "2",
                 "--n", "40", "--guidance", "2", "--out", str(out), "--quiet"]) == 0
    res = json.loads((out / "results.json").read_text())
    rows = {(r["method"], r["nfe"]): r for r in res["rows"] if r.get("class") is None}
    assert res["meta"]["prompts"] == "held-out captions" and res["meta"]["guidance"] == 2.0
    student = [k for k in rows if k[1] == 2 and k[0] != "euler"]
    assert ("euler", 2) in rows and len(student) == 1, list(rows)
    for r in rows.values():
        assert 0.0 <= r["label_accuracy"] <= 1.0 and r["fd"] is not None
    ref = [r for r in res["rows"] if r["kind"] == "reference"][0]
    assert rows[("euler", 2)]["flow_error"] > 0 and ref["nfe_used"] > 2
    # one prompt for all: no adherence (no class asked), the reference with the same prompt
    out2 = tmp_path / "b2"
    assert main(["bench", "--teacher", str(t), "--students", "none", "--samplers", "euler", "--nfe", "2", "--n", "40",
                 "--prompt", "a bright small class 3, upright", "--out", str(out2), "--quiet"]) == 0
    res2 = json.loads((out2 / "results.json").read_text())
    e2 = [r for r in res2["rows"] if r["method"] == "euler"][0]
    assert "label_accuracy" not in e2 and e2["flow_error"] != rows[("euler", 2)]["flow_error"]
    assert main(["bench", "--teacher", str(t), "--label", "3", "--nfe", "2", "--n", "40",
                 "--out", str(tmp_path / "b3")]) == 2
    assert "--prompt" in capsys.readouterr().err and not (tmp_path / "b3").exists()


def test_distilling_with_captions_of_another_encoder_is_refused(runs, tmp_path, capsys):
    """The data's captions must be encoded as the teacher's were (encoder and length): another
    length, or data without captions, is one line and exit 2, with no run folder left."""
    t, _ = runs
    for data, says in (("captions:digits,encoder=hash,length=8", "differ in length"), ("digits", "no captions")):
        out = tmp_path / data.replace(":", "_").replace(",", "_")
        assert main(["distill", "lcm", "--teacher", str(t), "--data", data, "--steps", "2", "--batch-size", "4",
                     "--levels", "10", "--out", str(out), "--quiet"]) == 2
        err = capsys.readouterr().err
        assert says in err and len(err.strip().splitlines()) == 1 and not out.exists(), err
