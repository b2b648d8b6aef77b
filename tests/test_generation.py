"""Generation, generated from the registry: for every registered variant and every
entry of its config's ``conformance_options``, ``generate`` (prefill + one token per call
through the state) equals the slow reference (a full forward over the growing
sequence per token), greedy and sampled, in float64; states continue exactly; bad
input and foreign states are refused."""

from __future__ import annotations

import functools
import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import memzoo
from memzoo import testing as kit
from memzoo.generation import SamplingConfig, generate_reference, process_logits

CASES = [pytest.param(name, opts, id=case_id) for name, opts, case_id in kit.registry_cases()]
SAMPLED = dict(temperature=0.8, top_k=9, top_p=0.9, repetition_penalty=1.3)


@functools.lru_cache(maxsize=None)
def _model(name: str, opts_key: str):
    return kit.tiny_model(name, json.loads(opts_key))


def model_for(name, opts):
    return _model(name, json.dumps(opts, sort_keys=True))


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


decoding = st.tuples(
    st.integers(1, 2),  # batch
    st.integers(1, 9),  # prompt length
    st.integers(1, 13),  # new tokens (crosses block_size=4 boundaries several times)
    st.sampled_from([None, 1, 3]),  # prefill_chunk
    st.integers(0, 2**16),  # seed
)


@pytest.mark.parametrize("name,opts", CASES)
@settings(max_examples=10)
@given(case=decoding)
def test_greedy_equals_argmax_chain_of_full_forwards(name, opts, case):
    batch, length, n, chunk, seed = case
    model = model_for(name, opts)
    prompt = kit.random_tokens(model, batch, length, seed)
    out = model.generate(prompt, n, prefill_chunk=chunk)
    assert out.shape == (batch, length + n)
    assert torch.equal(out[:, :length], prompt)
    assert torch.equal(out, generate_reference(model, prompt, n))


@pytest.mark.parametrize("name,opts", CASES)
@settings(max_examples=6)
@given(case=decoding)
def test_sampling_equals_same_sampling_over_full_forwards(name, opts, case):
    batch, length, n, chunk, seed = case
    model = model_for(name, opts)
    prompt = kit.random_tokens(model, batch, length, seed)
    out = model.generate(prompt, n, generator=gen(seed), prefill_chunk=chunk, **SAMPLED)
    assert torch.equal(out, generate_reference(model, prompt, n, generator=gen(seed), **SAMPLED))
    # the generator decides: another seed gives another continuation somewhere (V=23, 13 draws)
    if n >= 8:
        outs = {tuple(model.generate(prompt, n, generator=gen(s), temperature=100.0).flatten().tolist()) for s in range(4)}
        assert len(outs) > 1


@pytest.mark.parametrize("name,opts", CASES)
def test_decode_step_logits_equal_full_forward(name, opts):
    """The fast path's logits at every step (not only their argmax) equal a full forward."""
    model = model_for(name, opts)
    seq = kit.random_tokens(model, 2, 19, seed=5)
    with torch.no_grad():
        full = model(seq).logits
        logits, state = model.prefill(seq[:, :3])
        steps = [logits]
        for i in range(3, seq.shape[1]):
            logits, state = model.decode_step(seq[:, i : i + 1], state)
            steps.append(logits)
    kit.assert_close(torch.stack(steps, dim=1), full[:, 2:], "decode_step logits vs one full forward")
    assert state.pos == seq.shape[1]


@pytest.mark.parametrize("name,opts", CASES)
def test_state_handed_back_continues_exactly(name, opts):
    model = model_for(name, opts)
    first, second = kit.random_tokens(model, 2, 6, seed=1), kit.random_tokens(model, 2, 3, seed=2)
    out1, state = model.generate(first, 5, return_state=True)
    assert state.pos == out1.shape[1]
    out2, state2 = model.generate(second, 6, state=state, return_state=True)
    assert out2.shape == (2, 9) and state2.pos == out1.shape[1] + out2.shape[1]
    whole = generate_reference(model, torch.cat([out1, second], dim=1), 6)
    assert torch.equal(out2[:, 3:], whole[:, -6:])
    # and the state equals the one a single forward over everything gives
    with torch.no_grad():
        _, expected = model(torch.cat([out1, out2], dim=1))
    kit.assert_states_equal(state2, expected, "state handed back by generate")


