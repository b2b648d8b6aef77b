"""memzoo.from_pretrained / save_pretrained against transformers: tiny random models of
each supported family, built from configs with transformers and saved with its
save_pretrained (no downloads)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import memzoo
from memzoo.pretrained import PretrainedError, PretrainedWarning, translate_config
from memzoo.testing.conformance import TINY

transformers = pytest.importorskip("transformers")

VOCAB = 61
COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=40, num_hidden_layers=2, rms_norm_eps=1e-5)

#: the families of the issue: Llama with GQA; Llama with llama3 rope scaling, tied
#: embeddings and a head width that is not hidden/heads; Qwen2 with q/k/v biases (and yarn);
#: Mistral (whose token-level sliding window memzoo does not apply: see test_mistral_window)
FAMILIES = {
    "llama_gqa": ("LlamaConfig", dict(num_attention_heads=4, num_key_value_heads=2, rope_parameters={"rope_type": "default", "rope_theta": 500.0})),
    "llama3_tied": ("LlamaConfig", dict(
        num_attention_heads=4, num_key_value_heads=1, head_dim=6, tie_word_embeddings=True, max_position_embeddings=16,
        rope_parameters={"rope_type": "llama3", "rope_theta": 1000.0, "factor": 4.0, "original_max_position_embeddings": 8,
                         "low_freq_factor": 1.0, "high_freq_factor": 2.0},
    )),
    "qwen2_bias": ("Qwen2Config", dict(
        num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "yarn", "rope_theta": 1000.0, "factor": 2.0, "original_max_position_embeddings": 8},
    )),
    "mistral": ("MistralConfig", dict(num_attention_heads=4, num_key_value_heads=2, sliding_window=None)),
}
T = 24


def _randomise(model: torch.nn.Module, seed: int) -> None:
    """Weights far from transformers' init (norms at 1, biases at 0 would hide a wrong map)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1 + 0.3 * noise if "norm" in name else 0.2 * noise)


def make_hf(family: str, folder: Path, **extra) -> Path:
    cls_name, kwargs = FAMILIES[family]
    config = getattr(transformers, cls_name)(**{**COMMON, **kwargs, **extra})
    model = transformers.AutoModelForCausalLM.from_config(config)
    _randomise(model, seed=sorted(FAMILIES).index(family))
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf")
    return {name: make_hf(name, root / name) for name in FAMILIES}


def hf_model(folder: Path, dtype: torch.dtype):
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager", dtype=dtype)
    return model.eval()


