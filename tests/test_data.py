"""Corpora, the token-file format, the toy world, and batch determinism."""
import gzip
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import maml_gpt as mg
from data import prepare, toyworld


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
    index = prepare.build_smlmt_index(os.path.join(data_dir, "toy-2000"), args)
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
    prepare.write_bin(p, np.arange(1000) % 50000)
    assert np.array_equal(prepare.read_bin(p), np.arange(1000) % 50000)
    with open(p, "r+b") as f:  # truncate: size no longer matches the header
        f.truncate(1500)
    with pytest.raises(mg.UserError, match="not a valid token file"):
        prepare.read_bin(p)


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


def test_toy_corpus_files_are_unchanged(data_dir):
    """The README's numbers were measured on these bytes: the toy world's token files must not drift."""
    digest = {s: hashlib.sha256(open(os.path.join(data_dir, "toy-2000", f"{s}.bin"), "rb").read()).hexdigest()
              for s in ("train", "val")}
    assert digest == TOY_2000_SHA256


TOY_2000_SHA256 = {"train": "c5aba3414570bc36a62b3b2da64c7e6c111f498368d9ae549ff8f7d099cb410a",
                   "val": "cdf23b8eaa3f2eeaf8cb210025a23147fcdf460aa239fe0028d4a24cc6f66cf9"}


def prepared(tmp_path, data, *flags):
    """-> (train, val) token arrays of --data prepared into tmp_path/cache."""
    out = mg.prepare_corpus(mg.parse_args(["--data", str(data), "--data_dir", str(tmp_path / "cache"),
                                           "--seq_len", "16", *flags]))
    return [np.array(mg.read_bin(os.path.join(out, f"{s}.bin"))) for s in ("train", "val")]


