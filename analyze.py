"""
analyze.py: which of the paper's four claims hold on MAML runs and their vanilla twins, with figures and a
report (paper §4-§6: speed-up, NER F1, PER and attention entropy, meta-learning curves).

    python analyze.py                                   # the demo run(s): out/demo [and out/demo-vanilla]
    python analyze.py out/small out/small-vanilla       # a MAML run and its vanilla twin
    python analyze.py RUN_MAML RUN_VANILLA --ner GRID   # + the NER row, from `finetune_ner.py --sweep` output
    python analyze.py out/s1 out/s2 out/s3 --vanilla out/v1 out/v2 out/v3   # several seeds, paired by --seed
    python analyze.py RUN [RUN ...] --out figures/      # choose the output folder (default RUN1/analysis)

Reads RUN/metrics.jsonl and RUN/config.json; writes claims.json, report.md (the Claims table on top) and PNG
figures, and prints the Claims table. Runs with --hybrid_ratio 0 are "vanilla". One run per arm: the claims
compare the two. Several: the runs are paired by seed, every number is given per seed with its mean and 95 %
interval, and each claim's verdict rests on an exact sign-flip test over the pairs (see "Statistics across
seeds" below).
"""
import argparse
import json
import math
import os
import sys

import numpy as np

from finetune_ner import GROUPS, pyplot
from maml_gpt import UserError

# ------------------------------------------------------------------------------------------------------------
# Loading


def load_run(path):
    """-> dict(name, config, rows, vanilla). A clear error for a folder that is not a run."""
    mfile = os.path.join(path, "metrics.jsonl")
    if not os.path.exists(mfile):
        raise UserError(f"{path} has no metrics.jsonl; "
                        "pass a run folder written by maml_gpt.py (its --out_dir)")
    rows = []
    with open(mfile) as f:
        for i, line in enumerate(f, 1):
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                raise UserError(f"{mfile}:{i}: not a JSON line (truncated run?); delete that line and retry")
    if not rows:
        raise UserError(f"{mfile} is empty; let the run log at least one window")
    cfile = os.path.join(path, "config.json")
    config = json.load(open(cfile)) if os.path.exists(cfile) else {"args": {}}
    ratio = config["args"].get("hybrid_ratio", 0.0 if not any("loss_query" in r for r in rows) else 0.5)
    return dict(name=os.path.basename(os.path.normpath(path)), path=path, config=config, rows=rows,
                vanilla=ratio == 0, ratio=ratio)


def series(run, key, x="step"):
    """(x, y) arrays of the rows that have `key`."""
    pts = [(r[x], r[key]) for r in run["rows"] if r.get(key) is not None and x in r]
    return (np.array([p[0] for p in pts], dtype=float), np.array([p[1] for p in pts], dtype=float)) if pts \
        else (np.zeros(0), np.zeros(0))


def smooth(y, k=5):
    """Centered moving average over k log points (edges use what is there)."""
    if len(y) < 3:
        return y
    k = min(k, len(y))
    c = np.convolve(np.ones_like(y), np.ones(k), "same")
    return np.convolve(y, np.ones(k), "same") / c


# ------------------------------------------------------------------------------------------------------------
# "Reaches the same loss N x sooner" (paper §4): ratio of the steps (or tokens) each run needs to first reach
# a loss level, vanilla over MAML, for every level both runs reach.

def first_reach(x, y, level):
    """First x at which the smoothed, running-minimum loss is <= level (linear interpolation between log
    points)."""
    # Smooth first (AR losses are noisy), then take the running minimum so "reached" is monotone in time.
    best = np.minimum.accumulate(smooth(y))
    hit = np.flatnonzero(best <= level)
    if not len(hit):
        return None
    i = hit[0]
    if i == 0:
        return x[0]
    x0, x1, y0, y1 = x[i - 1], x[i], best[i - 1], best[i]
    return x0 + (x1 - x0) * (y0 - level) / (y0 - y1) if y0 != y1 else x1


def speedup(xv, yv, xm, ym, n_levels=50):
    """Loss curves (x, y) of the vanilla and the MAML run -> dict(levels, ratios, max, max_level, at_final,
    final_loss), ratios = x_vanilla(L) / x_maml(L); None when the curves are too short or never overlap.

    at_final is the paper's number ("reaches its vanilla loss N x sooner"): the x at which vanilla ends over
    the x at which MAML first reaches vanilla's final loss. If MAML never gets there, the same question the
    other way round: where vanilla first reaches MAML's final loss over where MAML ends (then < 1)."""
    if len(yv) < 2 or len(ym) < 2:
        return None
    bv, bm = np.minimum.accumulate(smooth(yv)), np.minimum.accumulate(smooth(ym))
    hi, lo = min(bv[0], bm[0]), max(bv[-1], bm[-1])  # the loss range both runs cover
    # skip the top 10 % of that range: the first few log points, where both runs sit in warm-up and ratios are
    # noise. No range (one run starts below where the other ends, as the mixed metric can): only the final
    # level is shared.
    levels = np.linspace(hi - 0.1 * (hi - lo), lo, n_levels) if hi > lo else np.array([lo])
    ratios = []
    for L in levels:
        a, b = first_reach(xv, yv, L), first_reach(xm, ym, L)
        ratios.append(a / b if a and b else np.nan)
    ratios = np.array(ratios)
    if bm[-1] <= bv[-1]:
        final = first_reach(xm, ym, bv[-1])
        at_final = xv[-1] / final if final else None
    else:
        reach = first_reach(xv, yv, bm[-1])
        at_final = reach / xm[-1] if reach else None
    ok = np.isfinite(ratios)
    if not ok.any():
        return None
    i = int(np.nanargmax(ratios))
    return dict(levels=levels, ratios=ratios, max=float(ratios[i]), max_level=float(levels[i]),
                at_final=None if at_final is None else float(at_final), final_loss=float(lo))


def mixed_series(run, x="step"):
    """The reference's `train/loss`: the mean over each window's micro-steps of whichever loss each computed.
    `loss_mixed` when logged; in older runs rebuilt exactly from the branch means, since every step of a run
    has the same number of micro-steps. A vanilla run's is its AR loss."""
    if run["vanilla"]:
        return series(run, "loss_ar", x)
    if any("loss_mixed" in r for r in run["rows"]):
        return series(run, "loss_mixed", x)
    pts = [(r[x], (r["n_ar_steps"] * r.get("loss_ar", 0.0) + r["n_meta_steps"] * r.get("loss_query", 0.0))
            / (r["n_ar_steps"] + r["n_meta_steps"])) for r in run["rows"]
           if r.get("n_ar_steps", 0) + r.get("n_meta_steps", 0) and x in r]
    return np.array([p[0] for p in pts], float), np.array([p[1] for p in pts], float)


# The four speed-ups of claim 1: (result key, x axis, a run -> its (x, loss) curve, what it measures).
# tokens_ar counts AR batches seen (AR steps x global batch x seq_len): "per AR step" up to a factor
# both share.
SPEEDUPS = [("step", "step", lambda r, x: series(r, "loss_ar", x), "per step, AR loss"),
            ("tokens", "tokens", lambda r, x: series(r, "loss_ar", x), "per backbone token, AR loss"),
            ("arstep", "tokens_ar", lambda r, x: series(r, "loss_ar", x), "per AR step, AR loss"),
            ("step_mixed", "step", mixed_series, "per step, the reference's mixed train/loss")]


# ------------------------------------------------------------------------------------------------------------
# Phase transitions (paper §6). Rules:
#  * PER knee: on the smoothed curve, the peak (argmax) and, after it, the steepest drop (the most negative
#    slope); reported when the curve falls by at least 5 % of its peak value after the peak (the "compress").
#    The claim's "diversify" also needs a rise before it: a peak at least 5 % above the first log point
#    ("rose").
#  * query-accuracy jump: a log point where smoothed accuracy rises by more than max(0.05, 3 x the median
#    absolute increment), i.e. a rise well outside the usual step-to-step noise.

def per_knee(x, y, min_drop=0.05):
    if len(y) < 4:
        return None
    s = smooth(y, 3)  # PER is logged sparsely (every --dynamics_every steps): light smoothing only
    p = int(np.argmax(s))
    if p >= len(s) - 1 or (s[p] - s[p:].min()) < min_drop * s[p]:
        return None
    slopes = np.gradient(s, x)  # central differences: the slope AT each log point
    d = p + int(np.argmin(slopes[p:]))
    return dict(peak_step=float(x[p]), peak=float(s[p]), drop_step=float(x[d]), after=float(s[p:].min()),
                start=float(s[0]), rose=bool(s[p] - s[0] >= min_drop * s[p]))


def accuracy_jumps(x, y):
    if len(y) < 4:
        return []
    s = smooth(y, 3)
    inc = np.diff(s)
    thr = max(0.05, 3 * float(np.median(np.abs(inc))))
    jumps = []
    for i in np.flatnonzero(inc > thr):  # consecutive flagged points are one jump: keep its largest rise
        if jumps and jumps[-1]["i"] == i - 1:
            if inc[i] > jumps[-1]["rise"]:
                jumps[-1].update(step=float(x[i + 1]), rise=float(inc[i]))
            jumps[-1]["i"] = i
        else:
            jumps.append(dict(i=i, step=float(x[i + 1]), rise=float(inc[i])))
    return [dict(step=j["step"], rise=j["rise"]) for j in jumps]


