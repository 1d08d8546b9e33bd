"""The GPU hot path, checked on the CPU: host syncs per micro-step, one spectrum per matrix in the probe and
its share over ranks, a stop that saves first, torch.compile with the default backend, and bench.py's
arithmetic. On CUDA, tests/test_gpu.py checks the same path on the device."""
import json
import os

import numpy as np
import pytest
import torch

import bench
import maml_gpt as mg
from conftest import run_cli as run

@pytest.fixture(scope="module")
def small_run(data_dir, tmp_path_factory):
    from conftest import SMALL
    args = mg.parse_args(SMALL + ["--data_dir", data_dir, "--out_dir", str(tmp_path_factory.mktemp("r"))])
    return args, mg.setup(args, for_bench=True)


def test_micro_steps_never_wait_on_the_host(small_run):
    """What the loop runs per micro-step (the copy to the device, the step, the logbook's sums) makes no host
    sync in either branch."""
    args, r = small_run
    logbook = mg.Logbook(r.device)

    def meta():
        ep = mg.episode_tensors(r.tokens, r.index, args, mg.stream_key(args.seed, 1, "episode", 0), r.device)
        stats = mg.meta_micro_step(r.model, r.head, ep, args, 1.0, r.amp)
        logbook.add(stats, loss_mixed=stats["loss_query"])

    def ar():
        starts = mg.batch_indices(args.seed, 1, len(r.tokens), args.seq_len, args.batch_size)
        x, y = mg.get_batch(r.tokens, starts, args.seq_len, r.device)
        stats = mg.ar_micro_step(r.model, x, y, 1.0, r.amp)
        logbook.add(stats, loss_mixed=stats["loss_ar"])

    for step in (ar, meta):
        with bench.count_host_syncs() as seen:
            step()
        assert seen == {}
    with bench.count_host_syncs() as seen:  # the counter sees what it claims to see
        torch.ones(2).to("cpu")
        bool(torch.ones(()))
        torch.ones(3, dtype=torch.long).tolist()
        torch.arange(3)[torch.arange(3) > 0]  # a bool mask: the output's size depends on values
        torch.ones(2).to(torch.float64)  # a dtype change, no copy between host and device
        torch.ones(2).to("cpu", non_blocking=True)  # from and to the CPU: no pinned memory needed
    assert sum(seen.values()) == 4
    # episode_init takes N from `classes` without a sync; read from the labels it is the same N, and a sync
    feats, labels = torch.randn(12, 8), torch.tensor([2, 0, 1, 0, 2, 1] * 2)
    head = mg.make_head(8, 3, hidden=5)
    with bench.count_host_syncs() as seen:
        by_shape = mg.episode_init(head, feats, labels, torch.tensor([5, 6, 7]), "proto")
    assert seen == {}
    with bench.count_host_syncs() as seen:
        by_labels = mg.episode_init(head, feats, labels, None, "proto")
    assert sum(seen.values()) == 1
    assert all(torch.equal(by_shape[k], by_labels[k]) for k in by_shape)
    # the one copy per episode or batch returns every array whole, in place, as int64
    arrays = [np.arange(6, dtype=np.uint16).reshape(2, 3), np.array([7, 8]), np.zeros((0, 4), np.int64)]
    for a, t in zip(arrays, mg.to_device(arrays, r.device)):
        assert t.dtype == torch.int64 and t.shape == a.shape and (t.numpy() == a).all()


@pytest.mark.inner_loop
def test_the_inner_loop_never_waits_on_the_host():
    """inner_loop as meta_micro_step calls it (tied prototypes, two step sizes, backtracking) and as plain
    SGD: no host sync, so a GPU never idles while Python decides whether to undo a step."""
    torch.manual_seed(0)
    feats, labels = torch.randn(24, 16), torch.arange(6).repeat(4)
    head = mg.make_head(16, 6, hidden=8)
    for tied, lr in ((True, dict(body=0.01, out=30.0)), (False, 0.01)):
        phi0 = mg.episode_init(head, feats, labels, torch.arange(6), "proto", tied=tied)
        with bench.count_host_syncs() as seen:
            mg.inner_loop(head, phi0, feats, labels, 4, lr, backtrack=tied)
        assert not seen, (f"the inner loop waits on the host: {dict(seen)} (a Python `if`, bool(), float() "
                          "or .item() on a tensor); choose with torch.where, so the device never waits")