def write_corpora(tmp_path, docs):
    """The same documents in every format --data reads; -> {path: the flags it needs}."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    parts = [docs[i:i + 40] for i in range(0, len(docs), 40)]
    (tmp_path / "pq").mkdir()
    (tmp_path / "txt").mkdir()
    for k, part in enumerate(parts):  # FineWeb-Edu's layout: a folder of parquet files, more than one column
        pq.write_table(pa.table({"id": list(range(len(part))), "content": part}),
                       tmp_path / "pq" / f"{k:03d}_00000.parquet", row_group_size=16)
        (tmp_path / "txt" / f"{k:03d}.txt").write_text("\n\n".join(part))
    (tmp_path / "pq" / "README.md").write_text("# a dataset card, not a corpus file")
    pq.write_table(pa.table({"text": docs}), tmp_path / "one.parquet")
    lines = "".join(json.dumps({"id": i, "text": d}) + "\n" for i, d in enumerate(docs))
    with gzip.open(tmp_path / "dolma.json.gz", "wt") as f:  # Dolma's: JSON lines, gzipped
        f.write(lines)
    (tmp_path / "c.jsonl").write_text(lines)
    (tmp_path / "a.txt").write_text("\n\n".join(docs))
    content = ["--text_field", "content"]
    return {tmp_path / "one.parquet": [], tmp_path / "pq": content, tmp_path / "pq" / "*.parquet": content,
            tmp_path / "dolma.json.gz": [], tmp_path / "c.jsonl": [], tmp_path / "a.txt": [],
            tmp_path / "txt": []}


def test_every_local_format_yields_the_tokens_of_its_text(tmp_path, monkeypatch):
    """parquet (a file, a folder, a glob), .json.gz, .jsonl and .txt (a file, a folder): each prepares into
    exactly the tokens of its documents, in order, every 50th held out: the text inside, not the bytes."""
    docs = list(toyworld.documents(seed=3, n_docs=120))
    train, val = prepare.encode_shard(docs, 0)
    assert mg.get_tokenizer().decode(val[:list(val).index(mg.EOT_ID)].tolist()) == docs[0]
    for data, flags in write_corpora(tmp_path, docs).items():
        got = prepared(tmp_path, data, *flags)
        assert np.array_equal(got[0], train) and np.array_equal(got[1], val), data
    # a token budget: the same files with 1 and 2 processes, cut at a shard boundary past the budget
    monkeypatch.setattr(prepare, "SHARD_DOCS", 16)
    cut = [prepared(tmp_path / f"budget{p}", tmp_path / "one.parquet", "--max_tokens", "3000",
                    "--prep_procs", str(p)) for p in (1, 2)]
    assert all(np.array_equal(a, b) for a, b in zip(*cut))
    n = len(cut[0][0])
    assert n <= 3000 <= n + len(cut[0][1]) and np.array_equal(cut[0][0], train[:n])


def test_files_without_a_reader_are_refused_never_tokenized(tmp_path):
    blob = gzip.compress(os.urandom(4000))  # compressed bytes: what a misread archive would train on
    cases = {"corpus.tar.gz": "has no reader", "corpus.zip": "has no reader", "model.bin": "has no reader",
             "packed.txt": r"reading failed after 0 documents \(UnicodeDecodeError"}
    for name, message in cases.items():
        (tmp_path / name).write_bytes(blob)
        with pytest.raises(mg.UserError, match=message):
            prepared(tmp_path, tmp_path / name)
    (tmp_path / "mixed").mkdir()
    (tmp_path / "mixed" / "a.txt").write_text("some text")
    (tmp_path / "mixed" / "b.jsonl").write_text('{"text": "more"}\n')
    with pytest.raises(mg.UserError, match="mixes formats"):
        prepared(tmp_path, tmp_path / "mixed")
    with pytest.raises(mg.UserError, match="no files"):
        prepared(tmp_path, tmp_path / "*.parquet")
    assert not [f for _, _, fs in os.walk(tmp_path / "cache") for f in fs if f.endswith(".bin")]


def test_killed_preparation_resumes_where_it_stopped_byte_identical(tmp_path, monkeypatch):
    """SIGKILL a preparation (2 processes) after its 7th commit, half-way through appending the 8th shard;
    the rerun (1 process) must start at document 7 x 16 = 112, not 0, and write the same bytes as an
    uninterrupted run."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    docs = list(toyworld.documents(seed=4, n_docs=300))
    (tmp_path / "pq").mkdir()
    for k in range(6):  # the kill lands in the third file: the stream's position spans files
        pq.write_table(pa.table({"text": docs[50 * k:50 * k + 50]}), tmp_path / "pq" / f"{k}.parquet")
    monkeypatch.setattr(prepare, "SHARD_DOCS", 16)
    ref = prepared(tmp_path / "ref", tmp_path / "pq", "--prep_procs", "2")
    argv = ["--data", str(tmp_path / "pq"), "--data_dir", str(tmp_path / "cache"), "--seq_len", "16",
            "--prep_procs", "2"]
    # progress.json is written (write_atomically -> write_text) once per commit, after that shard's tokens
    code = (f"import os, signal, sys; sys.path.insert(0, {mg.HERE!r}); import maml_gpt as mg\n"
            "from data import prepare\n"
            "prepare.SHARD_DOCS, real, n = 16, prepare.write_text, [0]\n"
            "def write_text(path, text):\n"
            "    n[0] += os.path.basename(path).startswith('progress')\n"
            "    if n[0] == 8: os.kill(os.getpid(), signal.SIGKILL)\n"
            "    real(path, text)\n"
            f"prepare.write_text = write_text\nmg.prepare_corpus(mg.parse_args({argv!r}))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    (out,) = [str(p) for p in (tmp_path / "cache").iterdir()]
    progress = json.load(open(os.path.join(out, "progress.json")))
    assert progress["docs"] == 112 and not os.path.exists(os.path.join(out, "val.bin"))
    # the 8th shard's tokens were appended, uncommitted: the rerun must cut them off
    partial = os.path.getsize(os.path.join(out, "train.partial"))
    assert partial > 4 * prepare.HEADER_INTS + 2 * progress["train"]
    firsts = []
    encode = prepare.encode_shard
    monkeypatch.setattr(prepare, "encode_shard",
                        lambda texts, first: firsts.append(first) or encode(texts, first))
    got = prepared(tmp_path, tmp_path / "pq", "--prep_procs", "1")
    assert firsts == list(range(112, 301, 16))  # from where it stopped, up to the final (empty) shard
    assert all(np.array_equal(a, b) for a, b in zip(got, ref))
    assert sorted(os.listdir(out)) == [".lock", "train.bin", "val.bin"]  # no partial or temporary files left


def test_one_writer_per_cache_the_others_wait_and_say_for_what(tmp_path, capsys):
    """A process that finds the cache locked (another node preparing it on a shared filesystem) waits, says
    for whom and what, and uses the corpus the holder wrote: it never prepares it a second time."""
    args = mg.parse_args(["--data", "toy", "--toy_docs", "300", "--data_dir", str(tmp_path),
                          "--seq_len", "16"])
    out = str(tmp_path / "toy-300")
    with prepare.cache_lock(out, "it"):
        waiter = threading.Thread(target=mg.prepare_corpus, args=(args,))
        waiter.start()
        for _ in range(600):
            if "waiting for" in capsys.readouterr().out:
                break
            time.sleep(0.05)
        else:
            raise AssertionError("the second process never said it was waiting")
        assert waiter.is_alive() and not os.path.exists(os.path.join(out, "val.bin"))
        prepare.tokenize_documents(args, out, "toy-300")  # the holder's work
    waiter.join(60)
    assert not waiter.is_alive() and "preparing" not in capsys.readouterr().out


def test_local_data_errors(tmp_path):
    with pytest.raises(mg.UserError, match="no such file"):
        prepared(tmp_path, tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(mg.UserError, match="too small"):
        prepared(tmp_path, tmp_path / "empty.txt")
    (tmp_path / "bad.jsonl").write_text('{"txt": "ok", "id": 1}\n')
    with pytest.raises(mg.UserError, match=r"no 'text' field \(it has txt, id\); name the text one with "
                                           "--text_field"):
        prepared(tmp_path, tmp_path / "bad.jsonl")
    (tmp_path / "nothing").mkdir()
    with pytest.raises(mg.UserError, match="no files"):
        prepared(tmp_path, tmp_path / "nothing")


def test_hub_corpus_fails_fast_offline_without_touching_the_network(tmp_path, monkeypatch):
    def no_network(*a, **k):
        raise AssertionError("a hub corpus opened a socket with HF_HUB_OFFLINE=1")
    monkeypatch.setattr(socket.socket, "connect", no_network)
    with pytest.raises(mg.UserError, match=r"cannot stream hub dataset .*Offline, use --data toy .* or "
                                           r"--data PATH \(a local download"):
        prepared(tmp_path, "HuggingFaceFW/fineweb-edu:sample-10BT")
