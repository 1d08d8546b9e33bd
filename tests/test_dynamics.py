"""Learning dynamics (§3.3, §6): ER / PER, attention entropy, the probe batch, and analyze.py's error for a
folder without a run."""
import json
import math
import os

import numpy as np
import pytest
import torch

import analyze
import maml_gpt as mg
from conftest import check_close
from test_model import rope_by_complex


@pytest.mark.effective_rank
def test_effective_rank_known_matrices():
    er = mg.effective_rank
    got = er(torch.eye(16))
    assert got != pytest.approx(1.0), \
        "ER of the 16 x 16 identity came out 1: p = sigma / sum(sigma) must sum to 1 (divide by the sum " \
        "of the singular values, not their mean or max)"
    assert got == pytest.approx(16.0), \
        f"ER of the 16 x 16 identity must be 16 (p = sigma / sum(sigma) = 1/16 each), got {got}"
    assert mg.proportional_effective_rank(torch.eye(16)) == pytest.approx(1.0), \
        "PER of the identity must be 1"
    torch.manual_seed(0)
    u, v = torch.randn(12, 1), torch.randn(1, 7)
    assert er(u @ v) == pytest.approx(1.0, abs=1e-4), f"ER of a rank-one matrix must be 1, got {er(u @ v)}"
    assert mg.proportional_effective_rank(u @ v) == pytest.approx(1 / 7, abs=1e-4)
    W = torch.randn(20, 10)
    assert er(3.7 * W) == pytest.approx(er(W), rel=1e-5), \
        "ER must not change when W is scaled (p = sigma / sum sigma): normalise by the sum of the singular " \
        "values"
    D = torch.diag(torch.tensor([2.0, 2.0, 0.0, 0.0]))  # zero singular values contribute 0, no NaN
    assert er(D) == pytest.approx(2.0), \
        f"ER of diag(2, 2, 0, 0) must be 2 (zero singular values add nothing: 0 log 0 = 0), got {er(D)}"
    assert mg.proportional_effective_rank(D) == pytest.approx(0.5)
    assert er(torch.zeros(5, 5)) == 0.0, f"ER of the zero matrix must be 0, got {er(torch.zeros(5, 5))}"
    s = torch.tensor([3.0, 1.0])  # ER = exp(H(0.75, 0.25))
    want = math.exp(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)))
    got = er(torch.diag(s))
    energy = math.exp(-(0.9 * math.log(0.9) + 0.1 * math.log(0.1)))  # p = sigma^2 / sum sigma^2
    assert got != pytest.approx(energy), \
        "ER uses the squares of the singular values (sigma^2 / sum sigma^2, the energy); " \
        "p = sigma / sum sigma"
    assert got == pytest.approx(want), \
        f"ER of diag(3, 1) must be exp(H(0.75, 0.25)) = {want:.4f} (p = sigma / sum sigma), got {got:.4f}"


@pytest.mark.effective_rank
def test_per_equals_numpy_svd():
    rng = np.random.default_rng(0)
    for shape in ((7, 7), (12, 5), (5, 30)):
        # uneven columns: a sloped spectrum
        W = rng.standard_normal(shape) * rng.uniform(0.1, 3, size=shape[1])
        s = np.linalg.svd(W, compute_uv=False)
        p = s / s.sum()
        er = float(np.exp(-(p * np.log(p)).sum()))
        got = mg.effective_rank(torch.tensor(W))
        assert got == pytest.approx(er, rel=1e-5), \
            f"ER of a {shape} matrix must be exp(entropy of sigma / sum sigma) = {er:.4f} (numpy's SVD), " \
            f"got {got:.4f}"
        assert mg.proportional_effective_rank(torch.tensor(W)) == pytest.approx(er / min(shape), rel=1e-5)


@pytest.mark.attention_entropy
def test_attention_entropy_of_uniform_attention_is_mean_log_t():
    torch.manual_seed(0)
    m = mg.Decoder(mg.ModelConfig(d_model=48, n_layers=2, max_seq_len=32)).eval()
    with torch.no_grad():
        for layer in m.layers:
            layer.attention.q_proj.weight.zero_()  # q = 0: every visible key gets the same score
    T = 20
    ent = mg.attention_entropy(m, torch.randint(0, 50000, (2, T)))
    assert ent.shape == (2, 12), f"attention_entropy must be (n_layers, n_heads) = (2, 12), got {ent.shape}"
    expected = np.mean([math.log(t) for t in range(1, T + 1)])
    check_close(ent, torch.full((2, 12), expected), "uniform causal attention (q = 0) must have entropy "
                f"log(t+1) at query position t, {expected:.4f} nats on average over positions", [
                    ("the entropy averages over keys instead of summing -p log p over them: it must be a sum "
                     "over keys, then a mean over batch and query positions",
                     torch.full((2, 12), expected / T)),
                    ("attention is not causal: every query sees all T keys",
                     torch.full((2, 12), math.log(T)))], atol=1e-5, rtol=0)


