"""The training loop: checkpoints, exact resume, DDP == gradient accumulation, user errors."""
import argparse
import json
import os
import re
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch

import maml_gpt as mg
from conftest import run_cli as run
from data import prepare, toyworld


def load(out_dir):
    return torch.load(os.path.join(out_dir, "ckpt.pt"), weights_only=True)


def metrics(out_dir):
    return [json.loads(line) for line in open(os.path.join(out_dir, "metrics.jsonl"))]


def assert_same_weights(a, b):
    for part in ("model", "head"):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), f"{part}.{k} differs"


def test_checkpoint_round_trip_and_logged_keys(trained_run):
    out = trained_run[0]  # --max_steps 4 --dynamics_every 2 --eval_every 2; seed 1337: meta, meta, AR, AR
    ck = load(out)  # weights_only=True: plain containers and tensors only
    assert (ck["step"] == 4 and ck["model_config"]["d_model"] == 24
            and "exp_avg" in str(ck["optimizer"]["state"]))
    model = mg.model_from_checkpoint(ck)
    assert all(torch.equal(v, ck["model"][k]) for k, v in model.state_dict().items())
    rows = metrics(out)
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4]  # step 0: dynamics at initialisation
    rows = rows[1:]
    assert sum(r["n_meta_steps"] + r["n_ar_steps"] for r in rows) == 4
    assert rows[-1]["tokens"] == rows[-1]["tokens_ar"] + rows[-1]["tokens_meta"]
    meta_rows = [r for r in rows if r["n_meta_steps"]]
    ar_rows = [r for r in rows if r["n_ar_steps"]]
    assert meta_rows and ar_rows
    assert all("loss_query" in r and "loss_ar" not in r and "acc_query_post" in r for r in meta_rows)
    assert all("loss_ar" in r and "loss_query" not in r for r in ar_rows)
    assert ("eval_ppl" in rows[1] and "per_grad/layers.1.swiglu.w_2" in rows[1]
            and "ref/per_grad_attn" in rows[1])
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert cfg["versions"]["torch"] == torch.__version__ and cfg["args"]["max_steps"] == 4


def test_loss_mixed_is_the_micro_step_mean_of_both_branches(small_args, tmp_path):
    """loss_mixed (pico-maml's train/loss) == the branch means weighted by their micro-step counts."""
    out = str(tmp_path / "run")
    # seed 1337 draws meta, meta, AR, AR: a window of steps 0-2 mixes the branches, step 3 is AR alone
    assert run(small_args + ["--max_steps", "4", "--log_every", "3", "--grad_accum", "2"]) == 0
    rows = metrics(out)
    assert [r["n_meta_steps"] + r["n_ar_steps"] for r in rows] == [3, 1]
    both = [r for r in rows if r["n_meta_steps"] and r["n_ar_steps"]]
    assert both  # windows that mix the two branches: the case that matters
    for r in rows:
        n_ar, n_meta = r["n_ar_steps"], r["n_meta_steps"]
        expected = (n_ar * r.get("loss_ar", 0.0) + n_meta * r.get("loss_query", 0.0)) / (n_ar + n_meta)
        assert r["loss_mixed"] == pytest.approx(expected, rel=1e-9)
    assert any(r["loss_mixed"] < r["loss_ar"] for r in both)  # the query CE (log 8 at chance) pulls it down


def test_resume_is_exact(small_args, tmp_path):
    full = str(tmp_path / "full")
    base = [a for a in small_args]
    base[base.index("--out_dir") + 1] = full
    # seed 1337 draws meta, meta, AR, AR, meta: both branches before the stop at step 3 and after it
    assert run(base + ["--max_steps", "5"]) == 0
    assert run(small_args + ["--max_steps", "3"]) == 0
    assert run(small_args + ["--max_steps", "5", "--resume"]) == 0
    part = str(tmp_path / "run")
    assert_same_weights(load(full), load(part))
    assert load(full)["optimizer"]["state"][0]["exp_avg"].equal(
        load(part)["optimizer"]["state"][0]["exp_avg"])
    assert metrics(full) == [{**r, "sec": metrics(full)[i]["sec"]} for i, r in enumerate(metrics(part))]


