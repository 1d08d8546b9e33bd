"""Two measurements of LAB.md's answer key that are not a training run (teacher-only: not in hand-outs).

  python tests/answer_key.py query_bug [--episodes 200] [--seeds 1337 1 2]   # exercise 1
  python tests/answer_key.py entropy RUN [RUN ...]                           # exercise 8, per layer
"""
import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import maml_gpt as mg  # noqa: E402
from data import prepare  # noqa: E402


def query_bug(args):
    """The reference's query labels on the demo corpus: a query is any indexed content-word occurrence (not
    only one of the episode's N words), labelled with its class if it is one of them, else clamped to class 0.
    Always answering 0 then scores the share of queries labelled 0."""
    run = mg.parse_args(["--data_dir", args.data_dir])  # the demo's corpus and SMLMT settings
    corpus = prepare.prepare_corpus(run)
    index = prepare.build_smlmt_index(corpus, run)
    tokens = prepare.read_bin(os.path.join(corpus, "train.bin"))
    total = int(index["offsets"][-1])
    print(f"{len(index['words'])} content words, {total:,} indexed occurrences; N = {run.n_way}, "
          f"Q = {run.q_query}; chance 1/N = {1 / run.n_way:.3f}")
    for seed in args.seeds:
        acc = []
        for j in range(args.episodes):
            ep = mg.sample_episode(tokens, index, run.n_way, run.k_shot, run.q_query, 16, [seed, j, 0, 0])
            occ = np.random.default_rng([seed, j, 99]).integers(0, total, size=run.n_way * run.q_query)
            words = index["words"][np.searchsorted(index["offsets"], occ, side="right") - 1]
            label = {int(w): c for c, w in enumerate(ep["classes"])}
            acc.append(np.mean([label.get(int(w), 0) == 0 for w in words]))
        print(f"seed {seed}: always answering 0 scores {np.mean(acc):.3f} (per episode {min(acc):.3f}-"
              f"{max(acc):.3f}) over {args.episodes} episodes")


def entropy(args):
    """Mean attention entropy per layer over a run's probes, and the first probe at which each layer is 0.05
    nats below step 0 (its heads have sharpened)."""
    for run in args.runs:
        probes = [(r["step"], np.mean(r["attn_entropy"], axis=1))
                  for r in map(json.loads, open(os.path.join(run, "metrics.jsonl"))) if "attn_entropy" in r]
        if not probes:
            print(f"{run}: no attn_entropy (train with --dynamics_every N)")
            continue
        first = probes[0][1]
        for layer in range(len(first)):
            drop = next((s for s, e in probes if first[layer] - e[layer] >= 0.05), None)
            print(f"{run} layer {layer}: {first[layer]:.3f} -> {probes[-1][1][layer]:.3f} nats "
                  f"(step {probes[-1][0]}); 0.05 below step 0 first at step "
                  f"{drop if drop is not None else '-'}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    q = sub.add_parser("query_bug",
                       help="exercise 1: accuracy of always answering 0 under the reference's bug")
    q.add_argument("--episodes", type=int, default=200)
    q.add_argument("--seeds", type=int, nargs="+", default=[1337, 1, 2])
    q.add_argument("--data_dir", default=os.path.join(mg.HERE, "data", "cache"))
    e = sub.add_parser("entropy", help="exercise 8: which layers' heads sharpen first")
    e.add_argument("runs", nargs="+", help="run folders (trained with --dynamics_every)")
    args = p.parse_args(argv)
    (query_bug if args.cmd == "query_bug" else entropy)(args)


if __name__ == "__main__":
    main()
