"""
maml-gpt: first-order MAML interleaved with next-token pretraining of a small Llama-style decoder, in one
file. A minimal reproduction of "Learning Dynamics of Meta-Learning in Small Model Pretraining" (arXiv
2508.02189).

    python maml_gpt.py                                   # offline demo: toy world, tiny model, CPU, minutes
    python maml_gpt.py --hybrid_ratio 0 --out_dir out/demo-vanilla     # its vanilla twin (same AR batches)
    torchrun --nproc_per_node=2 maml_gpt.py --device cpu # the demo on 2 CPU processes (gloo)
    torchrun --nproc_per_node=4 maml_gpt.py --size large # the released recipe at 570M on 4 GPUs
    python maml_gpt.py --size tiny --data toy            # the released recipe, offline corpus

Using a trained run: sample.py (text), export.py (a Hugging Face folder), finetune_ner.py, analyze.py;
bench.py measures speed. The file reads in the paper's order: config (§3.1, App. A) -> model (§3.1) ->
SMLMT episodes (§3.2) -> first-order MAML (§3.3, Algorithm 1) -> learning dynamics and evaluation (§3.3,
§6) -> the training loop (Algorithm 1, App. A.1). An appendix holds the plumbing no reader of the paper
needs: the argument parser, the corpus (data/prepare.py writes it), processes, run folders, logging.

Every optimizer step is one of two branches:
  AR   : next-token loss on a batch of corpus windows;
  meta : an SMLMT episode; a small MLP head adapts to the support set in --inner_steps (10) steps of SGD (no
         backbone gradient): by default layerwise, the last layer with its own step size and a step that
         raises the support loss undone (--inner_loop sgd: the paper's plain SGD). The query loss at the
         adapted head trains the backbone and the head's initialisation (FOMAML).
"""
import argparse
import datetime
import itertools
import json
import math
import os
import platform
import shlex
import signal
import sys
import threading
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from data import prepare
from data.prepare import (EOT_ID, UserError, get_tokenizer, prepare_corpus, read_bin, wait_for,
                          write_atomically, write_bin, write_text)

HERE = os.path.dirname(os.path.abspath(__file__))


# ------------------------------------------------------------------------------------------------------------
# Config (paper §3.1, App. A). The presets below are the parser's defaults, so `--help` shows the values a
# run will use; the parser itself is in the appendix.

@dataclass
class ModelConfig:
    vocab_size: int = 50304  # GPT-2's 50,257 tokens + [MASK] (50257), padded to a multiple of 64
    d_model: int = 96
    n_layers: int = 12
    n_heads: int = 12
    n_kv_heads: int = 4  # grouped-query attention: every kv head serves 3 query heads
    ffn_mult: int = 4  # SwiGLU hidden size = 4 d
    norm_eps: float = 1e-6
    rope_theta: float = 1e4
    max_seq_len: int = 512


MASK_ID = 50257  # [MASK]: one extra id after GPT-2's vocabulary; only SMLMT episodes use it

# One row per size: the width (12 layers everywhere) and the sequences per micro-step per process. The
# released runs used 8 per GPU x 4 GPUs x 8 accumulation steps (a global batch of 256); tiny 16 x 4 x 4.
SIZES = {"tiny": dict(d_model=96, batch_size=16), "small": dict(d_model=384, batch_size=8),
         "medium": dict(d_model=768, batch_size=8), "large": dict(d_model=1536, batch_size=8)}

# `python maml_gpt.py` (no --size): an offline demo that finishes in minutes on a laptop CPU.
DEMO = dict(data="toy", out_dir=os.path.join("out", "demo"), d_model=SIZES["tiny"]["d_model"], seq_len=128,
            batch_size=16, grad_accum=1, max_steps=200, lr=1e-3, warmup_steps=20, lr_schedule="cosine",
            log_every=10, save_every=100, eval_every=50, eval_batches=2, dynamics_every=25, eval_data="val")
# `--size S`: the recipe that produced the released models (what their code ran, which differs from the
# paper's text in places): seq 512, global batch 256, AdamW 3e-4, warm-up over 2,500 steps, then constant.
RELEASED = dict(data="HuggingFaceFW/fineweb-edu:sample-10BT", seq_len=512, global_batch=256, grad_accum=None,
                max_steps=6000, lr=3e-4, warmup_steps=2500, lr_schedule="constant", log_every=10,
                save_every=100, eval_every=100, eval_batches=16, dynamics_every=100, eval_data="paloma")


def preset(size):
    """The parser defaults for `--size size` (None: the demo)."""
    return DEMO if size is None else dict(RELEASED, **SIZES[size], out_dir=os.path.join("out", size))


def model_config(args):
    cfg = ModelConfig(d_model=args.d_model, n_layers=args.n_layers, max_seq_len=args.seq_len)
    if cfg.d_model % (2 * cfg.n_heads):
        raise UserError(f"--d_model {cfg.d_model} must be a multiple of {2 * cfg.n_heads} "
                        "(12 heads, even head_dim)")
    return cfg


# Randomness. Every random choice of a run is drawn from a stream keyed by (seed, step, stream[, j]), j being
# a micro-step's slot in the global batch. No generator state survives a step, so a resumed run, or one that
# splits the same global batch over a different number of processes, draws exactly what an uninterrupted run
# draws, and a checkpoint needs no data-loader state: its step is its data position. The slot numbers are
# fixed: changing one would change what every seed draws.
STREAMS = {"batch": (0,), "branch": (1,), "episode": (2,), "dropout": ()}


def stream_key(seed, step, stream, j=None):
    """The seed sequence of a stream: [seed, step, slot], or [seed, step, j, slot] per micro-step."""
    return [seed, step, *([] if j is None else [j]), *STREAMS[stream]]


def stream_rng(seed, step, stream, j=None):
    return np.random.default_rng(stream_key(seed, step, stream, j))


def torch_seed(seed, step, j):
    """A torch seed for micro-step j's own draws (the head's dropout masks)."""
    return int(np.random.SeedSequence(stream_key(seed, step, "dropout", j)).generate_state(1)[0])


# ------------------------------------------------------------------------------------------------------------
# Model (paper §3.1): a pre-norm Llama decoder. RMSNorm, RoPE, grouped-query attention, SwiGLU, untied
# embeddings, no biases, no dropout, PyTorch default init (as pico-decoder). Parameter names follow
# pico-decoder's. After the Decoder: the fused LM-head loss it calls.

class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        """x (..., dim) -> x / sqrt(mean(x^2 over the last dimension) + eps) * weight: no mean subtraction,
        no bias (unlike LayerNorm). Normalised in fp32, cast back to x's dtype, then times the fp32 gain, so
        the result is fp32 for fp32 or bf16 x (autocast's rule for bf16 times an fp32 parameter)."""
        xf = x.float()  # fp32 even under bf16 autocast: a bf16 mean of squares loses precision
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def rope_tables(head_dim, max_len, theta):
    """cos, sin (max_len, head_dim/2): pair i at position t turns by the angle t * theta^(-2i/head_dim)."""
    # A spectrum of clock hands: pair 0 turns 1 rad per position, each next pair theta^(2/head_dim) times
    # slower, the last theta^(-(head_dim-2)/head_dim) (at the demo's head_dim 8: 1, 0.1, 0.01, 0.001 rad).
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)  # (hd/2,)
    angles = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)  # (max_len, hd/2)
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """Rotate adjacent feature pairs (x_2i, x_2i+1) (Meta-Llama's convention, not HF's rotate_half, which
    pairs x_i with x_i+hd/2). x (B, H, T, hd); cos, sin (T, hd/2) fp32 from rope_tables, row t for position t.
    Pair i at position t becomes (x_2i cos[t, i] - x_2i+1 sin[t, i], x_2i sin[t, i] + x_2i+1 cos[t, i]), in
    fp32, returned in x's dtype. Real arithmetic, so the tables can be ordinary (NCCL-safe) buffers."""
    # Each pair is a complex number x0 + i x1 multiplied by e^(i angle): a 2-D rotation. Rotating q at
    # position m and k at position n makes q.k depend on m - n only: attention sees relative positions.
    x0, x1 = x.float().unflatten(-1, (-1, 2)).unbind(-1)  # each (B, H, T, hd/2): even and odd features
    out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)  # (B, H, T, hd/2, 2)
    return out.flatten(-2).type_as(x)  # interleave back: (B, H, T, hd)


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_heads, self.n_kv_heads = cfg.n_heads, cfg.n_kv_heads
        self.head_dim = cfg.d_model // cfg.n_heads
        kv_dim = self.n_kv_heads * self.head_dim  # d/3: keys and values are shared by groups of 3 heads
        self.q_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.k_proj = nn.Linear(cfg.d_model, kv_dim, bias=False)
        self.v_proj = nn.Linear(cfg.d_model, kv_dim, bias=False)
        self.o_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)

    def qkv(self, x, cos, sin):
        """x (B, T, d) -> q (B, H, T, hd), k and v (B, Hkv, T, hd), with RoPE applied to q and k.
        A separate method so that attention_entropy() can recompute the attention probabilities explicitly."""
        q = self.q_proj(x).unflatten(-1, (self.n_heads, self.head_dim)).transpose(1, 2)
        k = self.k_proj(x).unflatten(-1, (self.n_kv_heads, self.head_dim)).transpose(1, 2)
        v = self.v_proj(x).unflatten(-1, (self.n_kv_heads, self.head_dim)).transpose(1, 2)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def forward(self, x, cos, sin):
        """x (B, T, d); cos, sin (T, hd/2) -> (B, T, d). Causal grouped-query attention, scores
        q k^T / sqrt(hd), the heads' outputs laid side by side (head-major) and projected by o_proj."""
        q, k, v = self.qkv(x, cos, sin)
        # enable_gqa: query head h reads kv head h // 3 (heads 0-2 share kv head 0: consecutive groups, not
        # h % 4) without materialising repeated k/v (torch >= 2.5).
        # is_causal: position t attends to 0..t. SDPA picks a fused kernel when it can; bench.py prints which
        # (flash on the CPU in fp32, measured; on a GPU in bf16, not yet measured).
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)  # (B, H, T, hd)
        return self.o_proj(y.transpose(1, 2).flatten(-2))  # heads back side by side: (B, T, d)