def per_keys(run, kind):
    """Dynamics keys of one kind ('weight' or 'grad'), e.g. per_weight/layers.3.attention.v_proj."""
    return sorted({k for r in run["rows"] for k in r if k.startswith(f"per_{kind}/")},
                  key=lambda k: (k.split("/")[1].split(".")[2:], int(k.split(".")[1])))


def mean_per(run, kind, module=""):
    """(steps, PER averaged over layers and matrices), or over the layers of one matrix type (e.g.
    swiglu.w_2)."""
    keys = [k for k in per_keys(run, kind) if k.endswith(module)]
    rows = [r for r in run["rows"] if keys and keys[0] in r]
    return (np.array([r["step"] for r in rows], float),
            np.array([np.mean([r[k] for k in keys]) for r in rows]))


def modules(run):
    """Matrix types with PER logs, e.g. attention.v_proj (from --dynamics_modules)."""
    return sorted({k.split(".", 2)[2] for k in per_keys(run, "weight")})


def entropy_series(run):
    """(steps, attention entropy averaged over layers and heads) on the probe batch."""
    rows = [r for r in run["rows"] if "attn_entropy" in r]
    return (np.array([r["step"] for r in rows], float),
            np.array([r.get("attn_entropy_mean", np.mean(r["attn_entropy"])) for r in rows], float))


# ------------------------------------------------------------------------------------------------------------
# Statistics across seeds. A seed fixes a run's AR batches, so a MAML run and its vanilla twin of the same
# seed see the same data at every AR step, and every run sees the same held-out episodes: pairs by seed are a
# paired design, and each pair gives one number d_i (MAML minus vanilla, or the log of a speed-up ratio).
#  * Test: the exact sign-flip (permutation) test of mean(d), one-sided in the claimed direction. Under "no
#    effect" the two runs of a pair are exchangeable, so each of the 2^n sign patterns of d is equally
#    likely; p is the share of patterns whose sum is >= the observed one. It assumes no distribution (3-10
#    pairs cannot show one) and its smallest p is 1 / 2^n: 0.125 at n = 3, 0.0625 at 4, 0.031 at 5, 0.0039 at
#    8. The same test in the other direction decides "does not hold". The paired t-test's two-sided p is
#    reported beside it, for reference only.
#  * Interval: mean +- t(0.975, n - 1) sd / sqrt(n), the t-interval (on log ratios for speed-ups, shown as
#    ratios). The t quantile is computed here (no scipy): the inverse of the t CDF, which is a regularised
#    incomplete beta function.

P_LEVEL = 0.05
EXACT_MAX_PAIRS = 16  # up to 2^16 sign patterns enumerated; more pairs: 100,000 random patterns (seeded)


def betainc(a, b, x):
    """Regularised incomplete beta I_x(a, b) by its continued fraction (Numerical Recipes 6.4, modified
    Lentz); converges fast for x < (a + 1) / (a + b + 2), the symmetry I_x(a, b) = 1 - I_1-x(b, a) covers the
    rest."""
    if x <= 0.0 or x >= 1.0:
        return float(x >= 1.0)
    if x > (a + 1) / (a + b + 2):
        return 1.0 - betainc(b, a, 1.0 - x)
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        for num in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),  # the even, then the odd term
                    -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    return math.exp(log_front) * h / a


def t_cdf(t, df):
    """P(T <= t) for Student's t with df degrees of freedom."""
    tail = 0.5 * betainc(df / 2, 0.5, df / (df + t * t))  # P(T > |t|)
    return 1.0 - tail if t > 0 else tail


def t_quantile(p, df):
    """The t with P(T <= t) = p (bisection on t_cdf; |error| < 1e-10)."""
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        hi *= 2
    while hi - lo > 1e-12 * max(1.0, hi):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_cdf(mid, df) < p else (lo, mid)
    return (lo + hi) / 2


def ci95(xs):
    """(mean, [low, high]) of the t-interval; the interval is None below 2 values."""
    xs = np.asarray(xs, float)
    m = float(xs.mean())
    if len(xs) < 2:
        return m, None
    h = t_quantile(0.975, len(xs) - 1) * float(xs.std(ddof=1)) / math.sqrt(len(xs))
    return m, [m - h, m + h]


def sign_flip_p(d):
    """(p of mean(d) > 0, p of mean(d) < 0): the exact one-sided sign-flip tests, each counting the observed
    pattern itself (so p >= 1 / 2^n)."""
    d = np.asarray(d, float)
    n = len(d)
    if n <= EXACT_MAX_PAIRS:  # every sign pattern: row i flips the pairs whose bit is set in i
        signs = 1 - 2 * ((np.arange(1 << n)[:, None] >> np.arange(n)) & 1)
    else:
        signs = np.random.default_rng(0).choice([-1, 1], size=(100_000, n))
    sums, obs = signs @ np.abs(d), d.sum()
    tol = 1e-9 * max(1.0, float(np.abs(d).sum()))  # float sums of the same terms in another order
    return float(np.mean(sums >= obs - tol)), float(np.mean(sums <= obs + tol))


def t_test_p(d):
    """Two-sided p of the paired t-test of mean(d) = 0; None below 2 values."""
    d = np.asarray(d, float)
    if len(d) < 2:
        return None
    sd = float(d.std(ddof=1))
    if sd == 0:
        return 0.0 if d.mean() != 0 else 1.0
    t = float(d.mean()) / (sd / math.sqrt(len(d)))
    return 2 * (1 - t_cdf(abs(t), len(d) - 1))


# ------------------------------------------------------------------------------------------------------------
# The paper's four claims, one row each: the paper's statement and number, what these runs show, a verdict.
# Verdicts are "holds", "does not hold" or "not measurable"; the rules are in each function's docstring and in
# the README. claims.json is flat (str -> number / bool / str / null) and has every key, measurable or
# not.

PAPER_CLAIMS = [  # (claim id, name, the paper's statement and number)
    ("speedup", "Same loss N x sooner",
     "MAML reaches its vanilla twin's loss up to 1.6x sooner (1.3-1.6x over the four sizes, per step; §4)"),
    ("ner", "NER F1 under equal compute",
     "MAML improves Universal NER micro-F1; Table 3, large, head / full: seen +6.2 / +4.8 %, "
     "PUD +7.2 / +3.5 %, other +2.1 / +8.1 % (mixed signs at smaller sizes)"),
    ("dynamics", "Diversify-then-compress",
     "PER and attention entropy rise, then fall (a knee) in MAML runs, not in vanilla ones; "
     "large: sharp PER drop near step 3000 (§6)"),
    ("jump", "Query-accuracy jump",
     "query accuracy jumps from near chance to > 0.5 (large: ~step 2600-3000, again at 4900; §6)"),
]
SPEEDUP_MIN = 1.1  # below this ratio we say "no speed-up": a fixed threshold, not a significance test
NER_REGIMES = ("head", "full")
FEWSHOT_KEYS = ("eval_fewshot_acc_pre", "eval_fewshot_acc", "eval_proto_acc_mask", "eval_proto_acc_prev")


def claim_speedup(results, maml, van):
    """Holds when MAML reaches vanilla's final AR loss >= SPEEDUP_MIN x sooner per step (the paper's axis)."""
    c = {}
    for key, name in (("step", "step_ar"), ("tokens", "token_ar"), ("arstep", "arstep_ar"),
                      ("step_mixed", "step_mixed")):
        sp = results.get(f"speedup_{key}")
        c[f"speedup_{name}"] = sp["at_final"] if sp else None
        c[f"speedup_{name}_max"] = sp["max"] if sp else None
    c["final_loss_ar_maml"] = last(maml, "loss_ar") if maml else None
    c["final_loss_ar_vanilla"] = last(van, "loss_ar") if van else None
    c["final_loss_mixed_maml"] = (float(mixed_series(maml)[1][-1]) if maml and len(mixed_series(maml)[1])
                                  else None)
    c["final_loss_query_maml"] = last(maml, "loss_query") if maml else None
    c["final_eval_ppl_maml"] = last(maml, "eval_ppl") if maml else None
    c["final_eval_ppl_vanilla"] = last(van, "eval_ppl") if van else None
    c["speedup_metric_factor"] = (c["speedup_step_mixed"] / c["speedup_step_ar"]
                                  if c["speedup_step_mixed"] and c["speedup_step_ar"] else None)

    def x(k):
        return f"{c[k]:.2f}x" if c[k] is not None else "-"
    shows = (f"per step {x('speedup_step_ar')}, per backbone token {x('speedup_token_ar')}, per AR step "
             f"{x('speedup_arstep_ar')} (AR loss); per step on the reference's mixed train/loss "
             f"{x('speedup_step_mixed')}")
    if c["speedup_step_ar"] is None:
        return (c, shows, "not measurable",
                "needs loss_ar over >= 2 windows in a MAML run and its vanilla twin")
    if c["speedup_step_ar"] >= SPEEDUP_MIN:
        return c, shows, "holds", f"{x('speedup_step_ar')} per step on AR loss"
    return c, shows, "does not hold", f"{x('speedup_step_ar')} per step on AR loss (< {SPEEDUP_MIN}x)"


