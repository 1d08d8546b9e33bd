"""
Speed and memory of maml-gpt's training steps, printed; no run is written.

    python bench.py                   # the demo's AR and meta micro-steps; any maml_gpt.py flags, e.g.
    python bench.py --size large --device cuda --dtype bfloat16 --compile   # (toy world unless --data)
    python bench.py --vs_hf           # against Hugging Face LlamaForCausalLM (requirements-dev.txt)
"""
import collections
import resource
import statistics
import sys
import time
import traceback
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

import maml_gpt as mg

# Dense bf16 peaks (NVIDIA datasheets); the first name that torch.cuda.get_device_name() contains wins.
PEAK_BF16_FLOPS = [("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("GH200", 989e12),
                   ("H200 NVL", 835e12), ("H200", 989e12), ("A100", 312e12)]


def peak_of(name):
    return next((v for k, v in PEAK_BF16_FLOPS if k in name), None)


def flops_per_token(cfg, T, backward=True, lm_head=True):
    """6N per token for the matmul weights, plus attention's 4d per layer and visible key, x3 with the
    backward; causal: (T + 1) / 2 keys on average, as flash kernels skip the masked blocks."""
    n = cfg.n_layers * cfg.d_model ** 2 * (8 / 3 + 3 * cfg.ffn_mult) + lm_head * cfg.d_model * cfg.vocab_size
    f = 6 * n + 6 * cfg.n_layers * cfg.d_model * (T + 1)
    return f if backward else f / 3


class count_host_syncs(TorchFunctionMode):
    """with count_host_syncs() as seen: ... -> a Counter of "what at function:line" (innermost maml_gpt.py
    line) -> calls that would make the CPU wait for a CUDA device, counted on any device: value reads, ops
    whose output size depends on values, blocking or pageable host-device copies, torch.tensor of Python data
    onto a device. A sync inside a C++ op reached by none of these calls is not seen."""
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


# Views: no kernel on a GPU, left out of the launched-op count.
VIEW_OPS = {"aten::" + n for n in ("view view_as reshape _reshape_alias _unsafe_view t transpose detach "
                                   "alias expand unsqueeze squeeze select slice split split_with_sizes "
                                   "as_strided").split()}


def launched_ops(fn):
    """-> (aten ops one call of fn() runs from Python after a warm-up call, how many are not views, the names
    of every aten op it ran, nested ones such as SDPA's kernel included)."""
    from torch.profiler import ProfilerActivity, profile
    fn()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    ops = [e for e in prof.events() if e.name.startswith("aten::")]
    top = [e.name for e in ops if e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::")]
    return len(top), sum(n not in VIEW_OPS for n in top), [e.name for e in ops]


def timed(fn, device, n=1):
    """Seconds per call of fn(1), ..., fn(n), the work they queue on a GPU included."""
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    sync()
    t = time.perf_counter()
    for i in range(1, n + 1):
        fn(i)
    sync()
    return (time.perf_counter() - t) / n


def describe(args, model, device, amp):
    return (f"{args.size or 'demo'} ({mg.count_params(model) / 1e6:.1f}M params) on {device}, "
            f"{'fp32' if isinstance(amp, nullcontext) else 'bf16'}, {torch.get_num_threads()} CPU thread(s)")


def bench(args, iters=5):
    """Time the AR and meta micro-steps and one dynamics probe of the run `args` describes; print them."""
    run = mg.setup(args, for_bench=True)
    model, amp, device = run.orig_model, run.amp, run.device

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

    steps, syncs, cuda = dict(AR=ar, meta=meta), {}, device.type == "cuda"
    for name, fn in steps.items():  # on the eager model: a compiled graph runs no Python
        with count_host_syncs() as syncs[name]:
            fn(0, model)
    for fn in (ar, meta, ar, meta):  # warm-up (and compilation), not timed
        fn(0)
    if cuda:  # the peak of training itself: preparation, warm-up are over
        torch.cuda.reset_peak_memory_stats(device)
    sec = {k: timed(fn, device, iters) for k, fn in steps.items()}
    sec["probe"] = timed(lambda i: mg.learning_dynamics(model, *run.probe, run.modules, amp), device)
    # CPU: ru_maxrss, the process's peak RSS since its start (preparation included), kB (bytes on macOS)
    mem = (torch.cuda.max_memory_allocated(device) / 2 ** 30 if cuda else
           resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** (30 if sys.platform == "darwin" else 20))
    tok = dict(AR=run.micro_tokens["ar"], meta=run.micro_tokens["meta"])
    step = args.grad_accum * (args.hybrid_ratio * sec["meta"] + (1 - args.hybrid_ratio) * sec["AR"])
    ctx = mg.smlmt_ctx(args)
    n_sup = args.n_way * args.k_shot * ctx
    # meta: the support forward only, the query forward + backward, no LM head (the MLP head, < 0.1 % of the
    # backbone, left out)
    flops = dict(AR=flops_per_token(model.cfg, args.seq_len) * tok["AR"],
                 meta=flops_per_token(model.cfg, ctx, backward=False, lm_head=False) * n_sup
                 + flops_per_token(model.cfg, ctx, lm_head=False) * (tok["meta"] - n_sup))
    peak = peak_of(torch.cuda.get_device_name(device)) if cuda and not isinstance(amp, nullcontext) else None
    with amp:  # the attention kernel of a forward (on a GPU in bf16: flash or cuDNN, not math)
        every = launched_ops(lambda: model(run.probe[0][:1], run.probe[0][:1]))[2]
    kernel = next((n.removeprefix("aten::_scaled_dot_product_") for n in every
                   if n.startswith("aten::_scaled_dot_product_")), "unknown")
    print(f"bench: {describe(args, model, device, amp)}, compile={args.compile}, attention kernel: {kernel}")
    for k, shape in (("AR", f"{args.batch_size} x {args.seq_len}"),
                     ("meta", f"support {n_sup} no-grad + query {tok['meta'] - n_sup}; ctx {ctx}")):
        print(f"  {k + ' micro-step':15s} {tok[k]:6d} tokens  {sec[k] * 1e3:8.1f} ms  "
              f"{tok[k] / sec[k]:10.0f} tok/s  ({shape})")
    print(f"  meta / AR cost per backbone token: {sec['meta'] / tok['meta'] / (sec['AR'] / tok['AR']):.3f}; "
          f"est. step {step:.2f} s at grad_accum {args.grad_accum}, hybrid_ratio {args.hybrid_ratio}")
    print("  MFU: " + ("  ".join(f"{k} {flops[k] / sec[k] / peak:.1%}" for k in tok)
                       + f"  (peak {peak / 1e12:.0f} TFLOPS bf16)" if peak
                       else "unknown (no known bf16 peak for this device/dtype)"))
    print(f"  peak memory: {mem:.2f} GiB "
          + ("(CUDA allocated, after warm-up)" if cuda else "(process RSS, since start)"))
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
    """--vs_hf: one forward + backward of fresh weights in maml-gpt and in transformers.LlamaForCausalLM (SDPA
    attention) on the same random tokens. The contestants take turns, the first place rotating, so that other
    work on the machine slows all alike; a ratio is the median of per-round ratios."""
    try:
        import transformers
    except ImportError:
        raise mg.UserError("bench.py --vs_hf needs transformers: pip install -r requirements-dev.txt")
    from export import to_hf_llama
    device = mg.pick_device(args.device)
    amp = mg.autocast_ctx(device, args.dtype)
    torch.manual_seed(0)
    ours = mg.Decoder(mg.model_config(args)).to(device)
    hf = to_hf_llama(ours)
    x = torch.randint(0, mg.EOT_ID, (args.batch_size, args.seq_len), device=device)
    y = torch.cat([x[:, 1:], torch.full_like(x[:, :1], -100)], dim=1)  # the last position has no next token
    # "plain": our model with F.cross_entropy on the full (B*T, V) logits, which the fused loss replaced
    runs = {"maml-gpt (fused loss)": lambda: ours(x, y)[1],
            "maml-gpt, plain F.cross_entropy": lambda: F.cross_entropy(ours(x)[0].flatten(0, 1),
                                                                       y.flatten()),
            "HF LlamaForCausalLM": lambda: hf(input_ids=x, labels=x).loss}
    with torch.no_grad(), amp:
        losses = {w: loss().item() for w, loss in runs.items()}

    def step(w):
        with amp:
            loss = runs[w]()
        loss.backward()
    times = {w: [] for w in runs}
    for r in range(2 + args.repeats):  # the first two rounds warm up allocators and kernels
        for w in list(runs)[r % 3:] + list(runs)[:r % 3]:
            times[w] += [timed(lambda i: step(w), device)] if r >= 2 else []
            ours.zero_grad(set_to_none=True)
            hf.zero_grad(set_to_none=True)
    print("loss (same weights, same tokens): " + "  ".join(f"{w} {v:.6f}" for w, v in losses.items()))
    print(f"{describe(args, ours, device, amp)}, {args.batch_size} x {args.seq_len}, torch "
          f"{torch.__version__}, transformers {transformers.__version__}; forward + backward, median of "
          f"{args.repeats} rounds")
    ratio = {}
    for w, ts in times.items():
        med, r = statistics.median(ts), [a / b for a, b in zip(ts, times["HF LlamaForCausalLM"])]
        ratio[w] = statistics.median(r)
        print(f"  {w:32s} {med * 1e3:8.1f} ms  {args.batch_size * args.seq_len / med:7.0f} tok/s  / HF "
              f"{ratio[w]:.3f} (per round {min(r):.3f}-{max(r):.3f})")
    return dict(ratio=ratio["maml-gpt (fused loss)"], ratio_plain=ratio["maml-gpt, plain F.cross_entropy"],
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