@pytest.mark.parametrize("name,opts", CASES)
def test_stream_yields_what_generate_returns(name, opts):
    model = model_for(name, opts)
    prompt = kit.random_tokens(model, 1, 5, seed=3)
    streamed = list(model.stream(prompt, 7, generator=gen(1), **SAMPLED))
    assert all(t.shape == (1,) for t in streamed)
    out = model.generate(prompt, 7, generator=gen(1), **SAMPLED)
    assert torch.equal(torch.stack(streamed, dim=1), out[:, 5:])


def test_eos_stops_each_row_and_pads():
    model = model_for("full", {})
    prompt = kit.random_tokens(model, 2, 4, seed=0)
    free = model.generate(prompt, 12)
    # stop on the token row 0 produces third: row 0 ends there, row 1 goes on (or ends on its own)
    eos = int(free[0, 6])
    out = model.generate(prompt, 12, eos_token_id=eos, pad_token_id=0)
    ref = generate_reference(model, prompt, 12, eos_token_id=eos, pad_token_id=0)
    assert torch.equal(out, ref)
    row0 = out[0, 4:].tolist()
    first = row0.index(eos)
    assert first <= 2 and all(t == 0 for t in row0[first + 1 :])
    # several eos ids; when every row has finished, generation stops early
    both = [int(free[0, 4]), int(free[1, 4])]
    early = model.generate(prompt, 12, eos_token_id=both)
    assert early.shape == (2, 5) and torch.equal(early, generate_reference(model, prompt, 12, eos_token_id=both))
    _, state = model.generate(prompt, 12, eos_token_id=both, return_state=True)
    assert state.pos == 5


def test_prefill_chunk_gives_the_same_state():
    model = model_for("fam", memzoo.get_variant("fam").config.conformance_options[0])
    prompt = kit.random_tokens(model, 2, 11, seed=4)
    a, sa = model.generate(prompt, 4, return_state=True)
    b, sb = model.generate(prompt, 4, return_state=True, prefill_chunk=3)
    assert torch.equal(a, b)
    kit.assert_states_equal(sb, sa, "prefill in chunks of 3 vs one call")


def test_input_and_state_are_validated_once_per_call(monkeypatch):
    """The decode loop runs without per-call checks (``check_tokens`` syncs a GPU)."""
    model = kit.tiny_model("bswa", {"memory_blocks": 1})
    calls = {"tokens": 0, "state": 0}
    check_tokens, check_state = model.check_tokens, model.backbone.check_state

    def count(kind, fn):
        def wrapped(*a, **k):
            calls[kind] += 1
            return fn(*a, **k)
        return wrapped

    monkeypatch.setattr(model, "check_tokens", count("tokens", check_tokens))
    monkeypatch.setattr(model.backbone, "check_state", count("state", check_state))
    _, state = model.generate(kit.random_tokens(model, 1, 3), 20, return_state=True)
    model.generate(kit.random_tokens(model, 1, 3), 20, state=state)
    assert calls == {"tokens": 2, "state": 1}


def test_foreign_states_are_refused():
    bswa = kit.tiny_model("bswa", {"memory_blocks": 1})
    prompt = kit.random_tokens(bswa, 1, 5)
    _, state = bswa.generate(prompt, 3, return_state=True)
    other_config = kit.tiny_model("bswa", {"memory_blocks": 2})
    with pytest.raises(memzoo.StateError, match="memory_blocks"):
        other_config.generate(prompt, 3, state=state)
    other_variant = kit.tiny_model("full")
    with pytest.raises(memzoo.StateError, match="bswa"):
        other_variant.generate(prompt, 3, state=state)
    same_config_other_weights = kit.tiny_model("bswa", {"memory_blocks": 1}, seed=1)
    with pytest.raises(memzoo.StateError, match="another model"):
        same_config_other_weights.generate(prompt, 3, state=state)
    with pytest.raises(memzoo.StateError, match="another model"):
        list(same_config_other_weights.stream(prompt, 3, state=state))
    with pytest.raises(memzoo.StateError, match="batch size"):
        bswa.generate(prompt.expand(2, -1), 3, state=state)
    bswa.generate(prompt, 3, state=state)  # its own model continues it


