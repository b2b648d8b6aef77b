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

#: every registered variant's conformance options and layer presets (GQA, biases, RoPE scaling)
CASES = [pytest.param(name, opts, id=case_id) for name, opts, case_id in kit.registry_cases()]


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


def padded(model, side):
    """Prompts of 6, 3 and 1 real tokens in a (3, 6) batch, padded on ``side``."""
    tokens = kit.random_tokens(model, 3, 6, seed=2)
    mask = torch.zeros(3, 6, dtype=torch.long)
    for i, n in enumerate([6, 3, 1]):
        if side == "left":
            mask[i, 6 - n :] = 1
        else:
            mask[i, :n] = 1
    return tokens, mask


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("name,opts", CASES)
def test_transformers_generate_with_padding_equals_memzoo_generate(name, opts, side):
    """transformers passes the growing attention_mask: the wrapper runs the prompt's padded
    rows through memzoo's ragged path and each new column after it. Each row gets what
    memzoo's generate gives it with the same mask (and so what it gets alone)."""
    model = kit.tiny_model(name, opts)
    wrapped = hf.MemzooForCausalLM.from_memzoo(model).eval()
    tokens, mask = padded(model, side)
    greedy = wrapped.generate(tokens, attention_mask=mask, max_new_tokens=8, do_sample=False)
    assert torch.equal(greedy, model.generate(tokens, 8, attention_mask=mask))
    # (no repetition_penalty: transformers' penalises the pad ids in input_ids too, memzoo does not)
    sampling = dict(temperature=0.8, top_k=9, top_p=0.9)
    torch.manual_seed(5)
    sampled = wrapped.generate(tokens, attention_mask=mask, max_new_tokens=8, do_sample=True, **sampling)
    expected = model.generate(tokens, 8, attention_mask=mask, generator=torch.Generator().manual_seed(5), **sampling)
    assert torch.equal(sampled, expected)


def test_forward_with_padding():
    model = kit.tiny_model("bswa", {"memory_blocks": 1})
    wrapped = hf.MemzooForCausalLM.from_memzoo(model).eval()
    tokens, mask = padded(model, "right")
    with torch.no_grad():
        ours = wrapped(tokens, attention_mask=mask).logits
        theirs = model(tokens, attention_mask=mask).logits
    real = mask.bool()
    kit.assert_close(ours[real], theirs[real], "wrapper logits at real tokens")
    # after a row's real tokens the logits repeat its last real token's: the last column is the next token's
    for i, n in enumerate([6, 3, 1]):
        kit.assert_close(ours[i, n:], theirs[i, n - 1].expand(6 - n, -1), f"row {i} logits at right padding")
    left, left_mask = padded(model, "left")
    with torch.no_grad():
        at_padding = wrapped(left, attention_mask=left_mask).logits[~left_mask.bool()]
    assert at_padding.shape == (8, model.vocab_size) and not at_padding.any()  # before a row's first real token: 0
    with pytest.raises(memzoo.InputError, match="shape"):
        wrapped(tokens, attention_mask=torch.ones(3, 7, dtype=torch.long))
    with pytest.raises(memzoo.InputError, match="contiguous"):
        wrapped(tokens, attention_mask=torch.tensor([[1, 0, 1, 1, 1, 1]] * 3))


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


@pytest.mark.parametrize("tie", [False, True])
def test_resize_token_embeddings(tmp_path, tie):
    """transformers' ``resize_token_embeddings`` (new tokens for fine-tuning) resizes the
    embedding and the head (tied or not); the old tokens' logits are unchanged, the new ids
    are accepted, and the resized model saves and loads back through both loaders."""
    model = kit.tiny_model("fam", {"memory_blocks": 1, "fam_len": 2}, tie_embeddings=tie)
    v = model.vocab_size
    prompt = kit.random_tokens(model, 1, 7)
    with torch.no_grad():
        before = model(prompt).logits
    wrapped = hf.MemzooForCausalLM.from_memzoo(model)
    wrapped.resize_token_embeddings(v + 5)
    assert model.vocab_size == wrapped.config.vocab_size == wrapped.config.memzoo["vocab_size"] == v + 5
    assert model.embed.weight.shape[0] == model.head.weight.shape[0] == v + 5
    assert (model.head.weight is model.embed.weight) == tie
    new_ids = torch.cat([prompt, torch.tensor([[v + 4, v]])], dim=1)
    with torch.no_grad():
        after = wrapped(new_ids).logits
        kit.assert_close(after[:, :7, :v], before, "old tokens' logits after the resize")
    wrapped.save_pretrained(tmp_path)
    for loaded in (memzoo.from_pretrained(tmp_path), transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float64)):
        with torch.no_grad():
            assert torch.equal(loaded(new_ids).logits, after)


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


def test_text_generation_pipeline_with_a_padded_batch():
    """Prompts of different lengths in one batch (the tokenizer pads on the left): each
    gets what it gets alone."""
    model = kit.tiny_model("bswa", {"memory_blocks": 1}, dtype=torch.float32)
    tokenizer = tiny_tokenizer(model.vocab_size)
    tokenizer.padding_side = "left"
    wrapped = hf.MemzooForCausalLM.from_memzoo(model).eval()
    pipe = transformers.pipeline("text-generation", model=wrapped, tokenizer=tokenizer)
    prompts = ["w1 w2 w3 w4 w5", "w6", "w7 w8"]
    batched = pipe(prompts, max_new_tokens=5, do_sample=False, batch_size=3, return_tensors=True)
    for prompt, out in zip(prompts, batched):
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        expected = model.generate(ids, 5)[0, -5:].tolist()
        assert out[0]["generated_token_ids"][-5:] == expected, prompt
