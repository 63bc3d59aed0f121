"""VQAv2 answer normalisation and scoring on hand-written cases; JSONL loading; greedy generation for every
family (LLaVA, BLIP-2 / InstructBLIP with OPT, Llama or T5) against a hand-written decode loop; `vlmsparse eval`."""

from __future__ import annotations

import json

import pytest
import torch

from vlmsparse.eval.vqa import (
    VQARow,
    default_prompt,
    exact_match,
    generate_answers,
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
    assert main(["eval", str(tmp_path / "blip"), "--data", str(data), "--json", "--max-new-tokens", "2",
                 "-o", str(tmp_path / "report.json")]) == 0
    capsys.readouterr()
    report = json.loads((tmp_path / "report.json").read_text())
    # the score is that of the written predictions against the file's answers, one per question of the file
    rows = [json.loads(line) for line in open(data, encoding="utf-8")]
    assert report["num"] == len(rows) == len(report["predictions"]) == 6
    assert [p["answers"] for p in report["predictions"]] == [r["answers"] for r in rows]
    assert report["accuracy"] == pytest.approx(
        sum(vqa_accuracy(p["prediction"], p["answers"]) for p in report["predictions"]) / 6)

    model.config.image_token_index = model.config.image_token_index + 1  # a token the processor never writes
    model.save_pretrained(tmp_path / "blind")
    processor.save_pretrained(tmp_path / "blind")
    assert main(["eval", str(tmp_path / "blind"), "--data", str(data), "--max-new-tokens", "2"]) == 2
    assert "hold no image token" in capsys.readouterr().err


# ------------------------------------------------------------------ generation: every family, greedy reference
def _model_and_processor(kind: str):
    """A tiny model of ``kind`` whose vocabulary is the synthetic tokenizer's (so every generated id decodes to a
    word) and whose image token is the processor's ``<image>``; weights re-drawn larger so that the answers
    depend on the image and the question (a default tiny model repeats one token whatever it sees)."""
    import factories as f

    build = {"llava": f.tiny_llava, "blip2": f.tiny_blip2, "instructblip": f.tiny_instructblip,
             "blip2_t5": f.tiny_blip2_t5, "instructblip_t5": f.tiny_instructblip_t5}[kind]
    if kind.startswith("instructblip"):
        processor = f.synthetic_instructblip_processor()
    else:
        processor = f.synthetic_processor("llava" if kind == "llava" else "blip2")
    model = build(seed=3)
    model.resize_token_embeddings(len(processor.tokenizer))
    model.config.image_token_index = processor.tokenizer.convert_tokens_to_ids("<image>")
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g) * (1.5 / p.shape[1] ** 0.5))
    return model.eval(), processor


@torch.no_grad()
def _greedy_reference(model, processor, row: VQARow, template: str, max_new_tokens: int) -> str:
    """One row alone (no padding): the argmax of ``model(...)`` logits, token by token, until EOS. Decoder-only:
    the prompt grows; encoder-decoder: the encoder reads the prompt, the decoder grows from its start token."""
    from PIL import Image

    with Image.open(row.image) as img:
        inputs = dict(processor(images=[img.convert("RGB")], text=[template.format(question=row.question)],
                                return_tensors="pt"))
    text_config = model.config.get_text_config()
    new: list[int] = []
    for _ in range(max_new_tokens):
        if text_config.is_encoder_decoder:
            decoder = torch.tensor([[text_config.decoder_start_token_id, *new]])
            logits = model(**inputs, decoder_input_ids=decoder).logits
        else:
            ids = torch.cat([inputs["input_ids"], torch.tensor([new], dtype=torch.long)], dim=1)
            logits = model(**{**inputs, "input_ids": ids, "attention_mask": torch.ones_like(ids)}).logits
        token = int(logits[0, -1].argmax())
        if token == text_config.eos_token_id:
            break
        new.append(token)
    return processor.tokenizer.decode(new, skip_special_tokens=True).strip()


@pytest.fixture(scope="module")
def vqa_rows(tmp_path_factory):
    from vlmsparse.data.synthetic import export_vqa_jsonl, make_vqa_samples

    out = tmp_path_factory.mktemp("vqa")
    return load_vqa_jsonl(export_vqa_jsonl(make_vqa_samples(6, seed=1, split="heldout"), str(out)))


