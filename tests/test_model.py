"""The decoder (paper §3.1): shapes, causality, GQA, RoPE, parameter counts, tokenizer."""
import hashlib
import math
import os

import pytest
import torch

import maml_gpt as mg
from conftest import check_close


def small_model(**kw):
    torch.manual_seed(0)
    return mg.Decoder(mg.ModelConfig(**dict(dict(d_model=48, n_layers=2, max_seq_len=64), **kw))).eval()


def test_shapes_loss_and_hidden():
    m = small_model()
    idx = torch.randint(0, 50257, (3, 17))
    logits, no_loss = m(idx)
    assert logits.shape == (3, 17, 50304) and logits.dtype == torch.float32 and no_loss is None
    no_logits, loss = m(idx, idx)  # with targets: the fused loss, and no logits
    assert no_logits is None and abs(loss.item() - math.log(50304)) < 1.5  # near-uniform at init
    h = m(idx, return_hidden=True)
    assert h.shape == (3, 17, 48)
    # return_hidden is the output_norm output, i.e. what the LM head reads
    torch.testing.assert_close(m.de_embedding_proj(h), logits)


@pytest.mark.attention
def test_causality():
    m = small_model()
    a = torch.randint(0, 50257, (1, 20))
    b = a.clone()
    b[0, 12:] = torch.randint(0, 50257, (8,))
    la, lb = m(a)[0], m(b)[0]
    check_close(la[:, :12], lb[:, :12], "attention is not causal: changing the tokens at positions 12.. "
                "changed the outputs at positions 0..11 (position t may attend to 0..t only)")
    assert not torch.allclose(la[:, 12:], lb[:, 12:]), \
        "the outputs at positions 12.. do not depend on the tokens there (does attention read its input?)"


def test_sequence_length_one_and_max():
    m = small_model()
    assert m(torch.tensor([[5]]))[0].shape == (1, 1, 50304)
    assert m(torch.zeros(1, 64, dtype=torch.long))[0].shape[1] == 64
    with pytest.raises(ValueError):
        m(torch.zeros(1, 65, dtype=torch.long))


@pytest.mark.attention
def test_gqa_equals_mha_with_repeated_kv_heads():
    torch.manual_seed(1)
    gqa_cfg = mg.ModelConfig(d_model=48, n_layers=1, max_seq_len=16)
    mha_cfg = mg.ModelConfig(d_model=48, n_layers=1, n_kv_heads=12, max_seq_len=16)
    gqa, mha = mg.Attention(gqa_cfg), mg.Attention(mha_cfg)
    hd = 4
    with torch.no_grad():
        mha.q_proj.weight.copy_(gqa.q_proj.weight)
        mha.o_proj.weight.copy_(gqa.o_proj.weight)
        for name in ("k_proj", "v_proj"):  # kv head g serves query heads 3g, 3g+1, 3g+2
            w = getattr(gqa, name).weight.view(4, hd, 48)
            getattr(mha, name).weight.copy_(w.repeat_interleave(3, dim=0).reshape(48, 48))
    cos, sin = mg.rope_tables(hd, 16, 1e4)
    x = torch.randn(2, 16, 48)
    check_close(gqa(x, cos, sin), mha(x, cos, sin), "grouped-query attention is not multi-head attention "
                "with each kv head repeated for its 3 query heads: query head h must read kv head h // 3 "
                "(heads 0-2 share kv head 0), not h % 4")


