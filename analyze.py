"""
analyze.py: which of the paper's claims hold on MAML runs and their vanilla twins, with figures and a report.

    python analyze.py                                   # the demo run(s): out/demo [and out/demo-vanilla]
    python analyze.py out/small out/small-vanilla       # a MAML run and its vanilla twin
    python analyze.py RUN_MAML --vanilla RUN_VANILLA --ner GRID   # + the NER row (finetune_ner.py --sweep)
    python analyze.py out/demo-s{1..5} --vanilla out/demo-vanilla-s{1..5} --ner GRID [GRID ...] --out DIR

Writes claims.json, report.md and PNG figures, and prints the claims table. Runs with --hybrid_ratio 0 are
"vanilla"; several runs per arm are paired by --seed. CLAIMS is the scoreboard: each claim once, with the one
number that decides it, against the claim's rule (one pair) or by the exact sign-flip test (several pairs).
"""
import argparse
import csv
import itertools
import json
import math
import os
from pathlib import Path

import numpy as np

from finetune_ner import GROUPS, grid_pairs, pair_by_seed, pyplot, relative_f1
from maml_gpt import UserError, cli

# ------------------------------------------------------------------------------------------------------------
# The claims. `key` is the number per pair that decides; `log`: it is a ratio, tested as its log; `min`: the
# one-pair rule is key > min; `shape`: a 0/1 shape score (MAML minus vanilla), whose verdict must also stand
# over the ranges of THRESHOLDS named in `ruler`.

CLAIMS = [
    dict(id="speedup", name="Same loss N x sooner", key="speedup_step_ar", log=True, min=1.1,
         paper="§4, Fig. 1: MAML reaches its vanilla twin's loss 1.3-1.6x sooner per step (four sizes)",
         rule="vanilla's steps to a loss / MAML's steps to it, at vanilla's final AR loss; 1 pair: >= 1.1x"),
    dict(id="ner", name="NER F1 under equal compute", key="ner_rel_avg", min=0.0,
         paper="§5, Table 3: relative change of micro-F1, head and full fine-tuning, seen / PUD / other; "
               "the mean of its six cells: tiny -6.4 %, small +6.4 %, medium +3.3 %, large +5.3 %",
         rule="the mean of the six Table 3 cells (regime x group) that this grid has; one pair: > 0"),
    dict(id="dynamics", name="Diversify-then-compress", key="compress_diff", min=0.0, shape=True,
         ruler=("fall", "z"),
         paper="§6, Fig. 6 and 33: attention-layer PER declines, weights with an abrupt drop (large: ~step "
               "3000), gradients dipping and rebounding; not in vanilla",
         rule="MAML has an attention matrix (v_proj, o_proj scored apart) whose weight PER declines, falls "
              "by >= `fall` between two probes, `z` robust sd outside its other probe-to-probe changes, and "
              "whose gradient PER dips by >= `fall` and rebounds; its vanilla twin has no such weight drop"),
    dict(id="jump", name="Phase transition", key="transition", min=0.0, shape=True,
         ruler=("rise", "near", "probes", "fall", "z"),
         paper="§6, Fig. 4 and 6: query (and support) accuracy after adaptation flat near chance, then an "
               "abrupt rise (to > 0.5, large) at the step of the PER drop; absent at smaller scales",
         rule="acc_query_post: the median of `plateau` windows within `near` of chance and flat (its first "
              "two and last two windows within a quarter of the rise), then the median of the `plateau` "
              "windows after the next `within` windows >= `rise` above it, and an attention weight-PER drop "
              "(claim above) within `probes` probes"),
    dict(id="fewshot_mask", name="Better few-shot learner, at [MASK]", key="fewshot_mask_diff", min=0.0,
         paper="this project's question, not the paper's: is the MAML backbone's held-out few-shot accuracy "
               "above vanilla's? The vanilla twin never trains the [MASK] position",
         rule="eval_proto_acc_mask (nearest prototype, no head) at the last common eval, MAML - vanilla > 0"),
    dict(id="fewshot_prev", name="Better few-shot learner, token before", key="fewshot_prev_diff", min=0.0,
         paper="the same question read at the token before the [MASK], where a next-token model reads",
         rule="eval_proto_acc_prev at the last common eval, MAML - vanilla; > 0"),
]
# Defaults and the reasonable range a "holds" must survive. fall: relative PER fall; z: robust sds; rise,
# near: accuracy; plateau, within: windows; probes: PER probes between the jump and the drop.
THRESHOLDS = dict(fall=0.03, z=4.0, rise=0.2, near=0.1, plateau=5, within=3, probes=2)
RANGES = dict(fall=(0.02, 0.05), z=(3.0, 6.0), rise=(0.15, 0.25), near=(0.05, 0.15), probes=(1, 3))
P_LEVEL = 0.05