def load_grid(grid_dir):
    import csv
    path = os.path.join(grid_dir, "grid.csv")
    if not os.path.exists(path):
        raise UserError(f"{grid_dir} has no grid.csv; pass the --out folder of "
                        "`finetune_ner.py --sweep --ckpt MAML/ckpt.pt VANILLA/ckpt.pt`")
    with open(path) as f:
        return list(csv.DictReader(f))


def grid_ckpt(rows, run, want_maml, by_seed=False):
    """The grid's checkpoint of this run: the one inside its folder; else, pairing by seed, the one of the
    run's seed and arm (the grid's ckpt_seed column), never another seed's; else the first of its arm."""
    ckpts = list(dict.fromkeys(r["ckpt"] for r in rows))
    for c in ckpts:
        if run and os.path.realpath(os.path.dirname(c)) == os.path.realpath(run["path"]):
            return c
    ratio = {c: float(next(r["hybrid_ratio"] for r in rows if r["ckpt"] == c) or 0) for c in ckpts}
    arm = [c for c in ckpts if (ratio[c] > 0) == want_maml]
    if by_seed:
        seed = str(run["config"]["args"].get("seed")) if run else None
        return next((c for c in arm if str(next(r.get("ckpt_seed") for r in rows if r["ckpt"] == c)) == seed),
                    None)
    return arm[0] if arm else None


def claim_ner(rows, maml, van, by_seed=False):
    """Relative change of mean micro-F1, MAML over vanilla, in % of vanilla, per regime and evaluation group
    (the paper's Table 3; means over every fine-tuning config x evaluation set of the group, as grid.md).
    Holds when the average of the measurable (regime, group) changes (ner_rel_avg) is > 0."""
    groups = {g: [e for e in GROUPS[g] if not e.startswith("toy")] for g in ("seen", "pud", "other")}
    groups.update(toy=["toy"], toy_heldout=["toy_heldout"])  # the offline toy set: same names, unseen names
    c = {}
    m = grid_ckpt(rows, maml, True, by_seed) if rows else None
    v = grid_ckpt(rows, van, False, by_seed) if rows else None
    c["ner_ckpt_maml"], c["ner_ckpt_vanilla"], c["ner_rel_avg"] = m, v, None
    for regime in NER_REGIMES:
        for g, evs in groups.items():
            f1 = {}
            for tag, ck in (("maml", m), ("vanilla", v)):
                vals = [float(r["f1"]) for r in rows or [] if r["ckpt"] == ck and r["regime"] == regime
                        and r["eval_on"] in evs]
                f1[tag] = c[f"ner_f1_{regime}_{g}_{tag}"] = float(np.mean(vals)) if vals and ck else None
            ok = f1["maml"] is not None and f1["vanilla"]  # a vanilla F1 of 0 has no relative change
            c[f"ner_rel_{regime}_{g}"] = (f1["maml"] - f1["vanilla"]) / f1["vanilla"] * 100 if ok else None
    if rows is None:
        return c, "-", "not measurable", ("needs --ner GRID_DIR from `finetune_ner.py --sweep --ckpt "
                                          "RUN_MAML/ckpt.pt RUN_VANILLA/ckpt.pt`")
    if not (m and v):
        return c, "-", "not measurable", "needs both checkpoints (MAML and vanilla) in the grid"
    parts, rel = [], []
    for names, label in (((("seen", "seen"), ("pud", "PUD"), ("other", "other")), "Universal NER"),
                         ((("toy", "same names"), ("toy_heldout", "unseen names")), "toy NER")):
        cells = [f"{regime} " + ", ".join(f"{lab} {c[f'ner_rel_{regime}_{g}']:+.1f} %" for g, lab in names
                                          if c[f"ner_rel_{regime}_{g}"] is not None)
                 for regime in NER_REGIMES]
        if any(c[f"ner_rel_{regime}_{g}"] is not None for regime in NER_REGIMES for g, _ in names):
            parts.append(f"{label}: " + "; ".join(cells))
            rel += [c[f"ner_rel_{regime}_{g}"] for regime in NER_REGIMES for g, _ in names
                    if c[f"ner_rel_{regime}_{g}"] is not None]
    shows = " / ".join(parts) + " (relative change of mean micro-F1, head / full fine-tuning)"
    if not rel:
        return c, shows, "not measurable", "needs a grid with a non-zero vanilla F1"
    avg = c["ner_rel_avg"] = float(np.mean(rel))
    toy_only = not any(c[f"ner_rel_{r}_{g}"] is not None
                       for r in NER_REGIMES for g in ("seen", "pud", "other"))
    where = " (toy NER only, not Universal NER)" if toy_only else ""
    return c, shows, "holds" if avg > 0 else "does not hold", f"average change {avg:+.1f} %{where}"


def claim_dynamics(maml, van):
    """Holds when the MAML run's mean weight PER and its mean attention entropy both rise, then fall (the
    rules above), and the vanilla twin's weight PER does not."""
    c, text = {}, []
    for tag, run in (("maml", maml), ("vanilla", van)):
        for kind in ("weight", "grad"):
            k = per_knee(*mean_per(run, kind)) if run else None
            c[f"knee_{kind}_peak_step_{tag}"] = k["peak_step"] if k else None
            c[f"knee_{kind}_step_{tag}"] = k["drop_step"] if k else None
            c[f"rise_fall_{kind}_{tag}"] = bool(k and k["rose"]) if run and per_keys(run, kind) else None
        for mod in modules(run) if run else []:
            k = per_knee(*mean_per(run, "weight", mod))
            c[f"knee_weight_step_{tag}/{mod}"] = k["drop_step"] if k else None
        x, y = entropy_series(run) if run else (np.zeros(0), np.zeros(0))
        k, s = per_knee(x, y), smooth(y, 3)  # the same smoothing as the knee rule
        p = int(np.argmax(s)) if len(s) else 0
        for name, v in (("first", s[:1]), ("peak", s[p:p + 1]), ("peak_step", x[p:p + 1]), ("last", s[-1:])):
            c[f"entropy_{name}_{tag}"] = float(v[0]) if len(v) else None
        c[f"entropy_knee_step_{tag}"] = k["drop_step"] if k and k["rose"] else None
        c[f"rise_fall_entropy_{tag}"] = bool(k and k["rose"]) if len(y) else None
        if not run or not per_keys(run, "weight"):
            continue
        kw = per_knee(*mean_per(run, "weight"))
        per = (f"weight PER {kw['start']:.2f} -> {kw['peak']:.2f} (step {kw['peak_step']:.0f}) -> "
               f"{kw['after']:.2f}, steepest drop at {kw['drop_step']:.0f}" if kw else "weight PER: no knee")
        if kw:
            per += " (" + ", ".join(f"{m.split('.')[-1]} " + fmt(c[f"knee_weight_step_{tag}/{m}"], 0)
                                    for m in modules(run)) + ")"
        ent = (f"entropy {c[f'entropy_first_{tag}']:.2f} -> {c[f'entropy_peak_{tag}']:.2f} (step "
               f"{c[f'entropy_peak_step_{tag}']:.0f}) -> {c[f'entropy_last_{tag}']:.2f} nats"
               if len(s) else "")
        text.append(f"{run['name']}: " + "; ".join(t for t in (per, ent) if t))
    shows = " / ".join(text) or "-"
    # The paired number across seeds: the share of the two curves (weight PER, attention entropy) that rise
    # then fall, MAML minus vanilla (in [-1, 1]; 0 when both behave alike).
    share = {t: [c[f"rise_fall_{k}_{t}"] for k in ("weight", "entropy")
                 if c[f"rise_fall_{k}_{t}"] is not None] for t in ("maml", "vanilla")}
    c["rise_fall_diff"] = (float(np.mean(share["maml"]) - np.mean(share["vanilla"]))
                           if share["maml"] and share["vanilla"] and c["rise_fall_weight_maml"] is not None
                           else None)
    if not maml or c["rise_fall_weight_maml"] is None:
        return c, shows, "not measurable", "needs PER logs (--dynamics_every > 0) in the MAML run"
    fails = [why for ok, why in ((c["rise_fall_weight_maml"], "MAML weight PER does not rise then fall"),
                                 (c["rise_fall_entropy_maml"] is not False,
                                  "MAML attention entropy does not rise then fall"),
                                 (not c["rise_fall_weight_vanilla"],
                                  "vanilla weight PER rises then falls too"))
             if not ok]
    if fails:
        return c, shows, "does not hold", "; ".join(fails)
    return (c, shows, "holds",
            "rise then fall in MAML" + (", not in vanilla" if van else " (no vanilla twin given)"))


def fewshot_at(run, step, key):
    return (next((r[key] for r in run["rows"] if r["step"] == step and r.get(key) is not None), None)
            if run else None)