def test_vanilla_twin_sees_the_same_ar_batches(small_args, tmp_path, monkeypatch):
    """--hybrid_ratio 0 takes an AR step at every step, with the batch the hybrid run uses at that step: the
    inputs both runs actually feed the model, recorded at ar_micro_step."""
    seen = []  # (run, step, x) for every AR micro-step

    def branch(args, step, r):
        seen.append((args.hybrid_ratio, step, None))
        return choose_branch(args, step, r)

    def ar(model, x, y, scale, amp):
        seen.append((seen[-1][0], seen[-1][1], x.clone()))
        return ar_micro_step(model, x, y, scale, amp)

    choose_branch, ar_micro_step = mg.choose_branch, mg.ar_micro_step
    monkeypatch.setattr(mg, "choose_branch", branch)
    monkeypatch.setattr(mg, "ar_micro_step", ar)
    for ratio, out in (("0.5", "hybrid"), ("0", "vanilla")):
        argv = small_args + ["--max_steps", "4", "--hybrid_ratio", ratio, "--out_dir", str(tmp_path / out)]
        assert run(argv) == 0
    x = {(ratio, step): x for ratio, step, x in seen if x is not None}
    hybrid_ar = [step for ratio, step in x if ratio == 0.5]
    assert sorted(step for ratio, step in x if ratio == 0) == list(range(4))  # vanilla: AR at every step
    # AR after a meta step
    assert 0 < len(hybrid_ar) < 4 and max(hybrid_ar) > min(set(range(4)) - set(hybrid_ar))
    assert all(torch.equal(x[0.5, step], x[0.0, step]) for step in hybrid_ar)
    assert not torch.equal(x[0.0, 0], x[0.0, 1])  # and the batches do change from step to step
    assert all(r["n_ar_steps"] == 1 and "loss_query" not in r for r in metrics(str(tmp_path / "vanilla")))


def test_fewshot_eval_is_identical_across_seeds_and_resumes(small_args, tmp_path):
    """The held-out few-shot eval scores fixed tasks with a fixed fresh head: runs with different --seed see
    the same episodes, the eval of one backbone does not depend on the global RNG (nor changes it), and a
    resumed run logs exactly what an uninterrupted one does."""
    a, b = (mg.parse_args(small_args + ["--seed", s, "--eval_every", "2"]) for s in ("1", "2"))
    corpus = mg.prepare_corpus(a)
    ea, eb = (mg.fewshot_episodes(x, corpus, "cpu", True) for x in (a, b))
    assert len(ea) == a.fewshot_episodes == 8
    assert all(torch.equal(x[k], y[k]) for x, y in zip(ea, eb) for k in x)
    val = np.asarray(mg.read_bin(os.path.join(corpus, "val.bin"))).astype(np.int64)
    x = ea[0]["support_x"][0].numpy()  # the held-out split holds the window verbatim, up to the [MASK]
    windows = np.lib.stride_tricks.sliding_window_view(val, len(x) - 1)
    assert (windows == x[:-1]).all(1).any() and x[-1] == mg.MASK_ID
    torch.manual_seed(0)
    model = mg.Decoder(mg.ModelConfig(d_model=24, n_layers=2, max_seq_len=32))
    torch.manual_seed(1)
    r1 = mg.fewshot_eval(model, a, ea, mg.nullcontext())
    torch.manual_seed(2)
    state = torch.get_rng_state()
    r2 = mg.fewshot_eval(model, b, eb, mg.nullcontext())
    assert r1 == r2 and torch.equal(state, torch.get_rng_state())
    assert set(r1) == {"eval_fewshot_acc_pre", "eval_fewshot_acc", "eval_fewshot_loss_support_pre",
                       "eval_fewshot_loss_support_post", "eval_proto_acc_mask", "eval_proto_acc_prev"}
    assert all(0.0 <= v <= 1.0 for k, v in r1.items() if "_acc" in k)
    assert r1["eval_fewshot_loss_support_post"] < r1["eval_fewshot_loss_support_pre"]
    # resume: eval rows of an interrupted run equal the uninterrupted run's (2 episodes suffice for that)
    full = str(tmp_path / "full")
    evals = ["--eval_every", "2", "--fewshot_episodes", "2"]
    argv = [x for x in small_args] + evals
    argv[argv.index("--out_dir") + 1] = full
    assert run(argv + ["--max_steps", "4"]) == 0
    assert run(small_args + evals + ["--max_steps", "2"]) == 0
    assert run(small_args + evals + ["--max_steps", "4", "--resume"]) == 0
    keys = ("step", "eval_fewshot_acc", "eval_fewshot_acc_pre", "eval_proto_acc_mask", "eval_proto_acc_prev")
    got = [[r.get(k) for k in keys] for r in metrics(str(tmp_path / "run")) if "eval_fewshot_acc" in r]
    assert (got == [[r.get(k) for k in keys] for r in metrics(full) if "eval_fewshot_acc" in r]
            and len(got) == 2)