def load_run(path):
    """-> dict(name, path, config, rows, ratio, vanilla). A clear error for a folder that is not a run."""
    mfile, cfile = Path(path, "metrics.jsonl"), Path(path, "config.json")
    if not mfile.exists():
        raise UserError(f"{path} has no metrics.jsonl; pass a run folder of maml_gpt.py (its --out_dir)")
    rows = []
    for i, line in enumerate(mfile.read_text().splitlines(), 1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            raise UserError(f"{mfile}:{i}: not a JSON line (truncated run?); delete that line and retry")
    if not rows:
        raise UserError(f"{mfile} is empty; let the run log at least one window")
    config = json.loads(cfile.read_text()) if cfile.exists() else {"args": {}}
    ratio = config["args"].get("hybrid_ratio", 0.5 if any("loss_query" in r for r in rows) else 0.0)
    return dict(name=os.path.basename(os.path.normpath(path)), path=path, config=config, rows=rows,
                ratio=ratio, vanilla=ratio == 0)


def series(run, key, x="step"):
    """(x, y) arrays of the rows that have `key`."""
    pts = [(r[x], r[key]) for r in run["rows"] if r.get(key) is not None and x in r] if run else []
    return np.array([p[0] for p in pts], float).reshape(-1), np.array([p[1] for p in pts], float).reshape(-1)


def smooth(y, k=5):
    """Centered moving average over k log points (edges use what is there); for losses and figures only."""
    if len(y) < 3:
        return y
    k = min(k, len(y))
    return np.convolve(y, np.ones(k), "same") / np.convolve(np.ones_like(y), np.ones(k), "same")


def last(run, key):
    ys = series(run, key)[1]
    return float(ys[-1]) if len(ys) else None


# ------------------------------------------------------------------------------------------------------------
# (i) "Reaches the same loss N x sooner": vanilla's steps (tokens) to a loss level over MAML's.

def first_reach(x, y, level):
    """First x at which the smoothed running-minimum loss is <= level (interpolated between log points)."""
    best = np.minimum.accumulate(smooth(y))
    hit = np.flatnonzero(best <= level)
    if not len(hit):
        return None
    i = hit[0]
    if i == 0 or best[i - 1] == best[i]:
        return x[i]
    return x[i - 1] + (x[i] - x[i - 1]) * (best[i - 1] - level) / (best[i - 1] - best[i])


def speedup(xv, yv, xm, ym, n_levels=50):
    """-> dict(levels, ratios = x_vanilla(L) / x_maml(L), max, at_final, reached) or None. at_final: vanilla's
    end over MAML's first reach of vanilla's final loss (reached); else vanilla's first reach of MAML's final
    loss over MAML's end (< 1: "vanilla reached MAML's final loss in that fraction of the steps")."""
    if len(yv) < 2 or len(ym) < 2:
        return None
    bv, bm = np.minimum.accumulate(smooth(yv)), np.minimum.accumulate(smooth(ym))
    hi, lo = min(bv[0], bm[0]), max(bv[-1], bm[-1])  # the loss range both runs cover, minus its warm-up top
    levels = np.linspace(hi - 0.1 * (hi - lo), lo, n_levels) if hi > lo else np.array([lo])
    ratios = np.array([(a / b) if a and b else np.nan for a, b in
                       ((first_reach(xv, yv, L), first_reach(xm, ym, L)) for L in levels)])
    reached = bool(bm[-1] <= bv[-1])
    hit = first_reach(xm, ym, bv[-1]) if reached else first_reach(xv, yv, bm[-1])
    at_final = float(xv[-1] / hit if reached else hit / xm[-1]) if hit else None
    return dict(levels=levels, ratios=ratios, max=float(np.nanmax(ratios)), at_final=at_final,
                reached=reached) if np.isfinite(ratios).any() else None


# (key in claims.json, x axis, MAML's metric, label); vanilla's is always loss_ar (its mixed loss is its AR
# loss). tokens_ar counts AR tokens: "per AR step" up to one factor.
SPEEDUPS = [("step_ar", "step", "loss_ar", "per step, AR loss"),
            ("token_ar", "tokens", "loss_ar", "per backbone token, AR loss"),
            ("arstep_ar", "tokens_ar", "loss_ar", "per AR step, AR loss"),
            ("step_mixed", "step", "loss_mixed", "per step, the released code's mixed train/loss")]


def speedup_words(c, name="step_ar"):
    v = c.get(f"speedup_{name}")
    if v is None:
        return "not measurable"
    return f"MAML reached vanilla's final loss {v:.2f}x sooner" if c[f"speedup_{name}_reached"] else \
        f"MAML never reached vanilla's final loss; vanilla reached MAML's final loss in {v:.2f} of the steps"


# ------------------------------------------------------------------------------------------------------------
# (iii) and (iv): the shape rules, on raw log points (smoothing splits one clean step into small ones).

def attn_modules(run):
    """Attention matrices with PER logs, e.g. attention.v_proj (swiglu.* is not an attention layer)."""
    return sorted({k.split(".", 2)[2] for r in run["rows"] for k in r
                   if k.startswith("per_weight/") and ".attention." in k})


def mean_per(run, kind, module):
    """(probe steps, PER of one matrix type averaged over layers); kind 'weight' or 'grad'."""
    keys = sorted({k for r in run["rows"] for k in r if k.startswith(f"per_{kind}/") and k.endswith(module)})
    rows = [r for r in run["rows"] if keys and all(k in r for k in keys)]
    return np.array([r["step"] for r in rows], float), np.array([np.mean([r[k] for k in keys]) for r in rows])


def weight_drop(x, y):
    """The steepest fall between two probes: -> dict(fall (relative), z (robust sds outside the other
    probe-to-probe changes), step (the first probe after it), decline (last < first)) or None."""
    if len(y) < 4:
        return None
    d = np.diff(y) / np.maximum(y[:-1], 1e-12)
    i = int(np.argmin(d))
    rest = np.delete(d, i)
    scale = max(1.4826 * float(np.median(np.abs(rest - np.median(rest)))), 1e-4)  # MAD, floored: clean lines
    return dict(fall=float(-d[i]), z=float((np.median(rest) - d[i]) / scale), step=float(x[i + 1]),
                decline=bool(y[-1] < y[0]))


def grad_dip(x, y):
    """The deepest trough that rebounds: depth = the smaller of its fall from before and its rise after,
    relative to the level before. -> dict(dip, step) or None."""
    if len(y) < 3:
        return None
    depth = [min(y[:j].max() - y[j], y[j + 1:].max() - y[j]) / max(y[:j].max(), 1e-12)  # PER 0: zero grads
             for j in range(1, len(y) - 1)]
    j = int(np.argmax(depth))
    return dict(dip=float(depth[j]), step=float(x[j + 1]))


def jump(x, y, th, chance=None):
    """The largest rise after a plateau: the median of `plateau` windows (flat, within `near` of chance when
    chance is given) to the median of the `plateau` windows after the next `within`. -> dict(step, rise,
    plateau) or None when no window has a plateau before it."""
    P, W = int(th["plateau"]), int(th["within"])
    ts = np.arange(P, len(y) - W - P + 2)  # t: the first window after the plateau y[t - P:t]
    if not len(ts):
        return None
    blocks = np.lib.stride_tricks.sliding_window_view(y, P)  # (windows - P + 1, P): y[i:i + P]
    med = np.median(blocks, axis=1)
    pre, post = med[ts - P], med[ts + W - 1]
    # flat: the plateau's own change (its last two windows against its first two) under a quarter of the
    # rise, which a steady climb (3 windows of slope against 7) never is, whatever its slope
    ok = np.abs(blocks[ts - P, -2:].mean(1) - blocks[ts - P, :2].mean(1)) <= (post - pre) / 4
    ok &= (pre - chance <= th["near"]) if chance is not None else True
    if not ok.any():
        return None
    rise = np.where(ok, post - pre, -np.inf)
    i = int(np.argmax(rise))
    # the step: the first window from t half-way up (a few t before it give the same rise)
    k = next((k for k in range(ts[i], len(y)) if y[k] >= pre[i] + rise[i] / 2), ts[i])
    return dict(step=float(x[k]), rise=float(rise[i]), plateau=float(pre[i]))


def shape_metrics(c, maml, van, th):
    """The numbers of (iii) and (iv), into c: they alone depend on the thresholds th."""
    # (iii) diversify-then-compress, per attention matrix: its steepest weight-PER drop, its gradient dip
    drops = {}
    for tag, run in (("maml", maml), ("vanilla", van)):
        mods, drops[tag], both = attn_modules(run) if run else [], [], []  # both: weight drop and grad dip
        for mod in mods:
            w = weight_drop(*mean_per(run, "weight", mod)) or {}
            g = grad_dip(*mean_per(run, "grad", mod)) or {}
            w_ok = bool(w and w["decline"] and w["fall"] >= th["fall"] and w["z"] >= th["z"])
            g_ok = bool(g and g["dip"] >= th["fall"])
            for k, v in dict(drop_step=w.get("step"), fall=w.get("fall"), z=w.get("z"), weight_drop=w_ok,
                             grad_dip=g.get("dip"), grad_dip_step=g.get("step"), grad_dips=g_ok).items():
                c[f"per_{k}_{tag}/{mod}"] = v
            drops[tag] += [w["step"]] if w_ok else []
            both.append(w_ok and g_ok)
        c[f"compress_{tag}"] = int(any(both)) if mods else None
        c[f"weight_drop_{tag}"] = int(bool(drops[tag])) if mods else None
        e = series(run, "attn_entropy_mean")[1]
        c[f"entropy_first_{tag}"], c[f"entropy_last_{tag}"] = (e[0], e[-1]) if len(e) else (None, None)
    score = c["compress_maml"]
    c["compress_diff"] = None if score is None else score - (c["weight_drop_vanilla"] or 0)
    # (iv) phase transition. kind: 'transition', 'jump without PER drop' (no MAML weight drop within
    # `probes` probes of the jump), 'no transition' (no rise >= `rise` after a plateau); None: too few windows
    xs = mean_per(maml, "weight", attn_modules(maml)[0])[0] if maml and attn_modules(maml) else []
    probe = float(np.median(np.diff(xs))) if len(xs) > 1 else 0.0
    x, y = series(maml, "acc_query_post")
    j = s = c["transition"] = c["transition_kind"] = None
    if len(y) >= 2 * th["plateau"] + th["within"]:
        j = jump(x, y, th, 1 / maml["config"]["args"].get("n_way", 32))
        s = jump(*series(maml, "acc_support_post"), th)
        big = bool(j and j["rise"] >= th["rise"])
        near = bool(big and any(abs(j["step"] - d) <= th["probes"] * probe for d in drops["maml"]))
        c["transition"] = int(near)
        c["transition_kind"] = "transition" if near else "jump without PER drop" if big else "no transition"
    for part, d in (("jump", j), ("support", s)):
        for k in ("step", "rise", "plateau"):
            c[f"{part}_{k}"] = d and d[k]
    c["acc_query_post_last"] = last(maml, "acc_query_post")
    c["chance"] = maml and 1 / maml["config"]["args"].get("n_way", 32)
    return c


# ------------------------------------------------------------------------------------------------------------
# One pair -> every number of claims.json (flat: str -> number / bool / str / null, every key always there)

def metrics(maml, van, ner_rows, th=THRESHOLDS):
    c = dict(run_maml=maml and maml["path"], run_vanilla=van and van["path"])
    for name, x, metric, label in SPEEDUPS:
        sp = speedup(*series(van, "loss_ar", x), *series(maml, metric, x)) if maml and van else None
        c[f"speedup_{name}"], c[f"speedup_{name}_max"] = sp and sp["at_final"], sp and sp["max"]
        c[f"speedup_{name}_reached"] = sp and sp["reached"]
        c[f"speedup_{name}_direction"] = sp and (
            "vanilla's steps to its final loss / MAML's steps to that loss" if sp["reached"] else
            "vanilla's steps to MAML's final loss / MAML's steps (MAML never reached vanilla's final loss)")
    for tag, run in (("maml", maml), ("vanilla", van)):
        c[f"final_loss_ar_{tag}"], c[f"final_eval_ppl_{tag}"] = last(run, "loss_ar"), last(run, "eval_ppl")
    # (ii) NER: the grid's checkpoint pair inside these runs' folders, else the pair of their seed
    pairs = grid_pairs(ner_rows)[0] if ner_rows else []
    where = [os.path.realpath(r["path"]) if r else None for r in (maml, van)]
    seed = str(seed_of(maml or van))
    pick = next((p for p in pairs if [os.path.realpath(os.path.dirname(k)) for k in p[1:]] == where), None) \
        or next((p for p in pairs if str(p[0]) == seed or p[0] is None), None)  # None: a grid without seeds
    c["ner_ckpt_maml"], c["ner_ckpt_vanilla"] = pick[1:] if pick else (None, None)
    rel = relative_f1(ner_rows, *pick[1:]) if pick else {}
    for regime, g in itertools.product(("head", "full"), GROUPS):
        c[f"ner_f1_{regime}_{g}_maml"], c[f"ner_f1_{regime}_{g}_vanilla"], c[f"ner_rel_{regime}_{g}"] = \
            rel.get((regime, g), (None, None, None))
    cells = [v for _, _, v in rel.values() if v is not None]
    c["ner_rel_avg"] = float(np.mean(cells)) if cells else None
    c["ner_toy_only"] = bool(pick) and not any(r["eval_on"] not in ("toy", "toy_heldout") for r in ner_rows)
    shape_metrics(c, maml, van, th)
    # the project's row: held-out few-shot accuracy of both backbones at their last common eval step
    steps = [set(series(r, "eval_proto_acc_mask")[0]) for r in (maml, van) if r]
    common = set.intersection(*steps) if steps and all(steps) else set()
    c["fewshot_step"] = max(common) if common else None
    for k in ("eval_proto_acc_mask", "eval_proto_acc_prev", "eval_fewshot_acc", "eval_fewshot_acc_pre"):
        for tag, run in (("maml", maml), ("vanilla", van)):
            c[f"{k}_{tag}"] = next((r[k] for r in run["rows"] if r["step"] == c["fewshot_step"] and k in r),
                                   None) if run and common else None
    for d, k in (("fewshot_mask_diff", "eval_proto_acc_mask"), ("fewshot_prev_diff", "eval_proto_acc_prev"),
                 ("eval_fewshot_acc_diff", "eval_fewshot_acc")):
        c[d] = None if None in (c[f"{k}_maml"], c[f"{k}_vanilla"]) else c[f"{k}_maml"] - c[f"{k}_vanilla"]
    return {k: (v.item() if isinstance(v, np.generic) else v) for k, v in c.items()}


# ------------------------------------------------------------------------------------------------------------
# Statistics across seeds. A MAML run and its vanilla twin of one seed see the same AR batches and the same
# held-out episodes: each pair gives one number d_i. Test: the exact sign-flip test of mean(d), one-sided;
# under "no effect" each of the 2^n sign patterns is equally likely, so p >= 1 / 2^n (0.031 at n = 5).
# Interval: mean +- t(0.975, n - 1) sd / sqrt(n). Holm's step-down correction over the claims' tests is
# reported beside each raw p; the verdicts use the raw p, one claim at a time, as the paper states them.

T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
        2.131, 2.120, 2.110, 2.101, 2.093, 2.086]  # t(0.975, df) for df = 1..20 (any table of Student's t)