def claim_jump(maml, van):
    """Holds when the MAML run's query accuracy (after adaptation) has a jump by the rule above. Also reports
    the held-out few-shot eval of both backbones at the last eval step both logged (and at MAML's token
    count)."""
    c = dict(jump_step=None, jump_rise=None, n_jumps=None, acc_query_pre_last=None, acc_query_post_last=None,
             chance=None, fewshot_step=None, fewshot_tokens_maml=None, fewshot_tokens_vanilla=None,
             eval_fewshot_acc_vanilla_equal_tokens=None, eval_fewshot_acc_diff=None)
    c.update({f"{k}_{tag}": None for k in FEWSHOT_KEYS for tag in ("maml", "vanilla")})
    if maml:
        c["chance"] = 1 / maml["config"]["args"].get("n_way", 32)
        c["acc_query_pre_last"], c["acc_query_post_last"] = (last(maml, "acc_query_pre"),
                                                             last(maml, "acc_query_post"))
        jumps = accuracy_jumps(*series(maml, "acc_query_post"))
        if len(series(maml, "acc_query_post")[1]) >= 4:
            c["n_jumps"] = len(jumps)
        if jumps:
            big = max(jumps, key=lambda j: j["rise"])
            c["jump_step"], c["jump_rise"] = big["step"], big["rise"]
    steps = [s for s in (set(series(r, "eval_fewshot_acc")[0]) for r in (maml, van) if r) if s]
    # the eval steps of both runs (or of the one that has it)
    common = set.intersection(*steps) if steps else set()
    shows = []
    if c["n_jumps"] is not None:
        shows.append(f"query accuracy after adaptation, last window {c['acc_query_post_last']:.3f} (before "
                     f"{fmt(c['acc_query_pre_last'])}, chance {c['chance']:.3f}); " +
                     (f"jump at step {c['jump_step']:.0f} (+{c['jump_rise']:.3f})" if c["jump_step"]
                      else "no jump"))
    if common:
        st = c["fewshot_step"] = max(common)
        for tag, run in (("maml", maml), ("vanilla", van)):
            c[f"fewshot_tokens_{tag}"] = fewshot_at(run, st, "tokens")
            for k in FEWSHOT_KEYS:
                c[f"{k}_{tag}"] = fewshot_at(run, st, k)
        if c["eval_fewshot_acc_maml"] is not None and c["eval_fewshot_acc_vanilla"] is not None:
            c["eval_fewshot_acc_diff"] = c["eval_fewshot_acc_maml"] - c["eval_fewshot_acc_vanilla"]
        if van and c["fewshot_tokens_maml"] is not None:
            xv, yv = series(van, "eval_fewshot_acc", "tokens")
            if len(xv) and xv[0] <= c["fewshot_tokens_maml"] <= xv[-1]:
                c["eval_fewshot_acc_vanilla_equal_tokens"] = float(np.interp(c["fewshot_tokens_maml"],
                                                                             xv, yv))

        def pair(k):  # "MAML vs vanilla" values of one key
            return " vs ".join(fmt(c[f"{k}_{t}"]) for t, r in (("maml", maml), ("vanilla", van)) if r)
        shows.append(f"held-out few-shot eval at step {st:.0f} "
                     f"({' vs '.join(r['name'] for r in (maml, van) if r)}): "
                     f"after adaptation {pair('eval_fewshot_acc')}, before {pair('eval_fewshot_acc_pre')}; "
                     f"prototypes at [MASK] {pair('eval_proto_acc_mask')}, at the token before "
                     f"{pair('eval_proto_acc_prev')}" +
                     (f"; vanilla at MAML's {c['fewshot_tokens_maml']:,.0f} tokens "
                      f"{c['eval_fewshot_acc_vanilla_equal_tokens']:.3f}"
                      if c["eval_fewshot_acc_vanilla_equal_tokens"] is not None else ""))
    else:
        shows.append("no held-out few-shot eval logged (eval_fewshot_acc)")
    shows = "; ".join(shows)
    if c["n_jumps"] is None:
        return c, shows, "not measurable", "needs acc_query_post over >= 4 windows of a MAML run"
    if c["jump_step"] is not None:
        return c, shows, "holds", f"jump at step {c['jump_step']:.0f}"
    return c, shows, "does not hold", "no jump in query accuracy"


def claims(maml, van, results, ner_rows, by_seed=False):
    """One pair: -> (flat dict for claims.json, [(claim id, shows, verdict, why)] in PAPER_CLAIMS order)."""
    out = dict(run_maml=maml["path"] if maml else None, run_vanilla=van["path"] if van else None)
    rows = []
    for (cid, _, _), (c, shows, kind, why) in zip(PAPER_CLAIMS, (
            claim_speedup(results, maml, van), claim_ner(ner_rows, maml, van, by_seed),
            claim_dynamics(maml, van), claim_jump(maml, van))):
        out.update(c)
        out[f"verdict_{cid}"] = kind
        rows.append((cid, shows, kind, why))
    return {k: (v.item() if isinstance(v, np.generic) else v) for k, v in out.items()}, rows


# ------------------------------------------------------------------------------------------------------------
# Several seeds per arm: pairs by seed, every number of the pairs summarised, one verdict per claim.

# Each claim's headline number (the paired d_i of the test above), whether it is a ratio (tested as its log),
# and how the verdict cell names it.
HEADLINES = {"speedup": ("speedup_step_ar", True, "per step on AR loss (vanilla's steps / MAML's)"),
             "ner": ("ner_rel_avg", False, "average relative change of NER micro-F1, %"),
             "dynamics": ("rise_fall_diff", False, "share of PER / entropy curves that rise then fall, "
                          "MAML minus vanilla"),
             "jump": ("eval_fewshot_acc_diff", False, "held-out few-shot eval after adaptation, MAML minus "
                      "vanilla")}
RATIO_KEYS = ("speedup_",)  # keys that are ratios: geometric mean, interval on the log
# Flags that may differ between the runs of one arm: where a run lives, how it was restarted or logged
# elsewhere, and the device (which changes the kernels as the thread count does, not the experiment).
FREE_SETTINGS = {"seed", "out_dir", "data_dir", "resume", "overwrite", "wandb", "save_every", "device",
                 "compile", "bench", "sample", "num_samples", "max_new_tokens", "temperature", "top_k",
                 "export_hf"}


def check_arm(runs, arm):
    """UserError naming the first flag (other than the seed) whose value differs between the runs of an
    arm."""
    keys = sorted({k for r in runs for k in r["config"]["args"]} - FREE_SETTINGS)
    for k in keys:
        vals = {r["path"]: r["config"]["args"].get(k) for r in runs}
        if len({json.dumps(v) for v in vals.values()}) > 1:
            raise UserError(f"the {arm} runs differ in --{k} ("
                            + ", ".join(f"{p}: {v}" for p, v in vals.items())
                            + "); the runs of an arm may differ only in --seed: give runs made with the same "
                            "flags")


def pair_by_seed(mamls, vans):
    """-> ([(seed, maml run, vanilla run)] in seed order, [notes on the runs left out])."""
    by = {}
    for arm, runs in (("MAML", mamls), ("vanilla", vans)):
        by[arm] = {}
        for r in runs:
            s = r["config"]["args"].get("seed")
            if s is None:
                raise UserError(f"{r['path']} has no seed in config.json; pairing by seed needs runs written "
                                "by maml_gpt.py")
            if s in by[arm]:
                raise UserError(f"{by[arm][s]['path']} and {r['path']} are both seed {s} of the {arm} arm; "
                                "give one run per seed and arm")
            by[arm][s] = r
    notes = [f"seed {s} ({by[arm][s]['path']}) has no {other} run with that seed: left out"
             for arm, other in (("MAML", "vanilla"), ("vanilla", "MAML"))
             for s in sorted(set(by[arm]) - set(by[other]))]
    common = sorted(set(by["MAML"]) & set(by["vanilla"]))
    if not common:
        raise UserError(f"no seed is in both arms (MAML seeds {sorted(by['MAML'])}, vanilla seeds "
                        f"{sorted(by['vanilla'])}); give each MAML run its vanilla twin: the same --seed "
                        "with --hybrid_ratio 0")
    return [(s, by["MAML"][s], by["vanilla"][s]) for s in common], notes


def is_ratio(key):
    return key.startswith(RATIO_KEYS)


def key_kind(key):
    """How a claims.json key is summarised over seeds: 'text', 'flag', 'verdict' or 'number'."""
    if key.startswith(("run_", "ner_ckpt_")):
        return "text"
    if key.startswith("verdict_"):
        return "verdict"
    return "flag" if key.startswith("rise_fall_") and key != "rise_fall_diff" else "number"


def summarize(per):
    """Per-pair claims dicts (seed order) -> the flat dict of claims.json: every key S as the mean over the
    seeds that have it (geometric for ratios; the share of True for flags; for text the common value, else
    null), plus S_per_seed, and S_ci95 for numbers (null below 2 values)."""
    out = {}
    for k in dict.fromkeys(k for c in per for k in c):
        vals = [c.get(k) for c in per]
        have = [v for v in vals if v is not None]
        kind = key_kind(k)
        if kind == "number":
            if not have:
                out[k], out[f"{k}_ci95"] = None, None
            elif is_ratio(k) and all(v > 0 for v in have):
                m, ci = ci95(np.log(have))
                out[k], out[f"{k}_ci95"] = math.exp(m), ci and [math.exp(ci[0]), math.exp(ci[1])]
            else:
                out[k], out[f"{k}_ci95"] = ci95(have)
        elif kind == "flag":
            out[k] = float(np.mean(have)) if have else None
        elif kind == "text":
            out[k] = have[0] if have and all(v == have[0] for v in have) else None
        out[f"{k}_per_seed"] = vals
    return out


