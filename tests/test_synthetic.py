"""Synthetic scenes, questions, split and the word-level tokenizer / LLaVA processor."""

from __future__ import annotations

import random

import pytest
import torch

from vlmsparse.data import synthetic
from vlmsparse.data.vocab import SPECIAL_TOKENS, build_processor, build_tokenizer


def test_layouts_and_fixed_split():
    layouts = synthetic.all_layouts()
    assert len(layouts) == 48 + 432 + 576 == len({s.key() for s in layouts})
    heldout = [s for s in layouts if synthetic.scene_split(s) == "heldout"]
    assert 0.15 < len(heldout) / len(layouts) < 0.25
    # the split is a property of the layout, not of a seed
    assert [synthetic.scene_split(s) for s in layouts] == [synthetic.scene_split(s) for s in synthetic.all_layouts()]


def test_train_and_heldout_never_share_a_layout():
    train = {s.scene.key() for s in synthetic.make_vqa_samples(400, seed=0, split="train")}
    held = {s.scene.key() for s in synthetic.make_vqa_samples(400, seed=0, split="heldout")}
    assert train and held and not train & held


def test_same_seed_same_samples_other_seed_differs():
    a = synthetic.make_vqa_samples(20, seed=3)
    b = synthetic.make_vqa_samples(20, seed=3)
    c = synthetic.make_vqa_samples(20, seed=4)
    assert [(s.question, s.answer, s.image.tobytes()) for s in a] == [(s.question, s.answer, s.image.tobytes()) for s in b]
    assert [s.image.tobytes() for s in a] != [s.image.tobytes() for s in c]


def test_answers_are_true_for_the_scene():
    for s in synthetic.make_vqa_samples(300, seed=1):
        objs = s.scene.objects
        assert len(s.answer.split()) == 1
        words = s.question.rstrip("?").split()
        if s.kind == "color":
            assert [o.color for o in objs if o.shape == words[-1]] == [s.answer]
        elif s.kind == "shape":
            assert [o.shape for o in objs if o.color == words[-2]] == [s.answer]
        elif s.kind == "count":
            assert s.answer == synthetic.NUMBER_WORDS[len(objs)]
        elif s.kind == "position":
            (o,) = [o for o in objs if o.color == words[2] and o.shape == words[3]]
            expected = ("left", "right")[o.cell[1]] if "left" in words else ("top", "bottom")[o.cell[0]]
            assert s.answer == expected
        else:
            assert s.kind == "presence"
            present = any(o.color == words[-2] and o.shape == words[-1] for o in objs)
            assert s.answer == ("yes" if present else "no")


def test_kinds_balanced_and_presence_balanced():
    samples = synthetic.make_vqa_samples(500, seed=2)
    kinds = [s.kind for s in samples]
    assert all(kinds.count(k) == 100 for k in synthetic.QUESTION_KINDS)
    yes = sum(s.answer == "yes" for s in samples if s.kind == "presence")
    assert 30 < yes < 70


def test_render_draws_objects_in_their_cells():
    scene = synthetic.Scene((synthetic.SceneObject("red", "square", (0, 1)),))
    image = synthetic.render_scene(scene, 64, random.Random(0))
    pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(64, 64, 3).int()
    red = (pixels[..., 0] > 150) & (pixels[..., 1] < 100)
    assert red[:32, 32:].sum() > 0.4 * 32 * 32  # top right cell mostly red
    assert red[32:, :].sum() == 0 and red[:, :32].sum() == 0


def test_scene_validation():
    with pytest.raises(ValueError, match="distinct color"):
        synthetic.Scene((synthetic.SceneObject("red", "square", (0, 0)), synthetic.SceneObject("red", "circle", (0, 1))))
    with pytest.raises(ValueError, match="split"):
        synthetic.make_vqa_samples(2, split="test")
    with pytest.raises(ValueError, match="question kind"):
        synthetic.make_vqa_samples(2, kinds=("size",))


