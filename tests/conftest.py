import os

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
