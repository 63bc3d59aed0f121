"""Text calibration for language models: .txt files, folders of them, ``datasets`` folders, cut into seeded
random token windows; clear errors before any model work; ``vlmsparse prune --calibration text.txt``."""

from __future__ import annotations

import json
import random

import pytest
import torch
from factories import tiny_llama_config, tiny_opt

from vlmsparse.cli import main
from vlmsparse.data.calibration import (
    is_text_source,
    load_calibration_samples,
    load_calibration_text,
    text_calibration_batches,
    text_calibration_windows,
)

WORDS = [f"w{i}" for i in range(40)]


@pytest.fixture(scope="module")
def tokenizer():
    from vlmsparse.data.vocab import build_tokenizer

    return build_tokenizer(WORDS)


def _text(n_words: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    lines = [" ".join(rng.choice(WORDS) for _ in range(10)) for _ in range(n_words // 10)]
    return "\n".join(lines)


def test_txt_file_gives_seeded_windows_of_the_token_stream(tmp_path, tokenizer):
    path = tmp_path / "corpus.txt"
    path.write_text(_text(300))
    assert is_text_source(path)
    stream = tokenizer(path.read_text(), add_special_tokens=False)["input_ids"]
    assert len(stream) == 300 and tokenizer.bos_token_id not in stream
    windows = text_calibration_windows(load_calibration_text(path), tokenizer, nsamples=6, seqlen=32, seed=3)
    assert windows.shape == (6, 32) and windows.dtype == torch.long
    text = " ".join(map(str, stream))
    for row in windows.tolist():  # every window is a contiguous slice of the stream
        assert " ".join(map(str, row)) in text
    again = text_calibration_windows(load_calibration_text(path), tokenizer, nsamples=6, seqlen=32, seed=3)
    other = text_calibration_windows(load_calibration_text(path), tokenizer, nsamples=6, seqlen=32, seed=4)
    assert torch.equal(windows, again) and not torch.equal(windows, other)
    # exactly one window fits: the whole stream
    whole = text_calibration_windows(load_calibration_text(path), tokenizer, nsamples=2, seqlen=300)
    assert whole.tolist() == [stream, stream]
    batches = text_calibration_batches(path, tokenizer, nsamples=5, seqlen=16, batch_size=2)
    assert [b["input_ids"].shape for b in batches] == [(2, 16), (2, 16), (1, 16)]
    assert all(bool(b["attention_mask"].all()) for b in batches)


def test_text_windows_for_an_encoder_decoder_reach_the_decoder_shifted_right(tmp_path, tokenizer):
    path = tmp_path / "corpus.txt"
    path.write_text(_text(300))
    plain = text_calibration_batches(path, tokenizer, nsamples=5, seqlen=16, batch_size=2, seed=1)
    batches = text_calibration_batches(path, tokenizer, nsamples=5, seqlen=16, batch_size=2, seed=1,
                                       decoder_start_token_id=7)
    assert [sorted(b) for b in plain] == [["attention_mask", "input_ids"]] * 3
    for a, b in zip(plain, batches):
        assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["attention_mask"], b["attention_mask"])
        assert b["decoder_input_ids"].tolist() == [[7, *row[:-1]] for row in a["input_ids"].tolist()]
        assert b["decoder_attention_mask"].shape == b["decoder_input_ids"].shape == a["input_ids"].shape
        assert bool(b["decoder_attention_mask"].all())


def test_folder_of_text_files_and_image_folders_stay_images(tmp_path, tokenizer):
    folder = tmp_path / "texts"
    folder.mkdir()
    (folder / "b.txt").write_text("w1 w2 w3")
    (folder / "a.txt").write_text("w4 w5")
    (folder / "empty.txt").write_text("  \n")
    (folder / "notes.md").write_text("ignored")
    assert is_text_source(folder)
    assert load_calibration_text(folder) == ["w4 w5", "w1 w2 w3"]  # sorted by name, empty files dropped
    windows = text_calibration_windows(load_calibration_text(folder), tokenizer, nsamples=1, seqlen=5)
    assert tokenizer.convert_ids_to_tokens(windows[0].tolist()) == ["w4", "w5", "w1", "w2", "w3"]
    from PIL import Image

    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (8, 8)).save(images / "x.png")
    (images / "x.txt").write_text("a caption")
    assert not is_text_source(images) and not is_text_source("synthetic")


def test_datasets_folder(tmp_path, tokenizer):
    datasets = pytest.importorskip("datasets")
    rows = [_text(50, seed) for seed in range(4)]
    datasets.Dataset.from_dict({"id": list(range(4)), "text": rows}).save_to_disk(str(tmp_path / "ds"))
    assert is_text_source(tmp_path / "ds")
    assert load_calibration_text(tmp_path / "ds") == rows
    # a DatasetDict: its train split; a dataset without a "text" column: its first string column
    datasets.DatasetDict({"validation": datasets.Dataset.from_dict({"content": ["w9 w9"]}),
                          "train": datasets.Dataset.from_dict({"n": [1], "content": ["w1 w2"]})}
                         ).save_to_disk(str(tmp_path / "dd"))
    assert load_calibration_text(tmp_path / "dd") == ["w1 w2"]
    datasets.Dataset.from_dict({"n": [1, 2]}).save_to_disk(str(tmp_path / "numbers"))
    with pytest.raises(ValueError, match="no text column"):
        load_calibration_text(tmp_path / "numbers")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "state.json").write_text("{not json")
    (broken / "dataset_info.json").write_text("{}")
    with pytest.raises(ValueError, match="unreadable datasets folder"):
        load_calibration_text(broken)


