"""PEFT LoRA on memzoo models loaded from a pretrained-layout checkpoint: every variant
sees the adapters on every path (tokens, memory re-projection, FAM, memory tokens)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import memzoo

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

VOCAB, T = 53, 20


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A tiny random Llama (GQA, tied embeddings) saved by transformers."""
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=24, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=True, rms_norm_eps=1e-5,
    )
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.3 * torch.randn_like(p) if "norm" in name else 0.2 * torch.randn_like(p))
    folder = tmp_path_factory.mktemp("llama")
    model.save_pretrained(folder)
    return folder


def tokens(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("variant", memzoo.list_variants())
def test_lora_is_seen_on_every_path(checkpoint, variant, load_on_checkpoint):
    """LoRA on q_proj/v_proj changes every variant's outputs, and the unmerged adapters
    give what the merged weights give (float64), with and without grad: no path of the
    variant reads a projection's ``.weight`` around the module."""
    model = load_on_checkpoint(checkpoint, variant, dtype=torch.float64)
    toks = tokens()
    with torch.no_grad():
        base = model(toks).logits
    lora = peft.get_peft_model(model, peft.LoraConfig(target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    assert sum("lora_" in n for n, _ in lora.named_parameters()) == 4 * model.backbone.n_layers
    with torch.no_grad():
        adapted = lora(toks).logits
    adapted_grad = lora(toks).logits.detach()
    assert (adapted - base).abs().max() > 1e-3, "LoRA did not change the outputs"
    merged = lora.merge_and_unload()
    with torch.no_grad():
        expected = merged(toks).logits
    for got, how in ((adapted, "no_grad"), (adapted_grad, "grad")):
        err = (got - expected).abs().max().item()
        assert err <= 1e-9, f"{variant} ({how}): unmerged LoRA differs from merged by {err:.2e}"


def test_lora_tunes_fam(checkpoint, tmp_path):
    """LoRA-tune a FAM model for a few steps: only the adapters and the FAM prompt change,
    every base weight stays bit-identical; merge_and_unload -> save_pretrained ->
    from_pretrained gives the tuned model's outputs."""
    model = memzoo.from_pretrained(checkpoint, "fam", block_size=4, memory_blocks=1, fam_len=2).train()
    lora = peft.get_peft_model(model, peft.LoraConfig(target_modules=["q_proj", "v_proj"], r=4))
    model.backbone.prompt.requires_grad_(True)  # PEFT freezes everything but the adapters
    before = {n: p.detach().clone() for n, p in lora.named_parameters()}
    trainable = {n for n, p in lora.named_parameters() if p.requires_grad}
    assert trainable == {n for n in before if "lora_" in n} | {"base_model.model.backbone.prompt"}
    opt = torch.optim.Adam([p for p in lora.parameters() if p.requires_grad], lr=1e-2)
    toks = tokens(1)
    losses = []
    for _ in range(4):
        logits = lora(toks[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), toks[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    after = dict(lora.named_parameters())
    changed = {n for n in before if not torch.equal(before[n], after[n].detach())}
    assert changed == trainable, f"changed {sorted(changed ^ trainable)} unexpectedly"
    lora.eval()
    with torch.no_grad():
        tuned = lora(toks).logits
    merged = lora.merge_and_unload()
    merged.save_pretrained(tmp_path)
    again = memzoo.from_pretrained(tmp_path)
    assert again.variant == "fam" and again.head.weight is again.embed.weight
    with torch.no_grad():
        reloaded = again(toks).logits
        assert torch.equal(reloaded, merged(toks).logits)
    err = ((reloaded - tuned).abs().max() / tuned.abs().max()).item()
    assert err <= 1e-5, f"merged and reloaded model differs from the tuned one by {err:.2e} (relative)"


def test_save_pretrained_refuses_unmerged_adapters_and_saves_merged_ones(checkpoint, tmp_path):
    """A model holding unmerged LoRA adapters wrote a folder from_pretrained then refused
    (``q_proj.base_layer.weight``, ``lora_A`` ...); now the save itself is refused with the
    remedy, and the merged model saves and loads back with the adapters' effect."""
    model = memzoo.from_pretrained(checkpoint, "bswa", block_size=4, memory_blocks=1)
    tuned = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    with pytest.raises(memzoo.pretrained.PretrainedError, match=r"unmerged LoRA adapters.*merge_and_unload"):
        model.save_pretrained(tmp_path / "unmerged")
    assert not (tmp_path / "unmerged").exists()
    with torch.no_grad():
        expected, _ = tuned(tokens())
    merged = tuned.merge_and_unload()
    merged.save_pretrained(tmp_path / "merged")
    with torch.no_grad():
        got, _ = memzoo.from_pretrained(tmp_path / "merged")(tokens())
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("variant, targets", [("xl", ["k_proj", "v_proj"]), ("brt", ["state_k_proj", "state_v_proj"])])
def test_switching_a_lora_adapter_off_is_noticed_by_the_decode_caches(variant, targets):
    """XL keeps its memory's keys/values and BRT its states' keys/values between no-grad
    calls, keyed on the weights; peft's ``disable_adapter()`` changes what those projections
    compute without changing a tensor. Continuing a state with the adapter switched off
    (or back on) must equal the same call with nothing kept."""
    options = {"memory_len": 4} if variant == "xl" else {"num_states": 3}
    torch.manual_seed(0)
    model = memzoo.build_model(variant, vocab_size=VOCAB, d_model=16, n_heads=2, n_layers=2, block_size=4, **options)
    model = model.double().eval()
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=targets, init_lora_weights=False))
    toks = tokens()[:1, :10]

    def continuation(state):
        fresh = state.detach()  # the same state with nothing kept (detach drops the kept tensors)
        if variant == "xl":
            model.backbone.clear_inference_cache()
        want, _ = model(toks[:, 9:], state=fresh)
        return want

    with torch.no_grad():
        _, state = model(toks[:, :9])  # adapter on: keeps what the next decode step reuses
        with wrapped.disable_adapter():
            got, _ = model(toks[:, 9:], state=state)
            want = continuation(state)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
        with wrapped.disable_adapter():
            _, state = model(toks[:, :9])
        got, _ = model(toks[:, 9:], state=state)  # adapter back on
        want = continuation(state)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    "variant,options,targets",
    [
        ("xl", {"memory_len": 4, "positions": "rope"}, ["k_proj", "v_proj"]),
        ("xl", {"memory_len": 4}, ["k_proj", "v_proj"]),
        ("brt", {"num_states": 2}, ["state_k_proj", "state_v_proj"]),
    ],
)
def test_generate_states_continued_with_the_adapter_off_use_its_keys(variant, options, targets):
    """xl's memory K/V memo and brt's kept state K/V are keyed on weight tensors; PEFT's
    ``disable_adapter()`` changes what k/v_proj compute without touching a tensor, so a
    state continued with the adapter off must not reuse the adapter's keys/values."""
    from memzoo import testing as kit

    model = kit.tiny_model(variant, options)
    lora = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=targets, init_lora_weights=False))
    model.eval()
    prompt, reply = kit.random_tokens(model, 1, 9, seed=1), kit.random_tokens(model, 1, 2, seed=2)
    _, state = model.generate(prompt, 4, return_state=True)  # adapter on: the caches are the adapter's
    with lora.disable_adapter(), torch.no_grad():
        got = model(reply, state=state).logits  # the state's own tensors: a cache hit if keyed on tensors alone
        expected = model(reply, state=state.detach()).logits  # other tensor objects: no cache
    assert (got - expected).abs().max().item() <= 1e-12
