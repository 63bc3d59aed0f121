"""The official VQAv2 / OK-VQA / GQA files as users download them: format detection, answers, images, question-id
checks, the official vqaEval accuracy on hand-computed cases, `vlmsparse eval` on them with a tiny model, and the
official results files (`--results`) for splits without answers (VQAv2 test-dev / test, GQA test / challenge)."""

from __future__ import annotations

import json
import os

import pytest
from PIL import Image

from vlmsparse.eval.vqa import (
    VQARow,
    generate_answers,
    load_vqa_rows,
    normalize_answer,
    score_predictions,
    vqa_accuracy,
    write_results,
)

COLORS = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30)]
IMAGE_IDS = [262148, 393225, 9, 581929]


# --------------------------------------------------------------------------------------- official scoring
@pytest.mark.parametrize(
    "raw, expected",
    [
        (".5", ".5"),  # vqaEval keeps a period followed by a digit (its look-behind is a look-ahead)
        ("5.", "5"),
        ("u.s.", "us"),
        ("x-y (-z", "x y z"),  # '-' touches no space in the ORIGINAL answer: becomes a space everywhere
        ("1,000 (approx)", "1000 approx"),  # a "1,000" number: every mark is deleted
        ("id", "id"),  # not in vqaEval's table (its "Id've" / "Im" keys are never reached after lower-casing)
        ("Im", "im"),
        ("oclock", "o'clock"),
        ("Whatre", "what're"),
        ("Two\tdogs\n", "2 dogs"),
    ],
)
def test_normalize_answer_follows_vqaeval(raw, expected):
    assert normalize_answer(raw) == expected


def test_official_accuracy_hand_computed():
    """vqaEval: for each of the 10 answers left out, min(1, matches among the other 9 / 3); the mean of the 10."""
    answers = ["Two", "2.", "3", "three", "3", "4", "four", "many", "several", "lots"]
    # "two" -> "2" matches 2 answers: leaving one of those out -> 1/3 (twice), any other -> 2/3 (8 times)
    assert vqa_accuracy("two", answers, leave_one_out=True) == pytest.approx((2 * 1 / 3 + 8 * 2 / 3) / 10)
    assert vqa_accuracy("two", answers) == pytest.approx(2 / 3)
    # "three" -> "3" matches 3: leaving one of them out -> 2/3 (3 times), another -> 1 (7 times)
    assert vqa_accuracy("Three.", answers, leave_one_out=True) == pytest.approx((3 * 2 / 3 + 7) / 10)
    # all ten humans gave the same string: vqaEval leaves the answers as written (stripped); the prediction is
    # normalised as a submission is
    assert vqa_accuracy("Yes.", ["yes"] * 10, leave_one_out=True) == 1.0
    assert vqa_accuracy("yes", ["Yes"] * 10, leave_one_out=True) == 0.0
    assert vqa_accuracy(" yes\n", ["yes"] * 10, leave_one_out=True) == 1.0
    assert vqa_accuracy("Yes", ["yes"] * 10) == 1.0  # the project's plain form normalises always
    assert vqa_accuracy("Yes", ["yes"] * 9 + ["Yes"], leave_one_out=True) == 1.0  # two strings: normalised


# ------------------------------------------------------------------------------------------- the files
def _image(path, color) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (32, 32), color).save(path, format="JPEG")