def test_the_inner_loop_fits_the_support_set(small_args, tmp_path):
    """The default inner loop (--inner_loop layerwise) lowers the support loss in every meta window and does
    not cost support accuracy, from the first step of a run. A d = 96 backbone as in the demo (a d = 24 one
    gives nearly uniform prototype logits, where any first step trades accuracy for loss) and a 16-way
    episode, with the prototypes' step halved from the 32-way default: it expands them by ~1 + 2 lr / N."""
    argv = small_args + ["--d_model", "96", "--n_way", "16", "--k_shot", "4", "--inner_steps", "10",
                         "--inner_lr_out", "5", "--max_steps", "3", "--hybrid_ratio", "1"]
    assert run(argv) == 0
    rows = metrics(str(tmp_path / "run"))
    assert len(rows) == 3
    for r in rows:
        assert r["loss_support_post"] < r["loss_support_pre"] - 0.1, r
        assert r["acc_support_post"] >= r["acc_support_pre"], r
    # the paper's plain SGD logs the same keys (and at the released lr it lowers the support loss much less)
    sgd = argv + ["--inner_loop", "sgd", "--inner_lr", "0.01", "--max_steps", "2"]
    sgd[sgd.index("--out_dir") + 1] = str(tmp_path / "sgd")
    assert run(sgd) == 0
    for r, lw in zip(metrics(str(tmp_path / "sgd")), rows):
        gain, lw_gain = (x["loss_support_pre"] - x["loss_support_post"] for x in (r, lw))
        assert gain < lw_gain


def launch(*runs):
    """Run maml_gpt.py once per (argv, nproc), all at once, each in fresh processes (torchrun when nproc > 1),
    one thread each so that every run uses the same kernels and reduction orders."""
    procs = []
    for argv, nproc in runs:
        launcher = (["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1
                    else [])
        cmd = [sys.executable] + launcher + [os.path.join(mg.HERE, "maml_gpt.py")] + argv
        procs.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                      env=dict(os.environ, OMP_NUM_THREADS="1")))
    for p in procs:
        err = p.communicate(timeout=300)[1]
        assert p.returncode == 0, err[-3000:]


def test_ddp_two_processes_equal_one_process_with_grad_accum(small_args, tmp_path):
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    argv = [a for a in small_args]
    i = argv.index("--out_dir")
    # seed 1337 draws meta, meta, AR, AR: both branches
    common = argv[:i] + argv[i + 2:] + ["--max_steps", "4", "--device", "cpu", "--hybrid_ratio", "0.5",
                                        "--head_dropout", "0.1", "--dynamics_every", "2"]
    launch((common + ["--out_dir", one, "--grad_accum", "2"], 1),
           (common + ["--out_dir", two, "--grad_accum", "1"], 2))
    a, b = load(one), load(two)
    assert_same_weights(a, b)  # bitwise: the all-reduced sum of two halves is the accumulated sum
    ma, mb = metrics(one), metrics(two)
    assert [r.get("n_meta_steps") for r in ma] == [r.get("n_meta_steps") for r in mb]  # same branches
    assert 0 < sum(r.get("n_meta_steps", 0) for r in ma) < 4
    for ra, rb in zip(ma, mb):
        for k in ("loss_ar", "loss_query", "acc_query_post", "tokens"):
            assert (k in ra) == (k in rb) and (k not in ra or abs(ra[k] - rb[k]) < 1e-5)
        # the probe, its spectra shared over the 2 ranks, gives what 1 process computes alone
        probe = [{k: v for k, v in r.items() if k.startswith(("per_", "er_", "ref/"))} for r in (ra, rb)]
        assert probe[0] == probe[1]
    assert sum(1 for r in ma if "per_grad/layers.1.swiglu.w_2" in r) == 3  # steps 0, 2 and 4