def tokens(batch: int = 2, length: int = T, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def logits(model, toks) -> torch.Tensor:
    with torch.no_grad():
        out = model(toks)
    return out.logits if hasattr(out, "logits") else out[0]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


# ---------------------------------------------------------------- exactness
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_full_equals_transformers(folders, family, dtype):
    """memzoo's ``full`` IS the checkpoint: logits equal transformers' within 1e-5 of their
    scale (in float64 too: transformers computes norms and RoPE angles in float32)."""
    toks = tokens()
    ours = memzoo.from_pretrained(folders[family], dtype=dtype)
    assert ours.variant == "full" and ours.embed.weight.dtype == dtype
    err = rel_err(logits(ours, toks), logits(hf_model(folders[family], dtype), toks))
    assert err <= 1e-5, f"{family} {dtype}: relative error {err:.2e}"


@pytest.mark.parametrize("family", list(FAMILIES))
def test_degenerate_variants_equal_full(folders, family):
    """bswa whose memory covers the sequence, xl (rope) with memory >= T and fam with
    fam_len=0 compute exactly the pretrained model (float64, <= 1e-9)."""
    toks, size = tokens(), 4
    full = logits(memzoo.from_pretrained(folders[family], dtype=torch.float64), toks)
    cases = {
        "bswa": dict(block_size=size, memory_blocks=T // size),
        "xl": dict(block_size=size, memory_len=T),
        "fam": dict(block_size=size, memory_blocks=T // size, fam_len=0),
    }
    for variant, fields in cases.items():
        model = memzoo.from_pretrained(folders[family], variant, dtype=torch.float64, **fields)
        err = (logits(model, toks) - full).abs().max().item()
        assert err <= 1e-9, f"{family} as {variant}: {err:.2e}"
    assert memzoo.from_pretrained(folders[family], "xl").backbone.positions == "rope"


def test_sources_agree(folders, tmp_path):
    """A sharded folder, an in-memory transformers model and a folder give the same model."""
    folder = folders["llama3_tied"]
    hf = hf_model(folder, torch.float32)
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    toks = tokens()
    expected = logits(memzoo.from_pretrained(folder), toks)
    for source in (tmp_path / "sharded", hf, str(folder)):
        model = memzoo.from_pretrained(source)
        assert model.head.weight is model.embed.weight  # the tie restored
        assert torch.equal(logits(model, toks), expected), type(source).__name__


def test_old_style_rope_config(folders, tmp_path):
    """Configs written before transformers 5 (top-level rope_theta + rope_scaling) read the same."""
    cfg = json.loads((folders["llama3_tied"] / "config.json").read_text())
    params = cfg.pop("rope_parameters")
    old = {**cfg, "rope_theta": params.pop("rope_theta"), "rope_scaling": {"type": params.pop("rope_type"), **params}}
    assert translate_config(old).fields == translate_config(cfg | {"rope_parameters": {**params, "rope_type": "llama3", "rope_theta": 1000.0}}).fields
    assert translate_config(old).fields["rope_scaling"]["type"] == "llama3"


def test_rope_scaling_beside_rope_parameters_is_not_ignored(folders):
    """A transformers-5 config with an older rope_scaling added (as context-extension
    guides say): transformers takes rope_scaling in place of rope_parameters, memzoo kept
    rope_parameters and silently ran unscaled RoPE (4.7e-3 off in the logits). It is now
    refused unless rope_scaling only repeats rope_parameters."""
    cfg = json.loads((folders["llama3_tied"] / "config.json").read_text())
    with pytest.raises(PretrainedError, match="both rope_parameters=.* and the older rope_scaling="):
        translate_config(cfg | {"rope_scaling": {"type": "linear", "factor": 4.0}})
    params = cfg["rope_parameters"]
    repeated = {"type": params["rope_type"], **{k: v for k, v in params.items() if k != "rope_type"}}
    assert translate_config(cfg | {"rope_scaling": repeated}).fields == translate_config(cfg).fields
    # transformers runs rope_scaling alone, rope_theta from the top level (default 1e4): a
    # rope_scaling without rope_parameters' theta, or without some of its keys, is not a repeat
    # (the second one transformers refuses: llama3 without low/high_freq_factor)
    for partial in ({k: v for k, v in repeated.items() if k != "rope_theta"}, {"type": params["rope_type"], "factor": params["factor"]}):
        with pytest.raises(PretrainedError, match="both rope_parameters=.* and the older rope_scaling="):
            translate_config(cfg | {"rope_scaling": partial})
    assert translate_config(cfg | {"rope_scaling": None}).fields == translate_config(cfg).fields


def test_mistral_window_is_said(folders, tmp_path):
    """Mistral's own sliding_window is a token window: memzoo does not apply it and says so."""
    folder = make_hf("mistral", tmp_path / "m", sliding_window=8)
    with pytest.warns(PretrainedWarning, match="sliding_window=8 is a token-level window"):
        model = memzoo.from_pretrained(folder, "bswa", block_size=4, memory_blocks=1)
    assert model.variant == "bswa"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        memzoo.from_pretrained(folders["mistral"])  # no window, nothing to say
        memzoo.from_pretrained(folders["qwen2_bias"])  # Qwen2's window is off unless use_sliding_window
    folder = make_hf("qwen2_bias", tmp_path / "q", use_sliding_window=True, sliding_window=8, max_window_layers=1)
    with pytest.warns(PretrainedWarning, match="qwen2's sliding_window=8"):
        memzoo.from_pretrained(folder)


def test_dtype_follows_the_checkpoint(folders, tmp_path):
    """dtype=None keeps the checkpoint's (here bfloat16); dtype= chooses."""
    hf_model(folders["llama_gqa"], torch.bfloat16).save_pretrained(tmp_path)
    assert memzoo.from_pretrained(tmp_path).embed.weight.dtype == torch.bfloat16
    assert memzoo.from_pretrained(tmp_path, dtype=torch.float32).norm.weight.dtype == torch.float32


# --------------------------------------------------------- save -> load
def _roundtrip_cases() -> list[tuple[str, dict]]:
    return [(name, opts) for name in memzoo.list_variants() for opts in memzoo.get_variant(name).config.conformance_options]


@pytest.mark.parametrize("variant,options", _roundtrip_cases(), ids=lambda v: v if isinstance(v, str) else "-".join(f"{k}={x}" for k, x in v.items()))
def test_save_load_roundtrip_every_variant(variant, options, tmp_path):
    """save_pretrained -> from_pretrained: same variant, same fields, same dtype, bit-equal
    outputs and final state (memzoo's own layers, every conformance option)."""
    torch.manual_seed(0)
    model = memzoo.build_model(variant, **{**TINY, **options}).to(torch.float64).eval()
    model.save_pretrained(tmp_path)
    again = memzoo.from_pretrained(tmp_path)
    assert again.variant == variant and again.backbone.config == model.backbone.config
    assert again.embed.weight.dtype == torch.float64
    toks = torch.randint(0, TINY["vocab_size"], (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        (a, sa), (b, sb) = model(toks), again(toks)
    assert torch.equal(a, b)
    assert all(torch.equal(x, y) for x, y in zip(sa.tensors(), sb.tensors()))


@pytest.mark.parametrize("variant", memzoo.list_variants())
def test_pretrained_variant_roundtrip(folders, variant, tmp_path, load_on_checkpoint):
    """Every variant on a pretrained checkpoint (the first of its conformance options that
    runs there) saves and loads back exactly, what it added included."""
    model = load_on_checkpoint(folders["llama3_tied"], variant)
    model.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["model_type"] == "memzoo" and cfg["architectures"] == ["MemzooForCausalLM"]
    assert cfg["memzoo"]["variant"] == variant
    again = memzoo.from_pretrained(tmp_path)
    assert again.head.weight is again.embed.weight
    assert again.backbone.config == model.backbone.config
    toks = tokens()
    assert torch.equal(logits(again, toks), logits(model, toks))


def test_added_parameters_are_real_token_embeddings(folders):
    """What a variant adds starts from the model's own token embeddings (distinct rows),
    deterministically; nothing else changes."""
    folder = folders["llama_gqa"]
    full = memzoo.from_pretrained(folder)
    embed = full.embed.weight
    fam = memzoo.from_pretrained(folder, "fam", block_size=4, fam_len=3)
    rows = [(embed == r).all(-1).nonzero().flatten().tolist() for r in fam.backbone.prompt]
    assert all(len(r) == 1 for r in rows) and len({r[0] for r in rows}) == 3
    rmt = memzoo.from_pretrained(folder, "rmt", block_size=4, num_memory_tokens=2)
    both = torch.cat([rmt.backbone.read_init, rmt.backbone.write_init])
    ids = {(embed == r).all(-1).nonzero().flatten().item() for r in both}
    assert len(ids) == 4
    assert torch.equal(memzoo.from_pretrained(folder, "fam", block_size=4, fam_len=3).backbone.prompt, fam.backbone.prompt)
    prefix = memzoo.from_pretrained(folder, "fam", block_size=4, fam_len=3, init="prefix").backbone
    assert torch.equal(prefix.prefix[0], fam.backbone.prompt)  # layer 0's input for the same prompt
    state_p = prefix.init_state(1)
    state_f = fam.backbone.init_state(1)
    for a, b in zip(state_p.fam, state_f.fam):
        torch.testing.assert_close(a, b)
    base = {k: v for k, v in fam.state_dict().items() if k != "backbone.prompt"}
    assert all(torch.equal(v, full.state_dict()[k]) for k, v in base.items())


def test_memzoo_folder_with_wrapper_prefix(folders, tmp_path):
    """A memzoo folder whose tensors carry the transformers wrapper's "model." prefix loads the same."""
    from safetensors.torch import load_file, save_file

    model = memzoo.from_pretrained(folders["qwen2_bias"], "rmt", block_size=4, num_memory_tokens=2)
    model.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    save_file({f"model.{k}": v for k, v in weights.items()}, tmp_path / "model.safetensors")
    toks = tokens()
    assert torch.equal(logits(memzoo.from_pretrained(tmp_path), toks), logits(model, toks))


def test_changing_variant_of_a_memzoo_folder(folders, tmp_path):
    """A memzoo folder loads as another variant; what its own variant added is dropped, and said."""
    memzoo.from_pretrained(folders["llama_gqa"], "fam", block_size=4, fam_len=2).save_pretrained(tmp_path)
    with pytest.warns(PretrainedWarning, match="backbone.prompt"):
        model = memzoo.from_pretrained(tmp_path, "bswa", memory_blocks=1)
    assert model.backbone.block_size == 4  # the saved shared fields are kept
    toks = tokens()
    bswa = memzoo.from_pretrained(folders["llama_gqa"], "bswa", block_size=4, memory_blocks=1)
    assert torch.equal(logits(model, toks), logits(bswa, toks))


@pytest.mark.parametrize(
    "variant,saved,asked,dropped",
    [
        ("fam", dict(fam_len=2, memory_blocks=1), dict(fam_len=4), "backbone.prompt"),
        ("rmt", dict(num_memory_tokens=3), dict(num_memory_tokens=1), "backbone.read_init"),
        ("brt", dict(num_states=4), dict(num_states=2), "backbone.cell.initial_state"),
    ],
)
def test_a_memzoo_folder_with_other_sizes_of_its_own_options(folders, tmp_path, variant, saved, asked, dropped):
    """docs/pretrained.md: a memzoo folder loaded as its own variant with other options
    skips what the variant added, with a warning. An added tensor of another size
    (fam_len 2 -> 4) was a shape error; it starts afresh, as from the original checkpoint."""
    memzoo.from_pretrained(folders["llama_gqa"], variant, block_size=4, **saved).save_pretrained(tmp_path)
    with pytest.warns(PretrainedWarning, match=f"{dropped}.*another shape"):
        model = memzoo.from_pretrained(tmp_path, variant, **asked)
    direct = memzoo.from_pretrained(folders["llama_gqa"], variant, block_size=4, **{**saved, **asked})
    toks = tokens()
    assert torch.equal(logits(model, toks), logits(direct, toks))
    weights = dict(model.state_dict())  # the same options: a resized tensor stays an error
    model.save_pretrained(tmp_path / "again")
    from safetensors.torch import load_file, save_file

    stored = load_file(tmp_path / "again" / "model.safetensors")
    save_file({**stored, dropped: torch.zeros(7, weights[dropped].shape[-1])}, tmp_path / "again" / "model.safetensors")
    with pytest.raises(PretrainedError, match=f"tensor {dropped} has shape"):
        memzoo.from_pretrained(tmp_path / "again")


def test_xl_relative_folder_loads_as_another_variant_or_with_rope(tmp_path):
    """xl's relative-position tensors sit inside the layers (``backbone.layers.i.positions``);
    loading its folder as another variant, or as xl with RoPE, drops them with a warning,
    as for every variant's added tensors. The same variant and options keep refusing a
    tensor with no place."""
    from safetensors.torch import load_file, save_file

    saved = memzoo.build_model("xl", vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, block_size=4, memory_len=8)
    saved.save_pretrained(tmp_path)
    stored = saved.state_dict()
    for variant, options in [("bswa", dict(memory_blocks=1)), ("xl", dict(positions="rope"))]:
        with pytest.warns(PretrainedWarning, match=r"backbone\.layers\.0\.positions\.u"):
            model = memzoo.from_pretrained(tmp_path, variant, **options)
        assert model.variant == variant and model.backbone.block_size == 4
        assert all(torch.equal(t, stored[name]) for name, t in model.state_dict().items())  # every kept tensor loaded
    weights = load_file(tmp_path / "model.safetensors")
    save_file({**weights, "backbone.layers.0.positions.extra": torch.ones(3)}, tmp_path / "model.safetensors")
    with pytest.raises(PretrainedError, match="no place for"):
        memzoo.from_pretrained(tmp_path)


def test_dtype_must_be_a_floating_torch_dtype(folders):
    """A dtype that is not a floating torch.dtype is refused before the checkpoint is read."""
    for bad in ("float64", torch.int64, 64):
        with pytest.raises(TypeError, match=r"dtype must be a floating-point torch\.dtype .* got"):
            memzoo.from_pretrained(folders["llama_gqa"], dtype=bad)


def test_free_fields_and_backend(folders):
    model = memzoo.from_pretrained(folders["llama_gqa"], "bswa", block_size=8, memory_blocks=2, backend="reference", d_model=32)
    assert (model.backbone.block_size, model.backbone.memory_blocks, model.backbone.backend) == (8, 2, "reference")


# ---------------------------------------------------------------- refusals
REFUSED = {
    "partial_rotary_factor": ({"partial_rotary_factor": 0.5}, "partial_rotary_factor=0.5"),
    "parallel_residual": ({"use_parallel_residual": True}, "use_parallel_residual=True"),
    "rope_dynamic": ({"rope_parameters": {"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0}}, "rope type='dynamic'"),
    "rope_longrope": ({"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4}}, "rope type='longrope'"),
    "model_type": ({"model_type": "gpt2"}, "model_type 'gpt2' is not supported"),
    "hidden_act": ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
    "attention_dropout": ({"attention_dropout": 0.1}, "attention_dropout=0.1"),
    "layer_types": ({"layer_types": ["chunked_attention", "full_attention"]}, "layer_types"),
    "quantization_config": ({"quantization_config": {"quant_method": "bitsandbytes"}}, "quantization_config="),
}


def test_dequantised_gguf_config_is_read():
    """transformers' GGUF loader dequantises and keeps a note of the file: not a refusal."""
    cfg = {**COMMON, "model_type": "llama", "num_attention_heads": 4, "quantization_config": {"quant_method": "gguf", "gguf_file": "x.gguf"}}
    assert translate_config(cfg).fields["d_model"] == 32


@pytest.mark.parametrize("case", list(REFUSED))
def test_refused_config_keys(folders, tmp_path, case):
    """A config key that changes the math and is not supported is refused, naming it."""
    edit, message = REFUSED[case]
    cfg = json.loads((folders["llama_gqa"] / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, **edit}))
    (tmp_path / "model.safetensors").symlink_to(folders["llama_gqa"] / "model.safetensors")
    with pytest.raises(PretrainedError, match="supported") as err:
        memzoo.from_pretrained(tmp_path)
    assert message in str(err.value)


@pytest.mark.parametrize(
    "fields,message",
    [
        ({"d_model": 64}, r"fixes d_model=64 \(the checkpoint has 32\)"),
        ({"n_kv_heads": 4}, r"fixes n_kv_heads=4 \(the checkpoint has 2\)"),
        ({"mlp": "gelu"}, "fixes mlp='gelu'"),
    ],
)
def test_refused_fixed_fields(folders, fields, message):
    with pytest.raises(PretrainedError, match=message):
        memzoo.from_pretrained(folders["llama_gqa"], "bswa", **fields)


def test_a_fixed_float_repeated_at_float32_precision_is_accepted(folders, tmp_path):
    """A GGUF stores ``rms_norm_eps`` as a float32 (SmolLM2's 1e-5 reads 9.999999747e-06):
    repeating the card's value is no change, and the checkpoint's own value is kept; a
    different value is still refused."""
    stored = float(torch.tensor(1e-5, dtype=torch.float32))
    assert stored != 1e-5
    cfg = json.loads((folders["llama_gqa"] / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "rms_norm_eps": stored}))
    (tmp_path / "model.safetensors").symlink_to(folders["llama_gqa"] / "model.safetensors")
    model = memzoo.from_pretrained(tmp_path, "bswa", norm_eps=1e-5)
    assert model.config.norm_eps == stored
    with pytest.raises(PretrainedError, match=r"fixes norm_eps=1\.1e-05"):
        memzoo.from_pretrained(tmp_path, "bswa", norm_eps=1.1e-5)


def test_refused_xl_relative_and_unknown_field(folders):
    with pytest.raises(PretrainedError, match="relative positional attention needs new weights"):
        memzoo.from_pretrained(folders["llama_gqa"], "xl", positions="relative")
    with pytest.raises(ValueError, match="unknown field 'memory_size' for variant 'bswa'; valid fields"):
        memzoo.from_pretrained(folders["llama_gqa"], "bswa", memory_size=2)


def test_refused_tensors(folders, tmp_path):
    from safetensors.torch import load_file, save_file

    cfg = (folders["llama_gqa"] / "config.json").read_text()
    weights = load_file(folders["llama_gqa"] / "model.safetensors")
    for name, edit, message in [
        ("extra", {**weights, "model.layers.0.self_attn.q_norm.weight": torch.ones(8)}, "no place for"),
        ("missing", {k: v for k, v in weights.items() if "layers.1.mlp.up_proj" not in k}, "lacks"),
        ("shape", {**weights, "model.norm.weight": torch.ones(31)}, r"has shape \(31,\)"),
    ]:
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(cfg)
        save_file(edit, tmp_path / name / "model.safetensors")
        with pytest.raises(PretrainedError, match=message):
            memzoo.from_pretrained(tmp_path / name)
    # a Hugging Face checkpoint's tensors are never "what its variant added": as another variant, refused too
    (tmp_path / "layer_extra").mkdir()
    (tmp_path / "layer_extra" / "config.json").write_text(cfg)
    save_file({**weights, "model.layers.0.post_feedforward_layernorm.weight": torch.ones(32)}, tmp_path / "layer_extra" / "model.safetensors")
    for name in ("extra", "layer_extra"):
        with pytest.raises(PretrainedError, match="no place for"):
            memzoo.from_pretrained(tmp_path / name, "bswa", memory_blocks=1)


def test_gguf_cache_is_keyed_by_content(tmp_path, monkeypatch):
    """Copies of one .gguf file (another virtual environment, clone, name or reinstall)
    share one converted folder; a file with other content gets its own. Conversion is stubbed."""
    pytest.importorskip("gguf")
    from memzoo.pretrained import gguf as cache

    converted: list[Path] = []

    def convert(path: Path, folder: Path) -> None:
        converted.append(folder)
        folder.mkdir(parents=True)
        (folder / "config.json").write_text("{}")
        (folder / "model.safetensors").write_bytes(b"")

    monkeypatch.setattr(cache, "_convert", convert)
    monkeypatch.setenv("MEMZOO_CACHE", str(tmp_path / "cache"))
    for where, name in (("a", "m.gguf"), ("b", "renamed.gguf")):
        (tmp_path / where).mkdir()
        (tmp_path / where / name).write_bytes(b"GGUF same bytes")
    os.utime(tmp_path / "b" / "renamed.gguf", (0, 0))  # another modification time too
    first = cache.gguf_folder(tmp_path / "a" / "m.gguf")
    assert cache.gguf_folder(tmp_path / "b" / "renamed.gguf") == first and converted == [first]
    (tmp_path / "b" / "renamed.gguf").write_bytes(b"GGUF other bytes")
    other = cache.gguf_folder(tmp_path / "b" / "renamed.gguf")
    assert other != first and converted == [first, other]
    assert first.parent == other.parent == tmp_path / "cache" / "gguf"


def test_bad_sources(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a folder"):
        memzoo.from_pretrained(str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="no config.json"):
        memzoo.from_pretrained(tmp_path)
    (tmp_path / "w.bin").write_bytes(b"")
    with pytest.raises(PretrainedError, match="not a .gguf file"):
        memzoo.from_pretrained(tmp_path / "w.bin")
    with pytest.raises(TypeError, match="source must be"):
        memzoo.from_pretrained(3)


def test_hub_id_offline_says_so(tmp_path):
    """A hub id goes through huggingface_hub; offline (HF_HUB_OFFLINE=1, empty cache) the
    message says what happened and what to do. A subprocess: huggingface_hub reads the
    variable when imported."""
    pytest.importorskip("huggingface_hub")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path), "PYTHONPATH": str(Path(__file__).parent.parent)}
    code = (
        "import memzoo\n"
        "try:\n    memzoo.from_pretrained('HuggingFaceTB/SmolLM2-135M')\n"
        "except memzoo.pretrained.PretrainedError as e:\n    print('REFUSED', e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert "REFUSED cannot fetch 'HuggingFaceTB/SmolLM2-135M': the Hugging Face hub is not reachable" in out.stdout, out.stderr[-2000:]


# ------------------------------------------------------- rope translation
ROPES = {
    "linear": {"rope_type": "linear", "rope_theta": 1e4, "factor": 3.0},
    "llama3_no_original": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0},
    "yarn_mscale": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0, "original_max_position_embeddings": 64,
                    "mscale": 0.707, "mscale_all_dim": 1.0, "beta_fast": 16, "beta_slow": 2},
    "yarn_attention_factor": {"rope_type": "yarn", "rope_theta": 1e6, "factor": 2.0, "original_max_position_embeddings": 128,
                              "attention_factor": 1.3, "truncate": False},
}


@pytest.mark.parametrize("name", list(ROPES))
def test_rope_translation_matches_transformers(name):
    """The rope fields read from a config give transformers' frequencies and cos/sin factor
    (memzoo float64, transformers float32), including what transformers fills in."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from memzoo.layers.positions import RopeScaling, rope_frequencies

    config = transformers.LlamaConfig(**COMMON, num_attention_heads=2, max_position_embeddings=512, rope_parameters=dict(ROPES[name]))
    theirs, their_factor = ROPE_INIT_FUNCTIONS[ROPES[name]["rope_type"]](config, None)
    fields = translate_config(json.loads(config.to_json_string()))
    ours, our_factor = rope_frequencies(16, fields.fields["rope_base"], RopeScaling(**fields.fields["rope_scaling"]))
    torch.testing.assert_close(ours.float(), theirs.float(), rtol=1e-6, atol=0)
    assert our_factor == pytest.approx(their_factor, rel=1e-12)


@pytest.mark.parametrize("variant", memzoo.list_variants())
def test_pretrained_models_keep_the_state_equivalence(folders, variant):
    """A loaded checkpoint (what the variant added initialised from its embeddings) still
    streams exactly: chunked == one call."""
    from memzoo.testing.conformance import check_state_equivalence

    for options in memzoo.get_variant(variant).config.conformance_options:
        try:
            model = memzoo.from_pretrained(folders["qwen2_bias"], variant, dtype=torch.float64, **options)
        except (PretrainedError, ValueError):
            continue
        check_state_equivalence(model, tokens(length=13), [3, 4, 9])


def test_brt_on_a_pretrained_model_starts_as_bswa_with_one_memory_block(tmp_path):
    """brt's recurrent layer is new weights; they start from the host layer's own and the
    tokens' cross-attention output at zero, so the loaded model is exactly bswa (m=1)."""
    import transformers

    config = transformers.LlamaConfig(vocab_size=40, hidden_size=24, intermediate_size=32, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    toks = torch.randint(0, 40, (2, 19), generator=torch.Generator().manual_seed(0))
    for gate in ("fixed:skip", "lstm:dual"):
        brt = memzoo.from_pretrained(tmp_path, "brt", block_size=4, num_states=3, gate=gate, dtype=torch.float64)
        bswa = memzoo.from_pretrained(tmp_path, "bswa", block_size=4, memory_blocks=1, dtype=torch.float64)
        with torch.no_grad():
            assert (brt(toks).logits - bswa(toks).logits).abs().max() < 1e-10, gate
        cell, host = brt.backbone.cell, brt.backbone.layers[brt.backbone.recurrent_index]
        assert torch.equal(cell.state_k_proj.weight, host.self_attn.k_proj.weight)
        assert not cell.cross_o_proj.weight.any()