def t975(df):
    """Beyond the table, the Cornish-Fisher expansion of t around z = 1.96 (error < 1e-4 for df > 20)."""
    z = 1.959964
    return T975[df - 1] if df <= 20 else \
        z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df * df)


def ci95(xs):
    """(mean, [low, high]) of the t-interval; the interval is None below 2 values."""
    xs = np.asarray(xs, float)
    m = float(xs.mean())
    if len(xs) < 2:
        return m, None
    h = t975(len(xs) - 1) * float(xs.std(ddof=1)) / math.sqrt(len(xs))
    return m, [m - h, m + h]


def sign_flip_p(d):
    """(p of mean(d) > 0, p of mean(d) < 0): the exact one-sided sign-flip tests (each counts the observed
    pattern itself). Up to 16 pairs every pattern; more: 100,000 random ones (seeded)."""
    d = np.asarray(d, float)
    n = len(d)
    signs = (1 - 2 * ((np.arange(1 << n)[:, None] >> np.arange(n)) & 1) if n <= 16
             else np.random.default_rng(0).choice([-1, 1], size=(100_000, n)))
    sums, obs = signs @ np.abs(d), d.sum()
    tol = 1e-9 * max(1.0, float(np.abs(d).sum()))  # float sums of the same terms in another order
    return float(np.mean(sums >= obs - tol)), float(np.mean(sums <= obs + tol))