@pytest.mark.parametrize("choice", ["onednn", "torch"])
def test_generate_answers_run_on_the_cpu_gemm_choice(choice, vqa_rows, monkeypatch):
    """The float32 CPU linears of generation go through cpu_gemm.linear on oneDNN (none on torch), and the
    forwards are restored afterwards."""
    from torch import nn

    from vlmsparse.kernels import cpu_gemm

    if choice == "onednn" and not cpu_gemm.onednn_available():
        pytest.skip("this torch has no working oneDNN linear op")
    model, processor = _model_and_processor("llava")
    monkeypatch.setenv(cpu_gemm.ENV, choice)
    calls = []
    real = cpu_gemm.linear
    monkeypatch.setattr(cpu_gemm, "linear", lambda *a: calls.append(1) or real(*a))
    answers = generate_answers(model, processor, vqa_rows, batch_size=4, max_new_tokens=2)
    assert (len(calls) > 0) == (choice == "onednn") and len(answers) == len(vqa_rows)
    assert all("forward" not in m.__dict__ for m in model.modules() if isinstance(m, nn.Linear))


@pytest.mark.parametrize("kind", ["llava", "blip2", "instructblip", "blip2_t5", "instructblip_t5"])
def test_generate_answers_equal_a_greedy_loop_over_logits(kind, vqa_rows):
    """Batched (padded) generate_answers == a per-row greedy decode over the model's logits, for decoder-only and
    encoder-decoder language models: the answer is cut at the right place (decoder-only generate returns the
    prompt first, encoder-decoder only the decoder's tokens) and padding does not change any answer."""
    model, processor = _model_and_processor(kind)
    template = default_prompt(processor)
    side = processor.tokenizer.padding_side
    answers = generate_answers(model, processor, vqa_rows, batch_size=4, max_new_tokens=4)
    expected = [_greedy_reference(model, processor, row, template, 4) for row in vqa_rows]
    assert answers == expected
    # real, input-dependent answers (an EOS-first empty one is allowed): the comparison means something
    assert sum(map(bool, answers)) >= len(answers) - 1 and len(set(answers)) > 1
    assert processor.tokenizer.padding_side == side and not model.training


def test_instructblip_answers_depend_on_the_qformer_instruction(vqa_rows):
    """InstructBLIP's Q-Former reads the question (qformer_input_ids): a different question changes the
    image tokens the language model sees, so the answers to the same text prompt change."""
    model, processor = _model_and_processor("instructblip")
    template = "Question: {question} Short answer:"
    base = generate_answers(model, processor, vqa_rows, batch_size=6, max_new_tokens=4, prompt=template)

    class OtherInstruction:  # the same processor, but the Q-Former reads "a a a ..." instead of the question
        tokenizer = processor.tokenizer

        def __call__(self, *args, **kwargs):
            out = processor(*args, **kwargs)
            out["qformer_input_ids"] = torch.where(out["qformer_attention_mask"].bool(), 9, 0)
            return out

    changed = generate_answers(model, OtherInstruction(), vqa_rows, batch_size=6, max_new_tokens=4, prompt=template)
    assert changed != base


def test_left_padded_qformer_instruction_is_right_padded():
    from vlmsparse.eval.vqa.generation import _right_pad

    ids = torch.tensor([[0, 0, 5, 6], [7, 8, 9, 10], [0, 11, 0, 12]])
    mask = (ids != 0).long()
    new_ids, new_mask = _right_pad(ids, mask)
    assert new_ids.tolist() == [[5, 6, 0, 0], [7, 8, 9, 10], [11, 12, 0, 0]]
    assert new_mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 0, 0]]


@pytest.mark.parametrize("kind", ["llava", "instructblip", "blip2_t5", "instructblip_t5"])
def test_generate_answers_refuses_prompts_without_image_tokens(kind, vqa_rows):
    model, processor = _model_and_processor(kind)
    model.config.image_token_index = model.config.image_token_index + 1  # a token the processor never writes
    with pytest.raises(ValueError, match="hold no image token"):
        generate_answers(model, processor, vqa_rows[:2], max_new_tokens=2)


def test_eval_t5_folders_end_to_end(tmp_path, capsys):
    """`vlmsparse eval` on saved BLIP-2-T5 and InstructBLIP-T5 folders: the same answers as in memory."""
    from vlmsparse.cli import main
    from vlmsparse.data.synthetic import export_vqa_jsonl, make_vqa_samples

    data = export_vqa_jsonl(make_vqa_samples(6, seed=1, split="heldout"), str(tmp_path / "vqa"))
    rows = load_vqa_jsonl(data)
    for kind in ("blip2_t5", "instructblip_t5"):
        model, processor = _model_and_processor(kind)
        expected = generate_answers(model, processor, rows, max_new_tokens=3)
        model.save_pretrained(tmp_path / kind)
        processor.save_pretrained(tmp_path / kind)
        out = tmp_path / f"{kind}.json"
        assert main(["eval", str(tmp_path / kind), "--data", str(data), "--json", "--max-new-tokens", "3",
                     "--batch-size", "4", "-o", str(out)]) == 0
        capsys.readouterr()
        report = json.loads(out.read_text())
        assert report["num"] == 6
        assert [p["prediction"] for p in report["predictions"]] == expected
        assert sum(map(bool, expected)) >= len(expected) - 1