def test_bad_text_sources(tmp_path, tokenizer):
    (tmp_path / "empty.txt").write_text(" \n\n ")
    with pytest.raises(ValueError, match="is empty"):
        load_calibration_text(tmp_path / "empty.txt")
    (tmp_path / "short.txt").write_text("w1 w2 w3")
    with pytest.raises(ValueError, match="3 tokens, fewer than one window of seqlen=8"):
        text_calibration_batches(tmp_path / "short.txt", tokenizer, nsamples=2, seqlen=8)
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(ValueError, match="not UTF-8"):
        load_calibration_text(tmp_path / "latin1.txt")
    (tmp_path / "data.csv").write_text("a,b")
    for call in (load_calibration_text, load_calibration_samples):
        with pytest.raises(ValueError, match=r"\.csv.*\.txt file.*datasets folder"):
            call(tmp_path / "data.csv")
    (tmp_path / "nothing").mkdir()
    with pytest.raises(ValueError, match="holds no .txt files"):
        load_calibration_text(tmp_path / "nothing")
    with pytest.raises(FileNotFoundError):
        load_calibration_text(tmp_path / "absent.txt")
    with pytest.raises(ValueError, match="seqlen"):
        text_calibration_batches(tmp_path / "short.txt", tokenizer, seqlen=0)


def test_python_api_prunes_an_opt_from_text(tmp_path, tokenizer):
    from vlmsparse.pipeline.prune import prune_model

    (tmp_path / "corpus.txt").write_text(_text(400))
    model = tiny_opt(0)
    assert len(tokenizer) <= model.config.vocab_size
    batches = text_calibration_batches(tmp_path / "corpus.txt", tokenizer, nsamples=4, seqlen=32, batch_size=2)
    masks = prune_model(model, method="sparsegpt", sparsity="2:4", calibration=batches, progress=False)
    assert len(masks) == 12 and masks.sparsity() == 0.5


