"""
Speed, memory and cost of maml-gpt's training steps. Two benchmarks:

    python bench.py                            # the demo's AR and meta micro-steps, MFU, memory, probe cost
    python bench.py --size small               # any maml_gpt.py flags: the run they describe, not trained
                                               # (on the toy world unless --data is given)
    python bench.py --vs_hf                    # against Hugging Face LlamaForCausalLM: tiny, 8 x 256, fp32
    python bench.py --vs_hf --size small --batch_size 4 --device cuda --dtype bfloat16

The first times the micro-steps of the training loop on the batches and episodes of steps 0, 1, 2, ... and
writes no run; it also counts their host syncs (count_host_syncs). The second needs `pip install -r
requirements-dev.txt`: both models see the same random tokens and compute the same mean next-token loss over
B x (T - 1) targets (HF shifts its labels inside; we mark the last position ignore_index). A third contestant
is our model with the plain loss on full logits (what the fused loss replaced). The three take turns in one
process, the first place rotating, so that a machine shared with other work slows all of them alike; a ratio
is the median of per-round ratios.
"""
import argparse
import collections
import statistics
import sys
import time
from contextlib import contextmanager, nullcontext

import torch
import torch.nn.functional as F

import maml_gpt as mg


# Dense bf16 tensor-core peaks from NVIDIA datasheets, matched against torch.cuda.get_device_name() in this
# order (the first name it contains wins): an H100 SXM calls itself "NVIDIA H100 80GB HBM3", a GH200
# "NVIDIA GH200 480GB" (an H100-class GPU), an A100 "A100-SXM4-80GB" or "A100 80GB PCIe" (312 both). Others:
# unknown, and no MFU is printed.
PEAK_BF16_FLOPS = [("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("GH200", 989e12),
                   ("H200 NVL", 835e12), ("H200", 989e12), ("A100", 312e12)]


def peak_of(name):
    return next((v for k, v in PEAK_BF16_FLOPS if k in name), None)


def peak_flops(device, amp):
    if device.type != "cuda" or isinstance(amp, nullcontext):
        return None
    return peak_of(torch.cuda.get_device_name(device))


def flops_per_token(cfg, T, backward=True, lm_head=True):
    """6N per token (2N forward + 4N backward) for the matmul weights, plus attention: per layer and visible
    key, 2d for q.k and 2d for the weighted sum of v, x3 with the backward. Causal: the token at position t
    sees t + 1 keys, (T + 1) / 2 on average; flash kernels skip the masked blocks. (nanoGPT's 12 L d T counts
    all T keys: at T = 512 the total is then 8 % high at tiny, 2 % at large.)"""
    n = cfg.n_layers * cfg.d_model ** 2 * (8 / 3 + 3 * cfg.ffn_mult) + lm_head * cfg.d_model * cfg.vocab_size
    f = 6 * n + 6 * cfg.n_layers * cfg.d_model * (T + 1)
    return f if backward else f / 3


def micro_step_flops(cfg, args):
    """FLOPs of one AR and one meta micro-step: every FLOP count behind the MFU figures is here.
    AR: B x T tokens, forward + backward, LM head included (the fused loss does the same matmuls as F.linear).
    Meta: the support set forward only, the query set forward + backward; neither touches the LM head. The
    MLP head (d x 128 ... x N, a few hundred K weights) is left out: < 0.1% of the backbone at every size."""
    ctx = mg.smlmt_ctx(args)
    n_sup, n_query = args.n_way * args.k_shot * ctx, args.n_way * args.q_query * ctx
    return dict(ar=flops_per_token(cfg, args.seq_len) * args.batch_size * args.seq_len,
                meta=flops_per_token(cfg, ctx, backward=False, lm_head=False) * n_sup
                + flops_per_token(cfg, ctx, lm_head=False) * n_query)


# Host syncs: operations after which the CPU must wait for the device to finish everything queued so far,
# so it cannot queue the next kernels while the GPU computes. count_host_syncs sees them from Python on any
# device (the CPU included), as what each call would do on CUDA: reading a value (.item(), bool(), int(),
# float(), tolist()), ops whose output size depends on values (bincount, nonzero, unique: an .item() inside),
# a host-device copy that is not non_blocking, or from pageable memory (CUDA stages it synchronously), and
# torch.tensor(data, device=...). Each is charged to the innermost maml_gpt.py line that caused it.
SYNC_METHODS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__")
SYNC_FUNCS = ("bincount", "nonzero", "unique", "masked_select")


@contextmanager
def count_host_syncs():
    """with count_host_syncs() as seen: ... -> seen, a Counter of "what at function:line" -> calls."""
    seen, patched = collections.Counter(), []

    def charge(what):
        f = sys._getframe(2)
        while f and not f.f_code.co_filename.endswith("maml_gpt.py"):
            f = f.f_back
        seen[f"{what} at {f.f_code.co_name}:{f.f_lineno}" if f else what] += 1

    def patch(owner, name, blocks):
        fn, own = getattr(owner, name), name in vars(owner)

        def counted(*a, **k):
            if blocks(*a, **k):
                charge(name)
            return fn(*a, **k)
        patched.append((owner, name, fn if own else None))
        setattr(owner, name, counted)

    def copy_blocks(src, *a, **k):  # .to(device): host -> device or back, unless it cannot make the host wait
        dev, _, non_blocking, _ = torch._C._nn._parse_to(*a, **k)
        if dev is None or (src.device.type != "cpu" and dev.type != "cpu"):
            return False  # a dtype change, or device to device
        return not non_blocking or (dev.type == "cuda" and not src.is_pinned())

    for name in SYNC_METHODS:
        patch(torch.Tensor, name, lambda *a, **k: True)
    for name in SYNC_FUNCS:
        patch(torch, name, lambda *a, **k: True)
    patch(torch.Tensor, "to", copy_blocks)
    patch(torch.Tensor, "cpu", lambda t, *a, **k: t.device.type != "cpu")
    patch(torch, "tensor", lambda *a, **k: k.get("device") is not None)
    try:
        yield seen
    finally:
        for owner, name, fn in reversed(patched):
            setattr(owner, name, fn) if fn else delattr(owner, name)


def reset_peak_memory(device):
    """Restart the peak-memory counter from the current usage: CUDA's allocator peak, or on Linux the
    process's peak RSS (writing 5 to /proc/self/clear_refs resets VmHWM). -> False where it cannot be
    reset."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return True
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_memory_gib(device):
    """CUDA: peak bytes allocated by tensors. CPU: peak resident set size of this process (VmHWM on Linux)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 30
    try:
        with open("/proc/self/status") as f:
            return next(int(ln.split()[1]) for ln in f if ln.startswith("VmHWM:")) / 2 ** 20  # kB
    except (OSError, StopIteration):
        import resource
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return rss / 2 ** (30 if sys.platform == "darwin" else 20)  # bytes on macOS, KiB elsewhere


def sdpa_kernel_used(model, idx, amp):
    """The kernel F.scaled_dot_product_attention picks for this model's q, k, v (shapes, dtype, device, GQA):
    asked of the same dispatcher function SDPA itself calls. On an H100 in bf16 it should be flash or cuDNN;
    the math fallback would cost several times the attention time. Measured on CPU (fp32): FLASH_ATTENTION
    (the CPU flash kernel). On CUDA: not yet measured."""
    from torch.nn.attention import SDPBackend
    T = idx.shape[1]
    layer = model.layers[0]
    with torch.no_grad(), amp:
        q, k, v = layer.attention.qkv(layer.attention_norm(model.embedding_proj(idx[:1])), model.rope_cos[:T],
                                      model.rope_sin[:T])
        try:  # a private function (torch >= 2.1): say "unknown" rather than fail if it moves
            return SDPBackend(torch._fused_sdp_choice(q, k, v, is_causal=True, enable_gqa=True)).name
        except (AttributeError, TypeError, ValueError, RuntimeError):
            return "unknown"


# Ops that only re-describe a tensor's memory (no kernel on a GPU): left out of the launched-op count.
VIEW_OPS = {"aten::" + n for n in ("view view_as reshape _reshape_alias _unsafe_view t transpose detach alias "
                                   "expand unsqueeze squeeze select slice split split_with_sizes as_strided")
            .split()}


def launched_ops(fn):
    """-> (ops, launched): the top-level aten operators one call of fn() runs, from torch.profiler after a
    warm-up call, and those of them that are not views."""
    from torch.profiler import ProfilerActivity, profile
    fn()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    top = [e.name for e in prof.events() if e.name.startswith("aten::")
           and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::"))]
    return len(top), sum(n not in VIEW_OPS for n in top)


def inner_loop_ops(run, args, ep):
    """launched_ops of one episode's adaptation: episode_init + the inner loop, as meta_micro_step runs it."""
    with torch.no_grad(), run.amp:
        hs = mg.read_features(run.orig_model, ep["support_x"], ep["support_at"], args.read)
    layerwise = args.inner_loop == "layerwise"

    def adapt():
        phi0 = mg.episode_init(run.head, hs, ep["support_y"], ep["classes"], args.head_init, layerwise)
        mg.inner_loop(run.head, phi0, hs, ep["support_y"], args.inner_steps, mg.inner_lrs(args), layerwise)
    return launched_ops(adapt)


def bench(args, iters=5):
    """Time AR and meta micro-steps and one dynamics probe of the run `args` describes; print the numbers."""
    run = mg.setup(args, for_bench=True)
    model, amp, device, cfg = run.orig_model, run.amp, run.device, run.orig_model.cfg
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def timed(fn):
        sync()
        t = time.perf_counter()
        for i in range(iters):
            fn(i + 1)
        sync()
        return (time.perf_counter() - t) / iters

    def ar(i):  # the micro-steps of the training loop, on the batches and episodes of steps 0, 1, 2...
        starts = mg.batch_indices(args.seed, i, len(run.tokens), args.seq_len, args.batch_size)
        mg.ar_micro_step(run.model, *mg.get_batch(run.tokens, starts, args.seq_len, device), 1.0, amp)
        run.optimizer.zero_grad(set_to_none=True)

    def meta(i):
        key = mg.stream_key(args.seed, i, "episode", 0)
        ep = mg.episode_tensors(run.tokens, run.index, args, key, device)
        mg.meta_micro_step(run.model, run.head, ep, args, 1.0, amp)
        run.optimizer.zero_grad(set_to_none=True)

    ctx = mg.smlmt_ctx(args)
    syncs = {}
    for name, fn in (("AR", ar), ("meta", meta)):  # on the eager model: patched methods would break graphs
        model_was, run.model = run.model, run.orig_model
        with count_host_syncs() as syncs[name]:
            fn(0)
        run.model = model_was
    ar_tok, meta_tok = run.micro_tokens["ar"], run.micro_tokens["meta"]
    for fn in (ar, meta, ar, meta):  # warm-up (and compilation), not timed
        fn(0)
    sync()
    # The peak below is that of training itself: corpus preparation and warm-up are over.
    reset = reset_peak_memory(device)
    t_ar, t_meta = timed(ar), timed(meta)
    t = time.perf_counter()
    mg.learning_dynamics(model, *run.probe, run.modules, amp)
    sync()
    t_dyn = time.perf_counter() - t
    mem = peak_memory_gib(device)
    step_time = args.grad_accum * (args.hybrid_ratio * t_meta + (1 - args.hybrid_ratio) * t_ar)
    peak, flops = peak_flops(device, amp), micro_step_flops(cfg, args)
    n_sup = args.n_way * args.k_shot * ctx
    kernel = sdpa_kernel_used(model, run.probe[0], amp)
    print(f"bench: {args.size or 'demo'} ({mg.count_params(model) / 1e6:.1f}M params) on {device}, "
          f"{'bf16' if not isinstance(amp, nullcontext) else 'fp32'}, compile={args.compile}, "
          f"{torch.get_num_threads()} CPU thread(s), "
          f"attention kernel: {kernel}")
    print(f"  AR micro-step   {ar_tok:6d} tokens  {t_ar * 1e3:8.1f} ms  {ar_tok / t_ar:10.0f} tok/s  "
          f"{t_ar / ar_tok * 1e6:7.2f} us/token  ({args.batch_size} x {args.seq_len})")
    print(f"  meta micro-step {meta_tok:6d} tokens  {t_meta * 1e3:8.1f} ms  {meta_tok / t_meta:10.0f} tok/s  "
          f"{t_meta / meta_tok * 1e6:7.2f} us/token  (support {n_sup} no-grad + query {meta_tok - n_sup}; "
          f"ctx {ctx})")
    print(f"  meta / AR cost per backbone token: {(t_meta / meta_tok) / (t_ar / ar_tok):.3f}")
    if peak:
        print(f"  MFU: AR {flops['ar'] / t_ar / peak * 100:.1f}%  "
              f"meta {flops['meta'] / t_meta / peak * 100:.1f}%  (peak {peak / 1e12:.0f} TFLOPS bf16)")
    else:
        print("  MFU: unknown (no known bf16 peak for this device/dtype)")
    what = "CUDA peak allocated" if device.type == "cuda" else "peak RSS of this process"
    print(f"  peak memory: {mem:.2f} GiB ({what}, {'after warm-up' if reset else 'since start'}: "
          f"AR and meta micro-steps and a dynamics probe)")
    print("  host syncs per micro-step: " + "; ".join(f"{k} {sum(v.values())}" + "".join(
        f", {n} x{c}" for n, c in sorted(v.items())) for k, v in syncs.items()))
    ep = mg.episode_tensors(run.tokens, run.index, args, mg.stream_key(args.seed, 0, "episode", 0), device)
    ops, launched = inner_loop_ops(run, args, ep)
    print(f"  inner loop (episode_init + {args.inner_steps} steps, --inner_loop {args.inner_loop}): {ops} aten "
          f"ops, {launched} of them not views (kernels on a GPU)")
    print(f"  dynamics probe: {t_dyn:.2f} s every {args.dynamics_every} steps = "
          f"{t_dyn / (t_dyn + args.dynamics_every * step_time) * 100:.2f}% of training time "
          f"(est. step {step_time:.2f} s at grad_accum {args.grad_accum})")
    return dict(t_ar=t_ar, t_meta=t_meta, ar_tok=ar_tok, meta_tok=meta_tok, t_dyn=t_dyn, peak_memory_gib=mem,
                syncs={k: sum(v.values()) for k, v in syncs.items()}, flops=flops, peak=peak, sdpa=kernel,
                inner_ops=ops, inner_launched=launched)


def to_hf_llama(model):
    """A transformers.LlamaForCausalLM (sdpa) computing the same function as `model` (a maml_gpt.Decoder): the
    config and weights export.py writes."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from export import hf_config, hf_state_dict
    hf = LlamaForCausalLM(LlamaConfig(**hf_config(model.cfg), attn_implementation="sdpa"))
    hf.load_state_dict(hf_state_dict(model), strict=True)
    return hf.to(next(model.parameters()).device)


def vs_hf(argv):
    """--vs_hf: one forward+backward of the same model, same weights, same tokens, in maml-gpt and in
    transformers.LlamaForCausalLM (SDPA attention)."""
    p = argparse.ArgumentParser(prog="bench.py --vs_hf", description=vs_hf.__doc__,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--size", default="tiny", choices=list(mg.SIZES))
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--seq_len", type=int, default=256)
    p.add_argument("--repeats", type=int, default=7,
                   help="timed rounds (each contestant once) after 2 warm-up rounds")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="autocast dtype")
    args = p.parse_args(argv)
    try:
        import transformers
    except ImportError:
        raise SystemExit("bench.py compares against transformers: pip install -r requirements-dev.txt")
    device = torch.device(args.device)
    torch.manual_seed(0)
    cfg = mg.ModelConfig(d_model=mg.SIZES[args.size]["d_model"], max_seq_len=args.seq_len)
    ours = mg.Decoder(cfg).to(device)
    hf = to_hf_llama(ours)
    x = torch.randint(0, mg.EOT_ID, (args.batch_size, args.seq_len), device=device)
    y = torch.cat([x[:, 1:], torch.full_like(x[:, :1], -100)], dim=1)  # the last position has no next token
    amp = nullcontext() if args.dtype == "float32" else torch.autocast(device.type, dtype=torch.bfloat16)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    # Three contestants: ours, ours with the plain loss (F.cross_entropy on the full (B*T, V) logits: what the
    # fused loss replaced), and HF. Each call is one forward + backward and returns the loss.
    runs = {"ours": lambda: ours(x, y)[1],
            "plain": lambda: F.cross_entropy(ours(x)[0].flatten(0, 1), y.flatten(), ignore_index=-100),
            "hf": lambda: hf(input_ids=x, labels=x).loss}
    names = {"ours": "maml-gpt (fused loss)", "plain": "maml-gpt, plain F.cross_entropy",
             "hf": "HF LlamaForCausalLM"}

    def step(which):
        """One forward+backward; -> (seconds, loss)."""
        sync()
        t = time.perf_counter()
        with amp:
            loss = runs[which]()
        loss.backward()
        sync()
        dt = time.perf_counter() - t
        (hf if which == "hf" else ours).zero_grad(set_to_none=True)
        return dt, loss.item()

    times = {w: [] for w in runs}
    for r in range(2 + args.repeats):
        order = list(runs)[r % 3:] + list(runs)[:r % 3]  # rotate who goes first
        res = {w: step(w) for w in order}
        if r == 0:
            losses = {w: res[w][1] for w in runs}
            print("loss (same weights, same tokens): " + "  ".join(f"{w} {v:.6f}" for w, v in losses.items()))
        if r >= 2:  # the first two rounds warm up allocators and kernels
            for w in times:
                times[w].append(res[w][0])
    tok = args.batch_size * args.seq_len
    med = {w: statistics.median(v) for w, v in times.items()}
    ratios = {w: [a / b for a, b in zip(times[w], times["hf"])] for w in ("ours", "plain")}
    print(f"{args.size} ({mg.count_params(ours) / 1e6:.1f}M), {args.batch_size} x {args.seq_len}, "
          f"{args.dtype}, {device}, {torch.get_num_threads()} thread(s), torch {torch.__version__}, "
          f"transformers {transformers.__version__}; forward+backward, median of {args.repeats} rounds")
    for w in runs:
        r = ratios.get(w)
        vs = f"  / HF {statistics.median(r):.3f} (per-round range {min(r):.3f}-{max(r):.3f})" if r else ""
        print(f"  {names[w]:32s} {med[w] * 1e3:8.1f} ms  {tok / med[w]:7.0f} tok/s{vs}")
    return dict(med, ratio=statistics.median(ratios["ours"]), ratio_plain=statistics.median(ratios["plain"]),
                losses=losses)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--vs_hf" in argv:
        argv.remove("--vs_hf")
        return vs_hf(argv)
    if any(a == "--size" or a.startswith("--size=") for a in argv) and not any(
            a == "--data" or a.startswith("--data=") for a in argv):
        print("note: no --data given: benchmarking on the toy world (speed does not depend on the text; "
              "the preset's corpus would first be prepared)")
        argv += ["--data", "toy"]
    return mg.cli(lambda: bench(mg.parse_args(argv)))


if __name__ == "__main__":
    main()