@pytest.mark.inner_loop
def test_an_inner_step_costs_the_same_few_ops_whatever_the_head_depth():
    """The inner loop updates (and backtracks) all of the head's weights as one vector: one more inner step
    adds the forward and backward of each layer plus a fixed handful of operations, not a few per weight
    tensor. So backtracking's extra cost per step is the same for a 2- and a 4-layer head."""
    torch.manual_seed(0)
    feats, labels = torch.randn(24, 16), torch.arange(6).repeat(4)
    per_step = {}
    for layers in (2, 4):
        head = mg.make_head(16, 6, hidden=8, n_layers=layers)
        for backtrack in (False, True):
            def ops(steps):
                phi0 = mg.episode_init(head, feats, labels, torch.arange(6), "proto", tied=True)
                return bench.launched_ops(lambda: mg.inner_loop(head, phi0, feats, labels, steps,
                                                                dict(body=0.01, out=1.0), backtrack))[1]
            per_step[layers, backtrack] = ops(3) - ops(2)
    extra = {layers: per_step[layers, True] - per_step[layers, False] for layers in (2, 4)}
    assert per_step[4, False] > per_step[2, False]  # deeper: more layers to run forward and backward
    assert extra[2] == extra[4] and 0 < extra[2] <= 6, \
        (f"backtracking costs {extra[2]} ops per inner step with a 2-layer head and {extra[4]} with a "
         "4-layer one: keep the moving weights in ONE flat vector (torch.cat), so that a step and its undo "
         "are a few ops on it (at most 6 more per step), not a few per weight tensor, and judge a step with "
         "the loss the next step computes anyway (one more forward after the last), not a forward of its own")


def probe_model():
    torch.manual_seed(0)
    m = mg.Decoder(mg.ModelConfig(d_model=24, n_layers=2, max_seq_len=16))
    x = torch.randint(0, 50257, (2, 16))
    return m, x, torch.roll(x, -1, 1)


def test_probe_takes_one_spectrum_per_distinct_matrix(monkeypatch):
    """Weights once each (pico-maml's attention-wide metrics, logged as ref/..., read every q, k, v and o
    weight, v and o among them), each gradient once: PER and ER share it."""
    m, x, y = probe_model()
    modules = ["attention.v_proj", "attention.o_proj", "swiglu.w_2"]
    calls, svdvals = [], torch.linalg.svdvals
    monkeypatch.setattr(torch.linalg, "svdvals", lambda W: calls.append(W.shape) or svdvals(W))
    out = mg.learning_dynamics(m, x, y, modules, mg.nullcontext())
    attn = [n for n, _ in m.named_parameters() if ".attention." in n]  # q, k, v, o of every layer
    names = {f"layers.{i}.{mod}.weight" for i in range(2) for mod in modules}
    distinct = len(names | set(attn)) + len(names) + len(attn)  # weights, loss gradients, q/k/v/o gradients
    assert len(calls) == distinct == 10 + 6 + 8
    assert out["per_weight/layers.0.swiglu.w_2"] == pytest.approx(out["er_weight/layers.0.swiglu.w_2"] / 24)


def test_probe_shared_over_two_ranks_equals_one_rank(monkeypatch):
    """With world 2 each rank takes half the spectra; the summed shares give exactly the world-1 result."""
    m, x, y = probe_model()
    modules = ["attention.v_proj", "swiglu.w_2"]
    alone = mg.learning_dynamics(m, x, y, modules, mg.nullcontext())
    shares, count, svdvals = {}, [], torch.linalg.svdvals
    monkeypatch.setattr(torch.linalg, "svdvals", lambda W: count.append(1) or svdvals(W))
    for rank in (0, 1):  # each rank's share, as it enters the all-reduce
        monkeypatch.setattr(mg.dist, "all_reduce", lambda t, rank=rank: shares.setdefault(rank, t.clone()))
        mg.learning_dynamics(m, x, y, modules, mg.nullcontext(), rank, 2)
    n = len(count)
    assert ((shares[0] != 0) & (shares[1] != 0)).sum() == 0 and ((shares[0] + shares[1]) != 0).all()
    assert n == len(shares[0]) and abs((shares[0] != 0).sum() - (shares[1] != 0).sum()) <= 1
    monkeypatch.setattr(mg.dist, "all_reduce", lambda t: t.add_(shares[1]))  # rank 0 receives rank 1's share
    assert mg.learning_dynamics(m, x, y, modules, mg.nullcontext(), 0, 2) == alone


