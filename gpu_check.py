"""
One command that checks a GPU machine, and one table to paste into the README:

    python gpu_check.py                      # tiny and large; about 10 minutes on one H100-class GPU
    python gpu_check.py --sizes tiny         # a quick look

On CUDA, in bf16 on the toy world (offline, built on first use): a few training steps of each size with and
without --compile; resume after an interruption equal to a straight run; 2 processes (torchrun) equal to 1
with 2 accumulation steps, when there are 2 GPUs; the fused LM-head loss against F.cross_entropy at --size
large shapes; host syncs per micro-step as CUDA itself reports them (torch.cuda.set_sync_debug_mode); and
bench.py (tokens/s, MFU, peak memory, the SDPA kernel, the cost of the dynamics probe). Without CUDA it says
so and exits 0. `--device cpu --train_flags "..."` runs the same checks on the CPU, to test this script.
"""
import argparse
import os
import shlex
import subprocess
import sys
import tempfile
import time
import warnings

import torch
import torch.nn.functional as F

import bench
import maml_gpt as mg


def train(flags, out, nproc=1):
    """maml_gpt.py in a fresh process (torchrun for nproc > 1) -> (exit code, seconds, stderr's last line)."""
    launch = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
              if nproc > 1 else [sys.executable])
    t = time.time()
    r = subprocess.run(launch + [os.path.join(mg.HERE, "maml_gpt.py")] + flags + ["--out_dir", out],
                       capture_output=True, text=True)
    return r.returncode, time.time() - t, (r.stderr.strip().splitlines() or [""])[-1][-150:]


def last_record(out):
    import json
    recs = [json.loads(ln) for ln in open(os.path.join(out, "metrics.jsonl"))]
    return (f"loss_ar {next((r['loss_ar'] for r in reversed(recs) if 'loss_ar' in r), float('nan')):.3f}, "
            f"{sum(r.get('n_meta_steps', 0) for r in recs)} meta steps")


def same_weights(a, b):
    """'bitwise', or the largest absolute difference over every weight of the two checkpoints."""
    a, b = (mg.load_checkpoint(os.path.join(d, "ckpt.pt")) for d in (a, b))
    diff = max((x.float() - b[part][k].float()).abs().max().item()
               for part in ("model", "head") for k, x in a[part].items())
    return "bitwise" if diff == 0 else f"max |diff| {diff:.2e}"


def loss_check(device, rows, d, vocab=50304):
    """The fused loss against F.cross_entropy on full bf16 logits: loss and gradients, peak memory."""
    torch.manual_seed(0)
    h = torch.randn(rows, d, device=device, requires_grad=True)
    w = (torch.randn(vocab, d, device=device) / d ** 0.5).requires_grad_()
    t = torch.randint(0, vocab, (rows,), device=device)
    res = []
    for fn in (lambda: mg.linear_cross_entropy(h, w, t), lambda: F.cross_entropy(F.linear(h, w).float(), t)):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = fn()
        g = torch.autograd.grad(loss, (h, w))
        mem = torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else float("nan")
        res.append((loss.item(), g, mem))
    (l1, g1, m1), (l2, g2, m2) = res
    rel = max(((a - b).norm() / b.norm()).item() for a, b in zip(g1, g2))
    return (abs(l1 - l2) < 1e-2 and rel < 2e-2,
            f"loss {l1:.4f} vs {l2:.4f}, grad rel. error {rel:.1e}"
            + (f"; peak {m1:.2f} vs {m2:.2f} GiB" if device.type == "cuda" else ""))


