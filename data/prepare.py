"""
Corpus preparation for maml_gpt.py: the documents of a corpus -> train.bin and val.bin in
args.data_dir/<name>/, GPT-2 tokens as uint16 (maml_gpt.read_bin reads them). maml_gpt.prepare_corpus calls
this the first time a run names a corpus, so a user never runs it by hand; it lives apart from the training
code as nanoGPT's data/*/prepare.py does, because a run only ever reads the prepared tokens.

Sources (--data): the offline toy world (data/toyworld.py); local files (parquet, json[l][.gz], txt) read by
`datasets`' own builders; a hub dataset ID, streamed. Tokenizing is sharded over --prep_procs processes and
resumable: a killed preparation continues where it stopped and writes the same bytes. Last, the SMLMT index
of a split (the occurrences of its content words, by maml_gpt.content_word_ids), cached beside it.
"""
import collections
import fcntl
import glob
import hashlib
import itertools
import json
import multiprocessing
import os
import platform
import re
from contextlib import contextmanager

import numpy as np
from tqdm import tqdm

import maml_gpt as mg  # imported by maml_gpt.prepare_corpus: always the loaded module
from maml_gpt import UserError

VAL_EVERY = 50  # every 50th document goes to the held-out split (doc-level: no window straddles the split)
SHARD_DOCS = 2048  # documents per shard: the unit of work of a process, and all a kill can lose


def corpus_name(args):
    """The cache folder's name, which identifies its content: the toy size, a local corpus's files (path,
    size, mtime) and text field, or the hub ID, token budget and text field. Change any of them and the
    corpus is prepared again."""
    data, field = args.data, "" if args.text_field == "text" else f"-{args.text_field}"
    if data == "toy":
        return f"toy-{args.toy_docs}"
    if is_local(data):
        h = hashlib.sha1("|".join(f"{os.path.abspath(f)}|{os.path.getsize(f)}|{os.path.getmtime(f)}"
                                  for f in local_files(data)).encode() + field.encode()).hexdigest()[:8]
        base = re.sub(r"[^\w.-]", "_", os.path.basename(os.path.normpath(data)))  # a glob's * is no name
        return f"local-{base}-{h}-{args.max_tokens}"
    if re.fullmatch(r"[\w.-]+/[\w.-]+(:[\w.-]+)?", data):
        return "hub-" + data.replace("/", "_").replace(":", "_") + f"-{args.max_tokens}{field}"
    raise UserError(f"--data {data!r}: no such file or folder (and not a hub ID like org/name). "
                    "Use --data toy, a local path, or a hub dataset ID")


def prepare(args, out, name):
    """Tokenize the corpus into `out` unless another process has: one writer per folder (cache_lock)."""
    with cache_lock(out, f"the corpus {name}"):
        if not os.path.exists(os.path.join(out, "val.bin")):  # it may have been prepared while we waited
            print(f"preparing the corpus {name} in {out}", flush=True)
            tokenize_documents(args, out, name)


def tokenize_documents(args, out, desc):
    """Tokenize the corpus into out/{train,val}.bin, streaming. SHARD_DOCS documents at a time are tokenized
    (by --prep_procs processes), appended to out/{train,val}.partial in corpus order, and committed to
    out/progress.json: documents read, the stream's position there, tokens written. A killed or crashed run
    resumes from the last commit, the partial files cut back to it: the result is byte-identical to an
    uninterrupted run's. Memory: a few shards of text and tokens, whatever the size of the corpus."""
    max_tokens, head = args.max_tokens if args.data != "toy" else 1 << 62, mg.HEADER_INTS * 4
    parts, prog_path = {s: os.path.join(out, f"{s}.partial") for s in ("train", "val")}, \
        os.path.join(out, "progress.json")
    prog = dict(docs=0, state=None, train=0, val=0, end=False)
    if os.path.exists(prog_path):
        resumed = json.load(open(prog_path))
        # a machine crash can lose appended bytes a commit counted (never a kill): then start over
        if all(os.path.exists(p) and os.path.getsize(p) >= head + 2 * resumed[s] for s, p in parts.items()):
            prog = resumed
            print(f"resuming after {prog['docs']:,} documents ({prog['train'] + prog['val']:,} tokens)")
    files = {s: open(p, "r+b" if prog["docs"] else "wb") for s, p in parts.items()}
    for s, f in files.items():  # the header is written last, when the length is known
        f.truncate(head + 2 * prog[s])
        f.seek(0, os.SEEK_END)
    docs, ds = documents(args, prog["docs"], prog["state"])
    pool = multiprocessing.Pool(args.prep_procs) if args.prep_procs > 1 else None
    pending = collections.deque()  # (tokens or their AsyncResult, the commit after them), in corpus order
    n_read = prog["docs"]
    bar = tqdm(total=max_tokens if max_tokens < 1 << 40 else None, initial=prog["train"] + prog["val"],
               desc=f"tokenizing {desc}", unit="tok", unit_scale=True, leave=False)
    try:
        while not prog["end"] and prog["train"] + prog["val"] < max_tokens:
            if len(pending) < 2 * args.prep_procs and not (pending and pending[-1][1]["end"]):
                texts = read_documents(docs, args.data, n_read)
                job = pool.apply_async(encode_shard, (texts, n_read)) if pool else encode_shard(texts, n_read)
                n_read += len(texts)
                pending.append((job, dict(docs=n_read, state=None if ds is None else ds.state_dict(),
                                          end=len(texts) < SHARD_DOCS)))
                continue
            job, mark = pending.popleft()
            for (s, f), toks in zip(files.items(), job.get() if pool else job):
                f.write(toks.tobytes())
                f.flush()
                os.fsync(f.fileno())  # on disk before the commit that counts it
                prog[s] += len(toks)
                bar.update(len(toks))
            prog.update(mark)
            mg.write_atomically(prog_path, lambda tmp: mg.write_text(tmp, json.dumps(prog)))
    finally:
        bar.close()
        if pool:
            pool.terminate()
    for s, f in files.items():  # the shards read ahead of the last commit are dropped
        n = min(prog[s], max_tokens) if s == "train" else prog[s]
        f.truncate(head + 2 * n)
        f.seek(0)
        f.write(mg.bin_header(n).tobytes())
        f.close()
    for s in files:  # val.bin last: it marks the corpus complete
        os.replace(parts[s], os.path.join(out, f"{s}.bin"))
    os.remove(prog_path)



