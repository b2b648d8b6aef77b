"""Configs: validation, clear refusals, round-trips, and agreement with the modules."""

from __future__ import annotations

import inspect

import pytest
import torch

import memzoo
from memzoo.config import BackboneConfig, ModelConfig
from memzoo.variants.base import Backbone


def test_flat_and_nested_variant_fields_are_the_same_config():
    a = ModelConfig(variant="bswa", memory_blocks=1)
    b = ModelConfig(variant="bswa", options={"memory_blocks": 1})
    assert a == b
    assert a.options == {"memory_blocks": 1, "stop_gradient_memory": False}
    assert a.variant_config.memory_blocks == 1


def test_json_round_trip():
    cfg = ModelConfig(variant="bswa", d_model=32, memory_blocks=2, tie_embeddings=True)
    assert ModelConfig.model_validate_json(cfg.model_dump_json()) == cfg


@pytest.mark.parametrize(
    "fields,words",
    [
        ({"memory_blok": 1}, ["unknown field 'memory_blok'", "memory_blocks", "d_model"]),
        ({"options": {"wat": 1}}, ["unknown option", "wat", "memory_blocks"]),
        ({"d_model": 30, "n_heads": 4}, ["divisible by n_heads"]),
        ({"d_model": 12, "n_heads": 4}, ["must be even"]),
        ({"n_layers": 0}, ["n_layers"]),
        ({"backend": "cuda-magic"}, ["unknown attention backend", "reference", "sdpa"]),
        ({"memory_blocks": -1}, ["memory_blocks"]),
        ({"memory_blocks": "three"}, ["memory_blocks"]),
    ],
)
def test_bad_configs_are_refused_with_what_is_valid(fields, words):
    with pytest.raises(ValueError) as info:
        memzoo.build_model("bswa", **fields)
    for word in words:
        assert word in str(info.value)


@pytest.mark.parametrize(
    "fields",
    [{"d_model": 64.5}, {"d_model": "64"}, {"n_layers": True}, {"block_size": 4.0},
     {"memory_blocks": True}, {"stop_gradient_memory": "yes"}, {"tie_embeddings": 1}],
)
def test_no_silent_coercion_of_field_types(fields):
    with pytest.raises(ValueError):
        ModelConfig(variant="bswa", **fields)


@pytest.mark.parametrize("bad", [{"n_layers": True}, {"d_ff": 0}, {"d_ff": -4}, {"block_size": 2.0}])
def test_backbone_constructors_refuse_bad_plain_arguments(bad):
    from memzoo.variants.bswa import BSWA

    with pytest.raises(ValueError):
        BSWA(**{"d_model": 16, "n_heads": 2, **bad})


def test_build_from_config_and_name_agree():
    cfg = ModelConfig(variant="bswa", vocab_size=40, d_model=16, n_heads=2, block_size=4, memory_blocks=1)
    torch.manual_seed(0)
    a = memzoo.build_model(cfg)
    torch.manual_seed(0)
    b = memzoo.build_model("bswa", vocab_size=40, d_model=16, n_heads=2, block_size=4, memory_blocks=1)
    tokens = torch.randint(0, 40, (1, 9))
    assert torch.equal(a(tokens).logits, b(tokens).logits)
    with pytest.raises(TypeError, match="not both"):
        memzoo.build_model(cfg, d_model=8)


def test_every_default_builds_and_runs():
    for name in memzoo.list_variants():
        model = memzoo.build_model(name)
        logits, state = model(torch.zeros(1, 3, dtype=torch.long))
        assert logits.shape == (1, 3, 256)


def test_constructor_arguments_are_derived_from_the_configs():
    """One declaration per field: a variant's constructor signature, defaults and
    fingerprint come from BackboneConfig + the variant's config class."""
    shared = {k: v for k, v in BackboneConfig.model_fields.items() if k not in ("variant", "options")}
    for name in memzoo.list_variants():
        spec = memzoo.get_variant(name)
        params = inspect.signature(spec.cls).parameters
        expected = {**shared, **spec.config.model_fields}
        assert list(params) == list(expected), name
        for field, info in expected.items():
            assert params[field].kind is inspect.Parameter.KEYWORD_ONLY
            assert params[field].default == info.get_default(call_default_factory=True), f"{name}.{field}"
        backbone = memzoo.build_backbone(name, d_model=16, n_heads=2)
        for field in spec.config.model_fields:
            assert getattr(backbone, field) == getattr(backbone.config.variant_config, field), f"{name}.{field}"


