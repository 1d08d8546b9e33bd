"""
finetune_ner.py: Universal NER fine-tuning of a maml_gpt.py checkpoint (paper §3.4, §5, App. B).

    python finetune_ner.py                                           # demo checkpoint, toy NER set, offline
    python finetune_ner.py --ckpt out/small/ckpt.pt --train_on en_ewt --regime head   # one cell of the grid
    python finetune_ner.py --sweep --ckpt out/small/ckpt.pt out/small-vanilla/ckpt.pt  # the paper's grid
    python finetune_ner.py --data_dir ../shared/uner --train_on da_ddt                # local .iob2 files

A fresh nn.Linear(d_model, 7) reads the final hidden states. --regime head freezes the backbone (the NER
analogue of the inner loop); --regime full trains everything. AdamW, lr 3e-5, batch 16, at most 10 epochs,
early stopping on dev entity micro-F1 (the best epoch's weights are tested). Each run evaluates in-language
and zero-shot on every test-only set available, writes results.json and prints a table.
"""
import argparse
import csv
import io
import json
import os
import pathlib
import time
import urllib.error
import urllib.request

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from data import toyworld
from maml_gpt import (EOT_ID, HERE, UserError, cli, get_tokenizer, load_checkpoint,
                      model_from_checkpoint, pick_device, write_atomically)

LABELS = ["O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC"]
LABEL_ID = {t: i for i, t in enumerate(LABELS)}
# config -> its GitHub repository UniversalNER/UNER_<name>, on branch master (main for MAIN_BRANCH).
# Train/dev/test configs first, then test-only ones.
TRAIN_CONFIGS = {"da_ddt": "Danish-DDT", "en_ewt": "English-EWT", "hr_set": "Croatian-SET",
                 "pt_bosque": "Portuguese-Bosque", "sk_snk": "Slovak-SNK", "sr_set": "Serbian-SET",
                 "sv_talbanken": "Swedish-Talbanken", "zh_gsd": "Chinese-GSD",
                 "zh_gsdsimp": "Chinese-GSDSIMP"}
TEST_CONFIGS = {"de_pud": "German-PUD", "en_pud": "English-PUD", "pt_pud": "Portuguese-PUD",
                "ru_pud": "Russian-PUD", "sv_pud": "Swedish-PUD", "zh_pud": "Chinese-PUD",
                "ceb_gja": "Cebuano-GJA", "tl_trg": "Tagalog-TRG", "tl_ugnayan": "Tagalog-Ugnayan"}
MAIN_BRANCH = {"da_ddt", "hr_set", "sr_set"}
URL = "https://raw.githubusercontent.com/UniversalNER/UNER_{name}/{branch}/{cfg}-ud-{split}.iob2"


