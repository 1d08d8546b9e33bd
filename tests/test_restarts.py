"""Never lose a run: refusal to start over, --overwrite, --resume auto, and stopping cleanly on SIGTERM /
Ctrl-C (one process and two gloo processes), each followed by a bitwise-exact resume."""
import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager

import pytest
import torch

import maml_gpt as mg
from test_train import assert_same_weights, load, metrics, run


def out_of(argv):
    return argv[argv.index("--out_dir") + 1]


def with_out(argv, out):
    argv = list(argv)
    argv[argv.index("--out_dir") + 1] = str(out)
    return argv


@contextmanager
def one_thread():
    """In-process runs with the kernels (and reduction orders) of the OMP_NUM_THREADS=1 subprocesses."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


AR = ["--hybrid_ratio", "0"]  # where the branch does not matter: AR steps are the cheap ones


def test_rerun_without_a_flag_is_refused_and_touches_nothing(small_args, capsys):
    small_args = small_args + AR
    out = out_of(small_args)
    assert run(small_args + ["--max_steps", "3"]) == 0
    before = {n: open(os.path.join(out, n), "rb").read() for n in mg.RUN_FILES}
    capsys.readouterr()
    assert run(small_args + ["--max_steps", "3"]) == 1
    err = capsys.readouterr().err
    assert (err.startswith("error:")
            and "already holds a run (ckpt.pt at step 3 of 3; metrics.jsonl up to step 3)" in err
            and "--resume" in err and "--overwrite" in err and "Traceback" not in err)
    assert {n: open(os.path.join(out, n), "rb").read() for n in mg.RUN_FILES} == before  # byte-identical
    assert sorted(os.listdir(out)) == sorted(mg.RUN_FILES)


def test_overwrite_keeps_the_previous_run_until_the_new_checkpoint_exists(small_args, capsys):
    out = out_of(small_args)
    ar = AR
    assert run(small_args + ar + ["--max_steps", "2"]) == 0
    old_ckpt, old_metrics = (open(os.path.join(out, n), "rb").read() for n in ("ckpt.pt", "metrics.jsonl"))
    # An --overwrite run that dies before its first checkpoint (non-finite weights after a few steps at lr
    # 1e30; no save before step 100).
    assert run(small_args + ar + ["--max_steps", "8", "--overwrite", "--lr", "1e30",
                                  "--save_every", "100"]) == 1
    assert "non-finite" in capsys.readouterr().err
    assert not os.path.exists(os.path.join(out, "ckpt.pt"))
    assert open(os.path.join(out, "ckpt.prev.pt"), "rb").read() == old_ckpt
    assert open(os.path.join(out, "metrics.prev.jsonl"), "rb").read() == old_metrics
    # The set-aside run still counts: a plain start is refused, --resume says how to get it back.
    assert run(small_args + ar + ["--max_steps", "2"]) == 1
    assert "ckpt.prev.pt at step 2 of 2" in capsys.readouterr().err
    assert run(small_args + ar + ["--max_steps", "2", "--resume"]) == 1
    assert "rename it to ckpt.pt" in capsys.readouterr().err
    # A second --overwrite keeps the same (real) previous run, and its first checkpoint retires it.
    assert run(small_args + ar + ["--max_steps", "3", "--overwrite", "--save_every", "2"]) == 0
    assert sorted(os.listdir(out)) == sorted(mg.RUN_FILES)
    assert load(out)["step"] == 3 and [r["step"] for r in metrics(out)] == [1, 2, 3]


def test_overwrite_and_resume_together_is_an_error(small_args, capsys):
    assert run(small_args + ["--overwrite", "--resume"]) == 1
    assert "give one of them" in capsys.readouterr().err


def test_resume_auto_starts_fresh_then_continues_exactly(small_args, tmp_path, capsys):
    small_args = small_args + AR
    out = out_of(small_args)
    assert run(small_args + ["--max_steps", "4", "--resume", "auto"]) == 0  # empty folder: a fresh start
    assert load(out)["step"] == 4
    ref = with_out(small_args, tmp_path / "ref")
    assert run(ref + ["--max_steps", "2"]) == 0
    assert run(ref + ["--max_steps", "4", "--resume", "auto"]) == 0  # a checkpoint: continued, bitwise
    assert_same_weights(load(out), load(str(tmp_path / "ref")))
    assert [r["step"] for r in metrics(str(tmp_path / "ref"))] == list(range(1, 5))
    good = open(os.path.join(out, "ckpt.pt"), "rb").read()
    capsys.readouterr()
    # never a silent restart
    assert run(small_args + ["--max_steps", "6", "--resume", "auto", "--seed", "7"]) == 1
    assert "different settings (seed)" in capsys.readouterr().err
    assert open(os.path.join(out, "ckpt.pt"), "rb").read() == good


def test_stop_signals_first_sets_the_flag_a_later_ctrl_c_quits():
    """The handler's rules, in this process (the real runs are below)."""
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    with mg.stop_signals(verbose=False) as stop:
        with pytest.raises(SystemExit, match="143"):  # before the loop arms it: nothing to save, exit at once
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.1)
        stop["armed"] = True
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop["signum"] == signal.SIGTERM
        os.kill(os.getpid(), signal.SIGTERM)  # SIGTERM again (srun + torchrun both forward it): ignored
        os.kill(os.getpid(), signal.SIGINT)  # within a second: a launcher's copy, ignored
        assert stop["signum"] == signal.SIGTERM
        stop["at"] -= 2.0  # two seconds later, a real second Ctrl-C
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.1)
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before