def encode_shard(texts, first):
    """Documents first, first + 1, ... -> (train, val) uint16 token arrays, each document followed by
    <|endoftext|>. Depends on nothing else, so any number of processes writes the same files."""
    enc, split = mg.get_tokenizer(), {"train": [], "val": []}
    for n, text in enumerate(texts, first):  # "ordinary": text that looks like <|endoftext|> stays text
        split["val" if n % VAL_EVERY == 0 else "train"].append(enc.encode_ordinary(text) + [mg.EOT_ID])
    return [np.fromiter(itertools.chain.from_iterable(v), np.uint16) for v in split.values()]


def read_documents(docs, data, done):
    """The next SHARD_DOCS documents (fewer at the end of the corpus)."""
    try:
        return list(itertools.islice(docs, SHARD_DOCS))
    except UserError:
        raise
    except Exception as e:  # a dropped connection, a corrupt or binary file: one line, and the way on
        raise UserError(f"--data {data}: reading failed after {done:,} documents ({type(e).__name__}: "
                        f"{str(e).strip().splitlines()[0] if str(e).strip() else ''})"
                        + ("; run the same command again to continue from there" if done else ""))


def documents(args, start=0, state=None):
    """The corpus's documents from document `start` on -> (texts, the datasets stream or None). A stream's
    state_dict() is its position after the texts read so far; `state` is the one saved at `start`."""
    if args.data == "toy":  # a plain generator: the demo imports no `datasets`
        docs = mg.toyworld().documents(seed=1337, n_docs=args.toy_docs)
        return itertools.islice(docs, start, None), None
    ds = local_dataset(local_files(args.data)) if is_local(args.data) else hub_dataset(args.data)
    if state:
        ds.load_state_dict(state)
    return texts(ds, args.text_field, args.data), ds


# Local corpora are read by datasets' own builders, in the streaming mode hub corpora use; "text" gives one
# document per paragraph. A file with another ending (an archive, a binary) has no reader and is refused.
READERS = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".jsonl.gz": "json", ".json.gz": "json",
           ".txt": "text"}


def is_local(data):
    return os.path.exists(data) or any(c in data for c in "*?[")


def local_files(data):
    """--data PATH: a file, a folder (searched recursively) or a glob -> its corpus files, sorted."""
    reader = lambda f: next((r for end, r in READERS.items() if f.endswith(end)), None)  # noqa: E731
    files = sorted(glob.glob(data, recursive=True) if not os.path.exists(data)
                   else [os.path.join(r, f) for r, _, fs in os.walk(data) for f in fs if reader(f)]
                   if os.path.isdir(data) else [data])
    kinds = {reader(f) for f in files}
    if not files or None in kinds or len(kinds) > 1:
        what = ("no files" if not files else "mixes formats" if None not in kinds else
                f"{next(f for f in files if not reader(f))} has no reader")
        raise UserError(f"--data {data}: {what}; maml-gpt reads {', '.join(READERS)} files (one format)")
    return files


def stream(*args, **kwargs):
    """datasets.load_dataset(..., streaming=True): the one reader of every real corpus, local or hub."""
    try:
        import datasets
    except ImportError:
        raise UserError("real corpora need the datasets package: pip install datasets (or use --data toy)")
    return datasets.load_dataset(*args, streaming=True, **kwargs)


def local_dataset(files):
    kind = next(r for end, r in READERS.items() if files[0].endswith(end))
    return stream(kind, data_files=files, split="train",
                  **(dict(sample_by="paragraph") if kind == "text" else {}))


