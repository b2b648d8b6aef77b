"""Task generators (shapes, answers recoverable from the input by a tiny oracle,
seeds reproduce, bad configs refused) and metrics on hand-made predictions."""

from __future__ import annotations

import math

import pytest
import torch

from memzoo.errors import InputError, UnknownNameError
from memzoo.tasks import Batch, ExampleStats, Task, TaskConfig, aggregate, get_task, list_tasks, make_task, register_task
from memzoo.tasks import passkey as pk

SMALL = {
    "passkey": dict(n_digits=3, n_filler=5),
    "mqar": dict(n_keys=16, n_values=16, num_pairs=4, eval_pairs=(2, 4, 6)),
    "copy": dict(n_symbols=6, segment_len=5),
    "text": dict(),
}


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------ oracles
def oracle_passkey(tokens: torch.Tensor, task: Task) -> list[int]:
    """The answer digits, read off the key segment."""
    seq = tokens.tolist()
    at = seq.index(pk.KEY)
    return seq[at + 1 : at + 1 + task.config.n_digits]


def oracle_mqar(tokens: torch.Tensor, t: int, task: Task) -> int:
    """The value paired with the query key at position t, found in the pair region."""
    seq = tokens.tolist()
    key = seq[t]
    i = seq.index(key)  # first occurrence is in the pair region (keys are distinct)
    assert i % 2 == 0 and i < t
    return seq[i + 1]


def oracle_copy(tokens: torch.Tensor, task: Task) -> list[int]:
    seq = tokens.tolist()
    head = seq[: seq.index(task.go)]
    return [x for x in head if x != task.filler]


@pytest.mark.parametrize("name", ["passkey", "mqar", "copy", "text"])
@pytest.mark.parametrize("split", ["train", "eval"])
def test_shapes_vocab_and_reproducible(name: str, split: str) -> None:
    task = make_task(name, **SMALL[name])
    b = task.sample(6, 48, gen(1), split=split)
    assert b.tokens.shape == b.targets.shape == b.mask.shape == (6, 48)
    assert b.tokens.dtype == b.targets.dtype == torch.long and b.mask.dtype == torch.bool
    assert int(b.tokens.min()) >= 0 and int(b.tokens.max()) < task.vocab_size
    assert len(b.groups) == 6
    assert bool(b.mask.any(1).all()), "every example has scored positions"
    assert not bool(b.mask[:, -1].any()), "the last position has no next token"
    assert torch.equal(b.targets[:, :-1], b.tokens[:, 1:])
    again = task.sample(6, 48, gen(1), split=split)
    assert torch.equal(b.tokens, again.tokens) and torch.equal(b.mask, again.mask) and b.groups == again.groups
    other = task.sample(6, 48, gen(2), split=split)
    assert not torch.equal(b.tokens, other.tokens)


def test_passkey_answer_recoverable_and_depths() -> None:
    task = make_task("passkey", **SMALL["passkey"], eval_depths=(0.0, 0.5, 1.0))
    for split in ("train", "eval"):
        b = task.sample(9, 40, gen(3), split=split)
        for i in range(9):
            answer = b.targets[i][b.mask[i]].tolist()
            assert answer == oracle_passkey(b.tokens[i], task)
            assert b.tokens[i, -4].item() == pk.QUERY and b.tokens[i, -3:].tolist() == answer
    b = task.sample(3, 40, gen(3), split="eval")
    keys = [b.tokens[i].tolist().index(pk.KEY) for i in range(3)]
    assert b.groups == ["depth=0", "depth=0.5", "depth=1"]
    assert keys == [0, 16, 32]  # 32 filler tokens; the key goes after 0, 16 and 32 of them
    random_filler = make_task("passkey", n_digits=2, filler="random").sample(4, 30, gen(0))
    assert random_filler.tokens.shape == (4, 30)


