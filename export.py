"""
Export a trained maml-gpt backbone as a Hugging Face Llama folder (config, weights, GPT-2 + [MASK] tokenizer),
for lm-evaluation-harness, BLiMP, Paloma and anything else that loads LlamaForCausalLM.from_pretrained(DIR).
The meta-learning head is not part of it: it stays in the run's ckpt.pt.

    python export.py out/demo-hf                         # the model in out/demo
    python export.py --out_dir out/large out/large-hf
"""
import argparse
import json
import os

import torch

import maml_gpt as mg


def hf_state_dict(model):
    """Our Decoder's weights under LlamaForCausalLM's names, fp32, q/k rows in rotate_half order."""
    hd = model.cfg.d_model // model.cfg.n_heads
    rename = {"embedding_proj": "model.embed_tokens", "layers": "model.layers", "output_norm": "model.norm",
              "de_embedding_proj": "lm_head", "attention_norm": "input_layernorm", "attention": "self_attn",
              "swiglu_norm": "post_attention_layernorm", "swiglu": "mlp", "w_0": "gate_proj",
              "w_1": "up_proj", "w_2": "down_proj"}
    out = {}  # e.g. layers.3.swiglu.w_0.weight -> model.layers.3.mlp.gate_proj.weight
    for name, w in model.state_dict().items():
        w = w.detach().float().cpu()
        if name.endswith(("q_proj.weight", "k_proj.weight")):
            # We rotate adjacent features (2i, 2i+1) of each head as one pair; HF's rotate_half pairs (i,
            # i + hd/2). Each head's rows evens-then-odds, (heads, hd/2, 2) -> (heads, 2, hd/2), rotate the
            # same features by the same angles; q and k permuted alike leave every q.k (the attention) as is.
            w = w.unflatten(0, (-1, hd // 2, 2)).transpose(1, 2).flatten(0, 2)
        out[".".join(rename.get(part, part) for part in name.split("."))] = w.contiguous()
    return out


def hf_config(cfg):
    """config.json for transformers.LlamaForCausalLM: the same architecture."""
    return dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=cfg.vocab_size,
                hidden_size=cfg.d_model, intermediate_size=cfg.ffn_mult * cfg.d_model,
                num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
                num_key_value_heads=cfg.n_kv_heads, head_dim=cfg.d_model // cfg.n_heads, hidden_act="silu",
                rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta, max_position_embeddings=cfg.max_seq_len,
                tie_word_embeddings=False, attention_bias=False, mlp_bias=False, bos_token_id=mg.EOT_ID,
                eos_token_id=mg.EOT_ID, torch_dtype="float32")


def hf_tokenizer_files(model_max_length):
    """{file name: content} for GPT-2 + [MASK] as a Hugging Face tokenizer, rebuilt from tiktoken's ranks (no
    download): vocab.json + merges.txt (GPT-2's own format), tokenizer.json (the fast one) and its config."""
    enc = mg.get_tokenizer()
    # Byte-level BPE files spell every byte as a printable character: bytes that are printable stand for
    # themselves, the others are shifted to 256, 257, ... in order (bytes_to_unicode in GPT-2's encoder.py).
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)}
    shifted = iter(range(256, 512))
    char = {b: chr(b if b in printable else next(shifted)) for b in range(256)}
    ranks = {enc.decode_single_token_bytes(i): i for i in range(mg.EOT_ID)}  # 256 bytes, then 50,000 merges
    merges = []
    for tok in list(ranks)[256:]:  # rank order = merge order
        # tiktoken keeps no merge list: the merge that made `tok` is the last step of BPE on its own bytes,
        # using only lower-ranked merges (tiktoken's educational bpe() with max_rank).
        parts = [bytes([b]) for b in tok]
        while len(parts) > 2:
            _, i = min((ranks.get(a + b, 1 << 30), i) for i, (a, b) in enumerate(zip(parts, parts[1:])))
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        merges.append(" ".join("".join(char[b] for b in p) for p in parts))
    special = {"<|endoftext|>": mg.EOT_ID, "[MASK]": mg.MASK_ID}
    vocab = {"".join(char[b] for b in tok): i for tok, i in ranks.items()} | special
    byte_level = dict(type="ByteLevel", use_regex=True)
    fast = dict(version="1.0", truncation=None, padding=None, normalizer=None,
                added_tokens=[dict(id=i, content=t, single_word=False, lstrip=False, rstrip=False,
                                   normalized=False, special=True) for t, i in special.items()],
                pre_tokenizer=dict(byte_level, add_prefix_space=False, trim_offsets=True),
                post_processor=dict(byte_level, add_prefix_space=True, trim_offsets=False),
                decoder=dict(byte_level, add_prefix_space=True, trim_offsets=True),
                model=dict(type="BPE", dropout=None, unk_token=None, continuing_subword_prefix="",
                           end_of_word_suffix="", fuse_unk=False, byte_fallback=False, vocab=vocab,
                           merges=merges))
    config = dict(tokenizer_class="GPT2Tokenizer", model_max_length=model_max_length,
                  bos_token="<|endoftext|>", eos_token="<|endoftext|>", unk_token="<|endoftext|>",
                  mask_token="[MASK]", add_prefix_space=False, clean_up_tokenization_spaces=False)
    return {"vocab.json": json.dumps(vocab, ensure_ascii=False),
            "merges.txt": "\n".join(["#version: 0.2", *merges]),
            "tokenizer.json": json.dumps(fast, ensure_ascii=False),
            "tokenizer_config.json": json.dumps(config)}