@pytest.mark.parametrize(
    "options,words",
    [
        (dict(temperature=-1.0), ["temperature"]),
        (dict(temperature=0.5, top_k=0), ["top_k"]),
        (dict(temperature=0.5, top_p=1.5), ["top_p"]),
        (dict(top_k=5), ["temperature > 0"]),
        (dict(repetition_penalty=0.0), ["repetition_penalty"]),
        (dict(eos_token_id=23), ["[0, 22]"]),
        (dict(eos_token_id=[]), ["eos_token_id"]),
        (dict(eos_token_id=1, pad_token_id=99), ["[0, 22]"]),
        (dict(max_new_tokens=-1), ["max_new_tokens"]),
        (dict(prefill_chunk=0), ["prefill_chunk"]),
        (dict(generator=0), ["torch.Generator"]),
        (dict(attention_mask=torch.tensor([[1, 0, 1, 1], [1, 1, 1, 1]])), ["row 0", "contiguous"]),
        (dict(attention_mask=torch.ones(2, 3)), ["shape"]),
        (dict(temperature="hot"), ["temperature"]),
    ],
)
def test_bad_options_are_refused_clearly(options, words):
    model = model_for("full", {})
    prompt = kit.random_tokens(model, 2, 4)
    options = {"max_new_tokens": 3, **options}
    for call in (model.generate, lambda *a, **k: list(model.stream(*a, **k))):
        with pytest.raises(memzoo.InputError) as err:
            call(prompt, **options)
        for w in words:
            assert w in str(err.value)


def test_bad_prompts_are_refused_clearly():
    model = model_for("full", {})
    with pytest.raises(memzoo.InputError, match=r"\[0, 22\]"):
        model.generate(torch.full((1, 3), 23), 2)
    with pytest.raises(memzoo.InputError, match="int64"):
        model.generate(torch.zeros(1, 3), 2)
    model.generate(torch.zeros(2, 3, dtype=torch.long), 2, attention_mask=torch.ones(2, 3, dtype=torch.long))  # all ones: fine


def test_sampling_config_is_strict():
    with pytest.raises(ValueError, match="extra"):
        SamplingConfig(temprature=1.0)
    with pytest.raises(ValueError):
        SamplingConfig(top_k="5", temperature=1.0)


def test_logits_processing_equals_transformers():
    """The sampling conventions are transformers' (so the HF wrapper agrees with memzoo)."""
    tg = pytest.importorskip("transformers.generation.logits_process")
    gen_ = torch.Generator().manual_seed(0)
    scores = torch.randn(3, 50, generator=gen_, dtype=torch.float64)
    ids = torch.randint(0, 50, (3, 7), generator=gen_)
    seen = torch.zeros(3, 50, dtype=torch.bool).scatter_(1, ids, True)
    for temperature, k, p, rep in [(1.0, None, None, 1.2), (0.9, None, None, 0.7), (0.7, 10, 0.9, 1.2), (1.0, None, 0.5, None), (1.3, 3, None, 0.8), (0.5, 50, 0.999, None)]:
        ours = process_logits(scores, seen, SamplingConfig(temperature=temperature, top_k=k, top_p=p, repetition_penalty=rep))
        theirs = scores.clone()
        if rep is not None:
            theirs = tg.RepetitionPenaltyLogitsProcessor(rep)(ids, theirs)
        theirs = tg.TemperatureLogitsWarper(temperature)(ids, theirs) if temperature != 1.0 else theirs
        if k is not None:
            theirs = tg.TopKLogitsWarper(k)(ids, theirs)
        if p is not None:
            theirs = tg.TopPLogitsWarper(p)(ids, theirs)
        assert torch.equal(ours, theirs), (temperature, k, p, rep)


