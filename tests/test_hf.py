"""The transformers wrapper (``memzoo.hf``): transformers' ``generate`` and
``pipeline("text-generation")`` drive every registered variant through the memzoo
state and give exactly memzoo's own ``generate``; folders load with ``AutoModelForCausalLM``."""

from __future__ import annotations

import json
import os

import pytest
import torch

import memzoo
from memzoo import testing as kit

transformers = pytest.importorskip("transformers")
hf = pytest.importorskip("memzoo.hf")

CASES = [
    pytest.param(name, dict(opts), id=f"{name}-{i}")
    for name in memzoo.list_variants()
    for i, opts in enumerate(memzoo.get_variant(name).config.conformance_options)
]


@pytest.mark.parametrize("name,opts", CASES)
def test_transformers_generate_equals_memzoo_generate(name, opts):
    model = kit.tiny_model(name, opts)
    wrapped = hf.MemzooForCausalLM.from_memzoo(model).eval()
    prompt = kit.random_tokens(model, 2, 6, seed=7)
    greedy = wrapped.generate(prompt, max_new_tokens=11, do_sample=False)
    assert torch.equal(greedy, model.generate(prompt, 11))
    sampling = dict(temperature=0.8, top_k=9, top_p=0.9, repetition_penalty=1.3)
    torch.manual_seed(11)  # transformers samples from torch's global generator
    sampled = wrapped.generate(prompt, max_new_tokens=11, do_sample=True, **sampling)
    assert torch.equal(sampled, model.generate(prompt, 11, generator=torch.Generator().manual_seed(11), **sampling))


def test_transformers_eos_and_padding_equal_memzoo():
    model = kit.tiny_model("full")
    wrapped = hf.MemzooForCausalLM.from_memzoo(model).eval()
    prompt = kit.random_tokens(model, 2, 4, seed=0)
    free = model.generate(prompt, 10)
    eos = [int(free[0, 6]), int(free[1, 8])]
    ours = model.generate(prompt, 10, eos_token_id=eos, pad_token_id=0)
    theirs = wrapped.generate(prompt, max_new_tokens=10, do_sample=False, eos_token_id=eos, pad_token_id=0)
    assert torch.equal(ours, theirs)
    assert ours.shape[1] < 14  # both stopped once every row had finished


def test_ragged_attention_mask_is_refused_through_transformers():
    model = kit.tiny_model("full")
    wrapped = hf.MemzooForCausalLM.from_memzoo(model).eval()
    prompt = kit.random_tokens(model, 2, 4)
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    with pytest.raises(memzoo.InputError, match="per-row positions"):
        wrapped.generate(prompt, attention_mask=mask, max_new_tokens=3, do_sample=False)


@pytest.mark.parametrize("opts", [{"memory_len": 5, "positions": "rope"}, {"memory_len": 5}])
def test_save_and_load_with_auto_classes(tmp_path, opts):
    model = kit.tiny_model("xl", opts)
    wrapped = hf.MemzooForCausalLM.from_memzoo(model)
    wrapped.save_pretrained(tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float64)
    assert isinstance(loaded, hf.MemzooForCausalLM)
    # what memzoo computes at construction (RoPE / relative frequencies) is restored after meta-device loading
    prompt = kit.random_tokens(model, 1, 7)
    with torch.no_grad():
        kit.assert_close(loaded(prompt).logits, model(prompt).logits, "logits after save_pretrained / from_pretrained")
    assert torch.equal(loaded.generate(prompt, max_new_tokens=9, do_sample=False), model.generate(prompt, 9))


def test_folder_with_bare_memzoo_keys_loads(tmp_path):
    """The folder format of ``MemzooLM.save_pretrained`` (issue 9): config.json with
    ``"model_type": "memzoo"`` and the ModelConfig under ``"memzoo"``, model.safetensors
    with MemzooLM state-dict keys."""
    from safetensors.torch import save_file

    model = kit.tiny_model("fam", {"memory_blocks": 1, "fam_len": 2}, dtype=torch.float32)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, os.path.join(tmp_path, "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "memzoo", "memzoo": model.config.model_dump()}))
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[key], value), key
    prompt = kit.random_tokens(model, 1, 5)
    assert torch.equal(loaded.generate(prompt, max_new_tokens=6, do_sample=False), model.generate(prompt, 6))


def test_config_refuses_bad_memzoo_fields():
    with pytest.raises(ValueError, match="valid fields"):
        hf.MemzooConfig(memzoo={"variant": "bswa", "memory_blok": 1})


def tiny_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, **{f"w{i}": i for i in range(1, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<unk>")


def test_text_generation_pipeline():
    model = kit.tiny_model("rmt", {"num_memory_tokens": 2}, dtype=torch.float32)
    tokenizer = tiny_tokenizer(model.vocab_size)
    wrapped = hf.MemzooForCausalLM.from_memzoo(model).eval()
    pipe = transformers.pipeline("text-generation", model=wrapped, tokenizer=tokenizer)
    text = pipe("w1 w2 w3", max_new_tokens=6, do_sample=False)[0]["generated_text"]
    ids = tokenizer("w1 w2 w3", return_tensors="pt").input_ids
    expected = model.generate(ids, 6)[0, 3:].tolist()
    assert text.split()[-5:] == [f"w{i}" if i else "<unk>" for i in expected][-5:]
    assert text.startswith("w1 w2 w3")
