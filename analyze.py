"""
analyze.py: figures and a report from maml_gpt.py runs (paper §4-§6: speed-up, meta-learning curves, PER, entropy).

    python analyze.py                                   # the demo run(s): out/demo [and out/demo-vanilla]
    python analyze.py out/small out/small-vanilla       # a MAML run and its vanilla twin
    python analyze.py RUN [RUN ...] --out figures/      # choose the output folder (default RUN1/analysis)

Reads RUN/metrics.jsonl and RUN/config.json, writes PNG figures and report.md, and prints the key numbers.
Runs with --hybrid_ratio 0 are "vanilla"; "N x sooner" compares every other run against the first vanilla one.
"""
import argparse
import json
import os
import sys

import numpy as np

from maml_gpt import UserError

# ----------------------------------------------------------------------------------------------------------------
# Loading


def load_run(path):
    """-> dict(name, config, rows, vanilla). A clear error for a folder that is not a run."""
    mfile = os.path.join(path, "metrics.jsonl")
    if not os.path.exists(mfile):
        raise UserError(f"{path} has no metrics.jsonl; pass a run folder written by maml_gpt.py (its --out_dir)")
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
    return dict(name=os.path.basename(os.path.normpath(path)), config=config, rows=rows, vanilla=ratio == 0,
                ratio=ratio)


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


# ----------------------------------------------------------------------------------------------------------------
# "Reaches the same loss N x sooner" (paper §4): ratio of the steps (or tokens) each run needs to first reach a
# loss level, vanilla over MAML, for every level both runs reach.

def first_reach(x, y, level):
    """First x at which the smoothed, running-minimum loss is <= level (linear interpolation between log points)."""
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


def speedup(vanilla, maml, axis="step", n_levels=50):
    """-> dict(levels, ratios, max, max_level, at_final): ratios = x_vanilla(L) / x_maml(L)."""
    # Only loss_ar: the query loss is a 32-way CE on another task and must never be compared with next-token loss.
    xv, yv = series(vanilla, "loss_ar", axis)
    xm, ym = series(maml, "loss_ar", axis)
    if len(yv) < 2 or len(ym) < 2:
        return None
    bv, bm = np.minimum.accumulate(smooth(yv)), np.minimum.accumulate(smooth(ym))
    hi, lo = min(bv[0], bm[0]), max(bv[-1], bm[-1])  # the loss range both runs cover
    # skip the top 10 % of that range: the first few log points, where both runs sit in warm-up and ratios are noise
    levels = np.linspace(hi - 0.1 * (hi - lo), lo, n_levels)
    ratios = []
    for L in levels:
        a, b = first_reach(xv, yv, L), first_reach(xm, ym, L)
        ratios.append(a / b if a and b else np.nan)
    ratios = np.array(ratios)
    final = first_reach(xm, ym, bv[-1])
    at_final = xv[-1] / final if final else None  # how much sooner MAML reaches vanilla's final loss
    ok = np.isfinite(ratios)
    if not ok.any():
        return None
    i = int(np.nanargmax(ratios))
    return dict(levels=levels, ratios=ratios, max=float(ratios[i]), max_level=float(levels[i]),
                at_final=at_final, final_loss=float(bv[-1]))


# ----------------------------------------------------------------------------------------------------------------
# Phase transitions (paper §6). Rules:
#  * PER knee: on the smoothed curve, the peak (argmax) and, after it, the steepest drop (most negative slope);
#    reported when the curve falls by at least 5 % of its peak value after the peak ("diversify-then-compress").
#  * query-accuracy jump: a log point where smoothed accuracy rises by more than max(0.05, 3 x the median absolute
#    increment), i.e. a rise well outside the usual step-to-step noise.

def per_knee(x, y, min_drop=0.05):
    if len(y) < 4:
        return None
    s = smooth(y, 3)  # PER is logged sparsely (every --dynamics_every steps): light smoothing only
    p = int(np.argmax(s))
    if p >= len(s) - 1 or (s[p] - s[p:].min()) < min_drop * s[p]:
        return None
    slopes = np.gradient(s, x)  # central differences: the slope AT each log point
    d = p + int(np.argmin(slopes[p:]))
    return dict(peak_step=float(x[p]), peak=float(s[p]), drop_step=float(x[d]), after=float(s[p:].min()))


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


