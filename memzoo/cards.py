"""Registry cards: one TOML file per variant in the top-level ``registry/`` folder.

A card is data about a variant (title, paper, module, backends, status), validated by
:class:`VariantCard`. A card does not repeat the variant's defaults: they are declared
once, in the variant's config class (:func:`defaults` reads them from there). :func:`check_cards` compares the cards with the
in-code registry and lists every disagreement.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

#: the repository's registry/ folder (present in a source checkout)
DEFAULT_DIR = Path(__file__).resolve().parent.parent / "registry"


class PaperRef(BaseModel):
    model_config = ConfigDict(extra="forbid")
    title: str
    authors: str
    year: int = Field(ge=1950, le=2100)
    url: str
    citation: str


class VariantCard(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    title: str
    module: str = Field(description="dotted path of the class that implements the variant")
    status: Literal["stable", "experimental", "reference"]
    backends: list[str] = Field(min_length=1)
    summary: str
    paper: PaperRef
    paper_defaults: dict[str, Any] = Field(default_factory=dict, description="the paper's settings, informational")


def load_cards(directory: Path | str = DEFAULT_DIR) -> dict[str, VariantCard]:
    """Read and validate every ``*.toml`` card; the file stem must equal the card's name."""
    cards: dict[str, VariantCard] = {}
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"no registry folder at {directory} (cards ship with a source checkout)")
    for path in sorted(directory.glob("*.toml")):
        with path.open("rb") as fh:
            card = VariantCard.model_validate(tomllib.load(fh))
        if card.name != path.stem:
            raise ValueError(f"{path.name}: card name {card.name!r} does not match the file name")
        cards[card.name] = card
    return cards


#: paper settings a card may name that are training settings, not model fields
TRAINING_SETTINGS = frozenset({"random_state_passing"})


def defaults(name: str) -> dict[str, Any]:
    """A variant's defaults, from its config class (the one declaration)."""
    from memzoo.registry import get_variant

    return get_variant(name).config().model_dump(mode="json")


def check_cards(directory: Path | str = DEFAULT_DIR) -> list[str]:
    """Every disagreement between the cards and the code registry (empty: they agree).
    Every variant memzoo itself defines needs a card; a plug-in's (a variant defined
    outside the ``memzoo`` package) is checked when it has one."""
    from memzoo.config import BackboneConfig
    from memzoo.ops import list_backends
    from memzoo.registry import get_variant, list_variants

    cards = load_cards(directory)
    problems: list[str] = []
    registered = set(list_variants())
    for name in sorted(registered - set(cards)):
        if get_variant(name).module.startswith("memzoo."):  # a plug-in's card is optional (docs/adding-a-variant.md)
            problems.append(f"variant {name!r} is registered but has no card in registry/")
    for name in sorted(set(cards) - registered):
        problems.append(f"card {name!r} has no registered variant")
    for name in sorted(registered & set(cards)):
        card, spec = cards[name], get_variant(name)
        if card.module != spec.module:
            problems.append(f"{name}: card module {card.module!r} != code {spec.module!r}")
        fields = set(spec.config.model_fields) | set(BackboneConfig.model_fields)
        unknown_fields = sorted(set(card.paper_defaults) - fields - TRAINING_SETTINGS)
        if unknown_fields:
            problems.append(f"{name}: paper_defaults name unknown fields {unknown_fields}")
        unknown = set(card.backends) - set(list_backends())
        if unknown:
            problems.append(f"{name}: card lists unknown backends {sorted(unknown)}")
    return problems