def hub_dataset(spec, split="train"):
    """A hub dataset "ID[:CONFIG]", streamed by `datasets`: it honours HF_HUB_OFFLINE, HF_ENDPOINT (a mirror),
    HTTPS_PROXY and the local hub cache."""
    name, _, config = spec.partition(":")
    try:
        return stream(name, config or None, split=split)
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"cannot stream hub dataset {spec!r} ({str(e).strip().splitlines()[0]}). Offline, "
                        f"use --data toy (the built-in toy world) or --data PATH (a local download: "
                        f"{', '.join(READERS)} files)")


def texts(ds, field, data):
    for row in ds:
        if field not in row:
            raise UserError(f"--data {data}: no {field!r} field (it has {', '.join(row)}); name the text one "
                            "with --text_field")
        if isinstance(row[field], str) and row[field].strip():
            yield row[field]


def hub_documents(spec, split="train", field="text"):
    """The texts of a hub dataset (Paloma's, for the eval)."""
    return texts(hub_dataset(spec, split), field, spec)


@contextmanager
def cache_lock(folder, what):
    """Hold folder/.lock: one writer per cache folder among the processes of a machine, and of every node that
    shares the filesystem. A flock, which the kernel drops when its holder dies: a killed preparation never
    blocks the next one, which resumes it."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, ".lock"), "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            print(f"waiting for {f.read().strip() or 'another process'} to prepare {what} (it holds "
                  f"{f.name})", flush=True)
            fcntl.flock(f, fcntl.LOCK_EX)
        except OSError as e:
            raise UserError(f"cannot lock {f.name} ({e}): use a --data_dir on a filesystem with file locks")
        f.truncate(0)
        f.write(f"{platform.node()} pid {os.getpid()}")
        f.flush()
        yield


def build_smlmt_index(corpus_dir, args, rank_is_local_zero=True, split="train"):
    """{word id -> occurrence positions in SPLIT.bin}, capped at --smlmt_max_occ per word; cached as .npz.
    Training episodes come from train.bin only; the few-shot eval's from val.bin (its own word counts, and a
    word needs only K+Q occurrences there)."""
    min_count = args.smlmt_min_count if split == "train" else args.k_shot + args.q_query
    prefix = "smlmt" if split == "train" else f"smlmt-{split}"
    path = os.path.join(corpus_dir, f"{prefix}-{args.smlmt_skip_top}-{min_count}-{args.smlmt_max_occ}.npz")
    if not rank_is_local_zero:
        mg.wait_for(path, "the SMLMT index")
    if not os.path.exists(path):
        tokens = mg.read_bin(os.path.join(corpus_dir, f"{split}.bin"))
        chunk = 1 << 24
        # Pass 1: token frequencies (the rule's "most frequent" and "too rare" bounds need corpus counts).
        counts = sum(np.bincount(tokens[i:i + chunk], minlength=1 << 16)
                     for i in range(0, len(tokens), chunk))
        words = mg.content_word_ids(counts, args.smlmt_skip_top, min_count)
        is_word = np.zeros(1 << 16, dtype=bool)  # a lookup table: is_word[token id] -> content word?
        is_word[words] = True
        found = {int(w): [] for w in words}
        have = dict.fromkeys(found, 0)
        lo, hi = mg.SMLMT_MARGIN, len(tokens) - mg.SMLMT_MARGIN
        # Pass 2: positions, in corpus order, up to the cap (web corpora are document-shuffled, so the first
        # 1,000 occurrences are as good a sample as any). Chunked: a 1B-token corpus needs no 1B-entry arrays.
        for start in range(lo, hi, chunk):
            seg = np.asarray(tokens[start:min(start + chunk, hi)])
            pos = np.flatnonzero(is_word[seg])  # offsets of content words in this chunk
            ids = seg[pos]
            order = np.argsort(ids, kind="stable")  # group by word, keeping corpus order within a word
            ids, pos = ids[order], pos[order] + start
            bounds = np.flatnonzero(np.diff(ids)) + 1  # where one word's group ends and the next begins
            for grp_ids, grp_pos in zip(np.split(ids, bounds), np.split(pos, bounds)):
                w = int(grp_ids[0]) if len(grp_ids) else None
                if w is not None and have[w] < args.smlmt_max_occ:
                    take = grp_pos[:args.smlmt_max_occ - have[w]]
                    found[w].append(take)
                    have[w] += len(take)
        keep = [w for w in found if have[w] >= min_count]  # enough occurrences away from the edges
        positions = [np.concatenate(found[w]) for w in keep]
        # The CSR layout sample_episode reads (see mg.SMLMT_MARGIN): one flat array, fast to load.
        offsets = np.cumsum([0] + [len(p) for p in positions])
        mg.write_atomically(path, lambda tmp: np.savez(
            tmp, words=np.array(keep, dtype=np.int64), offsets=offsets,
            positions=np.concatenate(positions) if positions else np.zeros(0, np.int64)))
    z = np.load(path)
    return {"words": z["words"], "offsets": z["offsets"], "positions": z["positions"]}
