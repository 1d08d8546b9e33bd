"""finetune_ner.py: IOB2 parsing, alignment, the seqeval-compatible metric, regimes, early stopping, end to
end."""
import json
import os
import random
import shutil

import pytest
import torch

import finetune_ner as fn
import maml_gpt as mg

UNER = os.path.join(os.path.dirname(mg.HERE), "shared", "uner")


def test_read_iob2_comments_oth_and_blank_lines(tmp_path):
    p = tmp_path / "x-ud-test.iob2"
    p.write_text("# sent_id = 1\n# text = Ann went\n1\tAnn\tB-PER\t-\t-\n2\twent\tO\t-\t-\n\n"
                 "# sent_id = 2\n1\tBelgrade\tB-OTH\t-\t-\n2\tCity\tI-OTH\t-\t-\n3\tx\tB-O\t-\t-\n\n\n")
    assert fn.read_iob2(str(p)) == [(["Ann", "went"], ["B-PER", "O"]),
                                    (["Belgrade", "City", "x"], ["O", "O", "O"])]


def test_read_iob2_malformed_lines(tmp_path):
    p = tmp_path / "bad.iob2"
    p.write_text("1\tAnn\tB-PER\t-\t-\n2 went O - -\n")
    with pytest.raises(mg.UserError, match=r"bad.iob2:2: expected 5 TAB-separated columns"):
        fn.read_iob2(str(p))
    p.write_text("1\tAnn\tB-MISC\t-\t-\n")
    with pytest.raises(mg.UserError, match=r"bad.iob2:1: unknown tag 'B-MISC'"):
        fn.read_iob2(str(p))


def test_label_alignment_on_multi_token_words():
    enc = mg.get_tokenizer()
    words, tags = ["Xanthippe", "visited", "Ouagadougou", "."], ["B-PER", "O", "B-LOC", "O"]
    (ids, labels, first), = fn.encode([(words, tags)])[0]
    assert ids == enc.encode("Xanthippe visited Ouagadougou .")  # words joined by spaces, as running text
    assert len(enc.encode("Xanthippe")) > 1 and len(enc.encode(" Ouagadougou")) > 1
    assert [labels[i] for i in first] == [fn.LABEL_ID[t] for t in tags]
    assert sum(l != -100 for l in labels) == 4 and len(labels) == len(ids)
    items, truncated = fn.encode([(words * 20, tags * 20)], max_len=16)
    assert len(items[0][0]) <= 16 and truncated > 0 and len(items[0][2]) + truncated == 80


@pytest.mark.parametrize("gold,pred,p,r", [
    ([["B-PER", "I-PER", "O", "B-LOC"]], [["B-PER", "I-PER", "O", "B-LOC"]], 1.0, 1.0),
    ([["B-PER", "I-PER", "O"]], [["B-PER", "O", "O"]], 0.0, 0.0),  # boundary error: no credit
    ([["O", "I-PER", "I-PER"]], [["B-PER", "I-PER", "O"]], 0.0, 0.0),  # I after O starts an entity (1..2)
    ([["O", "I-PER", "I-PER"]], [["O", "B-PER", "I-PER"]], 1.0, 1.0),  # ... equal to B-PER I-PER
    ([["B-PER", "I-LOC"]], [["B-PER", "B-LOC"]], 1.0, 1.0),  # a type change splits: PER(0) + LOC(1)
    ([["B-ORG", "B-ORG"]], [["B-ORG", "I-ORG"]], 0.0, 0.0),  # two entities vs one
    ([["B-PER", "O"], ["B-LOC", "O"]], [["B-PER", "O"], ["O", "O"]], 1.0, 0.5),
    ([["O", "O"]], [["O", "O"]], 0.0, 0.0),
    ([["B-PER"], ["O"]], [["O"], ["B-PER"]], 0.0, 0.0),  # the same span in another sentence is another entity
])
@pytest.mark.entity_f1
def test_entity_f1_hand_worked(gold, pred, p, r):
    res = fn.entity_f1(gold, pred)
    got = (res["precision"], res["recall"])
    if (p, r) != (r, p) and got == pytest.approx((r, p)):
        pytest.fail("precision and recall are swapped: precision = hits / predicted entities, recall = "
                    f"hits / gold entities (gold {gold}, predicted {pred})", pytrace=False)
    blind = [{e for tags in seqs for e in fn.entities(tags)} for seqs in (gold, pred)]  # no sentence index
    blind = (len(blind[0] & blind[1]) / len(blind[1]) if blind[1] else 0.0,
             len(blind[0] & blind[1]) / len(blind[0]) if blind[0] else 0.0)
    if blind != pytest.approx((p, r)) and got == pytest.approx(blind):
        pytest.fail("entities in different sentences are matched with each other: an entity is (sentence, "
                    f"type, start, end) (gold {gold}, predicted {pred})", pytrace=False)
    assert got == pytest.approx((p, r)), \
        f"exact-span entities (type, start, end), seqeval's IOB2 rules: gold {gold}, predicted {pred} must " \
        f"give precision {p}, recall {r}; got {got}"
    assert res["f1"] == pytest.approx(2 * p * r / (p + r) if p + r else 0.0), \
        "f1 must be the harmonic mean 2 P R / (P + R) (0 when both are 0)"


