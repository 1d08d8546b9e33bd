"""SMLMT episodes (§3.2) and first-order MAML (§3.3): sampler invariants, the meta-gradient, branch handling."""
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

import maml_gpt as mg
from conftest import SMALL


@pytest.fixture
def corpus(data_dir):
    args = mg.parse_args(SMALL + ["--data_dir", data_dir])
    d = mg.prepare_corpus(args)
    return mg.read_bin(os.path.join(d, "train.bin")), mg.build_smlmt_index(d, args)


def test_content_words_follow_the_rule(corpus):
    enc = mg.get_tokenizer()
    _, index = corpus
    for w in index["words"]:
        s = enc.decode([int(w)])
        assert s[0] == " " and s[1:].isalpha() and s[1:].isascii() and len(s) >= 4
    assert enc.encode(" the")[0] not in set(index["words"].tolist())  # too frequent to be a content word


def test_episode_invariants(corpus):
    tokens, index = corpus
    N, K, Q, ctx = 8, 3, 2, 24
    ep = mg.sample_episode(tokens, index, N, K, Q, ctx, [1, 2, 3])
    assert ep["support_x"].shape == (N * K, ctx) and ep["query_x"].shape == (N * Q, ctx)
    assert len(set(ep["classes"].tolist())) == N  # N distinct classes
    for y, n in ((ep["support_y"], K), (ep["query_y"], Q)):
        assert y.min() >= 0 and y.max() < N and np.bincount(y, minlength=N).tolist() == [n] * N
    assert set(ep["query_y"].tolist()) <= set(ep["support_y"].tolist())  # every query label is a class
    assert len(np.unique(ep["positions"])) == N * (K + Q)  # support and query occurrences are disjoint
    x = np.concatenate([ep["support_x"].reshape(N, K, ctx), ep["query_x"].reshape(N, Q, ctx)], axis=1)
    assert ((x == mg.MASK_ID).sum(-1) == 1).all()  # exactly one [MASK] per example
    m = ep["mask_at"]
    assert (m >= ctx // 4).all() and (m < ctx - ctx // 4).all()  # context on both sides of the mask
    for c in range(N):
        word = ep["classes"][ep["support_y"].reshape(N, K)[c, 0]]
        for j in range(K + Q):  # the masked token is that class's word, the rest is the corpus verbatim
            p, a = ep["positions"][c, j], m[c, j]
            window = np.asarray(tokens[p - a:p - a + ctx]).astype(np.int64)
            assert window[a] == word and (np.delete(x[c, j], a) == np.delete(window, a)).all()


def test_episode_is_a_function_of_its_key(corpus):
    tokens, index = corpus
    a = mg.sample_episode(tokens, index, 8, 2, 2, 16, [1, 5, 0, 2])
    b = mg.sample_episode(tokens, index, 8, 2, 2, 16, [1, 5, 0, 2])
    c = mg.sample_episode(tokens, index, 8, 2, 2, 16, [1, 5, 1, 2])  # another rank / micro-step
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["support_x"], c["support_x"])


def test_too_few_words_is_a_clear_error(corpus):
    tokens, index = corpus
    with pytest.raises(mg.UserError, match="content words"):
        mg.sample_episode(tokens, index, 10_000, 2, 2, 16, [0])


def test_head_architecture():
    head = mg.make_head(96, 32)
    linears = [m for m in head if isinstance(m, torch.nn.Linear)]
    assert [(l.in_features, l.out_features) for l in linears] == [(96, 128), (128, 128), (128, 128), (128, 32)]
    assert sum(isinstance(m, torch.nn.Dropout) and m.p == 0.1 for m in head) == 3


def test_inner_loop_lowers_support_loss_and_keeps_head():
    torch.manual_seed(0)
    head = mg.make_head(16, 4, dropout=0.0)
    before = {k: v.clone() for k, v in head.state_dict().items()}
    feats, labels = torch.randn(12, 16), torch.arange(4).repeat(3)
    adapted = mg.inner_loop(head, feats, labels, steps=10, lr=0.1)
    loss0 = F.cross_entropy(head(feats), labels)
    loss1 = F.cross_entropy(functional_call(head, adapted, (feats,)), labels)
    assert loss1 < loss0 - 0.05
    assert all(torch.equal(before[k], v) for k, v in head.state_dict().items())  # phi_0 untouched
    assert all(p.grad is None for p in head.parameters())  # no .backward() inside the inner loop


