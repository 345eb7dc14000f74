"""predict, score and export around their outputs and inputs: an output replaces only a file qvl wrote
(never an input, never a user's file without --overwrite), a failed run leaves the previous complete output
as it was, a malformed benchmark file stops in one line naming the file and the field, and a FIFO where a
file is read is refused at once instead of hanging (tiny model, CPU)."""

from __future__ import annotations

import json
import os
import signal
import socket
import warnings
from pathlib import Path

import pytest
from helpers import chat, write_dataset, write_image
from one_line_error import fails_in_one_line

from qvl_data.lock import exclusive_lock
from qvl_train.__main__ import main
from qvl_train.infer import export, score

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FAST = ["--max-new-tokens", "2", "--quiet"]


@pytest.fixture
def no_hang():
    """Fail (instead of blocking the suite) if the test is still running after 60 s, e.g. in open(FIFO)."""

    def timeout(*_):
        raise TimeoutError("blocked: a FIFO was opened")

    previous = signal.signal(signal.SIGALRM, timeout)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


@pytest.fixture
def dataset(tmp_path) -> Path:
    data = tmp_path / "mydata"
    write_image(data / "a.png", (60, 40))
    rows = [
        {"messages": chat("<image>Colour?", "Red."), "images": ["a.png"]},
        {"messages": chat("Hi", "Hello.")},
    ]
    return write_dataset(data, "mine", rows)


def _predict(data: Path, output: Path, *more: str) -> list[str]:
    return ["predict", "--data", str(data), "--dataset", "mine", *FAST, "--output", str(output), *more]


# ------------------------------------------------------------------------------------------ predict


def test_predict_never_overwrites_its_input_dataset_file(dataset, capsys):
    target = dataset / "mine.json"
    before = target.read_bytes()
    for more in ([], ["--overwrite"]):
        err = fails_in_one_line(capsys, _predict(dataset, target, *more))
        assert f"{target}: the predictions file is {target}, which this command reads" in err
        assert target.read_bytes() == before
    info = dataset / "dataset_info.json"
    assert "which this command reads" in fails_in_one_line(capsys, _predict(dataset, info, "--overwrite"))


def test_predict_replaces_its_own_file_and_a_foreign_one_only_with_overwrite(dataset, tmp_path, capsys):
    out = tmp_path / "notes.txt"
    out.write_text("my notes\n")
    err = fails_in_one_line(capsys, _predict(dataset, out))
    assert "exists and is not a predictions file qvl wrote" in err and "--overwrite" in err
    assert out.read_text() == "my notes\n"
    main(_predict(dataset, out, "--overwrite"))
    first = out.read_text().splitlines()
    assert [json.loads(line)["id"] for line in first] == ["mine:0", "mine:1"]
    main(_predict(dataset, out))  # a predictions file qvl wrote: replaced without --overwrite
    assert out.read_text().splitlines() == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mydata", "notes.txt"]  # no temporary file left


def test_a_failed_predict_leaves_the_previous_predictions_file_intact(dataset, tmp_path, monkeypatch):
    out = tmp_path / "predictions.jsonl"
    main(_predict(dataset, out, "--batch-size", "1"))
    before = out.read_bytes()
    calls = []

    def dies_on_the_second_batch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return [[]] * len(args[1])

    monkeypatch.setattr("qvl_train.infer.predictions.generate_batch", dies_on_the_second_batch)
    with pytest.raises(KeyboardInterrupt):
        main(_predict(dataset, out, "--batch-size", "1"))
    assert len(calls) == 2 and out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mydata", "predictions.jsonl"]


def test_predict_refuses_outputs_that_are_not_files(dataset, demo_build, tmp_path, capsys):
    assert "is a folder, not a file qvl can replace" in fails_in_one_line(capsys, _predict(dataset, tmp_path))
    inside = demo_build / "predictions.jsonl"  # inside the shard directory read
    err = fails_in_one_line(capsys, ["predict", "--data", str(demo_build), *FAST, "--output", str(inside)])
    assert f"is inside {demo_build}, which this command reads" in err and not inside.exists()


def test_predict_stops_before_generating_when_the_output_folder_cannot_be_made(dataset, tmp_path, capsys):
    (tmp_path / "a-file").write_text("")
    out = tmp_path / "a-file" / "predictions.jsonl"
    err = fails_in_one_line(capsys, _predict(dataset, out))
    assert f"{tmp_path / 'a-file'}: cannot create the output folder" in err


def test_predict_refuses_a_fifo_as_dataset_file(tmp_path, no_hang, capsys):
    data = write_dataset(tmp_path / "d", "mine", [])
    (data / "mine.json").unlink()
    os.mkfifo(data / "mine.json")
    err = fails_in_one_line(capsys, _predict(data, tmp_path / "p.jsonl"))
    # the dataset reader's own check (qvl_data.sources) stops it before anything is opened
    assert f"{data / 'mine.json'}: the data file is a FIFO, not a regular file" in err


# ------------------------------------------------------------------------------------------ score