@pytest.mark.attention_entropy
def test_attention_entropy_equals_explicit_probabilities():
    """Layer by layer: q and k from the weights, RoPE by complex multiplication, kv head h // 3 for query
    head h, causal softmax, entropy -sum p log p (0 log 0 = 0), then the real block gives the next layer's
    input."""
    torch.manual_seed(0)
    m = mg.Decoder(mg.ModelConfig(d_model=48, n_layers=2, max_seq_len=16)).eval()
    B, T, H, hd = 2, 9, 12, 4
    idx = torch.randint(0, 50000, (B, T))
    future = torch.triu(torch.ones(T, T, dtype=torch.bool), diagonal=1)
    want = []
    with torch.no_grad():
        for layer in m.layers:
            layer.attention.q_proj.weight.mul_(4)  # sharper than at init: the heads' entropies differ more
        x = m.embedding_proj(idx)
        for layer in m.layers:
            a, h = layer.attention, layer.attention_norm(x)
            q = rope_by_complex((h @ a.q_proj.weight.T).view(B, T, H, hd).transpose(1, 2))
            k = rope_by_complex((h @ a.k_proj.weight.T).view(B, T, 4, hd)
                                .transpose(1, 2))[:, torch.arange(H) // 3]
            p = (q @ k.transpose(-2, -1) / math.sqrt(hd)).masked_fill(future, float("-inf")).softmax(-1)
            want.append(-torch.where(p > 0, p * p.log(), 0.0).sum(-1).mean((0, 2)))  # (H,)
            x = layer(x, m.rope_cos[:T], m.rope_sin[:T])
    check_close(mg.attention_entropy(m, idx), torch.stack(want), "per-head entropy -sum_j p log p of each "
                "layer's causal attention (query head h reads kv head h // 3), mean over batch and query "
                "positions, with each layer's input the real block's output", atol=1e-5, rtol=1e-5)


@pytest.mark.attention
@pytest.mark.attention_entropy
def test_attention_entropy_matches_sdpa_attention():
    """The explicit probabilities reproduce the model's own attention output (so the entropy is of *its*
    heads)."""
    torch.manual_seed(0)
    m = mg.Decoder(mg.ModelConfig(d_model=48, n_layers=1, max_seq_len=16)).eval()
    x = torch.randn(1, 9, 48)
    attn, cos, sin = m.layers[0].attention, m.rope_cos[:9], m.rope_sin[:9]
    q, k0, v0 = attn.qkv(x, cos, sin)

    def explicit(group=torch.arange(12) // 3, causal=True):  # head_dim 4: scores / sqrt(4)
        k, v = k0[:, group], v0[:, group]
        s = (q @ k.transpose(-2, -1)) / 2
        p = (s.masked_fill(~torch.ones(9, 9, dtype=torch.bool).tril(), -1e9) if causal else s).softmax(-1)
        return attn.o_proj((p @ v).transpose(1, 2).flatten(-2))

    check_close(attn(x, cos, sin), explicit(), "attention must equal the explicit causal softmax over kv "
                "head h // 3 for query head h", [
                    ("attention is not causal: position t also attends to later positions",
                     explicit(causal=False)),
                    ("kv heads are tiled, not grouped: query head h reads kv head h % 4 instead of h // 3",
                     explicit(torch.arange(12) % 4))], atol=1e-5, rtol=1e-4)
    ent = mg.attention_entropy(m, torch.randint(0, 50000, (1, 9)))
    assert (ent >= 0).all() and (ent <= math.log(9)).all(), \
        f"an entropy over at most 9 keys lies in [0, log 9]; got {ent.min().item():.3f} to " \
        f"{ent.max().item():.3f}"


def test_probe_batch_is_identical_across_seeds_and_runs(small_args, tmp_path, monkeypatch):
    """Runs with different seeds probe their dynamics on the same held-out windows, at every probe: the inputs
    learning_dynamics actually receives in two real runs."""
    probes = []  # (seed, probe_x) of every call

    def recording(model, probe_x, probe_y, *rest):
        probes.append((seed, probe_x.clone()))
        return learning_dynamics(model, probe_x, probe_y, *rest)

    learning_dynamics = mg.learning_dynamics
    monkeypatch.setattr(mg, "learning_dynamics", recording)
    for seed in ("1", "2"):
        out = str(tmp_path / f"s{seed}")
        mg.main(small_args + ["--seed", seed, "--out_dir", out, "--max_steps", "2", "--dynamics_every", "2"])
    assert [s for s, _ in probes] == ["1", "1", "2", "2"]  # step 0 and step 2 of each run
    assert all(torch.equal(probes[0][1], x) for _, x in probes)
    # the windows come from the held-out split, verbatim
    val = np.asarray(mg.read_bin(os.path.join(mg.parse_args(small_args).data_dir, "toy-2000", "val.bin")))
    rows = np.lib.stride_tricks.sliding_window_view(val.astype(np.int64), 32)
    assert all((rows == x.numpy()).all(1).any() for x in probes[0][1])
    rows = [json.loads(open(str(tmp_path / f"s{s}" / "metrics.jsonl")).readlines()[-1]) for s in "12"]
    assert all("attn_entropy" in r and len(r["attn_entropy"]) == 2 for r in rows)
    # different seeds: different models on the same input
    assert rows[0]["attn_entropy"] != rows[1]["attn_entropy"]


# ------------------------------------------------------------------------------------------------------------
# analyze.py's claims on planted runs are tests/test_claims.py and tests/test_scoreboard.py

def test_analyze_errors_clearly(tmp_path, capsys):
    with pytest.raises(SystemExit):
        analyze.main([str(tmp_path)])
    assert "no metrics.jsonl" in capsys.readouterr().err
