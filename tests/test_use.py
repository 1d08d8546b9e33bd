"""Using a trained model: Decoder.generate, sample.py, export.py (Hugging Face Llama), --wandb."""
import contextlib
import glob
import io
import json
import os
import shutil
import sys

import pytest
import torch

import export as export_py
import maml_gpt as mg
import sample as sample_py
from conftest import run_cli as run


def tiny(max_seq_len=16):
    torch.manual_seed(0)
    return mg.Decoder(mg.ModelConfig(d_model=24, n_layers=2, max_seq_len=max_seq_len)).eval()


def gen(seed):
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="session")
def trained(trained_run, tmp_path_factory):
    """A copy of the shared 4-step run: (its folder, what it printed). Its weights are perturbed so that every
    norm gain and matrix matters below."""
    out = str(tmp_path_factory.mktemp("use") / "run")
    shutil.copytree(trained_run[0], out)
    path = os.path.join(out, "ckpt.pt")
    ck = torch.load(path, weights_only=True)
    g = gen(1)
    ck["model"] = {k: v + 0.2 * torch.randn(v.shape, generator=g) for k, v in ck["model"].items()}
    torch.save(ck, path)
    return out, trained_run[1]


@pytest.fixture
def run_dir(trained):
    return trained[0]


# ------------------------------------------------------------------------------------------------ generate()

def test_generate_is_deterministic_for_a_seed_and_top_k_1_is_greedy():
    model, prompt = tiny(), torch.randint(0, 50257, (3, 5), generator=gen(0))
    a = model.generate(prompt, 12, temperature=1.0, generator=gen(42))
    assert torch.equal(a, model.generate(prompt, 12, temperature=1.0, generator=gen(42)))
    assert not torch.equal(a, model.generate(prompt, 12, temperature=1.0, generator=gen(43)))
    assert torch.equal(a[:, :5], prompt)
    greedy = model.generate(prompt, 12, temperature=0)
    assert torch.equal(greedy, model.generate(prompt, 12, temperature=1.0, top_k=1, generator=gen(7)))
    logits, _ = model(prompt)
    assert torch.equal(greedy[:, 5], logits[:, -1, :mg.MASK_ID].argmax(-1))


def test_generate_never_emits_mask_or_padding(monkeypatch):
    model = tiny()
    lm_head = model.de_embedding_proj.forward

    def rigged(h):  # [MASK] and every padding id far ahead: unmasked, they would always win
        logits = lm_head(h)
        logits[..., mg.MASK_ID:] += 1e4
        return logits

    monkeypatch.setattr(model.de_embedding_proj, "forward", rigged)
    prompt = torch.randint(0, 50257, (4, 3), generator=gen(0))
    for temperature, top_k in ((1.0, None), (0.8, 200), (0, None)):
        new = model.generate(prompt, 10, temperature, top_k, gen(0))[:, 3:]
        assert new.shape == (4, 10) and new.max() < mg.MASK_ID


def test_generate_stops_at_endoftext_row_by_row(monkeypatch):
    model, calls = tiny(), []

    # the LM head, once per new token: token 11, and <|endoftext|> for row 0 from the 2nd call on, for row 1
    # from the 4th
    def scripted(h):
        logits = torch.zeros(h.shape[0], model.cfg.vocab_size)
        logits[:, 11] = 1.0
        logits[torch.tensor([1, 3]) <= len(calls), mg.EOT_ID] = 2.0
        calls.append(h.shape)
        return logits

    monkeypatch.setattr(model.de_embedding_proj, "forward", scripted)
    out = model.generate(torch.full((2, 4), 3), max_new_tokens=20, temperature=0)
    E = mg.EOT_ID  # row 0 is padded with <|endoftext|> once finished; generation ends when row 1 finishes too
    assert out[:, 4:].tolist() == [[11, E, E, E], [11, 11, 11, E]] and len(calls) == 4


def test_prompt_longer_than_the_context_is_cropped_from_the_left(capsys):
    model, long = tiny(max_seq_len=16), torch.randint(0, 50257, (2, 40), generator=gen(0))
    a = model.generate(long, 8, temperature=1.0, generator=gen(5))[:, 40:]
    assert torch.equal(a, model.generate(long[:, -16:], 8, temperature=1.0, generator=gen(5))[:, 16:])
    texts = mg.complete(model, "word" + " word" * 29, max_new_tokens=3)
    assert ("the prompt has 30 tokens and the model's context is 16" in capsys.readouterr().out
            and len(texts) == 1)


