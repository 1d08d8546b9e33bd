"""The GPU path, on CUDA in bf16; every test here skips without CUDA. On a GPU machine:

    python -m pytest -s tests/test_gpu.py             # tiny and large; -s prints bench.py's rows (MFU, ...)
    MAML_GPT_GPU_SIZES=tiny python -m pytest -s tests/test_gpu.py      # a quick look

Training with and without --compile, resume equal to a straight run, 2 processes equal to 1 with 2
accumulation steps (with 2 GPUs), the fused LM-head loss at --size large shapes, and bench.py per size with
and without --compile: no host sync in either micro-step, a kernel other than SDPA's math fallback."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import bench
import maml_gpt as mg
from conftest import ROOT
from conftest import run_cli as run

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
SIZES = os.environ.get("MAML_GPT_GPU_SIZES", "tiny,large").split(",")
COMPILE = [[], ["--compile"]]


@pytest.fixture(scope="module")
def cuda(tmp_path_factory):
    """The toy world (prepared once, here) on CUDA in bf16."""
    return ["--data", "toy", "--data_dir", str(tmp_path_factory.mktemp("data")), "--device", "cuda",
            "--dtype", "bfloat16"]


@pytest.fixture
def common(cuda):
    """A training run's flags: both branches, no eval, a record per step."""
    return cuda + ["--hybrid_ratio", "0.5", "--eval_every", "0", "--dynamics_every", "0", "--log_every", "1"]


def weights(out):
    ck = mg.load_checkpoint(os.path.join(out, "ckpt.pt"))
    return {f"{part}.{k}": v for part in ("model", "head") for k, v in ck[part].items()}


def assert_same_weights(a, b):
    a, b = weights(a), weights(b)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), (k, (a[k].float() - b[k].float()).abs().max().item())


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("compile_", COMPILE, ids=["eager", "compile"])
def test_a_few_steps_train_in_bf16(size, compile_, common, tmp_path):
    out = str(tmp_path / "run")
    assert run(["--size", size, "--grad_accum", "2", "--max_steps", "6", "--out_dir", out] + common
               + compile_) == 0
    recs = [json.loads(ln) for ln in open(os.path.join(out, "metrics.jsonl"))]
    assert all(math.isfinite(r["loss_ar"]) for r in recs if "loss_ar" in r)
    assert sum(r.get("n_meta_steps", 0) for r in recs) > 0 and any("loss_ar" in r for r in recs)


def test_resume_after_step_3_equals_a_straight_run(common, tmp_path):
    tiny = ["--size", "tiny", "--grad_accum", "2"] + common
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    assert run(tiny + ["--max_steps", "6", "--out_dir", full]) == 0
    assert run(tiny + ["--max_steps", "3", "--out_dir", part]) == 0
    assert run(tiny + ["--max_steps", "6", "--out_dir", part, "--resume"]) == 0
    assert_same_weights(full, part)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_two_processes_equal_one_with_two_accumulation_steps(common, tmp_path):
    tiny = ["--size", "tiny", "--max_steps", "4"] + common
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    assert run(tiny + ["--grad_accum", "2", "--out_dir", one]) == 0
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                    os.path.join(ROOT, "maml_gpt.py")] + tiny + ["--grad_accum", "1", "--out_dir", two],
                   check=True)
    assert_same_weights(one, two)


def test_fused_loss_equals_cross_entropy_at_large_shapes():
    """4,096 rows x d 1,536 x V 50,304 in bf16: the loss and both gradients; -s prints the peak memory."""
    torch.manual_seed(0)
    rows, d, vocab = 4096, mg.SIZES["large"]["d_model"], 50304
    h = torch.randn(rows, d, device="cuda", requires_grad=True)
    w = (torch.randn(vocab, d, device="cuda") / d ** 0.5).requires_grad_()
    t = torch.randint(0, vocab, (rows,), device="cuda")
    res = []
    for fn in (lambda: mg.linear_cross_entropy(h, w, t), lambda: F.cross_entropy(F.linear(h, w).float(), t)):
        torch.cuda.reset_peak_memory_stats()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = fn()
        res.append((loss, torch.autograd.grad(loss, (h, w)), torch.cuda.max_memory_allocated() / 2 ** 30))
    (fused, g1, m1), (plain, g2, m2) = res
    print(f"fused loss peak {m1:.2f} GiB, F.cross_entropy on full logits {m2:.2f} GiB")
    torch.testing.assert_close(fused, plain, rtol=0, atol=1e-2)
    for a, b in zip(g1, g2):
        assert ((a - b).norm() / b.norm()).item() < 2e-2


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("compile_", COMPILE, ids=["eager", "compile"])
def test_bench(size, compile_, cuda, tmp_path, capsys):
    """bench.py's rows (-s shows them): tokens/s, MFU, peak memory, host syncs (counted on the eager model,
    with the real copies to the GPU from pinned memory), the probe's share."""
    res = bench.bench(mg.parse_args(["--size", size, "--out_dir", str(tmp_path / "b")] + cuda + compile_))
    with capsys.disabled():
        print("\n" + capsys.readouterr().out, end="")
    assert res["syncs"] == {"AR": 0, "meta": 0}
    assert "math" not in res["sdpa"], res["sdpa"]
    assert all(res["sec"][k] > 0 for k in res["sec"])
