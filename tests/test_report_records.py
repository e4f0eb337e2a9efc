"""`moekern report` and the JSON lines it reads: a line torn by an interrupted run is skipped with a note (and cut
off by the next writer, so it never ends up mid-file); unreadable lines anywhere else are counted and named, and a
malformed record is an error naming its file and line."""

import json

import pytest

from moekern.bench.records import RecordWriter, read_records
from moekern.cli import main
from moekern.errors import MoekernError


@pytest.fixture(scope="module")
def bench_lines(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    assert main(["bench", "shipped", "--context", "8", "--batch-sizes", "1", "--decode-tokens", "1",
                 "--device", "cpu", "--out", str(out)]) == 0
    return (out / "bench.jsonl").read_bytes().splitlines(keepends=True)


def run_folder(tmp_path, lines, name="runs") -> tuple:
    folder = tmp_path / name
    folder.mkdir()
    (folder / "bench.jsonl").write_bytes(b"".join(lines))
    return folder, folder / "bench.jsonl"


def test_a_torn_last_line_is_skipped_with_a_note_and_cut_by_the_next_writer(bench_lines, tmp_path, capsys):
    torn = bench_lines[-1][: len(bench_lines[-1]) // 2]  # a kill while the last record was written
    folder, file = run_folder(tmp_path, [*bench_lines, torn])
    assert main(["report", str(folder)]) == 0
    err = capsys.readouterr().err
    assert f"{file}: line {len(bench_lines) + 1}, the last, is incomplete" in err
    assert (folder / "report.md").exists()
    RecordWriter(folder, "bench.jsonl").write("run", command="bench")  # the next run appends after cutting it off
    assert "removed the incomplete last line" in capsys.readouterr().err
    lines = file.read_bytes().splitlines(keepends=True)
    assert lines[:-1] == bench_lines and json.loads(lines[-1])["kind"] == "run"
    assert len(read_records([folder])) == len(bench_lines) + 1


@pytest.mark.parametrize("bad,why", [
    (b'{"kind": "speed", "run": \n', "not JSON"),
    (b'\xff\xfe{"kind": "run"}\n', "not UTF-8"),
    (b'{"kind": "model", "run": "r", "model": "m"}{"kind": "mod\n', "not JSON"),  # a torn line written over
])
def test_damage_in_the_middle_is_counted_and_named(bench_lines, tmp_path, capsys, bad, why):
    folder, file = run_folder(tmp_path, [bench_lines[0], bad, *bench_lines[1:3], bad, *bench_lines[3:]])
    assert main(["report", str(folder)]) == 2
    err = capsys.readouterr().err
    assert f"{file}: 2 lines cannot be read: line 2 ({why}" in err and "line 5 (" in err, err
    assert "not a line cut by an interrupted run" in err and len(err.strip().splitlines()) == 1
    assert not (folder / "report.md").exists()
    # a complete last line that cannot be read is damage too, not an interrupt
    file.write_bytes(b"".join([*bench_lines, bad]))
    with pytest.raises(MoekernError, match=f"1 line cannot be read: line {len(bench_lines) + 1}"):
        read_records([folder])


@pytest.mark.parametrize("record,words", [
    ([1, 2, 3], ["a record must be a JSON object, got list"]),
    ("text", ["a record must be a JSON object, got str"]),
    ({"kind": "speed", "run": "r1"}, ["the speed record lacks the field 'batch'"]),
    ({"kind": "eval", "run": "r1", "task": "x"}, ["the eval record lacks the field 'value'"]),
    ({"run": "r1", "command": "bench"}, ["the ? record lacks the field 'kind'"]),
    ({"kind": "speed", "run": "r1", "batch": "1", "status": "ok", "context": 8},
     ["field 'batch' of the speed record is '1', not a whole number"]),
    ({"kind": "speed", "run": "r1", "batch": 1, "status": "ok", "context": 8},
     ["the speed record lacks the field 'prefill_s'"]),
])
def test_a_malformed_record_is_an_error_naming_file_and_line(bench_lines, tmp_path, capsys, record, words):
    folder, file = run_folder(tmp_path, [*bench_lines[:2], (json.dumps(record) + "\n").encode(), *bench_lines[2:]])
    assert main(["report", str(folder)]) == 2
    err = capsys.readouterr().err
    assert f"{file}:3: " in err and all(w in err for w in words), err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
