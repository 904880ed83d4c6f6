"""Benchmark discovery and CSV reading: MMLU (no header), C-Eval and CMMLU (headers), errors, mapping."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tunesmith.errors import DataError, TunesmithError
from tunesmith.evaluation.benchmark import BUNDLED, load_benchmark, parse_task, read_questions


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def test_parse_task_splits_at_the_last_underscore_and_knows_llamafactory_spellings():
    assert parse_task("mmlu_test") == ("mmlu", "test")
    assert parse_task("ceval_validation") == ("ceval", "val")
    assert parse_task("my_bench_val") == ("my_bench", "val")
    assert parse_task("cmmlu_train") == ("cmmlu", "dev")
    for bad in ("mmlu", "mmlu_tests", "_test"):
        with pytest.raises(TunesmithError, match="BENCHMARK_SPLIT"):
            parse_task(bad)


def test_headerless_mmlu_rows_with_quoted_commas_and_newlines(tmp_path):
    path = write(
        tmp_path / "algebra_test.csv",
        'What is 1+1?,1,2,3,4,B\n"Pick, carefully:\nwhich?","a, b",c,d,e, c \n',
    )
    q1, q2 = read_questions(path, "algebra")
    assert (q1.question, q1.choices, q1.answer, q1.index) == ("What is 1+1?", ("1", "2", "3", "4"), "B", 0)
    assert (q2.question, q2.choices, q2.answer) == ("Pick, carefully:\nwhich?", ("a, b", "c", "d", "e"), "C")
    assert (q1.where.line, q2.where.line) == (1, 2)


def test_ceval_and_cmmlu_headers_are_detected_and_extra_columns_ignored(tmp_path):
    ceval = write(
        tmp_path / "law_val.csv",
        "\ufeffid,question,A,B,C,D,answer,explanation\n0,问题一,甲,乙,丙,丁,D,因为\n",
    )
    [q] = read_questions(ceval, "law")
    assert (q.question, q.choices, q.answer, q.where.line) == ("问题一", ("甲", "乙", "丙", "丁"), "D", 2)
    # CMMLU: an unnamed pandas index column, capitalised Question/Answer
    cmmlu = write(tmp_path / "arts.csv", ",Question,A,B,C,D,Answer\n0,q0,a,b,c,d,A\n1,q1,a,b,c,d,B\n")
    assert [(q.question, q.answer) for q in read_questions(cmmlu, "arts")] == [("q0", "A"), ("q1", "B")]


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ("q,a,b,c,d,E", "answer is 'E'.*expected one of A, B, C, D"),
        ("q,a,b,c,d,", "withheld"),
        ("q,a,b,c", "row has 4 columns; missing D, answer"),
        (",a,b,c,d,A", "question is empty"),
    ],
)
def test_malformed_rows_name_file_and_line(tmp_path, row, message):
    path = write(tmp_path / "s_test.csv", "ok,a,b,c,d,A\n" + row + "\n")
    with pytest.raises(DataError, match=message) as err:
        read_questions(path, "s")
    assert f"{path}:2" in str(err.value)


def _bench(root: Path, *, header: bool = False, stem_suffix: bool = True) -> None:
    head = "question,A,B,C,D,answer\n" if header else ""
    for split, n in (("dev", 3), ("test", 2)):
        for subject in ("alpha", "beta"):
            name = f"{subject}_{split}.csv" if stem_suffix else f"{subject}.csv"
            rows = "".join(f"{subject} {split} {i},a,b,c,d,{'ABCD'[i % 4]}\n" for i in range(n))
            write(root / split / name, head + rows)


def test_benchmark_folder_under_task_dir_with_mapping(tmp_path):
    _bench(tmp_path / "evals" / "toy")
    write(
        tmp_path / "evals" / "toy" / "mapping.json",
        json.dumps(
            {"alpha": {"name": "Alpha Studies", "category": "STEM"}, "beta": {"name": "b", "category": "X"}}
        ),
    )
    bench = load_benchmark(tmp_path / "evals", "toy_test", n_shot=2)
    assert (bench.name, bench.split, bench.num_questions) == ("toy", "test", 4)
    alpha, beta = bench.subjects
    assert (alpha.key, alpha.name, alpha.category, beta.category) == ("alpha", "Alpha Studies", "STEM", "X")
    assert [q.question for q in alpha.shots] == ["alpha dev 0", "alpha dev 1", "alpha dev 2"]
    assert [q.question for q in alpha.questions] == ["alpha test 0", "alpha test 1"]


def test_task_dir_itself_cmmlu_file_names_and_no_mapping(tmp_path):
    _bench(tmp_path, header=True, stem_suffix=False)
    bench = load_benchmark(tmp_path, "cmmlu_test", n_shot=1)
    assert bench.folder == tmp_path
    assert [(s.key, s.name, s.category) for s in bench.subjects] == [
        ("alpha", "alpha", "Other"),
        ("beta", "beta", "Other"),
    ]


def test_mmlu_archive_layout_data_subfolder(tmp_path):
    _bench(tmp_path / "mmlu" / "data")
    assert load_benchmark(tmp_path, "mmlu_test", n_shot=0).num_questions == 4


def test_not_found_lists_what_exists(tmp_path):
    _bench(tmp_path / "toy")
    with pytest.raises(
        TunesmithError, match=r"no 'test' split of benchmark 'mmlu'.*holds: toy.*bundled: sample"
    ):
        load_benchmark(tmp_path, "mmlu_test", n_shot=0)
    with pytest.raises(TunesmithError, match=r"no 'val' split of benchmark 'toy'"):
        load_benchmark(tmp_path, "toy_validation", n_shot=0)


def test_missing_dev_files_fail_only_when_shots_are_wanted(tmp_path):
    _bench(tmp_path / "toy")
    (tmp_path / "toy" / "dev" / "beta_dev.csv").unlink()
    with pytest.raises(TunesmithError, match=r"no dev file .* for subject\(s\) beta.*n_shot: 0"):
        load_benchmark(tmp_path, "toy_test", n_shot=5)
    assert load_benchmark(tmp_path, "toy_test", n_shot=0).subjects[1].shots == ()


def test_mapping_subject_without_file_is_an_error(tmp_path):
    _bench(tmp_path / "toy")
    write(tmp_path / "toy" / "mapping.json", json.dumps({"gamma": {"name": "g", "category": "STEM"}}))
    with pytest.raises(DataError, match="subjects without a file .*: gamma"):
        load_benchmark(tmp_path, "toy_test", n_shot=0)


def test_bundled_sample_benchmarks(tmp_path):
    bench = load_benchmark(tmp_path / "nowhere", "sample_test", n_shot=5)
    assert bench.folder == BUNDLED / "sample"
    assert [(s.key, s.category, len(s.questions), len(s.shots)) for s in bench.subjects] == [
        ("arithmetic", "STEM", 8, 5),
        ("geography", "Social Sciences", 8, 5),
        ("science", "STEM", 8, 5),
    ]
    assert "".join(q.answer for q in bench.subjects[0].questions) == "CACDABCD"  # as the README says
    zh = load_benchmark(tmp_path, "sample_zh_validation", n_shot=5)
    [subject] = zh.subjects
    assert (subject.name, subject.category, len(subject.questions), zh.split) == (
        "中国常识",
        "Humanities",
        4,
        "val",
    )