def headline_test(per, cid):
    """-> dict(n, values, p, p_opposite, p_t): the claim's headline numbers over the pairs that have one."""
    key, log, _ = HEADLINES[cid]
    vals = [c[key] for c in per if c.get(key) is not None]
    d = np.log(vals) if log else np.asarray(vals, float)
    res = dict(n=len(vals), values=vals, p=None, p_opposite=None, p_t=None)
    if len(vals) >= 2:
        res["p"], res["p_opposite"] = sign_flip_p(d)
        res["p_t"] = t_test_p(d)
    return res


def verdict(per, rows_per, cid, test):
    """The claim's verdict over several pairs -> (verdict, why)."""
    key, log, label = HEADLINES[cid]
    n = test["n"]
    if n == 0:
        whys = [w for (_, _, kind, w) in (r[PAPER_IDS.index(cid)] for r in rows_per)
                if kind == "not measurable"]
        return "not measurable", whys[0] if whys else f"needs {key} in the pairs"
    if n == 1:  # one measurable pair: today's rule on it
        i = next(i for i, c in enumerate(per) if c.get(key) is not None)
        _, _, kind, why = rows_per[i][PAPER_IDS.index(cid)]
        return kind, f"{why}; 1 seed: no test"
    m, ci = (ci95(np.log(test["values"])) if log else ci95(test["values"]))
    show = ((lambda v: f"{math.exp(v):.2f}x") if log else (lambda v: f"{v:+.3g}"))
    est = f"{label}: {show(m)} [{show(ci[0])}, {show(ci[1])}]"
    tail = f"{n} seeds, exact sign-flip p = {test['p']:.3g}"
    if test["p"] < P_LEVEL:
        return "holds", f"{tail}; {est}"
    if test["p_opposite"] < P_LEVEL:
        return ("does not hold",
                f"{n} seeds, the opposite sign, exact sign-flip p = {test['p_opposite']:.3g}; {est}")
    return (f"inconclusive (n = {n})", f"p = {test['p']:.3g} for the claimed sign, {test['p_opposite']:.3g} "
            f"for the opposite (the smallest p {n} pairs can give is {2.0 ** -n:.3g}); {est}")


PAPER_IDS = [cid for cid, _, _ in PAPER_CLAIMS]


def seeds_shows(s, cid, per):
    """The 'these runs' cell over several pairs: the claim's numbers as mean [95 % interval]."""
    def mci(k, nd=2, pct=False, x=False):
        if s.get(k) is None:
            return "-"
        ci = s.get(f"{k}_ci95")
        f = (lambda v: f"{v:{'+' if pct else ''}.{nd}f}{'x' if x else ''}{' %' if pct else ''}")
        return f(s[k]) + (f" [{f(ci[0])}, {f(ci[1])}]" if ci else "")

    def count(k, of_all=False):  # seeds where k is true / seeds where it was measured (of_all: all seeds)
        vals = [v for v in s.get(f"{k}_per_seed", []) if of_all or v is not None]
        return f"{sum(v is not None and bool(v) for v in vals)}/{len(vals)}"
    if cid == "speedup":
        return (f"per step {mci('speedup_step_ar', x=True)}, per backbone token "
                f"{mci('speedup_token_ar', x=True)}, per AR step {mci('speedup_arstep_ar', x=True)} "
                "(AR loss); per step on the reference's mixed train/loss "
                f"{mci('speedup_step_mixed', x=True)} (geometric means, 95 % intervals)")
    if cid == "ner":
        cells = [f"{r} {g} {mci(f'ner_rel_{r}_{g}', 1, pct=True)}" for r in NER_REGIMES
                 for g in ("seen", "pud", "other", "toy", "toy_heldout")
                 if s.get(f"ner_rel_{r}_{g}") is not None]
        return ("; ".join(cells) + " (relative change of mean micro-F1)") if cells else "-"
    if cid == "dynamics":
        return (f"rise then fall: weight PER in {count('rise_fall_weight_maml')} MAML and "
                f"{count('rise_fall_weight_vanilla')} vanilla runs, attention entropy in "
                f"{count('rise_fall_entropy_maml')} and {count('rise_fall_entropy_vanilla')}; MAML "
                f"weight-PER knee at step {mci('knee_weight_step_maml', 0)}; last attention entropy "
                f"{mci('entropy_last_maml')} vs {mci('entropy_last_vanilla')} nats")
    return (f"query accuracy after adaptation, last window {mci('acc_query_post_last', 3)} (before "
            f"{mci('acc_query_pre_last', 3)}); a jump in {count('jump_step', of_all=True)} seeds; held-out "
            f"few-shot eval after adaptation {mci('eval_fewshot_acc_maml', 3)} vs "
            f"{mci('eval_fewshot_acc_vanilla', 3)}, difference {mci('eval_fewshot_acc_diff', 3)}")


# The numbers of the "Across seeds" table: (claims.json key, label); knee and jump steps where they exist.
SEED_TABLE = [("speedup_step_ar", "speed-up per step, AR loss"),
              ("speedup_token_ar", "speed-up per backbone token"),
              ("speedup_arstep_ar", "speed-up per AR step"),
              ("speedup_step_mixed", "speed-up per step, mixed metric"),
              ("ner_rel_avg", "NER: average relative change, %")] + \
    [(f"ner_rel_{r}_{g}", f"NER {r}, {g}, %") for r in NER_REGIMES
     for g in ("seen", "pud", "other", "toy", "toy_heldout")] + \
    [("eval_fewshot_acc_maml", "few-shot eval after adaptation, MAML"),
     ("eval_fewshot_acc_vanilla", "few-shot eval after adaptation, vanilla"),
     ("eval_fewshot_acc_diff", "few-shot eval, MAML - vanilla"),
     ("eval_fewshot_acc_pre_maml", "few-shot eval before adaptation, MAML"),
     ("eval_fewshot_acc_pre_vanilla", "few-shot eval before adaptation, vanilla"),
     ("eval_proto_acc_prev_maml", "prototypes at the token before, MAML"),
     ("eval_proto_acc_prev_vanilla", "prototypes at the token before, vanilla"),
     ("final_loss_ar_maml", "AR loss, last window, MAML"),
     ("final_loss_ar_vanilla", "AR loss, last window, vanilla"),
     ("final_eval_ppl_maml", "eval perplexity, MAML"), ("final_eval_ppl_vanilla", "eval perplexity, vanilla"),
     ("acc_query_pre_last", "query accuracy before adaptation, last window"),
     ("acc_query_post_last", "query accuracy after adaptation, last window"),
     ("rise_fall_diff", "rise-then-fall share, MAML - vanilla"),
     ("knee_weight_step_maml", "weight-PER knee step, MAML"),
     ("knee_grad_step_maml", "gradient-PER knee step, MAML"),
     ("knee_weight_step_vanilla", "weight-PER knee step, vanilla"),
     ("entropy_knee_step_maml", "attention-entropy knee step, MAML"),
     ("jump_step", "query-accuracy jump step")]


def seed_table(s, seeds, tests):
    """Markdown rows: every number of SEED_TABLE that some pair has."""
    head = {HEADLINES[cid][0]: t for cid, t in tests.items()}
    lines = [f"| number | mean | 95 % interval | sd | per seed ({', '.join(map(str, seeds))}) | p, exact "
             "sign-flip (one-sided, claimed direction) | p, paired t-test (two-sided) |",
             "|---|---|---|---|---|---|---|"]
    for k, label in SEED_TABLE:
        vals = s.get(f"{k}_per_seed")
        if not vals or all(v is None for v in vals):
            continue
        have = [v for v in vals if v is not None]
        ci = s.get(f"{k}_ci95")
        sd = (f"{float(np.std(np.log(have), ddof=1)):.3f} (log)" if is_ratio(k) else
              f"{float(np.std(have, ddof=1)):.4g}") if len(have) > 1 else "-"
        t = head.get(k)
        lines.append(f"| {label} (`{k}`) | {s[k]:.4g} | " + (f"[{ci[0]:.4g}, {ci[1]:.4g}]" if ci else "-") +
                     f" | {sd} | " + ", ".join("-" if v is None else f"{v:.4g}" for v in vals) +
                     f" | {fmt(t['p'], 4) if t else ''} | {fmt(t['p_t'], 4) if t else ''} |")
    return lines


# ------------------------------------------------------------------------------------------------------------
# Figures

def figures(runs, out, results, pair_results):
    """Every figure these runs support, as PNGs in `out`; -> their file names. An arm of several seeds is
    drawn as the mean of its runs with a +-1 sd band and a thin line per seed."""
    plt = pyplot()
    # drawn one at a time (each closed before the next): ten runs make two dozen figures
    figs = [("loss.png", lambda: figure_loss(plt, runs)),
            ("speedup.png", lambda: figure_speedup(plt, pair_results)),
            ("meta.png", lambda: figure_meta(plt, runs, results)),
            ("adaptation.png", lambda: figure_adaptation(plt, runs))]
    for run in runs:
        figs += [(f"per_{run['name']}.png", lambda run=run: figure_per(plt, run, results)),
                 (f"entropy_{run['name']}.png", lambda run=run: figure_entropy(plt, run))]
    made = []
    for name, draw in figs:
        fig = draw()
        if fig is not None:  # None: nothing in these runs to show in this figure
            fig.tight_layout()
            fig.savefig(os.path.join(out, name), dpi=110)
            plt.close(fig)
            made.append(name)
    return made