def test_fingerprint_leaves_out_only_the_marked_fields():
    fam = memzoo.build_backbone("fam", d_model=16, n_heads=2, block_size=4, fam_len=2)
    assert {"backend", "stop_gradient_memory", "position_offset_max"}.isdisjoint(fam.hparams)
    assert {"d_model", "n_kv_heads", "head_dim", "norm_eps", "mlp", "fam_len", "memory_blocks", "init"} <= set(fam.hparams)
    other = memzoo.build_backbone("fam", d_model=16, n_heads=2, block_size=4, fam_len=2, norm_eps=1e-5)
    assert other.fingerprint != fam.fingerprint
    trained = memzoo.build_backbone("fam", d_model=16, n_heads=2, block_size=4, fam_len=2, position_offset_max=9)
    assert trained.fingerprint == fam.fingerprint


def test_a_field_may_not_shadow_a_method_or_a_shared_field():
    from memzoo.registry import unregister_variant
    from memzoo.variants.kv import KVCacheBackbone

    class Shadows(memzoo.VariantConfig):
        layout: int = 1

    class Redeclares(memzoo.VariantConfig):
        d_model: int = 8

    class RedeclaresModelField(memzoo.VariantConfig):  # ModelConfig would keep vocab_size=... for itself
        vocab_size: int = 5

    for config, match in ((Shadows, "shadow"), (Redeclares, "shared field"), (RedeclaresModelField, "shared field")):
        with pytest.raises(ValueError, match=match):
            memzoo.register_variant("shadow_test", config=config)(type("X", (KVCacheBackbone,), {}))
        unregister_variant("shadow_test")


def test_tied_embeddings_share_the_weight():
    model = memzoo.build_model("full", tie_embeddings=True, d_model=16, n_heads=2)
    assert model.head.weight is model.embed.weight
    untied = memzoo.build_model("full", d_model=16, n_heads=2)
    n_tied = sum(p.numel() for p in model.parameters())
    n_untied = sum(p.numel() for p in untied.parameters())
    assert n_untied - n_tied == 256 * 16


def test_a_tuple_field_of_a_variant_reads_back_from_json():
    """A strict variant config with a tuple field (per-layer settings): a JSON file, a
    leaderboard, ``--option`` and a comparison hold it as a list, which Python's strict
    mode refused for a tuple, so such a config never read back from its own JSON."""
    import json
    from dataclasses import dataclass

    from memzoo.compare import CompareConfig
    from memzoo.ops import BlockLayout
    from memzoo.registry import unregister_variant
    from memzoo.variants.kv import KVCacheBackbone, KVState

    class TupleConfig(memzoo.VariantConfig):
        windows: tuple[int, ...] = (3, 3)

    @dataclass
    class TupleState(KVState):
        pass

    @memzoo.register_variant("tuple_demo", config=TupleConfig)
    class TupleDemo(KVCacheBackbone):
        State = TupleState

        def layout(self):
            return BlockLayout(block_size=1, window=max(self.windows))

    try:
        cfg = memzoo.ModelConfig(variant="tuple_demo", d_model=16, n_heads=2, windows=(2, 4))
        assert memzoo.ModelConfig.model_validate_json(cfg.model_dump_json()) == cfg
        assert memzoo.ModelConfig(**json.loads(cfg.model_dump_json())) == cfg
        assert memzoo.build_model("tuple_demo", d_model=16, n_heads=2, windows=[2, 4]).backbone.windows == (2, 4)
        CompareConfig(task="copy", variants=("tuple_demo",), variant_options={"tuple_demo": {"windows": (2, 4)}})
        with pytest.raises(ValueError, match="windows"):  # the items are still strict
            memzoo.ModelConfig(variant="tuple_demo", windows=[2.0, 4])
        with pytest.raises(ValueError, match="memory_blocks"):
            memzoo.ModelConfig(variant="bswa", memory_blocks=True)
    finally:
        unregister_variant("tuple_demo")