def test_fomaml_gradient_equals_manual_computation():
    torch.manual_seed(0)
    head = mg.make_head(16, 4, dropout=0.0)
    sf, sy = torch.randn(8, 16), torch.arange(4).repeat(2)
    qf, qy = torch.randn(6, 16), torch.tensor([0, 1, 2, 3, 0, 1])
    adapted = mg.inner_loop(head, sf, sy, steps=5, lr=0.5)
    F.cross_entropy(functional_call(head, adapted, (qf,)), qy).backward()
    # manual: 5 explicit SGD steps on plain tensors, then the query gradient AT the adapted weights
    w = {k: p.detach().clone() for k, p in head.named_parameters()}
    for _ in range(5):
        w = {k: v.requires_grad_() for k, v in w.items()}
        g = torch.autograd.grad(F.cross_entropy(functional_call(head, w, (sf,)), sy), list(w.values()))
        w = {k: (v - 0.5 * gi).detach() for (k, v), gi in zip(w.items(), g)}
    w = {k: v.requires_grad_() for k, v in w.items()}
    g = torch.autograd.grad(F.cross_entropy(functional_call(head, w, (qf,)), qy), list(w.values()))
    for (k, p), gi in zip(head.named_parameters(), g):
        torch.testing.assert_close(p.grad, gi)
        torch.testing.assert_close(adapted[k].detach(), w[k].detach())


def test_backbone_gradient_comes_from_the_query_only(corpus):
    tokens, index = corpus
    torch.manual_seed(0)
    args = mg.parse_args(SMALL)
    model = mg.Decoder(mg.ModelConfig(d_model=24, n_layers=2, max_seq_len=32))
    head = mg.make_head(24, 8, dropout=0.0)
    ep = mg.episode_tensors(tokens, index, args, [0, 0, 0, 2], "cpu")
    mg.meta_micro_step(model, head, ep, args, 1.0, mg.nullcontext())
    got = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert "de_embedding_proj.weight" not in got  # the LM head is unused on meta steps
    # expected: the query loss with the adapted head held fixed; no support term
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        hs = model(ep["support_x"], return_hidden=True)[:, -1]
    adapted = {k: v.detach() for k, v in mg.inner_loop(head, hs, ep["support_y"], 3, args.inner_lr).items()}
    hq = model(ep["query_x"], return_hidden=True)[:, -1]
    F.cross_entropy(functional_call(head, adapted, (hq,)), ep["query_y"]).backward()
    for n, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(got[n], p.grad)


def test_branch_decision_is_a_function_of_seed_and_step():
    a = [mg.is_meta_step(3, s, 0.5) for s in range(400)]
    assert a == [mg.is_meta_step(3, s, 0.5) for s in range(400)]
    assert 150 < sum(a) < 250
    assert not any(mg.is_meta_step(3, s, 0.0) for s in range(400))
    assert all(mg.is_meta_step(3, s, 1.0) for s in range(400))


def test_unused_parameters_are_untouched_on_the_other_branch(small_args):
    args = mg.parse_args(small_args)
    s = mg.setup(args)
    model, head = s["model"], s["head"]
    meta_step = next(t for t in range(50) if mg.is_meta_step(args.seed, t, args.hybrid_ratio))
    ar_step = next(t for t in range(50) if not mg.is_meta_step(args.seed, t, args.hybrid_ratio))
    for step, frozen, moving in ((ar_step, head, model), (meta_step, model.de_embedding_proj, head),
                                 (ar_step, head, model)):  # AR first: AdamW has moments for the backbone
        f0 = [p.clone() for p in frozen.parameters()]
        m0 = [p.clone() for p in moving.parameters()]
        mg.train_step(s, args, step, mg.Window("cpu"))
        assert all(torch.equal(a, b) for a, b in zip(f0, frozen.parameters()))
        assert any(not torch.equal(a, b) for a, b in zip(m0, moving.parameters()))
