"""The conformance kit a contributor runs on a new variant (see :func:`run_conformance`)."""

from memzoo.testing.conformance import (
    LAYER_PRESETS,
    TINY,
    TOLERANCES,
    assert_close,
    assert_states_equal,
    options_for_preset,
    check_backend_matches_reference,
    check_bad_inputs,
    check_causality,
    check_every_parameter_gets_gradient,
    check_gradient_equivalence,
    check_shapes,
    check_state_equivalence,
    check_state_owns_its_memory,
    check_state_roundtrip,
    random_cuts,
    random_tokens,
    registry_cases,
    run_chunked,
    run_conformance,
    tiny_model,
)

__all__ = [
    "LAYER_PRESETS", "TINY", "TOLERANCES", "assert_close", "options_for_preset", "assert_states_equal", "check_backend_matches_reference", "check_bad_inputs",
    "check_causality", "check_every_parameter_gets_gradient", "check_gradient_equivalence", "check_shapes",
    "check_state_equivalence", "check_state_owns_its_memory", "check_state_roundtrip", "random_cuts", "random_tokens", "registry_cases", "run_chunked",
    "run_conformance", "tiny_model",
]
