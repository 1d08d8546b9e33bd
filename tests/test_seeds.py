"""analyze.py over several seeds per arm: pairs by seed, the exact sign-flip test, t-intervals, verdicts on
planted runs (a consistent effect holds, random signs are inconclusive, the opposite effect does not hold),
the messages for unpaired seeds and mixed settings, and the NER grid paired by the checkpoints' seeds."""
import csv
import itertools
import json
import math
import os

import numpy as np
import pytest

import analyze
import finetune_ner as fn

SEEDS = [1, 2, 3, 4, 5]
NOISE = [0.03, -0.02, 0.05, -0.04, 0.01]  # per-seed noise, well below every planted effect


def write_run(path, ratio, seed, speed=1.0, fewshot=0.2, rise_fall=False, jump=True, **flags):
    """A planted run of 600 steps, logged every 10: AR loss 2 + 8 exp(-speed * step / 200) (speed > 1 learns
    faster per step), held-out few-shot accuracy `fewshot` at every eval (every 100 steps), and PER and
    attention entropy that rise then fall (a knee at step 400) if rise_fall, else rise and stay."""
    os.makedirs(path)
    args = {**dict(hybrid_ratio=ratio, n_way=32, seed=seed, max_steps=600, lr=1e-3), **flags}
    json.dump({"args": args}, open(os.path.join(path, "config.json"), "w"))
    with open(os.path.join(path, "metrics.jsonl"), "w") as fh:
        for step in range(10, 610, 10):
            r = dict(step=step, tokens_ar=step * 1000, tokens_meta=0, tokens=step * 1000, n_ar_steps=10,
                     n_meta_steps=0, loss_ar=2.0 + 8.0 * math.exp(-speed * step / 200))
            if ratio:
                r.update(loss_query=1.5, loss_mixed=r["loss_ar"], acc_query_pre=0.1, acc_support_pre=0.1,
                         acc_query_post=0.1 + 0.3 * (step > 300 and jump), acc_support_post=0.2,
                         loss_support_pre=2.0, loss_support_post=1.5)
            if step % 100 == 0:
                r.update(eval_ppl=math.exp(r["loss_ar"]), eval_fewshot_acc=fewshot, eval_fewshot_acc_pre=0.05,
                         eval_proto_acc_mask=0.3, eval_proto_acc_prev=0.5)
            if step % 50 == 0:
                per = 0.5 + 0.4 * min(step, 300) / 300 - (0.4 / (1 + math.exp(-(step - 400) / 15))
                                                         if rise_fall else 0.0)
                r.update({f"per_weight/layers.{i}.attention.v_proj": per for i in range(2)})
                r.update(attn_entropy=[[3 + per] * 2] * 2, attn_entropy_mean=3 + per)
            fh.write(json.dumps(r) + "\n")