def test_mqar_answer_recoverable_and_pairs() -> None:
    task = make_task("mqar", **SMALL["mqar"])
    b = task.sample(6, 40, gen(5), split="eval")
    assert b.groups == ["pairs=2", "pairs=4", "pairs=6"] * 2
    for i in range(6):
        scored = b.mask[i].nonzero().flatten().tolist()
        assert len(scored) == int(b.groups[i].split("=")[1])
        for t in scored:
            assert b.targets[i, t].item() == oracle_mqar(b.tokens[i], t, task)
    train = task.sample(4, 16, gen(5))
    assert int(train.mask.sum()) == 4 * 4


def test_copy_answer_recoverable() -> None:
    for selective in (False, True):
        task = make_task("copy", **SMALL["copy"], selective=selective)
        b = task.sample(5, 30, gen(7))
        for i in range(5):
            assert b.targets[i][b.mask[i]].tolist() == oracle_copy(b.tokens[i], task)


def test_text_windows_come_from_the_right_split(tmp_path) -> None:
    task = make_task("text")
    assert task.vocab_size == len(set(task.corpus))
    for split, (lo, hi) in (("train", (0, task.split_at)), ("eval", (task.split_at, len(task.corpus)))):
        b = task.sample(3, 64, gen(0), split=split)
        for row in b.tokens:
            assert task.decode(row) in task.corpus[lo:hi]
    f = tmp_path / "tiny.txt"
    f.write_text("abcabcabcabcabcabcabcabcabcabc", encoding="utf-8")
    small = make_task("text", path=str(f), eval_fraction=0.5)
    assert small.vocab_size == 3 and small.decode(small.encode("cab")) == "cab"
    with pytest.raises(InputError, match="fewer than length"):
        small.sample(1, 20, gen(0), split="eval")


@pytest.mark.parametrize(
    "name, fields, match",
    [
        ("passkey", dict(n_digits=0), "n_digits"),
        ("passkey", dict(eval_depths=(0.5, 1.5)), "eval_depths"),
        ("passkey", dict(filler="lorem"), "filler"),
        ("mqar", dict(n_keys=4, num_pairs=5), "n_keys"),
        ("mqar", dict(n_keys=8, eval_pairs=(2, 9)), "n_keys"),
        ("copy", dict(segment_len=0), "segment_len"),
        ("text", dict(eval_fraction=1.0), "eval_fraction"),
    ],
)
def test_bad_configs_refused(name: str, fields: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make_task(name, **fields)


def test_bad_names_and_lengths_refused(tmp_path) -> None:
    with pytest.raises(UnknownNameError, match="valid: .*n_digits"):
        make_task("passkey", n_digit=3)
    with pytest.raises(UnknownNameError, match="registered: .*passkey"):
        get_task("paskey")
    with pytest.raises(InputError, match="at least 8 tokens"):
        make_task("passkey", n_digits=3).sample(2, 7, gen(0))
    with pytest.raises(InputError, match="at least 24 tokens"):
        make_task("mqar", num_pairs=2, eval_pairs=(6,)).sample(2, 20, gen(0), split="eval")
    with pytest.raises(InputError, match="does not exist"):
        make_task("text", path=str(tmp_path / "missing.txt")).vocab_size


def test_registry_refuses_duplicates_and_lists_tasks() -> None:
    assert {"passkey", "mqar", "copy", "text"} <= set(list_tasks())
    with pytest.raises(ValueError, match="already registered"):
        register_task("passkey", config=TaskConfig)(type("Again", (Task,), {"metrics": {"accuracy": "exact"}}))


def test_registry_refuses_an_unknown_metric_kind() -> None:
    """At registration, not when the first run is scored after its training."""
    with pytest.raises(ValueError, match=r"unknown metric kinds; valid: exact, token_accuracy, bits"):
        register_task("kind_demo", config=TaskConfig)(type("Kind", (Task,), {"metrics": {"acc": "accuracy"}}))
    assert "kind_demo" not in list_tasks()


# ------------------------------------------------------------------ metrics
def one_hot_logits(pred: list[list[int]], vocab: int) -> torch.Tensor:
    """Logits whose argmax is ``pred`` (B, T), with probability ~1 on it."""
    return torch.nn.functional.one_hot(torch.tensor(pred), vocab).float() * 50.0


def test_metrics_on_hand_made_predictions() -> None:
    targets = torch.tensor([[1, 2, 3, 0], [1, 2, 3, 0], [4, 4, 4, 4]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 0], [0, 1, 1, 0]], dtype=torch.bool)
    pred = [[1, 2, 3, 9], [1, 0, 3, 0], [0, 4, 0, 0]]  # all right / 2 of 3 / 1 of 2
    stats = ExampleStats.zeros(3)
    logits = one_hot_logits(pred, 10)
    stats.add(logits[:, :2], targets[:, :2], mask[:, :2])  # streamed in two chunks
    stats.add(logits[:, 2:], targets[:, 2:], mask[:, 2:])
    assert stats.scored.tolist() == [3, 3, 2] and stats.correct.tolist() == [3, 2, 1]
    groups = ["a", "b", "b"]
    exact = aggregate("exact", stats, groups)
    assert exact == pytest.approx({"all": 1 / 3, "a": 1.0, "b": 0.0})
    tok = aggregate("token_accuracy", stats, groups)
    assert tok == pytest.approx({"all": 6 / 8, "a": 1.0, "b": 3 / 5})


