"""analyze.py's claims table on planted runs: the speed-up on four axes (computed by hand), the held-out
few-shot eval at the last common step, stable keys, and the NER row from a hand-made grid."""
import csv
import json
import math
import os

import pytest

import analyze


def f(n):  # AR loss as a function of the AR steps a run has taken: identical in both planted runs
    return 2.0 + 8.0 * math.exp(-n / 600)


Q = 1.0  # planted query cross-entropy: below the AR loss all run long, as log 32 = 3.47 is in real runs


def write_run(path, ratio, dynamics=False, fewshot=None):
    """Windows of 10 steps up to 3000. rho = 0.5 alternates branches exactly: 5 AR + 5 meta steps per window,
    a meta step costing 500 backbone tokens against 1000 for an AR step. fewshot(step) -> the four eval keys,
    or None."""
    os.makedirs(path)
    json.dump({"args": {"hybrid_ratio": ratio, "n_way": 32}}, open(os.path.join(path, "config.json"), "w"))
    with open(os.path.join(path, "metrics.jsonl"), "w") as fh:
        for step in range(10, 3010, 10):
            n_meta = 5 if ratio else 0
            ar_steps, meta_steps = step * (10 - n_meta) // 10, step * n_meta // 10
            r = dict(step=step, tokens_ar=ar_steps * 1000, tokens_meta=meta_steps * 500,
                     tokens=ar_steps * 1000 + meta_steps * 500, n_ar_steps=10 - n_meta, n_meta_steps=n_meta,
                     loss_ar=f(ar_steps))
            if ratio:
                r.update(loss_query=Q, loss_mixed=((10 - n_meta) * f(ar_steps) + n_meta * Q) / 10,
                         acc_query_pre=0.03, acc_query_post=0.05 if step < 2000 else 0.4,
                         acc_support_pre=0.03, acc_support_post=0.1)
            if dynamics and step % 100 == 0:  # rise to step 1000, then (MAML only) a sigmoid fall at 1800
                rise = 0.5 + 0.4 * min(step, 1000) / 1000
                per = rise - (0.5 / (1 + math.exp(-(step - 1800) / 40)) if ratio else 0.0)
                for layer in range(2):
                    for mod in ("attention.v_proj", "swiglu.w_2"):
                        r[f"per_weight/layers.{layer}.{mod}"] = per
                        r[f"per_grad/layers.{layer}.{mod}"] = per / 2
                ent = 3.0 + per  # the entropy follows the same rise and fall
                r.update(attn_entropy=[[ent, ent], [ent, ent]], attn_entropy_mean=ent)
            if fewshot and step % 500 == 0:
                r.update(fewshot(step))
            fh.write(json.dumps(r) + "\n")


def test_speedup_on_four_axes_and_the_mixed_metric_artifact(tmp_path, capsys):
    write_run(str(tmp_path / "vanilla"), 0.0)
    write_run(str(tmp_path / "maml"), 0.5)
    out = str(tmp_path / "an")
    analyze.analyze([str(tmp_path / "maml"), str(tmp_path / "vanilla")], out, draw=False)
    c = json.load(open(os.path.join(out, "claims.json")))
    # By hand. MAML ends at 1500 AR steps with loss f(1500), above vanilla's final f(3000), so the ratios ask
    # where vanilla first reaches f(1500): at step 1500 = 1500 AR steps = 1.5M tokens. MAML ends at step 3000,
    # 1500 AR steps, 1.5M + 0.75M tokens.
    assert c["speedup_arstep_ar"] == pytest.approx(1.0, abs=0.02)  # identical learning per AR step
    assert c["speedup_step_ar"] == pytest.approx(0.5, abs=0.01)  # half the AR steps per step at rho = 0.5
    assert c["speedup_token_ar"] == pytest.approx(1.5 / 2.25, abs=0.01)
    # Mixed: MAML's (f(s/2) + Q) / 2 reaches vanilla's final f(3000) at s = 1200 ln(8 / (2 f(3000) - Q - 2)).
    s = 1200 * math.log(8 / (2 * f(3000) - Q - 2))
    assert c["speedup_step_mixed"] == pytest.approx(3000 / s, abs=0.02) and c["speedup_step_mixed_reached"]
    assert c["verdict_speedup"] == "does not hold" and not c["speedup_step_ar_reached"]
    report = open(os.path.join(out, "report.md")).read()
    assert report.startswith("# maml-gpt analysis") and report.index("## Claims") < report.index("## Runs")
    # the mixed metric's ratio the other way round, in words: MAML reaches vanilla's final mixed loss sooner
    mixed = f"mixed train/loss: MAML reached vanilla's final loss {c['speedup_step_mixed']:.2f}x sooner"
    assert mixed in report
    printed = capsys.readouterr().out
    assert "| Same loss N x sooner |" in printed and "**does not hold**" in printed