def arms(runs):
    """[(label, runs of one hybrid ratio)] in the order given: one group per arm."""
    groups = {}
    for r in runs:
        groups.setdefault(r["ratio"], []).append(r)
    return [(g[0]["name"] if len(g) == 1 else f"rho={ratio}, {len(g)} seeds", g)
            for ratio, g in groups.items()]


def band(ax, curves, label, color=None, ls="-", marker=None):
    """Several seeds of one curve, [(x, y)]: their mean on the x values every seed logged, a +-1 sd band
    (across seeds, within the seeds' range) and a thin line per seed. -> the colour used."""
    curves = [(x, y) for x, y in curves if len(x)]
    if not curves:
        return color
    common = np.array(sorted(set.intersection(*(set(x.tolist()) for x, _ in curves))))
    if len(common) == 0:
        common = curves[0][0]
    ys = np.array([np.interp(common, x, y) for x, y in curves])  # (seeds, points); x exact: a lookup
    mean, sd = ys.mean(0), ys.std(0, ddof=1) if len(ys) > 1 else np.zeros(len(common))
    color = ax.plot(common, mean, ls=ls, marker=marker, color=color,
                    label=f"{label} (mean of {len(ys)}, band +-1 sd)")[0].get_color()
    # clipped to the seeds' own range: with few seeds, mean +- sd can leave it (below 0 on a log axis)
    ax.fill_between(common, np.maximum(mean - sd, ys.min(0)), np.minimum(mean + sd, ys.max(0)), color=color,
                    alpha=0.2, lw=0)
    for x, y in curves:
        ax.plot(x, y, ls=ls, lw=0.5, alpha=0.4, color=color)
    return color


def figure_loss(plt, runs):
    """AR loss per step (and the mixed metric, dashed), per backbone token, and eval perplexity."""
    fig, ax = plt.subplots(1, 3, figsize=(15, 4))
    for name, group in arms(runs):
        if len(group) == 1:  # a lone run: its raw curve (faint) and the smoothed one
            run = group[0]
            lab = f"{run['name']} (rho={run['ratio']})"
            for a, axis in zip(ax[:2], ("step", "tokens")):
                x, y = series(run, "loss_ar", axis)
                a.plot(x, y, alpha=0.3)
                a.plot(x, smooth(y), label=lab, color=a.lines[-1].get_color())
            if not run["vanilla"]:  # a vanilla run's mixed metric is its AR loss: already drawn
                x, y = mixed_series(run)
                ax[0].plot(x, smooth(y), ls="--", color=ax[0].lines[-1].get_color(),
                           label=f"{run['name']} mixed (reference train/loss)")
            x, y = series(run, "eval_ppl")
            ax[2].plot(x, y, marker="o", label=lab)
            continue
        for a, axis in zip(ax[:2], ("step", "tokens")):
            color = band(a, [(x, smooth(y)) for x, y in (series(r, "loss_ar", axis) for r in group)], name)
        if not group[0]["vanilla"]:
            band(ax[0], [(x, smooth(y)) for x, y in map(mixed_series, group)], f"{name} mixed", color, "--")
        band(ax[2], [series(r, "eval_ppl") for r in group], name, marker="o")
    for a, t, xl in zip(ax, ("loss vs step: AR only (solid), mixed (dashed)",
                             "next-token loss vs backbone tokens", "eval perplexity"),
                        ("optimizer step", "backbone tokens (AR + meta)", "optimizer step")):
        a.set(title=t, xlabel=xl)
        a.legend(fontsize=7)
    ax[2].set_yscale("log")
    return fig


def figure_speedup(plt, pair_results):
    """The speed-up curves: vanilla's steps (tokens) to a loss level over MAML's, per level; several pairs:
    their mean over the levels every pair reaches, with a band and a line per seed."""
    if not any(f"speedup_{key}" in res for res in pair_results for key, *_ in SPEEDUPS):
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, _, _, label in SPEEDUPS:
        sps = [res[f"speedup_{key}"] for res in pair_results if res.get(f"speedup_{key}")]
        ls = "--" if "mixed" in key else "-"
        if len(sps) == 1:
            ax.plot(sps[0]["levels"], sps[0]["ratios"], ls=ls, label=label)
        elif sps:  # levels differ between pairs: put every pair on the levels all of them cover
            lo, hi = max(sp["levels"].min() for sp in sps), min(sp["levels"].max() for sp in sps)
            grid = np.linspace(hi, lo, 50) if hi > lo else np.array([lo])
            curves = []
            for sp in sps:
                ok = np.isfinite(sp["ratios"])
                order = np.argsort(sp["levels"][ok])
                curves.append((grid, np.interp(grid, sp["levels"][ok][order], sp["ratios"][ok][order])
                               if ok.any() else np.full(len(grid), np.nan)))
            band(ax, curves, label, ls=ls)
    ax.axhline(1, color="grey", lw=0.8)
    ax.invert_xaxis()
    ax.set(xlabel="loss level (of the curve's own metric)", ylabel="x sooner (vanilla / MAML)",
           title="reaches the same loss N x sooner")
    ax.legend(fontsize=7)
    return fig


def figure_meta(plt, runs, results):
    """Support and query accuracy before and after adaptation, with the jumps; the head's weights."""
    meta = [r for r in runs if not r["vanilla"]]
    if not meta:
        return None
    fig, ax = plt.subplots(1, 3, figsize=(15, 4))
    for name, group in arms(meta):
        for key, style in (("acc_support_pre", ":"), ("acc_support_post", "-"), ("acc_query_pre", "--"),
                           ("acc_query_post", "-")):
            a = ax[0 if "support" in key else 1]
            if len(group) == 1:
                x, y = series(group[0], key)
                a.plot(x, smooth(y, 3), style, label=f"{name} {key}")
            else:
                band(a, [(x, smooth(y, 3)) for x, y in (series(r, key) for r in group)], f"{name} {key}",
                     ls=style)
        for run in group:
            for j in results["jumps"].get(run["name"], []):
                ax[1].axvline(j["step"], color="red", lw=0.8, ls="--")
        for key in ("head_weight_mean", "head_weight_std"):
            if len(group) == 1:
                ax[2].plot(*series(group[0], key), label=f"{name} {key}")
            else:
                band(ax[2], [series(r, key) for r in group], f"{name} {key}")
        n_way = group[0]["config"]["args"].get("n_way", 32)
        for a in ax[:2]:
            a.axhline(1 / n_way, color="grey", lw=0.8, label=f"chance 1/{n_way}")
    for a, t in zip(ax, ("support accuracy (pre / post adaptation)", "query accuracy (pre / post adaptation)",
                         "classifier head weights")):
        a.set(title=t, xlabel="optimizer step")
        if a.get_legend_handles_labels()[0]:
            a.legend(fontsize=7)
    return fig


def figure_adaptation(plt, runs):
    """Learning to learn, for every run: how much the inner loop adds (post - pre) on the training episodes,
    the support loss it minimises (before and after), and the held-out few-shot eval, where a fresh
    fixed-seed head measures the backbone (vanilla runs log it too)."""
    meta = [r for r in runs if not r["vanilla"]]
    has_fs = [r for r in runs if len(series(r, "eval_fewshot_acc")[0])]
    if not (meta or has_fs):
        return None
    fig, (gain_ax, loss, fs) = plt.subplots(1, 3, figsize=(16, 4))
    # one colour per arm (hybrid ratio), one style per series
    color = {ratio: f"C{i}" for i, ratio in enumerate(dict.fromkeys(r["ratio"] for r in runs))}

    def gain(run, part):
        x, pre = series(run, f"acc_{part}_pre")
        x2, post = series(run, f"acc_{part}_post")
        return (x, smooth(post - pre, 3)) if len(x) and np.array_equal(x, x2) else (np.zeros(0), np.zeros(0))

    def smoothed(run, key):
        x, y = series(run, key)
        return (x, smooth(y, 3)) if len(x) else (x, y)

    def draw(ax, group, curve, label, style, marker=None):  # one run: its line; several seeds: a band
        c = color[group[0]["ratio"]]
        if len(group) == 1:
            x, y = curve(group[0])
            if len(x):
                ax.plot(x, y, style, marker=marker, ms=3, color=c, label=label)
        else:
            band(ax, [curve(r) for r in group], label, c, style, marker)
    for name, group in arms(meta):
        for part, style in (("support", ":"), ("query", "-")):
            draw(gain_ax, group, lambda r: gain(r, part), f"{name} {part}", style)
        # the inner loop's own objective: an inner loop that works puts post below pre
        for key, style in (("loss_support_pre", ":"), ("loss_support_post", "-")):
            draw(loss, group, lambda r: smoothed(r, key), f"{name} {key}", style)
    for name, group in arms(has_fs):
        for key, style in (("eval_fewshot_loss_support_pre", ":"), ("eval_fewshot_loss_support_post", "-")):
            draw(loss, group, lambda r: series(r, key), f"{name} {key}", style, "o")
        for key, style in zip(FEWSHOT_KEYS, (":", "-", "--", "-.")):
            draw(fs, group, lambda r: series(r, key), f"{name} {key}", style, ".")
    gain_ax.axhline(0, color="grey", lw=0.8)
    gain_ax.set(title="adaptation gain: accuracy after - before the inner loop", xlabel="optimizer step",
                ylabel="accuracy gain")
    loss.set(title="support loss before (:) / after (-) the inner loop", xlabel="optimizer step",
             ylabel="N-way cross-entropy")
    n_way = (meta or runs)[0]["config"]["args"].get("n_way", 32)
    fs.axhline(1 / n_way, color="grey", lw=0.8, label=f"chance 1/{n_way}")
    if not has_fs:
        fs.text(0.5, 0.5, "no held-out few-shot eval logged\n(eval_fewshot_acc)", ha="center", va="center",
                transform=fs.transAxes)
    fs.set(title="held-out few-shot eval (query accuracy)", xlabel="optimizer step", ylabel="accuracy")
    for a in (gain_ax, loss, fs):
        if a.get_legend_handles_labels()[0]:
            a.legend(fontsize=7)
    return fig