def test_two_nodes_on_one_shared_cache_both_train_and_one_prepares(small_args, tmp_path):
    """Two torchrun "nodes" (one process each) on one machine, one --data_dir for both, as on a shared
    filesystem: each node's local rank 0 reaches the empty cache, exactly one of them prepares it."""
    argv = [a for a in small_args]
    argv[argv.index("--data_dir") + 1] = str(tmp_path / "shared")
    argv += ["--max_steps", "2", "--device", "cpu"]
    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    node = lambda r: [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2",  # noqa: E731
                      "--node_rank", str(r), "--master_addr", "127.0.0.1", "--master_port", str(port),
                      "--nproc_per_node", "1", os.path.join(mg.HERE, "maml_gpt.py")] + argv
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = [subprocess.Popen(node(r), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
             for r in (0, 1)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][-2000:] + outs[1][-2000:]
    assert sum("preparing the corpus toy-2000" in o for o in outs) == 1, outs
    out = argv[argv.index("--out_dir") + 1]
    assert load(out)["step"] == 2 and json.load(open(os.path.join(out, "config.json")))["world_size"] == 2


def test_local_parquet_and_json_gz_corpora_train(small_args, tmp_path):
    """--data a parquet folder (--text_field content) and a .json.gz train; config.json reports the corpus
    and the batch the run trained: --global_batch 8 of --batch_size 2 on one process is 4 micro-steps."""
    from test_data import write_corpora
    docs = list(toyworld.documents(seed=3, n_docs=120))
    corpora = write_corpora(tmp_path, docs)
    for data in (tmp_path / "pq", tmp_path / "dolma.json.gz"):
        out = str(tmp_path / data.name.replace(".", "_"))
        assert run(small_args + ["--data", str(data), *corpora[data], "--out_dir", out, "--max_steps", "2",
                                 "--hybrid_ratio", "0", "--global_batch", "8", "--batch_size", "2"]) == 0
        cfg = json.load(open(os.path.join(out, "config.json")))
        assert os.path.basename(cfg["corpus"]).startswith(f"local-{data.name}-")
        assert (cfg["args"]["grad_accum"], cfg["args"]["global_batch"]) == (4, 8)
        assert metrics(out)[-1]["tokens"] == 2 * 8 * 32
        train = mg.read_bin(os.path.join(cfg["corpus"], "train.bin"))
        # the documents' tokens, not the file's
        assert np.array_equal(train, prepare.encode_shard(docs, 0)[0])


def test_global_batch_sets_the_accumulation_or_says_what_would_divide(small_args, capsys):
    accum = lambda argv, world=1: mg.grad_accum_for(mg.parse_args(argv), world)  # noqa: E731
    assert accum([]) == 1 and mg.parse_args([]).global_batch is None  # the demo: 1 micro-step, no target
    assert accum(["--global_batch", "64", "--batch_size", "2"]) == 32  # explicit: beats the demo's 1
    assert accum(["--global_batch", "64", "--batch_size", "2"], world=4) == 8
    assert accum(["--size", "tiny"], world=4) == 4 and accum(["--size", "large"], world=4) == 8
    assert accum(["--size", "small", "--grad_accum", "2"], world=4) == 2  # explicit: beats the preset's 256
    assert accum(["--global_batch", "8", "--grad_accum", "4", "--batch_size", "2"]) == 4  # both, agreeing
    errors = {("--size", "small"): (3, "--global_batch 256 is not a multiple of --batch_size 8 x 3 processes "
                                       "= 24: use --global_batch 240 or another --batch_size"),
              ("--global_batch", "100"): (1, "--global_batch 100 is not a multiple of --batch_size 16 x "
                                             "1 process = 16: use --global_batch 96 or another --batch_size"),
              ("--global_batch", "8"): (1, "use --global_batch 16 or another --batch_size"),
              ("--global_batch", "64", "--grad_accum", "4", "--batch_size", "2"):
                  (1, "--global_batch 64 with --batch_size 2 x 1 process = 2 means --grad_accum 32, not 4: "
                      "give one of the two")}
    for argv, (world, message) in errors.items():
        with pytest.raises(mg.UserError) as e:
            accum(list(argv), world)
        assert message in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(mg.UserError, match="--global_batch must be >= 1"):
        mg.parse_args(["--global_batch", "0"])
    assert run(small_args + ["--global_batch", "6"]) == 1  # from the command line: one line, no traceback
    err = capsys.readouterr().err
    assert err.startswith("error: --global_batch 6 is not a multiple of --batch_size 4")
    assert "Traceback" not in err


# ------------------------------------------------------------------------------------------------------------
# Errors a user can cause: one clear message, no traceback, non-zero exit, the checkpoint kept.

def test_bad_size_is_rejected(capsys):
    assert run(["--size", "huge"]) == 2
    assert "invalid choice: 'huge'" in capsys.readouterr().err


def test_missing_data_path(small_args, capsys, tmp_path):
    assert run(small_args + ["--data", str(tmp_path / "nope.txt")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error:") and "no such file" in err and "Traceback" not in err


def test_unwritable_out_dir(small_args, capsys, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert run(small_args + ["--out_dir", str(blocker / "sub")]) == 1
    assert "cannot write to --out_dir" in capsys.readouterr().err


def test_corrupt_or_mismatched_checkpoint(small_args, capsys, tmp_path):
    out = tmp_path / "run"
    assert run(small_args + ["--resume", "--max_steps", "2"]) == 1
    assert "no checkpoint" in capsys.readouterr().err
    assert run(small_args + ["--max_steps", "2"]) == 0
    assert run(small_args + ["--max_steps", "4", "--resume", "--seed", "7"]) == 1
    assert "different settings (seed)" in capsys.readouterr().err
    assert run(small_args + ["--max_steps", "4", "--resume", "--d_model", "48"]) == 1
    assert "different settings" in capsys.readouterr().err
    good = (out / "ckpt.pt").read_bytes()
    (out / "ckpt.pt").write_bytes(good[: len(good) // 2])
    assert run(small_args + ["--max_steps", "4", "--resume"]) == 1
    assert "corrupt" in capsys.readouterr().err
    assert (out / "ckpt.pt").read_bytes() == good[: len(good) // 2]  # never overwritten by the failed run


def test_non_finite_loss_keeps_the_last_good_checkpoint(small_args, capsys, tmp_path):
    out = tmp_path / "run"
    assert run(small_args + ["--max_steps", "2", "--hybrid_ratio", "0"]) == 0
    good = (out / "ckpt.pt").read_bytes()
    assert run(small_args + ["--max_steps", "8", "--hybrid_ratio", "0", "--resume", "--lr", "1e30",
                             "--save_every", "100"]) == 1
    err = capsys.readouterr().err
    assert "non-finite" in err and "Traceback" not in err
    assert (out / "ckpt.pt").read_bytes() == good


def test_paloma_eval_falls_back_to_held_out_split_offline(small_args, tmp_path, capsys):
    assert run(small_args + ["--max_steps", "2", "--eval_every", "2", "--eval_data", "paloma"]) == 0
    assert "Paloma is unavailable" in capsys.readouterr().out
    assert json.load(open(tmp_path / "run" / "config.json"))["eval_source"] == "val"
    assert "eval_ppl" in metrics(str(tmp_path / "run"))[-1]


def test_bench_prints_costs_and_says_when_mfu_is_unknown(small_args, capsys):
    import bench
    assert run(small_args, bench.main) == 0
    out = capsys.readouterr().out
    assert "AR micro-step" in out and "meta / AR cost per backbone token" in out
    assert "MFU: unknown" in out and "peak memory" in out and "% of training time" in out
    assert not os.path.exists(small_args[small_args.index("--out_dir") + 1])  # a benchmark writes no run


# ------------------------------------------------------------------------------------ presets, lr, all-reduce

def test_presets_are_the_parser_defaults_and_explicit_flags_win(capsys):
    demo, tiny, small = (mg.parse_args([]), mg.parse_args(["--size", "tiny"]),
                         mg.parse_args(["--size", "small"]))
    assert ((demo.d_model, demo.batch_size, demo.seq_len, demo.grad_accum, demo.out_dir)
            == (96, 16, 128, 1, os.path.join("out", "demo")))
    assert ((tiny.d_model, tiny.batch_size, tiny.seq_len, tiny.global_batch, tiny.lr)
            == (96, 16, 512, 256, 3e-4))
    assert ((small.d_model, small.batch_size, small.grad_accum, small.out_dir)
            == (384, 8, None, os.path.join("out", "small")))
    mine = mg.parse_args(["--size", "small", "--batch_size", "4", "--lr", "1e-3", "--d_model", "48",
                          "--out_dir", "x", "--seq_len", "64"])
    assert (mine.batch_size, mine.lr, mine.d_model, mine.out_dir, mine.seq_len) == (4, 1e-3, 48, "x", 64)
    assert mine.max_steps == 6000 and mine.warmup_steps == 2500  # what was not given stays the preset's
    assert mg.parse_args(["--batch_size", "4", "--size=medium"]).batch_size == 4  # flag order does not matter
    with pytest.raises(SystemExit):  # --help shows the chosen size's values
        mg.parse_args(["--size", "medium", "--help"])
    help_text = " ".join(capsys.readouterr().out.split()).replace(os.sep, "/")
    for flag, value in (("d_model D_MODEL", 768), ("out_dir OUT_DIR", "out/medium"),
                        ("max_steps MAX_STEPS", 6000), ("batch_size BATCH_SIZE", 8),
                        ("global_batch GLOBAL_BATCH", 256), ("seq_len SEQ_LEN", 512)):
        # the flag's own help, up to the next flag's heading ("--name NAME"): ends with its default
        assert re.search(rf" --{flag} (?:(?! --\w+ [A-Z_]+ ).)*?\(default: {value}\)", help_text), flag


def test_lr_schedule_known_values():
    args = mg.parse_args(["--lr", "1e-3", "--warmup_steps", "10", "--max_steps", "110",
                          "--min_lr_frac", "0.1", "--lr_schedule", "cosine"])
    lr = lambda step, schedule="cosine": mg.lr_at(step, argparse.Namespace(**{**vars(args),  # noqa: E731
                                                                            "lr_schedule": schedule}))
    assert lr(0) == pytest.approx(1e-4) and lr(4) == pytest.approx(5e-4) and lr(9) == pytest.approx(1e-3)
    assert lr(10) == pytest.approx(1e-3)  # the peak, the first step after warm-up
    assert lr(60) == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5))  # half-way: cos(pi / 2) = 0
    assert lr(110) == pytest.approx(1e-4) and lr(500) == pytest.approx(1e-4)  # the floor, and it stays there
    assert lr(35, "linear") == pytest.approx(1e-3 * (0.1 + 0.9 * 0.75))
    assert all(lr(s, "constant") == pytest.approx(1e-3) for s in (10, 60, 110, 5000))
    cos = [lr(s) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(cos, cos[1:]))  # decays monotonically


@pytest.mark.parametrize("sizes, buffers", [((3, 5, 2, 7), [8, 9]),  # the tensor at element 8 opens one
                                            ((8, 1), [8, 1]),  # exactly at the bound, then a partial one
                                            ((3, 10, 3, 3), [13, 3, 3]),  # 13 runs past 8; 13 and 16 open
                                            ((20,), [20]),  # one tensor larger than a bucket goes alone
                                            ((1, 2), [3])])  # everything in one last bucket
def test_all_reduce_buckets_return_every_element_to_its_tensor(sizes, buffers, monkeypatch):
    """all_reduce_ with buckets beginning every 8 elements, the collective replaced by a stand-in for 2 ranks
    whose other rank holds 1000 + the same values: each tensor gets exactly its own elements' sums back."""
    seen = []

    def fake_all_reduce(flat):
        seen.append(flat.numel())
        flat += 1000 + flat  # the other rank's buffer: 1000 + this one's, element by element

    monkeypatch.setattr(mg, "BUCKET_NUMEL", 8)
    monkeypatch.setattr(mg.dist, "all_reduce", fake_all_reduce)
    start = np.cumsum((0,) + sizes)
    tensors = [torch.arange(a, b, dtype=torch.float32).reshape(-1, 1) for a, b in zip(start, start[1:])]
    mg.all_reduce_(tensors, world=2)
    assert seen == buffers
    for t, a, b in zip(tensors, start, start[1:]):
        assert (t.shape == (b - a, 1)
                and torch.equal(t.flatten(), 2 * torch.arange(a, b, dtype=torch.float32) + 1000))
