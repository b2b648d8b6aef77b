"""Generation from prompts of different lengths (an ``attention_mask``, left or right
padding), generated from the registry: every row gets exactly the tokens it gets
alone, greedy and sampled, in float64; the state handed back (a ``RaggedState``)
continues exactly; ``stream``, ``prefill_chunk``, eos and the repetition penalty see
each row's real tokens only."""

from __future__ import annotations


import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import memzoo
from memzoo import testing as kit
from memzoo.generation import generate_reference, seen_tokens
from memzoo.ragged import RaggedState

from test_generation import CASES, SAMPLED, gen, model_for  # one model cache for both files


def padded(model, lengths, width, side, seed=0):
    """Random prompts of ``lengths`` in a (B, width) batch, padded on ``side`` ("left",
    "right", or "both": split around the real tokens), the padding filled with random ids."""
    tokens = kit.random_tokens(model, len(lengths), width, seed)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for i, n in enumerate(lengths):
        start = {"left": width - n, "right": 0, "both": (width - n) // 2}[side]
        mask[i, start : start + n] = 1
    return tokens, mask


def alone(model, tokens, mask, n, **options):
    """Each row's new tokens when its real tokens are generated alone (batch 1)."""
    return [model.generate(tokens[i : i + 1, mask[i].bool()], n, **options)[0, -n:] for i in range(tokens.shape[0])]


ragged = st.tuples(
    st.lists(st.integers(1, 7), min_size=2, max_size=3),  # real tokens per row
    st.sampled_from(["left", "right", "both"]),
    st.integers(1, 9),  # new tokens (crosses block_size=4 boundaries)
    st.sampled_from([None, 1, 3]),  # prefill_chunk
    st.integers(0, 2**16),  # seed
)


@pytest.mark.parametrize("name,opts", CASES)
@settings(max_examples=5, deadline=None)
@given(case=ragged)
def test_padded_batch_greedy_equals_each_prompt_alone(name, opts, case):
    lengths, side, n, chunk, seed = case
    model = model_for(name, opts)
    width = max(lengths) + 1  # at least one pad in every row
    tokens, mask = padded(model, lengths, width, side, seed)
    out = model.generate(tokens, n, attention_mask=mask, prefill_chunk=chunk)
    assert out.shape == (len(lengths), width + n)
    assert torch.equal(out[:, :width], tokens)  # torch.cat([tokens, new], 1), as transformers
    for i, expected in enumerate(alone(model, tokens, mask, n)):
        assert torch.equal(out[i, width:], expected), f"row {i} ({side} padded, {lengths[i]} real tokens)"
    assert torch.equal(out, generate_reference(model, tokens, n, attention_mask=mask))


@pytest.mark.parametrize("name,opts", CASES)
@settings(max_examples=3, deadline=None)
@given(case=ragged)
def test_padded_batch_sampling_equals_reference(name, opts, case):
    """Sampling with one generator draws for the whole batch at once, so a row cannot be
    compared with its own alone-run; the reference instead runs each row's full forward
    alone and samples the stacked logits in one draw, the order ``generate`` draws in."""
    lengths, side, n, chunk, seed = case
    model = model_for(name, opts)
    tokens, mask = padded(model, lengths, max(lengths) + 1, side, seed)
    out = model.generate(tokens, n, attention_mask=mask, prefill_chunk=chunk, generator=gen(seed), **SAMPLED)
    ref = generate_reference(model, tokens, n, attention_mask=mask, generator=gen(seed), **SAMPLED)
    assert torch.equal(out, ref)


@pytest.mark.parametrize("name,opts", CASES)
def test_padded_state_continues_exactly(name, opts):
    model = model_for(name, opts)
    tokens, mask = padded(model, [2, 5, 1], 6, "left", seed=3)
    out1, state = model.generate(tokens, 4, attention_mask=mask, return_state=True)
    assert isinstance(state, RaggedState)
    assert state.positions.tolist() == [2 + 4, 5 + 4, 1 + 4]
    # the next call continues each row: plain tokens, then a padded (right) reply
    reply = kit.random_tokens(model, 3, 2, seed=4)
    out2, state = model.generate(reply, 3, state=state, return_state=True)
    reply2, mask2 = padded(model, [1, 3, 2], 3, "right", seed=5)
    out3, state = model.generate(reply2, 3, attention_mask=mask2, state=state, return_state=True)
    for i in range(3):
        seq = torch.cat([tokens[i, mask[i].bool()], out1[i, 6:], out2[i], reply2[i, mask2[i].bool()]])[None]
        assert torch.equal(out3[i, 3:], model.generate(seq, 3)[0, -3:]), f"row {i}"
        with torch.no_grad():
            _, expected = model(torch.cat([seq, out3[i : i + 1, 3:]], dim=1))
        kit.assert_states_equal(state.row(i), expected, f"row {i} of the handed-back ragged state")


@pytest.mark.parametrize("name,opts", CASES)
def test_stream_with_mask_yields_what_generate_returns(name, opts):
    model = model_for(name, opts)
    tokens, mask = padded(model, [4, 1], 5, "left", seed=6)
    streamed = list(model.stream(tokens, 6, attention_mask=mask, generator=gen(2), **SAMPLED))
    assert all(t.shape == (2,) for t in streamed)
    out = model.generate(tokens, 6, attention_mask=mask, generator=gen(2), **SAMPLED)
    assert torch.equal(torch.stack(streamed, dim=1), out[:, 5:])
    greedy = list(model.stream(tokens, 6, attention_mask=mask, prefill_chunk=2))
    assert torch.equal(torch.stack(greedy, dim=1), model.generate(tokens, 6, attention_mask=mask)[:, 5:])


def test_prefill_chunk_with_mask_gives_the_same_state():
    model = model_for("fam", memzoo.get_variant("fam").config.conformance_options[0])
    tokens, mask = padded(model, [9, 3, 6], 11, "both", seed=7)
    a, sa = model.generate(tokens, 4, attention_mask=mask, return_state=True)
    for chunk in (1, 3, 5):
        b, sb = model.generate(tokens, 4, attention_mask=mask, return_state=True, prefill_chunk=chunk)
        assert torch.equal(a, b)
        for i in range(3):
            kit.assert_states_equal(sb.row(i), sa.row(i), f"row {i}, prefill in chunks of {chunk} vs one call")


def test_padding_ids_are_never_read_nor_penalised():
    model = model_for("bswa", {"memory_blocks": 1})
    tokens, mask = padded(model, [2, 5], 7, "left", seed=8)
    penalty = dict(repetition_penalty=50.0)
    # fill each row's padding with the token it picks first alone: were padding read or
    # counted as seen, the strong penalty would steer that row elsewhere
    first = [int(t[0]) for t in alone(model, tokens, mask, 1, **penalty)]
    filled = torch.where(mask.bool(), tokens, torch.tensor(first)[:, None])
    out = model.generate(filled, 5, attention_mask=mask, **penalty)
    for i, expected in enumerate(alone(model, tokens, mask, 5, **penalty)):
        assert torch.equal(out[i, 7:], expected)
    assert torch.equal(out[:, 7:], model.generate(tokens, 5, attention_mask=mask, **penalty)[:, 7:])
    # not even checked: an id outside the vocabulary (e.g. -100) at padding is fine, and kept in the output
    odd = tokens.masked_fill(~mask.bool(), -100)
    assert torch.equal(model.generate(odd, 5, attention_mask=mask, **penalty), torch.cat([odd, out[:, 7:]], dim=1))
    seen = seen_tokens(filled, model.vocab_size, mask.bool())
    for i in range(2):
        assert set(seen[i].nonzero().flatten().tolist()) == set(tokens[i, mask[i].bool()].tolist())


def test_eos_stops_each_padded_row_and_pads():
    model = model_for("full", {})
    tokens, mask = padded(model, [2, 6], 6, "left", seed=9)
    free = model.generate(tokens, 12, attention_mask=mask)
    eos = int(free[0, 8])  # row 0's third new token
    out = model.generate(tokens, 12, attention_mask=mask, eos_token_id=eos, pad_token_id=0)
    assert torch.equal(out, generate_reference(model, tokens, 12, attention_mask=mask, eos_token_id=eos, pad_token_id=0))
    row0 = out[0, 6:].tolist()
    first = row0.index(eos)
    assert first <= 2 and all(t == 0 for t in row0[first + 1 :])
    both = [int(free[0, 6]), int(free[1, 6])]
    early, state = model.generate(tokens, 12, attention_mask=mask, eos_token_id=both, return_state=True)
    assert early.shape == (2, 7)
    assert state.positions.tolist() == [3, 7]


def test_all_ones_mask_takes_the_plain_path():
    model = model_for("xl", memzoo.get_variant("xl").config.conformance_options[0])
    tokens = kit.random_tokens(model, 2, 5)
    out, state = model.generate(tokens, 4, attention_mask=torch.ones(2, 5, dtype=torch.bool), return_state=True)
    assert not isinstance(state, RaggedState) and state.pos == 9
    assert torch.equal(out, model.generate(tokens, 4))


def test_ragged_state_from_another_model_is_refused():
    model = kit.tiny_model("bswa", {"memory_blocks": 1})
    tokens, mask = padded(model, [1, 3], 3, "left")
    _, state = model.generate(tokens, 2, attention_mask=mask, return_state=True)
    assert isinstance(state, RaggedState)
    other = kit.tiny_model("bswa", {"memory_blocks": 1}, seed=1)
    with pytest.raises(memzoo.StateError, match="another model"):
        other.generate(tokens[:, -1:], 2, state=state)
    model.generate(tokens[:, -1:], 2, state=state)  # its own model continues it


def test_decode_loop_does_not_validate_per_token(monkeypatch):
    model = kit.tiny_model("bswa", {"memory_blocks": 1})
    tokens, mask = padded(model, [1, 3], 3, "left")
    calls = {"state": 0}
    check_state = model.backbone.check_state

    def counted(*a, **k):
        calls["state"] += 1
        return check_state(*a, **k)

    monkeypatch.setattr(model.backbone, "check_state", counted)
    counts = []
    for n in (2, 20):
        calls["state"] = 0
        _, state = model.generate(tokens, n, attention_mask=mask, return_state=True)
        model.generate(tokens[:, -1:], n, state=state)
        counts.append(calls["state"])
    assert counts[0] == counts[1]


@pytest.mark.parametrize(
    "mask,words",
    [
        (torch.tensor([[1, 0, 1, 1], [1, 1, 1, 1]]), ["row 0", "contiguous"]),
        (torch.tensor([[0, 0, 0, 0], [1, 1, 1, 1]]), ["row 0", "no real token"]),
        (torch.tensor([[0, 2, 1, 1], [1, 1, 1, 1]]), ["0 (padding) and 1"]),
        (torch.ones(2, 4), ["bool or an integer"]),
        (torch.ones(2, 3, dtype=torch.long), ["shape"]),
        ([[1, 1, 1, 1], [1, 1, 1, 1]], ["tensor"]),
    ],
)
def test_bad_masks_are_refused_clearly(mask, words):
    model = model_for("full", {})
    tokens = kit.random_tokens(model, 2, 4)
    for call in (model.generate, lambda *a, **k: list(model.stream(*a, **k)), model.prefill):
        with pytest.raises(memzoo.InputError) as err:
            call(tokens, attention_mask=mask) if call is model.prefill else call(tokens, 3, attention_mask=mask)
        for w in words:
            assert w in str(err.value)
