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
    assert model.vocab_size == model.config.vocab_size == wrapped.config.vocab_size == wrapped.config.memzoo["vocab_size"] == v + 5
    assert model.embed.weight.shape[0] == model.head.weight.shape[0] == v + 5
    assert (model.head.weight is model.embed.weight) == tie
    new_ids = torch.cat([prompt, torch.tensor([[v + 4, v]])], dim=1)
    with torch.no_grad():
        after = wrapped(new_ids).logits
        kit.assert_close(after[:, :7, :v], before, "old tokens' logits after the resize")
    wrapped.save_pretrained(tmp_path)
    with torch.no_grad():
        assert torch.equal(memzoo.from_pretrained(tmp_path)(new_ids).logits, after)
        # transformers' loader (5.24 with safetensors 0.8.0, here) leaves every weight a view at an offset
        # of its file (data_ptr % 64 == 24 here), and BLAS rounds the last bit otherwise for
        # such storage (3.8e-16 in float64, with weights bitwise equal): equal to rounding
        loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float64)
        assert all(torch.equal(loaded.model.state_dict()[k], t) for k, t in model.state_dict().items())
        kit.assert_close(loaded(new_ids).logits, after, "resized model through transformers' loader")


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


def _llama():
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                                   num_attention_heads=6, num_key_value_heads=2, pad_token_id=0, eos_token_id=2)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


def test_the_wrapper_keeps_the_checkpoints_special_token_ids(tmp_path):
    """from_memzoo of a model from_pretrained read carries its eos/pad ids into the config and
    the generation config, so transformers' generate stops at eos as the checkpoint does
    (it lost them and generated on past eos); save_pretrained writes them."""
    llama = _llama()
    llama.save_pretrained(tmp_path / "llama")
    prompt = torch.randint(3, 97, (3, 6), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(3)
    theirs = llama.generate(prompt, max_new_tokens=12, do_sample=True)
    for source in (tmp_path / "llama", llama):
        model = memzoo.from_pretrained(source)
        assert model.token_ids == {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
        wrapped = hf.MemzooForCausalLM.from_memzoo(model)
        assert (wrapped.generation_config.eos_token_id, wrapped.generation_config.pad_token_id) == (2, 0)
        torch.manual_seed(3)
        assert torch.equal(wrapped.generate(prompt, max_new_tokens=12, do_sample=True), theirs)
    llama.generation_config.eos_token_id = [2, 5]  # an in-memory model's generation config counts, as a folder's
    assert memzoo.from_pretrained(llama).token_ids["eos_token_id"] == [2, 5]
    model.save_pretrained(tmp_path / "out")
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (saved["eos_token_id"], saved["pad_token_id"]) == (2, 0)
    assert memzoo.from_pretrained(tmp_path / "out").token_ids == model.token_ids


def test_forward_takes_past_key_values_and_refuses_what_it_would_ignore():
    """past_key_values is cache's other name (it was dropped: 0.38 off); position_ids are
    checked against memzoo's own; arguments memzoo cannot honour are refused, not ignored."""
    wrapped = hf.MemzooForCausalLM.from_memzoo(memzoo.from_pretrained(_llama())).eval()
    x = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        head = wrapped(x[:, :8])
        a = wrapped(x[:, 8:], past_key_values=head.cache).logits
        b = wrapped(x[:, 8:], cache=head.cache).logits
        assert torch.equal(a, b)
        assert torch.equal(wrapped(x, position_ids=torch.arange(12)[None]).logits, wrapped(x).logits)
        wrapped(x[:, 8:], cache=head.cache, position_ids=torch.arange(8, 12))
        mask = torch.tensor([[0, 0] + [1] * 10, [1] * 12])
        wrapped(x, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).masked_fill(mask == 0, 1))
        wrapped(x, output_attentions=None, output_hidden_states=False, inputs_embeds=None)  # PEFT passes these
        wrapped(x, token_type_ids=torch.zeros_like(x))  # a tokenizer's single segment: nothing to honour
        with pytest.raises(memzoo.InputError, match="does not take inputs_embeds"):
            wrapped(inputs_embeds=torch.zeros(2, 12, 8))  # alone: a TypeError about a missing input_ids before
        with pytest.raises(memzoo.InputError, match="needs input_ids"):
            wrapped(attention_mask=torch.ones_like(x))
        restart = torch.tensor([[0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 5]] * 2)
        for kwargs, words in [
            (dict(position_ids=restart), "position_ids differ"),
            (dict(output_hidden_states=True), "does not take output_hidden_states"),
            (dict(not_an_argument=1), "does not take not_an_argument"),
            (dict(cache=head.cache, past_key_values=head.cache), "not both"),
            (dict(token_type_ids=(torch.arange(12) > 5).long().expand(2, 12)), "does not take token_type_ids"),
            (dict(position_ids=torch.arange(12).expand(3, 12)), r"position_ids must be a tensor \(B, T\)"),
        ]:
            with pytest.raises(memzoo.InputError, match=words):
                wrapped(x if "cache" not in kwargs else x[:, 8:], **kwargs)


def test_generate_refuses_to_continue_a_state_it_cannot_continue():
    """transformers' generate with the cache it handed back: a clear refusal naming what
    works (it raised AttributeError: 'FullState' object has no attribute 'is_compileable')."""
    wrapped = hf.MemzooForCausalLM.from_memzoo(memzoo.from_pretrained(_llama())).eval()
    x = torch.randint(3, 97, (1, 9), generator=torch.Generator().manual_seed(1))
    out = wrapped.generate(x, max_new_tokens=5, do_sample=False, return_dict_in_generate=True)
    for name in ("cache", "past_key_values"):
        with pytest.raises(memzoo.InputError, match="model.generate"):
            wrapped.generate(out.sequences, max_new_tokens=5, do_sample=False, **{name: out.cache})


def test_trainer_loss_with_num_items_in_batch_is_the_sum_over_it():
    wrapped = hf.MemzooForCausalLM.from_memzoo(memzoo.from_pretrained(_llama()))
    x = torch.randint(3, 97, (2, 10), generator=torch.Generator().manual_seed(2))
    labels = x.clone()
    labels[0, :4] = -100
    mean = wrapped(x, labels=labels).loss
    summed = wrapped(x, labels=labels, num_items_in_batch=7).loss
    n = int((labels[:, 1:] != -100).sum())
    torch.testing.assert_close(summed, mean * n / 7)
