"""
Corpus preparation for maml_gpt.py: the documents of a corpus -> train.bin and val.bin in
args.data_dir/<name>/, GPT-2 tokens as uint16 behind a small header, the first time a run names the corpus.
This file owns what it writes, and maml_gpt.py imports it (never the other way): the tokenizer, the token-file
format (write_bin, read_bin), and the SMLMT index of a split, cached beside it. Sources (--data): the offline
toy world (data/toyworld.py); local files (parquet, json[l][.gz], txt) read by `datasets`' own builders; a
hub dataset ID, streamed. Tokenizing is sharded over --prep_procs processes and resumable: a killed
preparation continues where it stopped and writes the same bytes.
"""
import base64
import fcntl
import functools
import glob
import hashlib
import itertools
import json
import lzma
import multiprocessing
import os
import pathlib
import platform
import re
import time
from contextlib import contextmanager

import numpy as np
from tqdm import tqdm

from . import toyworld


class UserError(Exception):
    """A problem the user can fix (bad flag, missing file, corrupt checkpoint): one line, no traceback."""


# ------------------------------------------------------------------------------------------------------------
# Tokenizer: GPT-2 BPE via tiktoken, built offline from the merge ranks shipped here (see data/README.md).

EOT_ID = 50256  # <|endoftext|> separates documents
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