def holm(ps):
    """Holm's step-down adjusted p values, in the order given (None stays None)."""
    idx = sorted((i for i, p in enumerate(ps) if p is not None), key=lambda i: ps[i])
    out, run = list(ps), 0.0
    for rank, i in enumerate(idx):
        run = max(run, min(1.0, (len(idx) - rank) * ps[i]))
        out[i] = run
    return out


def verdict(claim, per):
    """The claim's verdict over the pairs' numbers -> (verdict, why, test dict)."""
    vals = [c[claim["key"]] for c in per if c.get(claim["key"]) is not None]
    d = np.log(vals) if claim.get("log") else np.asarray(vals, float)
    test = dict(n=len(vals), p=None, p_opposite=None)
    if not vals:
        return "not measurable", f"needs {claim['key']} (see its rule)", test
    if len(vals) == 1:
        ok = vals[0] > claim["min"] if not claim.get("log") else vals[0] >= claim["min"]
        return ("holds" if ok else "does not hold"), "1 pair: the one-pair rule, no test", test
    test["p"], test["p_opposite"] = sign_flip_p(d)
    m, ci = ci95(d)
    show = (lambda v: f"{math.exp(v):.2f}x") if claim.get("log") else (lambda v: f"{v:+.3g}")
    est = f"mean {show(m)} [{show(ci[0])}, {show(ci[1])}], exact sign-flip p = {test['p']:.3g}"
    if test["p"] < P_LEVEL:
        return "holds", f"{len(vals)} pairs, {est}", test
    if test["p_opposite"] < P_LEVEL or (claim.get("shape") and max(vals) <= 0):
        return "does not hold", f"{len(vals)} pairs, {est} (opposite sign p = {test['p_opposite']:.3g})", test
    return (f"inconclusive (n = {len(vals)})", f"{est}, opposite sign p = {test['p_opposite']:.3g}; the "
            f"smallest p {len(vals)} pairs can give is {2.0 ** -len(vals):.3g}", test)


