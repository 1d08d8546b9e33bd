"""
Speed and memory of maml-gpt's training steps, printed; no run is written.

    python bench.py                   # the demo's AR and meta micro-steps; any maml_gpt.py flags, e.g.
    python bench.py --size large --device cuda --dtype bfloat16 --compile   # (toy world unless --data)
    python bench.py --vs_hf           # against Hugging Face LlamaForCausalLM (requirements-dev.txt)

--vs_hf times one forward + backward of the same weights on the same random tokens, the contestants taking
turns with the first place rotating, so that other work on the machine slows all of them alike; a ratio is
the median of per-round ratios.
"""
import collections
import statistics
import sys
import time
import traceback
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

import maml_gpt as mg

# Dense bf16 tensor-core peaks from NVIDIA datasheets, matched against torch.cuda.get_device_name() in this
# order (the first name it contains wins): "NVIDIA H100 80GB HBM3" is an H100 SXM, a GH200 is H100-class, an
# A100 is 312 in SXM and PCIe alike. Other devices: no MFU is printed.
PEAK_BF16_FLOPS = [("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("GH200", 989e12),
                   ("H200 NVL", 835e12), ("H200", 989e12), ("A100", 312e12)]


def peak_of(name):
    return next((v for k, v in PEAK_BF16_FLOPS if k in name), None)


def flops_per_token(cfg, T, backward=True, lm_head=True):
    """6N per token (2N forward + 4N backward) for the matmul weights, plus attention: per layer and visible
    key, 2d for q.k and 2d for the weighted sum of v, x3 with the backward. Causal: the token at position t
    sees t + 1 keys, (T + 1) / 2 on average; flash kernels skip the masked blocks. (nanoGPT's 12 L d T counts
    all T keys: at T = 512 the total is then 8 % high at tiny, 2 % at large.)"""
    n = cfg.n_layers * cfg.d_model ** 2 * (8 / 3 + 3 * cfg.ffn_mult) + lm_head * cfg.d_model * cfg.vocab_size
    f = 6 * n + 6 * cfg.n_layers * cfg.d_model * (T + 1)
    return f if backward else f / 3


def micro_step_flops(cfg, args):
    """FLOPs of one AR micro-step (B x T tokens, forward + backward, LM head included) and one meta micro-step
    (the support set forward only, the query set forward + backward, no LM head). The MLP head, a few hundred
    K weights, is left out: < 0.1% of the backbone at every size."""
    ctx = mg.smlmt_ctx(args)
    return dict(ar=flops_per_token(cfg, args.seq_len) * args.batch_size * args.seq_len,
                meta=flops_per_token(cfg, ctx, backward=False, lm_head=False) * args.n_way * args.k_shot * ctx
                + flops_per_token(cfg, ctx, lm_head=False) * args.n_way * args.q_query * ctx)


class count_host_syncs(TorchFunctionMode):
    """with count_host_syncs() as seen: ... -> seen, a Counter of "what at function:line" -> calls.

    A host sync makes the CPU wait for the device to finish everything queued so far, so it cannot queue the
    next kernels while the GPU computes. This mode (torch's public hook on every torch call made from
    Python) counts the calls that do so on CUDA, on any device, so that a CPU test sees what a GPU run would
    do: reading a value (.item(), bool(), int(), float(), tolist()), ops whose output size depends on values
    (nonzero, unique, bincount, masked_select, indexing with a bool mask), a host-device copy that is not
    non_blocking or is from pageable memory (CUDA stages it synchronously), and torch.tensor / as_tensor of
    Python data onto a device. On the CPU the device named in a copy stands for the GPU. A sync inside a C++
    op reached by none of these calls is not seen. Each call is charged to the innermost maml_gpt.py line."""
    READS = {"item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero", "unique",
             "bincount", "masked_select"}

    def __enter__(self):
        self.seen = collections.Counter()
        super().__enter__()
        return self.seen

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name, kwargs = getattr(func, "__name__", ""), kwargs or {}
        if name in self.READS or self.blocks(name, args, kwargs):
            f = [f for f in traceback.extract_stack() if f.filename.endswith("maml_gpt.py")]
            self.seen[f"{name} at {f[-1].name}:{f[-1].lineno}" if f else name] += 1
        return func(*args, **kwargs)

    @staticmethod
    def blocks(name, args, kwargs):
        if name in ("__getitem__", "__setitem__"):
            index = args[1] if isinstance(args[1], tuple) else (args[1],)
            return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in index)
        if name in ("tensor", "as_tensor"):
            return kwargs.get("device") is not None and not isinstance(args[0], torch.Tensor)
        if name == "cpu":
            return args[0].device.type != "cpu"
        if name != "to":  # to(device, dtype, non_blocking), to(dtype, ...) or to(other_tensor, ...)
            return False
        dev = kwargs.get("device", next((getattr(a, "device", a) for a in args[1:]
                                         if isinstance(a, (str, torch.device, torch.Tensor))), None))
        if dev is None or (args[0].device.type != "cpu" and torch.device(dev).type != "cpu"):
            return False  # a dtype change, or device to device
        non_blocking = kwargs.get("non_blocking", next((a for a in args[1:] if isinstance(a, bool)), False))
        return not non_blocking or (torch.device(dev).type == "cuda" and not args[0].is_pinned())