def mean_per(run, kind):
    keys = per_keys(run, kind)
    rows = [r for r in run["rows"] if keys and keys[0] in r]
    return (np.array([r["step"] for r in rows], float), np.array([np.mean([r[k] for k in keys]) for r in rows]))


# ----------------------------------------------------------------------------------------------------------------
# Figures

def figures(runs, out, results):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    made = []

    def save(fig, name):
        fig.tight_layout()
        fig.savefig(os.path.join(out, name), dpi=110)
        plt.close(fig)
        made.append(name)

    fig, ax = plt.subplots(1, 3, figsize=(15, 4))  # AR loss per step, per token; eval perplexity
    for run in runs:
        lab = f"{run['name']} (rho={run['ratio']})"
        for a, axis in zip(ax[:2], ("step", "tokens")):
            x, y = series(run, "loss_ar", axis)
            a.plot(x, y, alpha=0.3)
            a.plot(x, smooth(y), label=lab, color=a.lines[-1].get_color())
        x, y = series(run, "eval_ppl")
        ax[2].plot(x, y, marker="o", label=lab)
    for a, t in zip(ax, ("next-token loss (AR steps only) vs step", "next-token loss vs backbone tokens",
                         "eval perplexity")):
        a.set_title(t)
        a.legend()
    ax[1].set_xlabel("tokens (AR + meta)")
    ax[2].set_yscale("log")
    save(fig, "loss.png")

    if "speedup_step" in results:
        fig, ax = plt.subplots(figsize=(6, 4))
        for axis in ("step", "tokens"):
            sp = results[f"speedup_{axis}"]
            ax.plot(sp["levels"], sp["ratios"], label=f"per {axis}")
        ax.axhline(1, color="grey", lw=0.8)
        ax.invert_xaxis()
        ax.set(xlabel="loss level", ylabel="x sooner (vanilla / MAML)", title="reaches the same loss N x sooner")
        ax.legend()
        save(fig, "speedup.png")

    meta = [r for r in runs if not r["vanilla"]]
    if meta:
        fig, ax = plt.subplots(1, 3, figsize=(15, 4))
        for run in meta:
            for key, style in (("acc_support_pre", ":"), ("acc_support_post", "-"), ("acc_query_pre", "--"),
                               ("acc_query_post", "-")):
                x, y = series(run, key)
                ax[0 if "support" in key else 1].plot(x, smooth(y, 3), style, label=f"{run['name']} {key}")
            for j in results["jumps"].get(run["name"], []):
                ax[1].axvline(j["step"], color="red", lw=0.8, ls="--")
            for key in ("head_weight_mean", "head_weight_std"):
                ax[2].plot(*series(run, key), label=f"{run['name']} {key}")
            n_way = run["config"]["args"].get("n_way", 32)
            for a in ax[:2]:
                a.axhline(1 / n_way, color="grey", lw=0.8, label=f"chance 1/{n_way}")
        for a, t in zip(ax, ("support accuracy (pre / post adaptation)", "query accuracy (pre / post adaptation)",
                             "classifier head weights")):
            a.set_title(t)
            a.legend(fontsize=7)
        save(fig, "meta.png")

    for run in runs:
        kinds = [k for k in ("weight", "grad") if per_keys(run, k)]
        if not kinds:
            continue
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
        save(fig, f"per_{run['name']}.png")

        rows = [r for r in run["rows"] if "attn_entropy" in r]
        if rows:
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
            save(fig, f"entropy_{run['name']}.png")
    return made


# ----------------------------------------------------------------------------------------------------------------
# Report

def fmt(v, nd=3):
    return "-" if v is None else (f"{v:.{nd}f}" if isinstance(v, float) else str(v))


def last(run, key):
    ys = series(run, key)[1]
    return float(ys[-1]) if len(ys) else None