def ruler(claim, pairs, base):
    """A shape claim's verdict at each end of each threshold range, the others at their defaults. -> (the
    verdict, words): a verdict that changes inside the ranges is inconclusive."""
    seen = []
    for name in claim["ruler"]:
        for v in RANGES[name]:
            per = [shape_metrics({}, m, van, {**THRESHOLDS, name: v}) for _, m, van in pairs]
            seen.append((f"{name} = {v}", verdict(claim, per)[0]))
    flips = [f"{at}: {v}" for at, v in seen if v != base]
    if flips:
        return f"inconclusive (n = {len(pairs)})", f"{base} at the defaults, but {'; '.join(flips)}"
    return base, "stands for " + ", ".join(f"{k} {RANGES[k][0]}-{RANGES[k][1]}" for k in claim["ruler"])


# ------------------------------------------------------------------------------------------------------------
# The whole analysis

def summarize(per):
    """Per-pair dicts -> every key as its mean over the pairs that have it (geometric for speed-ups; the
    share of True for flags; text when all agree), with KEY_ci95 and KEY_per_seed."""
    out = {}
    for k in dict.fromkeys(k for c in per for k in c):
        vals = [c.get(k) for c in per]
        have = [v for v in vals if v is not None]
        out[f"{k}_per_seed"], out[f"{k}_ci95"] = vals, None  # every key always there, measured or not
        if have and all(isinstance(v, bool) for v in have):
            out[k] = float(np.mean(have))
        elif have and all(isinstance(v, (int, float)) for v in have):
            ratio = k.startswith("speedup_") and all(v > 0 for v in have)
            m, ci = ci95(np.log(have) if ratio else have)
            out[k], out[f"{k}_ci95"] = (math.exp(m), ci and [math.exp(v) for v in ci]) if ratio else (m, ci)
        else:  # text, or nothing measured
            out[k] = have[0] if have and all(v == have[0] for v in have) else None
    return out


def shows(c, cid):
    """The 'these runs' cell of one claim."""
    f = (lambda k, nd=3: "-" if c.get(k) is None else f"{c[k]:.{nd}f}")
    if cid == "speedup":
        return "; ".join(f"{lab}: {speedup_words(c, n)}" for n, *_, lab in SPEEDUPS if c.get(f"speedup_{n}"))
    if cid == "ner":
        cells = [f"{r} {g} {c[f'ner_rel_{r}_{g}']:+.1f} %" for r in ("head", "full") for g in GROUPS
                 if c.get(f"ner_rel_{r}_{g}") is not None]
        return ("; ".join(cells) + f"; mean {c['ner_rel_avg']:+.1f} %" +
                (" (toy NER only)" if c.get("ner_toy_only") else "")) if cells else "-"
    if cid == "dynamics":
        mods = sorted({k.split("/", 1)[1] for k in c if k.startswith("per_fall_maml/")
                       and not k.endswith(("_per_seed", "_ci95"))})
        return "; ".join(f"{m.split('.')[-1]}: steepest drop of weight PER {f(f'per_fall_maml/{m}', 4)} (z "
                         f"{f(f'per_z_maml/{m}', 1)}) at step {f(f'per_drop_step_maml/{m}', 0)} vs vanilla "
                         f"{f(f'per_fall_vanilla/{m}', 4)}, gradient dip {f(f'per_grad_dip_maml/{m}')}"
                         for m in mods) + (f"; attention entropy {f('entropy_first_maml', 2)} -> "
                                           f"{f('entropy_last_maml', 2)} (reported only)")
    if cid == "jump":
        return (f"{c.get('transition_kind') or '-'}; largest rise after a plateau near chance "
                f"{f('jump_rise')} at step {f('jump_step', 0)} (plateau {f('jump_plateau')}, chance "
                f"{f('chance')}); support accuracy {f('support_rise')} at step {f('support_step', 0)}")
    tag = "mask" if cid == "fewshot_mask" else "prev"
    return (f"{f(f'eval_proto_acc_{tag}_maml')} vs {f(f'eval_proto_acc_{tag}_vanilla')} at step "
            f"{f('fewshot_step', 0)}; adapted head at --read: {f('eval_fewshot_acc_maml')} vs "
            f"{f('eval_fewshot_acc_vanilla')}")