def peak_memory_gib(device, reset=False):
    """CUDA: peak bytes allocated by tensors. CPU: the process's peak resident set size (Linux's VmHWM, reset
    by writing 5 to /proc/self/clear_refs). reset=True restarts the count: -> False where it cannot."""
    if device.type == "cuda":
        if reset:
            torch.cuda.reset_peak_memory_stats(device)
            return True
        return torch.cuda.max_memory_allocated(device) / 2 ** 30
    try:
        if reset:
            with open("/proc/self/clear_refs", "w") as f:
                return f.write("5") > 0
        with open("/proc/self/status") as f:
            return next(int(ln.split()[1]) for ln in f if ln.startswith("VmHWM:")) / 2 ** 20  # kB
    except (OSError, StopIteration):
        return False if reset else float("nan")


# Ops that only re-describe a tensor's memory (no kernel on a GPU): left out of the launched-op count.
VIEW_OPS = {"aten::" + n for n in ("view view_as reshape _reshape_alias _unsafe_view t transpose detach "
                                   "alias expand unsqueeze squeeze select slice split split_with_sizes "
                                   "as_strided").split()}


def launched_ops(fn):
    """-> (ops, launched, every): from torch.profiler, after a warm-up call, the aten operators one call of
    fn() runs from Python, how many of them are not views, and the names of every aten operator it ran
    (with those they dispatch to, e.g. SDPA's kernel)."""
    from torch.profiler import ProfilerActivity, profile
    fn()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    ops = [e for e in prof.events() if e.name.startswith("aten::")]
    top = [e.name for e in ops if e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::")]
    return len(top), sum(n not in VIEW_OPS for n in top), [e.name for e in ops]


def sdpa_kernel(model, x, amp):
    """The attention kernel the model's forward on x runs. On an H100 in bf16 it should be flash or cuDNN:
    the math fallback costs several times the attention time."""
    with amp:
        every = launched_ops(lambda: model(x, x))[2]
    return next((n[len("aten::_scaled_dot_product_"):] for n in every
                 if n.startswith("aten::_scaled_dot_product_")), "unknown")


def bench(args, iters=5):
    """Time the AR and meta micro-steps and one dynamics probe of the run `args` describes; print them."""
    run = mg.setup(args, for_bench=True)
    model, amp, device = run.orig_model, run.amp, run.device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def episode(i):
        key = mg.stream_key(args.seed, i, "episode", 0)
        return mg.episode_tensors(run.tokens, run.index, args, key, device)

    def ar(i, model=None):  # the micro-steps of the training loop, on the batches and episodes of step i
        starts = mg.batch_indices(args.seed, i, len(run.tokens), args.seq_len, args.batch_size)
        x, y = mg.get_batch(run.tokens, starts, args.seq_len, device)
        mg.ar_micro_step(model or run.model, x, y, 1.0, amp)
        run.optimizer.zero_grad(set_to_none=True)

    def meta(i, model=None):
        mg.meta_micro_step(model or run.model, run.head, episode(i), args, 1.0, amp)
        run.optimizer.zero_grad(set_to_none=True)

    syncs = {}
    for name, fn in (("AR", ar), ("meta", meta)):  # on the eager model: a compiled graph runs no Python
        with count_host_syncs() as syncs[name]:
            fn(0, model)
    for fn in (ar, meta, ar, meta):  # warm-up (and compilation), not timed
        fn(0)
    sync()
    reset = peak_memory_gib(device, reset=True)  # the peak of training itself: preparation, warm-up are over

    def timed(fn, n):
        sync()
        t = time.perf_counter()
        for i in range(1, n + 1):
            fn(i)
        sync()
        return (time.perf_counter() - t) / n
    sec = dict(AR=timed(ar, iters), meta=timed(meta, iters),
               probe=timed(lambda i: mg.learning_dynamics(model, *run.probe, run.modules, amp), 1))
    mem = peak_memory_gib(device)
    tok = dict(AR=run.micro_tokens["ar"], meta=run.micro_tokens["meta"])
    step = args.grad_accum * (args.hybrid_ratio * sec["meta"] + (1 - args.hybrid_ratio) * sec["AR"])
    flops = micro_step_flops(model.cfg, args)
    peak = (peak_of(torch.cuda.get_device_name(device))
            if device.type == "cuda" and not isinstance(amp, nullcontext) else None)
    kernel, ctx = sdpa_kernel(model, run.probe[0][:1], amp), mg.smlmt_ctx(args)
    n_sup = args.n_way * args.k_shot * ctx
    print(f"bench: {args.size or 'demo'} ({mg.count_params(model) / 1e6:.1f}M params) on {device}, "
          f"{'fp32' if isinstance(amp, nullcontext) else 'bf16'}, compile={args.compile}, "
          f"{torch.get_num_threads()} CPU thread(s), attention kernel: {kernel}")
    shape = dict(AR=f"{args.batch_size} x {args.seq_len}",
                 meta=f"support {n_sup} no-grad + query {tok['meta'] - n_sup}; ctx {ctx}")
    for k in ("AR", "meta"):
        print(f"  {k + ' micro-step':15s} {tok[k]:6d} tokens  {sec[k] * 1e3:8.1f} ms  "
              f"{tok[k] / sec[k]:10.0f} tok/s  {sec[k] / tok[k] * 1e6:7.2f} us/token  ({shape[k]})")
    print(f"  meta / AR cost per backbone token: "
          f"{(sec['meta'] / tok['meta']) / (sec['AR'] / tok['AR']):.3f}; est. step {step:.2f} s at "
          f"grad_accum {args.grad_accum}, hybrid_ratio {args.hybrid_ratio}")
    print(f"  MFU: AR {flops['ar'] / sec['AR'] / peak:.1%}  meta {flops['meta'] / sec['meta'] / peak:.1%}  "
          f"(peak {peak / 1e12:.0f} TFLOPS bf16)" if peak else
          "  MFU: unknown (no known bf16 peak for this device/dtype)")
    print(f"  peak memory: {mem:.2f} GiB ("
          f"{'CUDA peak allocated' if device.type == 'cuda' else 'peak RSS of this process'}, "
          f"{'after warm-up' if reset else 'since start'}: AR and meta micro-steps and a dynamics probe)")
    print("  host syncs per micro-step: " + "; ".join(f"{k} {sum(v.values())}" + "".join(
        f", {n} x{c}" for n, c in sorted(v.items())) for k, v in syncs.items()))
    ep, layerwise = episode(0), args.inner_loop == "layerwise"
    with torch.no_grad(), amp:
        hs = mg.read_features(model, ep["support_x"], ep["support_at"], args.read)
    ops, launched, _ = launched_ops(lambda: mg.inner_loop(
        run.head, mg.episode_init(run.head, hs, ep["support_y"], ep["classes"], args.head_init, layerwise),
        hs, ep["support_y"], args.inner_steps, mg.inner_lrs(args), layerwise))
    print(f"  inner loop (episode_init + {args.inner_steps} steps, --inner_loop {args.inner_loop}): "
          f"{ops} aten ops, {launched} of them not views (kernels on a GPU)")
    print(f"  dynamics probe: {sec['probe']:.2f} s every {args.dynamics_every} steps = "
          f"{sec['probe'] / (sec['probe'] + args.dynamics_every * step):.2%} of training time")
    return dict(sec=sec, tok=tok, flops=flops, peak=peak, peak_memory_gib=mem, sdpa=kernel,
                syncs={k: sum(v.values()) for k, v in syncs.items()}, inner_ops=(ops, launched))


def vs_hf(args):
    """--vs_hf: one forward + backward of the model `args` describes (fresh weights) in maml-gpt and in
    transformers.LlamaForCausalLM (SDPA attention), on the same random tokens."""
    try:
        import transformers
    except ImportError:
        raise mg.UserError("bench.py --vs_hf needs transformers: pip install -r requirements-dev.txt")
    from export import to_hf_llama
    device = mg.pick_device(args.device)
    amp = mg.autocast_ctx(device, args.dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    torch.manual_seed(0)
    ours = mg.Decoder(mg.model_config(args)).to(device)
    hf = to_hf_llama(ours)
    x = torch.randint(0, mg.EOT_ID, (args.batch_size, args.seq_len), device=device)
    y = torch.cat([x[:, 1:], torch.full_like(x[:, :1], -100)], dim=1)  # the last position has no next token
    # Each contestant is one forward + backward returning the loss; "plain" is our model with F.cross_entropy
    # on the full (B*T, V) logits, which the fused loss replaced. HF shifts its labels inside.
    runs = {"maml-gpt (fused loss)": (ours, lambda: ours(x, y)[1]),
            "maml-gpt, plain F.cross_entropy": (ours, lambda: F.cross_entropy(
                ours(x)[0].flatten(0, 1), y.flatten(), ignore_index=-100)),
            "HF LlamaForCausalLM": (hf, lambda: hf(input_ids=x, labels=x).loss)}
    times, losses = {w: [] for w in runs}, {}
    for r in range(2 + args.repeats):  # the first two rounds warm up allocators and kernels
        for w in list(runs)[r % 3:] + list(runs)[:r % 3]:  # rotate who goes first
            sync()
            t = time.perf_counter()
            with amp:
                loss = runs[w][1]()
            loss.backward()
            sync()
            times[w] += [time.perf_counter() - t] if r >= 2 else []
            losses.setdefault(w, loss.item())
            runs[w][0].zero_grad(set_to_none=True)
    print("loss (same weights, same tokens): " + "  ".join(f"{w} {v:.6f}" for w, v in losses.items()))
    print(f"{args.size or 'demo'} ({mg.count_params(ours) / 1e6:.1f}M), {args.batch_size} x {args.seq_len}, "
          f"{'fp32' if isinstance(amp, nullcontext) else 'bf16'}, {device}, {torch.get_num_threads()} "
          f"thread(s), torch {torch.__version__}, transformers {transformers.__version__}; forward + "
          f"backward, median of {args.repeats} rounds")
    hf_times, ratios = times["HF LlamaForCausalLM"], {}
    for w, ts in times.items():
        med, r = statistics.median(ts), [a / b for a, b in zip(ts, hf_times)]
        ratios[w] = statistics.median(r)
        vs = "" if ts is hf_times else f"  / HF {ratios[w]:.3f} (per-round range {min(r):.3f}-{max(r):.3f})"
        print(f"  {w:32s} {med * 1e3:8.1f} ms  {args.batch_size * args.seq_len / med:7.0f} tok/s{vs}")
    return dict(ratio=ratios["maml-gpt (fused loss)"], ratio_plain=ratios["maml-gpt, plain F.cross_entropy"],
                losses=losses)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    p = mg.build_parser()
    p.description = "Speed and memory of the training that maml_gpt.py's flags describe; no run is written."
    p.add_argument("--vs_hf", action="store_true", help="time the model against HF LlamaForCausalLM instead")
    p.add_argument("--repeats", type=int, default=7, help="--vs_hf: timed rounds, after 2 more")

    def body():
        flags = {a.split("=")[0] for a in argv}
        if "--size" in flags and not {"--data", "--vs_hf"} & flags:
            print("note: no --data given: benchmarking on the toy world (speed does not depend on the text; "
                  "the preset's corpus would first be prepared)")
            argv.append("--data=toy")
        args = mg.parse_args(argv, p)
        return vs_hf(args) if args.vs_hf else bench(args)
    return mg.cli(body)


if __name__ == "__main__":
    main()