@functools.cache
def get_tokenizer():
    """The tiktoken "gpt2" encoding (50,257 ids), built from data/gpt2.tiktoken.xz with no download."""
    import tiktoken
    with lzma.open(os.path.join(os.path.dirname(__file__), "gpt2.tiktoken.xz"), "rb") as f:
        ranks = {base64.b64decode(tok): int(rank)
                 for tok, rank in (line.split() for line in f if line.strip())}
    return tiktoken.Encoding("gpt2", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": EOT_ID})


# ------------------------------------------------------------------------------------------------------------
# Token files: a 1 KiB header (magic, version, token count; the rest zero), then the tokens as uint16, which
# holds every GPT-2 id (< 65,536) in half the bytes of int32. The header makes a truncated or foreign file
# detectable before a run silently trains on garbage.

BIN_MAGIC, BIN_VERSION, HEADER_INTS = 20250802, 1, 256


def write_atomically(path, write):
    """write(tmp) to a temporary name beside `path`, then rename it to `path`: a crash mid-write leaves the
    previous file (or none), never a half-written one. The temporary keeps the suffix (np.savez appends .npz
    otherwise) and names the machine and the process, so no two writers share one."""
    stem, ext = os.path.splitext(path)
    tmp = f"{stem}.tmp-{platform.node()}-{os.getpid()}{ext}"
    write(tmp)
    os.replace(tmp, path)


def write_text(path, text):
    pathlib.Path(path).write_text(text, encoding="utf-8")


def wait_for(path, what):
    """Block until another process (this machine's local rank 0, or a writer on another node) has written
    `path`. No collective: a long download or tokenization cannot hit a distributed timeout."""
    if not os.path.exists(path):
        print(f"waiting for {what} ({path}), written by another process", flush=True)
    while not os.path.exists(path):
        time.sleep(2)


def bin_header(n):
    return np.array([BIN_MAGIC, BIN_VERSION, n] + [0] * (HEADER_INTS - 3), dtype=np.int32).tobytes()


def write_bin(path, tokens):
    data = bin_header(len(tokens)) + np.asarray(tokens, dtype=np.uint16).tobytes()
    write_atomically(path, lambda tmp: pathlib.Path(tmp).write_bytes(data))


def read_bin(path):
    """The token array of a prepared split, memmapped (read-only). Validates the header and the file size."""
    try:
        header = np.fromfile(path, dtype=np.int32, count=HEADER_INTS)
    except OSError as e:
        raise UserError(f"cannot read {path}: {e}")
    if len(header) < HEADER_INTS or header[0] != BIN_MAGIC or header[1] != BIN_VERSION \
            or os.path.getsize(path) != HEADER_INTS * 4 + 2 * int(header[2]):
        raise UserError(f"{path} is not a valid token file (wrong header or size); "
                        "delete its folder to re-prepare")
    # A memmap reads only the pages a batch touches: a 1B-token corpus costs no RAM until used.
    return np.memmap(path, dtype=np.uint16, mode="r", offset=HEADER_INTS * 4, shape=(int(header[2]),))


# ------------------------------------------------------------------------------------------------------------
# The corpus: its cache folder's name, its documents, their tokens in train.bin and val.bin.

VAL_EVERY = 50  # every 50th document goes to the held-out split (doc-level: no window straddles the split)
SHARD_DOCS = 2048  # documents per shard: the unit of work of a process, and all a kill can lose


def corpus_name(args):
    """The cache folder's name, from what its content depends on (change any, and it is prepared again): the
    toy size; local files (path, size, mtime), text field and token budget; a hub ID, its field and budget."""
    data, field = args.data, "" if args.text_field == "text" else f"-{args.text_field}"
    if data == "toy":
        return f"toy-{args.toy_docs}"
    if is_local(data):
        h = hashlib.sha1("|".join(f"{os.path.abspath(f)}|{os.path.getsize(f)}|{os.path.getmtime(f)}"
                                  for f in local_files(data)[0]).encode() + field.encode()).hexdigest()[:8]
        base = re.sub(r"[^\w.-]", "_", os.path.basename(os.path.normpath(data)))  # a glob's * is no name
        return f"local-{base}-{h}-{args.max_tokens}"
    if re.fullmatch(r"[\w.-]+/[\w.-]+(:[\w.-]+)?", data):
        return "hub-" + data.replace("/", "_").replace(":", "_") + f"-{args.max_tokens}{field}"
    raise UserError(f"--data {data!r}: no such file or folder (and not a hub ID like org/name). "
                    "Use --data toy, a local path, or a hub dataset ID")


def prepare_corpus(args, rank_is_local_zero=True):
    """-> args.data_dir/<name>/: the corpus, tokenized into train.bin and val.bin the first time a run names
    it, by one process (the first local rank 0 to take its lock, on any node); the others wait for it."""
    name = corpus_name(args)
    out = os.path.join(args.data_dir, name)
    done = os.path.join(out, "val.bin")
    if not rank_is_local_zero:
        wait_for(done, f"the prepared corpus {name}")
    elif not os.path.exists(done):
        with cache_lock(out, f"the corpus {name}"):
            if not os.path.exists(done):  # it may have been prepared while we waited
                print(f"preparing the corpus {name} in {out}", flush=True)
                tokenize_documents(args, out, name)
    need = args.seq_len + 2  # at least one window (seq_len inputs + 1 target) and room to draw its start
    for split in ("train", "val"):
        if len(read_bin(os.path.join(out, f"{split}.bin"))) < need:
            raise UserError(f"--data {args.data}: the {split} split has fewer than {need} tokens; the "
                            f"corpus is empty or too small (every {VAL_EVERY}th document is held out for "
                            "validation)")
    return out


def tokenize_documents(args, out, desc):
    """Tokenize the corpus into out/{train,val}.bin, streaming: SHARD_DOCS documents at a time (by
    --prep_procs processes), appended to out/{train,val}.partial in corpus order and committed to
    out/progress.json (documents read, the stream's position, tokens written). A killed run resumes from the
    last commit, the partial files cut back to it, and writes the same bytes as an uninterrupted one."""
    max_tokens, head = args.max_tokens if args.data != "toy" else 1 << 62, HEADER_INTS * 4
    parts = {s: os.path.join(out, f"{s}.partial") for s in ("train", "val")}
    prog_path = os.path.join(out, "progress.json")
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
    pending = []  # (tokens or their AsyncResult, the commit after them), in corpus order
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
            job, mark = pending.pop(0)
            for (s, f), toks in zip(files.items(), job.get() if pool else job):
                f.write(toks.tobytes())
                f.flush()
                os.fsync(f.fileno())  # on disk before the commit that counts it
                prog[s] += len(toks)
                bar.update(len(toks))
            prog.update(mark)
            write_atomically(prog_path, lambda tmp: write_text(tmp, json.dumps(prog)))
    finally:
        bar.close()
        if pool:
            pool.terminate()
    for s, f in files.items():  # the shards read ahead of the last commit are dropped
        n = min(prog[s], max_tokens) if s == "train" else prog[s]
        f.truncate(head + 2 * n)
        f.seek(0)
        f.write(bin_header(n))
        f.close()
    for s in files:  # val.bin last: it marks the corpus complete
        os.replace(parts[s], os.path.join(out, f"{s}.bin"))
    os.remove(prog_path)


def encode_shard(texts, first):
    """Documents first, first + 1, ... -> (train, val) uint16 token arrays, each document followed by
    <|endoftext|>. Depends on nothing else, so any number of processes writes the same files."""
    enc, split = get_tokenizer(), {"train": [], "val": []}
    for n, text in enumerate(texts, first):  # "ordinary": text that looks like <|endoftext|> stays text
        split["val" if n % VAL_EVERY == 0 else "train"].append(enc.encode_ordinary(text) + [EOT_ID])
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
        return itertools.islice(toyworld.documents(seed=1337, n_docs=args.toy_docs), start, None), None
    if is_local(args.data):
        files, kind = local_files(args.data)
        ds = stream(kind, data_files=files, split="train",
                    **(dict(sample_by="paragraph") if kind == "text" else {}))
    else:
        ds = hub_dataset(args.data)
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
    """--data PATH: a file, a folder (searched recursively) or a glob -> (its corpus files, sorted; their
    `datasets` builder)."""
    reader = lambda f: next((r for end, r in READERS.items() if f.endswith(end)), None)  # noqa: E731
    files = sorted(glob.glob(data, recursive=True) if not os.path.exists(data)
                   else [os.path.join(r, f) for r, _, fs in os.walk(data) for f in fs if reader(f)]
                   if os.path.isdir(data) else [data])
    kinds = {reader(f) for f in files}
    if not files or None in kinds or len(kinds) > 1:
        what = ("no files" if not files else "mixes formats" if None not in kinds else
                f"{next(f for f in files if not reader(f))} has no reader")
        raise UserError(f"--data {data}: {what}; maml-gpt reads {', '.join(READERS)} files (one format)")
    return files, kinds.pop()


def stream(*args, **kwargs):
    """datasets.load_dataset(..., streaming=True): the one reader of every real corpus, local or hub."""
    try:
        import datasets
    except ImportError:
        raise UserError("real corpora need the datasets package: pip install datasets (or use --data toy)")
    return datasets.load_dataset(*args, streaming=True, **kwargs)


def hub_dataset(spec, split="train"):
    """A hub dataset "ID[:CONFIG]", streamed by `datasets`: it honours HF_HUB_OFFLINE, HF_ENDPOINT (a mirror),
    HTTPS_PROXY and the local hub cache."""
    name, _, config = spec.partition(":")
    try:
        return stream(name, config or None, split=split)
    except UserError:
        raise
    except Exception as e:
        why = (str(e).strip() or repr(e)).splitlines()[0]
        raise UserError(f"cannot stream hub dataset {spec!r} ({why}). Offline, use --data toy (the built-in "
                        f"toy world) or --data PATH (a local download: {', '.join(READERS)} files)")


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


# ------------------------------------------------------------------------------------------------------------
# The SMLMT index: where each content word of a split occurs, in the flat CSR layout maml_gpt.sample_episode
# reads. Word i is the token words[i]; its positions are positions[offsets[i]:offsets[i + 1]], each
# SMLMT_MARGIN tokens or more from either end of the split, so any episode window up to that size fits.

SMLMT_MARGIN = 256


def content_word_ids(counts, skip_top, min_count):
    """The words SMLMT may mask: GPT-2 tokens that are whole words (a leading space and >= 3 ASCII letters),
    not among the corpus's `skip_top` most frequent tokens (function words), and seen >= `min_count` times.
    counts (65536,) corpus token counts -> (n_words,) int64 token ids."""
    enc = get_tokenizer()
    frequent = set(np.argsort(-counts)[:skip_top].tolist())
    return np.array([i for i in np.flatnonzero(counts >= min_count)
                     if i < EOT_ID and i not in frequent
                     and re.fullmatch(rb" [A-Za-z]{3,}", enc.decode_single_token_bytes(int(i)))],
                    dtype=np.int64)


def build_smlmt_index(corpus_dir, args, rank_is_local_zero=True, split="train"):
    """The SMLMT index of SPLIT.bin (the CSR layout above), at most --smlmt_max_occ positions per word,
    cached as .npz. Training episodes come from train.bin only; the few-shot eval's from val.bin (its own word
    counts, and a word needs only K+Q occurrences there)."""
    min_count = args.smlmt_min_count if split == "train" else args.k_shot + args.q_query
    prefix = "smlmt" if split == "train" else f"smlmt-{split}"
    path = os.path.join(corpus_dir, f"{prefix}-{args.smlmt_skip_top}-{min_count}-{args.smlmt_max_occ}.npz")
    if not rank_is_local_zero:
        wait_for(path, "the SMLMT index")
    if not os.path.exists(path):
        tokens = read_bin(os.path.join(corpus_dir, f"{split}.bin"))
        chunk = 1 << 24
        # Pass 1: token frequencies (the rule's "most frequent" and "too rare" bounds need corpus counts).
        counts = sum(np.bincount(tokens[i:i + chunk], minlength=1 << 16)
                     for i in range(0, len(tokens), chunk))
        words = content_word_ids(counts, args.smlmt_skip_top, min_count)
        is_word = np.zeros(1 << 16, dtype=bool)  # a lookup table: is_word[token id] -> content word?
        is_word[words] = True
        have = np.zeros(1 << 16, dtype=np.int64)  # positions kept so far, per token id
        ids, pos = [np.zeros(0, np.uint16)], [np.zeros(0, np.int64)]
        lo, hi = SMLMT_MARGIN, len(tokens) - SMLMT_MARGIN
        # Pass 2: positions, in corpus order, up to the cap (web corpora are document-shuffled, so the first
        # 1,000 occurrences are as good a sample as any). Chunked: a 1B-token corpus needs no 1B-entry arrays.
        for start in range(lo, hi, chunk):
            seg = np.asarray(tokens[start:min(start + chunk, hi)])
            at = np.flatnonzero(is_word[seg])  # offsets of content words in this chunk
            order = np.argsort(seg[at], kind="stable")  # group by word, keeping corpus order within a word
            w, at = seg[at][order], at[order] + start
            nth = have[w] + np.arange(len(w)) - np.searchsorted(w, w)  # the how-many-th of its word each is
            ids.append(w[nth < args.smlmt_max_occ])
            pos.append(at[nth < args.smlmt_max_occ])
            have += np.bincount(ids[-1], minlength=1 << 16)
        ids, pos = np.concatenate(ids), np.concatenate(pos)
        order = np.argsort(ids, kind="stable")  # word by word, each word's positions in corpus order
        keep = words[have[words] >= min_count]  # enough occurrences away from the edges
        write_atomically(path, lambda tmp: np.savez(tmp, words=keep, offsets=np.cumsum(np.r_[0, have[keep]]),
                                                    positions=pos[order][(have >= min_count)[ids[order]]]))
    return dict(np.load(path))
