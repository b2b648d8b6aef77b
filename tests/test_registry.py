"""Registration by decorator and by entry point, and the registry cards."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import memzoo
import memzoo.testing
from memzoo.cards import check_cards, load_cards
from memzoo.registry import unregister_variant
from memzoo.variants.bswa import BSWA, BSWAConfig


def test_list_variants_has_the_seeds():
    names = memzoo.list_variants()
    assert {"full", "bswa"} <= set(names)
    assert names == sorted(names)


def test_unknown_variant_lists_the_known_ones():
    with pytest.raises(memzoo.UnknownNameError, match="registered: .*bswa.*full"):
        memzoo.get_variant("nope")


def test_duplicate_registration_raises():
    with pytest.raises(ValueError, match="already registered"):
        memzoo.register_variant("bswa", config=BSWAConfig)(BSWA)


def test_register_requires_a_backbone_and_defaults():
    with pytest.raises(TypeError, match="Backbone subclass"):
        memzoo.register_variant("not_a_backbone", config=BSWAConfig)(object)

    class NoDefault(memzoo.VariantConfig):
        size: int

    with pytest.raises(ValueError, match="needs a default"):
        memzoo.register_variant("no_default", config=NoDefault)
    with pytest.raises(ValueError, match="must match"):
        memzoo.register_variant("Bad-Name", config=BSWAConfig)


def test_a_new_variant_registers_and_builds():
    from dataclasses import dataclass

    from memzoo.variants.kv import KVCacheBackbone, KVState
    from memzoo.ops import BlockLayout

    class WindowConfig(memzoo.VariantConfig):
        window: int = 3

    @dataclass
    class WindowState(KVState):
        pass

    @memzoo.register_variant("token_window_test", config=WindowConfig)
    class TokenWindow(KVCacheBackbone):
        State = WindowState

        def layout(self):
            return BlockLayout(block_size=1, window=self.window)

        def keep_from(self, next_pos):
            return next_pos - self.window

    try:
        assert "token_window_test" in memzoo.list_variants()
        memzoo.testing.run_conformance("token_window_test", {"window": 2}, trials=2)
    finally:
        unregister_variant("token_window_test")


def test_a_variant_must_declare_its_own_state_class():
    """Registration names the state class after the variant: an inherited one (shared
    with other variants) is refused, and nothing is renamed."""
    from dataclasses import dataclass

    from memzoo.variants.kv import KVCacheBackbone, KVState

    class Inherits(KVCacheBackbone):
        pass

    class Base(KVCacheBackbone):
        State = memzoo.State

    class SharedBase(KVCacheBackbone):
        State = KVState  # the base of bswa's, fam's, ... states

    for cls in (Inherits, Base, SharedBase):
        with pytest.raises(TypeError, match=rf"{cls.__name__} must declare its own state class in its body"):
            memzoo.register_variant("no_own_state", config=memzoo.VariantConfig)(cls)
    assert memzoo.State.variant == "" and KVState.variant == "" and "no_own_state" not in memzoo.list_variants()

    # its own state, on the shared base or on a registered variant's state (a variant built on that one)
    from memzoo.variants.full import Full, FullState

    for base, parent in ((KVCacheBackbone, KVState), (Full, FullState)):
        own = dataclass(type("OwnState", (parent,), {}))
        memzoo.register_variant("no_own_state", config=memzoo.VariantConfig)(type("Own", (base,), {"State": own}))
        try:
            assert own.variant == "no_own_state" and parent.variant == vars(parent).get("variant", "")
        finally:
            unregister_variant("no_own_state")
    assert KVState.variant == "" and FullState.variant == "full"


@pytest.mark.parametrize("module, needs_card", [("memzoo.variants.cardless", True), ("cardless_plugin.variant", False)])
def test_only_memzoos_own_variants_need_a_card(module, needs_card):
    """A variant defined in memzoo needs a card in registry/; a plug-in's is optional."""
    from dataclasses import dataclass

    from memzoo.variants.kv import KVCacheBackbone, KVState

    @dataclass
    class CardlessState(KVState):
        pass

    class Cardless(KVCacheBackbone):
        State = CardlessState

    Cardless.__module__ = module
    memzoo.register_variant("cardless", config=memzoo.VariantConfig)(Cardless)
    try:
        missing = "variant 'cardless' is registered but has no card in registry/"
        assert (missing in check_cards()) == needs_card
    finally:
        unregister_variant("cardless")