def test_a_stop_saves_first_and_skips_eval_and_probe(small_args, monkeypatch):
    """A stop requested after step 2, where eval and probe are due: the checkpoint, then the window's means
    alone; nothing that could outlast a grace period runs first."""
    events, save, stops = [], mg.save, iter([0, 15])
    monkeypatch.setattr(mg, "stop_requested", lambda stop, world, device: next(stops))
    monkeypatch.setattr(mg, "save", lambda *a: events.append("save") or save(*a))
    for name in ("evaluate", "fewshot_eval", "learning_dynamics"):
        monkeypatch.setattr(mg, name, lambda *a, f=getattr(mg, name), name=name: events.append(name) or f(*a))
    assert run(small_args + ["--max_steps", "5", "--eval_every", "2", "--dynamics_every", "2",
                             "--fewshot_episodes", "2"]) == 128 + 15
    assert events == ["learning_dynamics", "save"]  # step 0's probe, then the stop after step 2
    out = small_args[small_args.index("--out_dir") + 1]
    last = [json.loads(ln) for ln in open(os.path.join(out, "metrics.jsonl"))][-1]
    assert last["step"] == 2 and ("loss_ar" in last or "loss_query" in last)
    assert not {"eval_loss", "attn_entropy"} & set(last)
    assert mg.load_checkpoint(os.path.join(out, "ckpt.pt"))["step"] == 2


@pytest.mark.skipif(not (torch.cuda.is_available() or os.environ.get("MAML_GPT_SLOW_TESTS")),
                    reason="inductor on the CPU compiles C++ for minutes; runs on CUDA, or with "
                           "MAML_GPT_SLOW_TESTS=1")
def test_compile_with_the_default_backend_matches_eager():
    """torch.compile(dynamic=False), as setup() calls it, with inductor: one graph per shape, the same loss
    and gradients as eager. Skipped where inductor cannot build a kernel (no C++ compiler, no Triton)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        torch.compile(lambda t: t.sin() + 1)(torch.ones(3, device=device))
    except Exception as e:  # a missing compiler or toolchain, not a fault of this code
        pytest.skip(f"inductor cannot build here: {type(e).__name__}")
    torch.manual_seed(0)
    m = mg.Decoder(mg.ModelConfig(d_model=24, n_layers=1, max_seq_len=16)).to(device)
    compiled = torch.compile(m, dynamic=False, fullgraph=True)
    for shape in ((2, 16), (3, 8)):  # a second shape: a second static graph, not a dynamic one
        x, y = (torch.randint(0, 50257, shape, device=device) for _ in "xy")
        loss = m(x, y)[1]
        loss.backward()
        eager = {n: p.grad.clone() for n, p in m.named_parameters()}
        m.zero_grad(set_to_none=True)
        loss_c = compiled(x, y)[1]
        loss_c.backward()
        torch.testing.assert_close(loss_c, loss, rtol=1e-5, atol=1e-6)
        for n, p in m.named_parameters():
            torch.testing.assert_close(p.grad, eager[n], rtol=1e-4, atol=1e-6, msg=n)
        m.zero_grad(set_to_none=True)
    torch._dynamo.reset()


def test_bench_peaks_causal_flops_and_toy_default(monkeypatch, capsys):
    """Known device names map to their datasheet peaks; attention FLOPs count the visible keys only; a size
    without --data benchmarks on the toy world."""
    assert [bench.peak_of(n) for n in ("NVIDIA H100 80GB HBM3", "NVIDIA H100 PCIe", "NVIDIA H100 NVL",
                                       "NVIDIA H200", "NVIDIA H200 NVL", "NVIDIA GH200 480GB",
                                       "NVIDIA A100-SXM4-80GB", "NVIDIA A10", "NVIDIA L4")] == \
        [989e12, 756e12, 835e12, 989e12, 835e12, 989e12, 312e12, None, None]
    cfg = mg.ModelConfig(d_model=24, n_layers=2)
    # T = 3: positions see 1, 2, 3 keys; 12 d FLOPs per layer and key (forward + backward)
    assert bench.flops_per_token(cfg, 3) - bench.flops_per_token(cfg, 1) == 12 * 24 * 2 * (2 - 1)
    seen = []
    monkeypatch.setattr(bench, "bench", lambda args: seen.append(args.data))
    bench.main(["--size", "tiny"])
    bench.main(["--size", "tiny", "--data", "x.txt"])
    assert seen == ["toy", "x.txt"] and "toy world" in capsys.readouterr().out
