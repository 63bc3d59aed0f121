"""Data formats for finetuning: LLaVA conversations, caption JSONL, synthetic VQA; label masking; errors."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from vlmsparse.data.datasets import (
    IGNORE_INDEX,
    CaptionDataset,
    ConversationDataset,
    DataFormatError,
    SyntheticVQADataset,
    VLMCollator,
    load_dataset,
)
from vlmsparse.data.vocab import build_processor


@pytest.fixture(scope="module")
def processor():
    return build_processor(image_size=32, patch_size=8)


def _image(path, color=(255, 0, 0)):
    Image.new("RGB", (40, 40), color).save(path)
    return path


def _answer_tokens(processor, item):
    keep = item["labels"] != IGNORE_INDEX
    return processor.tokenizer.convert_ids_to_tokens(item["input_ids"][keep].tolist())


def test_conversation_labels_cover_answers_only(tmp_path, processor):
    _image(tmp_path / "a.png")
    rows = [{"image": "a.png", "conversations": [
        {"from": "human", "value": "<image>\nwhat color is the circle?"},
        {"from": "gpt", "value": "red"},
        {"from": "human", "value": "how many shapes are there?"},
        {"from": "gpt", "value": "two"},
    ]}]
    (tmp_path / "conv.json").write_text(json.dumps(rows, indent=1))
    ds = ConversationDataset(tmp_path / "conv.json", processor)
    item = ds[0]
    ids = item["input_ids"]
    assert item["labels"].shape == ids.shape == item["attention_mask"].shape
    assert item["pixel_values"].shape == (3, 32, 32)
    # exactly 16 image tokens (4x4 patches), all masked; the prompt is masked; answers + EOS are kept
    image_id = processor.image_token_id
    assert int((ids == image_id).sum()) == 16
    assert bool((item["labels"][ids == image_id] == IGNORE_INDEX).all())
    assert _answer_tokens(processor, item) == ["red", "</s>", "two", "</s>"]
    kept = item["labels"] != IGNORE_INDEX
    assert torch.equal(item["labels"][kept], ids[kept])


def test_caption_jsonl_and_load_dataset(tmp_path, processor):
    _image(tmp_path / "x.png")
    (tmp_path / "caps.jsonl").write_text(
        json.dumps({"image": "x.png", "caption": "a red circle"}) + "\n\n" + json.dumps({"image": "x.png", "text": "a blue square"}) + "\n"
    )
    ds = load_dataset(str(tmp_path / "caps.jsonl"), processor)
    assert isinstance(ds, CaptionDataset) and len(ds) == 2
    assert _answer_tokens(processor, ds[0]) == ["a", "red", "circle", "</s>"]
    assert _answer_tokens(processor, ds[1]) == ["a", "blue", "square", "</s>"]
    with pytest.raises(ValueError, match="unknown format"):
        (tmp_path / "d.csv").write_text("x")
        load_dataset(str(tmp_path / "d.csv"), processor)
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_dataset(str(tmp_path / "missing.json"), processor)


def test_bad_rows_name_their_line(tmp_path, processor):
    _image(tmp_path / "x.png")
    good = json.dumps({"image": "x.png", "caption": "a red circle"})
    (tmp_path / "bad.jsonl").write_text(good + "\n" + good + "\n{not json\n")
    with pytest.raises(DataFormatError, match=r"bad\.jsonl:3"):
        CaptionDataset(tmp_path / "bad.jsonl", processor)
    (tmp_path / "nocap.jsonl").write_text(good + "\n" + json.dumps({"image": "x.png"}) + "\n")
    with pytest.raises(DataFormatError, match=r"nocap\.jsonl:2.*caption"):
        CaptionDataset(tmp_path / "nocap.jsonl", processor)
    # conversation JSON: the second row has a bad turn; the error names the line where that row starts
    rows = [
        {"image": "x.png", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]},
        {"image": "x.png", "conversations": [{"from": "robot", "value": "q"}, {"from": "gpt", "value": "a"}]},
    ]
    text = json.dumps(rows, indent=1)
    (tmp_path / "conv.json").write_text(text)
    line = text.splitlines().index(" {", 2) + 1  # the second row's opening brace
    with pytest.raises(DataFormatError, match=rf"conv\.json:{line} \(row 1\).*'from'"):
        ConversationDataset(tmp_path / "conv.json", processor)
    (tmp_path / "broken.json").write_text('[\n {"image": "x.png",\n  "conversations": [}\n]')
    with pytest.raises(DataFormatError, match=r"broken\.json:3: not valid JSON"):
        ConversationDataset(tmp_path / "broken.json", processor)


def test_images_that_do_not_load(tmp_path, processor):
    (tmp_path / "missing.jsonl").write_text(json.dumps({"image": "nope.png", "caption": "a"}) + "\n")
    with pytest.raises(DataFormatError, match=r"missing\.jsonl:1: image file .*nope\.png.* does not exist"):
        CaptionDataset(tmp_path / "missing.jsonl", processor)
    (tmp_path / "junk.png").write_bytes(b"this is not a png")
    (tmp_path / "junk.jsonl").write_text(json.dumps({"image": "junk.png", "caption": "a"}) + "\n")
    ds = CaptionDataset(tmp_path / "junk.jsonl", processor)
    with pytest.raises(DataFormatError, match=r"junk\.jsonl:1: image .*junk\.png.* does not load"):
        ds[0]


def test_turns_must_alternate(tmp_path, processor):
    _image(tmp_path / "x.png")
    rows = [{"image": "x.png", "conversations": [{"from": "human", "value": "q"}, {"from": "human", "value": "q2"}]}]
    (tmp_path / "c.json").write_text(json.dumps(rows))
    ds = ConversationDataset(tmp_path / "c.json", processor)
    with pytest.raises(DataFormatError, match="turn 1 is 'human', expected 'gpt'"):
        ds[0]


def test_blip_style_processor_prepends_query_tokens(tmp_path, processor):
    from transformers import Blip2Processor

    blip = Blip2Processor(image_processor=processor.image_processor, tokenizer=processor.tokenizer, num_query_tokens=4)
    _image(tmp_path / "x.png")
    (tmp_path / "caps.jsonl").write_text(json.dumps({"image": "x.png", "caption": "a red circle"}) + "\n")
    item = CaptionDataset(tmp_path / "caps.jsonl", blip)[0]
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    assert item["input_ids"][:4].tolist() == [image_id] * 4
    assert int((item["input_ids"] == image_id).sum()) == 4
    assert "user" not in processor.tokenizer.convert_ids_to_tokens(item["input_ids"].tolist())
    assert _answer_tokens(processor, item) == ["a", "red", "circle", "</s>"]


def test_synthetic_dataset_and_collator(processor):
    ds = SyntheticVQADataset(processor, num=6, seed=1)
    items = [ds[i] for i in range(len(ds))]
    batch = VLMCollator(pad_token_id=processor.tokenizer.pad_token_id)(items)
    lengths = [it["input_ids"].numel() for it in items]
    assert batch["input_ids"].shape == (6, max(lengths))
    assert batch["pixel_values"].shape == (6, 3, 32, 32)
    for row, n in enumerate(lengths):
        assert batch["attention_mask"][row].sum() == n
        assert bool((batch["labels"][row, n:] == IGNORE_INDEX).all())
        assert bool((batch["input_ids"][row, n:] == processor.tokenizer.pad_token_id).all())
        assert torch.equal(batch["input_ids"][row, :n], items[row]["input_ids"])
    # every example trains on its one-word answer + EOS
    assert all(len(_answer_tokens(processor, it)) == 2 for it in items)
    prompt_length = lengths[0] - 2
    with pytest.raises(DataFormatError, match="no answer token left"):
        SyntheticVQADataset(processor, num=1, seed=1, max_length=prompt_length)[0]
    assert SyntheticVQADataset(processor, num=1, seed=1, max_length=prompt_length + 1)[0]["input_ids"].numel() == prompt_length + 1
    image_tokens = int((items[0]["input_ids"] == processor.tokenizer.convert_tokens_to_ids("<image>")).sum())
    with pytest.raises(DataFormatError, match="cuts the image tokens"):
        SyntheticVQADataset(processor, num=1, seed=1, max_length=image_tokens)[0]


def test_instructblip_processor_extra_inputs_are_padded(processor):
    """InstructBLIP's processor also returns the Q-Former's instruction tokens; they reach the batch, padded."""
    from transformers import InstructBlipProcessor

    ib = InstructBlipProcessor(image_processor=processor.image_processor, tokenizer=processor.tokenizer,
                               qformer_tokenizer=processor.tokenizer, num_query_tokens=4)
    ds = SyntheticVQADataset(ib, num=3, seed=2)
    items = [ds[i] for i in range(3)]
    assert all("qformer_input_ids" in it and "qformer_attention_mask" in it for it in items)
    batch = VLMCollator(pad_token_id=0)(items)
    width = max(it["qformer_input_ids"].numel() for it in items)
    assert batch["qformer_input_ids"].shape == (3, width)
    for row, it in enumerate(items):
        n = it["qformer_input_ids"].numel()
        assert torch.equal(batch["qformer_input_ids"][row, :n], it["qformer_input_ids"])
        assert int(batch["qformer_attention_mask"][row].sum()) == int(it["qformer_attention_mask"].sum())


def _blip(processor):
    from transformers import Blip2Processor

    return Blip2Processor(image_processor=processor.image_processor, tokenizer=processor.tokenizer, num_query_tokens=4)


def test_encoder_decoder_layout_puts_the_answer_on_the_decoder(tmp_path, processor):
    """Flan-T5 language models: prompt (with earlier turns) -> encoder; start + last answer + EOS -> decoder,
    labels aligned with the decoder inputs (start masked), so logits i predict label i + 1 as for decoder-only."""
    blip = _blip(processor)
    tok = processor.tokenizer
    _image(tmp_path / "x.png")
    rows = [{"image": "x.png", "conversations": [
        {"from": "human", "value": "<image>\nwhat color is the circle ?"}, {"from": "gpt", "value": "red"},
        {"from": "human", "value": "how many circles ?"}, {"from": "gpt", "value": "two circles"}]}]
    (tmp_path / "conv.json").write_text(json.dumps(rows))
    decoder_only = ConversationDataset(tmp_path / "conv.json", blip)[0]
    item = ConversationDataset(tmp_path / "conv.json", blip, decoder_start_token_id=0)[0]
    eos = tok.eos_token_id
    answer = tok.convert_tokens_to_ids(["two", "circles"])
    assert item["decoder_input_ids"].tolist() == [0, *answer, eos]
    assert item["labels"].tolist() == [IGNORE_INDEX, *answer, eos]
    assert item["decoder_attention_mask"].tolist() == [1] * 4
    # the encoder sees everything the decoder-only layout sees before the last answer, the first answer included
    prefix = decoder_only["input_ids"].numel() - len(answer) - 1
    assert torch.equal(item["input_ids"], decoder_only["input_ids"][:prefix])
    assert tok.convert_tokens_to_ids("red") in item["input_ids"].tolist()
    assert item["attention_mask"].tolist() == [1] * prefix
    assert torch.equal(item["pixel_values"], decoder_only["pixel_values"])

    ds = SyntheticVQADataset(blip, num=3, seed=4, decoder_start_token_id=0)
    items = [ds[i] for i in range(3)] + [item]
    batch = VLMCollator(pad_token_id=tok.pad_token_id)(items)
    width = max(it["decoder_input_ids"].numel() for it in items)
    assert batch["decoder_input_ids"].shape == batch["labels"].shape == (4, width)
    assert batch["input_ids"].shape == (4, max(it["input_ids"].numel() for it in items))
    for row, it in enumerate(items):
        n = it["decoder_input_ids"].numel()
        assert torch.equal(batch["labels"][row, :n], it["labels"])
        assert bool((batch["labels"][row, n:] == IGNORE_INDEX).all())
        assert bool((batch["decoder_input_ids"][row, n:] == tok.pad_token_id).all())
        assert int(batch["decoder_attention_mask"][row].sum()) == n
    with pytest.raises(DataFormatError, match="no 'gpt' turn"):
        from vlmsparse.data.datasets import Example, encode_example

        encode_example(blip, Example(tmp_path / "x.png", (("human", "hello"),), "row"), decoder_start_token_id=0)


# ------------------------------------------------------------------------------------- text-only rows
def _mixed_rows(tmp_path):
    _image(tmp_path / "a.png")
    return [
        {"image": "a.png", "conversations": [{"from": "human", "value": "<image>\nwhat color is the circle?"},
                                             {"from": "gpt", "value": "red"}]},
        {"conversations": [{"from": "human", "value": "what color is the circle?"}, {"from": "gpt", "value": "red"},
                           {"from": "human", "value": "how many shapes?"}, {"from": "gpt", "value": "two"}]},
        {"image": None, "conversations": [{"from": "human", "value": "one word"}, {"from": "gpt", "value": "blue"}]},
    ]


def test_text_only_rows_encode_without_image(tmp_path, processor):
    """Rows without 'image' (absent or null): the LLaVA template without <image>, BOS first, no pixel_values,
    labels on the answers (+ EOS) only; a plain tokenizer (a language model alone) encodes them identically."""
    (tmp_path / "conv.json").write_text(json.dumps(_mixed_rows(tmp_path)))
    ds = ConversationDataset(tmp_path / "conv.json", processor)
    tok = processor.tokenizer
    assert ds.examples[1].image is None and ds.examples[2].image is None
    assert "pixel_values" in ds[0]
    item = ds[1]
    assert set(item) == {"input_ids", "attention_mask", "labels"}
    tokens = tok.convert_ids_to_tokens(item["input_ids"].tolist())
    assert tokens == ["<s>", "user", ":", "what", "color", "is", "the", "circle", "?", "assistant", ":", "red", "</s>",
                      "user", ":", "how", "many", "shapes", "?", "assistant", ":", "two", "</s>"]
    labels = item["labels"].tolist()
    kept = [i for i, label in enumerate(labels) if label != IGNORE_INDEX]
    assert [tokens[i] for i in kept] == ["red", "</s>", "two", "</s>"]
    assert all(labels[i] == item["input_ids"][i] for i in kept)
    assert item["attention_mask"].tolist() == [1] * len(tokens)
    assert _answer_tokens(processor, ds[2]) == ["blue", "</s>"]
    # the same rows through the tokenizer alone, as for a Llama / OPT language model
    (tmp_path / "text.json").write_text(json.dumps(_mixed_rows(tmp_path)[1:]))
    text = load_dataset(str(tmp_path / "text.json"), tok)
    for index in (0, 1):
        plain, llava = text[index], ds[index + 1]
        assert set(plain) == set(llava) and all(torch.equal(plain[k], llava[k]) for k in plain)


def test_text_only_refusals(tmp_path, processor):
    """A present but unusable image is still an error; a tokenizer alone refuses images (rows, captions, the
    synthetic set); BLIP-2 refuses text-only rows; <image> in a row without image is an error."""
    rows = _mixed_rows(tmp_path)
    for bad in ("", 5):
        (tmp_path / "bad.json").write_text(json.dumps([{**rows[1], "image": bad}]))
        with pytest.raises(DataFormatError, match=r"bad\.json:1 \(row 0\): 'image' must be a non-empty string path"):
            ConversationDataset(tmp_path / "bad.json", processor)
    (tmp_path / "conv.json").write_text(json.dumps(rows, indent=1))
    with pytest.raises(DataFormatError, match=r"\(row 0\): the example has an image, but the processor is a tokenizer"):
        ConversationDataset(tmp_path / "conv.json", processor.tokenizer)
    (tmp_path / "caps.jsonl").write_text(json.dumps({"image": "a.png", "caption": "a red circle"}) + "\n")
    with pytest.raises(DataFormatError, match=r"caps\.jsonl:1: the example has an image"):
        load_dataset(str(tmp_path / "caps.jsonl"), processor.tokenizer)
    with pytest.raises(ValueError, match="synthetic data set is image-text"):
        load_dataset("synthetic:2", processor.tokenizer)
    with pytest.raises(DataFormatError, match=r"\(row 1\): the example has no image, but a BLIP-2"):
        ConversationDataset(tmp_path / "conv.json", _blip(processor))
    placeholder = [{"conversations": [{"from": "human", "value": "<image>\nwhat?"}, {"from": "gpt", "value": "red"}]}]
    (tmp_path / "ph.json").write_text(json.dumps(placeholder))
    with pytest.raises(DataFormatError, match=r"ph\.json:1 \(row 0\): a turn has the <image> placeholder"):
        ConversationDataset(tmp_path / "ph.json", processor)
    with pytest.raises(DataFormatError, match="the example has an image"):
        from vlmsparse.data.datasets import Example, encode_example

        encode_example(processor.tokenizer, Example(tmp_path / "a.png", (("human", "q"), ("gpt", "red")), "row"))


def test_collator_mixes_images_for_llava_only(tmp_path, processor):
    """pixel_values stacks the images present, in row order; a text-only batch has no pixel_values; a text-only
    row with image tokens, a BLIP-style or Q-Former image example beside a text-only one are refused by row."""
    from vlmsparse.data.datasets import image_token_id

    (tmp_path / "conv.json").write_text(json.dumps(_mixed_rows(tmp_path)))
    ds = ConversationDataset(tmp_path / "conv.json", processor)
    image_id = image_token_id(processor)
    assert image_id == processor.image_token_id == 4 and image_token_id(processor.tokenizer) is None
    assert image_token_id(_blip(processor)) == 4
    collate = VLMCollator(pad_token_id=0, image_token_id=image_id)
    text, picture = ds[1], ds[0]
    batch = collate([text, picture, ds[2]])
    assert batch["pixel_values"].shape == (1, 3, 32, 32)
    assert torch.equal(batch["pixel_values"][0], picture["pixel_values"])
    assert batch["input_ids"].shape == (3, max(text["input_ids"].numel(), picture["input_ids"].numel()))
    assert int((batch["input_ids"] == image_id).sum()) == 16
    assert torch.equal(batch["input_ids"][1, : picture["input_ids"].numel()], picture["input_ids"])
    assert "pixel_values" not in collate([text, ds[2]])
    two = collate([picture, text, picture])["pixel_values"]
    assert two.shape == (2, 3, 32, 32) and torch.equal(two[1], picture["pixel_values"])
    smuggled = {**text, "input_ids": torch.cat([text["input_ids"], torch.tensor([image_id])])}
    with pytest.raises(ValueError, match="row 1 has no image but 1 image tokens"):
        collate([picture, smuggled])
    blip_item = SyntheticVQADataset(_blip(processor), num=1, seed=0)[0]
    with pytest.raises(ValueError, match="row 1 has no image, but the batch's image examples are laid out for BLIP-2"):
        collate([blip_item, text])
    qformer = {**picture, "qformer_input_ids": torch.tensor([5, 6]), "qformer_attention_mask": torch.ones(2)}
    with pytest.raises(ValueError, match="row 0 has no image, but .* BLIP-2 / InstructBLIP"):
        VLMCollator(pad_token_id=0)([text, qformer])
    with pytest.raises(ValueError, match="row 1 has no 'qformer_input_ids', another row has"):
        VLMCollator(pad_token_id=0)([qformer, picture])


def test_text_windows_for_language_modelling(tmp_path, processor):
    """A .txt file (or a folder of them) gives consecutive windows of max_length tokens of the joined documents,
    every token a label; the rest is dropped; the collator batches them as they are."""
    from vlmsparse.data.datasets import TextWindowDataset

    tokenizer = processor.tokenizer
    words = [w for w in tokenizer.get_vocab() if w.isalpha() and len(w) > 2][:30]
    text = " ".join(words[i % len(words)] for i in range(200))
    (tmp_path / "corpus.txt").write_text(text)
    expected = tokenizer(text, add_special_tokens=False)["input_ids"]
    data = load_dataset(str(tmp_path / "corpus.txt"), tokenizer, max_length=16)
    assert isinstance(data, TextWindowDataset) and len(data) == len(expected) // 16 > 5
    for i in range(len(data)):
        item = data[i]
        assert item["input_ids"].tolist() == expected[16 * i : 16 * (i + 1)]
        assert torch.equal(item["labels"], item["input_ids"]) and item["attention_mask"].tolist() == [1] * 16
    batch = VLMCollator(pad_token_id=tokenizer.pad_token_id)([data[0], data[1]])
    assert batch["input_ids"].shape == (2, 16) and torch.equal(batch["labels"], batch["input_ids"])
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "a.txt").write_text(text[: len(text) // 2])
    (folder / "b.txt").write_text(text[len(text) // 2 :])
    joined = tokenizer(text[: len(text) // 2] + "\n\n" + text[len(text) // 2 :], add_special_tokens=False)["input_ids"]
    assert load_dataset(str(folder), tokenizer, max_length=16)[1]["input_ids"].tolist() == joined[16:32]
    (tmp_path / "long.txt").write_text(" ".join(words[i % len(words)] for i in range(1100)))
    default = load_dataset(str(tmp_path / "long.txt"), tokenizer)  # windows of TEXT_WINDOW = 512 tokens
    assert default.max_length == 512 and len(default) == 2 and default[1]["input_ids"].shape == (512,)


def test_text_data_refusals(tmp_path, processor):
    from vlmsparse.data.datasets import TextWindowDataset

    (tmp_path / "short.txt").write_text("a few words")
    with pytest.raises(ValueError, match=r"holds \d+ tokens, fewer than one window of max_length=512"):
        load_dataset(str(tmp_path / "short.txt"), processor.tokenizer)
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(ValueError, match="is empty"):
        load_dataset(str(tmp_path / "empty.txt"), processor.tokenizer)
    (tmp_path / "nothing").mkdir()
    with pytest.raises(ValueError, match="holds no .txt files"):
        load_dataset(str(tmp_path / "nothing"), processor.tokenizer)
    (tmp_path / "long.txt").write_text("word " * 100)
    with pytest.raises(ValueError, match="encoder-decoder one"):
        TextWindowDataset(tmp_path / "long.txt", processor.tokenizer, 8, decoder_start_token_id=0)

    class Blip2Like:
        num_query_tokens = 4
        tokenizer = processor.tokenizer

    with pytest.raises(ValueError, match="every example needs an image"):
        load_dataset(str(tmp_path / "long.txt"), Blip2Like(), max_length=8)
    with pytest.raises(ValueError, match=r"unknown format '.csv' \(allowed: .*\.txt text or a folder of text"):
        (tmp_path / "rows.csv").write_text("x")
        load_dataset(str(tmp_path / "rows.csv"), processor.tokenizer)
