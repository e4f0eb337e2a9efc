"""The output rule of every command that writes (moekern.folders): nothing moekern did not create is deleted, the
source model, the current directory and the package are never written over, the target is checked before any work,
a lock stops a second writer, and files get the umask's modes."""

import json
import os
import signal
import stat
import tempfile
from pathlib import Path

import pytest
from forked import run_forked
from tiny_models import tiny_model

import moekern
from moekern import cli, folders, runs
from moekern.errors import MoekernError
from moekern.shipped import MODEL_DIR


@pytest.fixture
def no_work(monkeypatch):
    """Loading a model means the work started: here that fails the test."""
    def loading(args):
        raise AssertionError("the model was loaded before the output folder was checked")

    monkeypatch.setattr(runs, "load_from_args", loading)
    from moekern.bench import harness as bench_cli

    monkeypatch.setattr(bench_cli, "load_model", loading)


def compress(*args):
    return cli.main(["compress", "shipped", "--recipe", "rtn4", "--device", "cpu", *args])


def refused(capsys, code, *words):
    err = capsys.readouterr().err
    assert code == 2, err
    assert all(w in err for w in words), err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err


def tree(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_folder_moekern_did_not_write_is_never_replaced(tmp_path, capsys, no_work):
    mine = tmp_path / "d"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    for extra in ([], ["--overwrite"]):
        refused(capsys, compress("--out", str(mine), *extra), "notes.txt", "did not write")
    assert tree(mine) == {"notes.txt": b"keep"}
    refused(capsys, cli.main(["bench", "shipped", "--out", str(mine)]), "did not write")
    refused(capsys, cli.main(["report", str(mine)]), "did not write")  # (before it even reads records)
    file = tmp_path / "f"
    file.write_text("a file")
    refused(capsys, compress("--out", str(file), "--overwrite"), "is a file")
    assert file.read_text() == "a file"
    assert sorted(os.listdir(tmp_path)) == ["d", "f"]  # no lock file, no temporary folder left


def test_the_current_directory_its_parents_the_source_and_the_package_are_refused(tmp_path, monkeypatch, capsys,
                                                                                  no_work):
    work = tmp_path / "work"
    (work / "sub").mkdir(parents=True)
    monkeypatch.chdir(work / "sub")
    refused(capsys, compress("--out", ".", "--overwrite"), "current directory")
    refused(capsys, compress("--out", "..", "--overwrite"), "parent of the current directory")
    refused(capsys, cli.main(["bench", "shipped", "--out", "."]), "current directory")
    model = tmp_path / "models" / "m"
    model.mkdir(parents=True)
    (model / "TRAINING.json").write_text("{}")
    (model / "config.json").write_text(json.dumps({"moekern": {}}))  # even one that looks like moekern's output
    before = tree(tmp_path)
    refused(capsys, cli.main(["compress", str(model), "--recipe", "expert-drop=2", "--out", str(model),
                              "--overwrite"]), "is the source model")
    refused(capsys, cli.main(["compress", str(model), "--recipe", "rtn4", "--out", str(model.parent),
                              "--overwrite"]), "holds the source model")
    shipped = tree(MODEL_DIR)
    refused(capsys, compress("--out", str(MODEL_DIR), "--overwrite"), "moekern's own package")
    refused(capsys, compress("--out", str(MODEL_DIR.parent.parent), "--overwrite"), "moekern's own package")
    assert tree(MODEL_DIR) == shipped
    assert tree(tmp_path) == before
    assert sorted(os.listdir(tmp_path)) == ["models", "work"] and os.listdir(tmp_path / "models") == ["m"]
    assert os.listdir(work) == ["sub"] and os.listdir(work / "sub") == []


def test_save_refuses_the_models_own_folder_and_replaces_only_with_overwrite(tmp_path):
    model = tiny_model("mixtral")
    moekern.save(model, tmp_path / "a")
    loaded, _ = moekern.load(tmp_path / "a")
    with pytest.raises(MoekernError, match="is the source model"):
        moekern.save(loaded, tmp_path / "a", overwrite=True)
    moekern.save(loaded, tmp_path / "b")
    weights = (tmp_path / "b" / "model.safetensors").read_bytes()
    with pytest.raises(MoekernError, match="pass --overwrite"):
        moekern.save(tiny_model("mixtral", seed=1), tmp_path / "b")
    assert (tmp_path / "b" / "model.safetensors").read_bytes() == weights
    moekern.save(tiny_model("mixtral", seed=1), tmp_path / "b", overwrite=True)
    assert (tmp_path / "b" / "model.safetensors").read_bytes() != weights
    assert json.loads((tmp_path / "b" / folders.MARKER).read_text())["kind"] == folders.MODEL
    assert sorted(os.listdir(tmp_path)) == ["a", "b"]


def test_outputs_of_another_kind_are_refused(tmp_path, capsys, no_work):
    runs = tmp_path / "runs"
    runs.mkdir()
    (runs / "bench.jsonl").write_text(json.dumps({"kind": "run", "run": "r1", "command": "bench"}) + "\n")
    refused(capsys, compress("--out", str(runs), "--overwrite"), "run folder", "not a model")
    model = tmp_path / "model"
    moekern.save(tiny_model("mixtral"), model)
    refused(capsys, cli.main(["bench", "shipped", "--out", str(model)]), "model folder", "not a run folder")
    with pytest.raises(MoekernError, match="run folder"):
        moekern.save(tiny_model("mixtral"), runs, overwrite=True)
    assert (runs / "bench.jsonl").exists() and (model / "model.safetensors").exists()


def test_a_second_writer_is_refused_with_the_name_of_the_first(tmp_path, capsys, no_work):
    target = tmp_path / "out"
    ready_r, ready_w = os.pipe()

    def hold():
        with folders.claim(target, folders.MODEL, command="moekern compress big --out out"):
            os.write(ready_w, b"1")
            signal.pause()
        return 0

    pid = os.fork()
    if pid == 0:
        try:
            os._exit(hold())
        finally:
            os._exit(70)
    try:
        assert os.read(ready_r, 1) == b"1"
        refused(capsys, compress("--out", str(target)), "being written by another moekern process", f"pid {pid}",
                "moekern compress big --out out")
        with pytest.raises(MoekernError, match="being written"):
            moekern.save(tiny_model("mixtral"), target)
    finally:
        os.kill(pid, signal.SIGKILL)  # no cleanup at all: its lock file stays behind
        os.waitpid(pid, 0)
        os.close(ready_r)
        os.close(ready_w)
    assert (tmp_path / ".out.moekern-lock").exists()
    moekern.save(tiny_model("mixtral"), target)  # the kernel dropped the dead holder's lock: the file is stale
    assert sorted(os.listdir(tmp_path)) == ["out"]


@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_modes_follow_the_umask(tmp_path, mask):
    previous = os.umask(mask)
    try:
        moekern.save(tiny_model("olmoe"), tmp_path / "out")
    finally:
        os.umask(previous)
    out = tmp_path / "out"
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~mask
    for file in out.iterdir():
        assert stat.S_IMODE(file.stat().st_mode) == 0o666 & ~mask, file.name


def test_an_unwritable_target_is_refused_before_any_work():
    """As an unprivileged user (root writes anywhere): a read-only parent, and a model folder holding a folder that
    cannot be emptied. The forked child runs claim() only: no_work-style tests show claim comes before loading."""
    base = Path(tempfile.mkdtemp(prefix="moekern-perm-"))
    try:
        os.chmod(base, 0o777)  # the unprivileged child writes its lock files here
        (base / "readonly").mkdir(mode=0o555)
        os.chmod(base / "readonly", 0o555)
        old = base / "old"
        old.mkdir()
        (old / folders.MARKER).write_text(json.dumps({"kind": "model"}))
        (old / "locked").mkdir()
        os.chmod(base / "old", 0o777)
        os.chmod(old / "locked", 0o555)
        messages = base / "messages"
        messages.mkdir(mode=0o777)
        os.chmod(messages, 0o777)

        def try_claims():
            if os.geteuid() == 0:
                os.setgid(65534)
                os.setuid(65534)
            found = []
            for target in (base / "readonly" / "out", old):
                try:
                    with folders.claim(target, folders.MODEL, overwrite=True):
                        found.append("claimed")
                except MoekernError as exc:
                    found.append(str(exc))
            (messages / "found.json").write_text(json.dumps(found))
            return 0

        assert run_forked(try_claims) == 0
        first, second = json.loads((messages / "found.json").read_text())
        assert "cannot write in" in first and "Permission denied" in first
        assert "cannot be replaced" in second and "locked" in second
        assert sorted(os.listdir(base / "readonly")) == [] and (old / "locked").is_dir()
    finally:
        for folder, dirs, _ in os.walk(base):
            for d in dirs:
                os.chmod(os.path.join(folder, d), 0o755)
        import shutil

        shutil.rmtree(base)


def test_recover_puts_back_what_a_killed_fallback_swap_left_aside(tmp_path):
    """The state a SIGKILL between the fallback's two renames leaves: no target, its earlier content aside, the new
    one in a temporary folder. moekern.load restores the earlier one and removes the rest."""
    model = tiny_model("mixtral")
    moekern.save(model, tmp_path / "out")
    earlier = tree(tmp_path / "out")
    os.rename(tmp_path / "out", tmp_path / ".out.moekern-old-abc123")
    (tmp_path / ".out.moekern-tmp-def456").mkdir()
    (tmp_path / ".out.moekern-tmp-def456" / "model.safetensors").write_bytes(b"new, complete or not")
    loaded, _ = moekern.load(tmp_path / "out")  # under the lock, as a writer would: the leftovers go too
    assert sorted(os.listdir(tmp_path)) == ["out"]
    assert tree(tmp_path / "out") == earlier
    assert loaded.config.moekern == model.config.moekern


def test_a_run_folder_is_marked_and_added_to(tmp_path):
    from moekern.bench.records import RecordWriter

    with folders.claim(tmp_path / "runs", folders.RUNS):
        RecordWriter(tmp_path / "runs", "bench.jsonl").write("run", command="bench")
    assert json.loads((tmp_path / "runs" / folders.MARKER).read_text())["kind"] == folders.RUNS
    with folders.claim(tmp_path / "runs", folders.RUNS):  # added to, no --overwrite needed
        RecordWriter(tmp_path / "runs", "eval.jsonl").write("run", command="eval")
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == [folders.MARKER, "bench.jsonl", "eval.jsonl"]


def test_a_refused_run_leaves_no_folder_behind(tmp_path, capsys):
    assert cli.main(["compress", "shipped", "--recipe", "bogus=1", "--out", str(tmp_path / "a" / "b" / "c")]) == 2
    assert "unknown recipe step" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []


def test_a_folder_of_moekern_outputs_takes_runs(tmp_path):
    """The README's main job writes moekern-runs/paper; `moekern bench` then writes into moekern-runs itself."""
    from moekern.bench.records import RecordWriter

    with folders.claim(tmp_path / "runs" / "paper", folders.RUNS):
        RecordWriter(tmp_path / "runs" / "paper", "paper.jsonl").write("run", command="paper")
    with folders.claim(tmp_path / "runs", folders.RUNS):
        RecordWriter(tmp_path / "runs", "bench.jsonl").write("run", command="bench")
    assert (tmp_path / "runs" / "bench.jsonl").is_file() and (tmp_path / "runs" / "paper" / "paper.jsonl").is_file()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "sub").mkdir()  # a folder moekern did not write makes its parent not moekern's
    with pytest.raises(MoekernError, match="did not write"):
        with folders.claim(tmp_path / "other", folders.RUNS):
            pass