def test_cards_agree_with_the_code_registry():
    assert check_cards() == []


def test_card_disagreements_are_reported(tmp_path: Path):
    for card in Path(memzoo.cards.DEFAULT_DIR).glob("*.toml"):
        (tmp_path / card.name).write_text(card.read_text())
    bswa = tmp_path / "bswa.toml"
    bswa.write_text(bswa.read_text().replace("memory_blocks = 3\n", "memory_blockz = 3\n"))
    (tmp_path / "full.toml").unlink()
    ghost = (tmp_path / "bswa.toml").read_text().replace('name = "bswa"', 'name = "ghost"')
    (tmp_path / "ghost.toml").write_text(ghost)
    problems = "\n".join(check_cards(tmp_path))
    assert "'full' is registered but has no card" in problems
    assert "card 'ghost' has no registered variant" in problems
    assert "bswa: paper_defaults name unknown fields ['memory_blockz']" in problems


def test_cards_do_not_repeat_the_defaults(tmp_path: Path):
    """Defaults are declared once, in the config class; a card that repeats them is refused."""
    text = (Path(memzoo.cards.DEFAULT_DIR) / "bswa.toml").read_text()
    (tmp_path / "bswa.toml").write_text(text + "\n[defaults]\nmemory_blocks = 3\n")
    with pytest.raises(ValueError, match="defaults"):
        load_cards(tmp_path)
    assert memzoo.cards.defaults("bswa") == {"memory_blocks": 3, "stop_gradient_memory": False}


def test_card_schema_refuses_unknown_keys(tmp_path: Path):
    text = (Path(memzoo.cards.DEFAULT_DIR) / "full.toml").read_text()
    (tmp_path / "full.toml").write_text('colour = "red"\n' + text)
    with pytest.raises(ValueError, match="colour"):
        load_cards(tmp_path)


def test_entry_point_plugin_in_a_separate_environment(tmp_path: Path):
    """A real distribution (dist-info with entry_points.txt) on sys.path of a fresh
    interpreter: importlib.metadata finds it, memzoo loads it, the variant works."""
    site = tmp_path / "site"
    pkg = site / "memzoo_plugin_demo"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(textwrap.dedent('''
        from dataclasses import dataclass
        import memzoo
        from memzoo.ops import BlockLayout
        from memzoo.variants.kv import KVCacheBackbone, KVState

        class DemoConfig(memzoo.VariantConfig):
            pass

        @dataclass
        class DemoState(KVState):
            pass

        @memzoo.register_variant("plugin_demo", config=DemoConfig)
        class Demo(KVCacheBackbone):
            State = DemoState
            def layout(self):
                return BlockLayout(block_size=None, window=None)
            def keep_from(self, next_pos):
                return 0
    '''))
    info = site / "memzoo_plugin_demo-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: memzoo-plugin-demo\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[memzoo.variants]\nplugin_demo = memzoo_plugin_demo\n")
    (info / "RECORD").write_text("")
    code = (
        "import memzoo, torch\n"
        "assert 'plugin_demo' in memzoo.list_variants(), memzoo.list_variants()\n"
        "m = memzoo.build_model('plugin_demo', vocab_size=11, d_model=8, n_heads=2, block_size=4)\n"
        "print(m(torch.zeros(1, 3, dtype=torch.long)).logits.shape)\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(Path(memzoo.__file__).parent.parent)])}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "torch.Size([1, 3, 11])" in out.stdout


def test_broken_plugin_warns_and_does_not_break_memzoo(tmp_path: Path):
    info = tmp_path / "broken_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[memzoo.variants]\nbroken = no_such_module_xyz\n")
    code = "import warnings, memzoo\nwarnings.simplefilter('always')\nprint(memzoo.list_variants())\n"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(Path(memzoo.__file__).parent.parent)])}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "could not load variant plug-in 'broken'" in out.stderr
    assert "bswa" in out.stdout