def test_bits_per_token_on_uniform_and_certain_predictions() -> None:
    targets = torch.tensor([[3, 1, 2]])
    mask = torch.tensor([[True, True, False]])
    uniform = ExampleStats.zeros(1)
    uniform.add(torch.zeros(1, 3, 8), targets, mask)
    assert aggregate("bits", uniform, ["all"])["all"] == pytest.approx(3.0)  # log2(8)
    half = ExampleStats.zeros(1)
    logits = torch.full((1, 3, 2), 0.0)
    logits[0, :, 1] = math.log(3.0)  # p(target=1) = 3/4, p(0) = 1/4
    half.add(logits, torch.tensor([[1, 0, 0]]), mask)
    assert aggregate("bits", half, ["all"])["all"] == pytest.approx((-math.log2(0.75) - math.log2(0.25)) / 2)


def test_task_score_names_every_metric() -> None:
    task = make_task("passkey", n_digits=2)
    b: Batch = task.sample(4, 12, gen(0), split="eval")
    stats = ExampleStats.zeros(4)
    stats.add(one_hot_logits(b.targets.tolist(), task.vocab_size), b.targets, b.mask)  # a perfect model
    scores = task.score(stats, b.groups)
    assert set(scores) == {"accuracy", "digit_accuracy"}
    assert all(v == 1.0 for per_group in scores.values() for v in per_group.values())
    assert set(scores["accuracy"]) == {"all", *b.groups}


@pytest.mark.parametrize("fault", ["short", "rows", "vocab", "unscored"])
def test_a_task_that_breaks_the_batch_contract_is_refused_before_training(fault: str) -> None:
    """A plug-in task's batches are held to (batch_size, length), int64 ids in its
    vocabulary and a scored position per evaluation example when the comparison is
    configured: before, one token short was trained and reported under the asked length,
    and fewer rows were scored as the asked number of examples."""
    from memzoo.compare import CompareConfig
    from memzoo.tasks import unregister_task
    from memzoo.tasks.base import draw

    class Faulty(Task):
        metrics = {"accuracy": "exact"}
        vocab_size = 5

        def min_length(self, split="train") -> int:
            return 2

        def sample(self, batch_size, length, generator, *, split="train") -> Batch:
            tokens = torch.randint(0, 4, (batch_size, length), generator=generator)
            mask = torch.ones(batch_size, length, dtype=torch.bool)
            if fault == "short":
                tokens, mask = tokens[:, :-1], mask[:, :-1]
            elif fault == "rows":
                tokens, mask = tokens[:1], mask[:1]
            elif fault == "vocab":
                tokens = tokens + 3
            elif split == "eval":
                mask[0] = False
            return Batch(tokens, tokens.clone(), mask)

    register_task("faulty_demo", config=TaskConfig)(Faulty)
    try:
        with pytest.raises(InputError, match="faulty_demo"):
            draw(make_task("faulty_demo"), 3, 8, gen(0), split="eval")
        with pytest.raises(ValueError, match="task 'faulty_demo': sample"):
            CompareConfig(task="faulty_demo", variants=("bswa",), train={"length": 8}, eval={"lengths": (8,)})
    finally:
        unregister_task("faulty_demo")
    for name in list_tasks():  # the built-in tasks keep the contract
        task = make_task(name, **SMALL.get(name, {}))
        for split in ("train", "eval"):
            n = max(task.min_length(split), 40)
            draw(task, 3, n, gen(0), split=split)