def split_arms(paths, vanilla):
    """-> (MAML runs, vanilla runs), sorted by hybrid ratio (0: vanilla) without --vanilla. A UserError for a
    run in the wrong arm, one arm of several runs alone, or an arm's runs that differ in a training flag."""
    runs, vans = [load_run(p) for p in paths], [load_run(p) for p in vanilla or []]
    if vanilla is None:
        runs, vans = [r for r in runs if not r["vanilla"]], [r for r in runs if r["vanilla"]]
    for r in (r for r in runs if r["vanilla"]):
        raise UserError(f"{r['path']} is a vanilla run (--hybrid_ratio 0); list it after --vanilla")
    for r in (r for r in vans if not r["vanilla"]):
        raise UserError(f"{r['path']} (after --vanilla) has --hybrid_ratio {r['ratio']}; list MAML runs "
                        "before --vanilla and their --hybrid_ratio 0 twins after it")
    if len(runs) > 1 or len(vans) > 1:
        if not (runs and vans):
            raise UserError(f"{len(runs or vans)} {'MAML' if runs else 'vanilla'} runs and no "
                            f"{'vanilla' if runs else 'MAML'} run: give the MAML runs, then --vanilla and "
                            "their --hybrid_ratio 0 twins (the same seeds)")
        free = "seed out_dir data_dir resume overwrite wandb save_every device compile".split()
        for arm, group in (("MAML", runs), ("vanilla", vans)):
            same({r["path"]: {k: v for k, v in r["config"]["args"].items() if k not in free} for r in group},
                 f"the {arm} runs", "the runs of an arm may differ only in --seed: give runs made with the "
                 "same flags")
    return runs, vans


def same(settings, what, fix):
    """A UserError "WHAT differ in --FLAG (each folder's value); FIX" for the first flag whose value differs
    between the {folder: {flag: value}} of settings."""
    for k in sorted({k for s in settings.values() for k in s}):
        vals = {d: s.get(k) for d, s in settings.items()}
        if len({json.dumps(v, sort_keys=True) for v in vals.values()}) > 1:
            raise UserError(f"{what} differ in --{k} (" + ", ".join(f"{d}: {v}" for d, v in vals.items())
                            + f"); {fix}")


def seed_of(run):
    return run["config"]["args"].get("seed")


def load_grids(dirs):
    """The rows of every grid (`finetune_ner.py --sweep --out DIR`). A UserError for a folder without
    grid.csv, or for grids fine-tuned with different settings (grid.json): their F1s do not compare."""
    rows, settings = [], {}
    for d in dirs:
        if not Path(d, "grid.csv").exists():
            raise UserError(f"{d} has no grid.csv; pass the --out folder of "
                            "`finetune_ner.py --sweep --ckpt MAML/ckpt.pt VANILLA/ckpt.pt`")
        with open(Path(d, "grid.csv")) as f:
            rows += list(csv.DictReader(f))
        if Path(d, "grid.json").exists():
            settings[d] = json.loads(Path(d, "grid.json").read_text())
    same(settings, "the NER grids were fine-tuned with different settings: they",
         "give grids made with the same `finetune_ner.py --sweep` flags")
    return rows


def analyze(paths, out, ner=None, vanilla=None, draw=True):
    """paths: MAML run folders (both arms when vanilla is None); vanilla: their twins; ner: grid folder(s)."""
    mamls, vans = split_arms(paths, vanilla)
    grids = [ner] if isinstance(ner, str) else list(ner or [])
    ner_rows = load_grids(grids) or None
    pairs, notes = pair_by_seed(mamls, vans, seed_of, lambda r: r["path"]) if mamls and vans else \
        ([(seed_of((mamls or vans)[0]), (mamls or [None])[0], (vans or [None])[0])], [])
    for n in notes:
        print(f"note: {n}")
    per = [metrics(m, v, ner_rows) for _, m, v in pairs]
    c = summarize(per)
    c.update(per[0] if len(per) == 1 else {})  # one pair: its exact values (not a geometric mean of one)
    rows, keys = [], [cl["key"] for cl in CLAIMS]
    for claim in CLAIMS:
        kind, why, test = verdict(claim, per)
        if claim.get("shape"):  # a verdict must also stand over the threshold ranges
            kind, words = ruler(claim, pairs, kind) if kind in ("holds", "does not hold") else (kind, None)
            why += f"; {words}" if words else ""
            c[f"verdict_{claim['id']}_ruler"] = words
        c[f"verdict_{claim['id']}"] = kind
        c[f"{claim['key']}_p"], c[f"{claim['key']}_p_opposite"] = test["p"], test["p_opposite"]
        rows.append((claim, f"**{kind}**: {why}"))
    c.update({f"{k}_p_holm": p for k, p in zip(keys, holm([c[f"{k}_p"] for k in keys]))})
    seeds = [s for s, _, _ in pairs]
    c.update(n_pairs=len(pairs) if pairs[0][1] and pairs[0][2] else 0, seeds=seeds, left_out=notes,
             ner_grids=grids, speedup_words=speedup_words(c), thresholds=THRESHOLDS, threshold_ranges=RANGES)
    os.makedirs(out, exist_ok=True)
    Path(out, "claims.json").write_text(json.dumps(c, indent=1))
    runs = mamls + vans
    made = figures(runs, out, c) if draw else []
    what = (f"{len(pairs)} pairs by seed ({', '.join(map(str, seeds))})" if len(pairs) > 1 else
            " vs ".join(r["name"] for r in pairs[0][1:] if r))
    md = ["## Claims", "", what + (f"; NER grid {', '.join(grids)}" if grids else "") + (
          f". Verdicts: exact sign-flip test, one-sided, p < {P_LEVEL}; 95 % t-intervals" if len(pairs) > 1
          else ". One pair: each claim's one-pair rule, no test") + ". Rules: CLAIMS in analyze.py.", ""]
    md += [f"Note: {n}." for n in notes] + ([""] if notes else [])
    md += table("claim | paper | these runs | verdict",
                [(cl["name"], cl["paper"], shows(c, cl["id"]), v) for cl, v in rows])
    md += [""] + table("claim | number | rule | p | Holm p",
                       [(cl["name"], f"`{k}`", cl["rule"], fmt(c[f"{k}_p"], 4), fmt(c[f"{k}_p_holm"], 4))
                        for cl, k in zip(CLAIMS, keys)])
    if len(pairs) > 1:
        ci = {k: c.get(f"{k}_ci95") for k in keys}
        md += [""] + table("number | mean | 95 % interval | per seed", [
            (f"`{k}`", fmt(c.get(k), 4), "[{:.4g}, {:.4g}]".format(*ci[k]) if ci[k] else "-",
             ", ".join(fmt(v, 4) for v in c[f"{k}_per_seed"])) for k in keys])
    runs_md = table("run | seed | rho | steps | AR loss (last window) | eval ppl | query acc post (last)", [
        (r["name"], seed_of(r), r["ratio"], r["rows"][-1]["step"], fmt(last(r, "loss_ar")),
         fmt(last(r, "eval_ppl"), 1), fmt(last(r, "acc_query_post"))) for r in runs])
    report = ["# maml-gpt analysis", ""] + md + ["", "## Runs", ""] + runs_md + ["", "## Figures", ""]
    Path(out, "report.md").write_text("\n".join(report + [f"![{m}]({m})" for m in made]) + "\n")
    print("\n".join(md + [""] + runs_md))
    print(f"speed-up per step: {speedup_words(c)}")
    print(f"report: {os.path.join(out, 'report.md')} ({len(made)} figures), claims.json beside it")
    return dict(claims=c, per_pair=per, pairs=pairs)


