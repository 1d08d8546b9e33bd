"""The decoder (paper §3.1): shapes, causality, GQA, RoPE, parameter counts, tokenizer."""
import hashlib
import math
import os

import pytest
import torch

import maml_gpt as mg


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


def test_causality():
    m = small_model()
    a = torch.randint(0, 50257, (1, 20))
    b = a.clone()
    b[0, 12:] = torch.randint(0, 50257, (8,))
    la, lb = m(a)[0], m(b)[0]
    torch.testing.assert_close(la[:, :12], lb[:, :12])
    assert not torch.allclose(la[:, 12:], lb[:, 12:])


def test_sequence_length_one_and_max():
    m = small_model()
    assert m(torch.tensor([[5]]))[0].shape == (1, 1, 50304)
    assert m(torch.zeros(1, 64, dtype=torch.long))[0].shape[1] == 64
    with pytest.raises(ValueError):
        m(torch.zeros(1, 65, dtype=torch.long))


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
    torch.testing.assert_close(gqa(x, cos, sin), mha(x, cos, sin))


def test_rope_relative_position_property():
    hd = 8
    cos, sin = mg.rope_tables(hd, 64, 1e4)
    q, k = torch.randn(hd), torch.randn(hd)

    def rot(v, pos):
        return mg.apply_rope(v.view(1, 1, 1, hd), cos[pos:pos + 1], sin[pos:pos + 1]).view(hd)

    # <R_m q, R_n k> depends only on m - n
    assert torch.allclose(rot(q, 10) @ rot(k, 3), rot(q, 40) @ rot(k, 33), atol=1e-5)
    assert torch.allclose(rot(q, 7).norm(), q.norm(), atol=1e-6)  # a rotation


def test_rope_rotates_adjacent_pairs():
    """Meta-Llama convention: pair (x0, x1) turns by angle pos * theta^0 = pos radians."""
    cos, sin = mg.rope_tables(4, 8, 1e4)
    x = torch.tensor([1.0, 0.0, 1.0, 0.0]).view(1, 1, 1, 4)
    out = mg.apply_rope(x, cos[1:2], sin[1:2]).view(4)
    assert torch.allclose(out[:2], torch.tensor([math.cos(1), math.sin(1)]))
    assert torch.allclose(out[2:], torch.tensor([math.cos(1e-2), math.sin(1e-2)]), atol=1e-6)


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
