"""Shared fixtures. Tests run on the CPU, offline (no hub), and deterministically."""
import os
import sys
import tempfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ["HF_HUB_OFFLINE"] = "1"  # nothing in the suite may touch the network
os.environ.setdefault("HF_HOME", tempfile.mkdtemp(prefix="hf-home-"))

import torch  # noqa: E402

torch.set_num_threads(2)

# A small but real configuration: the toy world (2,000 paragraphs), a 2-layer d=24 model, 32-token sequences.
SMALL = ["--data", "toy", "--toy_docs", "2000", "--d_model", "24", "--n_layers", "2", "--seq_len", "32",
         "--batch_size", "4", "--n_way", "8", "--k_shot", "2", "--q_query", "2", "--inner_steps", "3",
         "--eval_every", "0", "--dynamics_every", "0", "--log_every", "1", "--lr", "1e-3", "--warmup_steps", "2",
         "--smlmt_min_count", "8", "--smlmt_skip_top", "50"]


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """One prepared toy corpus (and SMLMT index), built once per pytest run and shared by every test."""
    d = str(tmp_path_factory.mktemp("data"))
    import maml_gpt
    args = maml_gpt.parse_args(SMALL + ["--data_dir", d])
    corpus = maml_gpt.prepare_corpus(args)
    maml_gpt.build_smlmt_index(corpus, args)
    return d


@pytest.fixture
def small_args(data_dir, tmp_path):
    """argv for a fast CLI run in a fresh out_dir."""
    return SMALL + ["--data_dir", data_dir, "--out_dir", str(tmp_path / "run")]