@pytest.mark.entity_f1
def test_entity_f1_per_type_and_micro():
    gold = [["B-PER", "I-PER", "O", "B-LOC", "O", "B-ORG"]]
    pred = [["B-PER", "I-PER", "O", "B-ORG", "O", "B-ORG"]]
    res = fn.entity_f1(gold, pred)
    assert res["precision"] == pytest.approx(2 / 3) and res["recall"] == pytest.approx(2 / 3), \
        "micro precision and recall pool the entities of every type: 2 hits of 3 predicted, of 3 gold"
    assert res["per_type"]["PER"]["f1"] == 1.0 and res["per_type"]["LOC"]["f1"] == 0.0, \
        "per_type[TYPE] scores the entities of that type only"
    org = res["per_type"]["ORG"]
    if org.get("precision") == 1.0 and org.get("recall") == 0.5:
        pytest.fail("precision and recall are swapped in per_type: ORG has 1 hit of 2 predicted, of 1 gold",
                    pytrace=False)
    assert org == dict(precision=0.5, recall=1.0, f1=pytest.approx(2 / 3), support=1), \
        f"per_type['ORG'] must be precision 1/2, recall 1/1, f1 2/3, support 1 (gold entities); got {org}"


@pytest.mark.entity_f1
@pytest.mark.parametrize("seed", range(5))
def test_entity_f1_equals_seqeval_on_random_tags(seed):
    """Random tag sequences, ill-formed ones included (I- after O, type changes inside a span): micro and
    per-type precision, recall and F1 as seqeval's default mode computes them."""
    metrics = pytest.importorskip("seqeval.metrics")
    rng = random.Random(seed)
    tags = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC", "B-ORG", "I-ORG"]
    weights = [6, 2, 2, 1, 1, 1, 1]
    gold = [rng.choices(tags, weights, k=rng.randint(1, 12)) for _ in range(200)]
    pred = [[t if rng.random() < 0.8 else rng.choice(tags) for t in sent] for sent in gold]  # partly right
    ours = fn.entity_f1(gold, pred)
    for k, f in (("precision", metrics.precision_score), ("recall", metrics.recall_score),
                 ("f1", metrics.f1_score)):
        assert ours[k] == pytest.approx(f(gold, pred), abs=1e-12), \
            f"micro {k} differs from seqeval's on 200 random sentences (seed {seed}): {ours[k]:.4f} vs " \
            f"{f(gold, pred):.4f}"
    report = metrics.classification_report(gold, pred, output_dict=True, zero_division=0)
    for typ, row in ours["per_type"].items():
        ref = report[typ]
        assert (row["precision"], row["recall"], row["f1"], row["support"]) == pytest.approx(
            (ref["precision"], ref["recall"], ref["f1-score"], ref["support"]), abs=1e-12), \
            f"per-type {typ} (precision, recall, f1, support) differs from seqeval's (seed {seed})"
    assert set(ours["per_type"]) == {"PER", "LOC", "ORG"}


@pytest.fixture(scope="session")
def ckpt(tmp_path_factory, data_dir):
    """A briefly pretrained checkpoint, trained once and shared by the tests below."""
    from conftest import SMALL
    out = str(tmp_path_factory.mktemp("pre") / "run")
    mg.main(SMALL + ["--data_dir", data_dir, "--out_dir", out, "--max_steps", "30", "--hybrid_ratio", "0"])
    return os.path.join(out, "ckpt.pt")


def args_for(ckpt, tmp_path, *extra):
    return fn.build_parser().parse_args(["--ckpt", ckpt, "--out", str(tmp_path / "ner"),
                                         "--toy_sentences", "200", "--epochs", "3", "--train_on", "toy"]
                                        + list(extra))


def test_head_only_leaves_the_backbone_bit_identical(ckpt, tmp_path):
    args = args_for(ckpt, tmp_path, "--regime", "head", "--lr", "1e-2")
    ck = mg.load_checkpoint(ckpt)
    model = mg.model_from_checkpoint(ck)
    splits = fn.load_splits(args)
    clf, hist = fn.finetune(model, splits, args, torch.device("cpu"), log=lambda *_: None)
    assert all(torch.equal(v, ck["model"][k]) for k, v in model.state_dict().items())
    args.regime = "full"
    model = mg.model_from_checkpoint(ck)
    fn.finetune(model, splits, args, torch.device("cpu"), log=lambda *_: None)
    assert any(not torch.equal(v, ck["model"][k]) for k, v in model.state_dict().items())