def pyplot():
    """matplotlib.pyplot on the Agg backend: PNG files, no display needed (servers, CI); analyze.py's too."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def write_atomic(path, data):
    """`data` (str or bytes) to `path` via write_atomically: a kill mid-write leaves the old file whole."""
    data = data.encode("utf-8") if isinstance(data, str) else data
    write_atomically(path, lambda tmp: pathlib.Path(tmp).write_bytes(data))


# ------------------------------------------------------------------------------------------------------------
# Data: UNER .iob2 files (downloaded and cached, or local), or the toy world's tagged sentences

def read_iob2(path):
    """-> list of (tokens, tags). `#` comments, 5 TAB columns per token line (id, token, tag, misc,
    annotator), blank lines between sentences. *OTH* tags and B-O become O."""
    sents, words, tags = [], [], []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate([*f, ""], 1):  # the blank line added at the end closes the last sentence
            line = line.rstrip("\r\n")
            if not line.strip() or line.startswith("#"):  # a blank line ends a sentence, comments open one
                if words:
                    sents.append((words, tags))
                words, tags = [], []
                continue
            cols = line.split("\t")
            if len(cols) != 5:
                raise UserError(f"{path}:{n}: expected 5 TAB-separated columns "
                                f"(id, token, tag, misc, annotator), got {len(cols)}: {line[:60]!r}")
            # As the hub configs do: OTHER entities (only in some sets) and the stray "B-O" are not entities.
            tag = "O" if cols[2].endswith("OTH") or cols[2] == "B-O" else cols[2]
            if tag not in LABEL_ID:
                raise UserError(f"{path}:{n}: unknown tag {cols[2]!r}; expected one of {', '.join(LABELS)}")
            words.append(cols[1])
            tags.append(tag)
    return sents


def uner_file(cfg, split, data_dir, cache_dir):
    """Path of <cfg>-ud-<split>.iob2: in --data_dir if given, else cached, else downloaded; None if absent."""
    name = f"{cfg}-ud-{split}.iob2"
    p = os.path.join(data_dir or cache_dir, name)
    if data_dir or os.path.exists(p):  # --data_dir is never downloaded to; a cached download is reused
        return p if os.path.exists(p) else None
    url = URL.format(name={**TRAIN_CONFIGS, **TEST_CONFIGS}[cfg], branch="main" if cfg in MAIN_BRANCH
                     else "master", cfg=cfg, split=split)
    try:
        with urllib.request.urlopen(url, timeout=20) as r:
            body = r.read()
    except urllib.error.HTTPError as e:
        if e.code == 404:
            return None  # this config has no such split
        raise UserError(f"downloading {name} failed (HTTP {e.code}); use --data_dir with local .iob2 files")
    except OSError as e:
        raise UserError(f"cannot download {name} from GitHub ({e}). Offline, run without --train_on "
                        "(the toy NER set) or pass --data_dir with local UNER .iob2 files")
    os.makedirs(cache_dir, exist_ok=True)
    write_atomic(p, body)
    return p


def load_splits(args):
    """-> dict(train, dev, test: {name: sentences}) for args.train_on."""
    n, n_dev = args.toy_sentences, args.toy_sentences // 4
    if args.train_on == "toy":
        data = toyworld.ner_sentences(seed=1337, n=n + 2 * n // 4)
        return dict(train=data[:n], dev=data[n:n + n_dev],
                    test={"toy": data[n + n_dev:],  # unseen sentences; then unseen names
                          "toy_heldout": toyworld.ner_sentences(seed=1337, n=n_dev, heldout=True)})
    if args.train_on not in TRAIN_CONFIGS and args.train_on != "all":
        raise UserError(f"--train_on {args.train_on!r}: choose toy, all, or one of "
                        f"{', '.join(TRAIN_CONFIGS)}")
    cfgs = list(TRAIN_CONFIGS) if args.train_on == "all" else [args.train_on]

    def read(cfg, split, needed=False):
        p = uner_file(cfg, split, args.data_dir, args.cache_dir)
        sents = read_iob2(p) if p else []
        if needed and not sents:
            raise UserError(f"{cfg}: no {split} split found{' in ' + args.data_dir if args.data_dir else ''}")
        return sents

    train, dev = ([s for cfg in cfgs for s in read(cfg, split, needed=True)] for split in ("train", "dev"))
    # in-language test sets first, then every other available one (zero-shot)
    test = {cfg: sents for cfg in dict.fromkeys(cfgs + list(TRAIN_CONFIGS) + list(TEST_CONFIGS))
            if (sents := read(cfg, "test"))}
    return dict(train=train[:args.max_train_sentences or None], dev=dev, test=test)


def encode(sentences, max_len=128):
    """Words -> GPT-2 ids the way pretraining text is tokenized (a leading space before every word but the
    first). Only the first sub-token of each word carries its label; others get -100. -> (list of (ids,
    labels, first-token positions), number of truncated words)."""
    enc = get_tokenizer()
    out, truncated = [], 0
    for words, tags in sentences:
        ids, labels, first = [], [], []
        for i, (w, t) in enumerate(zip(words, tags)):
            # " word" is how a word looks inside running text to GPT-2 BPE; an empty word still gets one slot.
            pieces = enc.encode_ordinary((" " if i else "") + w) or [EOT_ID]
            if len(ids) + 1 > max_len:
                truncated += len(words) - i
                break
            first.append(len(ids))  # where this word's prediction is read
            labels += [LABEL_ID[t]] + [-100] * (len(pieces) - 1)  # -100: no target
            ids += pieces
        out.append((ids[:max_len], labels[:max_len], first))
    return out, truncated


# ------------------------------------------------------------------------------------------------------------
# Metric: entity-level micro P/R/F1, as seqeval's default (IOB2, non-strict) mode

def entities(tags):
    """Entity spans (type, start, end) of one IOB2 sequence, seqeval's lenient rules: an I- tag after O or
    after another type starts a new entity; B- always starts one; O and a type change end one."""
    spans, start, typ = [], None, None
    for i, t in enumerate(list(tags) + ["O"]):  # a trailing O closes an entity that runs to the end
        prefix, ty = (t[0], t[2:]) if t != "O" else ("O", None)
        if start is not None and (prefix in ("B", "O") or ty != typ):
            spans.append((typ, start, i - 1))
            start = None
        if prefix in ("B", "I") and start is None:
            start, typ = i, ty
    return spans


def entity_f1(gold, pred):
    """gold, pred: lists of IOB2 tag sequences, sentence by sentence. -> dict(precision, recall, f1,
    per_type={TYPE: dict(precision, recall, f1, support)}), seqeval's default (non-strict) micro scores. An
    entity is (sentence index, type, start, end) from entities(tags); a predicted entity is a hit only if all
    four equal a gold one (the same span in another sentence is another entity). precision = hits / predicted
    entities (0.0 if none), recall = hits / gold entities (0.0 if none), f1 = 2 P R / (P + R) (0.0 if P + R =
    0); support = the number of gold entities. per_type scores each type's entities alone; its keys are every
    type in gold or pred."""
    # An entity counts only if type, start and end all match (exact-span match), keyed by sentence index.
    g = {(s,) + e for s, tags in enumerate(gold) for e in entities(tags)}
    p = {(s,) + e for s, tags in enumerate(pred) for e in entities(tags)}

    def prf(gs, ps):
        tp = len(gs & ps)
        pr = tp / len(ps) if ps else 0.0
        rc = tp / len(gs) if gs else 0.0
        return dict(precision=pr, recall=rc, f1=2 * pr * rc / (pr + rc) if pr + rc else 0.0, support=len(gs))

    types = sorted({e[1] for e in g | p})
    return dict(**prf(g, p), per_type={t: prf({e for e in g if e[1] == t}, {e for e in p if e[1] == t})
                                       for t in types})


# ------------------------------------------------------------------------------------------------------------
# Fine-tuning

def hidden(model, items, device):
    """Final hidden states at each word's first sub-token, for a batch of encode() items: list of (n_words, d)
    tensors. The batch is right-padded with EOT: safe for a causal model, no real position attends to pads."""
    x = nn.utils.rnn.pad_sequence([torch.tensor(ids) for ids, _, _ in items], batch_first=True,
                                  padding_value=EOT_ID)  # (B, T)
    h = model(x.to(device), return_hidden=True).float()  # (B, T, d)
    return [h[b, first] for b, (_, _, first) in enumerate(items)]


def features(model, items, batch_size, device):
    """hidden() of all items, batch by batch, without gradients, kept on the CPU."""
    with torch.no_grad():
        return [h.cpu() for i in range(0, len(items), batch_size)
                for h in hidden(model, items[i:i + batch_size], device)]


def predict(clf, feats):
    """Predicted tag sequences from features() (without the truncated words: score() predicts them O)."""
    with torch.no_grad():
        return [[LABELS[i] for i in clf(f.to(clf.weight.device)).argmax(-1).tolist()] for f in feats]


def score(preds, sentences):
    gold = [t for _, t in sentences]
    preds = [p + ["O"] * (len(g) - len(p)) for p, g in zip(preds, gold)]
    return entity_f1(gold, preds)


def finetune(model, splits, args, device, log=print):
    """Train a fresh linear head (and the backbone if --regime full); early stopping on dev micro-F1.
    -> (classifier, history). The model and classifier hold the best dev epoch's weights on return."""
    torch.manual_seed(args.seed)
    clf = nn.Linear(model.cfg.d_model, len(LABELS)).to(device)  # fresh per run, PyTorch default init
    head_only = args.regime == "head"
    for p in model.parameters():  # head-only: the backbone gets no gradient and no optimizer state at all
        p.requires_grad_(not head_only)
    model.train(not head_only)
    trained = [clf] if head_only else [clf, model]
    train, _ = encode(splits["train"], args.max_len)
    dev, _ = encode(splits["dev"], args.max_len)
    lr = args.lr or (3e-5 if args.train_on != "toy" else (1e-3 if head_only else 1e-4))
    opt = torch.optim.AdamW([p for m in trained for p in m.parameters()], lr=lr, weight_decay=0.0)
    total = args.epochs * ((len(train) + args.batch_size - 1) // args.batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / total)  # linear decay to 0 (HF default)
    if head_only:  # the backbone is frozen and deterministic: compute its features once
        tr_f, dev_f = (features(model, items, args.batch_size, device) for items in (train, dev))
    tr_y = [torch.tensor(labels)[first] for _, labels, first in train]  # (n_words,): the tag ids
    rng = np.random.default_rng(args.seed)
    best, history = -1.0, []
    for epoch in range(1, args.epochs + 1):
        t0, losses, order = time.time(), [], rng.permutation(len(train))
        for i in range(0, len(order), args.batch_size):  # shuffled batches of sentences
            idx = order[i:i + args.batch_size]
            # each sentence's (n_words, d): cached features (only the classifier runs), or the whole model's
            h = [tr_f[j] for j in idx] if head_only else hidden(model, [train[j] for j in idx], device)
            loss = F.cross_entropy(clf(torch.cat(h).to(device)), torch.cat([tr_y[j] for j in idx]).to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
        model.eval()
        dev_feats = dev_f if head_only else features(model, dev, args.batch_size, device)
        f1 = score(predict(clf, dev_feats), splits["dev"])["f1"]
        model.train(not head_only)
        history.append(dict(epoch=epoch, train_loss=float(np.mean(losses)), dev_f1=f1, sec=time.time() - t0))
        log(f"  epoch {epoch:2d}  train loss {history[-1]['train_loss']:.4f}  dev F1 {f1:.4f}"
            f"{'  *' if f1 > best else ''}")
        if f1 > best:  # keep a copy of the best epoch's weights: those are the ones tested
            best, best_epoch = f1, epoch
            best_state = [{k: v.clone() for k, v in m.state_dict().items()} for m in trained]
        elif epoch - best_epoch >= args.patience:
            log(f"  early stop: no dev improvement for {args.patience} epochs; best epoch {best_epoch}")
            break
    for m, state in zip(trained, best_state):
        m.load_state_dict(state)
    model.eval()
    return clf, history


def run_one(args, ckpt_path=None, log=print):
    """Fine-tune one checkpoint on one config in one regime; evaluate; -> results dict (also results.json)."""
    device = pick_device(args.device)
    path = ckpt_path or args.ckpt[0]
    ck = load_checkpoint(path, device)
    model = model_from_checkpoint(ck, device)
    args.max_len = min(args.max_len, model.cfg.max_seq_len)
    splits = load_splits(args)
    t0 = time.time()
    log(f"fine-tuning {path} ({args.regime}) on {args.train_on}: "
        f"{len(splits['train'])} train / {len(splits['dev'])} dev sentences")
    clf, history = finetune(model, splits, args, device, log)
    res = dict(ckpt=path, regime=args.regime, train_on=args.train_on, history=history,
               hybrid_ratio=ck["args"].get("hybrid_ratio"), ckpt_seed=ck["args"].get("seed"), step=ck["step"],
               eval={})
    for name, sents in splits["test"].items():
        items, truncated = encode(sents, args.max_len)
        preds = predict(clf, features(model, items, args.batch_size, device))
        res["eval"][name] = dict(score(preds, sents), sentences=len(sents), truncated_words=truncated)
    res["sec"] = time.time() - t0
    return res


# ------------------------------------------------------------------------------------------------------------
# The NER grid of `finetune_ner.py --sweep` (paper Figures 13-28, Tables 3-5): cells, tables and heatmaps

# What the cells of one grid must share (grid.json); a different value is another grid.
SWEEP_KEYS = ("lr", "batch_size", "epochs", "patience", "max_len", "max_train_sentences", "toy_sentences",
              "seed", "data_dir")


def sweep(args):
    os.makedirs(args.out, exist_ok=True)
    path, settings_path = pathlib.Path(args.out, "grid.csv"), pathlib.Path(args.out, "grid.json")
    settings = {k: getattr(args, k) for k in SWEEP_KEYS}
    rows = []
    if path.exists():  # resume: skip cells already in the CSV, if they were made the same way
        old = json.loads(settings_path.read_text("utf-8")) if settings_path.exists() else settings
        diff = [f"--{k} {old.get(k)} there, {v} now" for k, v in settings.items() if old.get(k) != v]
        if diff:
            raise UserError(f"{path} holds cells fine-tuned with other settings ({'; '.join(diff)}). "
                            "Give the same flags to add to that grid, or choose another --out")
        rows = list(csv.DictReader(path.read_text("utf-8").splitlines()))
    write_atomic(settings_path, json.dumps(settings, indent=1))
    done = {(r["ckpt"], r["regime"], r["train_on"]) for r in rows}
    if args.train_on == "toy":
        configs = ["toy"]
    else:  # every fine-tuning config with local train files (all of them when downloading), then their union
        configs = [c for c in TRAIN_CONFIGS
                   if args.data_dir is None or uner_file(c, "train", args.data_dir, None)]
        configs += ["all"] if len(configs) == len(TRAIN_CONFIGS) else []
    # ckpt_seed: the --seed the checkpoint was pretrained with (analyze.py pairs the arms by it)
    fields = "ckpt hybrid_ratio ckpt_seed regime train_on eval_on precision recall f1".split()
    todo = [(ckpt, regime, cfg) for ckpt in args.ckpt for regime in ("head", "full") for cfg in configs
            if (ckpt, regime, cfg) not in done]
    for ckpt, regime, cfg in todo:
        res = run_one(argparse.Namespace(**{**vars(args), "regime": regime, "train_on": cfg}), ckpt,
                      log=lambda *_: None)
        print(f"{ckpt} {regime:4s} {cfg:12s} "
              + " ".join(f"{k}={v['f1']:.3f}" for k, v in res["eval"].items()))
        rows += [dict(res, eval_on=name, **r) for name, r in res["eval"].items()]
        # The whole CSV, rewritten atomically after each cell: a Ctrl-C or a kill mid-write could otherwise
        # leave a half cell that a resumed sweep would count as done, or a half row.
        buf = io.StringIO()
        csv.writer(buf).writerows([fields] + [[r.get(k, "") for k in fields] for r in rows])
        write_atomic(path, buf.getvalue())
    # read back: every value a string, as on a resumed sweep
    ner_grid_report(list(csv.DictReader(path.read_text("utf-8").splitlines())), args.out)


GROUPS = {"seen": list(TRAIN_CONFIGS) + ["toy"], "pud": [c for c in TEST_CONFIGS if c.endswith("_pud")],
          "other": ["ceb_gja", "tl_trg", "tl_ugnayan", "toy_heldout"]}


def pair_by_seed(mamls, vanillas, seed_of, name_of):
    """Pairs the items of two arms (runs or checkpoints) by the --seed each was trained with -> ([(seed, MAML
    item, vanilla item)] in seed order, [notes on the items left out]). One item per arm is that pair as
    given (with a note when the seeds differ). A UserError for an item without a seed, two of one seed in an
    arm, or no seed in both arms. analyze.py pairs its runs with this too."""
    if len(mamls) == 1 and len(vanillas) == 1:
        a, b = seed_of(mamls[0]), seed_of(vanillas[0])
        return [(a, mamls[0], vanillas[0])], ([] if str(a) == str(b) else [
            f"the two have different seeds ({a} and {b}): compared as given, not as a paired twin"])
    by = {"MAML": {}, "vanilla": {}}
    for arm, items in (("MAML", mamls), ("vanilla", vanillas)):
        for it in items:
            s = seed_of(it)
            if s is None:
                raise UserError(f"{name_of(it)} has no recorded seed: pairing by seed needs runs "
                                "(checkpoints) written by maml_gpt.py")
            if s in by[arm]:
                raise UserError(f"{name_of(by[arm][s])} and {name_of(it)} are both seed {s} of the {arm} "
                                "arm; give one per seed and arm")
            by[arm][s] = it
    notes = [f"seed {s} ({name_of(by[arm][s])}) has no {other} twin with that seed: left out"
             for arm, other in (("MAML", "vanilla"), ("vanilla", "MAML"))
             for s in by[arm] if s not in by[other]]
    common = sorted(set(by["MAML"]) & set(by["vanilla"]), key=lambda s: (len(str(s)), str(s)))  # 2 before 10
    if not common:
        raise UserError(f"no seed is in both arms (MAML seeds {sorted(by['MAML'])}, vanilla seeds "
                        f"{sorted(by['vanilla'])}); give each MAML run its vanilla twin: the same --seed "
                        "with --hybrid_ratio 0")
    return [(s, by["MAML"][s], by["vanilla"][s]) for s in common], notes


def grid_pairs(rows):
    """The grid's checkpoints as (seed, MAML ckpt, vanilla ckpt) pairs, by the seed each was pretrained with
    (ckpt_seed) -> (pairs, notes on those left out)."""
    info = {r["ckpt"]: r for r in rows}
    maml = [c for c in info if float(info[c]["hybrid_ratio"] or 0) > 0]
    vanilla = [c for c in info if c not in maml]
    if not (maml and vanilla):
        return [], []
    return pair_by_seed(maml, vanilla, lambda c: info[c].get("ckpt_seed") or None, str)


def relative_f1(rows, m, v, groups=None):
    """MAML checkpoint m against vanilla checkpoint v, as the paper's Table 3: -> {(regime, group): (MAML F1,
    vanilla F1, relative change in % of vanilla)}, each F1 the mean over every fine-tuning config x evaluation
    set of the group; None where a side has no cell (the change also where vanilla's F1 is 0)."""
    out = {}
    for regime in ("head", "full"):
        for g, evs in (groups or GROUPS).items():
            f1 = [[float(r["f1"]) for r in rows if r["ckpt"] == ck and r["regime"] == regime
                   and r["eval_on"] in evs] for ck in (m, v)]
            a, b = (float(np.mean(x)) if x else None for x in f1)
            out[regime, g] = (a, b, None if a is None or not b else (a - b) / b * 100)
    return out


def ner_grid_report(rows, out):
    """grid.md (every cell), one heatmap per checkpoint and regime, MAML-vs-vanilla relative changes."""
    plt = pyplot()
    lines = ["# NER fine-tuning grid (entity micro-F1)", ""]

    def section(title, head, body):  # of grid.md: a title, then a table of head and body (rows of cells)
        lines.extend([f"## {title}", "", "| " + " | ".join(head) + " |", "|---" * len(head) + "|",
                      *("| " + " | ".join(cells) + " |" for cells in body), ""])

    ckpts = list(dict.fromkeys(r["ckpt"] for r in rows))
    # heatmap_<name>_<regime>.png: name is the checkpoint's folder, numbered where two share one
    names = [os.path.basename(os.path.dirname(c)) or "model" for c in ckpts]
    names = [n if names.count(n) == 1 else f"{n}-{names[:i + 1].count(n)}" for i, n in enumerate(names)]
    for ckpt, name, regime in ((c, n, g) for c, n in zip(ckpts, names) for g in ("head", "full")):
        f1 = {(r["train_on"], r["eval_on"]): float(r["f1"]) for r in rows
              if r["ckpt"] == ckpt and r["regime"] == regime}
        if not f1:
            continue
        tr, ev = (list(dict.fromkeys(cell[i] for cell in f1)) for i in (0, 1))
        grid = np.array([[f1.get((t, e), np.nan) for e in ev] for t in tr])  # (fine-tuned on, evaluated on)
        section(f"{ckpt} ({regime})", ["fine-tuned on", *ev],
                [[t, *("-" if np.isnan(v) else f"{v:.3f}" for v in row)] for t, row in zip(tr, grid)])
        fig, ax = plt.subplots(figsize=(1 + 0.7 * len(ev), 1 + 0.45 * len(tr)))
        fig.colorbar(ax.imshow(grid, cmap="viridis", vmin=0, vmax=max(0.01, np.nanmax(grid))))
        ax.set_xticks(range(len(ev)), ev, rotation=60, ha="right")
        ax.set_yticks(range(len(tr)), tr)
        for i, j in zip(*np.nonzero(~np.isnan(grid))):
            ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=7, color="w")
        ax.set_title(f"micro-F1: {name} ({regime})")
        fig.tight_layout()
        fig.savefig(os.path.join(out, f"heatmap_{name}_{regime}.png"), dpi=110)
        plt.close(fig)
    pairs, notes = grid_pairs(rows)
    for n in notes:
        print(f"note: {n}")
    many = len(pairs) > 1

    def relative(title, rels, cols):  # per regime, the mean over the pairs of each column's change they have
        changes = {g: [[r[g, c][2] for r in rels if r[g, c][2] is not None] for c in cols]
                   for g in ("head", "full")}
        section(title, ["regime", *cols],
                [[g, *("-" if not x else f"{np.mean(x):+.1f}%" for x in xs)] for g, xs in changes.items()])

    rel = [relative_f1(rows, m, v) for _, m, v in pairs]
    for (seed, m, v), r in zip(pairs, rel):
        relative(f"Relative improvement of MAML ({m}) over vanilla ({v})" + (f", seed {seed}" if many else "")
                 + ", % of vanilla micro-F1 (Table 3)", [r], GROUPS)
    if many:
        relative(f"Mean over the {len(pairs)} seed pairs ({', '.join(str(s) for s, _, _ in pairs)}) of the "
                 "relative improvement, % (analyze.py adds intervals and a test)", rel, GROUPS)
    if pairs:
        evs = {e: [e] for e in dict.fromkeys(r["eval_on"] for r in rows)}
        relative("Per evaluation set (Tables 4-5), averaged over fine-tuning configs"
                 + (f" and over the {len(pairs)} seed pairs" if many else ""),
                 [relative_f1(rows, m, v, evs) for _, m, v in pairs], evs)
    write_atomic(os.path.join(out, "grid.md"), "\n".join(lines))
    print(f"grid: {os.path.join(out, 'grid.csv')}, {os.path.join(out, 'grid.md')}, heatmaps in {out}")


def build_parser():
    p = argparse.ArgumentParser(description="Universal NER fine-tuning of maml_gpt.py checkpoints.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--ckpt", nargs="+", default=["out/demo/ckpt.pt"], help="checkpoint(s); --sweep takes several")
    a("--train_on", help="toy, all, or a UNER config (da_ddt, ...); default toy, en_ewt with --data_dir")
    a("--regime", choices=["head", "full"], default="head", help="head: frozen backbone; full: train all")
    a("--data_dir", help="local folder of <cfg>-ud-<split>.iob2 files (no download)")
    a("--cache_dir", default=os.path.join(HERE, "data", "cache", "uner"), help="where downloads are cached")
    a("--lr", type=float, help="AdamW learning rate (default 3e-5 as in the paper; the short toy demo uses "
      "1e-3 for the head and 1e-4 for full fine-tuning)")
    a("--batch_size", type=int, default=16, help="sentences per optimizer step")
    a("--epochs", type=int, default=10, help="maximum epochs")
    a("--patience", type=int, default=3, help="stop after this many epochs without a better dev F1")
    a("--max_len", type=int, default=128, help="tokens per sentence (longer sentences are truncated)")
    a("--max_train_sentences", type=int, default=0, help="use only the first N training sentences (0 = all)")
    a("--toy_sentences", type=int, default=2000, help="training sentences of the toy NER set")
    a("--seed", type=int, default=0, help="seeds fine-tuning: the head's init, the shuffling")
    a("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    a("--out", help="output folder (default: beside the first --ckpt, ner-<train_on>-<regime>/ or ner-grid/)")
    a("--sweep", action="store_true", help="the paper's grid: every config x {head, full} for each --ckpt")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    args.train_on = args.train_on or ("en_ewt" if args.data_dir else "toy")
    args.out = args.out or os.path.join(os.path.dirname(args.ckpt[0]) or ".",
                                        "ner-grid" if args.sweep else f"ner-{args.train_on}-{args.regime}")

    def body():
        if args.sweep:
            return sweep(args)
        res = run_one(args)
        os.makedirs(args.out, exist_ok=True)
        path = os.path.join(args.out, "results.json")
        write_atomic(path, json.dumps(res, indent=1))
        print("eval set             P       R      F1      PER     ORG     LOC   truncated words")
        for name, r in res["eval"].items():
            per = "  ".join(f"{r['per_type'].get(t, {}).get('f1', 0):6.3f}" for t in ("PER", "ORG", "LOC"))
            print(f"{name:14s} {r['precision']:7.3f} {r['recall']:7.3f} {r['f1']:7.3f}   {per}   "
                  f"{r['truncated_words']}")
        print(f"results: {path} ({res['sec']:.0f}s). Next: python finetune_ner.py --regime "
              f"{'full' if args.regime == 'head' else 'head'}   |   "
              "python finetune_ner.py --sweep --ckpt CKPT ...")
    cli(body)


if __name__ == "__main__":
    main()