def table(head, rows):
    """A markdown table: its header ("a | b"), then the cells of each row."""
    return [f"| {head} |", "|---" * (head.count("|") + 1) + "|"] + ["| " + " | ".join(map(str, r)) + " |"
                                                                      for r in rows]


def fmt(v, nd=3):
    return "-" if v is None else (f"{v:.{nd}f}" if isinstance(v, float) else str(v))


# ------------------------------------------------------------------------------------------------------------
# Figures: an arm of several seeds is drawn as its mean with a +-1 sd band and a thin line per seed.

def band(ax, runs, key, label, x="step", k=1, color=None, ls="-"):
    """`key` of the runs of one arm (smoothed over k log points): the mean on the x values all share, a band,
    a thin line each; -> its color."""
    curves = [(xs, smooth(ys, k)) for xs, ys in (series(r, key, x) for r in runs) if len(xs)]
    if len(curves) < 2:
        return ax.plot(*curves[0], ls=ls, color=color, label=label)[0].get_color() if curves else color
    common = np.array(sorted(set.intersection(*(set(xs.tolist()) for xs, _ in curves))))
    common = common if len(common) else curves[0][0]
    ys = np.array([np.interp(common, xs, y) for xs, y in curves])  # (seeds, points)
    mean, sd = ys.mean(0), ys.std(0, ddof=1)
    color = ax.plot(common, mean, ls=ls, color=color, label=f"{label} (mean of {len(ys)}, band +-1 sd)")[0] \
        .get_color()
    ax.fill_between(common, np.maximum(mean - sd, ys.min(0)), np.minimum(mean + sd, ys.max(0)), color=color,
                    alpha=0.2, lw=0)
    for xs, y in curves:
        ax.plot(xs, y, ls=ls, lw=0.5, alpha=0.4, color=color)
    return color


def arms(runs):
    groups = {rho: [r for r in runs if r["ratio"] == rho] for rho in dict.fromkeys(r["ratio"] for r in runs)}
    return [(g[0]["name"] if len(g) == 1 else f"rho={rho}, {len(g)} seeds", g) for rho, g in groups.items()]


def titled(fig, titles, xlabels, fontsize=7, ncol=1):
    """Every figure's finish: a title, an x label and a legend per axis, a tight layout; -> fig."""
    for a, t, xl in zip(fig.axes, titles, xlabels):
        a.set(title=t, xlabel=xl)
        if a.get_legend_handles_labels()[0]:
            a.legend(fontsize=fontsize, ncol=ncol)
    fig.tight_layout()
    return fig


def figures(runs, out, c):
    """Every figure these runs support, as PNGs in `out`; -> their file names."""
    plt, made = pyplot(), []
    todo = [("loss", figure_loss, runs), ("speedup", figure_speedup, runs), ("meta", figure_meta, runs)]
    todo += [(f"per_{r['name']}", figure_per, r) for r in runs]
    for name, draw, arg in todo:
        fig = draw(plt, arg, c)
        if fig is not None:
            fig.savefig(os.path.join(out, f"{name}.png"), dpi=110)
            plt.close(fig)
            made.append(f"{name}.png")
    return made


