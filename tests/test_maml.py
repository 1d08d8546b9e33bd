"""SMLMT episodes (§3.2) and first-order MAML (§3.3): sampler invariants, the meta-gradient, branch
handling."""
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import maml_gpt as mg
from conftest import SMALL, check_close, close
from data import prepare


@pytest.fixture
def corpus(data_dir):
    args = mg.parse_args(SMALL + ["--data_dir", data_dir])
    d = mg.prepare_corpus(args)
    return mg.read_bin(os.path.join(d, "train.bin")), prepare.build_smlmt_index(d, args)


def test_content_words_follow_the_rule(corpus):
    enc = mg.get_tokenizer()
    _, index = corpus
    for w in index["words"]:
        s = enc.decode([int(w)])
        assert s[0] == " " and s[1:].isalpha() and s[1:].isascii() and len(s) >= 4
    assert enc.encode(" the")[0] not in set(index["words"].tolist())  # too frequent to be a content word


def check_episode(ep, tokens, index, N, K, Q, ctx, read, key):
    """Every rule of sample_episode's docstring on one episode, each failure in the student's terms."""
    at = f"(key {key}, read={read!r})"
    for k in ("support_x", "support_y", "query_x", "query_y", "classes", "positions", "mask_at"):
        assert k in ep, f"the episode has no {k!r} {at}"
        assert isinstance(ep[k], np.ndarray) and ep[k].dtype == np.int64, \
            f"{k} must be an int64 numpy array, got {type(ep[k]).__name__} {getattr(ep[k], 'dtype', '')} {at}"
    for k, shape in (("support_x", (N * K, ctx)), ("support_y", (N * K,)), ("query_x", (N * Q, ctx)),
                     ("query_y", (N * Q,)), ("classes", (N,)), ("positions", (N, K + Q)),
                     ("mask_at", (N, K + Q))):
        assert ep[k].shape == shape, f"{k} must have shape {shape}, got {ep[k].shape} {at}"
    assert len(set(ep["classes"].tolist())) == N, f"the N classes must be N distinct words {at}"
    assert set(ep["classes"].tolist()) <= set(index["words"].tolist()), f"a class is not a content word {at}"
    sy, qy = ep["support_y"].reshape(N, K), ep["query_y"].reshape(N, Q)
    assert (sy == sy[:, :1]).all() and (qy == sy[:, :1]).all(), \
        f"rows are not grouped by word: support rows i*K..i*K+K-1 and query rows i*Q..i*Q+Q-1 must all " \
        f"carry word i's label {at}"
    assert sorted(sy[:, 0].tolist()) == list(range(N)), f"the labels must be 0..N-1, one per word {at}"
    pos, m = ep["positions"], ep["mask_at"]
    for c in range(N):
        assert not set(pos[c, K:].tolist()) & set(pos[c, :K].tolist()), \
            f"a query window repeats a support occurrence (word {c}: support {pos[c, :K].tolist()}, query " \
            f"{pos[c, K:].tolist()}); draw a word's K+Q occurrences together, without replacement {at}"
        assert len(set(pos[c].tolist())) == K + Q, f"an occurrence is used twice for word {c} {at}"
    x = np.concatenate([ep["support_x"].reshape(N, K, ctx), ep["query_x"].reshape(N, Q, ctx)], axis=1)
    n_masks = (x == mg.MASK_ID).sum(-1)
    assert (n_masks == 1).all(), f"every window must hold exactly one [MASK] (found {n_masks.min()} to " \
                                 f"{n_masks.max()}): the chosen occurrence, nothing else {at}"
    if read == "mask":  # the [MASK] closes the window: all left context, nothing after it
        assert (m == ctx - 1).all(), \
            f"with read='mask' the [MASK] must be the window's last token (mask_at = ctx - 1 = {ctx - 1}), " \
            f"got mask_at from {m.min()} to {m.max()} {at}"
    else:  # context on both sides of the mask
        assert (m >= ctx // 4).all() and (m < ctx - ctx // 4).all(), \
            f"with read='last' the [MASK] must leave >= ctx/4 tokens on each side: mask_at in " \
            f"[{ctx // 4}, {ctx - ctx // 4}), got {m.min()} to {m.max()} {at}"
    assert ((x == mg.MASK_ID).argmax(-1) == m).all(), f"mask_at does not say where the [MASK] is {at}"
    for c in range(N):
        word = ep["classes"][sy[c, 0]]
        for j in range(K + Q):  # the masked token is that class's word, the rest is the corpus verbatim
            p, a = pos[c, j], m[c, j]
            window = np.asarray(tokens[p - a:p - a + ctx]).astype(np.int64)
            assert window[a] == word, \
                f"classes[label] is not the word masked in that label's windows: label {sy[c, 0]} masks " \
                f"token {window[a]}, classes says {word}; classes[c] must be the word behind label c " \
                f"(invert the label permutation) {at}"
            assert (np.delete(x[c, j], a) == np.delete(window, a)).all(), \
                f"a window is not the corpus verbatim around its occurrence: it must be " \
                f"tokens[p - mask_at : p - mask_at + ctx] with only the occurrence masked {at}"


KEYS = [[1, 2, j] for j in range(40)]  # 40 episodes: what holds for one key may fail for the next


@pytest.mark.sample_episode
@pytest.mark.parametrize("read", ["mask", "last"])
def test_episode_invariants(corpus, read):
    tokens, index = corpus
    N, K, Q, ctx = 8, 3, 2, 24
    first_labels = []
    for key in KEYS:
        ep = mg.sample_episode(tokens, index, N, K, Q, ctx, key, read)
        check_episode(ep, tokens, index, N, K, Q, ctx, read, key)
        first_labels.append(ep["support_y"][0])
    assert len(set(first_labels)) > 1, \
        f"word 0 gets label {first_labels[0]} in all {len(KEYS)} episodes: the labels must be a fresh " \
        "random permutation per episode, so that a label carries no word identity"


@pytest.mark.sample_episode
def test_query_never_repeats_a_support_occurrence(corpus):
    """The overlapping sampler (support and query occurrences drawn separately) passes any single episode with
    some luck; over 60 episodes of a corpus whose words have few occurrences it cannot."""
    tokens, index = corpus
    N, K, Q = 8, 3, 3
    for j in range(60):
        ep = mg.sample_episode(tokens, index, N, K, Q, 16, [7, j])
        for c in range(N):
            s, q = set(ep["positions"][c, :K].tolist()), set(ep["positions"][c, K:].tolist())
            assert not s & q, \
                f"a query window repeats a support occurrence (episode key [7, {j}], word {c}: corpus " \
                f"position(s) {sorted(s & q)}): draw each word's K+Q occurrences in one draw without " \
                "replacement, then split them into support and query"


@pytest.mark.sample_episode
def test_episode_is_a_function_of_its_key(corpus):
    tokens, index = corpus
    a = mg.sample_episode(tokens, index, 8, 2, 2, 16, [1, 5, 0, 2])
    b = mg.sample_episode(tokens, index, 8, 2, 2, 16, [1, 5, 0, 2])
    c = mg.sample_episode(tokens, index, 8, 2, 2, 16, [1, 5, 1, 2])  # another rank / micro-step
    assert all(np.array_equal(a[k], b[k]) for k in a), \
        "the same key gave two different episodes: every random choice must come from " \
        "np.random.default_rng(key), nothing else (no global numpy or Python random state)"
    assert not np.array_equal(a["support_x"], c["support_x"]), "two different keys gave the same episode"


@pytest.mark.sample_episode
def test_too_few_words_is_a_clear_error(corpus):
    tokens, index = corpus
    try:
        mg.sample_episode(tokens, index, 10_000, 2, 2, 16, [0])
    except mg.UserError as e:
        assert "content words" in str(e), \
            f"the UserError must say how many content words have K+Q occurrences ('... content words " \
            f"...'), got: {e}"
    except Exception as e:  # noqa: BLE001
        pytest.fail(f"too few content words must raise maml_gpt.UserError, not {type(e).__name__}: {e}",
                    pytrace=False)
    else:
        pytest.fail("N = 10,000 classes on a corpus with far fewer content words must raise "
                    "maml_gpt.UserError ('... content words ...')", pytrace=False)


def test_head_architecture():
    for init, out in (("proto", None), ("learned", 32), ("vocab", 500)):
        head = mg.make_head(96, 32, dropout=0.1, init=init, vocab_size=500)
        linears = [m for m in head["body"] if isinstance(m, torch.nn.Linear)]
        assert [(l.in_features, l.out_features) for l in linears] == [(96, 128), (128, 128), (128, 128)]
        assert sum(isinstance(m, torch.nn.Dropout) and m.p == 0.1 for m in head["body"]) == 3
        # proto builds its last layer per episode
        assert (head["out"].out_features if "out" in head else None) == out


def body_by_hand(head, x):
    """The head's 3 hidden layers written out with plain matmuls (no dropout)."""
    lin = [m for m in head["body"] if isinstance(m, torch.nn.Linear)]
    for l in lin:
        x = torch.relu(x @ l.weight.T + l.bias)
    return x


@pytest.mark.episode_init
def test_proto_init_equals_the_formula():
    torch.manual_seed(0)
    head = mg.make_head(6, 3, hidden=5, dropout=0.0)
    feats, labels = torch.randn(6, 6), torch.tensor([2, 0, 1, 0, 2, 1])  # a hand-made 3-way 2-shot episode
    phi = mg.episode_init(head, feats, labels, None, "proto")
    z = body_by_hand(head, feats)
    mu = torch.stack([(z[1] + z[3]) / 2, (z[2] + z[5]) / 2, (z[0] + z[4]) / 2])  # class means, by hand
    raw = torch.stack([(feats[1] + feats[3]) / 2, (feats[2] + feats[5]) / 2, (feats[0] + feats[4]) / 2])
    check_close(phi["out.weight"], 2 * mu, "out.weight must be 2 mu, mu_c the mean over class c's support "
                "rows of the body's output (the layer-3 activations)", [
                    ("out.weight uses the class sums, not the class means (divide by the K examples of each "
                     "class)", 4 * mu), ("out.weight is mu, not 2 mu", mu),
                    ("the prototypes are means of the raw features, not of the body's output", 2 * raw)])
    check_close(phi["out.bias"], -(mu ** 2).sum(1), "out.bias must be -||mu_c||^2", [
        ("sign flip in the bias: it must be -||mu_c||^2, not +||mu_c||^2", (mu ** 2).sum(1)),
        ("out.bias uses the class sums, not the class means", -(4 * mu ** 2).sum(1))])
    # and the logits are nearest-prototype: -||z - mu_c||^2 up to a per-row constant
    logits = mg.head_logits(head, phi, feats)
    torch.testing.assert_close(logits - (z ** 2).sum(1, keepdim=True), -torch.cdist(z, mu) ** 2,
                               atol=1e-4, rtol=0)


@pytest.mark.episode_init
def test_proto_head_classifies_separated_features_before_any_step():
    torch.manual_seed(0)
    n, k, q, d = 8, 4, 4, 32
    centres = 10 * torch.randn(n, d)
    sy, qy = torch.arange(n).repeat_interleave(k), torch.arange(n).repeat_interleave(q)
    sf, qf = centres[sy] + 0.1 * torch.randn(n * k, d), centres[qy] + 0.1 * torch.randn(n * q, d)
    head = mg.make_head(d, n, dropout=0.0)
    phi = mg.episode_init(head, sf, sy, None, "proto")
    assert mg.accuracy(mg.head_logits(head, phi, qf), qy).item() == 1.0
    learned = mg.episode_init(mg.make_head(d, n, dropout=0.0, init="learned"), sf, sy, None, "learned")
    assert mg.accuracy(mg.head_logits(head, learned, qf), qy).item() < 0.5  # a random last layer is not


@pytest.mark.episode_init
def test_vocab_init_reads_the_class_word_rows():
    torch.manual_seed(0)
    head = mg.make_head(4, 3, hidden=5, dropout=0.0, init="vocab", vocab_size=20)
    classes = torch.tensor([7, 2, 11])
    phi = mg.episode_init(head, torch.randn(3, 4), torch.arange(3), classes, "vocab")
    torch.testing.assert_close(phi["out.weight"], head["out"].weight[[7, 2, 11]])
    torch.testing.assert_close(phi["out.bias"], head["out"].bias[[7, 2, 11]])


def head_left_alone(head, before, adapted):
    """Fail, naming the mistake, if the inner loop changed the head's own parameters (before: a state_dict
    copy taken before it ran)."""
    params = dict(head.named_parameters())
    if all(torch.equal(before[k], v) for k, v in head.state_dict().items()):
        return
    if any(k in params and v.data_ptr() == params[k].data_ptr() for k, v in adapted.items()):
        pytest.fail("the inner loop steps the head's own tensors in place (phi0's entries are the head's "
                    "parameters): every episode would start where the last one ended; step on fresh copies "
                    "of phi0's values", pytrace=False)
    if any(k in adapted and torch.equal(adapted[k].detach(), p.detach()) for k, p in params.items()):
        pytest.fail("the inner loop writes phi_T back into the head's parameters: the next episode would "
                    "start from this one's adapted weights; return phi_T, leave the head as it is",
                    pytrace=False)
    pytest.fail("the inner loop changed the head's own parameters: step on copies (phi0's values), never in "
                "place", pytrace=False)


@pytest.mark.inner_loop
def test_inner_loop_is_plain_sgd_and_keeps_head():
    torch.manual_seed(0)
    head = mg.make_head(16, 4, dropout=0.0, init="learned")
    before = {k: v.clone() for k, v in head.state_dict().items()}
    feats, labels = torch.randn(12, 16), torch.arange(4).repeat(3)
    phi0 = mg.episode_init(head, feats, labels, None, "learned")
    start = {k: v.detach().clone() for k, v in phi0.items()}
    adapted = mg.inner_loop(head, phi0, feats, labels, steps=10, lr=0.1)
    head_left_alone(head, before, adapted)
    # hand-written SGD, w <- w - lr * dL/dw with the loss written as relu matmuls, not through the head
    # module; path[n] = the weights after n steps (9 and 11: the off-by-one loops)
    w, path = start, [start]
    lin = [k for k in w if k.endswith(".weight") and k.startswith("body.")]
    for _ in range(11):
        w = {k: v.clone().requires_grad_() for k, v in w.items()}
        x = feats
        for k in lin:
            x = torch.relu(x @ w[k].T + w[k[:-6] + "bias"])
        loss = F.cross_entropy(x @ w["out.weight"].T + w["out.bias"], labels)
        g = torch.autograd.grad(loss, list(w.values()))
        w = {k: (v - 0.1 * gi).detach() for (k, v), gi in zip(w.items(), g)}
        path.append(w)
    loss0 = F.cross_entropy(mg.head_logits(head, phi0, feats), labels)
    loss_T = F.cross_entropy(mg.head_logits(head, adapted, feats), labels)
    if loss_T > loss0:
        pytest.fail(f"gradient ascent: the support loss went up from {loss0:.3f} to {loss_T:.3f}; a step is "
                    "w <- w - lr * dL/dw", pytrace=False)
    for k in start:
        check_close(adapted[k].detach(), path[10][k], f"{k} after 10 steps must be plain SGD on the support "
                    "loss, w <- w - lr * dL/dw", [("the inner loop took no step: phi0 came back unchanged",
                                                   path[0][k])]
                    + [(f"the inner loop took {n} steps, not 10 (off by one)", path[n][k]) for n in (9, 11)],
                    atol=1e-5, rtol=1e-4)
    assert loss_T < loss0 - 0.05, "10 SGD steps at lr 0.1 must lower the support loss"
    assert all(p.grad is None for p in head.parameters()), \
        "the inner loop wrote head.grad (a .backward() inside it?): use torch.autograd.grad, so that only " \
        "the meta-gradient ever reaches head.grad"


def sgd_by_hand(head, w, sf, sy, steps, lr):
    """`steps` explicit SGD steps on plain tensors, no graph between them: {name: tensor} -> {name:
    tensor}."""
    for _ in range(steps):
        w = {k: v.detach().requires_grad_() for k, v in w.items()}
        g = torch.autograd.grad(F.cross_entropy(mg.head_logits(head, w, sf), sy), list(w.values()))
        w = {k: (v - lr * gi).detach() for (k, v), gi in zip(w.items(), g)}
    return w


def second_order_by_hand(head, phi0, sf, sy, qf, qy, steps, lr):
    """d L_query(phi_T) / d phi_0 with the graph through every step kept (full MAML, Hessians included)."""
    w = {k: v.detach().clone().requires_grad_() for k, v in phi0.items()}
    start, fast = w, dict(w)
    for _ in range(steps):
        g = torch.autograd.grad(F.cross_entropy(mg.head_logits(head, fast, sf), sy), list(fast.values()),
                                create_graph=True)
        fast = {k: v - lr * gi for (k, v), gi in zip(fast.items(), g)}
    loss = F.cross_entropy(mg.head_logits(head, fast, qf), qy)
    return dict(zip(start, torch.autograd.grad(loss, list(start.values()))))


@pytest.mark.inner_loop
def test_inner_loop_is_first_order():
    """FOMAML: the meta-gradient is the query gradient AT the adapted weights, passed straight to phi_0. A
    second-order loop (create_graph=True, no detach between steps) adds the support Hessian terms, and does
    not even change the adapted values, so only the gradient can tell."""
    torch.manual_seed(3)
    head = mg.make_head(12, 3, hidden=16, dropout=0.0, init="learned")
    sf, sy = torch.randn(9, 12), torch.arange(3).repeat(3)
    qf, qy = torch.randn(6, 12), torch.arange(3).repeat(2)
    phi0 = mg.episode_init(head, sf, sy, None, "learned")  # phi_0 is the head's own parameters
    adapted = mg.inner_loop(head, phi0, sf, sy, steps=4, lr=0.5)
    no_path = ("the adapted weights carry no gradient path to phi_0: the query loss cannot train the head's "
               "init")
    query_loss = F.cross_entropy(mg.head_logits(head, adapted, qf), qy)
    assert query_loss.requires_grad, no_path
    meta_backward(query_loss)
    w = sgd_by_hand(head, {k: v.detach() for k, v in phi0.items()}, sf, sy, 4, 0.5)
    w = {k: v.requires_grad_() for k, v in w.items()}
    first = dict(zip(w, torch.autograd.grad(F.cross_entropy(mg.head_logits(head, w, qf), qy),
                                            list(w.values()))))
    second = second_order_by_hand(head, phi0, sf, sy, qf, qy, 4, 0.5)
    params = dict(head.named_parameters())
    assert all(p.grad is not None for p in params.values()), no_path
    got = torch.cat([params[k].grad.flatten() for k in w])
    want, hessian = (torch.cat([d[k].flatten() for k in w]) for d in (first, second))
    assert (want - hessian).abs().max() > 1e-3  # the episode is one where the two orders differ
    if torch.allclose(got, hessian, atol=1e-5, rtol=1e-4):
        pytest.fail("the inner loop is second order: head.grad depends on the support Hessian (the steps "
                    "are linked by a graph: create_graph=True or no detach between steps); first-order MAML "
                    "hands the query gradient at phi_T straight to phi_0", pytrace=False)
    check_close(got, want, "head.grad must be the first-order meta-gradient: d L_query / d phi_T at the "
                "adapted weights, passed unchanged to phi_0", atol=1e-5, rtol=1e-4)


def meta_backward(query_loss):
    """query_loss.backward(); autograd's complaint about an in-place change is put in the student's terms."""
    try:
        query_loss.backward()
    except RuntimeError as e:
        if "inplace" not in str(e):
            raise
        pytest.fail("the inner loop changed a tensor in place that the meta-gradient needs (phi0's entries: "
                    "the head's parameters, the prototypes): step on fresh copies, and write phi_T only into "
                    f"the dict it returns (autograd: {str(e).splitlines()[0][:120]})", pytrace=False)


def straight_through(phi0, adapt):
    """Fail, naming the mistake, unless d phi_T / d phi_0 is the identity (the FOMAML path): adapt(phi) runs
    the inner loop from phi, here from independent leaf copies of phi0's entries."""
    leaves = {k: v.detach().clone().requires_grad_() for k, v in phi0.items()}
    adapted = adapt(leaves)
    if not all(adapted[k].requires_grad for k in leaves):
        pytest.fail("the adapted weights carry no gradient path to phi_0: the query loss cannot train the "
                    "head's init", pytrace=False)
    v = [torch.randn_like(p) for p in leaves.values()]
    got = torch.autograd.grad([adapted[k] for k in leaves], list(leaves.values()), v, allow_unused=True)
    if any(g is None or not torch.allclose(g, vi, atol=1e-6) for g, vi in zip(got, v)):
        pytest.fail("the inner loop is second order: phi_T's gradient path to phi_0 runs through the steps "
                    "(d phi_T / d phi_0 is not the identity: create_graph=True, or no detach between "
                    "steps); first-order MAML returns phi_0 + (phi_T - phi_0).detach()", pytrace=False)


def logits_by_hand(w, x):
    """The head written out: 3 relu matmuls, then the last layer: W, b, or prototypes P as -||z - P_c||^2."""
    for i in (0, 3, 6):
        x = torch.relu(x @ w[f"body.{i}.weight"].T + w[f"body.{i}.bias"])
    if "out.proto" in w:
        return -torch.cdist(x, w["out.proto"]) ** 2
    return x @ w["out.weight"].T + w["out.bias"]


@pytest.mark.inner_loop
def test_layerwise_inner_loop_steps_each_group_by_its_lr():
    torch.manual_seed(0)
    head = mg.make_head(16, 4, dropout=0.0)
    feats, labels = torch.randn(12, 16), torch.arange(4).repeat(3)
    phi0 = mg.episode_init(head, feats, labels, None, "proto", tied=True)
    assert set(phi0) == {f"body.{i}.{p}" for i in (0, 3, 6) for p in ("weight", "bias")} | {"out.proto"}
    adapted = mg.inner_loop(head, phi0, feats, labels, steps=4, lr=dict(body=0.01, out=2.0))

    def by_hand(body, out):  # 4 steps w <- w - lr(group) * dL/dw, with the loss written as -||z - P_c||^2
        w = {k: v.detach().clone() for k, v in phi0.items()}
        for _ in range(4):
            w = {k: v.requires_grad_() for k, v in w.items()}
            g = torch.autograd.grad(F.cross_entropy(logits_by_hand(w, feats), labels), list(w.values()))
            w = {k: (v - (out if k.startswith("out") else body) * gi).detach()
                 for (k, v), gi in zip(w.items(), g)}
        return w

    w = by_hand(0.01, 2.0)
    wrong = [("one learning rate for both groups: every layer stepped by lr['body']; layers 1-3 take "
              "lr['body'], the last layer lr['out']", by_hand(0.01, 0.01)),
             ("one learning rate for both groups: every layer stepped by lr['out']; layers 1-3 take "
              "lr['body'], the last layer lr['out']", by_hand(2.0, 2.0)),
             ("the groups' learning rates are swapped: layers 1-3 take lr['body'], the last layer lr['out']",
              by_hand(2.0, 0.01))]
    for k in w:
        check_close(adapted[k].detach(), w[k], f"{k} after 4 steps must be SGD at its group's step (body "
                    "0.01, out 2.0)", [(what, bad[k]) for what, bad in wrong
                                       if not close(bad[k], w[k], 1e-5, 1e-4)],
                    atol=1e-5, rtol=1e-4)
    loss0 = F.cross_entropy(mg.head_logits(head, phi0, feats), labels)
    assert F.cross_entropy(mg.head_logits(head, adapted, feats), labels) < loss0 - 0.05
    # ANIL: a zero body step, or no body step at all (a missing group means 0), leaves layers 1-3 as they were
    anil = mg.inner_loop(head, phi0, feats, labels, steps=4, lr=dict(body=0.0, out=2.0))
    assert all(torch.equal(anil[k].detach(), phi0[k].detach()) for k in phi0 if k.startswith("body")), \
        "a group whose learning rate is 0 must stay exactly as it is (ANIL: lr={'body': 0, 'out': ...})"
    assert not torch.equal(anil["out.proto"].detach(), phi0["out.proto"].detach())
    try:
        only_out = mg.inner_loop(head, phi0, feats, labels, steps=4, lr=dict(out=2.0))
    except KeyError as e:
        pytest.fail(f"a learning-rate group missing from lr must mean 0, that group staying as it is (got "
                    f"KeyError {e} for lr={{'out': 2.0}})", pytrace=False)
    assert all(torch.equal(only_out[k].detach(), anil[k].detach()) for k in phi0), \
        "a learning-rate group missing from lr must mean 0: lr={'out': 2.0} is lr={'body': 0, 'out': 2.0}"


@pytest.mark.episode_init
def test_tied_prototypes_give_the_untied_logits():
    """out.proto = the class means, and 2 z.P - ||P||^2 is the untied init's W = 2 mu, b = -||mu||^2."""
    torch.manual_seed(0)
    head = mg.make_head(6, 3, hidden=5, dropout=0.0)
    feats, labels = torch.randn(6, 6), torch.tensor([2, 0, 1, 0, 2, 1])
    untied = mg.episode_init(head, feats, labels, None, "proto")
    tied = mg.episode_init(head, feats, labels, None, "proto", tied=True)
    torch.testing.assert_close(tied["out.proto"], untied["out.weight"] / 2)
    torch.testing.assert_close(mg.head_logits(head, tied, feats), mg.head_logits(head, untied, feats))


def steps_by_hand(w, sf, sy, steps, lr_of, backtrack=False, undo=True, halve=True, judge_last=True):
    """`steps` explicit SGD steps of logits_by_hand, w <- w - size * lr_of(name) * dL/dw. backtrack: a step
    whose loss is above the best so far is thrown away (w stays) and size halves, written as plain Python
    branches. Returns the weights and how many steps were thrown away. undo, halve, judge_last=False: the
    backtracking mistakes (a bad step kept, the size never halved, the last step never judged)."""
    loss = lambda w: F.cross_entropy(logits_by_hand(w, sf), sy)
    w, size, undone = {k: v.detach() for k, v in w.items()}, 1.0, 0
    for t in range(steps):
        w = {k: v.requires_grad_() for k, v in w.items()}
        best = loss(w)
        g = torch.autograd.grad(best, list(w.values()))
        trial = {k: (v - size * lr_of(k) * gi).detach() for (k, v), gi in zip(w.items(), g)}
        if backtrack and (judge_last or t < steps - 1) and loss(trial) > best:
            size, undone = size / 2 if halve else size, undone + 1
            w = w if undo else trial
        else:
            w = trial
    return {k: v.detach() for k, v in w.items()}, undone


@pytest.mark.inner_loop
def test_backtracking_never_raises_the_support_loss():
    """--inner_loop layerwise's backtracking (torch.where on the device) against the same rule written with
    Python branches, at a prototype step so large that most steps overshoot (the last one too)."""
    torch.manual_seed(0)
    head = mg.make_head(16, 4, dropout=0.0)
    feats, labels = torch.randn(12, 16), torch.arange(4).repeat(3)
    phi0 = mg.episode_init(head, feats, labels, None, "proto", tied=True)
    lrs = dict(body=0.01, out=30.0)
    plain = mg.inner_loop(head, phi0, feats, labels, steps=5, lr=lrs)
    adapted = mg.inner_loop(head, phi0, feats, labels, steps=5, lr=lrs, backtrack=True)
    lr_of = lambda k: lrs[k.split(".")[0]]  # noqa: E731
    by_hand = lambda **rule: steps_by_hand(phi0, feats, labels, 5, lr_of, True, **rule)  # noqa: E731
    w, undone = by_hand()
    assert 0 < undone < 5  # the episode exercises both branches, and its last step is undone
    wrong = [("backtracking keeps a step that raised the support loss (it halves the size but does not undo "
              "the step)", by_hand(undo=False)[0]),
             ("backtracking never halves the step size: an undone step is tried again, identical",
              by_hand(halve=False)[0]),
             ("backtracking does not judge the last step: one that raises the support loss must be undone "
              "too", by_hand(judge_last=False)[0]),
             ("no backtracking: with backtrack=True a step that raises the support loss is undone",
              steps_by_hand(phi0, feats, labels, 5, lr_of)[0])]
    for k in w:
        check_close(adapted[k].detach(), w[k], f"{k}: backtracking must undo a step that raises the support "
                    "loss and halve every later step", [(what, bad[k]) for what, bad in wrong
                                                        if not close(bad[k], w[k], 1e-5, 1e-4)],
                    atol=1e-5, rtol=1e-4)
    loss = lambda phi: F.cross_entropy(mg.head_logits(head, phi, feats), labels)
    assert loss(plain) > 100 * loss(phi0)  # without it, this step size blows the support loss up
    assert loss(adapted) < loss(phi0)


@pytest.mark.inner_loop
@pytest.mark.episode_init
@pytest.mark.parametrize("init", ["learned", "proto", "proto-tied", "proto-tied-backtrack"])
def test_fomaml_gradient_equals_manual_computation(init):
    """head.grad after the query loss = d L_query / d phi_T, pulled back through phi_0 = init(head): for
    "learned" the identity; for "proto" also through the prototypes W = 2 mu, b = -||mu||^2 into layers
    1-3; for "proto-tied" (--inner_loop layerwise: per-layer step sizes) through P = mu; with backtracking
    (at a step large enough that some steps are undone) phi_T is the backtracked one."""
    torch.manual_seed(0)
    tied, backtrack = init.startswith("proto-tied"), init.endswith("backtrack")
    head = mg.make_head(16, 4, dropout=0.0, init=init.split("-")[0])
    sf, sy = torch.randn(8, 16), torch.arange(4).repeat(2)
    qf, qy = torch.randn(6, 16), torch.tensor([0, 1, 2, 3, 0, 1])
    phi0 = mg.episode_init(head, sf, sy, None, init.split("-")[0], tied)
    lrs = dict(body=0.05, out=300.0 if backtrack else 3.0) if tied else 0.5
    adapted = mg.inner_loop(head, phi0, sf, sy, steps=5, lr=lrs, backtrack=backtrack)
    straight_through(phi0, lambda phi: mg.inner_loop(head, phi, sf, sy, steps=5, lr=lrs, backtrack=backtrack))
    meta_backward(F.cross_entropy(mg.head_logits(head, adapted, qf), qy))
    # manual: 5 explicit steps from phi_0's values, then the query gradient g_T AT the adapted weights
    w, undone = steps_by_hand(phi0, sf, sy, 5, lambda k: lrs[k.split(".")[0]] if tied else lrs, backtrack)
    assert (undone > 0) == backtrack
    w = {k: v.requires_grad_() for k, v in w.items()}
    g_T = dict(zip(w, torch.autograd.grad(F.cross_entropy(logits_by_hand(w, qf), qy), list(w.values()))))
    for k in w:
        torch.testing.assert_close(adapted[k].detach(), w[k].detach(), atol=1e-5, rtol=1e-4)
    params = dict(head.named_parameters())
    if init == "learned":  # phi_0 is the head itself: head.grad = g_T exactly
        for k, p in params.items():
            torch.testing.assert_close(p.grad, g_T[k])
        return
    # proto: body.grad = g_T[body] + d/d body of <g_T[out.weight], 2 mu(body)>
    # + <g_T[out.bias], -||mu(body)||^2> (tied: + <g_T[out.proto], mu(body)>); mu by hand from relu matmuls
    body = {k: p.detach().clone().requires_grad_() for k, p in params.items()}
    lin = [k for k in body if k.endswith(".weight")]
    x = sf
    for k in lin:
        x = torch.relu(x @ body[k].T + body[k[:-6] + "bias"])
    mu = torch.stack([x[sy == c].mean(0) for c in range(4)])
    if tied:
        through_protos = (g_T["out.proto"] * mu).sum()
    else:
        through_protos = (g_T["out.weight"] * 2 * mu).sum() + (g_T["out.bias"] * -(mu ** 2).sum(1)).sum()
    g_protos = dict(zip(body, torch.autograd.grad(through_protos, list(body.values()))))
    for k, p in params.items():
        assert g_protos[k].abs().sum() > 0  # the prototype path really carries gradient
        torch.testing.assert_close(p.grad, g_T[k] + g_protos[k], atol=1e-5, rtol=1e-4)


@pytest.mark.meta_micro_step
def test_meta_step_sends_the_scaled_query_gradient_to_backbone_and_head(corpus):
    """Gradient routing with a micro-step scale: backbone.grad and head.grad = scale x d L_query, where
    L_query is the loss at the adapted head on query features, and the support features carry no graph."""
    tokens, index = corpus
    torch.manual_seed(0)
    args = mg.parse_args(SMALL)
    model = mg.Decoder(mg.ModelConfig(d_model=24, n_layers=2, max_seq_len=32))
    head = mg.make_head(24, 8, dropout=0.0)
    ep = mg.episode_tensors(tokens, index, args, [0, 0, 0, 3], "cpu")
    stats = mg.meta_micro_step(model, head, ep, args, 0.25, mg.nullcontext())
    got = {n: p.grad.clone() for n, p in [*model.named_parameters(), *head.named_parameters()]
           if p.grad is not None}
    model.zero_grad(set_to_none=True)
    head.zero_grad(set_to_none=True)
    with torch.no_grad():
        hs = model(ep["support_x"], return_hidden=True)[:, -1]  # read at the [MASK], the window's last token
    phi0 = mg.episode_init(head, hs, ep["support_y"], None, "proto", tied=True)  # the default inner loop
    adapted = mg.inner_loop(head, phi0, hs, ep["support_y"], args.inner_steps,
                            dict(body=args.inner_lr, out=args.inner_lr_out), backtrack=True)
    loss = F.cross_entropy(mg.head_logits(head, adapted, model(ep["query_x"], return_hidden=True)[:, -1]),
                           ep["query_y"])
    (0.25 * loss).backward()
    want = {n: p.grad for n, p in [*model.named_parameters(), *head.named_parameters()] if p.grad is not None}
    assert got.keys() == want.keys() and any(n.startswith("body.") for n in want)
    assert "de_embedding_proj.weight" not in got  # the LM head is unused on meta steps
    assert got["embedding_proj.weight"][mg.MASK_ID].abs().sum() > 0  # the [MASK] embedding learns here
    assert (ep["query_x"][:, -1] == mg.MASK_ID).all()  # so [:, -1] above is the [MASK] position
    if all(close(got[n], 4 * want[n], 1e-6, 1e-4) for n in want):
        pytest.fail("the micro-step scale is ignored: back-propagate loss * scale (micro-steps and ranks "
                    "then sum to a mean)", pytrace=False)
    backbone = [n for n in want if not n.startswith(("body.", "out."))]
    if all(close(got[n], want[n], 1e-6, 1e-4) for n in want if n not in backbone) and \
            not all(close(got[n], want[n], 1e-6, 1e-4) for n in backbone):
        pytest.fail("the backbone gets gradient from the support set: compute the support features under "
                    "torch.no_grad() (only the query loss trains the backbone)", pytrace=False)
    for n in want:
        check_close(got[n], want[n], f"{n}.grad must be scale x d L_query / d {n}, the query loss at the "
                    "adapted head on query features with a graph, support features without", atol=1e-6,
                    rtol=1e-4)
    assert stats["loss_query"].item() == pytest.approx(loss.item())


def test_branch_decision_is_a_function_of_seed_and_step():
    a = [mg.is_meta_step(3, s, 0.5) for s in range(400)]
    assert a == [mg.is_meta_step(3, s, 0.5) for s in range(400)]
    assert 150 < sum(a) < 250
    assert not any(mg.is_meta_step(3, s, 0.0) for s in range(400))
    assert all(mg.is_meta_step(3, s, 1.0) for s in range(400))


def test_unused_parameters_are_untouched_on_the_other_branch(small_args):
    """The real loop, step by step (a resume after each): an AR step leaves the MLP head as it was, a meta
    step the LM head, even after an AR step gave AdamW moments for it."""
    seed = next(s for s in range(1000)
                if [mg.is_meta_step(s, t, 0.5) for t in range(3)] == [False, True, False])
    argv = small_args + ["--seed", str(seed)]
    r = mg.setup(mg.parse_args(argv))  # the initial weights, as the run builds them
    states = [dict(model=r.orig_model.state_dict(), head=r.head.state_dict())]
    for steps in (1, 2, 3):
        mg.main(argv + ["--max_steps", str(steps)] + (["--resume"] if steps > 1 else []))
        states.append(torch.load(os.path.join(small_args[small_args.index("--out_dir") + 1], "ckpt.pt")))

    def same(a, b, part, prefix=""):
        return all(torch.equal(a[part][k], b[part][k]) for k in a[part] if k.startswith(prefix))

    assert same(states[0], states[1], "head") and not same(states[0], states[1], "model")  # step 0: AR
    assert same(states[1], states[2], "model", "de_embedding_proj") and not same(states[1], states[2], "head")
    assert same(states[2], states[3], "head") and not same(states[2], states[3], "model")  # step 2: AR

