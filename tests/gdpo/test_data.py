from pathlib import Path

import pytest

from gdpo.config import DataConfig
from gdpo.data import DataError, build_prompts, load_prompts, load_rows

GSM8K = Path(__file__).resolve().parents[3] / "shared" / "data" / "gsm8k" / "test.jsonl"


def test_task_source_has_disjoint_train_and_eval():
    train = load_rows("task:chain_arith", "train", 2000, seed=0)
    evals = load_rows("task:chain_arith", "eval", 100, seed=0)
    assert len(train) == 2000 and len(evals) == 100
    assert not {r["question"] for r in train} & {r["question"] for r in evals}


def test_jsonl_source_and_template(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text('{"q": "1+1", "a": 2}\n\n{"q": "2+2", "a": 4}\n')
    cfg = DataConfig(train=str(f), template="Q: {q}\nA:", answer_column="a")
    ps = load_prompts(cfg, "train")
    assert ps.prompts == ["Q: 1+1\nA:", "Q: 2+2\nA:"]
    assert ps.columns["answer"] == ["2", "4"] and ps.columns["q"] == ["1+1", "2+2"]
    assert ps.take([1]).prompts == ["Q: 2+2\nA:"]


@pytest.mark.skipif(not GSM8K.is_file(), reason="../shared/data/gsm8k is not present")
def test_gsm8k_file_loads_with_its_columns():
    cfg = DataConfig(train=str(GSM8K), template="{question}\n", eval_size=0)
    ps = load_prompts(cfg, "train", limit=5)
    assert len(ps) == 5 and ps.columns["answer"][0].rstrip().endswith("#### 18")


def test_bad_sources_name_the_problem(tmp_path):
    with pytest.raises(DataError, match="data file not found"):
        load_rows(str(tmp_path / "none.jsonl"), "train")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "x", "answer": 1}\n{oops\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: not valid JSON"):
        load_rows(str(bad), "train")
    with pytest.raises(DataError, match="unknown task 'nope'"):
        load_rows("task:nope", "train")
    with pytest.raises(DataError, match="must look like 'hf:NAME:SPLIT'"):
        load_rows("hf:onlyname", "train")
    rows = [{"question": "a", "answer": 1}, {"question": "b"}]
    with pytest.raises(DataError, match=r"sample 1 has no column 'answer'"):
        build_prompts(rows, DataConfig(), "mine.jsonl")
    with pytest.raises(DataError, match="no chat template"):
        build_prompts(rows[:1], DataConfig(use_chat_template=True), "mine.jsonl")