@pytest.fixture
def llama_folder(tmp_path, tokenizer):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    config = tiny_llama_config()
    config.max_position_embeddings = 24  # the default --seqlen
    folder = tmp_path / "llama"
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_cli_prunes_a_llama_from_text_and_fails_before_loading_on_bad_text(tmp_path, llama_folder, capsys,
                                                                           monkeypatch):
    from vlmsparse.pipeline.save import load_pruned

    corpus = tmp_path / "corpus.txt"
    corpus.write_text(_text(200))
    out = tmp_path / "pruned"
    code = main(["prune", str(llama_folder), str(out), "--method", "wanda", "--sparsity", "2:4", "--calibration",
                 str(corpus), "--nsamples", "3", "--batch-size", "2", "--json"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["sparsity"] == 0.5 and len(report["layers"]) == 14
    model, masks = load_pruned(out)
    assert masks.info["calibration_batches"] == "2"

    import vlmsparse.pipeline.save as save

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the calibration text was checked")

    monkeypatch.setattr(save, "load_model", no_model)
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "short.txt").write_text("w1 w2")
    for source, message in (("empty.txt", "is empty"), ("short.txt", "fewer than one window of seqlen=24")):
        bad_out = tmp_path / f"out-{source}"
        assert main(["prune", str(llama_folder), str(bad_out), "--calibration", str(tmp_path / source),
                     "--quiet"]) == 2
        assert message in capsys.readouterr().err
        assert not bad_out.exists() and not list(tmp_path.glob("out-*"))  # nothing half-written
    assert main(["prune", str(llama_folder), str(tmp_path / "x"), "--calibration", str(corpus), "--seqlen",
                 "0", "--quiet"]) == 2
    assert "seqlen must be >= 1" in capsys.readouterr().err


@pytest.mark.parametrize("flags", [["--vision", "0"], ["--vision", "0", "--connector", "0%"],
                                   ["--allocation", "language", "--connector", "0"]])
def test_cli_a_part_at_0_that_a_language_model_lacks_is_ignored(tmp_path, llama_folder, flags, capsys):
    """A part left at 0 needs nothing, also where the model has no such part: a Llama pruned from text with
    --vision 0 is the Llama pruned without it; a non-zero pattern for a part it lacks is still refused."""
    from vlmsparse.pipeline.save import load_pruned

    corpus = tmp_path / "corpus.txt"
    corpus.write_text(_text(200))
    common = ["--method", "wanda", "--sparsity", "2:4", "--calibration", str(corpus), "--nsamples", "2", "--quiet"]
    assert main(["prune", str(llama_folder), str(tmp_path / "plain"), *common]) == 0
    assert main(["prune", str(llama_folder), str(tmp_path / "out"), *common, *flags]) == 0
    _, expected = load_pruned(tmp_path / "plain")
    model, masks = load_pruned(tmp_path / "out")
    assert list(masks) == list(expected) and len(masks) == 14 and masks.sparsity() == 0.5
    assert all(torch.equal(masks[n], expected[n]) for n in masks)
    assert main(["prune", str(llama_folder), str(tmp_path / "x"), *common, "--vision", "0.5"]) == 2
    assert "has no vision part to prune" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_cli_prune_and_compress_turn_transformers_progress_bars_off_while_they_run(tmp_path, llama_folder,
                                                                                    monkeypatch):
    from transformers.utils import logging as hf_logging

    import vlmsparse.pipeline.folders as folders
    import vlmsparse.pipeline.save as save

    seen = []
    real = save.load_model

    def spy(*args, **kwargs):
        seen.append(hf_logging.is_progress_bar_enabled())
        return real(*args, **kwargs)

    monkeypatch.setattr(save, "load_model", spy)
    monkeypatch.setattr(folders, "load_model", spy)
    hf_logging.enable_progress_bar()
    assert main(["prune", str(llama_folder), str(tmp_path / "out"), "--method", "magnitude", "--quiet"]) == 0
    assert seen == [False] and hf_logging.is_progress_bar_enabled()  # off during the run, restored after
    assert main(["compress", str(tmp_path / "out"), str(tmp_path / "compressed")]) == 0
    assert seen == [False, False] and hf_logging.is_progress_bar_enabled()


def test_counts_are_refused_before_the_source_is_read(tmp_path, tokenizer):
    absent = tmp_path / "absent.txt"  # never read: the counts fail first
    for kwargs, name in (({"nsamples": 0}, "nsamples"), ({"nsamples": -3}, "nsamples"),
                         ({"nsamples": True}, "nsamples"), ({"seqlen": 0}, "seqlen"), ({"seqlen": -1}, "seqlen"),
                         ({"batch_size": 0}, "batch_size")):
        with pytest.raises(ValueError, match=rf"{name} must be an int >= 1 .*got {list(kwargs.values())[0]!r}"):
            text_calibration_batches(absent, tokenizer, **kwargs)
    for nsamples in (0, -1):
        with pytest.raises(ValueError, match=f"nsamples must be an int >= 1 .*got {nsamples}"):
            load_calibration_samples(absent, nsamples=nsamples)
    with pytest.raises(ValueError, match="seqlen must be an int >= 1"):
        text_calibration_windows(["w1 w2"], tokenizer, nsamples=1, seqlen=0)


def test_every_bad_text_source_names_its_path(tmp_path, tokenizer):
    short = tmp_path / "short.txt"
    short.write_text("w1 w2 w3 w4")
    with pytest.raises(ValueError, match=rf"{short}'? holds 4 tokens, fewer than one window of seqlen=5"):
        text_calibration_batches(short, tokenizer, nsamples=1, seqlen=5)
    assert text_calibration_batches(short, tokenizer, nsamples=1, seqlen=4)[0]["input_ids"].shape == (1, 4)
    blanks = tmp_path / "blanks"  # a folder whose .txt files hold only whitespace
    blanks.mkdir()
    (blanks / "a.txt").write_text("\n \n")
    (blanks / "b.txt").write_text("")
    with pytest.raises(ValueError, match=rf"{blanks}'? is empty"):
        load_calibration_text(blanks)
    (tmp_path / "bad-utf8").mkdir()
    (tmp_path / "bad-utf8" / "x.txt").write_bytes(b"w1 \xff\xfe w2")
    with pytest.raises(ValueError, match=r"bad-utf8/x\.txt: not UTF-8"):
        load_calibration_text(tmp_path / "bad-utf8")


def test_bad_record_and_image_folder_sources(tmp_path):
    from PIL import Image

    cases = {
        "empty.json": (b"", r"empty\.json is empty"),
        "latin1.json": ('[{"text": "caf\xe9"}]'.encode("latin-1"), r"latin1\.json: not UTF-8"),
        "latin1.jsonl": ('{"text": "caf\xe9"}\n'.encode("latin-1"), r"latin1\.jsonl: not UTF-8"),
        "broken.json": (b"[{", r"broken\.json: invalid JSON"),
        "broken.jsonl": (b'{"text": "a"}\n{oops\n', r"broken\.jsonl:2: not valid JSON"),
        "blank.jsonl": (b"\n\n", r"blank\.jsonl'? holds no samples"),
        "object.json": (b'{"text": "a"}', r"object\.json: expected a JSON list of records"),
        "no-text.jsonl": (b'{"image": "x.png", "label": 3}\n', r"no-text\.jsonl record 0: record has no text"),
        "number.json": (b"[3]", r"number\.json record 0: expected an object, got int"),
    }
    for name, (content, message) in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ValueError, match=message):
            load_calibration_samples(tmp_path / name, nsamples=4)
    (tmp_path / "missing-image.jsonl").write_text('{"image": "gone.png", "text": "a cat"}\n')
    with pytest.raises(ValueError, match=r"missing-image\.jsonl record 0: image file .*gone\.png.* does not exist"):
        load_calibration_samples(tmp_path / "missing-image.jsonl")

    empty = tmp_path / "empty-folder"
    empty.mkdir()
    with pytest.raises(ValueError, match=rf"{empty} holds no images .*no metadata\.jsonl and no \.txt files"):
        load_calibration_samples(empty)
    folder = tmp_path / "images"
    folder.mkdir()
    Image.new("RGB", (8, 8)).save(folder / "a.png")
    (folder / "captions.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"captions\.json: invalid JSON"):
        load_calibration_samples(folder)
    (folder / "captions.json").write_text('["a caption"]')
    with pytest.raises(ValueError, match=r"captions\.json: expected an object"):
        load_calibration_samples(folder)
    (folder / "captions.json").unlink()
    with pytest.raises(ValueError, match=r"a\.png: no caption"):
        load_calibration_samples(folder)
    (folder / "a.txt").write_bytes(b"\xff")
    with pytest.raises(ValueError, match=r"a\.txt: not UTF-8"):
        load_calibration_samples(folder)
    (folder / "a.txt").write_text("a black square")
    assert [s.text for s in load_calibration_samples(folder)] == ["a black square"]


def test_broken_datasets_folders(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = {"text": ["w1 w2 w3 " * 40] * 30}
    datasets.Dataset.from_dict(rows).save_to_disk(str(tmp_path / "truncated"))
    for arrow in (tmp_path / "truncated").glob("*.arrow"):
        arrow.write_bytes(arrow.read_bytes()[: arrow.stat().st_size // 2])
    datasets.Dataset.from_dict(rows).save_to_disk(str(tmp_path / "no-shards"))
    for arrow in (tmp_path / "no-shards").glob("*.arrow"):
        arrow.unlink()
    for name in ("truncated", "no-shards"):
        with pytest.raises(ValueError, match=rf"{tmp_path / name}: unreadable datasets folder"):
            load_calibration_text(tmp_path / name)
    datasets.Dataset.from_dict({"text": [1, 2]}).save_to_disk(str(tmp_path / "numbers-as-text"))
    with pytest.raises(ValueError, match=r"numbers-as-text: the dataset's 'text' column holds .*int64.*not strings"):
        load_calibration_text(tmp_path / "numbers-as-text")
    datasets.Dataset.from_dict({"text": ["", None]}).save_to_disk(str(tmp_path / "blank-rows"))
    with pytest.raises(ValueError, match=r"blank-rows'? is empty"):
        load_calibration_text(tmp_path / "blank-rows")


def _tree(folder) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_cli_bad_records_fail_before_loading_and_a_failed_prune_leaves_the_output_untouched(
        tmp_path, llama_folder, capsys, monkeypatch):
    import vlmsparse.pipeline.prune as prune
    import vlmsparse.pipeline.save as save

    records = tmp_path / "records.jsonl"
    records.write_text("\n".join(json.dumps({"text": _text(30, seed)}) for seed in range(4)))
    out = tmp_path / "pruned"
    assert main(["prune", str(llama_folder), str(out), "--method", "wanda", "--calibration", str(records),
                 "--nsamples", "4", "--quiet"]) == 0  # text-only records calibrate a language model
    before = _tree(out)
    assert "model.safetensors" in before

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the calibration records were checked")

    with monkeypatch.context() as patch:
        patch.setattr(save, "load_model", no_model)
        (tmp_path / "broken.jsonl").write_text('{"text": "w1"}\n{oops\n')
        (tmp_path / "empty-folder").mkdir()
        for source, message in (("broken.jsonl", "broken.jsonl:2: not valid JSON"),
                                ("empty-folder", "holds no images"),
                                ("absent.jsonl", "does not exist")):
            for target, flags in ((tmp_path / "new-out", []), (out, ["--overwrite"])):
                code = main(["prune", str(llama_folder), str(target), "--method", "sparsegpt", "--calibration",
                             str(tmp_path / source), "--quiet", *flags])
                assert code == 2 and message in capsys.readouterr().err
                assert not (tmp_path / "new-out").exists() and _tree(out) == before

    def failing_prune(*args, **kwargs):  # pruning fails after the model has loaded
        raise ValueError("calibration activations are not finite")

    monkeypatch.setattr(prune, "prune_model", failing_prune)
    for target, flags in ((tmp_path / "new-out", []), (out, ["--overwrite"])):
        assert main(["prune", str(llama_folder), str(target), "--method", "wanda", "--calibration", str(records),
                     "--nsamples", "4", "--quiet", *flags]) == 2
        assert "not finite" in capsys.readouterr().err
        assert not (tmp_path / "new-out").exists() and _tree(out) == before


@pytest.mark.parametrize("config, expected", [
    ({"max_position_embeddings": 4096}, 2048), ({"max_position_embeddings": 128}, 128),
    ({"text_config": {"max_position_embeddings": 512}}, 512), ({"model_type": "x"}, 2048),
])
def test_default_text_seqlen(tmp_path, config, expected):
    from vlmsparse.data.calibration import default_text_seqlen

    (tmp_path / "config.json").write_text(json.dumps(config))
    assert default_text_seqlen(tmp_path) == expected


def test_text_token_ids_joins_documents_by_a_blank_line():
    """The token stream that text calibration and text training cut: the documents joined by a blank line,
    tokenized without special tokens, a processor's tokenizer taken from it."""
    from vlmsparse.data.calibration import text_token_ids

    seen = []

    class Recorder:
        def __call__(self, text, add_special_tokens=True, verbose=True):
            seen.append((text, add_special_tokens))
            return {"input_ids": [len(part) for part in text.split("\n\n")]}

    class Processor:
        tokenizer = Recorder()

    ids = text_token_ids(["one", "three", "fifteen"], Processor())
    assert seen == [("one\n\nthree\n\nfifteen", False)]
    assert ids.dtype == torch.long and ids.tolist() == [3, 5, 7]