def figure_per(plt, run, results):
    """PER of weights and gradients: a layer x step heatmap per matrix type, and per-layer lines with the
    mean and its knee."""
    kinds = [k for k in ("weight", "grad") if per_keys(run, k)]
    if not kinds:
        return None
    modules = sorted({k.split(".", 2)[2] for k in per_keys(run, "weight")})
    fig, ax = plt.subplots(len(kinds), len(modules) + 1, figsize=(4.5 * (len(modules) + 1), 3.5 * len(kinds)),
                           squeeze=False)
    for i, kind in enumerate(kinds):
        for j, mod in enumerate(modules):  # layer x step heatmap per matrix type
            keys = [k for k in per_keys(run, kind) if k.endswith(mod)]
            rows = [r for r in run["rows"] if keys[0] in r]
            grid = np.array([[r[k] for r in rows] for k in keys])
            im = ax[i][j].imshow(grid, aspect="auto", origin="lower", cmap="viridis",
                                 extent=(rows[0]["step"], rows[-1]["step"], -0.5, len(keys) - 0.5))
            fig.colorbar(im, ax=ax[i][j])
            ax[i][j].set(title=f"PER {kind}: {mod}", xlabel="step", ylabel="layer")
        a = ax[i][-1]  # lines: per layer (thin) and the mean (thick) with the knee marked
        for k in per_keys(run, kind):
            a.plot(*series(run, k), lw=0.5, alpha=0.4)
        x, y = mean_per(run, kind)
        a.plot(x, y, color="black", lw=2, label="mean")
        knee = results["knees"].get(run["name"], {}).get(kind)
        if knee:
            a.axvline(knee["peak_step"], color="green", ls="--", label="peak")
            a.axvline(knee["drop_step"], color="red", ls="--", label="steepest drop")
        x, y = series(run, f"ref/per_{kind}_attn")
        if len(x):
            a.plot(x, y, color="orange", lw=1.5, label="reference variant (all attn)")
        a.set(title=f"PER of {kind}s per layer ({run['name']})", xlabel="step")
        a.legend(fontsize=7)
    return fig