def _vqav2_files(tmp_path, questions: list[str], answers: list[list[str]], types: list[str],
                 subtype: str | None = "val2014", image_dir: str = "val2014", image_split: str = "val2014"):
    """A questions JSON, an annotations JSON and COCO images ``<image_dir>/COCO_<image_split>_<12-digit id>.jpg``."""
    qs, anns = [], []
    for i, (question, human, kind) in enumerate(zip(questions, answers, types)):
        image_id = IMAGE_IDS[i]
        _image(tmp_path / image_dir / f"COCO_{image_split}_{image_id:012d}.jpg", COLORS[i])
        qs.append({"image_id": image_id, "question": question, "question_id": image_id * 1000 + i})
        anns.append({"question_id": image_id * 1000 + i, "image_id": image_id, "answer_type": kind,
                     "question_type": "what is", "multiple_choice_answer": human[0],
                     "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": j + 1}
                                 for j, a in enumerate(human)]})
    header = {"info": {}, "task_type": "Open-Ended", "data_type": "mscoco", "license": {}}
    if subtype is not None:
        header["data_subtype"] = subtype
    q_path, a_path = tmp_path / "questions.json", tmp_path / "annotations.json"
    q_path.write_text(json.dumps({**header, "questions": qs}))
    a_path.write_text(json.dumps({**header, "annotations": anns}))
    return q_path, a_path


def _gqa_file(tmp_path, questions: list[str], answers: list[str] | None, structural: list[str],
              name: str = "testdev_balanced_questions.json"):
    """GQA questions; ``answers=None``: as the test / challenge files, no "answer", "fullAnswer" or "types"."""
    entries = {}
    for i, (question, kind) in enumerate(zip(questions, structural)):
        _image(tmp_path / "images" / f"n{IMAGE_IDS[i]}.jpg", COLORS[i])
        entries[f"0{20000 + i}"] = {"imageId": f"n{IMAGE_IDS[i]}", "question": question, "isBalanced": True}
        if answers is not None:
            entries[f"0{20000 + i}"].update({"answer": answers[i], "fullAnswer": f"It is {answers[i]}.", "types": {
                "structural": kind, "semantic": "attr", "detailed": "color"}})
    path = tmp_path / name
    path.write_text(json.dumps(entries))
    return path


def test_vqav2_rows_and_official_scores(tmp_path):
    answers = [["red"] * 2 + ["blue"] * 8, ["Yes"] * 10, ["2", "two", "3"] + ["4"] * 7]
    q_path, a_path = _vqav2_files(tmp_path, ["what color?", "is it?", "how many?"], answers,
                                  ["other", "yes/no", "number"])
    rows = load_vqa_rows(q_path, annotations=a_path)
    assert [r.question_id for r in rows] == [262148000, 393225001, 9002]
    assert rows[0].image == str(tmp_path / "val2014" / "COCO_val2014_000000262148.jpg")
    assert rows[2].answers == ("2", "two", "3", *["4"] * 7)
    assert {r.metric for r in rows} == {"vqa_official"} and [r.kind for r in rows] == ["other", "yes/no", "number"]
    assert len(load_vqa_rows(q_path, annotations=a_path, limit=2)) == 2

    report = score_predictions(rows, ["Red", "yes", "two"])  # official even without leave_one_out
    red = (2 * 1 / 3 + 8 * 2 / 3) / 10
    # "yes" against ten "Yes": not normalised -> 0; "two" -> "2" matches 2 of 10 -> as "red"
    assert [p["accuracy"] for p in report.predictions] == pytest.approx([red, 0.0, red])
    assert report.accuracy == pytest.approx(2 * red / 3) and report.metric == "vqa_official"
    assert report.per_kind == {"number": pytest.approx(red), "other": pytest.approx(red), "yes/no": 0.0}
    assert report.predictions[0]["question_id"] == 262148000


def test_vqav2_images_without_data_subtype_and_in_the_root(tmp_path):
    """OK-VQA-like: no "data_subtype" -> any *_<12-digit id>.jpg in the image root; images directly in the root."""
    q_path, a_path = _vqav2_files(tmp_path, ["what sport?", "what animal?"], [["tennis"] * 10, ["dog"] * 10],
                                  ["other", "other"], subtype=None, image_dir="imgs")
    rows = load_vqa_rows(q_path, a_path, image_root=tmp_path / "imgs")
    assert [r.image for r in rows] == [str(tmp_path / "imgs" / f"COCO_val2014_{i:012d}.jpg") for i in IMAGE_IDS[:2]]
    with pytest.raises(FileNotFoundError, match=r"no image file \*_000000262148.jpg in .*point image_root "
                       r"\(--image-root\) at their folder"):
        load_vqa_rows(q_path, a_path)  # default root: the file's folder, which holds no images