def figure_loss(plt, runs, c):
    """AR loss per step (and MAML's mixed metric, dashed), per backbone token, and eval perplexity."""
    fig, ax = plt.subplots(1, 3, figsize=(15, 4))
    for name, group in arms(runs):
        for a, axis in zip(ax[:2], ("step", "tokens")):
            color = band(a, group, "loss_ar", name, axis, k=5)
        if not group[0]["vanilla"]:
            band(ax[0], group, "loss_mixed", f"{name} mixed", k=5, color=color, ls="--")
        band(ax[2], group, "eval_ppl", name)
    ax[2].set_yscale("log")
    return titled(fig, ("loss vs step: AR (solid), mixed train/loss (dashed)", "AR loss vs tokens",
                        "eval perplexity"), ("optimizer step", "backbone tokens (AR + meta)", "step"))


def figure_speedup(plt, runs, c):
    """Vanilla's steps to each loss level over MAML's, one curve per pair and speed-up."""
    mamls, vans = [r for r in runs if not r["vanilla"]], [r for r in runs if r["vanilla"]]
    if not (mamls and vans):
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for n, (name, x, metric, label) in enumerate(SPEEDUPS):
        for i, (_, m, v) in enumerate(pair_by_seed(mamls, vans, seed_of, lambda r: r["path"])[0]):
            sp = speedup(*series(v, "loss_ar", x), *series(m, metric, x))
            if sp:
                ax.plot(sp["levels"], sp["ratios"], ls="--" if "mixed" in name else "-", lw=1 if i else 1.5,
                        color=f"C{n}", label=None if i else label)
    ax.axhline(1, color="grey", lw=0.8)
    ax.invert_xaxis()
    ax.set(ylabel="x sooner (vanilla / MAML)")
    return titled(fig, ["reaches the same loss N x sooner"], ["loss level (of the curve's own metric)"])


def figure_meta(plt, runs, c):
    """Support and query accuracy before and after adaptation, with chance; the held-out few-shot eval."""
    meta = [r for r in runs if not r["vanilla"]]
    if not meta:
        return None
    fig, ax = plt.subplots(1, 3, figsize=(15, 4))
    for name, group in arms(meta):
        for key, style in (("acc_support_pre", ":"), ("acc_support_post", "-"), ("acc_query_pre", "--"),
                           ("acc_query_post", "-")):
            band(ax[0 if "support" in key else 1], group, key, f"{name} {key}", ls=style)
        n_way = group[0]["config"]["args"].get("n_way", 32)
        for a in ax[:2]:
            a.axhline(1 / n_way, color="grey", lw=0.8, label=f"chance 1/{n_way}")
    for name, group in arms(runs):
        for key, style in (("eval_proto_acc_mask", "-"), ("eval_proto_acc_prev", "--"),
                           ("eval_fewshot_acc", ":")):
            band(ax[2], group, key, f"{name} {key}", ls=style)
    if c.get("jump_step"):
        ax[1].axvline(c["jump_step"], color="red", lw=0.8, ls="--",
                      label=f"largest rise after a plateau (+{c['jump_rise']:.2f})")
    return titled(fig, ("support accuracy (pre / post adaptation)", "query accuracy (pre / post)",
                        "held-out few-shot eval"), ["optimizer step"] * 3, 6)


def figure_per(plt, run, c):
    """PER of weights and gradients per attention matrix (mean over layers, raw probes), the steepest
    weight-PER drop marked, the released code's all-attention variant; mean attention entropy per layer."""
    rows = [r for r in run["rows"] if "attn_entropy" in r]
    if not (attn_modules(run) or rows):
        return None
    fig, ax = plt.subplots(1, 3, figsize=(16, 3.8))
    for a, kind in zip(ax, ("weight", "grad")):
        for mod in attn_modules(run):
            x, y = mean_per(run, kind, mod)
            color = a.plot(x, y, marker=".", label=mod)[0].get_color()
            w = weight_drop(x, y) if kind == "weight" else None
            if w and w["fall"] >= THRESHOLDS["fall"]:
                a.axvline(w["step"], color=color, ls="--", lw=0.8, label=f"steepest drop ({mod})")
        a.plot(*series(run, f"ref/per_{kind}_attn"), color="grey", lw=1, label="released code's (all attn)")
    if rows:
        ent = np.array([np.mean(r["attn_entropy"], axis=1) for r in rows])  # (probes, layers)
        ax[2].plot([r["step"] for r in rows], ent, label=[f"L{layer}" for layer in range(ent.shape[1])])
    ax[2].set(ylabel="nats")
    return titled(fig, [f"PER of {k} ({run['name']})" for k in ("weights", "gradients")]
                  + ["mean head entropy per layer"], ["step"] * 3, 6, ncol=2)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="*", help="the MAML runs (with --vanilla), or a MAML run and its vanilla "
                   "twin (default: out/demo and, if present, out/demo-vanilla)")
    p.add_argument("--vanilla", nargs="+", metavar="VANILLA_RUN", help="the --hybrid_ratio 0 runs")
    p.add_argument("--out", help="output folder (default: FIRST_RUN/analysis)")
    p.add_argument("--ner", nargs="+", metavar="GRID_DIR", help="output folder(s) of `finetune_ner.py "
                   "--sweep` (default: RUN/ner-grid of every run that has one)")
    args = p.parse_args(argv)
    runs = args.runs or [d for d in ("out/demo", "out/demo-vanilla") if os.path.isdir(d)] or ["out/demo"]
    found = [os.path.join(r, "ner-grid") for r in runs + (args.vanilla or [])
             if os.path.exists(os.path.join(r, "ner-grid", "grid.csv"))]
    cli(lambda: analyze(runs, args.out or os.path.join(runs[0], "analysis"), args.ner or found or None,
                        args.vanilla))


if __name__ == "__main__":
    main()
