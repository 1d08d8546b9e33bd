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
from shapes import write_run as write_shape

SEEDS = [1, 2, 3, 4, 5]
NOISE = [0.03, -0.02, 0.05, -0.04, 0.01]  # per-seed noise, well below every planted effect


def write_run(path, ratio, seed, speed=1.0, fewshot=0.3, **flags):
    """A run of tests/shapes.py (400 steps) with flags in its config. speed: its AR loss per AR step is the
    vanilla curve sped up that much (a MAML run at rho = 0.5 does half the AR steps per step)."""
    write_shape(path, ratio, seed, speed=speed, fewshot=(fewshot, 0.5),
                **({} if ratio else dict(per="smooth")))
    cfg = json.load(open(os.path.join(path, "config.json")))
    cfg["args"].update(flags)
    json.dump(cfg, open(os.path.join(path, "config.json"), "w"))


def plant(tmp_path, signs, effect=1.3, seeds=SEEDS, vanilla_seeds=None, grid=True):
    """MAML runs and their vanilla twins; pair i has the planted effect in the direction signs[i]: speed-up
    per step effect^(+-1), few-shot at [MASK] +-0.1, NER F1 +-20 %. -> (MAML paths, vanilla paths, grid)."""
    mamls, vans, rows = [], [], []
    for i, s in enumerate(seeds):
        sign = signs[i]
        m = str(tmp_path / f"maml-s{s}")
        write_run(m, 0.5, s, speed=2 * effect ** sign * math.exp(NOISE[i]),
                  fewshot=0.3 + sign * (0.1 + NOISE[i]))
        mamls.append(m)
        for ckpt, ratio, f1 in ((f"ckpts/maml-{s}.pt", 0.5, 0.4 * (1 + sign * (0.2 + NOISE[i]))),
                                (f"ckpts/vanilla-{s}.pt", 0.0, 0.4)):
            for regime in ("head", "full"):
                for ev in ("toy", "toy_heldout"):  # checkpoints outside the run folders: paired by ckpt_seed
                    rows.append(dict(ckpt=ckpt, hybrid_ratio=ratio, ckpt_seed=s, regime=regime,
                                     train_on="toy", eval_on=ev, precision=f1, recall=f1, f1=f1))
    for s in vanilla_seeds or seeds:
        v = str(tmp_path / f"vanilla-s{s}")
        write_run(v, 0.0, s)
        vans.append(v)
    g = tmp_path / "grid"
    if grid:
        g.mkdir()
        with open(g / "grid.csv", "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    return mamls, vans, str(g)


def run_analysis(tmp_path, mamls, vans, grid):
    out = str(tmp_path / "an")
    analyze.analyze(mamls, out, grid, vanilla=vans, draw=False)
    return json.load(open(os.path.join(out, "claims.json"))), open(os.path.join(out, "report.md")).read()


KEY = {c["id"]: c["key"] for c in analyze.CLAIMS}
NUMERIC = ("speedup", "ner", "fewshot_mask")  # the planted claims; the shapes are in test_scoreboard.py


# ------------------------------------------------------------------------------------------------------------
# The statistics, against a brute-force count

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


# ------------------------------------------------------------------------------------------------------------
# Verdicts on planted runs

def test_consistent_planted_effect_over_5_seeds_holds(tmp_path):
    mamls, vans, grid = plant(tmp_path, [1] * 5)
    c, report = run_analysis(tmp_path, mamls, vans, grid)
    assert c["n_pairs"] == 5 and c["seeds"] == SEEDS and c["left_out"] == []
    for cid in NUMERIC:
        assert c[f"verdict_{cid}"] == "holds", cid
        assert c[f"{KEY[cid]}_p"] == 1 / 32 < 0.05 and c[f"{KEY[cid]}_p_opposite"] == 1.0
    # per seed, in seed order: speed-up e^noise x 1.3 (MAML reaches vanilla's final loss that much sooner)
    sp = c["speedup_step_ar_per_seed"]
    assert sp == pytest.approx([1.3 * math.exp(e) for e in NOISE], rel=0.03)
    assert c["speedup_step_ar"] == pytest.approx(math.exp(np.mean(np.log(sp))))  # the geometric mean
    lo, hi = c["speedup_step_ar_ci95"]
    assert 1.0 < lo < c["speedup_step_ar"] < hi and c["speedup_step_ar_reached_per_seed"] == [True] * 5
    assert c["ner_rel_avg_per_seed"] == pytest.approx([100 * (0.2 + e) for e in NOISE])
    assert c["ner_ckpt_maml_per_seed"] == [f"ckpts/maml-{s}.pt" for s in SEEDS]  # each run its own seed's
    assert c["ner_toy_only"] == 1.0 and "(toy NER only)" in report
    assert c["fewshot_mask_diff_per_seed"] == pytest.approx([0.1 + e for e in NOISE])
    assert "**holds**: 5 pairs, mean 1." in report and "exact sign-flip p = 0.0312" in report


def test_the_same_effect_with_random_signs_is_inconclusive(tmp_path):
    mamls, vans, grid = plant(tmp_path, [1, -1, 1, -1, 1])
    c, report = run_analysis(tmp_path, mamls, vans, grid)
    for cid in NUMERIC:
        assert c[f"verdict_{cid}"] == "inconclusive (n = 5)", cid
        assert c[f"{KEY[cid]}_p"] >= 0.05 and c[f"{KEY[cid]}_p_opposite"] >= 0.05
    assert "**inconclusive (n = 5)**" in report and "the smallest p 5 pairs can give is 0.0312" in report


def test_a_consistent_opposite_effect_does_not_hold(tmp_path):
    mamls, vans, grid = plant(tmp_path, [-1] * 5)
    c, _ = run_analysis(tmp_path, mamls, vans, grid)
    for cid in NUMERIC:
        assert c[f"verdict_{cid}"] == "does not hold" and c[f"{KEY[cid]}_p_opposite"] == 1 / 32, cid
    assert c["speedup_step_ar_ci95"][1] < 1.0 and c["speedup_step_ar_reached_per_seed"] == [False] * 5


def test_three_seeds_are_inconclusive_however_consistent(tmp_path):
    """The exact test cannot go below 1 / 2^3 = 0.125 with 3 pairs."""
    mamls, vans, grid = plant(tmp_path, [1] * 3, seeds=SEEDS[:3])
    c, report = run_analysis(tmp_path, mamls, vans, grid)
    assert c["verdict_speedup"] == "inconclusive (n = 3)" and c["speedup_step_ar_p"] == 0.125
    assert "the smallest p 3 pairs can give is 0.125" in report


# ------------------------------------------------------------------------------------------------------------
# Pairing: unpaired seeds, mixed settings, the one-pair form

def test_unpaired_seeds_are_named_and_left_out(tmp_path, capsys):
    mamls, vans, grid = plant(tmp_path, [1] * 5, vanilla_seeds=[1, 2, 3, 4, 6])
    c, report = run_analysis(tmp_path, mamls, vans, grid)
    printed = capsys.readouterr().out
    assert c["n_pairs"] == 4 and c["seeds"] == [1, 2, 3, 4]
    for seed, arm, other in ((5, "maml", "vanilla"), (6, "vanilla", "MAML")):
        note = f"seed {seed} ({tmp_path / f'{arm}-s{seed}'}) has no {other} twin with that seed: left out"
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
    assert c["verdict_speedup"] == "holds" and c["speedup_step_ar"] >= 1.1  # the one-pair rule: >= 1.1x
    assert "| **holds**: 1 pair: the one-pair rule, no test |" in printed
    assert "| number | mean | 95 % interval | per seed |" not in printed
    out2 = str(tmp_path / "an2")  # the same pair through --vanilla: the same numbers
    analyze.main([mamls[0], "--vanilla", vans[0], "--ner", grid, "--out", out2])
    assert json.load(open(os.path.join(out2, "claims.json"))) == c


def test_several_seeds_are_drawn_as_mean_band_and_thin_lines(tmp_path):
    mamls, vans, _ = plant(tmp_path, [1] * 3, seeds=SEEDS[:3], grid=False)
    runs = [analyze.load_run(p) for p in mamls + vans]
    plt = analyze.pyplot()
    fig = analyze.figure_loss(plt, runs, {})
    ax = fig.axes[0]  # loss vs step: per curve (AR loss of each arm, MAML's mixed metric) a mean, a band, and
    # a thin line per seed
    assert len(ax.collections) == 3 and len(ax.lines) == 3 * (1 + 3)
    assert sum("mean of 3, band +-1 sd" in t.get_text() for t in ax.get_legend().get_texts()) == 3
    plt.close(fig)
    fig = analyze.figure_meta(plt, runs, {})
    assert all(len(a.collections) >= 1 for a in fig.axes)  # bands: support, query, held-out few-shot
    plt.close(fig)
    fig = analyze.figure_speedup(plt, runs, {})
    assert len(fig.axes[0].lines) == 4 * 3 + 1  # four curves per pair, and the line at 1
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
    assert notes == ["seed 3 (a/m3.pt) has no vanilla twin with that seed: left out"]
    fn.ner_grid_report(rows, str(tmp_path))
    md = open(tmp_path / "grid.md").read()
    assert "over vanilla (a/v1.pt), seed 1" in md and "over vanilla (a/v2.pt), seed 2" in md
    # seen (toy): +25 % and +50 %, mean +37.5 %
    assert "## Mean over the 2 seed pairs (1, 2)" in md and "| head | +37.5% | - | - |" in md
    assert "note: seed 3 (a/m3.pt) has no vanilla twin" in capsys.readouterr().out
    # a grid written before ckpt_seed existed, one checkpoint per arm: today's single pair
    old = [{k: v for k, v in r.items() if k != "ckpt_seed"} for r in rows
           if r["ckpt"] in ("a/m1.pt", "a/v1.pt")]
    assert fn.grid_pairs(old) == ([(None, "a/m1.pt", "a/v1.pt")], [])
    with pytest.raises(fn.UserError, match="a/m2.pt has no recorded seed"):  # several: a seed is needed
        fn.grid_pairs([{k: v for k, v in r.items() if k != "ckpt_seed"} for r in rows])