def test_gqa_rows_exact_match_per_structural_type(tmp_path):
    path = _gqa_file(tmp_path, ["is it red?", "what color?", "is it blue?"], ["yes", "blue", "no"],
                     ["verify", "query", "verify"])
    rows = load_vqa_rows(path)
    assert [r.question_id for r in rows] == ["020000", "020001", "020002"]
    assert rows[1].image == str(tmp_path / "images" / "n393225.jpg") and rows[1].answers == ("blue",)
    assert {r.metric for r in rows} == {"exact"}
    report = score_predictions(rows, ["Yes.", "the blue", "yes"], leave_one_out=True)
    assert [p["accuracy"] for p in report.predictions] == [1.0, 1.0, 0.0]
    assert report.per_kind == {"query": 1.0, "verify": 0.5} and report.metric == "exact"
    assert report.accuracy == pytest.approx(2 / 3)


def test_bad_files_give_clear_errors(tmp_path):
    q_path, a_path = _vqav2_files(tmp_path, ["q1?", "q2?", "q3?"], [["a"] * 10] * 3, ["other"] * 3)
    with pytest.raises(ValueError, match=r"holds no answers; give the annotations JSON .* as annotations "
                       r"\(--annotations; .* or write the predictions in the official results format without "
                       r"scoring \(write_folder_results, --results FILE\)"):
        load_vqa_rows(q_path)
    with pytest.raises(ValueError, match=r"is a VQAv2 / OK-VQA annotations file; give the questions file as data "
                       r"\(--data\) and this one as annotations \(--annotations\)"):
        load_vqa_rows(a_path)
    anns = json.loads(a_path.read_text())
    anns["annotations"] = anns["annotations"][1:]
    (tmp_path / "other.json").write_text(json.dumps(anns))
    with pytest.raises(ValueError, match=r"1 of 3 question ids .* have no annotation .*\(first: \[262148000\]\)"):
        load_vqa_rows(q_path, tmp_path / "other.json")
    anns = json.loads(a_path.read_text())
    anns["annotations"][0]["image_id"] = 5
    (tmp_path / "other.json").write_text(json.dumps(anns))
    with pytest.raises(ValueError, match="image_id 262148 in the questions file but 5 in"):
        load_vqa_rows(q_path, tmp_path / "other.json")
    (tmp_path / "val2014" / "COCO_val2014_000000393225.jpg").unlink()
    with pytest.raises(FileNotFoundError, match=r"image COCO_val2014_000000393225.jpg is neither in .*point "
                       r"image_root \(--image-root\) at their folder"):
        load_vqa_rows(q_path, a_path)

    gqa = _gqa_file(tmp_path, ["q?"], ["a"], ["query"])
    with pytest.raises(ValueError, match=r"annotations \(--annotations\) is only for a VQAv2 / OK-VQA questions file"):
        load_vqa_rows(gqa, a_path)
    entries = json.loads(gqa.read_text())
    del entries["020000"]["answer"]
    gqa.write_text(json.dumps(entries))
    with pytest.raises(ValueError, match=r"no 'answer' \(GQA test / challenge questions are unanswered\).* or "
                       r"write the predictions for a submission without scoring \(write_folder_results, "
                       r"--results FILE\)"):
        load_vqa_rows(gqa)
    for name, text in [("unknown.json", '{"foo": 1}'), ("list.json", "[1, 2]"), ("text.txt", "not json\n")]:
        (tmp_path / name).write_text(text)
        with pytest.raises(ValueError, match="the formats read are: our JSONL .* a VQAv2 / OK-VQA questions JSON "
                           ".* a GQA questions JSON"):
            load_vqa_rows(tmp_path / name)