def test_half_precision_models_sample_in_float32():
    model = kit.tiny_model("bswa", {"memory_blocks": 1}, dtype=torch.bfloat16)
    prompt = kit.random_tokens(model, 2, 5)
    out = model.generate(prompt, 6, generator=gen(0), **SAMPLED)
    assert out.shape == (2, 11) and out.dtype == torch.long
    assert torch.equal(out, model.generate(prompt, 6, generator=gen(0), **SAMPLED))


def test_generate_writes_its_own_state_in_place_and_never_a_callers():
    """generate's decode steps write the one new row of each full ring buffer into the
    state the prompt made (no copy of the caches per token); a state passed in is never
    written: generating twice from it gives the same tokens, and it is unchanged."""
    torch.manual_seed(0)
    model = memzoo.build_model("bswa", vocab_size=32, d_model=16, n_layers=2, n_heads=2, block_size=4, memory_blocks=1).eval()
    prompt = torch.randint(0, 32, (1, 12))
    with torch.no_grad():
        _, given = model(prompt)
    before = [t.clone() for t in given.tensors()]
    seen = []
    real = model.decode_step

    def spy(tokens, state):
        seen.append(state.k[0])
        return real(tokens, state)

    model.decode_step = spy
    first, after = model.generate(prompt[:, -1:], 10, state=given, return_state=True)
    del model.decode_step
    assert all(k is seen[1] for k in seen[1:]) and after.k[0] is seen[1], "decode steps should reuse the prompt's buffers"
    assert all(torch.equal(a, b) for a, b in zip(given.tensors(), before)), "the caller's state was written"
    again = model.generate(prompt[:, -1:], 10, state=given)
    assert torch.equal(first, again)
    # not even inside a caller's in-place block (the prompt pass reads the caller's state)
    with memzoo.ring.written_in_place():
        inside = model.generate(prompt[:, -1:], 10, state=given)
        streamed = torch.stack(list(model.stream(prompt[:, -1:], 10, state=given)), dim=1)
    assert all(torch.equal(a, b) for a, b in zip(given.tensors(), before)), "the caller's state was written in place"
    assert torch.equal(inside, first) and torch.equal(streamed, first[:, 1:])


def test_streamer_gets_exactly_the_returned_tokens_with_eos():
    """With eos and no return_state, generate checks "every row finished" every few steps;
    a streamer must still see no token after the last one returned (it got up to 7 pad
    tokens more than the output held)."""
    model = kit.tiny_model("bswa", {"memory_blocks": 1})
    prompt = kit.random_tokens(model, 1, 5)
    free = model.generate(prompt, 12)
    eos = int(free[0, 6])  # the second new token: the row finishes after two
    seen: list[int] = []
    out = model.generate(prompt, 12, eos_token_id=eos, streamer=lambda t: seen.append(int(t[0])))
    assert out[0, 5:].tolist() == seen == [int(t) for t in model.stream(prompt, 12, eos_token_id=eos)]


def test_a_copy_of_the_model_continues_its_states_whenever_it_was_made():
    """The generation id is copied with the model (deepcopy), as its weights are: a copy made
    before the first generate(return_state=True) continues the original's states as one made
    after does (it was refused: the id was made lazily, so the earlier copy got its own)."""
    import copy

    model = kit.tiny_model("bswa", {"memory_blocks": 1})
    before = copy.deepcopy(model)
    prompt = kit.random_tokens(model, 1, 5)
    _, state = model.generate(prompt, 3, return_state=True)
    after = copy.deepcopy(model)
    expected = model.generate(prompt[:, :1], 4, state=state)
    assert torch.equal(before.generate(prompt[:, :1], 4, state=state), expected)
    assert torch.equal(after.generate(prompt[:, :1], 4, state=state), expected)
