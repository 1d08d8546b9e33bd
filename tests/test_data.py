"""Corpora, the token-file format, the toy world, and batch determinism."""
import json
import os

import numpy as np
import pytest

import maml_gpt as mg

toyworld = mg.toyworld()


def test_toy_world_is_deterministic_and_varied():
    a = list(toyworld.documents(seed=5, n_docs=300))
    assert a == list(toyworld.documents(seed=5, n_docs=300))
    assert a != list(toyworld.documents(seed=6, n_docs=300))
    sentences = [s for d in a for s in d.split(". ")]
    assert len(set(sentences)) / len(sentences) > 0.8  # little verbatim repetition
    assert sum(len(f) for f in toyworld.FRAMES.values()) >= 100
    words = {w for d in toyworld.documents(n_docs=5000) for w in d.split()}
    assert len(words) > 2000


def test_toy_world_default_size_and_consistency(data_dir):
    enc = mg.get_tokenizer()
    docs = list(toyworld.documents(n_docs=30000))
    n = sum(len(ids) + 1 for ids in enc.encode_ordinary_batch(docs))
    assert n >= 2_000_000
    # consistent attributes: a person's profession is repeated across the corpus, not redrawn per sentence
    world = toyworld.build_world(1337)
    p = world["people"][0]
    mentions = [d for d in docs if f"{p['name']} is a " in d or f"{p['name']} works as a" in d]
    assert mentions and all(f" {p['job']}" in d for d in mentions)


def test_every_episode_word_has_enough_occurrences(data_dir):
    args = mg.parse_args(["--data", "toy", "--toy_docs", "2000", "--data_dir", data_dir,
                          "--smlmt_min_count", "8", "--smlmt_skip_top", "50"])
    index = mg.build_smlmt_index(os.path.join(data_dir, "toy-2000"), args)
    counts = np.diff(index["offsets"])
    assert len(index["words"]) >= 32 and counts.min() >= 8


def test_ner_sentences_iob2_and_heldout_names():
    train = toyworld.ner_sentences(n=400)
    test = toyworld.ner_sentences(n=400, heldout=True)
    for words, tags in train + test:
        assert len(words) == len(tags)
        for i, t in enumerate(tags):
            assert t in {"O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC"}
            if t.startswith("I-"):
                assert tags[i - 1][2:] == t[2:]  # valid IOB2: I- continues an entity of the same type
    ents = lambda data: {w for ws, ts in data for w, t in zip(ws, ts) if t.startswith("B-")}  # noqa: E731
    assert len(ents(test)) > 50 and not ents(train) & ents(test)
    assert {t[2:] for _, ts in train for t in ts if t != "O"} == {"PER", "ORG", "LOC"}


def test_bin_round_trip_and_validation(tmp_path):
    p = str(tmp_path / "x.bin")
    mg.write_bin(p, np.arange(1000) % 50000)
    assert np.array_equal(mg.read_bin(p), np.arange(1000) % 50000)
    with open(p, "r+b") as f:  # truncate: size no longer matches the header
        f.truncate(1500)
    with pytest.raises(mg.UserError, match="not a valid token file"):
        mg.read_bin(p)


def test_batches_depend_only_on_seed_and_step():
    n, T = 10_000, 16
    a = mg.batch_indices(1, 7, n, T, 8)
    assert np.array_equal(a, mg.batch_indices(1, 7, n, T, 8))
    assert not np.array_equal(a, mg.batch_indices(1, 8, n, T, 8))
    # 2 processes x 1 micro-step == 1 process x 2 micro-steps == 4 processes x ... (the same global batch)
    one = np.concatenate([mg.micro_slice(a, m, 0, 1, 4) for m in range(2)])
    two = np.concatenate([mg.micro_slice(a, 0, r, 2, 4) for r in range(2)])
    four = np.concatenate([mg.micro_slice(a, 0, r, 4, 2) for r in range(4)])
    assert np.array_equal(one, a) and np.array_equal(two, a) and np.array_equal(four, a)
    x, y = mg.get_batch(np.arange(100, dtype=np.uint16), np.array([3, 50]), 5, "cpu")
    assert x.tolist() == [[3, 4, 5, 6, 7], [50, 51, 52, 53, 54]] and y[0].tolist() == [4, 5, 6, 7, 8]


def local_args(tmp_path, data):
    return mg.parse_args(["--data", str(data), "--data_dir", str(tmp_path / "cache"), "--seq_len", "16"])


def test_local_txt_folder_and_jsonl(tmp_path):
    para = "The quick brown fox jumps over the lazy dog. " * 5
    (tmp_path / "a.txt").write_text("\n\n".join([para] * 120))
    folder = tmp_path / "docs"
    folder.mkdir()
    for i in range(60):
        (folder / f"{i}.txt").write_text(para)
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps({"text": para}) for _ in range(120)))
    for data in (tmp_path / "a.txt", folder, tmp_path / "c.jsonl"):
        out = mg.prepare_corpus(local_args(tmp_path, data))
        train, val = mg.read_bin(os.path.join(out, "train.bin")), mg.read_bin(os.path.join(out, "val.bin"))
        assert len(train) > 50 * len(val) / 2 > 0 and train[-1] == mg.EOT_ID


def test_local_data_errors(tmp_path):
    with pytest.raises(mg.UserError, match="no such file"):
        mg.prepare_corpus(local_args(tmp_path, tmp_path / "missing.txt"))
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(mg.UserError, match="too small"):
        mg.prepare_corpus(local_args(tmp_path, tmp_path / "empty.txt"))
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"txt": 1}\n')
    with pytest.raises(mg.UserError, match=r"bad.jsonl:2: expected a JSON object"):
        mg.prepare_corpus(local_args(tmp_path, tmp_path / "bad.jsonl"))
    (tmp_path / "nothing").mkdir()
    with pytest.raises(mg.UserError, match="no .txt or .jsonl"):
        mg.prepare_corpus(local_args(tmp_path, tmp_path / "nothing"))


def test_hub_corpus_fails_fast_offline(tmp_path):
    with pytest.raises(mg.UserError, match="--data toy"):
        mg.prepare_corpus(local_args(tmp_path, "HuggingFaceFW/fineweb-edu:sample-10BT"))