@pytest.mark.apply_rope
def test_rope_relative_position_property():
    hd = 8
    cos, sin = mg.rope_tables(hd, 64, 1e4)
    q, k = torch.randn(hd), torch.randn(hd)

    def rot(v, pos):
        return mg.apply_rope(v.view(1, 1, 1, hd), cos[pos:pos + 1], sin[pos:pos + 1]).view(hd)

    # <R_m q, R_n k> depends only on m - n, for many positions and vectors
    for m, n, shift in ((10, 3, 30), (7, 7, 50), (0, 20, 41), (63, 1, -1)):
        assert torch.allclose(rot(q, m) @ rot(k, n), rot(q, m + shift) @ rot(k, n + shift), atol=1e-5), \
            f"RoPE is not relative: <R_{m} q, R_{n} k> differs from <R_{m + shift} q, R_{n + shift} k>; " \
            "pair i at position t must turn by t times its own frequency (the same rotation for q and k)"
    for pos in (0, 7, 63):
        assert torch.allclose(rot(q, pos).norm(), q.norm(), atol=1e-6), \
            f"RoPE is not a rotation: it changed the length of a vector at position {pos}"


@pytest.mark.apply_rope
def test_rope_rotates_adjacent_pairs():
    """Meta-Llama convention: pair (x0, x1) turns by angle pos * theta^0 = pos radians."""
    cos, sin = mg.rope_tables(4, 8, 1e4)
    x = torch.tensor([1.0, 0.0, 1.0, 0.0]).view(1, 1, 1, 4)
    out = mg.apply_rope(x, cos[1:2], sin[1:2]).view(4)
    ok = torch.allclose(out, torch.tensor([math.cos(1), math.sin(1), math.cos(1e-2), math.sin(1e-2)]),
                        atol=1e-6)
    pairs = out.view(2, 2)  # each adjacent pair, rotated alone, stays a unit vector: its angle is the turn
    angles = [round(a, 4) for a in torch.atan2(pairs[:, 1], pairs[:, 0]).tolist()]
    if not ok and torch.allclose(pairs.norm(dim=1), torch.ones(2), atol=1e-6):
        if torch.allclose(torch.tensor(angles), torch.tensor([-1.0, -1e-2]), atol=1e-4):
            pytest.fail("RoPE rotates by minus the angle: (1, 0) at position 1 must become (cos 1, +sin 1)",
                        pytrace=False)
        pytest.fail(f"RoPE turns the pairs by the wrong frequencies (the pairs themselves are right): "
                    f"at position 1 pair 0 must turn by 1 rad and pair 1 by theta^(-2/4) = 0.01 rad, got "
                    f"{angles}; pair i at position t uses cos[t, i] and sin[t, i], column i of the tables",
                    pytrace=False)
    assert ok, ("RoPE rotates the wrong feature pairs: features (0, 1) are one pair and (2, 3) the next "
                f"(adjacent, Meta-Llama's convention); (1, 0, 1, 0) at position 1 must become (cos 1, sin 1, "
                f"cos 0.01, sin 0.01), got {[round(v, 4) for v in out.tolist()]}")