# --------------------------------------------------------------------------------------- through the CLI
@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    """A saved tiny BLIP-2 (OPT) that answers with real words, and its greedy answers to 3 questions on the
    4 images: ``(folder, questions, answers)``."""
    from test_eval_vqa import _model_and_processor

    out = tmp_path_factory.mktemp("blip2")
    model, processor = _model_and_processor("blip2")
    model.save_pretrained(out / "model")
    processor.save_pretrained(out / "model")
    questions = ["what color is the shape?", "how many shapes?", "where is the circle?"]
    for i in range(3):
        _image(out / f"{i}.jpg", COLORS[i])
    rows = [VQARow(str(out / f"{i}.jpg"), q, ("x",)) for i, q in enumerate(questions)]
    answers = generate_answers(model, processor, rows, max_new_tokens=2)
    assert all(answers), answers  # real answers, so the hand-built human answers below mean something
    return out / "model", questions, answers


def test_eval_cli_on_vqav2_files(tmp_path, model_folder, capsys):
    """Human answers built around the model's answers: 2 of 10 match; 4 match after normalisation; all ten are
    "THE <answer>" (one string: not normalised, so 0 officially)."""
    from vlmsparse.cli import main

    folder, questions, preds = model_folder
    answers = [[preds[0]] * 2 + ["zzz"] * 8, [preds[1].upper() + "."] * 4 + ["zzz"] * 6, ["THE " + preds[2]] * 10]
    q_path, a_path = _vqav2_files(tmp_path, questions, answers, ["other", "yes/no", "other"])
    out = tmp_path / "report.json"
    assert main(["eval", str(folder), "--data", str(q_path), "--annotations", str(a_path), "--image-root",
                 str(tmp_path / "val2014"), "--max-new-tokens", "2", "--batch-size", "2", "-o", str(out)]) == 0
    assert "(vqa_official)" in capsys.readouterr().out
    report = json.loads(out.read_text())
    first = (2 * 1 / 3 + 8 * 2 / 3) / 10
    assert [p["prediction"] for p in report["predictions"]] == preds
    assert [p["accuracy"] for p in report["predictions"]] == pytest.approx([first, 1.0, 0.0])
    assert report["accuracy"] == pytest.approx((first + 1.0) / 3) and report["metric"] == "vqa_official"
    assert report["per_kind"] == {"other": pytest.approx(first / 2), "yes/no": 1.0}
    assert [p["question_id"] for p in report["predictions"]] == [262148000, 393225001, 9002]

    assert main(["eval", str(folder), "--data", str(q_path), "--annotations", str(a_path), "--limit", "1",
                 "--max-new-tokens", "2", "--json"]) == 0
    brief = json.loads(capsys.readouterr().out)
    assert brief["num"] == 1 and brief["accuracy"] == pytest.approx(first)
    assert main(["eval", str(folder), "--data", str(q_path), "--max-new-tokens", "2"]) == 2
    err = capsys.readouterr().err
    assert "holds no answers; give the annotations JSON" in err
    assert "write the predictions in the official results format without scoring (write_folder_results, " \
           "--results FILE)" in err
    assert main(["eval", str(folder), "--data", str(a_path), "--max-new-tokens", "2"]) == 2
    assert "is a VQAv2 / OK-VQA annotations file" in capsys.readouterr().err