def test_score_predictions_warns_once_about_rows_with_few_answers(caplog):
    rows = [VQARow("a.png", "q?", ("red",)), VQARow("b.png", "q?", ("red", "red")), VQARow("c.png", "q?", ("x",)),
            VQARow("d.png", "q?", ("red",) * 3)]
    with caplog.at_level("WARNING", logger="vlmsparse.eval.vqa"):
        report = score_predictions(rows, ["red", "red", "red", "red"])
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warnings == ["3 of 4 rows have fewer than 3 answers (2 with 1 answer, 1 with 2 answers): VQA accuracy "
                        "caps at n/3 for a row with n answers"]
    assert [p["accuracy"] for p in report.predictions] == pytest.approx([1 / 3, 2 / 3, 0.0, 1.0])
    assert [p["image"] for p in report.predictions] == ["a.png", "b.png", "c.png", "d.png"]
    caplog.clear()
    with caplog.at_level("WARNING", logger="vlmsparse.eval.vqa"):
        score_predictions(rows[3:], ["red"])
    assert not caplog.records


def test_eval_cli_errors_and_report_file(tmp_path, capsys, caplog):
    """`vlmsparse eval`: --limit < 1, a folder or an existing file as -o (without --overwrite), a folder without
    weights are refused with exit 2; -o holds each prediction's image; --max-length above OPT's 128 positions is
    capped (logged, recorded in the report) instead of an IndexError."""
    from factories import synthetic_processor, tiny_blip2

    from vlmsparse.cli import main
    from vlmsparse.data.synthetic import export_vqa_jsonl, make_vqa_samples

    data = export_vqa_jsonl(make_vqa_samples(3, seed=1, split="heldout"), str(tmp_path / "vqa"))
    model, processor = tiny_blip2(), synthetic_processor("blip2")
    model.config.image_token_index = processor.tokenizer.convert_tokens_to_ids("<image>")
    model.save_pretrained(tmp_path / "blip")
    processor.save_pretrained(tmp_path / "blip")
    base = ["eval", str(tmp_path / "blip"), "--data", str(data), "--max-new-tokens", "2"]
    for limit in ("0", "-1"):
        assert main([*base, "--limit", limit]) == 2
        assert f"limit must be >= 1 (rows to read), got {limit}" in capsys.readouterr().err
    assert main([*base, "-o", str(tmp_path)]) == 2
    assert "is a folder; give the path of the JSON file" in capsys.readouterr().err
    assert main([*base, "-o", str(data), "--overwrite"]) == 2
    assert f"-o {data}: is the file {data} given as another argument" in capsys.readouterr().err
    out = tmp_path / "report.json"
    assert main([*base, "-o", str(out), "--limit", "2"]) == 0
    predictions = json.loads(out.read_text())["predictions"]
    assert [p["image"] for p in predictions] == [r.image for r in load_vqa_jsonl(data, limit=2)]
    assert main([*base, "-o", str(out)]) == 2
    assert "the file already exists; pass --overwrite" in capsys.readouterr().err
    assert len(json.loads(out.read_text())["predictions"]) == 2
    assert main([*base, "-o", str(out), "--overwrite"]) == 0
    assert len(json.loads(out.read_text())["predictions"]) == 3
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]

    (tmp_path / "text.txt").write_text("a red circle at the top left and a blue square . " * 20)
    capsys.readouterr()
    with caplog.at_level("WARNING", logger="vlmsparse.eval.perplexity"):
        assert main(["eval", str(tmp_path / "blip"), "--text", str(tmp_path / "text.txt"), "--max-length", "512",
                     "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["max_length"] == 128 and report["stride"] == 128 and report["num_tokens"] > 128
    assert "max_length 512 is above the language model's 128 positions; using 128" in caplog.text

    (tmp_path / "noweights").mkdir()
    (tmp_path / "noweights" / "config.json").write_text((tmp_path / "blip" / "config.json").read_text())
    for args in (["--data", str(data)], ["--text", str(tmp_path / "text.txt")]):
        assert main(["eval", str(tmp_path / "noweights"), *args]) == 2
        assert "holds config.json but no model weights" in capsys.readouterr().err