def rope_by_complex(x, theta=1e4, sign=1):
    """RoPE written independently: features (2i, 2i+1) are the complex number x_2i + i x_2i+1, multiplied by
    e^(i t theta^(-2i/hd)) at position t (sign=-1: the opposite rotation, a mistake). x: (..., T, hd) -> same
    shape."""
    T, hd = x.shape[-2:]
    pair = torch.arange(0, hd, 2, dtype=torch.float64)  # 2i
    angles = sign * torch.arange(T, dtype=torch.float64)[:, None] * theta ** (-pair / hd)  # (T, hd/2)
    z = torch.view_as_complex(x.double().reshape(*x.shape[:-1], hd // 2, 2).contiguous())
    return torch.view_as_real(z * torch.polar(torch.ones_like(angles), angles)).flatten(-2)


@pytest.mark.apply_rope
def test_rope_equals_complex_multiplication():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 11, 8)
    got = mg.apply_rope(x, *mg.rope_tables(8, 11, 1e4))
    # the usual mistakes, written out: HF's rotate-half pairing (x_i, x_i+d/2), and the opposite rotation
    half_pairs = rope_by_complex(torch.stack(x.chunk(2, -1), -1).flatten(-2))
    half_pairs = torch.cat([half_pairs[..., 0::2], half_pairs[..., 1::2]], -1)
    check_close(got, rope_by_complex(x), "RoPE must multiply each adjacent pair (x_2i, x_2i+1), as the "
                "complex number x_2i + i x_2i+1, by e^(i t theta^(-2i/d)) at position t",
                [("RoPE rotates the wrong feature pairs: it pairs x_i with x_i+d/2 (HF's rotate_half), this "
                  "project pairs adjacent features", half_pairs),
                 ("RoPE rotates by minus the angle", rope_by_complex(x, sign=-1)),
                 ("RoPE does nothing: x comes back unchanged", x)])
    half = mg.apply_rope(x.bfloat16(), *mg.rope_tables(8, 11, 1e4))  # under autocast q and k arrive in bf16
    assert half.dtype == torch.bfloat16, \
        f"apply_rope must return x's dtype (bf16 in, bf16 out; computed in fp32 inside), got {half.dtype}"
    check_close(half, rope_by_complex(x.bfloat16()), "RoPE on bf16 input is not the rotation (compute in "
                "fp32, return bf16)", atol=2e-2, rtol=2e-2)
    # fp32 arithmetic rounds once, at the end: the exact rotation rounded to bf16, to the bit (0 of these 528
    # values differ for the reference or for complex multiplication in fp32; 122 for arithmetic in bf16)
    off = (half != rope_by_complex(x.bfloat16()).bfloat16()).sum().item()
    assert off <= half.numel() // 100, \
        (f"RoPE computes in bf16: {off} of {half.numel()} values differ from the exact rotation rounded once "
         "to bf16; cast x (and keep cos, sin) in fp32 for the arithmetic, then cast the result to x's dtype")


@pytest.mark.rms_norm
def test_rms_norm_equals_the_formula():
    torch.manual_seed(0)
    norm = mg.RMSNorm(16, eps=0.5)  # a large eps, so that where it goes (inside the square root) matters
    with torch.no_grad():
        norm.weight.copy_(torch.randn(16))  # a gain that is not all ones
    x = 0.4 * torch.randn(3, 5, 16)
    xd, g = x.double(), norm.weight.double()
    want = xd / torch.sqrt((xd ** 2).mean(-1, keepdim=True) + 0.5) * g
    check_close(norm(x), want, "RMSNorm must be x / sqrt(mean(x^2 over the last dim) + eps) * weight", [
        ("RMSNorm divides by the root of the sum of squares, not of their mean",
         xd / torch.sqrt((xd ** 2).sum(-1, keepdim=True) + 0.5) * g),
        ("RMSNorm adds eps outside the square root: sqrt(mean(x^2)) + eps",
         xd / (torch.sqrt((xd ** 2).mean(-1, keepdim=True)) + 0.5) * g),
        ("RMSNorm forgets the learned gain (self.weight)", want / g),
        ("RMSNorm subtracts the mean (that is LayerNorm)",
         (xd - xd.mean(-1, keepdim=True)) / torch.sqrt(xd.var(-1, unbiased=False, keepdim=True) + 0.5) * g),
        ("RMSNorm takes the mean over the wrong dimension (it must be the last, the features)",
         xd / torch.sqrt((xd ** 2).mean(0, keepdim=True) + 0.5) * g),
    ], atol=1e-6, rtol=1e-5)
    out = norm(x.bfloat16())
    assert out.dtype == torch.float32, (f"RMSNorm of bf16 x must return fp32 (the normalised x in x's dtype "
                                        f"times the fp32 gain promotes to fp32), got {out.dtype}")
    check_close(out, want, "RMSNorm of bf16 x is not the formula (compute in fp32)", atol=3e-2, rtol=3e-2)


@pytest.mark.attention
def test_attention_equals_explicit_softmax_with_repeated_kv_heads():
    """Every step written out: projections, RoPE by complex multiplication, kv head h // 3 for query head h,
    scores / sqrt(hd), causal mask, softmax, weighted values, output projection."""
    torch.manual_seed(0)
    attn = mg.Attention(mg.ModelConfig(d_model=48, n_layers=1, max_seq_len=16))
    B, T, H, hd = 2, 10, 12, 4
    x = torch.randn(B, T, 48)
    q = rope_by_complex((x @ attn.q_proj.weight.T).view(B, T, H, hd).transpose(1, 2)).float()
    k = rope_by_complex((x @ attn.k_proj.weight.T).view(B, T, 4, hd).transpose(1, 2)).float()
    v = (x @ attn.v_proj.weight.T).view(B, T, 4, hd).transpose(1, 2)
    group = torch.arange(H) // 3  # query heads 0-2 read kv head 0, 3-5 kv head 1, ...
    scores = q @ k[:, group].transpose(-2, -1) / math.sqrt(hd)  # (B, H, T, T)
    scores = scores.masked_fill(torch.triu(torch.ones(T, T, dtype=torch.bool), diagonal=1), float("-inf"))
    y = (scores.softmax(-1) @ v[:, group]).transpose(1, 2).reshape(B, T, 48) @ attn.o_proj.weight.T

    def variant(scores=scores, group=group):  # the same computation with one thing changed
        return (scores.softmax(-1) @ v[:, group]).transpose(1, 2).reshape(B, T, 48) @ attn.o_proj.weight.T

    unmasked = q @ k[:, group].transpose(-2, -1) / math.sqrt(hd)
    tiled = torch.arange(H) % 4
    tiled_scores = (q @ k[:, tiled].transpose(-2, -1) / math.sqrt(hd)).masked_fill(
        torch.triu(torch.ones(T, T, dtype=torch.bool), diagonal=1), float("-inf"))
    check_close(attn(x, *mg.rope_tables(hd, T, 1e4)), y, "attention must be softmax(q k^T / sqrt(hd)) v per "
                "head, causal, query head h reading kv head h // 3, then o_proj", [
                    ("attention is not causal: position t also attends to later positions",
                     variant(unmasked)),
                    ("kv heads are tiled, not grouped: query head h reads kv head h % 4 instead of h // 3",
                     variant(tiled_scores, tiled)),
                    ("the scores are not scaled by 1/sqrt(head_dim)", variant(scores * math.sqrt(hd))),
                ], atol=1e-5, rtol=1e-4)


def test_rope_buffers_are_per_model_and_not_saved():
    a, b = small_model(max_seq_len=8), small_model(max_seq_len=32)
    assert a.rope_cos.shape[0] == 8 and b.rope_cos.shape[0] == 32
    assert "rope_cos" not in a.state_dict() and not a.rope_cos.is_complex()


@pytest.mark.parametrize("size,expected", [("tiny", 11.3e6), ("small", 64.6e6), ("medium", 181e6),
                                           ("large", 570e6)])
def test_preset_parameter_counts(size, expected):
    with torch.device("meta"):
        m = mg.Decoder(mg.ModelConfig(d_model=mg.SIZES[size]["d_model"]))
    assert abs(mg.count_params(m) - expected) / expected < 0.01
    names = {n for n, _ in m.named_parameters()}
    for n in ("embedding_proj.weight", "layers.11.attention.v_proj.weight", "layers.0.swiglu.w_2.weight",
              "layers.3.attention_norm.weight", "layers.3.swiglu_norm.weight", "output_norm.weight",
              "de_embedding_proj.weight"):
        assert n in names
    assert not any(n.endswith(".bias") for n in names)


def test_tokenizer_offline_ids():
    enc = mg.get_tokenizer()
    assert enc.encode("Hello world") == [15496, 995]
    assert enc.n_vocab == 50257 and enc.eot_token == mg.EOT_ID
    assert mg.MASK_ID == 50257 < mg.ModelConfig().vocab_size == 50304


def test_tokenizer_file_checksum_matches_readme():
    path = os.path.join(mg.HERE, "data", "gpt2.tiktoken.xz")
    digest = hashlib.sha256(open(path, "rb").read()).hexdigest()
    readme = open(os.path.join(mg.HERE, "data", "README.md")).read()
    assert digest in readme