def test_eval_cli_on_gqa_file(tmp_path, model_folder, capsys):
    from vlmsparse.cli import main

    folder, questions, preds = model_folder
    path = _gqa_file(tmp_path, questions, [preds[0].upper(), "zzz", preds[2]], ["verify", "verify", "query"])
    assert main(["eval", str(folder), "--data", str(path), "--max-new-tokens", "2", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["accuracy"] == pytest.approx(2 / 3) and report["metric"] == "exact" and report["num"] == 3
    assert report["per_kind"] == {"query": 1.0, "verify": 0.5}
    assert main(["eval", str(folder), "--data", str(path), "--annotations", str(path)]) == 2
    assert "annotations (--annotations) is only for a VQAv2 / OK-VQA questions file" in capsys.readouterr().err


# ------------------------------------------------------------------------------- results files (no answers)
def test_rows_without_answers_are_explicit(tmp_path):
    """A question without answers is a predict_only row: read only with require_answers=False, refused by scoring."""
    with pytest.raises(ValueError, match=r"non-empty list of strings, got \(\) \(a question without answers is a predict_only row"):
        VQARow("a.jpg", "q?", ())
    with pytest.raises(ValueError, match="a predict_only row holds no answers"):
        VQARow("a.jpg", "q?", ("x",), predict_only=True)

    q_path, a_path = _vqav2_files(tmp_path, ["q1?", "q2?"], [["a"] * 10] * 2, ["other"] * 2, subtype="test-dev2015",
                                  image_dir="test2015", image_split="test2015")
    rows = load_vqa_rows(q_path, require_answers=False)  # test-dev questions: the test2015 images
    assert [(r.question_id, r.answers, r.predict_only, r.metric) for r in rows] == [
        (262148000, (), True, "vqa_official"), (393225001, (), True, "vqa_official")]
    assert rows[0].image == str(tmp_path / "test2015" / "COCO_test2015_000000262148.jpg")
    assert len(load_vqa_rows(q_path, require_answers=False, limit=1)) == 1
    answered = load_vqa_rows(q_path, a_path, require_answers=False)  # annotations given: answered rows
    assert [r.predict_only for r in answered] == [False, False] and answered[0].answers == ("a",) * 10
    with pytest.raises(ValueError, match=r"2 of 2 rows have no answers to score against .* can only be written as "
                       r"predictions: write_results / `vlmsparse eval --results FILE`"):
        score_predictions(rows, ["a", "b"])

    gqa = _gqa_file(tmp_path, ["q1?", "q2?"], None, ["query"] * 2, name="test_balanced_questions.json")
    rows = load_vqa_rows(gqa, require_answers=False)
    assert [(r.question_id, r.answers, r.predict_only, r.metric) for r in rows] == [
        ("020000", (), True, "exact"), ("020001", (), True, "exact")]


def test_write_results_formats_normalisation_and_atomicity(tmp_path, monkeypatch):
    q_path, _ = _vqav2_files(tmp_path, ["q1?", "q2?", "q3?"], [["a"] * 10] * 3, ["other"] * 3)
    rows = load_vqa_rows(q_path, require_answers=False)
    out = tmp_path / "out" / "vqav2_results.json"
    assert write_results(rows, ["Two dogs.", "Yes", " the red\n"], out) == out
    assert json.loads(out.read_text()) == [{"question_id": 262148000, "answer": "2 dogs"},
                                           {"question_id": 393225001, "answer": "yes"},
                                           {"question_id": 9002, "answer": "red"}]
    assert list(json.loads(out.read_text())[0]) == ["question_id", "answer"]

    gqa_rows = load_vqa_rows(_gqa_file(tmp_path, ["q1?", "q2?"], None, ["query"] * 2), require_answers=False)
    gqa_out = tmp_path / "gqa_submission.json"
    write_results(gqa_rows, ["No.", "A Cat"], gqa_out)
    assert json.loads(gqa_out.read_text()) == [{"questionId": "020000", "prediction": "no"},
                                               {"questionId": "020001", "prediction": "cat"}]

    before = out.read_text()
    with pytest.raises(FileExistsError, match=r"path \(--results\) .*: the file already exists; pass "
                       r"overwrite=True \(--overwrite\) to replace it"):
        write_results(rows, ["x"] * 3, out)

    def broken_dump(obj, f, **kwargs):  # a write that dies half-way: the old file must survive, no temp left
        f.write("[{")
        raise OSError("disk full")

    monkeypatch.setattr(json, "dump", broken_dump)
    with pytest.raises(OSError, match="disk full"):
        write_results(rows, ["x"] * 3, out, overwrite=True)
    monkeypatch.undo()
    assert out.read_text() == before and os.listdir(out.parent) == ["vqav2_results.json"]
    write_results(rows, ["x", "y", "z"], out, overwrite=True)
    assert [r["answer"] for r in json.loads(out.read_text())] == ["x", "y", "z"]

    with pytest.raises(ValueError, match="got 2 predictions for 3 rows"):
        write_results(rows, ["x"] * 2, tmp_path / "a.json")
    with pytest.raises(ValueError, match=r"1 question ids occur more than once \(first: \[262148000\]\)"):
        write_results([rows[0], rows[0]], ["x"] * 2, tmp_path / "a.json")
    with pytest.raises(ValueError, match=r"got rows with metric \['vqa'\]; our JSONL has no official question ids"):
        write_results([VQARow("a.jpg", "q?", ("x",))], ["x"], tmp_path / "a.json")
    with pytest.raises(ValueError, match="is a folder"):
        write_results(rows, ["x"] * 3, tmp_path / "out")
    assert not (tmp_path / "a.json").exists()


def test_eval_cli_results_for_vqav2_test_dev(tmp_path, model_folder, capsys):
    """VQAv2 test-dev: questions only (no annotations), images in test2015 -> the EvalAI results file, unscored."""
    from vlmsparse.cli import main

    folder, questions, preds = model_folder
    q_path, _ = _vqav2_files(tmp_path, questions, [["x"] * 10] * 3, ["other"] * 3, subtype="test-dev2015",
                             image_dir="test2015", image_split="test2015")
    results = tmp_path / "vqav2_test-dev_results.json"
    args = ["eval", str(folder), "--data", str(q_path), "--image-root", str(tmp_path), "--max-new-tokens", "2",
            "--results", str(results)]
    assert main(args) == 0
    assert f"wrote 3 predictions to {results} (the data holds no answers: not scored)" in capsys.readouterr().out
    ids = [262148000, 393225001, 9002]
    expected = [{"question_id": qid, "answer": normalize_answer(p)} for qid, p in zip(ids, preds)]
    assert json.loads(results.read_text()) == expected

    before = results.read_text()
    assert main(args) == 2  # refused before the model loads
    assert f"results (--results) {results}: the file already exists; pass overwrite=True (--overwrite) to " \
           "replace it" in capsys.readouterr().err
    assert results.read_text() == before
    assert main(args + ["--overwrite", "--limit", "1", "--json", "-o", str(tmp_path / "run.json")]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["num"] == 1 and summary["scored"] is False and summary["results"] == str(results)
    assert json.loads((tmp_path / "run.json").read_text()) == summary  # -o: the run's summary, no scores
    assert json.loads(results.read_text()) == expected[:1]
    assert sorted(os.listdir(tmp_path)) == ["annotations.json", "questions.json", "run.json", "test2015",
                                            "vqav2_test-dev_results.json"]  # no temporary file left


def test_eval_cli_results_filled_with_every_test_question(tmp_path, model_folder, capsys, monkeypatch):
    """EvalAI's test-dev phase takes the whole test2015 set: --fill-questions adds the unanswered ids, empty."""
    from vlmsparse.cli import main

    folder, questions, preds = model_folder
    q_path, _ = _vqav2_files(tmp_path, questions, [["x"] * 10] * 3, ["other"] * 3, subtype="test-dev2015",
                             image_dir="test2015", image_split="test2015")
    results = tmp_path / "results.json"
    assert main(["eval", str(folder), "--data", str(q_path), "--image-root", str(tmp_path), "--max-new-tokens", "2",
                 "--limit", "2", "--results", str(results), "--fill-questions", str(q_path)]) == 0
    assert json.loads(results.read_text()) == [
        {"question_id": 262148000, "answer": normalize_answer(preds[0])},
        {"question_id": 393225001, "answer": normalize_answer(preds[1])},
        {"question_id": 9002, "answer": ""}]
    rows = load_vqa_rows(q_path, require_answers=False)
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"questions": [{"image_id": 1, "question": "q?", "question_id": 5}]}))
    with pytest.raises(ValueError, match=r"3 answered question ids are not in .*other.json .*test2015 for test-dev"):
        write_results(rows, ["a", "b", "c"], tmp_path / "r.json", fill_from=other)
    gqa_rows = load_vqa_rows(_gqa_file(tmp_path, ["q1?"], None, ["query"]), require_answers=False)
    with pytest.raises(ValueError, match="is for VQAv2 / OK-VQA results, not GQA"):
        write_results(gqa_rows, ["a"], tmp_path / "r.json", fill_from=q_path)
    assert main(["eval", str(folder), "--data", str(q_path), "--fill-questions", str(q_path)]) == 2
    assert "--fill-questions goes with --results" in capsys.readouterr().err
    # a fill file that does not fit is refused before the model loads (not after every answer is generated)
    import vlmsparse.eval.vqa.results as vqa_results

    def no_load(*args, **kwargs):
        raise AssertionError("the model must not be loaded")

    monkeypatch.setattr(vqa_results, "load_vqa_model", no_load)
    assert main(["eval", str(folder), "--data", str(q_path), "--image-root", str(tmp_path), "--results",
                 str(tmp_path / "r.json"), "--fill-questions", str(other)]) == 2
    assert "3 answered question ids are not in" in capsys.readouterr().err
    assert not (tmp_path / "r.json").exists()