class SwiGLU(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        hidden = cfg.ffn_mult * cfg.d_model
        self.w_0 = nn.Linear(cfg.d_model, hidden, bias=False)  # gate
        self.w_1 = nn.Linear(cfg.d_model, hidden, bias=False)  # value
        self.w_2 = nn.Linear(hidden, cfg.d_model, bias=False)  # down projection

    def forward(self, x):
        # A gated MLP: silu(w_0 x) decides, per hidden unit, how much of w_1 x passes. (B, T, d) -> 4d -> d
        return self.w_2(F.silu(self.w_0(x)) * self.w_1(x))


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attention = Attention(cfg)
        self.swiglu_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.swiglu = SwiGLU(cfg)

    def forward(self, x, cos, sin):
        # Pre-norm residual block: each sub-layer reads a normalised copy and adds to the residual stream,
        # which itself is never normalised in place.
        x = x + self.attention(self.attention_norm(x), cos, sin)
        return x + self.swiglu(self.swiglu_norm(x))


class Decoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.embedding_proj = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.output_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.de_embedding_proj = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)  # untied from the input
        cos, sin = rope_tables(cfg.d_model // cfg.n_heads, cfg.max_seq_len, cfg.rope_theta)
        # Per-model, real, non-persistent: not in checkpoints, moved by .to(), safe to broadcast.
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def forward(self, idx, targets=None, return_hidden=False):
        """idx (B, T) token ids. Returns the hidden states after output_norm (B, T, d) if return_hidden (the
        features the MAML head and the NER head read). Otherwise (logits, loss): with targets (B, T), (None,
        mean next-token loss), the logits never materialised; without, (logits (B, T, V) fp32, None)."""
        T = idx.shape[1]
        if T > self.cfg.max_seq_len:
            raise ValueError(f"sequence of {T} tokens > max_seq_len {self.cfg.max_seq_len}")
        cos, sin = self.rope_cos[:T], self.rope_sin[:T]  # any length 1..max_seq_len: slice the tables
        x = self.embedding_proj(idx)  # (B, T, d); no position embedding: RoPE carries position
        for layer in self.layers:
            x = layer(x, cos, sin)
        x = self.output_norm(x)  # (B, T, d)
        if return_hidden:  # meta and NER steps stop here: the 50,304-way LM head is the costliest matmul
            return x
        if targets is not None:  # training and evaluation: the loss without ever building the logits
            return None, linear_cross_entropy(x.flatten(0, 1), self.de_embedding_proj.weight,
                                              targets.flatten())
        return self.de_embedding_proj(x).float(), None  # logits (B, T, V), fp32 for a stable softmax

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=0.8, top_k=None, generator=None):
        """Sample continuations of idx (B, T) -> (B, T + n), n <= max_new_tokens. Deterministic for a
        `generator` (temperature 0: greedy). A row that emits <|endoftext|> is finished: it is padded with
        <|endoftext|> until every row is. [MASK] (50257) and the padding ids 50258..50303 are never sampled.
        No KV cache, as in nanoGPT: every new token re-runs the model on the window (its last max_seq_len
        tokens); a cache would need a second attention path, and re-rotated keys once the window slides."""
        finished = torch.zeros(idx.shape[0], dtype=torch.bool, device=idx.device)
        for _ in range(max_new_tokens):
            h = self(idx[:, -self.cfg.max_seq_len:], return_hidden=True)  # (B, T, d): a long prompt's end
            logits = self.de_embedding_proj(h[:, -1]).float()  # (B, V): only the last position predicts
            logits[:, MASK_ID:] = float("-inf")  # [MASK] and padding: never trained as targets, never emitted
            if temperature == 0:
                nxt = logits.argmax(-1)
            else:
                logits = logits / temperature
                if top_k:  # keep the k most likely tokens: cuts the long tail of nonsense at small sizes
                    kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                nxt = torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)  # (B,)
            nxt = nxt.masked_fill(finished, EOT_ID)
            idx = torch.cat([idx, nxt[:, None]], dim=1)
            finished |= nxt == EOT_ID
            if finished.all():
                break
        return idx


def count_params(model):
    return sum(p.numel() for p in model.parameters())


# The LM-head loss, fused and chunked. At tiny width the (B*T, V) logits are the largest tensors of a step by
# far: 16 x 512 x 50,304 fp32 is 1.6 GB, and a plain F.cross_entropy keeps several such copies alive (the
# logits, the log-softmax, their gradients). But the loss of a row needs only log-sum-exp minus the target
# logit, and the backward needs only d loss / d logits = softmax - one-hot, multiplied into two matmuls (for
# h and for W). So we walk the rows in chunks: a chunk's logits, its loss and both its gradient contributions,
# then the same buffer for the next chunk. Nothing of size (B*T, V) ever exists, and the backward pass is two
# multiplications by a scalar. (The technique of Liger-Kernel's FusedLinearCrossEntropy and Apple's Cut
# Cross-Entropy, in plain torch.)
# Rows per chunk, per device. CPU: 256 x 50,304 fp32 = 51 MB live; measured (d = 96, 2,048 rows, 1 thread) the
# fastest of 128 / 256 / 512 / 1,024 / 2,048 (1.49 / 1.42 / 1.46 / 1.56 / 1.72 s for loss + gradients; plain
# F.cross_entropy 2.87 s). CUDA: each chunk adds its (V, d) weight gradient into the fp32 accumulator, 12 V d
# bytes of traffic in bf16 (product written and read, accumulator read and written), 0.93 GB at large. In
# 256-row chunks a micro-step's 4,096 rows move 15 GB, ~5 ms at 3 TB/s: twice its three LM-head matmuls (1.9
# TFLOP, ~2.5 ms). As one 4,096-row chunk: 0.3 ms, for 1.6 GB of buffers (fp32 logits, bf16 copy, gradient).
# The softmax passes (~38 bytes per logit) do not depend on it. Not yet measured on a GPU.
LOSS_CHUNK_ROWS = dict(cpu=256, cuda=4096)


def _chunked_linear_ce(h, weight, targets, ignore_index, chunk_rows, want_h, want_w):
    """Sum over rows of cross_entropy(h @ weight.T, targets) and, if asked, its gradients w.r.t. h and weight.
    h (N, d), weight (V, d), targets (N,) int64; rows whose target is ignore_index add 0 and get 0 gradient.
    Row loss = log(sum_j exp z_j) - z_target with z = that row's logits (shift by the row max first: exp must
    not overflow); d row loss / d z = softmax(z) - one_hot(target); grad_h = that @ weight, grad_w = its
    transpose @ h, both summed over rows (not averaged). Never builds more than chunk_rows rows of logits at a
    time. -> (loss sum, fp32 scalar; grad_h (N, d) fp32 or None (want_h False); grad_w (V, d) fp32 or None
    (want_w False); rows counted, an int64 scalar tensor)."""
    dev = h.device.type
    # Under autocast the matmuls run in its dtype (bf16), as nn.Linear's would; the softmax, the loss and the
    # sums of gradient contributions stay fp32. Autocast does not look inside an autograd.Function: cast here.
    dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else h.dtype
    with torch.autocast(dev, enabled=False):
        hc, wc = h.to(dtype), weight.to(dtype)
        counted = targets != ignore_index  # (N,) bool
        safe_t = torch.where(counted, targets, 0)[:, None]  # (N, 1): a valid index even on ignored rows
        loss = torch.zeros((), dtype=torch.float32, device=h.device)
        grad_h = torch.empty(h.shape, dtype=torch.float32, device=h.device) if want_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=h.device) if want_w else None
        # One fp32 buffer reused by every chunk: on the CPU a fresh tensor this large is mapped from the OS
        # and page-faulted in every time, which made the logits matmul 1.8x slower.
        buf = torch.empty(min(chunk_rows, h.shape[0]), weight.shape[0], dtype=torch.float32, device=h.device)
        for i in range(0, h.shape[0], chunk_rows):
            rows = slice(i, i + chunk_rows)
            z = buf[:hc[rows].shape[0]]  # (n, V): this chunk's logits, the only large tensor
            if dtype == torch.float32:
                torch.mm(hc[rows], wc.T, out=z)
            else:
                z.copy_(hc[rows] @ wc.T)  # bf16 matmul, fp32 softmax
            z -= z.amax(-1, keepdim=True)  # shift each row by its max: exp() below cannot overflow
            z_t = z.gather(1, safe_t[rows]).squeeze(1)  # (n,) shifted target logits
            e = z.exp_()  # (n, V), in place: z is not needed any more
            sum_e = e.sum(-1)  # (n,)
            # -log softmax at the target = log sum_j exp(z_j) - z_target (the max shift cancels)
            loss += torch.where(counted[rows], sum_e.log() - z_t, 0.0).sum()
            if not (want_h or want_w):
                continue  # evaluation: the loss is all we need
            # d loss_row / d logits = softmax - one_hot(target). Ignored rows divide by +inf: their softmax,
            # and so their gradient, is exactly 0.
            g = e.div_(torch.where(counted[rows], sum_e, torch.inf)[:, None])
            g.scatter_add_(1, safe_t[rows], -counted[rows, None].float())  # (n, V)
            g = g.to(dtype)
            # Chain rule through logits = h @ W.T: d/dh = g @ W (n, d); d/dW = g.T @ h (V, d), summed.
            if want_h:
                grad_h[rows] = g @ wc
            if want_w and dtype == torch.float32:
                grad_w.addmm_(g.T, hc[rows])  # accumulates in place: no (V, d) temporary
            elif want_w:
                grad_w += g.T @ hc[rows]  # a bf16 product, summed into the fp32 accumulator
    return loss, grad_h, grad_w, counted.sum()


class LinearCrossEntropy(torch.autograd.Function):
    """mean over counted rows of cross_entropy(h @ weight.T, targets), with both gradients computed in the
    forward. The backward has nothing left to do but scale them by the incoming gradient (a scalar: the loss
    is a mean)."""

    @staticmethod
    def forward(ctx, h, weight, targets, ignore_index, chunk_rows):
        want_h, want_w = ctx.needs_input_grad[:2]
        loss, grad_h, grad_w, n = _chunked_linear_ce(h, weight, targets, ignore_index, chunk_rows,
                                                     want_h, want_w)
        n = n.clamp(min=1)  # every row ignored: loss 0 and zero gradients rather than 0 / 0
        ctx.save_for_backward(grad_h.div_(n).to(h.dtype) if want_h else None,
                              grad_w.div_(n).to(weight.dtype) if want_w else None)
        return loss / n

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_w = ctx.saved_tensors
        return (None if grad_h is None else grad_h * grad_loss,
                None if grad_w is None else grad_w * grad_loss,
                None, None, None)


def linear_cross_entropy(h, weight, targets, ignore_index=-100, chunk_rows=None):
    """F.cross_entropy(h @ weight.T, targets, ignore_index=ignore_index) without the (N, V) logits.
    h (N, d), weight (V, d), targets (N,). Without autograd (torch.no_grad, or nothing requires grad) it
    computes the loss alone; an autograd.Function cannot tell by itself (needs_input_grad ignores no_grad)."""
    chunk_rows = chunk_rows or LOSS_CHUNK_ROWS.get(h.device.type, LOSS_CHUNK_ROWS["cpu"])
    if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
        return LinearCrossEntropy.apply(h, weight, targets, ignore_index, chunk_rows)
    loss, _, _, n = _chunked_linear_ce(h, weight, targets, ignore_index, chunk_rows, False, False)
    return loss / n.clamp(min=1)


# ------------------------------------------------------------------------------------------------------------
# SMLMT episodes (paper §3.2): N content words, K support + Q query contexts each, the word replaced by
# [MASK]. An episode is an N-way classification task made from raw text: which of N words was masked here?
# Content words come from data/prepare.py (content_word_ids). Its CSR index: word i is the token
# index["words"][i], its positions index["positions"][index["offsets"][i]:index["offsets"][i + 1]], each far
# enough from either end of the split for its window to fit.