def to_hf_llama(model):
    """A transformers.LlamaForCausalLM (sdpa) computing the same function as `model` (a maml_gpt.Decoder), on
    its device: the config and weights export() writes."""
    from transformers import LlamaConfig, LlamaForCausalLM
    hf = LlamaForCausalLM(LlamaConfig(**hf_config(model.cfg), attn_implementation="sdpa"))
    hf.load_state_dict(hf_state_dict(model), strict=True)
    return hf.to(next(model.parameters()).device)


def export(out_dir, dest):
    """The backbone of out_dir/ckpt.pt as a folder LlamaForCausalLM.from_pretrained(dest) loads."""
    if os.path.exists(dest) and (not os.path.isdir(dest) or os.listdir(dest)):
        raise mg.UserError(f"{dest} already exists and is not an empty folder; choose a new one")
    path = os.path.join(out_dir, "ckpt.pt")
    ck = mg.load_checkpoint(path)
    model = mg.model_from_checkpoint(ck)
    weights = hf_state_dict(model)
    os.makedirs(dest, exist_ok=True)
    try:
        from safetensors.torch import save_file
        save_file(weights, os.path.join(dest, "model.safetensors"), metadata={"format": "pt"})
    except ImportError:
        torch.save(weights, os.path.join(dest, "pytorch_model.bin"))
    for name, text in {"config.json": json.dumps(hf_config(model.cfg), indent=1),
                       **hf_tokenizer_files(model.cfg.max_seq_len)}.items():
        mg.write_text(os.path.join(dest, name), text)
    print(f"wrote {dest}: LlamaForCausalLM ({mg.count_params(model) / 1e6:.1f}M params, step {ck['step']} of "
          f"{path}) and its tokenizer. The meta-learning head is not part of it (it stays in {path}).")


def main(argv=None):
    p = argparse.ArgumentParser(description="Export the model in --out_dir as a Hugging Face Llama folder.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("dest", help="the folder to write (new or empty)")
    p.add_argument("--out_dir", default=os.path.join("out", "demo"), help="the run folder holding ckpt.pt")
    args = p.parse_args(argv)  # None: sys.argv[1:]
    mg.cli(lambda: export(args.out_dir, args.dest))


if __name__ == "__main__":
    main()
