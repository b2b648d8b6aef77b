"""The memory variants. Each module registers itself with ``@register_variant``;
the built-in ones are imported here explicitly."""

from memzoo.variants.base import Backbone, BackboneOutput
from memzoo.variants import full as _full  # noqa: F401
from memzoo.variants import bswa as _bswa  # noqa: F401
from memzoo.variants import xl as _xl  # noqa: F401
from memzoo.variants import rmt as _rmt  # noqa: F401
from memzoo.variants import fam as _fam  # noqa: F401
from memzoo.variants import brt as _brt  # noqa: F401
from memzoo.variants import sinks as _sinks  # noqa: F401

__all__ = ["Backbone", "BackboneOutput"]
