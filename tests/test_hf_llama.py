"""Our decoder computes the same function as Hugging Face's LlamaForCausalLM given the same weights (the q/k
rows permuted for HF's rotate-half RoPE). Needs transformers (requirements-dev.txt); skipped without it."""
import pytest
import torch

import maml_gpt as mg

transformers = pytest.importorskip("transformers")
import bench  # noqa: E402
import export  # noqa: E402  (imports transformers lazily; here it is present)


def test_logits_and_loss_equal_llama_for_causal_lm():
    torch.manual_seed(0)
    ours = mg.Decoder(mg.ModelConfig(d_model=48, n_layers=2, max_seq_len=64)).eval()
    with torch.no_grad():  # non-trivial norm gains, so that a swapped norm would show
        for name, p in ours.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    hf = export.to_hf_llama(ours).eval()
    assert hf.config._attn_implementation == "sdpa"
    x = torch.randint(0, mg.EOT_ID, (2, 64))
    with torch.no_grad():
        out = hf(input_ids=x, labels=x)
        logits, _ = ours(x)
        _, loss = ours(x, torch.cat([x[:, 1:], torch.full_like(x[:, :1], -100)], dim=1))
    torch.testing.assert_close(logits, out.logits.float(), rtol=0, atol=2e-5)
    torch.testing.assert_close(loss, out.loss, rtol=0, atol=2e-6)


def test_rope_permutation_is_needed():
    """Without the q/k row permutation the two RoPE conventions disagree: the test above is not vacuous."""
    torch.manual_seed(0)
    ours = mg.Decoder(mg.ModelConfig(d_model=48, n_layers=1, max_seq_len=16)).eval()
    hf = export.to_hf_llama(ours).eval()
    with torch.no_grad():
        for proj in ("q_proj", "k_proj"):
            getattr(hf.model.layers[0].self_attn, proj).weight.copy_(
                getattr(ours.layers[0].attention, proj).weight)
        x = torch.randint(0, mg.EOT_ID, (1, 16))
        assert (ours(x)[0] - hf(input_ids=x).logits).abs().max() > 1e-3


def test_bench_script_runs_and_both_losses_agree(capsys):
    res = bench.main(["--vs_hf", "--batch_size", "1", "--seq_len", "16", "--repeats", "1"])
    assert max(res["losses"].values()) - min(res["losses"].values()) < 1e-5 and res["ratio"] > 0
    assert "maml-gpt (fused loss)" in capsys.readouterr().out