def test_variants_and_tasks_share_one_registry_implementation():
    from memzoo._registry import Registry
    from memzoo.registry import VARIANTS
    from memzoo.tasks.registry import TASKS

    assert isinstance(VARIANTS, Registry) and isinstance(TASKS, Registry)
    assert (VARIANTS.kind, TASKS.kind) == ("variant", "task")
    with pytest.raises(memzoo.UnknownNameError, match="unknown task 'nope'; registered: .*passkey"):
        memzoo.tasks.get_task("nope")


def test_the_generic_registry():
    from memzoo._registry import Registry

    reg: "Registry[str]" = Registry("widget", origin=lambda entry: f"<{entry}>")
    reg.add("a_1", "first")
    assert reg.names() == ["a_1"] and reg.get("a_1") == "first" and "a_1" in reg
    with pytest.raises(ValueError, match=r"widget 'a_1' is already registered by <first>"):
        reg.add("a_1", "second")
    with pytest.raises(ValueError, match=r"widget name '1a' must match"):
        reg.add("1a", "x")
    reg.add("b", "other")
    with pytest.raises(memzoo.UnknownNameError, match=r"unknown widget 'c'; registered: a_1, b"):
        reg.get("c")
    reg.remove("a_1")
    reg.remove("never_there")
    assert reg.names() == ["b"]


def test_the_plugin_card_names_the_plugin_class():
    """registry/ also holds the card of the worked-example plug-in memzoo's CI installs:
    it names the class in the plug-in package, and check_cards holds it to the code."""
    card = load_cards()["infini"]
    assert card.module == memzoo.get_variant("infini").module == "memzoo_infini.variant.InfiniAttention"


def test_task_plugin_through_an_entry_point(tmp_path: Path):
    """A task in another package registers through the entry-point group ``memzoo.tasks``
    (like variants), so ``memzoo compare --task NAME`` finds it in a fresh interpreter."""
    site = tmp_path / "site"
    pkg = site / "memzoo_task_demo"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(textwrap.dedent('''
        import torch
        from memzoo.tasks import Batch, Task, TaskConfig, register_task

        class DemoConfig(TaskConfig):
            n_symbols: int = 4

        @register_task("task_demo", config=DemoConfig)
        class Demo(Task):
            metrics = {"accuracy": "exact"}
            vocab_size = 5
            def min_length(self, split="train"):
                return 2
            def sample(self, batch_size, length, generator, *, split="train"):
                tokens = torch.randint(0, 4, (batch_size, length), generator=generator)
                mask = torch.zeros(batch_size, length, dtype=torch.bool)
                mask[:, 0] = True
                return Batch(tokens, tokens, mask)
    '''))
    info = site / "memzoo_task_demo-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: memzoo-task-demo\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[memzoo.tasks]\ntask_demo = memzoo_task_demo\n")
    (info / "RECORD").write_text("")
    code = (
        "from memzoo.tasks import list_tasks, make_task\n"
        "from memzoo.compare import CompareConfig\n"
        "assert 'task_demo' in list_tasks(), list_tasks()\n"
        "assert make_task('task_demo', n_symbols=3).config.n_symbols == 3\n"
        "CompareConfig(task='task_demo', variants=('bswa',), train={'length': 8}, eval={'lengths': (8,)})\n"
        "print('ok')\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(Path(memzoo.__file__).parent.parent)])}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "ok" in out.stdout
