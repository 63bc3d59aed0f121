"""VQAv2 answer normalisation and scoring on hand-written cases with known answers; JSONL loading."""

from __future__ import annotations

import json

import pytest

from vlmsparse.eval.vqa import (
    VQARow,
    exact_match,
    load_vqa_jsonl,
    normalize_answer,
    score_predictions,
    vqa_accuracy,
)


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("Yes", "yes"),
        ("  YES.  ", "yes"),
        ("Two", "2"),
        ("two dogs", "2 dogs"),
        ("none", "0"),
        ("A red circle", "red circle"),
        ("the cat", "cat"),
        ("an apple", "apple"),
        ("dont", "don't"),
        ("isnt it", "isn't it"),
        ("3.5", "3.5"),
        ("1,000", "1000"),
        ("red, blue", "red blue"),
        ("left-hand", "left hand"),
        ("what?", "what"),
        ("(circle)", "circle"),
        ("ten", "10"),
        ("theyre", "they're"),
        ("there are three", "there are 3"),
        ("\tbottom\n", "bottom"),
    ],
)
def test_normalize_answer(raw, expected):
    assert normalize_answer(raw) == expected


def test_normalize_rejects_non_string():
    with pytest.raises(ValueError, match="string"):
        normalize_answer(3)


def test_vqa_accuracy_counts_matches_over_three():
    answers = ["red", "red", "blue", "Red.", "green", "green", "green", "green", "blue", "yellow"]
    assert vqa_accuracy("red", answers) == 1.0  # 3 matches (case and period normalised)
    assert vqa_accuracy("blue", answers) == pytest.approx(2 / 3)
    assert vqa_accuracy("yellow", answers) == pytest.approx(1 / 3)
    assert vqa_accuracy("purple", answers) == 0.0
    assert vqa_accuracy("the green", answers) == 1.0  # article removed, 4 matches capped at 1


def test_vqa_accuracy_number_words_match_digits():
    assert vqa_accuracy("two", ["2", "2", "2"]) == 1.0
    assert vqa_accuracy("2", ["two"]) == pytest.approx(1 / 3)


def test_vqa_accuracy_leave_one_out_official_form():
    # 10 answers, 3 say "red": leaving out one of the 3 -> 2/3, leaving out any of the 7 others -> 1
    answers = ["red"] * 3 + ["blue"] * 7
    assert vqa_accuracy("red", answers, leave_one_out=True) == pytest.approx((3 * 2 / 3 + 7 * 1) / 10)
    assert vqa_accuracy("red", answers) == 1.0


def test_vqa_accuracy_needs_answers():
    with pytest.raises(ValueError, match="at least one"):
        vqa_accuracy("x", [])


def test_exact_match_uses_most_common_answer():
    assert exact_match("Blue", ["red", "blue", "blue"]) == 1.0
    assert exact_match("red", ["red", "blue", "blue"]) == 0.0
    assert exact_match("A dog", ["dog"]) == 1.0


def test_score_predictions_averages_and_groups_by_kind():
    rows = [
        VQARow("img", "what color?", ("red",), kind="color"),
        VQARow("img", "how many?", ("two",), kind="count"),
        VQARow("img", "what color?", ("blue", "blue", "blue"), kind="color"),
    ]
    report = score_predictions(rows, ["red", "3", "blue"])
    assert report.num == 3
    # row 1: one human answer matches -> 1/3 accuracy, exact match 1
    assert report.accuracy == pytest.approx((1 / 3 + 0 + 1) / 3)
    assert report.exact_match == pytest.approx(2 / 3)
    assert report.per_kind == {"color": pytest.approx((1 / 3 + 1) / 2), "count": 0.0}
    with pytest.raises(ValueError, match="2 predictions for 3 rows"):
        score_predictions(rows, ["a", "b"])


def test_load_vqa_jsonl(tmp_path):
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    lines = [
        {"image": "a.png", "question": "what?", "answers": ["x", "y"]},
        {"image": "a.png", "question": "how?", "answer": "z", "kind": "count"},
        {"image": "a.png", "question": "vqav2 style?", "answers": [{"answer": "w"}]},
    ]
    path = tmp_path / "q.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    rows = load_vqa_jsonl(path)
    assert [r.answers for r in rows] == [("x", "y"), ("z",), ("w",)]
    assert rows[1].kind == "count" and rows[0].image == str(tmp_path / "a.png")
    assert len(load_vqa_jsonl(path, limit=2)) == 2

    path.write_text('{"image": "a.png", "question": "q", "answers": ["x"]}\nnot json\n')
    with pytest.raises(ValueError, match=r"q.jsonl:2: not valid JSON"):
        load_vqa_jsonl(path)
    path.write_text('{"image": "missing.png", "question": "q", "answers": ["x"]}\n')
    with pytest.raises(FileNotFoundError, match="missing.png"):
        load_vqa_jsonl(path)
    path.write_text('{"image": "a.png", "question": "q", "answers": []}\n')
    with pytest.raises(ValueError, match="answers"):
        load_vqa_jsonl(path)


def test_eval_blip2_folder_uses_the_image_tokens(tmp_path, capsys):
    """`vlmsparse eval` on a BLIP-2 folder: the processor inserts the query tokens, so the model sees the image;
    a model whose image token the processor does not produce is refused rather than silently image-blind."""
    from factories import synthetic_processor, tiny_blip2

    from vlmsparse.cli import main
    from vlmsparse.data.synthetic import export_vqa_jsonl, make_vqa_samples

    data = export_vqa_jsonl(make_vqa_samples(6, seed=1, split="heldout"), str(tmp_path / "vqa"))
    model, processor = tiny_blip2(), synthetic_processor("blip2")
    model.config.image_token_index = processor.tokenizer.convert_tokens_to_ids("<image>")
    model.save_pretrained(tmp_path / "blip")
    processor.save_pretrained(tmp_path / "blip")
    assert main(["eval", str(tmp_path / "blip"), "--data", str(data), "--json", "--max-new-tokens", "2"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["num"] == 6 and 0.0 <= report["accuracy"] <= 1.0

    model.config.image_token_index = model.config.image_token_index + 1  # a token the processor never writes
    model.save_pretrained(tmp_path / "blind")
    processor.save_pretrained(tmp_path / "blind")
    assert main(["eval", str(tmp_path / "blind"), "--data", str(data), "--max-new-tokens", "2"]) == 2
    assert "hold no image token" in capsys.readouterr().err