def test_early_stopping_restores_the_best_dev_epoch(ckpt, tmp_path, monkeypatch):
    args = args_for(ckpt, tmp_path, "--regime", "head", "--epochs", "6", "--patience", "2")
    dev_f1 = iter([0.1, 0.5, 0.2, 0.3, 0.9, 0.9])  # best at epoch 2; stops after epoch 4
    snapshots = []
    real_score = fn.score

    def fake_score(preds, sentences):
        snapshots.append({k: v.clone() for k, v in clf_ref[-1].state_dict().items()})
        return dict(real_score(preds, sentences), f1=next(dev_f1))

    clf_ref = []
    real_linear = torch.nn.Linear

    def make_linear(*a, **k):
        clf_ref.append(real_linear(*a, **k))
        return clf_ref[-1]

    monkeypatch.setattr(fn, "score", fake_score)
    monkeypatch.setattr(fn.nn, "Linear", make_linear)
    model = mg.model_from_checkpoint(mg.load_checkpoint(ckpt))
    clf, hist = fn.finetune(model, fn.load_splits(args), args, torch.device("cpu"), log=lambda *_: None)
    assert [h["epoch"] for h in hist] == [1, 2, 3, 4]
    assert all(torch.equal(v, snapshots[1][k]) for k, v in clf.state_dict().items())
    assert not torch.equal(clf.weight, snapshots[3]["weight"])


def test_offline_end_to_end_beats_all_o(ckpt, tmp_path, capsys):
    out = tmp_path / "ner"
    fn.main(["--ckpt", ckpt, "--out", str(out), "--toy_sentences", "300", "--epochs", "4",
             "--regime", "head"])
    res = json.load(open(out / "results.json"))
    assert set(res["eval"]) == {"toy", "toy_heldout"}
    assert res["eval"]["toy"]["f1"] > 0.0  # predicting O everywhere finds no entity: F1 = 0
    assert "toy_heldout" in capsys.readouterr().out


def test_missing_checkpoint_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit):
        fn.main(["--ckpt", str(tmp_path / "none.pt")])
    assert "no checkpoint" in capsys.readouterr().err


@pytest.mark.skipif(not os.path.isdir(UNER), reason="shared/uner not present")
def test_integration_real_uner_da_ddt(ckpt, tmp_path):
    for name in os.listdir(UNER):
        if name.endswith(".iob2"):
            assert fn.read_iob2(os.path.join(UNER, name))  # every real file parses
    out = tmp_path / "ner"
    fn.main(["--ckpt", ckpt, "--data_dir", UNER, "--train_on", "da_ddt", "--out", str(out), "--epochs", "1",
             "--max_train_sentences", "200", "--regime", "head", "--lr", "1e-3"])
    res = json.load(open(out / "results.json"))
    assert list(res["eval"])[0] == "da_ddt"  # in-language first, then zero-shot
    assert {"en_ewt", "sr_set", "en_pud", "ceb_gja", "tl_trg"} <= set(res["eval"])
    assert res["eval"]["da_ddt"]["sentences"] == 565
    assert all(0.0 <= r["f1"] <= 1.0 for r in res["eval"].values())


def test_sweep_grid_tables_and_resume(ckpt, trained_run, tmp_path, capsys):
    maml = tmp_path / "maml"  # a copy: the grid names a checkpoint by its folder, and both folders are "run"
    maml.mkdir()
    shutil.copy(os.path.join(trained_run[0], "ckpt.pt"), maml)
    out = tmp_path / "grid"
    argv = ["--sweep", "--ckpt", str(maml / "ckpt.pt"), ckpt, "--out", str(out),
            "--toy_sentences", "100", "--epochs", "1"]
    fn.main(argv)
    rows = (out / "grid.csv").read_text().splitlines()
    assert len(rows) == 1 + 2 * 2 * 2  # header + 2 checkpoints x 2 regimes x 2 eval sets (toy, toy_heldout)
    md = (out / "grid.md").read_text()
    assert "Relative improvement of MAML" in md and "| head |" in md and "| full |" in md
    assert len([p for p in os.listdir(out) if p.startswith("heatmap_")]) == 4
    fn.main(argv)  # resumes: every cell is already done, nothing is re-run or duplicated
    assert (out / "grid.csv").read_text().splitlines() == rows
    # other settings would mix two grids in one table: refused, nothing touched
    with pytest.raises(SystemExit):
        fn.main(argv[:-1] + ["2"])
    assert "other settings (--epochs 1 there, 2 now)" in capsys.readouterr().err
    assert (out / "grid.csv").read_text().splitlines() == rows