def test_synthetic_captions_contract():
    pairs = synthetic.synthetic_captions(5, seed=7)
    again = synthetic.synthetic_captions(5, seed=7)
    assert len(pairs) == 5
    for (image, caption), (image2, caption2) in zip(pairs, again):
        assert image.size == (336, 336) and image.mode == "RGB"
        assert caption == caption2 and image.tobytes() == image2.tobytes()
        assert caption.startswith("a ") and caption.endswith(".")
    assert synthetic.synthetic_captions(2, image_size=64)[0][0].size == (64, 64)


def test_tokenizer_covers_the_task_and_round_trips():
    tok = build_tokenizer()
    assert [tok.convert_ids_to_tokens(i) for i in range(len(SPECIAL_TOKENS))] == list(SPECIAL_TOKENS)
    for s in synthetic.make_vqa_samples(50, seed=0):
        ids = tok(f"USER: <image>\n{s.question} ASSISTANT: {s.answer}", add_special_tokens=False)["input_ids"]
        assert tok.unk_token_id not in ids
    for _, caption in synthetic.synthetic_captions(10, image_size=32):
        assert tok.unk_token_id not in tok(caption)["input_ids"]
    ids = tok("What COLOR is the circle?")["input_ids"]
    assert ids[0] == tok.bos_token_id
    assert tok.decode(ids, skip_special_tokens=True) == "what color is the circle ?"
    assert tok("zebra")["input_ids"][1] == tok.unk_token_id


def test_processor_expands_image_tokens_and_saves(tmp_path):
    from transformers import AutoProcessor

    proc = build_processor(32, 8)
    sample = synthetic.make_vqa_samples(1)[0]
    out = proc(images=sample.image, text="USER: <image>\n" + sample.question, return_tensors="pt")
    image_id = proc.tokenizer.convert_tokens_to_ids("<image>")
    assert int((out["input_ids"] == image_id).sum()) == 16
    assert out["pixel_values"].shape == (1, 3, 32, 32)
    proc.save_pretrained(tmp_path)
    again = AutoProcessor.from_pretrained(tmp_path)
    out2 = again(images=sample.image, text="USER: <image>\n" + sample.question, return_tensors="pt")
    assert torch.equal(out["input_ids"], out2["input_ids"]) and torch.equal(out["pixel_values"], out2["pixel_values"])
    with pytest.raises(ValueError, match="multiple of patch_size"):
        build_processor(30, 8)


def test_pretrain_encoding_matches_the_finetune_encoding():
    from vlmsparse.data.datasets import Example, encode_example
    from vlmsparse.demo.pretrain import encode_vqa

    proc = build_processor(32, 8)
    samples = synthetic.make_vqa_samples(6, seed=9)
    batch = encode_vqa(proc, samples)
    for row, s in enumerate(samples):
        ref = encode_example(proc, Example(s.image, (("human", s.question), ("gpt", s.answer))))
        n = ref["input_ids"].numel()
        assert torch.equal(batch["input_ids"][row, :n], ref["input_ids"])
        assert torch.equal(batch["labels"][row, :n], ref["labels"])
        assert int(batch["attention_mask"][row].sum()) == n
        assert torch.equal(batch["pixel_values"][row], ref["pixel_values"])
        assert int(batch["answer_pos"][row]) == int((ref["labels"] == -100).sum())


def test_pretrain_config_validation():
    from vlmsparse.demo.pretrain import PretrainConfig

    with pytest.raises(ValueError, match="text_hidden"):
        PretrainConfig(text_hidden=40)
    with pytest.raises(ValueError, match="multiple of patch_size"):
        PretrainConfig(image_size=36, patch_size=8)
    with pytest.raises(ValueError, match="lr"):
        PretrainConfig(lr=0.0)


def test_demo_cache_key_follows_the_data_version(monkeypatch):
    """A changed generator (DATA_VERSION bumped) must not reuse a demo model trained on the old data."""
    from vlmsparse.data import synthetic
    from vlmsparse.demo import run as demo
    from vlmsparse.demo.pretrain import PretrainConfig

    before = demo._pretrain_key(PretrainConfig())
    assert demo._pretrain_key(PretrainConfig()) == before
    monkeypatch.setattr(synthetic, "DATA_VERSION", synthetic.DATA_VERSION + 1)
    assert demo._pretrain_key(PretrainConfig()) != before