def figure_entropy(plt, run):
    """Attention entropy per layer and head at up to three snapshots, and the mean per layer over training."""
    rows = [r for r in run["rows"] if "attn_entropy" in r]
    if not rows:
        return None
    picks = sorted({0, len(rows) // 2, len(rows) - 1})
    fig, ax = plt.subplots(1, len(picks) + 1, figsize=(4.5 * (len(picks) + 1), 3.8))
    vmin = min(np.min(r["attn_entropy"]) for r in rows)  # a shared colour scale across the snapshots
    vmax = max(np.max(r["attn_entropy"]) for r in rows)
    for a, i in zip(ax, picks):
        im = a.imshow(np.array(rows[i]["attn_entropy"]), aspect="auto", origin="lower", vmin=vmin, vmax=vmax)
        a.set(title=f"attention entropy, step {rows[i]['step']}", xlabel="head", ylabel="layer")
    fig.colorbar(im, ax=ax[len(picks) - 1])
    steps = [r["step"] for r in rows]
    ent = np.array([np.mean(r["attn_entropy"], axis=1) for r in rows])  # (time, layers)
    for layer in range(ent.shape[1]):
        ax[-1].plot(steps, ent[:, layer], label=f"L{layer}")
    ax[-1].set(title="mean head entropy per layer (nats)", xlabel="step")
    ax[-1].legend(fontsize=6, ncol=2)
    return fig


# ------------------------------------------------------------------------------------------------------------
# Report

def fmt(v, nd=3):
    return "-" if v is None else (f"{v:.{nd}f}" if isinstance(v, float) else str(v))


def last(run, key):
    ys = series(run, key)[1]
    return float(ys[-1]) if len(ys) else None


def artifact(c, n_pairs=1):
    """One sentence: how much of the per-step speed-up on the reference's train/loss is the metric itself."""
    ar, mx, q = c["speedup_step_ar"], c["speedup_step_mixed"], c["final_loss_query_maml"]
    if not (ar and mx and q is not None and c["final_loss_ar_maml"] is not None and c["chance"]):
        return None
    n = round(1 / c["chance"])
    who = ("this MAML run reaches" if n_pairs == 1 else
           f"these MAML runs (geometric mean over {n_pairs} seeds; losses are means) reach")
    return (f"The reference's train/loss averages the {n}-way query cross-entropy (last window {q:.2f}; "
            f"log {n} = {math.log(n):.2f} at chance) with the AR loss ({c['final_loss_ar_maml']:.2f}), "
            f"and on that mixed metric {who} vanilla's final loss {mx:.2f}x sooner per step "
            f"against {ar:.2f}x on the AR loss alone: a factor of {mx / ar:.2f} that comes from the metric, "
            "not from faster learning.")


def split_arms(paths, vanilla):
    """-> (runs in order, MAML runs, vanilla runs). Without --vanilla the hybrid ratio sorts them (0:
    vanilla)."""
    runs = [load_run(p) for p in paths]
    if vanilla is None:
        return runs, [r for r in runs if not r["vanilla"]], [r for r in runs if r["vanilla"]]
    vans = [load_run(p) for p in vanilla]
    for r in runs:
        if r["vanilla"]:
            raise UserError(f"{r['path']} is a vanilla run (--hybrid_ratio 0); list it after --vanilla")
    for r in vans:
        if not r["vanilla"]:
            raise UserError(f"{r['path']} (after --vanilla) has --hybrid_ratio {r['ratio']}; list MAML runs "
                            "before --vanilla and their --hybrid_ratio 0 twins after it")
    return runs + vans, runs, vans


def analyze(paths, out, ner=None, vanilla=None, draw=True):
    """paths: run folders (MAML ones, or both arms when vanilla is None); vanilla: the vanilla runs; ner: one
    grid folder or several. One run per arm: today's comparison; several: pairs by seed."""
    runs, mamls, vans = split_arms(paths, vanilla)
    grids = [ner] if isinstance(ner, str) else list(ner or [])
    ner_rows = [row for g in grids for row in load_grid(g)] if grids else None
    notes = []
    if len(mamls) <= 1 and len(vans) <= 1:  # the one-pair form, as it always was
        pairs = [(None, mamls[0] if mamls else None, vans[0] if vans else None)]
        seeds = [r["config"]["args"].get("seed") for r in (mamls + vans)]
        if len(set(map(str, seeds))) > 1:
            notes.append(f"the two runs have different seeds ({seeds[0]} and {seeds[1]}): compared as given, "
                         "not as a paired twin")
        pairs = [(seeds[0] if seeds else None, *pairs[0][1:])]
    else:
        if not (mamls and vans):
            raise UserError(f"{len(mamls or vans)} {'MAML' if mamls else 'vanilla'} runs and no "
                            f"{'vanilla' if mamls else 'MAML'} run: give the MAML runs, then --vanilla and "
                            "their --hybrid_ratio 0 twins (the same seeds)")
        check_arm(mamls, "MAML")
        check_arm(vans, "vanilla")
        pairs, notes = pair_by_seed(mamls, vans)
    for n in notes:
        print(f"note: {n}")
    os.makedirs(out, exist_ok=True)
    results = dict(knees={}, jumps={})
    for run in runs:
        results["knees"][run["name"]] = {k: per_knee(*mean_per(run, k)) for k in ("weight", "grad")}
        if not run["vanilla"]:
            results["jumps"][run["name"]] = accuracy_jumps(*series(run, "acc_query_post"))
    per, rows_per, pair_results = [], [], []
    for _, maml, van in pairs:
        res = dict(results)
        if van and maml:
            for key, x, curve, _ in SPEEDUPS:
                sp = speedup(*curve(van, x), *curve(maml, x))
                if sp:
                    res[f"speedup_{key}"] = sp
        c, rows = claims(maml, van, res, ner_rows, by_seed=len(pairs) > 1)
        per.append(c)
        rows_per.append(rows)
        pair_results.append(res)
    seeds = [s for s, _, _ in pairs]
    c = summarize(per)
    tests = {cid: headline_test(per, cid) for cid in PAPER_IDS}
    claim_rows = []
    for (cid, name, paper), (_, shows, kind, why) in zip(PAPER_CLAIMS, rows_per[0]):
        if len(pairs) > 1:
            shows = seeds_shows(c, cid, per)
            kind, why = verdict(per, rows_per, cid, tests[cid])
        elif kind in ("holds", "does not hold"):
            why += "; 1 seed: no test"
        c[f"verdict_{cid}"] = kind
        key = HEADLINES[cid][0]
        c[f"{key}_p"], c[f"{key}_p_opposite"], c[f"{key}_p_t"] = (tests[cid]["p"], tests[cid]["p_opposite"],
                                                                   tests[cid]["p_t"])
        claim_rows.append(f"| {name} | {paper} | {shows} | **{kind}**{': ' + why if why else ''} |")
    if len(pairs) == 1:
        c.update(per[0])  # the one pair's exact values (a geometric mean of one ratio can move its last bit)
    c.update(n_pairs=len(pairs) if pairs[0][1] and pairs[0][2] else 0, seeds=seeds,
             left_out=[n for n in notes if n.endswith("left out")],
             ner_grid=grids[0] if grids else None, ner_grids=grids)
    c = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in c.items()}
    with open(os.path.join(out, "claims.json"), "w") as f:
        json.dump(c, f, indent=1)
    if len(pairs) == 1:
        results.update(pair_results[0])  # the one pair's speed-ups, where callers have always found them
    results.update(claims=c, per_pair=per, pair_results=pair_results)
    made = figures(runs, out, results, pair_results) if draw else []

    maml, van = pairs[0][1], pairs[0][2]
    if len(pairs) == 1:
        what = f"{maml['name'] if maml else '(no MAML run)'} vs {van['name'] if van else '(no vanilla run)'}"
    else:
        what = (f"{len(pairs)} pairs by seed (seeds {', '.join(map(str, seeds))}): "
                + ", ".join(f"{m['name']} vs {v['name']}" for _, m, v in pairs)
                + ". Verdicts: the exact sign-flip test of each claim's headline number, one-sided, p < "
                f"{P_LEVEL}; intervals: 95 % t-intervals")
    claims_md = ["## Claims", "", what + (f"; NER grid {', '.join(f'`{g}`' for g in grids)}" if grids else "")
                 + ". Rules: analyze.py docstrings and the README.", ""]
    claims_md += [f"Note: {n}." for n in notes] + ([""] if notes else [])
    claims_md += ["| claim | paper | these runs | verdict |", "|---|---|---|---|"] + claim_rows
    sentence = artifact(c, len(pairs))
    claims_md += ["", sentence] if sentence else []
    multi = len(pairs) > 1
    runs_md = ["| run |" + (" seed |" if multi else "") + " rho | steps | tokens | AR loss (last window) | "
               "eval ppl | query acc pre | query acc post | chance |",
               "|---|---|---|---|---|---|---|---|---|" + ("---|" if multi else "")]
    for r in runs:
        n_way = r["config"]["args"].get("n_way", 32)
        runs_md.append(f"| {r['name']} |" + (f" {r['config']['args'].get('seed')} |" if multi else "") +
                       f" {r['ratio']} | {r['rows'][-1]['step']} "
                       f"| {r['rows'][-1].get('tokens', 0):,} "
                       f"| {fmt(last(r, 'loss_ar'))} | {fmt(last(r, 'eval_ppl'), 1)} "
                       f"| {fmt(last(r, 'acc_query_pre'))} "
                       f"| {fmt(last(r, 'acc_query_post'))} | {'-' if r['vanilla'] else fmt(1 / n_way)} |")
    seeds_md = (["## Across seeds", "",
                 f"Every number of the claims over the {len(pairs)} pairs: mean (geometric for speed-up "
                 "ratios, whose sd is of the log), 95 % t-interval, the value per seed, and for each claim's "
                 "headline number the exact sign-flip p (one-sided in the claimed direction; the smallest "
                 f"{len(pairs)} pairs can give is {2.0 ** -len(pairs):.3g}) and the paired t-test's "
                 "two-sided p.", ""] + seed_table(c, seeds, tests)) if multi else []
    lines = (["# maml-gpt analysis", "", "Runs: " + ", ".join(f"`{r['path']}`" for r in runs), ""] + claims_md
             + ["", "## Runs", ""] + runs_md + ([""] + seeds_md if seeds_md else []))
    summary = []
    if any(f"speedup_{key}" in res for res in pair_results for key, *_ in SPEEDUPS):
        pair = what if multi else f"{maml['name']} vs {van['name']}"
        lines += ["", f"## Reaches the same loss N x sooner ({pair})", "",
                  "Ratio of the steps (tokens) each run needs to first reach a loss level (smoothed running"
                  " minimum of the loss), vanilla / MAML, over the levels both reach (minus the top 10 % of"
                  " the range, i.e. warm-up). Tokens count every backbone token, AR and meta; AR steps are"
                  " counted by AR tokens. The last column is the paper's number: at the vanilla run's final"
                  " loss (or, when MAML never gets there, vanilla's steps to MAML's final loss over MAML's).",
                  "",
                  "| curve |" + (" seed |" if multi else "") + " max ratio | at loss | at the final loss |",
                  "|---|---|---|---|" + ("---|" if multi else "")]
        for key, _, _, label in SPEEDUPS:
            for seed, res in zip(seeds, pair_results):
                sp = res.get(f"speedup_{key}")
                if sp:
                    lines.append(f"| {label} |" + (f" {seed} |" if multi else "") +
                                 f" {sp['max']:.2f}x | {sp['max_level']:.3f} | "
                                 f"{fmt(sp['at_final'], 2)}{'x' if sp['at_final'] else ''} "
                                 f"({sp['final_loss']:.3f}) |")
                    summary.append(f"speed-up {label}{f' (seed {seed})' if multi else ''}: max "
                                   f"{sp['max']:.2f}x, at the final loss {fmt(sp['at_final'], 2)}")
    lines += ["", "## Phase transitions", "",
              "PER knee: peak of the smoothed mean PER (over layers and matrices), then the steepest drop"
              " after it (reported if it falls >= 5 % of the peak). Query-accuracy jump: a rise of the"
              " smoothed accuracy by more than max(0.05, 3 x median |increment|) between log points.", "",
              "| run | series | peak step | PER at peak | steepest drop at | PER after |",
              "|---|---|---|---|---|---|"]
    for r in runs:
        for kind, k in results["knees"][r["name"]].items():
            if k:
                lines.append(f"| {r['name']} | PER {kind}s | {k['peak_step']:.0f} | {k['peak']:.3f} | "
                             f"{k['drop_step']:.0f} | {k['after']:.3f} |")
                summary.append(f"{r['name']}: PER {kind}s peak at step {k['peak_step']:.0f}, "
                               f"steepest drop at {k['drop_step']:.0f}")
            else:
                lines.append(f"| {r['name']} | PER {kind}s | no knee | | | |")
        for j in results["jumps"].get(r["name"], []):
            lines.append(f"| {r['name']} | query-accuracy jump | {j['step']:.0f} | +{j['rise']:.3f} | | |")
            summary.append(f"{r['name']}: query-accuracy jump at step {j['step']:.0f} (+{j['rise']:.3f})")
    lines += ["", "## Figures", ""] + [f"![{m}]({m})" for m in made]
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(claims_md + [""] + runs_md + ([""] + seeds_md if seeds_md else [])))
    for s in summary:
        print("  " + s)
    print(f"report: {os.path.join(out, 'report.md')} ({len(made)} figures), "
          f"claims: {os.path.join(out, 'claims.json')}")
    return results


def main(argv=None):
    p = argparse.ArgumentParser(description="Claims table, figures, report.md and claims.json from "
                                "maml_gpt.py runs: MAML runs and their --hybrid_ratio 0 twins, paired by "
                                "seed.")
    p.add_argument("runs", nargs="*",
                   help="run folders: the MAML runs (with --vanilla), or a MAML run and its vanilla twin "
                   "(default: out/demo and, if present, out/demo-vanilla)")
    p.add_argument("--vanilla", nargs="+", metavar="VANILLA_RUN",
                   help="the vanilla runs (--hybrid_ratio 0), paired with the MAML runs by --seed")
    p.add_argument("--out", help="output folder (default: FIRST_RUN/analysis)")
    p.add_argument("--ner", nargs="+", metavar="GRID_DIR",
                   help="output folder(s) of `finetune_ner.py --sweep` over the checkpoints of both arms "
                   "(default: RUN/ner-grid of the first run that has one; with several pairs, of every run)")
    args = p.parse_args(argv)
    runs = args.runs or [d for d in ("out/demo", "out/demo-vanilla") if os.path.isdir(d)] or ["out/demo"]
    found = [os.path.join(r, "ner-grid") for r in runs + (args.vanilla or [])
             if os.path.exists(os.path.join(r, "ner-grid", "grid.csv"))]
    several = args.vanilla is not None and (len(runs) > 1 or len(args.vanilla) > 1)
    ner = args.ner or (found if several else found[:1]) or None
    try:
        analyze(runs, args.out or os.path.join(runs[0], "analysis"), ner, args.vanilla)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