def sample(argv):
    return run(argv, sample_py.main)


def export_hf(argv):
    return run(argv, export_py.main)


# ------------------------------------------------------------------------------------------------ sample.py

def test_sample_cli_is_deterministic_and_the_demo_prints_one(trained, run_dir, capsys, tmp_path):
    assert "sample (40 tokens, temperature 0.8, top_k 200): 'The main industry of" in trained[1]
    argv = ["--out_dir", run_dir, "The baker", "--num_samples", "2", "--max_new_tokens", "6"]
    assert sample(argv) == 0
    first = capsys.readouterr().out
    assert sample(argv) == 0
    assert capsys.readouterr().out == first
    assert first.count("\nThe baker") == 2 and "--- sample 2/2" in first and "(step 4)" in first
    assert sample(argv + ["--seed", "2"]) == 0 and capsys.readouterr().out != first


@pytest.mark.parametrize("tool, argv, message", [
    (sample, ["hi"], "no checkpoint at"),
    (export_hf, ["EXPORT"], "no checkpoint at"),
    (sample, [""], "the prompt encodes to no tokens"),
    (sample, ["hi", "--top_k", "-1"], "--temperature and --top_k must be >= 0"),
])
def test_bad_input_gets_one_clear_line(tool, argv, message, run_dir, tmp_path, capsys):
    out_dir = run_dir if argv[0] == "" or "--top_k" in argv else str(tmp_path / "empty")
    argv = [str(tmp_path / "hf") if a == "EXPORT" else a for a in argv]
    assert tool(["--out_dir", out_dir] + argv) == 1
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err and "Traceback" not in err
    assert not os.path.exists(tmp_path / "hf")  # a failed export leaves no folder behind


# ------------------------------------------------------------------------------------------------ export.py

@pytest.fixture(scope="session")
def export(trained, tmp_path_factory):
    """The trained run exported once: (the folder, what export.py printed)."""
    out = str(tmp_path_factory.mktemp("export") / "hf")
    with contextlib.redirect_stdout(io.StringIO()) as stdout:
        assert export_hf(["--out_dir", trained[0], out]) == 0
    return out, stdout.getvalue()


@pytest.fixture
def exported(export):
    return export[0]


def test_exported_llama_gives_our_logits(run_dir, export, exported, capsys):
    transformers = pytest.importorskip("transformers")
    assert "The meta-learning head is not part of it (it stays in" in export[1]
    assert os.path.exists(os.path.join(exported, "model.safetensors"))
    hf, info = transformers.LlamaForCausalLM.from_pretrained(exported, output_loading_info=True)
    # every weight, nothing else (no meta head)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    ours = mg.model_from_checkpoint(mg.load_checkpoint(os.path.join(run_dir, "ckpt.pt"))).eval()
    idx = torch.randint(0, ours.cfg.vocab_size, (3, ours.cfg.max_seq_len), generator=gen(0))
    with torch.no_grad():
        ref, got = ours(idx)[0], hf.eval()(idx).logits
    assert hf.dtype == torch.float32 and got.shape == ref.shape
    assert (got - ref).abs().max().item() <= 1e-4
    # the folder is now taken: a second export refuses, one line, and leaves it untouched
    before = {f: os.path.getmtime(os.path.join(exported, f)) for f in os.listdir(exported)}
    assert export_hf(["--out_dir", run_dir, exported]) == 1
    assert "already exists and is not an empty folder" in capsys.readouterr().err
    assert before == {f: os.path.getmtime(os.path.join(exported, f)) for f in os.listdir(exported)}


SENTENCES = ["The main industry of Doxville is banking.", "  two  spaces,\ttabs and\n\nnew lines  ",
             "I'll say it's 3.14159 -- don't you've?", "naïve café — “quotes”, Ünïcödé, Zürich",
             "日本語のテキストと中文", "emoji 🙂🚀 and Ελληνικά, русский"]


def test_exported_tokenizer_encodes_like_ours(exported):
    transformers = pytest.importorskip("transformers")
    tok, enc = transformers.AutoTokenizer.from_pretrained(exported), mg.get_tokenizer()
    for s in SENTENCES:
        ids = enc.encode_ordinary(s)
        assert tok.encode(s) == ids and tok(s)["input_ids"] == ids, s  # no BOS added, no prefix space
        assert tok.decode(ids) == enc.decode(ids) == s
    assert (tok.encode("a<|endoftext|>[MASK]")
            == enc.encode("a<|endoftext|>", allowed_special="all") + [mg.MASK_ID])
    assert (tok.eos_token_id, tok.mask_token_id, len(tok)) == (mg.EOT_ID, mg.MASK_ID, mg.MASK_ID + 1)


