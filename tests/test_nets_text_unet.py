"""The UNet's text conditioning (issue 23): token states through cross-attention and their
pooled mean into the embedding; a row of -1 (classifier-free guidance's null label, label
dropout) is the null prompt, exactly as no labels; a UNet without a context keeps its former
parameters (old run folders load)."""
import torch

from fewstep.nets import build_net
from fewstep.nets.text import HashEncoder, null_embedding
from fewstep.nets.unet import text_context

CFG = {"kind": "unet", "in_channels": 1, "base_channels": 16, "channel_mult": [1, 2], "num_res_blocks": 1,
       "image_size": 8}


def _text_net(enc):
    torch.manual_seed(0)
    net = build_net({**CFG, "context_dim": enc.dim, "context_length": enc.length})
    e = null_embedding(enc, 1)
    net.null_context.copy_(text_context(e.states, e.mask)[0])
    for p in net.parameters():  # the zero-initialised layers would hide the text's effect
        if p.ndim > 1:
            torch.nn.init.normal_(p, std=0.1)
    return net.eval()


def test_null_rows_are_the_null_prompt_and_prompts_matter():
    enc = HashEncoder(dim=16, length=8)
    net = _text_net(enc)
    t = enc.encode(["a dark shoe", "a bright shirt", "a dark shoe"])
    ctx = text_context(t.states, t.mask)
    x = torch.randn(3, 1, 8, 8)
    x[2] = x[0]  # rows 0 and 2: the same input and prompt
    c = torch.zeros(3)
    with torch.no_grad():
        a = net(x, c, labels=ctx)
        null = net(x, c, labels=torch.full_like(ctx, -1))
        none = net(x, c)
        e = null_embedding(enc, 3)
        explicit = net(x, c, labels=text_context(e.states, e.mask))
        mixed = ctx.clone()
        mixed[1] = -1
        m = net(x, c, labels=mixed)
    assert torch.equal(null, none) and torch.allclose(null, explicit, atol=1e-6)
    assert float((a[0] - null[0]).abs().max()) > 1e-3          # the prompt changes the output
    assert float((a[0] - a[1]).abs().max()) > 1e-3 and torch.allclose(a[0], a[2], atol=1e-6)
    assert torch.allclose(m[1], null[1], atol=1e-6) and torch.allclose(m[0], a[0], atol=1e-6)


def test_a_plain_unet_keeps_its_parameters():
    torch.manual_seed(0)
    plain = build_net(CFG)
    keys = set(plain.state_dict())
    assert not any("cross" in k or "pooled" in k or "null_context" in k for k in keys)
    assert "context_dim" not in plain.config
    assert set(build_net(dict(plain.config)).state_dict()) == keys