def test_eval_cli_results_for_gqa_and_scored_vqav2(tmp_path, model_folder, capsys):
    """GQA test questions (no answers) -> the submission file; VQAv2 with annotations -> results file AND scores."""
    from vlmsparse.cli import main

    folder, questions, preds = model_folder
    gqa = _gqa_file(tmp_path, questions, None, ["query"] * 3, name="test_balanced_questions.json")
    results = tmp_path / "gqa_submission.json"
    assert main(["eval", str(folder), "--data", str(gqa), "--max-new-tokens", "2", "--results", str(results)]) == 0
    assert json.loads(results.read_text()) == [{"questionId": f"0{20000 + i}", "prediction": normalize_answer(p)}
                                               for i, p in enumerate(preds)]
    capsys.readouterr()

    answers = [[preds[0]] * 10, ["zzz"] * 10, [preds[2]] * 10]
    q_path, a_path = _vqav2_files(tmp_path, questions, answers, ["other"] * 3)
    vqa_results = tmp_path / "val_results.json"
    assert main(["eval", str(folder), "--data", str(q_path), "--annotations", str(a_path), "--image-root",
                 str(tmp_path / "val2014"), "--max-new-tokens", "2", "--results", str(vqa_results), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["scored"] is True and report["num"] == 3 and report["metric"] == "vqa_official"
    assert report["accuracy"] == pytest.approx(2 / 3)
    assert json.loads(vqa_results.read_text()) == [{"question_id": qid, "answer": normalize_answer(p)}
                                                   for qid, p in zip([262148000, 393225001, 9002], preds)]


def test_eval_cli_results_errors(tmp_path, model_folder, capsys):
    from vlmsparse.cli import main

    folder, questions, _ = model_folder
    _image(tmp_path / "a.jpg", COLORS[0])
    jsonl = tmp_path / "q.jsonl"
    jsonl.write_text(json.dumps({"image": "a.jpg", "question": "q?", "answers": ["x"]}) + "\n")
    q_path, _ = _vqav2_files(tmp_path, questions, [["x"] * 10] * 3, ["other"] * 3)
    (tmp_path / "folder").mkdir()
    result = str(tmp_path / "r.json")
    cases = [
        (["--data", str(jsonl), "--results", result], "our JSONL has no official question ids"),
        (["--text", str(jsonl), "--results", result], "--results goes with --data"),
        (["--data", str(q_path), "--results", str(q_path)], f"results (--results) {q_path}: is the file {q_path} given as"),
        (["--data", str(q_path), "--results", result, "-o", result], "given as another argument"),
        (["--data", str(q_path), "--results", str(tmp_path / "folder")], "is a folder"),
    ]
    for extra, message in cases:
        assert main(["eval", str(folder), *extra]) == 2, extra
        assert message in capsys.readouterr().err, extra
    assert not (tmp_path / "r.json").exists()