def okvqa_files(root: Path, questions: list, annotations: list) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "OpenEnded_mscoco_val2014_questions.json").write_text(json.dumps({"questions": questions}))
    (root / "mscoco_val2014_annotations.json").write_text(json.dumps({"annotations": annotations}))
    return root


QUESTION = {"image_id": 9, "question": "What is it?", "question_id": 90}
ANNOTATION = {"question_id": 90, "image_id": 9, "answers": [{"answer": "cat"}] * 10}


@pytest.mark.parametrize(
    "questions, annotations, message",
    [
        ([], [ANNOTATION], 'OpenEnded_mscoco_val2014_questions.json: "questions" is empty'),
        (
            [{"image_id": 9, "question_id": 90}],
            [ANNOTATION],
            "OpenEnded_mscoco_val2014_questions.json: questions[0] has no field 'question'",
        ),
        (
            [QUESTION],
            [{"question_id": 90}],
            "mscoco_val2014_annotations.json: annotations[0] has no field 'answers'",
        ),
        (
            [QUESTION],
            [{"image_id": 9}],
            "mscoco_val2014_annotations.json: annotations[0] has no field 'question_id'",
        ),
        (
            [QUESTION],
            [{**ANNOTATION, "answers": []}],
            "mscoco_val2014_annotations.json: annotations[0] field 'answers' is empty",
        ),
        (
            [QUESTION],
            [{**ANNOTATION, "answers": [{"raw_answer": "cat"}]}],
            "mscoco_val2014_annotations.json: annotations[0].answers[0] has no field 'answer'",
        ),
        (
            [{**QUESTION, "image_id": "nine"}],
            [ANNOTATION],
            "questions[0] field 'image_id' is not an integer id: 'nine'",
        ),
        ([QUESTION, 7], [ANNOTATION], "questions[1] is not a JSON object"),
    ],
)
def test_score_names_the_file_and_field_of_a_malformed_okvqa_file(
    tmp_path, capsys, questions, annotations, message
):
    data = okvqa_files(tmp_path / "okvqa", questions, annotations)
    assert message in fails_in_one_line(capsys, ["score", "--task", "okvqa", "--data", str(data)])


@pytest.mark.parametrize(
    "content, message",
    [
        ({"images": [], "annotations": []}, '"images" is empty: no image to score'),
        (
            {"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": [{"image_id": 1}]},
            "annotations[0] has no field 'caption'",
        ),
        ({"images": [{"file_name": "a.jpg"}], "annotations": []}, "images[0] has no field 'id'"),
        (
            {"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": [{"image_id": 2, "caption": "x"}]},
            'no image of "images" has a caption',
        ),
        ({"images": [{"split": "test", "cocoid": 1, "sentences": []}]}, "images[0] has no field 'filename'"),
        (
            {"images": [{"split": "test", "cocoid": 1, "filename": "a.jpg", "sentences": [{"tokens": []}]}]},
            "images[0].sentences[0] has no field 'raw'",
        ),
    ],
)
def test_score_names_the_file_and_field_of_a_malformed_captions_file(tmp_path, capsys, content, message):
    path = tmp_path / "captions.json"
    path.write_text(json.dumps(content))
    err = fails_in_one_line(
        capsys, ["score", "--task", "coco", "--data", str(tmp_path), "--captions", str(path)]
    )
    assert f"{path}: {message}" in err


def test_score_refuses_a_fifo_as_annotation_file(tmp_path, no_hang, capsys):
    data = okvqa_files(tmp_path / "okvqa", [QUESTION], [ANNOTATION])
    fifo = tmp_path / "questions.json"
    os.mkfifo(fifo)
    err = fails_in_one_line(
        capsys, ["score", "--task", "okvqa", "--data", str(data), "--questions", str(fifo)]
    )
    assert f"{fifo}: the OK-VQA questions file is a FIFO, not a regular file" in err


def test_score_replaces_only_its_own_files_and_never_its_inputs(dataset, tmp_path, capsys):
    out = tmp_path / "scores"
    argv = ["score", "--data", str(dataset), "--dataset", "mine", *FAST, "--output-dir", str(out)]
    out.mkdir()
    (out / "scores.json").write_text('{"mine": 1}\n')
    err = fails_in_one_line(capsys, argv)
    assert f"{out / 'scores.json'}: exists and is not a scores file qvl wrote" in err
    assert (out / "scores.json").read_text() == '{"mine": 1}\n' and not (
        out / "predictions-base.jsonl"
    ).exists()
    main([*argv, "--overwrite"])
    first = json.loads((out / "scores.json").read_text())
    assert first["task"] == "instruct" and first["models"][0]["rows"] == 2
    main(argv)  # a re-run replaces what qvl wrote
    assert json.loads((out / "scores.json").read_text())["models"] == first["models"]
    assert sorted(p.name for p in out.iterdir()) == ["predictions-base.jsonl", "scores.json"]

    (out / "predictions-base.jsonl").write_text("my own lines\n")
    assert "predictions-base.jsonl: exists and is not a predictions file qvl wrote" in fails_in_one_line(
        capsys, argv
    )
    # an annotation file where the scores would go: never replaced, even with --overwrite
    data = okvqa_files(tmp_path / "okvqa", [QUESTION], [ANNOTATION])
    write_image(data / "val2014" / "COCO_val2014_000000000009.jpg", (32, 32))
    (data / "mscoco_val2014_annotations.json").rename(data / "scores.json")
    okvqa = ["score", "--task", "okvqa", "--data", str(data), "--annotations", str(data / "scores.json")]
    err = fails_in_one_line(capsys, [*okvqa, *FAST, "--output-dir", str(data), "--overwrite"])
    assert (
        f"{data / 'scores.json'}: the scores file is {data / 'scores.json'}, which this command reads" in err
    )
    (tmp_path / "file").write_text("")
    assert "--output-dir" in fails_in_one_line(capsys, [*argv[:-1], str(tmp_path / "file")])


