"""The unified record: JSON Schema and Arrow schema agree; convert writes it for polars and datasets."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pyarrow as pa
from click.testing import CliRunner

from qvl_data.cli import main
from qvl_data.schema import ROLES, UNIFIED_ARROW_SCHEMA

SCHEMA_PATH = Path(__file__).resolve().parents[1] / "schemas" / "unified_record.schema.json"
JSON_TO_ARROW = {"string": pa.string(), "integer": pa.int64()}


def _arrow_type(prop: dict) -> pa.DataType:
    if prop.get("contentEncoding") == "base64":  # bytes: binary in Arrow
        return pa.binary()
    kind = prop["type"]
    kind = next(k for k in kind if k != "null") if isinstance(kind, list) else kind
    if kind == "array":
        return pa.list_(_arrow_type(prop["items"]))
    if kind == "object":
        return pa.struct(
            [pa.field(name, _arrow_type(p), nullable=False) for name, p in prop["properties"].items()]
        )
    return JSON_TO_ARROW[kind]


def test_arrow_schema_matches_json_schema():
    schema = json.loads(SCHEMA_PATH.read_text())
    assert list(schema["properties"]) == UNIFIED_ARROW_SCHEMA.names
    assert set(schema["required"]) == set(UNIFIED_ARROW_SCHEMA.names)
    for name, prop in schema["properties"].items():
        field = UNIFIED_ARROW_SCHEMA.field(name)
        assert field.type.equals(_arrow_type(prop)), name
        assert field.nullable == (isinstance(prop["type"], list) and "null" in prop["type"]), name
    assert tuple(schema["properties"]["messages"]["items"]["properties"]["role"]["enum"]) == ROLES


def test_convert_writes_valid_unified_parquet(tmp_path: Path, demo_dir: Path):
    import datasets
    import polars as pl

    out = tmp_path / "unified.parquet"
    result = CliRunner().invoke(main, ["convert", "--dataset-dir", str(demo_dir), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "wrote 1096 rows" in result.output and "0 rejected" in result.output
    df = pl.read_parquet(out)
    ds = datasets.Dataset.from_parquet(str(out))
    assert df.height == len(ds) == 1096
    assert df["source"].value_counts().sort("source").rows() == [
        ("alpaca_en_demo", 999),
        ("identity", 91),
        ("mllm_demo", 6),
    ]
    validator = jsonschema.Draft202012Validator(json.loads(SCHEMA_PATH.read_text()))
    for record in df.head(100).to_dicts() + df.filter(pl.col("source") == "mllm_demo").to_dicts():
        validator.validate(record)
    first = df.row(0, named=True)
    assert first["messages"][0] == {"role": "user", "content": "<image>Who are they?"}
    assert first["system"] is None and first["images"][0].endswith("mllm_demo_data/1.jpg")
    alpaca = df.filter(pl.col("source") == "alpaca_en_demo").row(0, named=True)
    assert [m["role"] for m in alpaca["messages"]] == ["user", "assistant"]