def cuda_syncs(flags, device):
    """Synchronising CUDA calls in one AR and one meta micro-step, counted by CUDA's own sync debug mode."""
    args = mg.parse_args(flags + ["--device", str(device), "--out_dir", tempfile.mkdtemp()])
    run = mg.setup(args, for_bench=True)
    ep = lambda i: mg.episode_tensors(run.tokens, run.index, args, mg.stream_key(0, i, "episode", 0), device)
    xy = lambda i: mg.get_batch(run.tokens, mg.batch_indices(0, i, len(run.tokens), args.seq_len,
                                                             args.batch_size), args.seq_len, device)
    steps = dict(AR=lambda i: mg.ar_micro_step(run.model, *xy(i), 1.0, run.amp),
                 meta=lambda i: mg.meta_micro_step(run.model, run.head, ep(i), args, 1.0, run.amp))
    out = {}
    for name, step in steps.items():
        step(0)  # warm-up: allocations, kernel choice
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            step(1)
            torch.cuda.set_sync_debug_mode("default")
        out[name] = sum("synchroniz" in str(w.message) for w in seen)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="tiny,large", help="comma-separated presets to train and benchmark")
    p.add_argument("--device", default="cuda", help="cuda, or cpu to test this script (fp32, slow)")
    p.add_argument("--train_flags", default="", help="extra maml_gpt.py flags for every run (CPU tests)")
    a = p.parse_args(argv)
    if a.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; nothing to check (GPU numbers stay 'not yet measured')")
        return 0
    device = torch.device(a.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    n_gpu = torch.cuda.device_count() if device.type == "cuda" else 0
    dtype = "bfloat16" if device.type == "cuda" else "float32"
    common = ["--data", "toy", "--device", a.device, "--dtype", dtype, "--hybrid_ratio", "0.5",
              "--eval_every", "0", "--dynamics_every", "0", "--log_every", "1"] + shlex.split(a.train_flags)
    rows, tmp = [], tempfile.mkdtemp(prefix="gpu-check-")

    def row(check, setting, ok, detail):
        rows.append((check, setting, "ok" if ok else "FAIL", detail))
        print(f"{check} | {setting} | {rows[-1][2]} | {detail}", flush=True)

    for size in a.sizes.split(","):
        sz = ["--size", size, "--grad_accum", "2"]
        for compile_ in ([], ["--compile"]):
            out = os.path.join(tmp, f"{size}{'-c' if compile_ else ''}")
            rc, sec, err = train(sz + common + compile_ + ["--max_steps", "6"], out)
            row("train 6 steps", f"{size}{' --compile' if compile_ else ''}", rc == 0,
                f"{sec:.0f} s with start-up; " + (last_record(out) if rc == 0 else err))
    tiny = ["--size", "tiny"] + common
    full, part = os.path.join(tmp, "full"), os.path.join(tmp, "part")
    acc = tiny + ["--grad_accum", "2"]
    rcs = [train(acc + ["--max_steps", "6"], full)[0], train(acc + ["--max_steps", "3"], part)[0],
           train(acc + ["--max_steps", "6", "--resume"], part)[0]]
    res = same_weights(full, part) if not any(rcs) else f"exit codes {rcs}"
    row("resume after step 3 == straight run", "tiny, 6 steps", res == "bitwise", res)
    if n_gpu >= 2:
        one, two = os.path.join(tmp, "one"), os.path.join(tmp, "two")
        rcs = [train(tiny + ["--max_steps", "4", "--grad_accum", "2"], one)[0],
               train(tiny + ["--max_steps", "4", "--grad_accum", "1"], two, nproc=2)[0]]
        res = same_weights(one, two) if not any(rcs) else f"exit codes {rcs}"
        row("2 processes == 1 with 2 accumulation steps", "tiny, 4 steps", res == "bitwise", res)
    else:
        row("2 processes == 1 with 2 accumulation steps", "-", True, f"skipped: {n_gpu} GPU(s)")
    big = (4096, 1536) if device.type == "cuda" else (512, 96)
    row("fused loss vs F.cross_entropy, bf16", f"{big[0]} rows x d {big[1]} x V 50,304",
        *loss_check(device, *big))
    if device.type == "cuda":
        s = cuda_syncs(tiny, device)
        row("CUDA syncs per micro-step (sync debug mode)", "tiny", True, f"AR {s['AR']}, meta {s['meta']}")
    for size in a.sizes.split(","):
        for compile_ in ([], ["--compile"]):
            r = bench.bench(mg.parse_args(["--size", size, "--data", "toy", "--device", a.device, "--dtype",
                                           dtype, "--out_dir", os.path.join(tmp, "bench")] + compile_
                                          + shlex.split(a.train_flags)))
            mfu = (f"MFU AR {r['flops']['ar'] / r['t_ar'] / r['peak']:.1%}, "
                   f"meta {r['flops']['meta'] / r['t_meta'] / r['peak']:.1%}" if r["peak"] else "MFU unknown")
            row("bench", f"{size}{' --compile' if compile_ else ''}", True,
                f"AR {r['ar_tok'] / r['t_ar']:.0f} tok/s, meta {r['meta_tok'] / r['t_meta']:.0f} tok/s; "
                f"{mfu}; peak {r['peak_memory_gib']:.1f} GiB; SDPA {r['sdpa']}; probe {r['t_dyn']:.1f} s; "
                f"host syncs AR {r['syncs']['AR']}, meta {r['syncs']['meta']}")
    print(f"\n{name}, {n_gpu} GPU(s), torch {torch.__version__}, {time.strftime('%Y-%m-%d')}\n")
    print("| check | setting | result | numbers |\n|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")
    return 0 if all(r[2] == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