def fewshot_maml(step):
    return dict(eval_fewshot_acc_pre=0.05, eval_fewshot_acc=0.1 + step / 10000, eval_proto_acc_mask=0.3,
                eval_proto_acc_prev=0.5)


def fewshot_vanilla(step):
    return dict(eval_fewshot_acc_pre=0.04, eval_fewshot_acc=0.2,
                eval_proto_acc_mask=0.25, eval_proto_acc_prev=0.55)


def test_fewshot_claims_at_the_last_common_eval(tmp_path):
    write_run(str(tmp_path / "maml"), 0.5, dynamics=True, fewshot=fewshot_maml)
    write_run(str(tmp_path / "vanilla"), 0.0, dynamics=True, fewshot=fewshot_vanilla)
    out = str(tmp_path / "an")
    analyze.analyze([str(tmp_path / "maml"), str(tmp_path / "vanilla")], out)
    c = json.load(open(os.path.join(out, "claims.json")))
    # the held-out few-shot eval of both backbones at the last common eval step (3000)
    assert c["fewshot_step"] == 3000
    assert c["eval_fewshot_acc_maml"] == pytest.approx(0.4) and c["eval_fewshot_acc_vanilla"] == 0.2
    assert c["fewshot_mask_diff"] == pytest.approx(0.05) and c["fewshot_prev_diff"] == pytest.approx(-0.05)
    assert c["verdict_fewshot_mask"] == "holds" and c["verdict_fewshot_prev"] == "does not hold"
    report = open(os.path.join(out, "report.md")).read()
    assert "adapted head at --read: 0.400 vs 0.200" in report
    for png in ("meta.png", "loss.png", "speedup.png", "per_maml.png"):
        assert os.path.getsize(os.path.join(out, png)) > 10_000


def test_claims_without_vanilla_twin_or_fewshot_keys(tmp_path):
    """An old MAML run alone: every key still present, the two-run claims 'not measurable'."""
    write_run(str(tmp_path / "maml"), 0.5)
    analyze.analyze([str(tmp_path / "maml")], str(tmp_path / "an"), draw=False)
    c = json.load(open(str(tmp_path / "an" / "claims.json")))
    write_run(str(tmp_path / "v"), 0.0)
    analyze.analyze([str(tmp_path / "maml"), str(tmp_path / "v")], str(tmp_path / "an2"), draw=False)
    assert set(c) == set(json.load(open(str(tmp_path / "an2" / "claims.json"))))  # stable keys
    assert c["verdict_speedup"] == c["verdict_ner"] == c["verdict_dynamics"] == "not measurable"
    assert c["verdict_fewshot_mask"] == c["verdict_fewshot_prev"] == "not measurable"
    assert c["fewshot_step"] is None and c["eval_fewshot_acc_maml"] is None
    assert c["transition_kind"] == "jump without PER drop" and c["verdict_jump"] == "does not hold"


