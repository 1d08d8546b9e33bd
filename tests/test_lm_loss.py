"""The fused, chunked LM-head loss against F.cross_entropy on full logits: loss and both gradients."""
import pytest
import torch
import torch.nn.functional as F

import maml_gpt as mg
from conftest import check_close

N, D, V = 111, 24, 1000  # 111 rows: 5 and 64 do not divide it; 111 and 4096 give one chunk


def problem(seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, D, generator=g).requires_grad_()
    w = (torch.randn(V, D, generator=g) * 0.5).requires_grad_()
    t = torch.randint(0, V, (N,), generator=g)
    t[[0, 5, 50, 110]] = -100  # ignored rows: no loss, zero gradient
    return h, w, t


def reference(h, w, t):
    loss = F.cross_entropy(h @ w.T, t, ignore_index=-100)
    return (loss, *torch.autograd.grad(loss, (h, w)))


@pytest.mark.lm_loss
@pytest.mark.parametrize("chunk", [5, 64, 111, 4096])
def test_loss_and_both_gradients_equal_full_logits(chunk):
    h, w, t = problem()
    ref_loss, ref_gh, ref_gw = reference(h, w, t)
    loss = mg.linear_cross_entropy(h, w, t, chunk_rows=chunk)
    (3.0 * loss).backward()  # the backward scales the stored gradients by the incoming one
    z = (h @ w.T).detach().double()
    kept = t != -100
    lse, z_t = z.logsumexp(-1), z.gather(1, t.clamp(min=0)[:, None]).squeeze(1)
    no_log = (z.exp().sum(-1) / z.amax(-1).exp() - (z_t - z.amax(-1)))[kept].mean()  # exp-sum, no log
    check_close(loss, ref_loss, f"the loss must be the mean over counted rows of log(sum_j exp z_j) - "
                f"z_target (chunks of {chunk} rows)", [
                    ("the loss forgets the log of the sum of exponentials (log-sum-exp - z_target)", no_log),
                    ("ignored rows (target -100) are counted in the loss", (lse - z_t).mean()),
                    ("the loss is a sum over rows, not their mean", (lse - z_t)[kept].sum())],
                atol=2e-6, rtol=0)
    softmax_only = torch.where(kept[:, None], z.softmax(-1), 0.0) / kept.sum()
    check_close(h.grad / 3, ref_gh, f"d loss / d h must be (softmax - one_hot(target)) @ W / rows counted "
                f"(chunks of {chunk} rows)", [
                    ("the gradient is softmax only: the one-hot of the target is not subtracted",
                     softmax_only @ w.detach().double())], atol=1e-7, rtol=0)
    check_close(w.grad / 3, ref_gw, "d loss / d W must be (softmax - one_hot(target))^T @ h / rows counted",
                [("the gradient is softmax only: the one-hot of the target is not subtracted",
                  softmax_only.T @ h.detach().double())], atol=1e-7, rtol=0)
    assert h.grad[[0, 5, 50, 110]].abs().max() == 0, "ignored rows (target -100) must get zero gradient"


@pytest.mark.lm_loss
def test_only_requested_gradients_and_none_under_no_grad(monkeypatch):
    h, w, t = problem(1)
    asked = []
    inner = mg._chunked_linear_ce
    monkeypatch.setattr(mg, "_chunked_linear_ce", lambda *a: asked.append(a[-2:]) or inner(*a))
    with torch.no_grad():  # evaluation: the loss only, no gradient work
        loss = mg.linear_cross_entropy(h, w, t, chunk_rows=16)
    torch.testing.assert_close(loss, reference(h, w, t)[0], rtol=0, atol=2e-6)
    assert loss.grad_fn is None and asked[-1] == (False, False)
    frozen = w.detach()  # a frozen LM head: no weight gradient is computed
    mg.linear_cross_entropy(h, frozen, t, chunk_rows=16).backward()
    assert asked[-1] == (True, False) and h.grad is not None


@pytest.mark.lm_loss
def test_bf16_autocast_is_close_and_returns_fp32_gradients():
    h, w, t = problem(2)
    ref_loss, ref_gh, ref_gw = reference(h, w, t)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = mg.linear_cross_entropy(h, w, t, chunk_rows=32)
    loss.backward()
    assert loss.dtype == h.grad.dtype == w.grad.dtype == torch.float32
    torch.testing.assert_close(loss, ref_loss, rtol=1e-2, atol=0)  # bf16 matmuls, fp32 softmax and sums
    for got, ref in ((h.grad, ref_gh), (w.grad, ref_gw)):
        assert (got - ref).norm() / ref.norm() < 2e-2


@pytest.mark.lm_loss
def test_decoder_loss_and_every_gradient_equal_the_plain_path():
    torch.manual_seed(0)
    m = mg.Decoder(mg.ModelConfig(d_model=24, n_layers=2, max_seq_len=32))
    x = torch.randint(0, 50257, (3, 32))
    y = torch.randint(0, 50257, (3, 32))
    logits, _ = m(x)
    F.cross_entropy(logits.flatten(0, 1), y.flatten()).backward()
    plain = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad(set_to_none=True)
    m(x, y)[1].backward()
    for n, p in m.named_parameters():
        torch.testing.assert_close(p.grad, plain[n], rtol=1e-4, atol=1e-7, msg=n)


def test_forward_and_fused_loss_compile_as_one_graph():
    """--compile: the AR branch's forward + loss is a single graph (fullgraph=True raises on any graph break),
    and its gradients equal eager mode's. aot_eager traces forward and backward without generating code
    (fast)."""
    torch.manual_seed(0)
    m = mg.Decoder(mg.ModelConfig(d_model=24, n_layers=2, max_seq_len=16))
    x, y = torch.randint(0, 50257, (2, 16)), torch.randint(0, 50257, (2, 16))
    m(x, y)[1].backward()
    eager = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad(set_to_none=True)
    torch.compile(m, fullgraph=True, backend="aot_eager")(x, y)[1].backward()
    for n, p in m.named_parameters():
        torch.testing.assert_close(p.grad, eager[n], rtol=1e-5, atol=1e-8, msg=n)