def test_export_without_safetensors_writes_pytorch_model_bin(run_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)  # as if the package were not installed
    monkeypatch.setattr(export_py, "hf_tokenizer_files", lambda n: {})  # not under test here, and slow
    out = str(tmp_path / "hf")
    assert export_hf(["--out_dir", run_dir, out]) == 0
    assert sorted(os.listdir(out)) == ["config.json", "pytorch_model.bin"]
    saved = torch.load(os.path.join(out, "pytorch_model.bin"), weights_only=True)
    ck = mg.load_checkpoint(os.path.join(run_dir, "ckpt.pt"))
    want = export_py.hf_state_dict(mg.model_from_checkpoint(ck))
    assert saved.keys() == want.keys() and all(torch.equal(saved[k], want[k]) for k in want)


def test_rope_row_permutation_keeps_attention_scores():
    """Our adjacent-pair RoPE on W_q x equals HF's rotate_half RoPE on (P W_q) x, up to the same row order."""
    hd, T = 8, 6
    x, W = torch.randn(T, 16, generator=gen(0)), torch.randn(2 * hd, 16, generator=gen(1))  # 2 heads
    cos, sin = mg.rope_tables(hd, T, 1e4)  # (T, hd/2)
    ours = mg.apply_rope((x @ W.T).unflatten(-1, (2, hd)).transpose(0, 1)[None], cos, sin)[0]  # (2, T, hd)
    Wp = W.unflatten(0, (2, hd // 2, 2)).transpose(1, 2).flatten(0, 2)  # what hf_state_dict does
    h = (x @ Wp.T).unflatten(-1, (2, hd)).transpose(0, 1)  # (2, T, hd), halves layout
    c, s = torch.cat([cos, cos], -1), torch.cat([sin, sin], -1)
    # HF: q * cos + rotate_half(q) * sin
    hf = h * c + torch.cat([-h[..., hd // 2:], h[..., :hd // 2]], -1) * s
    assert torch.allclose(ours @ ours.transpose(-1, -2), hf @ hf.transpose(-1, -2), atol=1e-5)
    assert torch.allclose(ours.unflatten(-1, (hd // 2, 2)).transpose(-1, -2).flatten(-2), hf, atol=1e-6)


# ------------------------------------------------------------------------------------------------ --wandb

def test_wandb_missing_gets_one_line(small_args, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if the package were not installed
    assert run(small_args + ["--max_steps", "1", "--wandb"]) == 1
    assert "--wandb needs the wandb package: pip install wandb" in capsys.readouterr().err


def test_wandb_offline_logs_every_record_and_the_config(small_args, tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    for k, v in dict(WANDB_MODE="offline", WANDB_SILENT="true", WANDB_CONSOLE="off").items():
        monkeypatch.setenv(k, v)
    logged, inits = [], []
    log, init = wandb.sdk.wandb_run.Run.log, wandb.init

    def spy_log(self, data, step=None, **kw):  # record what reaches the real (offline) run, then log it
        logged.append((step, dict(data)))
        return log(self, data, step=step, **kw)

    monkeypatch.setattr(wandb.sdk.wandb_run.Run, "log", spy_log)
    monkeypatch.setattr(wandb, "init", lambda **kw: inits.append(kw) or init(**kw))
    out = str(tmp_path / "run")
    assert run(small_args + ["--max_steps", "4", "--dynamics_every", "2", "--wandb", "maml-gpt-test"]) == 0
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert [s for s, _ in logged] == [r["step"] for r in rows] == [0, 1, 2, 3, 4]
    n_images = 0
    for (_, sent), row in zip(logged, rows):
        if "attn_entropy" in row:  # the (layers, heads) matrix: an image and a histogram, not 2 x 12 scalars
            assert isinstance(sent.pop("attn_entropy"), wandb.Image)
            assert isinstance(sent.pop("attn_entropy_hist"), wandb.Histogram)
            row.pop("attn_entropy")
            n_images += 1
        assert sent == row
    assert n_images == 3  # steps 0, 2, 4
    assert inits[0]["project"] == "maml-gpt-test"
    assert json.loads(json.dumps(inits[0]["config"])) == json.load(open(os.path.join(out, "config.json")))
    assert glob.glob(os.path.join(out, "wandb", "offline-run-*", "run-*.wandb"))  # offline: written locally
