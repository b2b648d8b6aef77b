"""Registry cards: one TOML file per variant in the top-level ``registry/`` folder.

A card is data about a variant (title, paper, module, defaults, backends, status),
validated by :class:`VariantCard`. :func:`check_cards` compares the cards with the
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
    defaults: dict[str, Any] = Field(description="must equal the variant config's defaults")
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


def check_cards(directory: Path | str = DEFAULT_DIR) -> list[str]:
    """Every disagreement between the cards and the code registry (empty: they agree)."""
    from memzoo.ops import list_backends
    from memzoo.registry import get_variant, list_variants

    cards = load_cards(directory)
    problems: list[str] = []
    registered = set(list_variants())
    for name in sorted(registered - set(cards)):
        problems.append(f"variant {name!r} is registered but has no card in registry/")
    for name in sorted(set(cards) - registered):
        problems.append(f"card {name!r} has no registered variant")
    for name in sorted(registered & set(cards)):
        card, spec = cards[name], get_variant(name)
        if card.module != spec.module:
            problems.append(f"{name}: card module {card.module!r} != code {spec.module!r}")
        code_defaults = spec.config().model_dump(mode="json")
        if card.defaults != code_defaults:
            problems.append(f"{name}: card defaults {card.defaults} != config defaults {code_defaults}")
        unknown = set(card.backends) - set(list_backends())
        if unknown:
            problems.append(f"{name}: card lists unknown backends {sorted(unknown)}")
    return problems
