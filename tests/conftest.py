import os

import pytest
import torch
from hypothesis import HealthCheck, settings

# "ci": bounded, derandomized (repeatable), no deadline (CPU timing is noisy). "dev": more examples.
settings.register_profile(
    "ci", max_examples=12, deadline=None, derandomize=True, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile("dev", max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# The test models are tiny: one thread per process is faster than two fighting over a
# thread pool, and pytest-xdist runs one process per core.
torch.set_num_threads(1)


def load_first_option(checkpoint, variant: str, **kw):
    """``variant`` on a pretrained checkpoint with the first of its conformance options
    that loads there; if none does, an AssertionError with each option's reason (a
    variant with parameters of its own needs ``Backbone.init_from_embeddings``)."""
    import memzoo
    from memzoo.pretrained import PretrainedError

    reasons = []
    for options in memzoo.get_variant(variant).config.conformance_options:
        try:
            return memzoo.from_pretrained(checkpoint, variant, **options, **kw)
        except (PretrainedError, ValueError) as err:
            reasons.append(f"  {options}: {err}")
    raise AssertionError(f"no conformance option of {variant} loads on a pretrained checkpoint:\n" + "\n".join(reasons))


@pytest.fixture
def load_on_checkpoint():
    """:func:`load_first_option`, for tests."""
    return load_first_option