def sample_episode(tokens, index, n_way, k_shot, q_query, ctx, key, read="mask"):
    """One N-way K-shot episode, drawn from the seed sequence `key` alone (stream_key(seed, step, "episode",
    j)): the same key always gives the same episode.

    tokens: the corpus (1-D uint16 array); index: the CSR index above; ctx: tokens per example window.
    Returns a dict of int64 numpy arrays, rows grouped by word: word i (i = 0..N-1, in drawing order) owns
    rows i*K .. i*K+K-1 of the support arrays, rows i*Q .. i*Q+Q-1 of the query arrays, and row i of the
    (N, K+Q) arrays, whose first K columns are its support examples and last Q its query examples:
      support_x (N*K, ctx), support_y (N*K,)   windows (the occurrence replaced by MASK_ID) and labels
      query_x (N*Q, ctx),   query_y (N*Q,)     the same for the query set
      classes (N,)          classes[c] is the token id of the word behind label c
      positions (N, K+Q)    the corpus position of each masked occurrence
      mask_at (N, K+Q)      where the [MASK] sits inside its window
    Rules: N distinct words, drawn among those with >= K+Q indexed occurrences; the K+Q occurrences of a word
    are distinct positions (a query never repeats a support example); labels are a fresh random permutation
    per episode, so a label carries no word identity; only the chosen occurrence is masked. Raises UserError
    ("... content words ...") when fewer than N words have K+Q occurrences.
    Where the [MASK] sits follows where the head reads (`read`):
      mask: the window's last token. The head reads the hidden state AT the [MASK]; in a causal model nothing
            after it could reach that state, so the whole window is left context (no dead compute);
      last: a random offset with >= ctx/4 tokens on each side; the head reads the window's last token, which
            has attended to both sides of the mask."""
    rng = np.random.default_rng(key)  # every random choice below comes from this one generator
    counts = np.diff(index["offsets"])  # occurrences indexed per word
    eligible = np.flatnonzero(counts >= k_shot + q_query)
    if len(eligible) < n_way:
        raise UserError(f"only {len(eligible)} content words have >= K+Q = {k_shot + q_query} occurrences; "
                        f"need N = {n_way}. Use a larger corpus, lower --n_way, or relax --smlmt_min_count")
    chosen = rng.choice(eligible, size=n_way, replace=False)  # word slots in the index
    labels = rng.permutation(n_way)  # chosen[i] gets label labels[i]
    per_class = k_shot + q_query
    occ = np.stack([index["positions"][index["offsets"][w] + rng.choice(counts[w], per_class, replace=False)]
                    for w in chosen])  # (N, K+Q) distinct corpus positions of each word
    if read == "mask":
        mask_at = np.full(occ.shape, ctx - 1)  # (N, K+Q): the last token of every window
    else:  # a random offset per example: a last-token reader cannot learn "the answer is always at 8"
        mask_at = rng.integers(ctx // 4, ctx - ctx // 4, size=occ.shape)
    windows = np.asarray(tokens[(occ - mask_at)[..., None] + np.arange(ctx)], dtype=np.int64)  # (N, K+Q, ctx)
    # Only this occurrence is masked: if the word also appears elsewhere in the window it stays visible, a
    # shortcut to the answer.
    np.put_along_axis(windows, mask_at[..., None], MASK_ID, axis=-1)
    y = np.repeat(labels[:, None], per_class, axis=1)  # (N, K+Q): row i is word i's label
    classes = np.empty(n_way, dtype=np.int64)
    classes[labels] = index["words"][chosen]  # invert the permutation: classes[label] = that word's token id
    # The first K occurrences of each word are its support set, the remaining Q its query set.
    return dict(support_x=windows[:, :k_shot].reshape(-1, ctx), support_y=y[:, :k_shot].reshape(-1),
                query_x=windows[:, k_shot:].reshape(-1, ctx), query_y=y[:, k_shot:].reshape(-1),
                classes=classes, mask_at=mask_at, positions=occ)


def smlmt_ctx(args):
    """Tokens per episode example: --smlmt_ctx, or (0) sized so that a meta micro-step reads about as many
    backbone tokens as an AR one, N * (K + Q) * width ~ batch_size * seq_len. Either is raised to 16, so that
    even a small batch leaves every example some context (all of it to the left under --read mask), then
    capped at --seq_len and prepare.SMLMT_MARGIN (256): a --seq_len under 16 gives --seq_len."""
    width = args.smlmt_ctx or args.batch_size * args.seq_len // (args.n_way * (args.k_shot + args.q_query))
    return int(min(max(width, 16), args.seq_len, prepare.SMLMT_MARGIN))


def episode_tensors(tokens, index, args, key, device):
    """sample_episode with the run's settings, as device tensors, plus support_at (N*K,) and query_at (N*Q,):
    the [MASK] position of each support / query row."""
    ep = sample_episode(tokens, index, args.n_way, args.k_shot, args.q_query, smlmt_ctx(args), key, args.read)
    at = ep["mask_at"]  # (N, K+Q)
    ep = dict(ep, support_at=at[:, :args.k_shot].reshape(-1), query_at=at[:, args.k_shot:].reshape(-1))
    keys = ("support_x", "support_y", "query_x", "query_y", "classes", "support_at", "query_at")
    return dict(zip(keys, to_device([ep[k] for k in keys], device)))  # one copy that never blocks the host


# ------------------------------------------------------------------------------------------------------------
# First-order MAML (paper §3.3, Algorithm 1): an MLP head adapts to the support set; the query loss at the
# adapted head trains the backbone and the head's initialisation. Then the other branch: a next-token step.

def make_head(d_model, n_way, hidden=128, n_layers=4, dropout=0.0, init="proto", vocab_size=None):
    """`body`: d -> 128 -> 128 -> 128 (3 linear layers, ReLU, dropout), shared by all classes, so the label
    order cannot hurt it; plus `out`, a learned last layer: N-way (init="learned"), over the vocabulary
    ("vocab"), or none ("proto": built from the support set every episode). Xavier-uniform weights,
    torch-default biases."""
    layers, width = [], d_model
    for _ in range(n_layers - 1):
        # at p = 0 an Identity: the same values, without a dropout op per layer on every call of the body
        layers += [nn.Linear(width, hidden), nn.ReLU(), nn.Dropout(dropout) if dropout else nn.Identity()]
        width = hidden
    head = nn.ModuleDict(dict(body=nn.Sequential(*layers)))
    if init != "proto":
        head["out"] = nn.Linear(width, n_way if init == "learned" else vocab_size)
    for p in head.parameters():
        if p.dim() > 1:
            nn.init.xavier_uniform_(p)
    return head


def episode_init(head, support_feats, support_labels, classes, init, tied=False):
    """phi_0, this episode's starting weights, as {name: tensor}: "body.<i>.weight" / "body.<i>.bias", the
    body's own parameters (the same tensors, not copies), plus a last layer set by `init`. support_feats (N*K,
    d), support_labels (N*K,) int64 with labels 0..N-1, each with K rows; classes (N,) the token ids of the
    labels (read by "vocab"; without them, N is the largest label + 1).
      proto: z = body(support_feats) in fp32 (the layer-3 activations); mu_c = mean of z over the rows
             labelled c, (N, h). Untied: out.weight = 2 mu (N, h), out.bias = -||mu_c||^2 (N,), so the logits
             are -||z - mu_c||^2 + ||z||^2 (nearest prototype). tied=True (--inner_loop layerwise): out.proto
             = mu (N, h), which head_logits scores as -||z - P_c||^2, so the inner loop moves prototypes and
             the head stays a nearest-prototype classifier.
      learned: out.weight, out.bias = head["out"]'s parameters themselves.
      vocab: rows classes[c] of head["out"] (its weight (V, h) and bias (V,)), in label order.
    Gradients flow back through every entry: into the body directly, and for "proto" also through mu (the
    support features carry no backbone graph)."""
    phi = {f"body.{k}": p for k, p in head["body"].named_parameters()}
    if init == "proto":
        z = functional_call(head["body"], dict(head["body"].named_parameters()), (support_feats.float(),))
        # N from the shape of `classes` on the training path: reading it from the labels (or counting them
        # with bincount) would make the host wait for the device.
        n_way = len(classes) if classes is not None else int(support_labels.max()) + 1
        mu = torch.zeros(n_way, z.shape[1], device=z.device).index_add(0, support_labels, z)
        count = torch.zeros(n_way, device=z.device).index_add(0, support_labels, torch.ones_like(z[:, 0]))
        mu = mu / count[:, None]  # (N, h): class means
        if tied:
            phi["out.proto"] = mu
        else:
            phi["out.weight"], phi["out.bias"] = 2 * mu, -(mu * mu).sum(-1)
    elif init == "learned":
        phi["out.weight"], phi["out.bias"] = head["out"].weight, head["out"].bias
    else:  # vocab: the rows of this episode's class words, in label order (classes[c] = word id of label c)
        phi["out.weight"], phi["out.bias"] = head["out"].weight[classes], head["out"].bias[classes]
    return phi


def head_logits(head, phi, feats):
    """The head as a function of its weights: feats (n, d) -> logits (n, N); with prototypes P (N, h) the
    logits are 2 z.P - ||P||^2 = -||z - P||^2 + ||z||^2 (nearest prototype: the ||z||^2 is the same for
    every class)."""
    z = functional_call(head["body"], {k[5:]: v for k, v in phi.items() if k.startswith("body.")}, (feats,))
    if "out.proto" in phi:
        P = phi["out.proto"]
        return F.linear(z, 2 * P, -(P * P).sum(-1))
    return F.linear(z, phi["out.weight"], phi["out.bias"])


def inner_lrs(args):
    """The inner loop's step sizes: one float for all four layers (the paper's plain SGD), or per layer
    group {"body": lr of layers 1-3, "out": lr of the last layer} (--inner_loop layerwise)."""
    return args.inner_lr if args.inner_loop == "sgd" else dict(body=args.inner_lr, out=args.inner_lr_out)


def inner_loop(head, phi0, support_feats, support_labels, steps, lr, backtrack=False):
    """`steps` SGD steps of the head on the support set, in fp32, from phi0 ({name: tensor}, episode_init's).
    support_feats (N*K, d) arrive without a graph (meta_micro_step computes them under no_grad);
    support_labels (N*K,) int64. The support loss is F.cross_entropy(head_logits(head, phi, feats), labels);
    its gradient is torch.autograd.grad (never .backward(): head.grad holds only the meta-gradient), under
    torch.enable_grad() with autocast off (callers may run under no_grad or bf16 autocast). lr: one float for
    every entry, or {"body": lr, "out": lr} keyed by the name's first part (inner_lrs); a missing group means
    0, and an entry whose step is 0 (the body with {"body": 0}: ANIL) comes back as it is. backtrack=True
    (--inner_loop layerwise): a step whose support loss is above the loss before it is undone (the weights
    stay where they were) and the step sizes of both groups halve for every later step; an undone step counts
    as one of `steps`, and the last step is judged too, so the support loss never goes up.

    Returns phi_T as {name: tensor} with phi0's keys, for head_logits(). First order: no graph links the
    steps, and each entry is phi_0 + (phi_T - phi_0).detach(): the value phi_T, the gradient handed to phi_0
    unchanged (d phi_T / d phi_0 = I: the FOMAML meta-gradient). The head's own tensors are never modified.
    The hot path, graded with this lesson (tests/test_hot_path.py): no host sync (no Python `if`, bool(),
    float() or .item() on a tensor: backtracking chooses with torch.where); the moving entries as ONE flat
    vector; and a step judged by the loss that the next step computes anyway (one more forward after the last
    step), so that backtracking adds a few ops per step whatever the head's depth. Why a step per layer group
    and backtracking: RESULTS.md, "Ablations of the defaults"."""
    feats = support_feats.detach().float()  # (N*K, d): no gradient reaches the backbone from the support set
    lr_of = {k: (lr if not isinstance(lr, dict) else lr.get(k.split(".")[0], 0.0)) for k in phi0}
    moving = [k for k in phi0 if lr_of[k] != 0]
    if not (moving and steps):
        return dict(phi0)
    # The moving weights as ONE fresh vector theta (P,): the head itself is never modified (nothing to
    # restore, unlike pico-maml), and a step is a few operations on theta, not a few per weight tensor.
    sizes = [phi0[k].numel() for k in moving]
    theta = torch.cat([phi0[k].detach().reshape(-1) for k in moving])
    rate = torch.cat([torch.full((n,), float(lr_of[k]), device=feats.device) for k, n in zip(moving, sizes)])

    def weights(theta):  # theta (P,) -> {name: tensor}: views of its pieces, the fixed entries as they are
        pieces = dict(zip(moving, theta.split(sizes)))
        return {k: pieces[k].view_as(p) if k in pieces else p.detach() for k, p in phi0.items()}

    def support_loss(theta):
        return F.cross_entropy(head_logits(head, weights(theta), feats), support_labels)

    best = last = last_grad = None  # backtracking: the loss, point and gradient to return to
    # fp32 even under bf16 autocast: a few SGD steps on a small MLP are cheap, and bf16 would round them away.
    with torch.enable_grad(), torch.autocast(feats.device.type, enabled=False):
        for t in range(steps):
            theta.requires_grad_()
            loss = support_loss(theta)
            grad, = torch.autograd.grad(loss, theta)
            theta, loss = theta.detach(), loss.detach()  # first order: no graph through the steps
            if backtrack and t > 0:  # undo a step that raised the loss, halve the rest: torch.where, no sync
                up = loss > best
                theta, grad = torch.where(up, last, theta), torch.where(up, last_grad, grad)
                rate, loss = torch.where(up, rate / 2, rate), torch.where(up, best, loss)
            if backtrack:  # return here if the next step raises the loss
                best, last, last_grad = loss, theta, grad
            theta = theta - rate * grad  # phi_t = phi_{t-1} - lr * grad
        if backtrack:  # judge the last step too: one more loss, no gradient
            with torch.no_grad():
                theta = torch.where(support_loss(theta) > best, last, theta)
    # Value phi_T, gradient path to phi_0 with Jacobian I: the straight-through form of FOMAML.
    fast = weights(theta)
    return {k: p + (fast[k] - p).detach() for k, p in phi0.items()}


def accuracy(logits, labels):
    return (logits.argmax(-1) == labels).float().mean()


def read_at(h, mask_at, read):
    """h (n, T, d) -> (n, d) in fp32 at the position the head reads: the [MASK] (read="mask", mask_at (n,))
    or the last token (read="last")."""
    return (h[torch.arange(len(h), device=h.device), mask_at] if read == "mask" else h[:, -1]).float()


def read_features(model, x, mask_at, read):
    return read_at(model(x, return_hidden=True), mask_at, read)  # x (n, T) -> (n, d)


def meta_micro_step(model, head, ep, args, scale, amp):
    """One SMLMT episode -> the N-way query loss at the adapted head, times scale, back-propagated once:
    backbone.grad += scale x d L_query / d backbone (the support set sends it nothing), head.grad += scale x
    the FOMAML meta-gradient; the LM head gets none, and the [MASK] embedding gets gradients only here (AR
    batches never contain it). `model` may be compiled; `ep` holds device tensors (episode_tensors). Returns
    0-d tensors: loss_query and adaptation_stats at phi_0 (_pre) and phi_T (_post), without dropout."""
    # Support: ONE forward, no graph. The backbone is fixed during adaptation and has no dropout, so
    # pico-maml's recomputation at every inner step would produce these same features --inner_steps times.
    with torch.no_grad(), amp:
        hs = read_features(model, ep["support_x"], ep["support_at"], args.read)  # (N*K, d)
    layerwise = args.inner_loop == "layerwise"  # tied prototypes, backtracking
    phi0 = episode_init(head, hs, ep["support_y"], ep["classes"], args.head_init, layerwise)
    adapted = inner_loop(head, phi0, hs, ep["support_y"], args.inner_steps, inner_lrs(args), layerwise)
    # Query: a forward WITH a graph; its loss at the adapted head is the meta-objective.
    with amp:
        hq = read_features(model, ep["query_x"], ep["query_at"], args.read)  # (N*Q, d), with grad
    loss = F.cross_entropy(head_logits(head, adapted, hq), ep["query_y"])  # scalar, N-way CE
    # backbone.grad += d loss / d backbone (through hq); head.grad += d loss / d phi_T (through `adapted` and
    # phi0). Scaled by 1 / (grad_accum * world): gradients summed over micro-steps and ranks are then a mean.
    (loss * scale).backward()
    with torch.no_grad():  # support loss and accuracies before and after adaptation, in eval mode
        head.eval()
        phi0 = episode_init(head, hs, ep["support_y"], ep["classes"], args.head_init, layerwise)  # eval mode
        stats = dict(loss_query=loss.detach(), **adaptation_stats(head, phi0, adapted, hs, ep["support_y"],
                                                                  hq.detach(), ep["query_y"]))
        head.train()
    return stats


def adaptation_stats(head, phi0, adapted, hs, sy, hq, qy):
    """Did the inner loop fit the support set, and did that help the query? Support loss and support / query
    accuracy at phi_0 (_pre) and phi_T (_post)."""
    out = {}
    for tag, phi in (("pre", phi0), ("post", adapted)):
        s = head_logits(head, phi, hs)
        out.update({f"loss_support_{tag}": F.cross_entropy(s, sy), f"acc_support_{tag}": accuracy(s, sy),
                    f"acc_query_{tag}": accuracy(head_logits(head, phi, hq), qy)})
    return out


def ar_micro_step(model, x, y, scale, amp):
    """One next-token micro-step on x, y (B, T): the loss, back-propagated (x scale) into the backbone."""
    with amp:
        _, loss = model(x, y)
    (loss * scale).backward()
    return dict(loss_ar=loss.detach())


# ------------------------------------------------------------------------------------------------------------
# Learning dynamics and evaluation (paper §3.3 "every 100 steps ... singular values", §6): proportional
# effective rank (PER) of weights and gradients and attention-head entropy on a fixed probe batch; eval
# perplexity; the held-out few-shot eval. All run on the raw (uncompiled) model, between optimizer steps.

def effective_rank(W):
    """W (m, n), any float dtype, gradients ignored -> ER as a Python float: exp(H(p)) with p = sigma /
    sum(sigma) over W's min(m, n) singular values (the values, not their squares; Roy & Vetterli 2007) and H
    the natural-log entropy. Zero singular values contribute 0 (0 log 0 = 0, never NaN); an all-zero matrix
    has ER 0. ER is invariant to scaling W; it is k for k equal non-zero singular values, 1 for rank one."""
    s = torch.linalg.svdvals(W.detach().float())  # (min(m, n),), descending, >= 0
    total = s.sum()
    if total <= 0:
        return 0.0
    # entr(p) = -p log p with entr(0) = 0: exactly-zero singular values add nothing instead of NaN.
    return math.exp(torch.special.entr(s / total).sum().item())


def proportional_effective_rank(W):
    """PER = ER / min(W.shape), in [0, 1]: 1 for a flat spectrum, 1/min(shape) for rank one, 0 for W = 0."""
    return effective_rank(W) / min(W.shape)


@torch.no_grad()
def attention_entropy(model, idx):
    """(n_layers, n_heads) fp32: per head, the mean over the batch and the query positions of the entropy
    -sum_j a_ij log a_ij (nats, 0 log 0 = 0) of its causal attention on idx (B, T): log(t+1) for uniform
    attention over the t+1 visible keys, 0 for a single key. The probabilities are recomputed explicitly
    (scaled_dot_product_attention never materialises them), each layer fed the real block's output."""
    T = idx.shape[1]
    cos, sin = model.rope_cos[:T], model.rope_sin[:T]
    causal = torch.ones(T, T, dtype=torch.bool, device=idx.device).tril()  # (T, T): query t sees keys 0..t
    x, out = model.embedding_proj(idx), []
    for layer in model.layers:
        attn = layer.attention
        q, k, _ = attn.qkv(layer.attention_norm(x), cos, sin)
        # (B, H, T, hd): kv head g serves 3 q heads
        k = k.repeat_interleave(attn.n_heads // attn.n_kv_heads, dim=1)
        scores = (q.float() @ k.float().transpose(-2, -1)) / math.sqrt(attn.head_dim)
        probs = scores.masked_fill(~causal, float("-inf")).softmax(-1)  # (B, H, T, T)
        # entropy of each row (B, H, T), then the mean over batch and query positions -> (H,)
        out.append(torch.special.entr(probs).sum(-1).mean(dim=(0, 2)))
        x = layer(x, cos, sin)
    return torch.stack(out)


def learning_dynamics(model, probe_x, probe_y, modules, amp, rank=0, world=1):
    """{metric name: value} on the probe batch: PER and ER of `modules`' weights and next-token-loss gradients
    in every layer, pico-maml's attention-wide variant (ref/...), and attention entropy. It writes and then
    clears the model's .grad, so call it between optimizer steps, never during gradient accumulation. With
    world > 1 every rank calls it: rank r takes every world-th spectrum and one all-reduce gathers them, so no
    rank computes alone while the others wait in the next collective."""
    names = [f"layers.{i}.{m}" for i in range(model.cfg.n_layers) for m in modules]
    mats = dict(model.named_parameters())
    attn = [n for n in mats if ".attention." in n]
    # One spectrum per distinct matrix, keyed (what, name): each weight once (the attention-wide ref/ metrics
    # below reuse the modules' v and o weights), the gradient of the next-token loss for `names`, the
    # gradient of logits.mean() for `attn`.
    spectra = [("weight", n) for n in dict.fromkeys([n + ".weight" for n in names] + attn)]
    spectra += [("loss", n) for n in names] + [("mean", n) for n in attn]
    matrix = {("weight", n): W for n, W in mats.items()}  # (what, name) -> the matrix of that spectrum
    model.zero_grad(set_to_none=True)
    with amp:
        _, loss = model(probe_x, probe_y)
    loss.backward()  # the gradient of the next-token loss (RoPE on, the model's own context length)
    matrix.update({("loss", n): mats[n + ".weight"].grad for n in names})
    # pico-maml's analysis (the ref/ metrics): the mean over every q/k/v/o matrix, with the gradient of
    # logits.mean() (not of the loss).
    model.zero_grad(set_to_none=True)
    with amp:
        logits, _ = model(probe_x)
    logits.mean().backward()
    matrix.update({("mean", n): mats[n].grad for n in attn})
    model.zero_grad(set_to_none=True)
    ers = torch.tensor([effective_rank(matrix[key]) if i % world == rank else 0.0
                        for i, key in enumerate(spectra)], dtype=torch.float64, device=probe_x.device)
    if world > 1:  # a sum gathers them: each spectrum is nonzero on one rank only
        dist.all_reduce(ers)
    er = dict(zip(spectra, ers.tolist()))
    out = {}
    for n in names:
        shape = mats[n + ".weight"].shape  # PER = ER / min(shape): the same spectrum
        er_w, er_g = er[("weight", n + ".weight")], er[("loss", n)]
        out[f"per_weight/{n}"], out[f"per_grad/{n}"] = er_w / min(shape), er_g / min(shape)
        out[f"er_weight/{n}"], out[f"er_grad/{n}"] = er_w, er_g
    for kind, what in (("weight", "weight"), ("grad", "mean")):
        vals = [er[(what, n)] for n in attn]
        out[f"ref/per_{kind}_attn"] = float(np.mean([e / min(mats[n].shape) for e, n in zip(vals, attn)]))
        out[f"ref/er_{kind}_attn"] = float(np.mean(vals))
    ent = attention_entropy(model, probe_x)
    out["attn_entropy"] = [[round(v, 5) for v in row] for row in ent.tolist()]  # (layers, heads)
    out["attn_entropy_mean"] = ent.mean().item()
    return out


def evaluate(model, batches, amp, rank, world):
    """Mean next-token loss over fixed batches, sharded over ranks and all-reduced; -> (loss, perplexity)."""
    model.eval()
    tot = torch.zeros(2, dtype=torch.float64, device=batches[0][0].device if batches else "cpu")
    with torch.no_grad(), amp:
        for i in range(rank, len(batches), world):
            x, y = batches[i]
            _, loss = model(x, y)
            tot += torch.stack([loss.double() * y.numel(), torch.tensor(y.numel(), dtype=torch.float64,
                                                                         device=tot.device)])
    if world > 1:
        dist.all_reduce(tot)
    model.train()
    mean = (tot[0] / tot[1]).item()
    return mean, math.exp(min(mean, 50.0))


# Held-out few-shot eval ("learning to learn"): does the BACKBONE make new episodes easier? Fixed episodes
# from the held-out split, a fresh head with a fixed seed, the same inner loop. Identical for every run, seed
# and resume, so a MAML run and its vanilla twin are scored on the same tasks with the same head.

FEWSHOT_KEY = 20250802  # their seed, never --seed (prepare.BIN_MAGIC: the same number, unrelated)


def fewshot_eval(model, head_args, episodes, amp):
    """{eval_fewshot_acc_pre, eval_fewshot_acc, eval_fewshot_loss_support_pre / _post, eval_proto_acc_mask,
    eval_proto_acc_prev}: means over `episodes`. The last two need no head: nearest class mean of the raw
    features (d) at the [MASK] and at the token before it (what a next-token model reads naturally). Runs on
    the raw model, without dropout."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(FEWSHOT_KEY)
        head = make_head(model.cfg.d_model, head_args.n_way, head_args.head_hidden, head_args.head_layers,
                         head_args.head_dropout, head_args.head_init, model.cfg.vocab_size)
    head = head.to(model.rope_cos.device).eval()
    layerwise = head_args.inner_loop == "layerwise"  # tied prototypes, backtracking, as in training
    model.eval()
    names = dict(acc_query_pre="eval_fewshot_acc_pre", acc_query_post="eval_fewshot_acc",  # stats -> record
                 loss_support_pre="eval_fewshot_loss_support_pre",
                 loss_support_post="eval_fewshot_loss_support_post")
    sums = dict.fromkeys([*names.values(), "eval_proto_acc_mask", "eval_proto_acc_prev"], 0.0)
    for ep in episodes:
        with torch.no_grad(), amp:
            hs, hq = (model(ep[f"{s}_x"], return_hidden=True).float() for s in ("support", "query"))
        for name, shift in (("mask", 0), ("prev", 1)):  # nearest prototype on raw features, no training
            fs = read_at(hs, ep["support_at"] - shift, "mask")
            fq = read_at(hq, ep["query_at"] - shift, "mask")
            mu = torch.stack([fs[ep["support_y"] == c].mean(0) for c in range(head_args.n_way)])  # (N, d)
            sums[f"eval_proto_acc_{name}"] += accuracy(-torch.cdist(fq, mu), ep["query_y"]).item()
        fs = read_at(hs, ep["support_at"], head_args.read)
        fq = read_at(hq, ep["query_at"], head_args.read)
        phi0 = {k: v.detach() for k, v in episode_init(head, fs, ep["support_y"], ep["classes"],
                                                       head_args.head_init, layerwise).items()}
        adapted = inner_loop(head, phi0, fs, ep["support_y"], head_args.inner_steps, inner_lrs(head_args),
                             layerwise)
        with torch.no_grad():
            stats = adaptation_stats(head, phi0, adapted, fs, ep["support_y"], fq, ep["query_y"])
        for k, name in names.items():
            sums[name] += stats[k].item()
    model.train()
    return {k: v / len(episodes) for k, v in sums.items()}


# ------------------------------------------------------------------------------------------------------------
# Training loop (Algorithm 1, App. A.1). No DDP wrapper: each rank accumulates its own gradients, and once per
# optimizer step all_reduce_ averages them over exactly the parameters the branch used (the same set on every
# rank, because the branch is). Unused parameters keep grad None, so AdamW skips them.

def is_meta_step(seed, step, ratio):
    """The branch of optimizer step `step`: meta with probability `ratio`, else AR."""
    return bool(ratio > 0 and stream_rng(seed, step, "branch").random() < ratio)


def choose_branch(args, step, run):
    """Algorithm 1, line 3: rank 0 draws this step's branch and broadcasts it; every rank uses what it
    receives. One branch for the whole step (every micro-step, every rank) makes the set of parameters with
    gradients the same everywhere, which is what makes a plain all-reduce correct. -> "meta" or "ar"."""
    drawn = run.rank == 0 and is_meta_step(args.seed, step, args.hybrid_ratio)
    if run.world == 1:
        return "meta" if drawn else "ar"
    # A host sync per step (a copy in, .item() out): the host must know the branch before it queues anything.
    meta = torch.tensor([int(drawn)], device=run.device)
    dist.broadcast(meta, src=0)
    return "meta" if meta.item() else "ar"


def lr_at(step, args):
    """Linear warm-up from lr/warmup to lr, then constant, cosine or linear decay to min_lr_frac * lr."""
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    if args.lr_schedule == "constant":
        return args.lr
    frac = min(1.0, (step - args.warmup_steps) / max(1, args.max_steps - args.warmup_steps))
    lo = args.min_lr_frac
    decay = 0.5 * (1 + math.cos(math.pi * frac)) if args.lr_schedule == "cosine" else 1 - frac
    return args.lr * (lo + (1 - lo) * decay)


def is_due(done, every, args):
    """Is a task that runs every `every` steps (0 = never) due after step `done`? The last step always is."""
    return bool(every) and (done % every == 0 or done == args.max_steps)


@dataclass
class Run:
    """What setup() builds once for the loop (and the benchmark)."""
    rank: int
    local_rank: int
    world: int
    device: torch.device
    corpus: str  # the prepared corpus folder
    tokens: np.ndarray  # train.bin, memmapped
    index: dict  # the SMLMT index that feeds sample_episode (None for a vanilla run)
    orig_model: nn.Module  # the Decoder: saved, evaluated and probed
    model: nn.Module  # the same weights, compiled with --compile: what the micro-steps call
    head: nn.ModuleDict  # the MLP head, whose parameters are the meta-learned initialisation
    params: list  # backbone + head: what AdamW steps
    optimizer: torch.optim.Optimizer
    amp: object  # the autocast context (or a nullcontext in fp32)
    scale: float  # 1 / (grad_accum * world): the all-reduced SUM of gradients is then the global-batch mean
    micro_tokens: dict  # backbone tokens of one micro-step of each branch: {"meta": ..., "ar": ...}
    probe: tuple  # the fixed probe batch of learning dynamics: x, y (probe_batch, seq_len)
    modules: list  # the per-layer matrices whose PER is logged


def train(args, stop=None, argv=()):
    """The run. `stop` is stop_signals()'s flag (main() installs the handlers); `argv`, the resume hint's."""
    stop = stop or dict(signum=0, armed=False)
    resume = wants_resume(args)  # may refuse; nothing in --out_dir has been touched yet
    run = setup(args)
    start, counters = resume_or_start(run, args, resume)
    logbook = open_logbook(run, args, start, counters)  # config.json, fixed eval data, step 0's dynamics
    done, stopping = start, 0
    stop["armed"] = True  # from here on a signal means "finish the step and save" (stop_signals)
    for step in logbook.bar:  # range(start, max_steps)
        branch = choose_branch(args, step, run)
        starts = (None if branch == "meta"
                  else batch_indices(args.seed, step, len(run.tokens), args.seq_len, args.global_batch))
        for micro in range(args.grad_accum):  # gradients accumulate in .grad across micro-steps
            j = micro * run.world + run.rank  # this micro-step's slot in the global batch
            torch.manual_seed(torch_seed(args.seed, step, j))  # the head's dropout masks
            if branch == "meta":  # one episode per micro-step per rank: a meta-batch of grad_accum x world
                ep = episode_tensors(run.tokens, run.index, args, stream_key(args.seed, step, "episode", j),
                                     run.device)
                stats = meta_micro_step(run.model, run.head, ep, args, run.scale, run.amp)
            else:
                x, y = get_batch(run.tokens, micro_slice(starts, micro, run.rank, run.world, args.batch_size),
                                 args.seq_len, run.device)
                stats = ar_micro_step(run.model, x, y, run.scale, run.amp)
            logbook.add(stats, loss_mixed=stats["loss_query" if branch == "meta" else "loss_ar"])
        # Only the parameters this branch used have a .grad (the LM head idles on meta steps, the head on AR).
        params = [p for p in run.params if p.grad is not None]
        all_reduce_([p.grad for p in params], run.world)
        if branch == "meta":  # the FOMAML meta-gradient of the head init, before clipping and zeroing
            logbook.add(head_grad_norm=torch.linalg.vector_norm(torch.stack(
                [p.grad.norm() for p in run.head.parameters()])))
        if args.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, args.grad_clip)
        for group in run.optimizer.param_groups:
            group["lr"] = lr_at(step, args)
        run.optimizer.step()
        run.optimizer.zero_grad(set_to_none=True)  # None, not zeros: a zero gradient still moves by momentum
        n_tok = run.micro_tokens[branch] * args.grad_accum * run.world  # backbone tokens: "equal compute"
        counters["tokens"] += n_tok
        counters[f"tokens_{branch}"] += n_tok
        done, stopping = step + 1, stop_requested(stop, run.world, run.device)  # a signal on any rank
        logbook.n_steps[branch] += 1
        if stopping:  # a scheduler's grace period may be short: the checkpoint first, then no eval or probe
            save(run, args, done, counters)
            logbook.write(logbook.window(run, args, done, counters), run.rank)
            break
        # What the paper measures, when it is due: eval perplexity and the held-out few-shot eval, and the
        # learning-dynamics probe. The logbook writes them with the window's training means.
        eval_now, probe_now = is_due(done, args.eval_every, args), is_due(done, args.dynamics_every, args)
        if is_due(done, args.log_every, args) or eval_now or probe_now:
            record = logbook.window(run, args, done, counters)  # means over micro-steps and ranks
            if eval_now:
                record["eval_loss"], record["eval_ppl"] = evaluate(run.orig_model, logbook.evals, run.amp,
                                                                   run.rank, run.world)
                if run.rank == 0 and logbook.fewshots:
                    record.update(fewshot_eval(run.orig_model, args, logbook.fewshots, run.amp))
            if probe_now:  # on every rank: they share the spectra
                record.update(learning_dynamics(run.orig_model, *run.probe, run.modules, run.amp, run.rank,
                                                run.world))
            logbook.write(record, run.rank)
        if is_due(done, args.save_every, args):
            save(run, args, done, counters)
    stop["armed"] = False
    finish(run, args, logbook, counters, done, stopping, argv)


# ============================================================================================================
# APPENDIX: the plumbing. Nothing below is the method; it makes runs reproducible, restartable and fast.
# ============================================================================================================

# ------------------------------------------------------------------------------------------------------------
# The command line. The presets at the top are its defaults, which --help shows beside each setting.

def build_parser():
    p = argparse.ArgumentParser(description="FOMAML + next-token pretraining of a Llama-style decoder "
                                "(arXiv 2508.02189).", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--size", choices=list(SIZES), help="width and the released recipe (none: the CPU demo); the defaults "
      "shown are those of the chosen size")
    a("--data", help="toy (offline toy world), a local corpus (a .parquet / .jsonl[.gz] / .json[.gz] / .txt "
      "file, a folder or a glob of them), or a hub dataset ID[:CONFIG]")
    a("--text_field", default="text", help="the text column of a parquet or json corpus")
    a("--data_dir", default=os.path.join(HERE, "data", "cache"), help="where prepared corpora are cached")
    a("--max_tokens", type=int, default=1_000_000_000, help="tokens to take from a hub or local corpus")
    a("--prep_procs", type=int, default=1, help="processes tokenizing a corpus (the files do not depend on "
      "it)")
    a("--toy_docs", type=int, default=30_000, help="paragraphs in the toy world corpus (30k ~ 2.3M tokens)")
    a("--d_model", type=int, help="width (a multiple of 24: 12 heads, even head_dim)")
    a("--n_layers", type=int, default=12, help="layers (12 in every paper size)")
    a("--out_dir", help="run folder: ckpt.pt, metrics.jsonl, config.json")
    # optimisation
    a("--max_steps", type=int, help="optimizer steps")
    a("--batch_size", type=int, help="sequences per micro-step per process")
    a("--grad_accum", type=int, help="micro-steps per optimizer step (None: global_batch / (batch_size x "
      "processes))")
    a("--global_batch", type=int, help="sequences per optimizer step, all processes together (None: "
      "batch_size x processes x grad_accum); given, it sets grad_accum and must divide")
    a("--seq_len", type=int, help="tokens per training sequence (also the model's max length)")
    a("--lr", type=float, help="peak AdamW learning rate")
    a("--warmup_steps", type=int, help="linear warm-up steps")
    a("--lr_schedule", choices=["constant", "cosine", "linear"], help="after warm-up; decays end at "
      "--min_lr_frac x lr")
    a("--min_lr_frac", type=float, default=0.1, help="final lr / peak lr for cosine and linear decay")
    a("--weight_decay", type=float, default=0.01, help="AdamW weight decay")
    a("--grad_clip", type=float, default=0.0, help="clip the global grad norm (0 = off, as in the paper)")
    a("--seed", type=int, default=1337, help="seeds everything; batches and episodes are functions of it")
    a("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    a("--dtype", default="auto", choices=["auto", "float32", "bfloat16"], help="autocast (auto: CUDA bf16)")
    a("--compile", action="store_true", help="torch.compile the backbone")
    a("--resume", nargs="?", const="continue", choices=["continue", "auto"], help="continue the run in "
      "--out_dir; auto: continue if it has a checkpoint, else start fresh")
    a("--overwrite", action="store_true", help="start over in an --out_dir that holds a run (kept as "
      "*.prev.* until the new run's first checkpoint)")
    # logging and evaluation
    a("--log_every", type=int, help="optimizer steps per logging window")
    a("--save_every", type=int, help="steps between checkpoints (and at the end)")
    a("--eval_every", type=int, help="steps between eval perplexity and few-shot evals (0 = never)")
    a("--eval_batches", type=int, help="fixed eval batches of --batch_size sequences")
    a("--eval_data", choices=["paloma", "val"], help="paloma: pico-lm/pretokenized-paloma-tinsy (the "
      "held-out split if unavailable); val: the held-out split")
    a("--dynamics_every", type=int, help="steps between learning-dynamics probes (0 = never)")
    a("--dynamics_modules", default="attention.v_proj,attention.o_proj,swiglu.w_2",
      help="per-layer matrices whose weight and gradient PER are logged")
    a("--probe_batch", type=int, default=4, help="sequences in the fixed probe batch")
    a("--wandb", nargs="?", const="maml-gpt", metavar="PROJECT", help="also log to Weights & Biases")
    # the meta-learning branch (§3.2-3.3)
    a("--hybrid_ratio", type=float, default=0.5, help="probability that a step is a meta step (0 = vanilla)")
    a("--n_way", type=int, default=32, help="N: classes (content words) per episode")
    a("--k_shot", type=int, default=4, help="K: support examples per class")
    a("--q_query", type=int, default=4, help="query examples per class (distinct from the support ones)")
    a("--inner_steps", type=int, default=10, help="SGD steps of the head on the support set")
    a("--inner_loop", default="layerwise", choices=["layerwise", "sgd"],
      help="layerwise: the last layer (a proto head's prototypes) steps by --inner_lr_out, layers 1-3 by "
           "--inner_lr, and a step that raises the support loss is undone and the next halved (RESULTS.md); "
           "sgd: the paper's plain SGD, one --inner_lr for all four layers (proto: W = 2 mu, b = -||mu||^2)")
    a("--inner_lr", type=float, default=0.001,
      help="inner SGD step of the head's layers 1-3 (--inner_loop sgd: of all four layers; released runs: "
           "0.01, paper text: 0.001)")
    a("--inner_lr_out", type=float, default=10.0,
      help="--inner_loop layerwise: inner SGD step of the head's last layer (the prototypes; set for N = 32: "
           "at near-uniform logits a step expands them by ~1 + 2 lr / N, so scale it with N; 30 diverges)")
    a("--head_hidden", type=int, default=128, help="hidden width of the MLP head")
    a("--head_layers", type=int, default=4, help="linear layers in the MLP head")
    a("--head_dropout", type=float, default=0.0, help="dropout in the MLP head (paper text: 0.1)")
    a("--head_init", default="proto", choices=["proto", "learned", "vocab"], help="the head's last layer: "
      "from support class means, meta-learned N-way, or the released code's token-id rows")
    a("--read", default="mask", choices=["mask", "last"], help="where the head reads the backbone: at the "
      "[MASK] (window = left context) or the window's last token")
    a("--fewshot_episodes", type=int, default=8, help="held-out episodes of the few-shot eval (0 = off)")
    a("--smlmt_ctx", type=int, default=0, help="tokens per episode example (0: a meta micro-step the size "
      "of an AR one)")
    a("--smlmt_skip_top", type=int, default=100, help="content words exclude the most frequent tokens")
    a("--smlmt_min_count", type=int, default=20, help="content words need this many occurrences")
    a("--smlmt_max_occ", type=int, default=1000, help="occurrences kept per word in the SMLMT index")
    return p


def parse_args(argv=None, parser=None):
    """The command line over the preset of its --size: explicit flags always win. `parser` (build_parser()
    with more arguments) lets bench.py add its own."""
    first = argparse.ArgumentParser(add_help=False)  # a first pass: --size, and the batch flags given
    for k in ("--size", "--global_batch", "--grad_accum"):
        first.add_argument(k)
    given = first.parse_known_args(argv)[0]
    parser = parser or build_parser()
    parser.set_defaults(**preset(given.size if given.size in SIZES else None))  # a bad --size: parser says so
    args = parser.parse_args(argv)
    # An explicit batch flag beats the preset's other one (the demo's grad_accum 1, a size's global batch
    # 256); setup() derives the missing one once the number of processes is known (grad_accum_for).
    if given.global_batch is not None and given.grad_accum is None:
        args.grad_accum = None
    if given.grad_accum is not None and given.global_batch is None:
        args.global_batch = None
    for k in ("max_steps", "batch_size", "seq_len", "log_every", "save_every", "n_way", "k_shot", "q_query",
              "grad_accum", "global_batch", "prep_procs"):
        if getattr(args, k) is not None and getattr(args, k) < 1:
            raise UserError(f"--{k} must be >= 1 (got {getattr(args, k)})")
    if args.overwrite and args.resume:
        raise UserError("--overwrite starts over and --resume continues: give one of them")
    if not 0.0 <= args.hybrid_ratio <= 1.0:
        raise UserError(f"--hybrid_ratio must be in [0, 1] (got {args.hybrid_ratio})")
    # checked on every rank, before any work: only rank 0 imports it, but all must stop together
    if args.wandb:
        import importlib.util
        if importlib.util.find_spec("wandb") is None:
            raise UserError("--wandb needs the wandb package: pip install wandb (or run without --wandb)")
    return args


# ------------------------------------------------------------------------------------------------------------
# The corpus: tokenized once into train.bin and val.bin by data/prepare.py (prepare_corpus) the first time a
# run names it, then memmapped. Batches are windows of it.

def batch_indices(seed, step, n_tokens, seq_len, global_batch):
    """Start offsets of the `global_batch` windows of optimizer step `step`."""
    # Random windows with replacement (nanoGPT style) rather than epochs: the vanilla twin (--hybrid_ratio 0)
    # draws exactly the batch the hybrid run draws at every AR step.
    return stream_rng(seed, step, "batch").integers(0, n_tokens - seq_len - 1, size=global_batch)


def get_batch(tokens, starts, seq_len, device):
    """Windows starting at `starts` -> x, y of shape (len(starts), seq_len), y shifted by one token."""
    idx = starts[:, None] + np.arange(seq_len + 1)  # (B, seq_len + 1) positions into the memmap
    buf, = to_device([tokens[idx]], device)  # int64: embedding lookups need it
    return buf[:, :-1], buf[:, 1:]


def micro_slice(starts, micro, rank, world, batch_size):
    """Micro-step m on rank r takes slice j = m * world + r of the global batch, so 2 processes x 1 micro-step
    see exactly what 1 process x 2 micro-steps sees (j = 0, 1 in both)."""
    j = micro * world + rank
    return starts[j * batch_size:(j + 1) * batch_size]


def fixed_windows(n_tokens, seq_len, count):
    """Evenly spaced window starts: the same eval / probe windows for every seed, step and run."""
    return np.linspace(0, n_tokens - seq_len - 1, num=count).astype(np.int64)


# ------------------------------------------------------------------------------------------------------------
# Processes, devices and the objects of a run.

def pick_device(device_arg, local_rank=None):
    """--device auto | cpu | cuda | cuda:N -> a torch.device (auto: CUDA if there is one). Under torchrun each
    process takes the GPU of its local rank."""
    if device_arg == "auto":
        device_arg = "cuda" if torch.cuda.is_available() else "cpu"
    if device_arg.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError("--device cuda but no CUDA device is available; use --device cpu")
        return torch.device("cuda", local_rank if local_rank is not None
                            else (torch.device(device_arg).index or 0))
    if device_arg == "cpu":
        return torch.device("cpu")
    raise UserError(f"--device {device_arg!r}: use auto, cpu, cuda or cuda:N")


def to_device(arrays, device):
    """numpy integer arrays -> int64 tensors of the same shapes on `device`, in ONE copy that does not make
    the host wait: on CUDA from pinned memory, non_blocking (from pageable memory CUDA would stage it
    synchronously; the pinned-memory cache keeps the buffer until the copy has run)."""
    flat = torch.from_numpy(np.concatenate([np.asarray(a, dtype=np.int64).reshape(-1) for a in arrays]))
    if torch.device(device).type == "cuda":
        flat = flat.pin_memory()
    flat = flat.to(device, non_blocking=True)
    return [v.view(np.shape(a)) for v, a in zip(flat.split([np.size(a) for a in arrays]), arrays)]


# The longest one rank may work alone while the others wait in a collective (NCCL's default: 10 minutes):
# rank 0 writing a large checkpoint (weights + 2 AdamW moments, 6.8 GB: 3 minutes at 40 MB/s) or fetching
# Paloma. Corpus preparation and the SMLMT index wait on files (wait_for), never in a collective.
DIST_TIMEOUT = datetime.timedelta(minutes=30)


def setup_distributed(device_arg):
    """-> (rank, local_rank, world, device). torchrun sets RANK; nccl on CUDA, gloo on CPU."""
    ddp = "RANK" in os.environ
    rank, local_rank, world = ((int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE")) if ddp
                               else (0, 0, 1))
    device = pick_device(device_arg, local_rank if ddp else None)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if ddp and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=DIST_TIMEOUT)
    return rank, local_rank, world, device


BUCKET_NUMEL = 1 << 26  # elements per all-reduce buffer: 256 MB of fp32 gradients


def all_reduce_(tensors, world):
    """Sum a list of tensors across ranks in place, in flat buckets that begin every BUCKET_NUMEL elements:
    one all-reduce per bucket rather than per tensor (latency), never one buffer the size of the whole model
    (memory). Each rank scaled its losses by 1 / (grad_accum * world), so the sum is the global-batch mean."""
    if world == 1:
        return
    starts = itertools.accumulate([t.numel() for t in tensors], initial=0)  # where each tensor begins
    for _, group in itertools.groupby(zip(tensors, starts), key=lambda ts: ts[1] // BUCKET_NUMEL):
        bucket = [t for t, _ in group]
        flat = torch.cat([t.reshape(-1) for t in bucket])
        dist.all_reduce(flat)
        for t, v in zip(bucket, flat.split([t.numel() for t in bucket])):
            t.copy_(v.view_as(t))


def autocast_ctx(device, dtype_arg):
    dtype = {"auto": (torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported()
                      else torch.float32),
             "float32": torch.float32, "bfloat16": torch.bfloat16}[dtype_arg]
    return nullcontext() if dtype == torch.float32 else torch.autocast(device.type, dtype=dtype)


def grad_accum_for(args, world):
    """Micro-steps per optimizer step: --grad_accum, or --global_batch / (--batch_size x processes), which
    must divide: a global batch rounded down is not the one asked for."""
    if args.global_batch is None:
        return args.grad_accum
    micro = args.batch_size * world  # sequences per micro-step, all processes together
    accum, rest = divmod(args.global_batch, micro)
    procs = f"--batch_size {args.batch_size} x {world} process{'es' if world > 1 else ''} = {micro}"
    if rest or not accum:
        raise UserError(f"--global_batch {args.global_batch} is not a multiple of {procs}: use "
                        f"--global_batch {max(accum, 1) * micro} or another --batch_size")
    if args.grad_accum not in (None, accum):
        raise UserError(f"--global_batch {args.global_batch} with {procs} means --grad_accum {accum}, not "
                        f"{args.grad_accum}: give one of the two")
    return accum


def setup(args, for_bench=False):
    """Processes, data, model, head, optimizer: everything the loop and the benchmark share, as a Run."""
    rank, local_rank, world, device = setup_distributed(args.device)
    args.grad_accum = grad_accum_for(args, world)
    args.global_batch = args.batch_size * args.grad_accum * world  # what trains, as config.json reports it
    if not for_bench:
        check_out_dir(args.out_dir)
    corpus = prepare_corpus(args, local_rank == 0)
    tokens = read_bin(os.path.join(corpus, "train.bin"))
    index = (prepare.build_smlmt_index(corpus, args, local_rank == 0)
             if args.hybrid_ratio > 0 or for_bench else None)
    torch.manual_seed(args.seed)
    cfg = model_config(args)
    orig_model = Decoder(cfg).to(device)
    head = make_head(cfg.d_model, args.n_way, args.head_hidden, args.head_layers, args.head_dropout,
                     args.head_init, cfg.vocab_size).to(device)
    params = list(orig_model.parameters()) + list(head.parameters())  # backbone + the meta-learned head init
    # fused=True on CUDA: one kernel updates every parameter instead of a handful per tensor.
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay,
                                  fused=device.type == "cuda")
    # The fixed probe batch for learning dynamics: evenly spaced held-out windows, the same for every run.
    val = read_bin(os.path.join(corpus, "val.bin"))
    probe = get_batch(val, fixed_windows(len(val), args.seq_len, args.probe_batch), args.seq_len, device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    # --compile covers Decoder.forward (the AR forward + fused loss, the meta branch's backbone forward), not
    # the MLP head: its inner loop calls torch.autograd.grad, which cannot be put in a graph. dynamic=False:
    # one static graph per shape (support, query, AR: three, within the recompile limit of 8).
    model = torch.compile(orig_model, dynamic=False) if args.compile else orig_model
    return Run(rank=rank, local_rank=local_rank, world=world, device=device, corpus=corpus, tokens=tokens,
               index=index, orig_model=orig_model, model=model, head=head, params=params, optimizer=optimizer,
               amp=autocast_ctx(device, args.dtype), scale=1.0 / (args.grad_accum * world),
               micro_tokens=dict(meta=args.n_way * (args.k_shot + args.q_query) * smlmt_ctx(args),
                                 ar=args.batch_size * args.seq_len),
               probe=probe, modules=[m.strip() for m in args.dynamics_modules.split(",") if m.strip()])


# ------------------------------------------------------------------------------------------------------------
# Run folders, checkpoints and stop signals: a run is never lost, and never silently overwritten.

# What a resumed run must agree on to continue exactly.
RUN_KEYS = ("seed", "seq_len", "global_batch", "hybrid_ratio", "n_way", "k_shot", "q_query", "head_hidden",
            "head_layers", "head_init", "read", "smlmt_ctx", "data", "toy_docs")


def load_checkpoint(path, device="cpu"):
    """Load and sanity-check a maml-gpt checkpoint; a clear UserError for anything unreadable."""
    if not os.path.exists(path):
        raise UserError(f"no checkpoint at {path}; train one first (python maml_gpt.py) or fix the path")
    try:
        ck = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # truncated file, not a torch file, unsafe pickle...
        raise UserError(f"cannot read checkpoint {path} ({type(e).__name__}: {str(e)[:200]}); "
                        "it is corrupt or not a maml-gpt checkpoint")
    if not isinstance(ck, dict) or ck.get("format") != "maml-gpt/1":
        raise UserError(f"{path} is not a maml-gpt checkpoint")
    return ck


def model_from_checkpoint(ck, device="cpu"):
    model = Decoder(ModelConfig(**ck["model_config"]))
    model.load_state_dict(ck["model"])
    return model.to(device)


def check_out_dir(out_dir):
    try:
        os.makedirs(out_dir, exist_ok=True)
        probe = os.path.join(out_dir, f".write-test-{os.getpid()}")  # per process: ranks share the folder
        open(probe, "w").close()
        os.remove(probe)
    except OSError as e:
        raise UserError(f"cannot write to --out_dir {out_dir} ({e.strerror}); choose a writable folder")


RUN_FILES = ("ckpt.pt", "metrics.jsonl", "config.json")  # one run; --overwrite keeps them as *.prev.* a while
PREV = {n: "{0}.prev{1}".format(*os.path.splitext(n)) for n in RUN_FILES}  # ckpt.pt -> ckpt.prev.pt


def run_summary(out_dir):
    """What the run in out_dir reached, for the refusal message: 'ckpt.pt at step 100 of 6000; ...'."""
    parts = []
    for name in ("ckpt.pt", PREV["ckpt.pt"], "metrics.jsonl", PREV["metrics.jsonl"]):
        path = os.path.join(out_dir, name)
        if not os.path.exists(path):
            continue
        try:
            if name.endswith(".pt"):  # mmap: the small fields, without reading GBs of weights
                ck = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
                parts.append(f"{name} at step {ck['step']} of {ck['args']['max_steps']}")
            else:  # a last line without its newline was cut short by a hard kill
                with open(path) as f:
                    steps = [json.loads(ln).get("step", 0) for ln in f if ln.endswith("\n")]
                parts.append(f"{name} up to step {max(steps, default=0)}")
        except Exception:
            parts.append(f"{name} (unreadable)")
    return "; ".join(parts)


def wants_resume(args):
    """Does this command continue the run in --out_dir? Refuses to start over an existing run unless told
    to (--resume, --overwrite). Reads files only, before anything in --out_dir is written, so every rank
    reaches the same answer."""
    out = args.out_dir
    ckpt = os.path.join(out, "ckpt.pt")
    if args.resume == "continue" or (args.resume == "auto" and os.path.exists(ckpt)):
        if not os.path.exists(ckpt):
            prev = os.path.join(out, PREV["ckpt.pt"])
            hint = (f"; {prev} is the run an --overwrite set aside: rename it to ckpt.pt to continue that run"
                    if os.path.exists(prev) else "")
            raise UserError(f"no checkpoint at {ckpt} to resume{hint}. Start a new run without --resume, "
                            "or use --resume auto (continue if there is a checkpoint, else start fresh)")
        return True
    held = any(os.path.exists(os.path.join(out, n)) for n in ("ckpt.pt", "metrics.jsonl", PREV["ckpt.pt"],
                                                             PREV["metrics.jsonl"]))
    if held and not args.overwrite and args.resume != "auto":
        raise UserError(f"{out} already holds a run ({run_summary(out)}). Continue it with --resume, "
                        "or start over with --overwrite (the old ckpt.pt and metrics.jsonl are kept as "
                        "ckpt.prev.pt and metrics.prev.jsonl until the new run's first checkpoint), "
                        "or choose another --out_dir")
    return False


def set_aside(out_dir):
    """A fresh start in a folder that holds a run: its files become *.prev.* until our first checkpoint
    (drop_prev). If an earlier --overwrite stopped before its first checkpoint, the *.prev.* files already are
    the last run with a checkpoint: they stay, and what that attempt logged goes."""
    path = lambda name: os.path.join(out_dir, name)  # noqa: E731
    keep_prev = not os.path.exists(path("ckpt.pt")) and os.path.exists(path(PREV["ckpt.pt"]))
    for name in RUN_FILES:
        if os.path.exists(path(name)):
            os.remove(path(name)) if keep_prev else os.replace(path(name), path(PREV[name]))


def drop_prev(out_dir):
    """The new run has a checkpoint of its own: the run it replaced goes."""
    for name in PREV.values():
        if os.path.exists(os.path.join(out_dir, name)):
            os.remove(os.path.join(out_dir, name))


def resume_or_start(run, args, resume):
    """-> (first step, token counters). Resume: restore everything from ckpt.pt (the data position is the step
    itself) and drop log lines written after it. Fresh: the old run in --out_dir (if any) is set aside until
    this one's first checkpoint."""
    counters = dict(tokens=0, tokens_ar=0, tokens_meta=0)
    if not resume:
        if run.rank == 0:
            set_aside(args.out_dir)
        return 0, counters
    ckpt_path, metrics_path = (os.path.join(args.out_dir, n) for n in ("ckpt.pt", "metrics.jsonl"))
    ck = load_checkpoint(ckpt_path, run.device)
    diff = [k for k in RUN_KEYS if vars(args).get(k) != ck["run"].get(k)]
    if ck["model_config"] != asdict(run.orig_model.cfg) or diff:
        raise UserError(f"{ckpt_path} was trained with different settings "
                        f"({', '.join(diff) or 'model size'}); resume with the same flags, "
                        "or use a new --out_dir")
    run.orig_model.load_state_dict(ck["model"])
    run.head.load_state_dict(ck["head"])
    run.optimizer.load_state_dict(ck["optimizer"])
    torch.set_rng_state(ck["rng"]["torch"].cpu())
    if run.rank == 0 and os.path.exists(metrics_path):
        with open(metrics_path) as f:
            keep = [ln for ln in f if ln.endswith("\n") and json.loads(ln).get("step", 0) <= ck["step"]]
        write_atomically(metrics_path, lambda tmp: write_text(tmp, "".join(keep)))
    return ck["step"], ck["counters"]


def check_finite(run, done):
    """A diverged run stops before its weights reach a checkpoint (save and every logging window call this):
    a NaN or inf in a loss reaches every weight it trains within that step."""
    if not torch.stack([torch.isfinite(p).all() for p in run.params]).all():
        raise UserError(f"non-finite weights at step {done}; the last good checkpoint is kept. "
                        "Lower --lr, enable --grad_clip, or use --dtype float32")


def save(run, args, done, counters):
    """ckpt.pt after step `done`: everything needed to continue exactly, as tensors and plain containers
    (torch.load(weights_only=True)); the data position is the step itself (see Randomness). Rank 0 writes
    (the weights are identical on every rank), all wait."""
    check_finite(run, done)
    if run.rank == 0:
        state = dict(format="maml-gpt/1", model=run.orig_model.state_dict(), head=run.head.state_dict(),
                     optimizer=run.optimizer.state_dict(), step=done, model_config=asdict(run.orig_model.cfg),
                     args=vars(args), run={k: vars(args)[k] for k in RUN_KEYS}, counters=dict(counters),
                     rng=dict(torch=torch.get_rng_state(),
                              cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []))
        write_atomically(os.path.join(args.out_dir, "ckpt.pt"), lambda tmp: torch.save(state, tmp))
        drop_prev(args.out_dir)
    if run.world > 1:
        dist.barrier()  # nobody races ahead (or exits) while rank 0 is still writing


def resume_command(argv, world):
    """The command that continues this run: the same flags, --resume instead of --overwrite."""
    argv = [a for a in argv if a != "--overwrite"]
    if not any(a == "--resume" or a.startswith("--resume=") for a in argv):
        argv.append("--resume")
    launcher = (f"torchrun --nproc_per_node={os.environ.get('LOCAL_WORLD_SIZE', world)}" if world > 1
                else "python")
    return f"{launcher} maml_gpt.py {shlex.join(argv)}"


@contextmanager
def stop_signals(verbose=True):
    """SIGTERM (a scheduler's notice) and SIGINT (Ctrl-C). Once the loop has armed the flag they only set it:
    the step finishes, a checkpoint is written, the process exits 128 + signal; before, they exit. A second
    Ctrl-C quits at once (saves are atomic), except within a second of the first: that is torchrun forwarding
    the terminal's Ctrl-C. Repeated SIGTERMs never cut the save short (SIGKILL follows)."""
    stop = dict(signum=0, at=0.0, armed=False)

    def handler(signum, frame):
        now = time.monotonic()
        if not stop["armed"]:
            raise KeyboardInterrupt if signum == signal.SIGINT else SystemExit(128 + signum)
        if not stop["signum"]:
            stop.update(signum=signum, at=now)
            if verbose:  # os.write, not print: a handler may interrupt a print to the same stream (tqdm's)
                os.write(2, f"\n{signal.Signals(signum).name}: finishing this step, then saving a checkpoint "
                            "(Ctrl-C again to quit at once)\n".encode())
        elif signum == signal.SIGINT and now - stop["at"] > 1.0:
            raise KeyboardInterrupt

    # handlers can only be set from the main thread
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return
    old = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield stop
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)


def stop_requested(stop, world, device):
    """The signal number if any rank was asked to stop, else 0. An all-reduce (MAX) once per step: a signal
    sent to one rank stops every rank after the same step, and none is left waiting in a collective."""
    if world == 1:
        return stop["signum"]
    flag = torch.tensor([stop["signum"]], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return int(flag.item())


# ------------------------------------------------------------------------------------------------------------
# Logging and the fixed evaluation data: metrics.jsonl (and W&B), eval batches, few-shot episodes.

# loss_mixed: the mean over the window's micro-steps of whichever loss each one computed (AR cross-entropy
# over the vocabulary, or the N-way query cross-entropy), as pico-maml's `train/loss`. Never compare it
# with loss_ar: the query part sits near log N (3.47 at chance for 32-way) or lower, below the AR loss for
# most of a run, so mixing it in makes a hybrid run look ahead. analyze.py measures that artifact.
LOG_KEYS = ["loss_ar", "loss_query", "loss_mixed", "loss_support_pre", "loss_support_post", "acc_support_pre",
            "acc_support_post", "acc_query_pre", "acc_query_post", "head_grad_norm"]


def fixed_eval_batches(args, corpus_dir, device, is_local_zero):
    """Fixed eval batches at the training context length (the same for every arm). Paloma-tinsy when requested
    and reachable, else the corpus's held-out split."""
    tokens, source = None, "val"
    if args.eval_data == "paloma":
        path = os.path.join(args.data_dir, f"paloma-tinsy-{args.seq_len}.bin")
        ok = torch.tensor([1], device=device)
        if not os.path.exists(path) and is_local_zero:  # one download per machine; the others wait below
            try:
                enc = get_tokenizer()
                docs = prepare.hub_documents("pico-lm/pretokenized-paloma-tinsy", split="val")
                rows = [ids[:args.seq_len + 1] for ids in enc.encode_ordinary_batch(list(docs))]
                os.makedirs(args.data_dir, exist_ok=True)
                write_bin(path, np.concatenate([r for r in rows if len(r) == args.seq_len + 1]))
            except UserError as e:
                ok.zero_()
                print(f"note: Paloma is unavailable, evaluating on the held-out split instead ({e})")
        if dist.is_initialized():  # every rank learns whether every machine got it: all fall back together
            dist.all_reduce(ok, op=dist.ReduceOp.MIN)
        if ok.item():
            wait_for(path, "Paloma")
            tokens, source = read_bin(path), "paloma"
    if tokens is None:
        tokens = read_bin(os.path.join(corpus_dir, "val.bin"))
        starts = fixed_windows(len(tokens), args.seq_len, args.eval_batches * args.batch_size)
    else:  # Paloma rows are back to back: score the first eval_batches * batch_size, each from its start
        n_rows = len(tokens) // (args.seq_len + 1)
        starts = np.arange(min(n_rows, args.eval_batches * args.batch_size)) * (args.seq_len + 1)
    return [get_batch(tokens, s, args.seq_len, device) for s in np.array_split(starts, args.eval_batches)
            if len(s)], source


def fewshot_episodes(args, corpus_dir, device, is_local_zero):
    """The held-out few-shot eval's fixed episodes (keys depend on FEWSHOT_KEY only), or [] with a note when
    the held-out split is too small for N-way episodes."""
    if not (args.eval_every and args.fewshot_episodes):
        return []
    val = read_bin(os.path.join(corpus_dir, "val.bin"))
    index = prepare.build_smlmt_index(corpus_dir, args, is_local_zero, split="val")
    try:
        return [episode_tensors(val, index, args, [FEWSHOT_KEY, j], device)
                for j in range(args.fewshot_episodes)]
    except UserError as e:
        print(f"note: no held-out few-shot eval ({e})")
        return []


def run_header(args, cfg, model, device, world, extra):
    import tiktoken
    return dict(args=vars(args), model_config=asdict(cfg), n_params=count_params(model), world_size=world,
                device=(torch.cuda.get_device_name(device) if device.type == "cuda"
                        else platform.processor() or "cpu"),
                versions=dict(python=platform.python_version(), torch=torch.__version__, numpy=np.__version__,
                              tiktoken=tiktoken.__version__), command=" ".join(sys.argv),
                started=time.strftime("%Y-%m-%d %H:%M:%S"), **extra)


def wandb_logger(args, header):
    """--wandb (rank 0): starts a W&B run with the run header as its config; -> (run, log), log(record)
    mirroring one metrics.jsonl record. WANDB_MODE=offline (read by wandb) writes to OUT_DIR/wandb/ only."""
    import matplotlib
    import wandb  # optional, so imported only here (parse_args checked that it is installed)
    run = wandb.init(project=args.wandb, name=os.path.basename(os.path.normpath(args.out_dir)), config=header,
                     dir=args.out_dir)

    def log(rec):
        rec = dict(rec)
        if "attn_entropy" in rec:  # (layers, heads): one heat-map and one histogram, not 144 separate curves
            ent = np.array(rec.pop("attn_entropy"))
            rgb = matplotlib.colormaps["viridis"](ent / math.log(args.seq_len))[..., :3]  # 1: uniform
            rec["attn_entropy"] = wandb.Image((rgb * 255).astype(np.uint8).repeat(16, 0).repeat(16, 1),
                                              caption="rows: layers, columns: heads; "
                                                      "colour: entropy / log(seq_len)")
            rec["attn_entropy_hist"] = wandb.Histogram(ent.flatten())
        run.log(rec, step=rec["step"])

    return run, log


class Logbook:
    """A logging window's statistics, summed on the device as the micro-steps produce them (add: no host
    sync), and rank 0's record of each window: metrics.jsonl (mirrored to W&B with --wandb), the progress
    bar. The fixed evaluation data ride along. train() decides what goes into a record; this writes it."""

    def __init__(self, device, path=None, bar=None, evals=(), fewshots=()):
        self.device, self.path, self.bar, self.evals, self.fewshots = device, path, bar, evals, fewshots
        self.sums, self.counts, self.n_steps = {}, {}, dict(meta=0, ar=0)
        self.wandb_run = self.wandb_log = self.last = None  # W&B's run and logger; the last record written
        self.t0 = time.time()

    def add(self, stats=(), **more):
        for key, value in {**dict(stats), **more}.items():
            self.sums[key] = self.sums.get(key, 0.0) + torch.as_tensor(value, dtype=torch.float64,
                                                                       device=self.device)
            self.counts[key] = self.counts.get(key, 0) + 1

    def window(self, run, args, done, counters):
        """The record of the logging window that ends after step `done`: the means of its micro-steps'
        statistics over steps and ranks (every rank calls this: one all-reduce), the head's weight statistics,
        the time. A diverged run stops here (check_finite)."""
        record = dict(step=done, lr=lr_at(done - 1, args), **counters, n_meta_steps=self.n_steps["meta"],
                      n_ar_steps=self.n_steps["ar"])
        sums = torch.stack([torch.as_tensor(self.sums.get(k, 0.0), dtype=torch.float64, device=self.device)
                            for k in LOG_KEYS])
        counts = torch.tensor([float(self.counts.get(k, 0)) for k in LOG_KEYS], dtype=torch.float64,
                              device=self.device)
        both = torch.stack([sums, counts])  # (2, keys)
        if run.world > 1:
            dist.all_reduce(both)
        means, counts = torch.stack([both[0] / both[1], both[1]]).tolist()
        record.update({k: m for k, m, c in zip(LOG_KEYS, means, counts) if c > 0})
        self.sums, self.counts, self.n_steps = {}, {}, dict(meta=0, ar=0)
        check_finite(run, done)
        with torch.no_grad():
            hp = torch.cat([p.detach().flatten() for p in run.head.parameters()])
        record["head_weight_mean"], record["head_weight_std"] = hp.mean().item(), hp.std().item()
        record["sec"] = round(time.time() - self.t0, 3)
        return record

    def write(self, record, rank=0):
        if rank != 0:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb_log:
            self.wandb_log(record)
        self.last = record
        shown = ("loss_ar", "loss_query", "loss_support_pre", "loss_support_post", "acc_query_post")
        self.bar.set_postfix({k: f"{record[k]:.3f}" for k in shown if k in record})


def open_logbook(run, args, start, counters):
    """Builds the fixed eval data; rank 0 writes config.json, starts W&B, prints the run's shape and logs the
    dynamics of the initialisation (step 0)."""
    from tqdm import tqdm
    evals, source = (fixed_eval_batches(args, run.corpus, run.device, run.local_rank == 0) if args.eval_every
                     else ([], ""))
    logbook = Logbook(run.device, os.path.join(args.out_dir, "metrics.jsonl"),
                      tqdm(range(start, args.max_steps), initial=start, total=args.max_steps,
                           disable=run.rank != 0, dynamic_ncols=True),
                      evals, fewshot_episodes(args, run.corpus, run.device, run.local_rank == 0))
    if run.rank == 0:
        header = run_header(args, run.orig_model.cfg, run.orig_model, run.device, run.world,
                            dict(corpus=run.corpus, eval_source=source, smlmt_ctx=smlmt_ctx(args)))
        with open(os.path.join(args.out_dir, "config.json"), "w") as f:
            json.dump(header, f, indent=1)
        if args.wandb:
            logbook.wandb_run, logbook.wandb_log = wandb_logger(args, header)
        print(f"model {count_params(run.orig_model) / 1e6:.1f}M params | {run.world} process(es) on "
              f"{run.device} | global batch {args.global_batch} x {args.seq_len} | "
              f"hybrid ratio {args.hybrid_ratio}")
    if start == 0 and args.dynamics_every:  # the dynamics of the initialisation, each rank its share
        dyn = learning_dynamics(run.orig_model, *run.probe, run.modules, run.amp, run.rank, run.world)
        logbook.write(dict(step=0, **counters, **dyn), run.rank)
    return logbook


SAMPLE_PROMPT = "The main industry of"  # the end-of-training sample: fits the toy world and web text


def complete(model, prompt, num_samples=1, max_new_tokens=100, temperature=0.8, top_k=200, seed=1337):
    """Continuations of `prompt` (strings, the prompt not included), cut at <|endoftext|>; deterministic for
    a seed. The end of training prints one; sample.py prints more."""
    enc = get_tokenizer()
    ids = enc.encode(prompt, allowed_special={"<|endoftext|>"})  # "<|endoftext|>" alone: unconditional
    if not ids:
        raise UserError("the prompt encodes to no tokens; give some text, "
                        "or '<|endoftext|>' for unconditional samples")
    T = model.cfg.max_seq_len
    if len(ids) > T:
        print(f"note: the prompt has {len(ids)} tokens and the model's context is {T}: "
              f"it sees only the last {T}")
        ids = ids[-T:]
    device = next(model.parameters()).device
    gen = torch.Generator(device).manual_seed(seed)
    out = model.generate(torch.tensor([ids] * num_samples, device=device), max_new_tokens, temperature,
                         top_k, gen)
    rows = out[:, len(ids):].tolist()
    return [enc.decode(r[:r.index(EOT_ID)] if EOT_ID in r else r) for r in rows]


def finish(run, args, logbook, counters, done, stopping, argv):
    """After the loop. Stopped by a signal: say how to continue, exit 128 + signal. Done: summary, sample."""
    logbook.bar.close()
    ckpt_path = os.path.join(args.out_dir, "ckpt.pt")
    if stopping and done < args.max_steps:
        if run.rank == 0:
            print(f"stopped by {signal.Signals(stopping).name} after step {done} of {args.max_steps}; "
                  f"checkpoint {ckpt_path}. Continue with:\n  {resume_command(list(argv), run.world)}",
                  flush=True)
        sys.exit(128 + stopping)  # the shell's code for "ended by this signal": an unfinished run
    if run.rank != 0:
        return
    print(f"done: {args.max_steps} steps, {counters['tokens'] / 1e6:.2f}M tokens "
          f"({counters['tokens_ar'] / 1e6:.2f}M AR, {counters['tokens_meta'] / 1e6:.2f}M meta) in "
          f"{time.time() - logbook.t0:.0f}s; checkpoint {ckpt_path}")
    if logbook.last:
        print("last window: " + ", ".join(f"{k} {logbook.last[k]:.3f}" for k in
                                          ("loss_ar", "eval_loss", "loss_support_pre", "loss_support_post",
                                           "acc_query_pre", "acc_query_post", "eval_fewshot_acc")
                                          if k in logbook.last))
    text = SAMPLE_PROMPT + complete(run.orig_model, SAMPLE_PROMPT, max_new_tokens=40, seed=args.seed)[0]
    print(f"sample (40 tokens, temperature 0.8, top_k 200): {text!r}")
    print(f"next: python sample.py --out_dir {args.out_dir} \"{SAMPLE_PROMPT}\"   |   "
          f"python finetune_ner.py --ckpt {ckpt_path}   |   python analyze.py {args.out_dir}")
    if logbook.wandb_run:
        logbook.wandb_run.finish()


# ------------------------------------------------------------------------------------------------------------
# Entry points: this file trains; sample.py, export.py and bench.py use cli() too.

def cli(body):
    """Run body() as a command: a UserError is one line on stderr and exit status 1, without a traceback."""
    try:
        return body()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:  # a second Ctrl-C (or one outside the loop): no traceback, nothing half-written
        print("interrupted; ckpt.pt (if any) is the last complete checkpoint", file=sys.stderr)
        sys.exit(130)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv

    def body():
        args = parse_args(argv)
        with stop_signals(verbose=os.environ.get("RANK", "0") == "0") as stop:
            train(args, stop, argv)
    cli(body)


if __name__ == "__main__":
    main()