def plant(tmp_path, signs, effect=1.3, seeds=SEEDS, vanilla_seeds=None, grid=True, no_jump=()):
    """5 MAML runs and their vanilla twins; pair i has the planted effect in the direction signs[i] on every
    claim: speed-up effect^(+-1), few-shot +-0.1, NER F1 +-20 %, rise-then-fall in MAML (+) or in vanilla (-).
    -> (MAML paths, vanilla paths, grid folder)."""
    mamls, vans, rows = [], [], []
    for i, s in enumerate(seeds):
        sign = signs[i]
        m, v = str(tmp_path / f"maml-s{s}"), str(tmp_path / f"vanilla-s{s}")
        write_run(m, 0.5, s, speed=effect ** sign * math.exp(NOISE[i]), fewshot=0.2 + sign * (0.1 + NOISE[i]),
                  rise_fall=sign > 0, jump=s not in no_jump)
        mamls.append(m)
        for ckpt, ratio, f1 in ((f"ckpts/maml-{s}.pt", 0.5, 0.4 * (1 + sign * (0.2 + NOISE[i]))),
                                (f"ckpts/vanilla-{s}.pt", 0.0, 0.4)):
            for regime in ("head", "full"):
                for ev in ("toy", "toy_heldout"):  # checkpoints outside the run folders: paired by ckpt_seed
                    rows.append(dict(ckpt=ckpt, hybrid_ratio=ratio, ckpt_seed=s, regime=regime,
                                     train_on="toy", eval_on=ev, precision=f1, recall=f1, f1=f1))
    for i, s in enumerate(vanilla_seeds or seeds):
        v = str(tmp_path / f"vanilla-s{s}")
        write_run(v, 0.0, s, rise_fall=signs[i % len(signs)] < 0)
        vans.append(v)
    g = tmp_path / "grid"
    if grid:
        g.mkdir()
        with open(g / "grid.csv", "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    return mamls, vans, str(g)


def run_analysis(tmp_path, mamls, vans, grid, capsys=None):
    out = str(tmp_path / "an")
    analyze.analyze(mamls, out, grid, vanilla=vans, draw=False)
    return json.load(open(os.path.join(out, "claims.json"))), open(os.path.join(out, "report.md")).read()


# ------------------------------------------------------------------------------------------------------------
# The statistics, against known values and a brute-force count

def test_t_quantile_and_incomplete_beta_known_values():
    # two-sided 95 % critical values of Student's t (any table)
    for df, t in ((1, 12.706204736), (2, 4.302652730), (4, 2.776445105), (9, 2.262157163), (29, 2.045229642)):
        assert analyze.t_quantile(0.975, df) == pytest.approx(t, abs=1e-8)
        assert analyze.t_cdf(t, df) == pytest.approx(0.975, abs=1e-9)  # t rounded to 1e-9
        assert analyze.t_quantile(0.025, df) == pytest.approx(-t, abs=1e-8)
    assert analyze.t_cdf(0.0, 3) == 0.5 and analyze.t_cdf(1.0, 1) == pytest.approx(0.75)  # Cauchy: 1/2 + 1/4
    for x in (0.1, 0.5, 0.9):
        assert analyze.betainc(1, 1, x) == pytest.approx(x)
        assert analyze.betainc(3, 1, x) == pytest.approx(x ** 3)
        assert analyze.betainc(2.5, 0.5, x) == pytest.approx(1 - analyze.betainc(0.5, 2.5, 1 - x))
    assert analyze.betainc(7, 7, 0.5) == pytest.approx(0.5)
    # the interval of 1, 2, 3: mean 2, sd 1, 2 df
    m, ci = analyze.ci95([1.0, 2.0, 3.0])
    assert m == 2.0 and ci == pytest.approx([2 - 4.302652730 / math.sqrt(3), 2 + 4.302652730 / math.sqrt(3)])


def test_sign_flip_p_is_the_share_of_sign_patterns_and_its_floor_is_one_over_two_to_the_n():
    for d in ([0.3, 0.1, 0.5, 0.2, 0.4], [1.0, -2.0, 3.0, -4.0, 5.0], [-0.1, -0.2, 0.05],
              [2.0, 0.0, 1.0, 1.0]):
        sums = [sum(s * abs(x) for s, x in zip(signs, d))
                for signs in itertools.product((1, -1), repeat=len(d))]
        greater = sum(t >= sum(d) - 1e-12 for t in sums) / len(sums)
        less = sum(t <= sum(d) + 1e-12 for t in sums) / len(sums)
        assert analyze.sign_flip_p(d) == pytest.approx((greater, less))
    for n in range(3, 11):  # all pairs in the claimed direction: the smallest p n pairs can give
        assert analyze.sign_flip_p(np.arange(1.0, n + 1)) == (2.0 ** -n, 1.0)
    assert analyze.sign_flip_p([1.0, 2.0, 3.0, 4.0])[0] == 0.0625 > 0.05  # 4 seeds can never reach p < 0.05
    assert analyze.t_test_p([0.3, 0.1, 0.5, 0.2, 0.4]) == pytest.approx(0.0132355996, abs=1e-9)


# ------------------------------------------------------------------------------------------------------------
# Verdicts on planted runs

def test_consistent_planted_effect_over_5_seeds_holds(tmp_path, capsys):
    mamls, vans, grid = plant(tmp_path, [1] * 5)
    c, report = run_analysis(tmp_path, mamls, vans, grid)
    assert c["n_pairs"] == 5 and c["seeds"] == SEEDS and c["left_out"] == []
    for cid in ("speedup", "ner", "dynamics", "jump"):
        key = analyze.HEADLINES[cid][0]
        assert c[f"verdict_{cid}"] == "holds", cid
        assert c[f"{key}_p"] == 1 / 32 < 0.05 and c[f"{key}_p_opposite"] == 1.0
    # per seed, in seed order: speed-up e^noise x 1.3 (MAML reaches vanilla's final loss that much sooner)
    sp = c["speedup_step_ar_per_seed"]
    assert sp == pytest.approx([1.3 * math.exp(e) for e in NOISE], rel=0.02)
    assert c["speedup_step_ar"] == pytest.approx(math.exp(np.mean(np.log(sp))))  # the geometric mean
    lo, hi = c["speedup_step_ar_ci95"]
    assert 1.0 < lo < c["speedup_step_ar"] < hi
    assert c["ner_rel_avg_per_seed"] == pytest.approx([100 * (0.2 + e) for e in NOISE])
    assert c["ner_ckpt_maml_per_seed"] == [f"ckpts/maml-{s}.pt" for s in SEEDS]  # each run its own seed's
    assert c["eval_fewshot_acc_diff_per_seed"] == pytest.approx([0.1 + e for e in NOISE])
    assert c["rise_fall_diff_per_seed"] == [1.0] * 5 and c["rise_fall_weight_maml"] == 1.0
    assert c["final_eval_ppl_vanilla_per_seed"] == pytest.approx([math.exp(2 + 8 * math.exp(-3))] * 5)
    assert "**holds**: 5 seeds, exact sign-flip p = 0.0312" in report and "## Across seeds" in report


def test_the_same_effect_with_random_signs_is_inconclusive(tmp_path):
    mamls, vans, grid = plant(tmp_path, [1, -1, 1, -1, 1])
    c, report = run_analysis(tmp_path, mamls, vans, grid)
    for cid in ("speedup", "ner", "dynamics", "jump"):
        assert c[f"verdict_{cid}"] == "inconclusive (n = 5)", cid
        key = analyze.HEADLINES[cid][0]
        assert c[f"{key}_p"] >= 0.05 and c[f"{key}_p_opposite"] >= 0.05
    assert "**inconclusive (n = 5)**" in report and "the smallest p 5 pairs can give is 0.0312" in report


def test_a_consistent_opposite_effect_does_not_hold(tmp_path):
    mamls, vans, grid = plant(tmp_path, [-1] * 5)
    c, _ = run_analysis(tmp_path, mamls, vans, grid)
    for cid in ("speedup", "ner", "dynamics", "jump"):
        key = analyze.HEADLINES[cid][0]
        assert c[f"verdict_{cid}"] == "does not hold" and c[f"{key}_p_opposite"] == 1 / 32, cid
    assert c["speedup_step_ar_ci95"][1] < 1.0


def test_three_seeds_are_inconclusive_however_consistent(tmp_path):
    """The exact test cannot go below 1 / 2^3 = 0.125 with 3 pairs; the t-test's p is reported beside it."""
    mamls, vans, grid = plant(tmp_path, [1] * 3, seeds=SEEDS[:3])
    c, report = run_analysis(tmp_path, mamls, vans, grid)
    assert c["verdict_speedup"] == "inconclusive (n = 3)" and c["speedup_step_ar_p"] == 0.125
    assert c["speedup_step_ar_p_t"] < 0.01  # consistent ratios: the t-test alone would say p < 0.01
    assert "the smallest p 3 pairs can give is 0.125" in report


# ------------------------------------------------------------------------------------------------------------
# Pairing: unpaired seeds, mixed settings, the one-pair form

def test_seeds_without_a_query_accuracy_jump_count_in_the_total(tmp_path):
    mamls, vans, grid = plant(tmp_path, [1] * 5, no_jump=(1, 3))
    c, report = run_analysis(tmp_path, mamls, vans, grid)
    assert [s is None for s in c["jump_step_per_seed"]] == [True, False, True, False, False]
    assert "a jump in 3/5 seeds" in report


def test_unpaired_seeds_are_named_and_left_out(tmp_path, capsys):
    mamls, vans, grid = plant(tmp_path, [1] * 5, vanilla_seeds=[1, 2, 3, 4, 6])
    c, report = run_analysis(tmp_path, mamls, vans, grid)
    printed = capsys.readouterr().out
    assert c["n_pairs"] == 4 and c["seeds"] == [1, 2, 3, 4]
    for seed, arm, other in ((5, "maml", "vanilla"), (6, "vanilla", "MAML")):
        note = f"seed {seed} ({tmp_path / f'{arm}-s{seed}'}) has no {other} run with that seed: left out"
        assert note in c["left_out"] and f"note: {note}" in printed and note in report
    with pytest.raises(analyze.UserError, match=r"no seed is in both arms \(MAML seeds \[1, 2, 3, 4, 5\], "
                                                r"vanilla seeds \[6\]\)"):
        analyze.analyze(mamls, str(tmp_path / "x"), vanilla=[vans[-1]], draw=False)


def test_mixed_settings_duplicate_seeds_and_wrong_arms_are_clear_errors(tmp_path, capsys):
    mamls, vans, _ = plant(tmp_path, [1] * 3, seeds=SEEDS[:3], grid=False)
    odd = str(tmp_path / "maml-lr")
    write_run(odd, 0.5, 4, lr=3e-4)
    with pytest.raises(SystemExit):
        analyze.main(mamls + [odd, "--vanilla"] + vans)
    err = capsys.readouterr().err
    assert err.startswith("error: the MAML runs differ in --lr (") and f"{odd}: 0.0003" in err and \
        "may differ only in --seed" in err
    dup = str(tmp_path / "maml-dup")
    write_run(dup, 0.5, 1)
    with pytest.raises(analyze.UserError, match="are both seed 1 of the MAML arm"):
        analyze.analyze(mamls + [dup], str(tmp_path / "x"), vanilla=vans, draw=False)
    with pytest.raises(analyze.UserError, match="is a vanilla run .* list it after --vanilla"):
        analyze.analyze(mamls + vans[:1], str(tmp_path / "x"), vanilla=vans[1:], draw=False)
    with pytest.raises(analyze.UserError, match=r"3 MAML runs and no vanilla run"):
        analyze.analyze(mamls, str(tmp_path / "x"), draw=False)


def test_one_pair_keeps_todays_rule_and_says_there_is_no_test(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(analyze, "figures", lambda *a: [])  # through main(): the figures are not under test
    mamls, vans, grid = plant(tmp_path, [1], seeds=[1])
    out = str(tmp_path / "an")
    analyze.main([mamls[0], vans[0], "--ner", grid, "--out", out])  # the two-positional form
    c = json.load(open(os.path.join(out, "claims.json")))
    printed = capsys.readouterr().out
    assert c["n_pairs"] == 1 and c["seeds"] == [1] and c["speedup_step_ar_p"] is None
    assert c["speedup_step_ar_ci95"] is None and c["speedup_step_ar_per_seed"] == [c["speedup_step_ar"]]
    assert c["verdict_speedup"] == "holds"  # today's rule: >= 1.1x per step
    assert f"**holds**: {c['speedup_step_ar']:.2f}x per step on AR loss; 1 seed: no test |" in printed
    assert "## Across seeds" not in printed
    out2 = str(tmp_path / "an2")  # the same pair through --vanilla: the same numbers
    analyze.main([mamls[0], "--vanilla", vans[0], "--ner", grid, "--out", out2])
    assert json.load(open(os.path.join(out2, "claims.json"))) == c


def test_several_seeds_are_drawn_as_mean_band_and_thin_lines(tmp_path):
    mamls, vans, _ = plant(tmp_path, [1] * 3, seeds=SEEDS[:3], grid=False)
    runs = [analyze.load_run(p) for p in mamls + vans]
    plt = analyze.pyplot()
    fig = analyze.figure_loss(plt, runs)
    ax = fig.axes[0]  # loss vs step: per curve (AR loss of each arm, MAML's mixed metric) a mean, a band, and
    # a thin line per seed
    assert len(ax.collections) == 3 and len(ax.lines) == 3 * (1 + 3)
    assert sum("mean of 3, band +-1 sd" in t.get_text() for t in ax.get_legend().get_texts()) == 3
    plt.close(fig)
    res = analyze.analyze(mamls, str(tmp_path / "an"), vanilla=vans, draw=False)
    for fig in (analyze.figure_speedup(plt, res["pair_results"]), analyze.figure_meta(plt, runs, res),
                analyze.figure_adaptation(plt, runs)):
        assert all(len(a.collections) >= 1 for a in fig.axes[:2])  # bands (adaptation: gain, support loss)
        plt.close(fig)


# ------------------------------------------------------------------------------------------------------------
# The NER grid of several checkpoints per arm (finetune_ner.py --sweep), paired by pretraining seed

def test_ner_grid_pairs_checkpoints_by_seed(tmp_path, capsys):
    rows = []
    for ck, ratio, seed, f1 in (("a/m2.pt", 0.5, "2", 0.6), ("a/m1.pt", 0.5, "1", 0.5),
                                ("a/v1.pt", 0.0, "1", 0.4), ("a/v2.pt", 0.0, "2", 0.4),
                                ("a/m3.pt", 0.5, "3", 0.9)):
        for regime in ("head", "full"):
            rows.append(dict(ckpt=ck, hybrid_ratio=str(ratio), ckpt_seed=seed, regime=regime, train_on="toy",
                             eval_on="toy", precision=f1, recall=f1, f1=str(f1)))
    pairs, notes = fn.grid_pairs(rows)
    assert pairs == [("1", "a/m1.pt", "a/v1.pt"), ("2", "a/m2.pt", "a/v2.pt")]
    assert notes == ["a/m3.pt (seed 3) has no vanilla checkpoint of that seed: left out of the pairs"]
    fn.ner_grid_report(rows, str(tmp_path))
    md = open(tmp_path / "grid.md").read()
    assert "over vanilla (a/v1.pt), seed 1" in md and "over vanilla (a/v2.pt), seed 2" in md
    # seen (toy): +25 % and +50 %, mean +37.5 %
    assert "## Mean over the 2 seed pairs (1, 2)" in md and "| head | +37.5% | - | - |" in md
    assert "left out of the pairs" in capsys.readouterr().out
    # a grid written before ckpt_seed existed, one checkpoint per arm: today's single pair
    old = [{k: v for k, v in r.items() if k != "ckpt_seed"} for r in rows
           if r["ckpt"] in ("a/m1.pt", "a/v1.pt")]
    assert fn.grid_pairs(old) == ([(None, "a/m1.pt", "a/v1.pt")], [])