def test_an_in_process_run_leaves_the_test_process_its_signals(small_args, monkeypatch):
    """conftest's run_cli installs no stop handlers: a SIGTERM to the test process during an in-process run
    (a time limit's) reaches the process's own handler, and the run under test completes (no exit 143)."""
    got = []
    choose_branch = mg.choose_branch

    def branch(args, step, run_):  # the SIGTERM arrives in the middle of the run
        if step == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return choose_branch(args, step, run_)
    monkeypatch.setattr(mg, "choose_branch", branch)
    before = signal.signal(signal.SIGTERM, lambda signum, frame: got.append(signum))
    try:
        assert run(small_args + AR + ["--max_steps", "3"]) == 0
    finally:
        signal.signal(signal.SIGTERM, before)
    assert got == [signal.SIGTERM] and load(out_of(small_args))["step"] == 3


# ------------------------------------------------------------------------------------------------------------
# A real signal during a real run. The stopped run uses a constant lr schedule and a --max_steps it never
# reaches, so the reference run for "the same steps, uninterrupted" is simply a run of k + 2 steps.

STOPPABLE = ["--lr_schedule", "constant", "--max_steps", "100000", "--save_every", "100000",
             "--device", "cpu"]


def start(argv, out, env=None):
    os.makedirs(out, exist_ok=True)
    # rank 0 prints the messages; files, not pipes: tqdm would fill a pipe
    rank = (env or {}).get("RANK", "0")
    logs = (open(os.path.join(out, f"stdout{rank}.txt"), "w"),
            open(os.path.join(out, f"stderr{rank}.txt"), "w"))
    cmd = [sys.executable, os.path.join(mg.HERE, "maml_gpt.py")] + argv
    return subprocess.Popen(cmd, stdout=logs[0], stderr=logs[1],
                            env=dict(os.environ, OMP_NUM_THREADS="1", **env or {}))


def wait_for_steps(out, n, procs, timeout=120):
    path = os.path.join(out, "metrics.jsonl")
    t = time.time()
    while not (os.path.exists(path) and len(open(path).readlines()) >= n):
        assert all(p.poll() is None for p in procs), open(os.path.join(out, "stderr0.txt")).read()[-3000:]
        assert time.time() - t < timeout
        time.sleep(0.05)


def stop_and_check(procs, target, out, signum=signal.SIGTERM):
    """Signal `target` only; every process must exit 128 + signum soon, leaving a checkpoint at the step
    reached."""
    os.kill(target.pid, signum)
    # bounded: a hang fails the test instead of stalling the suite
    codes = [p.wait(timeout=60) for p in procs]
    assert codes == [128 + signum] * len(procs), open(os.path.join(out, "stderr0.txt")).read()[-3000:]
    k = load(out)["step"]
    assert 3 <= k < 100000 and metrics(out)[-1]["step"] == k  # the step reached, not a --save_every multiple
    assert sum(r["n_meta_steps"] + r["n_ar_steps"] for r in metrics(out)) == k
    said = open(os.path.join(out, "stdout0.txt")).read()
    assert f"stopped by {signal.Signals(signum).name} after step {k}" in said and "--resume" in said
    return k


def test_sigterm_saves_the_step_reached_and_resume_is_exact(small_args, tmp_path):
    out = out_of(small_args)
    p = start(small_args + STOPPABLE, out)
    wait_for_steps(out, 3, [p])
    k = stop_and_check([p], p, out)
    with one_thread():
        assert run(small_args + STOPPABLE + ["--max_steps", str(k + 2), "--resume"]) == 0
        ref = with_out(small_args, tmp_path / "ref")
        assert run(ref + STOPPABLE + ["--max_steps", str(k + 2)]) == 0
    a, b = load(out), load(str(tmp_path / "ref"))
    assert_same_weights(a, b)
    assert a["optimizer"]["state"][0]["exp_avg"].equal(b["optimizer"]["state"][0]["exp_avg"])


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sigterm_to_rank_1_only_stops_both_gloo_ranks_at_the_same_step(small_args, tmp_path):
    out = out_of(small_args)
    dist_env = dict(WORLD_SIZE="2", LOCAL_WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                    MASTER_PORT=str(free_port()))
    procs = [start(small_args + STOPPABLE + ["--grad_accum", "1"], out,
                   dict(dist_env, RANK=str(r), LOCAL_RANK=str(r))) for r in (0, 1)]
    try:
        wait_for_steps(out, 3, procs)
        k = stop_and_check(procs, procs[1], out)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert "torchrun --nproc_per_node=2" in open(os.path.join(out, "stdout0.txt")).read()
    # 2 processes x 1 micro-step == 1 process x 2 micro-steps bitwise (test_train.py), so the rest can run in
    # this process.
    with one_thread():
        assert run(small_args + STOPPABLE + ["--max_steps", str(k + 2), "--grad_accum", "2", "--resume"]) == 0
        ref = with_out(small_args, tmp_path / "ref")
        assert run(ref + STOPPABLE + ["--max_steps", str(k + 2), "--grad_accum", "2"]) == 0
    assert_same_weights(load(out), load(str(tmp_path / "ref")))
