"""rlhf.prompts: prompt files in any table format `rlhf.tables` reads, with the same checks as JSONL."""

import json

import pandas as pd
import pytest
from datasets import Dataset

from rlhf.errors import UserError
from rlhf.prompts import read_prompts


def test_prompts_from_jsonl_parquet_csv_and_a_saved_dataset(tmp_path):
    rows = [{"id": "a", "prompt": "Write a poem."}, {"id": "b", "prompt": "Tell a story."}]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    pd.DataFrame(rows).to_parquet(tmp_path / "p.parquet")
    pd.DataFrame(rows).to_csv(tmp_path / "p.csv", index=False)
    Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    expected = [("a", "Write a poem."), ("b", "Tell a story.")]
    for name in ("p.jsonl", "p.parquet", "p.csv", "saved"):
        assert read_prompts(tmp_path / name) == expected, name
    assert read_prompts(tmp_path / "p.parquet", limit=1) == expected[:1]


def test_bad_prompt_tables_are_one_line_errors(tmp_path):
    pd.DataFrame({"text": ["x"]}).to_parquet(tmp_path / "wrong.parquet")
    with pytest.raises(UserError, match="no 'prompt' column \\(its columns: text\\)"):
        read_prompts(tmp_path / "wrong.parquet")
    pd.DataFrame({"prompt": ["x", " "]}).to_parquet(tmp_path / "blank.parquet")
    with pytest.raises(UserError, match="blank.parquet:2: 'prompt' is empty"):
        read_prompts(tmp_path / "blank.parquet")
    pd.DataFrame({"prompt": ["x", "y"], "id": ["1", "1"]}).to_parquet(tmp_path / "dup.parquet")
    with pytest.raises(UserError, match="dup.parquet:2: duplicate id '1'"):
        read_prompts(tmp_path / "dup.parquet")
    with pytest.raises(UserError, match="no such file"):
        read_prompts(tmp_path / "missing.parquet")