def analyze(paths, out):
    runs = [load_run(p) for p in paths]
    os.makedirs(out, exist_ok=True)
    results = dict(knees={}, jumps={})
    van = next((r for r in runs if r["vanilla"]), None)
    metas = [r for r in runs if not r["vanilla"]]
    if van and metas:
        for axis in ("step", "tokens"):
            sp = speedup(van, metas[0], axis)
            if sp:
                results[f"speedup_{axis}"] = sp
    for run in runs:
        results["knees"][run["name"]] = {k: per_knee(*mean_per(run, k)) for k in ("weight", "grad")}
        if not run["vanilla"]:
            results["jumps"][run["name"]] = accuracy_jumps(*series(run, "acc_query_post"))
    made = figures(runs, out, results)

    lines = ["# maml-gpt analysis", "", "Runs: " + ", ".join(f"`{p}`" for p in paths), "",
             "| run | rho | steps | tokens | AR loss (last window) | eval ppl | query acc pre | query acc post |"
             " chance |", "|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        n_way = r["config"]["args"].get("n_way", 32)
        lines.append(f"| {r['name']} | {r['ratio']} | {r['rows'][-1]['step']} | {r['rows'][-1].get('tokens', 0):,} "
                     f"| {fmt(last(r, 'loss_ar'))} | {fmt(last(r, 'eval_ppl'), 1)} | {fmt(last(r, 'acc_query_pre'))} "
                     f"| {fmt(last(r, 'acc_query_post'))} | {'-' if r['vanilla'] else fmt(1 / n_way)} |")
    summary = []
    if "speedup_step" in results:
        lines += ["", f"## Reaches the same loss N x sooner ({metas[0]['name']} vs {van['name']})", "",
                  "Ratio of the steps (tokens) each run needs to first reach a loss level (smoothed running minimum"
                  " of the AR loss), vanilla / MAML, over the levels both reach (minus the top 10 % of the range,"
                  " i.e. warm-up). Tokens count every backbone token, AR and meta.", "",
                  "| axis | max ratio | at loss | at vanilla's final loss |", "|---|---|---|---|"]
        for axis in ("step", "tokens"):
            sp = results.get(f"speedup_{axis}")
            if sp:
                lines.append(f"| per {axis} | {sp['max']:.2f}x | {sp['max_level']:.3f} | "
                             f"{fmt(sp['at_final'], 2)}{'x' if sp['at_final'] else ''} ({sp['final_loss']:.3f}) |")
                summary.append(f"speed-up per {axis}: max {sp['max']:.2f}x, at vanilla's final loss "
                               f"{fmt(sp['at_final'], 2)}")
    lines += ["", "## Phase transitions", "",
              "PER knee: peak of the smoothed mean PER (over layers and matrices), then the steepest drop after it"
              " (reported if it falls >= 5 % of the peak). Query-accuracy jump: a rise of the smoothed accuracy by"
              " more than max(0.05, 3 x median |increment|) between log points.", "",
              "| run | series | peak step | PER at peak | steepest drop at | PER after |", "|---|---|---|---|---|---|"]
    for r in runs:
        for kind, k in results["knees"][r["name"]].items():
            if k:
                lines.append(f"| {r['name']} | PER {kind}s | {k['peak_step']:.0f} | {k['peak']:.3f} | "
                             f"{k['drop_step']:.0f} | {k['after']:.3f} |")
                summary.append(f"{r['name']}: PER {kind}s peak at step {k['peak_step']:.0f}, steepest drop at "
                               f"{k['drop_step']:.0f}")
            else:
                lines.append(f"| {r['name']} | PER {kind}s | no knee | | | |")
        for j in results["jumps"].get(r["name"], []):
            lines.append(f"| {r['name']} | query-accuracy jump | {j['step']:.0f} | +{j['rise']:.3f} | | |")
            summary.append(f"{r['name']}: query-accuracy jump at step {j['step']:.0f} (+{j['rise']:.3f})")
    lines += ["", "## Figures", ""] + [f"![{m}]({m})" for m in made]
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines[4:4 + len(runs) + 2]))
    for s in summary:
        print("  " + s)
    print(f"report: {os.path.join(out, 'report.md')} ({len(made)} figures)")
    return results


def main(argv=None):
    p = argparse.ArgumentParser(description="Figures and report.md from maml_gpt.py runs.")
    p.add_argument("runs", nargs="*", help="run folders (default: out/demo and, if present, out/demo-vanilla)")
    p.add_argument("--out", help="output folder (default: FIRST_RUN/analysis)")
    args = p.parse_args(argv)
    runs = args.runs or [d for d in ("out/demo", "out/demo-vanilla") if os.path.isdir(d)] or ["out/demo"]
    try:
        analyze(runs, args.out or os.path.join(runs[0], "analysis"))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
