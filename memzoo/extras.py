"""memzoo's optional extras, checked by name and version without importing them
(lightning-utilities' ``RequirementCache``): ``bool(RAY)`` says whether it is installed
at a version memzoo supports, ``RAY.message`` what is missing and how to install it."""

from __future__ import annotations

from lightning_utilities.core.imports import RequirementCache

#: ``memzoo compare --launcher ray`` (``pip install 'memzoo[ray]'``)
RAY = RequirementCache("ray>=2.40")
#: ``memzoo.from_pretrained`` of a .gguf file, an in-memory model; ``memzoo.hf`` (``pip install 'memzoo[hf]'``)
TRANSFORMERS = RequirementCache("transformers>=5")
GGUF = RequirementCache("gguf>=0.10")
#: the xformers backend (``pip install 'memzoo[xformers]'``; CUDA only)
XFORMERS = RequirementCache("xformers>=0.0.30")