def test_registry_refuses_a_direction_that_contradicts_the_headline() -> None:
    with pytest.raises(ValueError, match=r"higher_is_better=True, but its headline metric 'bpc' is of kind 'bits'"):
        register_task("direction_demo", config=TaskConfig)(type("D", (Task,), {"metrics": {"bpc": "bits"}}))
    assert "direction_demo" not in list_tasks()
    text = make_task("text")
    assert not text.metric_higher_is_better("bpc") and make_task("passkey").metric_higher_is_better("digit_accuracy")


def test_a_strict_task_config_with_a_tuple_field_works_in_a_comparison() -> None:
    """A plug-in task config made strict (like memzoo's VariantConfig) with a tuple field:
    a comparison keeps task options in their JSON form (a list), which strict Python
    validation refused for a tuple."""
    from pydantic import ConfigDict

    from memzoo.compare import CompareConfig
    from memzoo.tasks import unregister_task

    class DepthsConfig(TaskConfig):
        model_config = ConfigDict(extra="forbid", frozen=True, strict=True)
        depths: tuple[float, ...] = (0.5,)

    class Depths(Task):
        metrics = {"accuracy": "exact"}
        vocab_size = 5

        def min_length(self, split="train") -> int:
            return 2

        def sample(self, batch_size, length, generator, *, split="train") -> Batch:
            tokens = torch.randint(0, 4, (batch_size, length), generator=generator)
            mask = torch.zeros(batch_size, length, dtype=torch.bool)
            mask[:, 0] = True
            return Batch(tokens, tokens.clone(), mask)

    register_task("depths_demo", config=DepthsConfig)(Depths)
    try:
        assert make_task("depths_demo", depths=[0.25]).config.depths == (0.25,)
        config = CompareConfig(task="depths_demo", variants=("bswa",), task_options={"depths": (0.25,)},
                               train={"length": 8}, eval={"lengths": (8,)})
        assert config.task_options == {"depths": [0.25]}
    finally:
        unregister_task("depths_demo")


@pytest.mark.parametrize(
    "name, fields",
    [("passkey", {"n_digits": True}), ("copy", {"selective": "yes"}), ("text", {"eval_fraction": "0.5"}), ("mqar", {"n_keys": 8.0})],
)
def test_task_fields_are_not_coerced(name, fields):
    """Task configs are strict like every memzoo config: ``make_task("passkey",
    n_digits=True)`` made a one-digit passkey, ``selective="yes"`` a selective copy."""
    with pytest.raises(ValueError, match=next(iter(fields))):
        make_task(name, **fields)
    with pytest.raises(ValueError, match=next(iter(fields))):
        get_task(name)(**fields)


def test_task_tuple_fields_take_a_json_list():
    assert make_task("passkey", eval_depths=[0.5]).config.eval_depths == (0.5,)
    assert get_task("mqar")(eval_pairs=[2, 3]).config.eval_pairs == (2, 3)
