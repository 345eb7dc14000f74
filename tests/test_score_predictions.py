"""qvl-train score --predictions: files made elsewhere (the official OK-VQA / COCO result formats) or by qvl
(its predictions JSONL), scored side by side without loading a model, into the same table and scores.json
as a generating run."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from one_line_error import fails_in_one_line
from test_score import COCO, OKVQA, coco_dir, okvqa_dir

from qvl_train.__main__ import main
from qvl_train.infer import metrics
from qvl_train.infer.metrics import CaptionScorer, instruct_scores

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def no_model(monkeypatch):
    """Any attempt to load a model fails the test."""

    def refuse(*_args, **_kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr("qvl_train.infer.score.load_model_for", refuse)


def _write(path: Path, entries: list, jsonl: bool = False) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    if jsonl:
        path.write_text("".join(json.dumps(e) + "\n" for e in entries))
    else:
        path.write_text(json.dumps(entries))
    return str(path)


def _report(out: Path) -> dict:
    return json.loads((out / "scores.json").read_text())


def test_official_okvqa_results_side_by_side_without_a_model_or_images(tmp_path, no_model, capsys):
    data = okvqa_dir(tmp_path / "okvqa")
    shutil.rmtree(data / "val2014")  # scoring answers reads no image
    good = _write(
        tmp_path / "vllm-run.json",
        [{"question_id": 90, "answer": "Umbrella."}, {"question_id": 420, "answer": "two"},
         {"question_id": 12340, "answer": "baseball"}],
    )  # fmt: skip
    # the same kind of answers in qvl's own format (what predict and score write), another order
    other = _write(
        tmp_path / "other" / "predictions.jsonl",
        [{"id": "okvqa:12340", "source": "okvqa", "index": 2, "prompt": "", "reference": [], "prediction": "Tennis!"},
         {"id": "okvqa:90", "source": "okvqa", "index": 0, "prompt": "", "reference": [], "prediction": "parasol"},
         {"id": "okvqa:420", "source": "okvqa", "index": 1, "prompt": "", "reference": [], "prediction": "2 dogs"}],
        jsonl=True,
    )  # fmt: skip
    out = tmp_path / "out"
    main(["score", "--task", "okvqa", "--data", str(data), "--predictions", good, "--predictions", other,
          "--output-dir", str(out)])  # fmt: skip
    report = _report(out)
    assert [m["name"] for m in report["models"]] == ["vllm-run", "predictions"]
    assert [m["predictions"] for m in report["models"]] == [good, other]
    accuracy = [m["scores"]["vqa_accuracy"] for m in report["models"]]
    assert accuracy == pytest.approx([100 * (1.0 + 0.9 + 0.0) / 3, 100 * (0.6 + 0.0 + 1.0) / 3])
    assert report["models"][0]["scores"]["per_question_type"] == pytest.approx({"eight": 100.0, "one": 45.0})
    assert report["rows"] == 3 and report["generation"] is None and report["models"][0]["model"] is None
    printed = capsys.readouterr().out
    assert "vllm-run" in printed and "63.33" in printed and "53.33 (-10.00)" in printed
    flat = " ".join(printed.split())  # rich wraps the line at the console's width
    assert f"scores.json in {out}" in flat and "predictions and" not in flat
    assert sorted(os.listdir(out)) == ["scores.json"]  # no predictions file written: none was generated


def test_score_of_its_own_predictions_file_equals_the_generating_run(tmp_path, capsys):
    data, out = okvqa_dir(tmp_path / "okvqa"), tmp_path / "out"
    main(["score", "--task", "okvqa", "--data", str(data), "--max-new-tokens", "3", "--quiet",
          "--output-dir", str(out)])  # fmt: skip
    generated = _report(out)
    again = tmp_path / "again"
    predictions = str(out / "predictions-base.jsonl")
    main(
        [
            "score",
            "--task",
            "okvqa",
            "--data",
            str(data),
            "--predictions",
            predictions,
            "--output-dir",
            str(again),
        ]
    )
    read = _report(again)
    assert read["models"][0]["scores"] == generated["models"][0]["scores"]
    same = ("task", "metrics", "scale", "data", "files", "rows", "notes", "caption_tokenizer")
    assert {k: read[k] for k in same} == {k: generated[k] for k in same}
    assert list(read) == list(generated)  # the same keys, in the same order


def test_official_coco_results(tmp_path, no_model, monkeypatch, capsys):
    monkeypatch.setattr(metrics, "java_available", lambda: False)  # the same numbers as the scorer's own
    data = coco_dir(tmp_path / "coco")
    captions = {1: "A man rides a horse on the beach.", 2: "Two cats on a sofa.", 3: "Rice and broccoli."}
    path = _write(
        tmp_path / "captions_val2014_results.json",
        [{"image_id": i, "caption": c} for i, c in captions.items()],
    )
    out = tmp_path / "out"
    main(["score", "--task", "coco", "--data", str(data), "--predictions", path, "--output-dir", str(out)])
    report = _report(out)
    expected = CaptionScorer(use_java=False).score(
        {f"coco:{i}": c for i, c in captions.items()}, {f"coco:{i}": refs for i, refs in COCO.items()}
    )
    assert report["models"][0]["scores"] == pytest.approx(expected)
    assert report["models"][0]["name"] == "captions_val2014_results" and report["rows"] == 3
    assert "METEOR skipped" in " ".join(report["notes"])


def test_instruct_predictions_jsonl_with_its_references(tmp_path, no_model, capsys):
    lines = [
        {"id": "a:0", "source": "a", "index": 0, "prompt": "p", "reference": "Red.", "prediction": "Red."},
        {
            "id": "a:1",
            "source": "a",
            "index": 1,
            "prompt": "p",
            "reference": "你好世界",
            "prediction": "你好",
        },
    ]
    path = _write(tmp_path / "mine.jsonl", lines, jsonl=True)
    out = tmp_path / "out"
    main(["score", "--predictions", path, "--output-dir", str(out)])
    report = _report(out)
    assert report["models"][0]["scores"] == instruct_scores(["Red.", "你好"], ["Red.", "你好世界"])
    assert report["models"][0]["rows"] == 2 and report["task"] == "instruct"
    assert "exact_match" in capsys.readouterr().out


def test_predictions_that_do_not_fit_the_benchmark_stop_in_one_line(tmp_path, no_model, capsys):
    data = okvqa_dir(tmp_path / "okvqa")
    argv = [
        "score",
        "--task",
        "okvqa",
        "--data",
        str(data),
        "--output-dir",
        str(tmp_path / "out"),
        "--predictions",
    ]
    answers = [{"question_id": q, "answer": "x"} for q, *_ in OKVQA]
    cases = [
        (answers[:2], "no prediction for 1 of 3 questions, e.g. okvqa:12340"),
        ([*answers, answers[0]], "entry 3 answers okvqa:90 a second time"),
        ([*answers, {"question_id": 7, "answer": "x"}], "1 predictions for entries not in"),
        ([{"qid": 90, "text": "x"}], "entry 0 has neither 'question_id' and 'answer'"),
        ([{"question_id": 90, "answer": 3}], "entry 0 field 'answer' is int, not a string"),
        ([], "no predictions in the file"),
    ]
    for k, (entries, message) in enumerate(cases):
        path = _write(tmp_path / f"p{k}.json", entries)
        assert f"{path}: {message}" in fails_in_one_line(capsys, [*argv, path])
    # --max-rows scores the first questions: answers to the others are ignored
    main([*argv[:-1], "--max-rows", "2", "--predictions", _write(tmp_path / "all.json", answers)])
    assert _report(tmp_path / "out")["rows"] == 2

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "okvqa:90", "prediction": "x"}\n{oops\n')
    assert f"{bad}:2:2: invalid JSON" in fails_in_one_line(capsys, [*argv, str(bad)])
    fifo = tmp_path / "fifo.json"
    os.mkfifo(fifo)
    assert f"{fifo}: the predictions file is a FIFO, not a regular file" in fails_in_one_line(
        capsys, [*argv, str(fifo)]
    )
    assert "does not exist" in fails_in_one_line(capsys, [*argv, str(tmp_path / "nope.json")])


def test_predictions_option_conflicts(tmp_path, capsys):
    path = _write(tmp_path / "p.jsonl", [{"id": "a:0", "reference": "x", "prediction": "x"}], jsonl=True)
    adapter = tmp_path / "lora"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    err = fails_in_one_line(capsys, ["score", "--predictions", path, "--adapter", str(adapter)])
    assert "--predictions scores files without loading a model: leave out --adapter" in err
    assert "leave out --data" in fails_in_one_line(
        capsys, ["score", "--predictions", path, "--data", str(tmp_path)]
    )
    official = _write(tmp_path / "o.json", [{"question_id": 90, "answer": "x"}])
    err = fails_in_one_line(capsys, ["score", "--predictions", official, "--output-dir", str(tmp_path / "o")])
    assert "entry 0 is not a line of a qvl predictions file" in err
    # a predictions file where scores.json would go is never replaced, even with --overwrite
    scores = tmp_path / "x" / "scores.json"
    _write(scores, [{"id": "a:0", "reference": "x", "prediction": "x"}], jsonl=True)
    err = fails_in_one_line(
        capsys, ["score", "--predictions", str(scores), "--output-dir", str(scores.parent), "--overwrite"]
    )
    assert f"{scores}: the scores file is {scores}, which this command reads" in err
