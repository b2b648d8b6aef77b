"""The worked-example plug-in ``examples/memzoo-infini`` is installed in the test
environment (``make install`` does it) and is a variant like the built-in ones: found
through the ``memzoo.variants`` entry point, listed by ``memzoo list``, green on the
contributor's conformance one-liner. Its own tests live in the example
(``examples/memzoo-infini/tests``, run by ``make test``); memzoo's registry-generated
conformance tests run on it here because it is registered."""

from __future__ import annotations

from importlib import metadata

import memzoo
from memzoo import cli, testing

INSTALL = "pip install --no-deps -e examples/memzoo-infini (make install does it)"


def test_the_example_plugin_is_installed_and_registered():
    assert "infini" in [ep.name for ep in metadata.entry_points(group="memzoo.variants")], f"not installed: {INSTALL}"
    assert "infini" in memzoo.list_variants()
    spec = memzoo.get_variant("infini")
    assert spec.cls.__module__ == "memzoo_infini.variant", "infini must come from the plug-in, not from memzoo"


def test_memzoo_list_shows_the_plugin(capsys):
    assert cli.main(["list"]) == 0
    out = capsys.readouterr().out
    assert "infini" in out and "update='delta'" in out, out


def test_run_conformance_on_the_plugin():
    testing.run_conformance("infini", trials=2)