def test_ner_claim_from_a_hand_made_grid(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(analyze, "figures", lambda *a: [])  # through main(): the figures are not under test
    maml, van = str(tmp_path / "maml"), str(tmp_path / "vanilla")
    write_run(maml, 0.5)
    write_run(van, 0.0)
    rows = []

    def cells(ckpt, ratio, regime, f1s, seed=1):
        for (train_on, eval_on), v in f1s.items():
            rows.append(dict(ckpt=ckpt, hybrid_ratio=ratio, ckpt_seed=seed, regime=regime, train_on=train_on,
                             eval_on=eval_on, precision=v, recall=v, f1=v))
    # a decoy MAML checkpoint listed first: the grid's checkpoint inside RUN_MAML must be the one used
    cells("elsewhere/ckpt.pt", 0.5, "head", {("en_ewt", "en_ewt"): 0.9}, seed=7)
    for ck, ratio, head, full in (
            (os.path.join(maml, "ckpt.pt"), 0.5,
             {("en_ewt", "en_ewt"): 0.5, ("en_ewt", "da_ddt"): 0.3, ("da_ddt", "en_ewt"): 0.4,
              ("en_ewt", "en_pud"): 0.2, ("en_ewt", "ceb_gja"): 0.1},
             {("en_ewt", "en_ewt"): 0.6, ("en_ewt", "de_pud"): 0.3, ("en_ewt", "tl_trg"): 0.0}),
            (os.path.join(van, "ckpt.pt"), 0.0,
             {("en_ewt", "en_ewt"): 0.4, ("en_ewt", "da_ddt"): 0.2, ("da_ddt", "en_ewt"): 0.3,
              ("en_ewt", "en_pud"): 0.25, ("en_ewt", "ceb_gja"): 0.1},
             {("en_ewt", "en_ewt"): 0.5, ("en_ewt", "de_pud"): 0.3, ("en_ewt", "tl_trg"): 0.0})):
        cells(ck, ratio, "head", head)
        cells(ck, ratio, "full", full)
    grid = tmp_path / "maml" / "ner-grid"  # where `finetune_ner.py --sweep --ckpt MAML VANILLA` writes it
    grid.mkdir()
    with open(grid / "grid.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    analyze.main([maml, van, "--out", str(tmp_path / "an")])  # the grid is found in RUN_MAML/ner-grid
    c = json.load(open(str(tmp_path / "an" / "claims.json")))
    assert c["ner_ckpt_maml"] == os.path.join(maml, "ckpt.pt") and c["ner_grids"] == [str(grid)]
    # head, seen: mean(0.5, 0.3, 0.4) = 0.4 vs mean(0.4, 0.2, 0.3) = 0.3 -> +33.3 %; PUD 0.2 vs 0.25 -> -20 %;
    # other 0.1 vs 0.1 -> 0 %. full: seen 0.6 vs 0.5 -> +20 %, PUD 0 %, other: vanilla F1 0 -> not measurable.
    assert (c["ner_f1_head_seen_maml"] == pytest.approx(0.4)
            and c["ner_f1_head_seen_vanilla"] == pytest.approx(0.3))
    assert c["ner_rel_head_seen"] == pytest.approx(100 / 3)
    assert c["ner_rel_head_pud"] == pytest.approx(-20) and c["ner_rel_head_other"] == pytest.approx(0)
    assert c["ner_rel_full_seen"] == pytest.approx(20) and c["ner_rel_full_pud"] == pytest.approx(0)
    assert c["ner_rel_full_other"] is None and c["ner_toy_only"] is False
    assert c["verdict_ner"] == "holds"  # mean of (+33.3, -20, 0, +20, 0) = +6.7 %
    assert "mean +6.7 %" in capsys.readouterr().out


def test_ner_grid_dir_without_grid_csv(tmp_path, capsys):
    write_run(str(tmp_path / "maml"), 0.5)
    with pytest.raises(SystemExit):
        analyze.main([str(tmp_path / "maml"), "--ner", str(tmp_path)])
    assert "no grid.csv" in capsys.readouterr().err