def test_a_second_score_into_the_same_folder_says_who_holds_it(dataset, tmp_path, capsys):
    out = tmp_path / "scores"
    out.mkdir()
    argv = ["score", "--data", str(dataset), "--dataset", "mine", *FAST, "--output-dir", str(out)]
    with exclusive_lock(out / score.LOCK_FILE, out, "qvl-train score"):  # a first score, still running
        err = fails_in_one_line(capsys, argv)
    holder = f"pid {os.getpid()} on {socket.gethostname()} since "
    assert f"{out}: another qvl-train score is writing here ({holder}" in err
    assert "wait for it to finish, or choose another --output-dir" in err
    assert sorted(p.name for p in out.iterdir()) == [score.LOCK_FILE]  # nothing written
    (out / score.LOCK_FILE).unlink()
    main(argv)  # once it ended; the lock file goes with the run that held it
    assert sorted(p.name for p in out.iterdir()) == ["predictions-base.jsonl", "scores.json"]


# ------------------------------------------------------------------------------------------ export


@pytest.fixture(scope="module")
def adapter(tmp_path_factory) -> Path:
    from peft import LoraConfig, get_peft_model

    from qvl_train.model import load_for_inference, lora_target_regex

    path = tmp_path_factory.mktemp("adapter") / "lora"
    config = LoraConfig(
        r=2, lora_alpha=4, target_modules=lora_target_regex(["q_proj"]), init_lora_weights=False
    )
    with warnings.catch_warnings():  # transformers 5 deprecates an alias that peft still calls
        warnings.simplefilter("ignore", FutureWarning)
        get_peft_model(load_for_inference("tiny"), config).save_pretrained(path)
    return path


def test_export_never_replaces_a_directory_qvl_did_not_write(adapter, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "model.safetensors").write_text("my own model")
    for more in ([], ["--overwrite"]):
        err = fails_in_one_line(
            capsys, ["export", "--adapter", str(adapter), "--output-dir", str(out), *more]
        )
        assert "is not empty and not a qvl export (no qvl_export.json)" in err
    assert [p.name for p in out.iterdir()] == ["model.safetensors"]
    assert (out / "model.safetensors").read_text() == "my own model"


def test_a_failed_export_leaves_the_previous_export_intact(adapter, tmp_path, monkeypatch, capsys):
    out = tmp_path / "merged"
    argv = ["export", "--adapter", str(adapter), "--output-dir", str(out)]
    main(argv)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert "qvl_export.json" in before

    def disk_full(_out: Path) -> str | None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("qvl_train.infer.export.missing_chat_template", disk_full)  # after the weights
    err = fails_in_one_line(capsys, [*argv, "--overwrite"])
    assert f"writing the export {out} failed (No space left on device); {out} is unchanged" in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(os.listdir(tmp_path)) == ["merged"]  # no staging directory left beside it


def test_a_second_export_into_the_same_folder_says_who_holds_it(adapter, tmp_path, capsys):
    out = tmp_path / "merged"
    lock = export.lock_path(out)
    assert lock.parent == tmp_path  # beside the folder: an export replaces the folder whole
    with exclusive_lock(lock, out, "qvl-train export"):  # a first export, still running
        err = fails_in_one_line(capsys, ["export", "--adapter", str(adapter), "--output-dir", str(out)])
    assert f"{out}: another qvl-train export is writing here (pid {os.getpid()} on " in err
    assert sorted(os.listdir(tmp_path)) == [lock.name]  # no export, no staging directory
    lock.unlink()
    main(["export", "--adapter", str(adapter), "--output-dir", str(out)])
    assert sorted(os.listdir(tmp_path)) == ["merged"]  # the lock file went with the export that held it


def test_export_refuses_a_fifo_as_adapter_config(tmp_path, no_hang, capsys):
    fake = tmp_path / "fake-adapter"
    fake.mkdir()
    os.mkfifo(fake / "adapter_config.json")
    err = fails_in_one_line(capsys, ["export", "--adapter", str(fake), "--output-dir", str(tmp_path / "o")])
    assert f"{fake / 'adapter_config.json'}: the adapter config is a FIFO, not a regular file" in err
