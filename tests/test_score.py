"""qvl-train score: the official VQA normalization and accuracy, LLaMA-Factory's instruction metrics and the
COCO caption metrics on crafted predictions (values by hand or from pycocoevalcap itself), the OK-VQA and
COCO readers on fixtures in the official formats, and the command end to end (tiny model, CPU)."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
from helpers import chat, write_dataset, write_image

from qvl_data.errors import QvlError
from qvl_train.__main__ import main
from qvl_train.infer import metrics, score
from qvl_train.infer.benchmarks import read_coco_captions, read_okvqa
from qvl_train.infer.metrics import CaptionScorer, instruct_scores, python_ptb_tokenize
from qvl_train.infer.score import join_repeated, model_names
from qvl_train.infer.vqa import okvqa_scores, vqa_accuracy, vqa_normalize

pytestmark = pytest.mark.usefixtures("one_torch_thread")
needs_java = pytest.mark.skipif(
    shutil.which("java") is None, reason="pycocoevalcap's tokenizer and METEOR need Java"
)

# ------------------------------------------------------------------------------------------ fixtures

# OK-VQA: (question_id, image_id, question, the 10 human answers)
OKVQA = [
    (
        90,
        9,
        "What is the man holding?",
        ["umbrella"] * 4 + ["parasol"] * 2 + ["an umbrella"] * 2 + ["rain", "stick"],
    ),
    (420, 42, "How many dogs are there?", ["two"] * 2 + ["2"] + ["three"] * 7),
    (12340, 1234, "What sport is this?", ["tennis"] * 10),
]
# COCO: image id -> captions (as people wrote them: capitals, final periods)
COCO = {
    1: [
        "A man riding a horse on a beach.",
        "A person rides a brown horse along the shore.",
        "Man on horseback near the sea.",
    ],
    2: [
        "Two cats sleeping on a red sofa.",
        "A pair of cats asleep on a couch.",
        "Cats are napping on the red couch.",
    ],
    3: [
        "A plate of food with broccoli and rice.",
        "Rice and broccoli on a white plate.",
        "A meal of vegetables and rice.",
    ],
}


def okvqa_dir(root: Path) -> Path:
    """The official OK-VQA val files and their COCO val2014 images (generated), as the README lays them out."""
    questions, annotations = [], []
    for question_id, image_id, question, answers in OKVQA:
        write_image(root / "val2014" / f"COCO_val2014_{image_id:012d}.jpg", (64, 48), seed=image_id)
        questions.append({"image_id": image_id, "question": question, "question_id": question_id})
        annotations.append(
            {
                "image_id": image_id,
                "answer_type": "other",
                "question_type": "eight" if question_id == 90 else "one",
                "question_id": question_id,
                "confidence": 3,
                "answers": [
                    {"answer_id": k + 1, "raw_answer": a, "answer_confidence": "yes", "answer": a}
                    for k, a in enumerate(answers)
                ],
            }
        )
    (root / "OpenEnded_mscoco_val2014_questions.json").write_text(
        json.dumps({"task_type": "Open-Ended", "data_subtype": "val2014", "questions": questions})
    )
    (root / "mscoco_val2014_annotations.json").write_text(json.dumps({"annotations": annotations}))
    return root


def coco_dir(root: Path, karpathy: bool = False) -> Path:
    """The official captions_val2014.json (or Karpathy's dataset_coco.json, images 1 and 3 in its test split)
    and the images."""
    names = {i: f"COCO_val2014_{i:012d}.jpg" for i in COCO}
    for i, name in names.items():
        write_image(root / "val2014" / name, (80, 60), seed=i)
    if karpathy:
        images = [
            {
                "filepath": "val2014",
                "filename": names[i],
                "split": "train" if i == 2 else "test",
                "cocoid": i,
                "sentences": [{"raw": c, "tokens": c.lower().split()} for c in captions],
            }
            for i, captions in COCO.items()
        ]
        (root / "dataset_coco.json").write_text(json.dumps({"images": images, "dataset": "coco"}))
    else:
        images = [{"id": i, "file_name": names[i], "width": 80, "height": 60} for i in reversed(COCO)]
        annotations = [
            {"image_id": i, "id": 100 * i + k, "caption": c}
            for i, captions in COCO.items()
            for k, c in enumerate(captions)
        ]
        (root / "annotations").mkdir(parents=True, exist_ok=True)
        (root / "annotations" / "captions_val2014.json").write_text(
            json.dumps({"images": images, "annotations": annotations})
        )
    return root


def make_adapter(path: Path) -> Path:
    """A LoRA adapter for the tiny model as training saves one, with random non-zero weights."""
    from peft import LoraConfig, get_peft_model

    from qvl_train.model import load_for_inference, lora_target_regex

    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=lora_target_regex(["q_proj", "v_proj"]), init_lora_weights=False
    )
    with warnings.catch_warnings():  # transformers 5 deprecates an alias that peft still calls
        warnings.simplefilter("ignore", FutureWarning)
        get_peft_model(load_for_inference("tiny"), config).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def adapter(tmp_path_factory) -> Path:
    return make_adapter(tmp_path_factory.mktemp("adapter") / "my-lora")


@pytest.fixture(scope="module")
def meteor():
    """One METEOR process (a Java program that takes seconds to load its tables) for the module."""
    from pycocoevalcap.meteor.meteor import Meteor

    return Meteor()


@pytest.fixture
def captions_scorer(meteor, monkeypatch):
    import pycocoevalcap.meteor.meteor

    monkeypatch.setattr(pycocoevalcap.meteor.meteor, "Meteor", lambda: meteor)  # what CaptionScorer starts
    return CaptionScorer()


# ------------------------------------------------------------------------------------------ VQA accuracy


@pytest.mark.parametrize(
    "answer, normalized",
    [
        ("two", "2"),  # number words
        ("none", "0"),
        ("a dog", "dog"),  # articles
        ("The Dog", "dog"),
        ("it's", "it's"),  # the apostrophe is not punctuation here...
        ("its", "its"),  # ...and "its" is no contraction: the two stay different
        ("dont", "don't"),  # contractions restored
        ("yes.", "yes"),  # a period not followed by a digit goes
        ("Yes!", "yes"),
        ("3.5", "3.5"),  # a decimal point stays
        ("10,000", "10000"),  # a comma between digits: every punctuation mark is joined, not spaced
        ("t-shirt", "t shirt"),  # punctuation inside a word becomes a space
        ("fork ; knife", "fork knife"),  # punctuation touching a space is removed
        ("  red\tand\nwhite  ", "red and white"),
    ],
)
def test_vqa_normalization_official_cases(answer, normalized):
    assert vqa_normalize(answer) == normalized


def test_vqa_accuracy_is_the_ten_leave_one_out_mean_by_hand():
    others = ["cat"] * 10
    assert vqa_accuracy("dog", others) == 0.0
    # k humans gave the answer: each of those k sees k - 1 matches among the other 9, the rest see k
    assert vqa_accuracy("dog", ["dog"] + others[:9]) == pytest.approx((0 + 9 * 1 / 3) / 10)  # 0.3
    assert vqa_accuracy("Dog.", ["dog"] * 2 + others[:8]) == pytest.approx(
        (2 * 1 / 3 + 8 * 2 / 3) / 10
    )  # 0.6
    assert vqa_accuracy("a dog", ["dog"] * 3 + others[:7]) == pytest.approx((3 * 2 / 3 + 7 * 1) / 10)  # 0.9
    assert vqa_accuracy("dog", ["dog"] * 4 + others[:6]) == 1.0
    assert vqa_accuracy("2", ["two", "Two", "2 "] + others[:7]) == pytest.approx(
        0.9
    )  # answers normalized too


def test_okvqa_reader_and_scores_on_crafted_predictions(tmp_path):
    bench = read_okvqa(okvqa_dir(tmp_path))
    assert [r["id"] for r in bench.records] == ["okvqa:90", "okvqa:420", "okvqa:12340"]
    first = bench.records[0]
    assert first["messages"] == [
        {
            "role": "user",
            "content": "<image>What is the man holding?\nAnswer the question using a single word or phrase.",
        }
    ]
    assert first["images"] == [str(tmp_path / "val2014" / "COCO_val2014_000000000009.jpg")]
    assert bench.references["okvqa:420"] == OKVQA[1][3]
    # 6 say umbrella ("an umbrella" too): 1.0; 3 say 2: 0.9; baseball: 0
    scores = okvqa_scores(
        {"okvqa:90": "Umbrella.", "okvqa:420": "two", "okvqa:12340": "baseball"}, bench.references, bench.info
    )
    assert scores["vqa_accuracy"] == pytest.approx(100 * (1.0 + 0.9 + 0.0) / 3)  # 63.33
    assert scores["per_question_type"] == pytest.approx({"eight": 100.0, "one": 45.0})
    # parasol: 2 of 10 -> 0.6; "2 dogs" is not "2": 0; ten times tennis, "Tennis!" normalized: 1.0
    scores = okvqa_scores(
        {"okvqa:90": "parasol", "okvqa:420": "2 dogs", "okvqa:12340": "Tennis!"}, bench.references, bench.info
    )
    assert scores["vqa_accuracy"] == pytest.approx(100 * (0.6 + 0.0 + 1.0) / 3)  # 53.33

    assert len(read_okvqa(tmp_path, max_rows=2).records) == 2
    (tmp_path / "val2014" / "COCO_val2014_000000000042.jpg").unlink()
    with pytest.raises(QvlError, match="1 of 3 images are missing, e.g. .*COCO_val2014_000000000042.jpg"):
        read_okvqa(tmp_path)


# ------------------------------------------------------------------------------------------ instruction data


def test_instruct_metrics_by_hand():
    # exact match: the stripped texts
    assert instruct_scores(["Paris.", " Paris. "], ["Paris.", "Paris."])["exact_match"] == 100.0
    # BLEU-4 over characters: "abcde" vs "abcdf" -> n-gram precisions 4/5, 3/4, 2/3, 1/2, no brevity penalty
    scores = instruct_scores(["abcde"], ["abcdf"])
    assert scores["bleu-4"] == round(100 * (4 / 5 * 3 / 4 * 2 / 3 * 1 / 2) ** 0.25, 4)  # 66.874
    assert scores["exact_match"] == 0.0
    # ROUGE-L over jieba's words: LCS "the cat on the mat" = 5 of 6 words each side -> F1 5/6
    scores = instruct_scores(["the cat sat on the mat"], ["the cat is on the mat"])
    assert scores["rouge-l"] == round(100 * 5 / 6, 4)  # 83.3333
    # Chinese is segmented into words (jieba), not dropped: 今天天气/很/好 vs 今天天气/不错 -> LCS 1, P 1/3, R 1/2
    assert instruct_scores(["今天天气很好"], ["今天天气不错"])["rouge-l"] == 40.0
    # an empty prediction scores 0, and the mean is over rows of 4-decimal values
    scores = instruct_scores(["", "the cat sat on the mat"], ["x", "the cat is on the mat"])
    assert scores["rouge-l"] == pytest.approx((0 + 83.3333) / 2) and scores["bleu-4"] >= 0


# ------------------------------------------------------------------------------------------ captions


@pytest.mark.slow
@needs_java
def test_caption_metrics_by_hand_and_equal_to_pycocoevalcap(captions_scorer, meteor, tmp_path):
    # one image: "a man riding a horse" (5 words) against an 8-word reference: every n-gram matches, the
    # brevity penalty is exp(1 - 8/5); ROUGE-L (beta 1.2) with P = 1, R = 5/8
    one = captions_scorer.score({1: "A man riding a horse."}, {1: ["A man riding a horse on a beach."]})
    assert one["bleu-4"] == pytest.approx(100 * 2.718281828459045 ** (1 - 8 / 5), abs=1e-4)  # 54.88
    assert one["rouge-l"] == pytest.approx(100 * (1 + 1.44) * 1 * 5 / 8 / (5 / 8 + 1.44 * 1))  # 73.85

    bench = read_coco_captions(coco_dir(tmp_path))
    predictions = {
        "coco:1": "A man is riding a horse on the beach.",
        "coco:2": "Two cats on a couch.",
        "coco:3": "A plate with rice and broccoli.",
    }
    ours = captions_scorer.score(predictions, bench.references)

    # the reference implementation, called as COCOEvalCap calls it
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    gts = PTBTokenizer().tokenize({k: [{"caption": c} for c in v] for k, v in bench.references.items()})
    res = PTBTokenizer().tokenize({k: [{"caption": v}] for k, v in predictions.items()})
    expected = {
        "bleu-4": Bleu(4).compute_score(gts, res, verbose=0)[0][3],
        "meteor": meteor.compute_score(gts, res)[0],
        "rouge-l": Rouge().compute_score(gts, res)[0],
        "cider": Cider().compute_score(gts, res)[0],
    }
    assert ours == pytest.approx({k: 100 * v for k, v in expected.items()}, abs=1e-9)
    assert 0 < ours["cider"] and 0 < ours["meteor"] < 100

    # predictions equal to a reference: BLEU-4 and ROUGE-L are perfect
    perfect = captions_scorer.score({k: v[0] for k, v in bench.references.items()}, bench.references)
    assert perfect["bleu-4"] == pytest.approx(100, abs=1e-4) and perfect["rouge-l"] == pytest.approx(100)


@needs_java
def test_the_python_tokenizer_matches_the_java_one_on_captions(tmp_path):
    odd = [
        'Two dogs (a puppy) play -- don\'t they? "Yes"... [really] {ok}',
        "It's 3.5 km/h, 10,000 cats; e-mail:",
    ]
    captions = {k: v + [v[0].upper(), *odd] for k, v in COCO.items()}
    assert python_ptb_tokenize(captions) == metrics.java_ptb_tokenize(captions)


def test_without_java_meteor_is_skipped_and_said(monkeypatch, tmp_path):
    monkeypatch.setattr(metrics, "java_available", lambda: False)
    scorer = CaptionScorer()
    bench = read_coco_captions(coco_dir(tmp_path))
    result = scorer.score({k: v[1] for k, v in bench.references.items()}, bench.references)
    assert result["meteor"] is None and result["rouge-l"] == pytest.approx(100)
    assert "METEOR skipped" in " ".join(scorer.notes) and "NLTK" in scorer.tokenizer


def test_coco_readers_official_and_karpathy(tmp_path):
    official = read_coco_captions(coco_dir(tmp_path / "official"))
    assert [r["id"] for r in official.records] == ["coco:1", "coco:2", "coco:3"]  # by image id
    assert official.references["coco:2"] == COCO[2] and official.files["format"] == "official"
    assert (
        official.records[0]["messages"][0]["content"]
        == "<image>Provide a one-sentence caption for the provided image."
    )
    karpathy = read_coco_captions(coco_dir(tmp_path / "karpathy", karpathy=True))  # its test split
    assert [r["id"] for r in karpathy.records] == ["coco:1", "coco:3"] and karpathy.files[
        "format"
    ] == "karpathy"
    assert karpathy.records[1]["images"] == [
        str(tmp_path / "karpathy" / "val2014" / "COCO_val2014_000000000003.jpg")
    ]
    assert [r["id"] for r in read_coco_captions(tmp_path / "karpathy", split="train").records] == ["coco:2"]
    with pytest.raises(QvlError, match="no captions file"):
        read_coco_captions(tmp_path)


# ------------------------------------------------------------------------------------------ the command


def _report(out: Path) -> dict:
    return json.loads((out / "scores.json").read_text())


def _lines(path: str) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def test_score_okvqa_base_and_adapter_side_by_side(tmp_path, adapter, capsys):
    data, out = okvqa_dir(tmp_path / "okvqa"), tmp_path / "out"
    argv = [
        "score",
        "--task",
        "okvqa",
        "--data",
        str(data),
        "--adapter",
        str(adapter),
        "--output-dir",
        str(out),
    ]
    main([*argv, "--max-new-tokens", "3", "--batch-size", "2", "--quiet"])
    report = _report(out)
    assert [m["name"] for m in report["models"]] == ["base", "my-lora"] and report["rows"] == 3
    assert report["models"][1]["adapter"] == str(adapter)
    bench = read_okvqa(data)
    for entry in report["models"]:
        lines = _lines(entry["predictions"])
        assert [line["id"] for line in lines] == ["okvqa:90", "okvqa:420", "okvqa:12340"]
        assert lines[1]["reference"] == OKVQA[1][3]  # the 10 human answers
        assert lines[0]["prompt"].endswith(
            "<image>What is the man holding?\nAnswer the question using a single word or phrase.<|im_end|>\n"
            "<|im_start|>assistant\n"
        )
        predictions = {line["id"]: line["prediction"] for line in lines}
        assert entry["scores"] == okvqa_scores(
            predictions, bench.references, bench.info
        )  # the JSON's numbers
    table = capsys.readouterr().out
    assert "vqa_accuracy" in table and "base" in table and "my-lora" in table


@needs_java
def test_score_coco_writes_the_table_and_json(tmp_path, adapter, captions_scorer, capsys):
    data, out = coco_dir(tmp_path / "coco"), tmp_path / "out"
    main(["score", "--task", "coco", "--data", str(data), "--adapter", str(adapter), "--output-dir", str(out),
          "--max-new-tokens", "4", "--quiet"])  # fmt: skip
    report = _report(out)
    assert report["metrics"] == ["bleu-4", "meteor", "rouge-l", "cider"] and report["notes"] == []
    assert report["files"]["format"] == "official" and "Java" in report["caption_tokenizer"]
    for entry in report["models"]:
        assert set(entry["scores"]) == set(report["metrics"])
        assert all(isinstance(v, float) for v in entry["scores"].values())
        assert _lines(entry["predictions"])[0]["reference"] == COCO[1]
    table = capsys.readouterr().out
    for word in ("cider", "meteor", "base", "my-lora"):
        assert word in table


def test_score_instruct_on_a_dataset_directory(tmp_path, adapter, monkeypatch, capsys):
    data = tmp_path / "data"
    write_image(data / "a.png", (60, 40))
    rows = [
        {"messages": chat("<image>Colour?", "Red."), "images": ["a.png"]},
        {"messages": chat("Hi", "Hello.", "Bye", "Bye!")},
        {"messages": chat("今天天气怎么样？", "今天天气很好。")},
    ]
    write_dataset(data, "mine", rows)
    out = tmp_path / "out"
    # the same adapter twice, by two paths: the columns are told apart by path
    twin = tmp_path / "twin" / adapter.name
    shutil.copytree(adapter, twin)
    main(["score", "--data", str(data), "--dataset", "mine", "--adapter", str(adapter), "--adapter", str(twin),
          "--output-dir", str(out), "--max-new-tokens", "3", "--quiet"])  # fmt: skip
    report = _report(out)
    assert [m["adapter"] for m in report["models"]] == ["", str(adapter), str(twin)]
    for entry in report["models"]:
        lines = _lines(entry["predictions"])
        assert [line["reference"] for line in lines] == ["Red.", "Bye!", "今天天气很好。"]
        expected = instruct_scores(
            [line["prediction"] for line in lines], [line["reference"] for line in lines]
        )
        assert entry["scores"] == expected
    assert report["models"][1]["scores"] == report["models"][2]["scores"]  # one adapter, one answer
    assert "exact_match" in capsys.readouterr().out


def test_score_options_and_failures(tmp_path, capsys):
    assert join_repeated(["--task", "coco", "--adapter", "a", "--adapter=b"]) == [
        "--task",
        "coco",
        "--adapter",
        "a,b",
    ]
    config = score.ScoreConfig(
        task="okvqa", data="x", prompt="<image>{question}\\nShort."
    )  # as a shell passes it
    assert config.prompt == "<image>{question}\nShort." and config.max_new_tokens == 32  # the task's default
    assert model_names(["runs/a/lora", "runs/b/lora", "base"]) == [
        "base",
        "runs/a/lora",
        "runs/b/lora",
        "adapter:base",
    ]
    for argv, message in (
        (["--task", "vqa2", "--data", "x"], "task must be one of instruct, okvqa, coco"),
        (["--task", "okvqa"], "--data is required"),
        (
            ["--task", "okvqa", "--data", str(tmp_path), "--adapter", str(tmp_path)],
            "not a LoRA adapter directory",
        ),
        (["--task", "okvqa", "--data", str(tmp_path)], "OK-VQA questions file does not exist"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            main(["score", *argv])
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err
