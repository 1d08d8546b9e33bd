"""
Speed against Hugging Face: one forward+backward of the same model, same weights, same tokens, in maml-gpt and
in transformers.LlamaForCausalLM (SDPA attention). Needs `pip install -r requirements-dev.txt`.

    python bench.py                                   # tiny, 8 x 256, fp32, on the CPU
    python bench.py --size small --batch_size 4       # any preset; --device cuda --dtype bfloat16 on a GPU

Both models see the same random tokens and compute the same mean next-token loss over B x (T - 1) targets (HF
shifts its labels inside; we mark the last position ignore_index). A third contestant is our model with the
plain loss on full logits (what the fused loss replaced). The three take turns in one process, the first place
rotating, so that a machine shared with other work slows all of them alike; a ratio is the median of per-round
ratios.
"""
import argparse
import statistics
import time
from contextlib import nullcontext

import torch
import torch.nn.functional as F

import maml_gpt as mg


def to_hf_llama(model):
    """A transformers.LlamaForCausalLM (sdpa) computing the same function as `model` (a maml_gpt.Decoder): the
    config and weights of --export_hf."""
    from transformers import LlamaConfig, LlamaForCausalLM
    hf = LlamaForCausalLM(LlamaConfig(**mg.hf_config(model.cfg), attn_implementation="sdpa"))
    hf.load_state_dict(mg.hf_state_dict(model), strict=True)
    return hf.to(next(model.parameters()).device)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(),
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


if __name__ == "__main__":
    main()
