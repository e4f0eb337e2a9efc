"""The folders moekern writes, and the weight files it reads: one rule for every command and for moekern.save.

Two kinds of output folder:
  MODEL  a checkpoint (moekern.save, `moekern compress`, the AWQ/GPTQ export), replaced as a whole
  RUNS   a run folder (`moekern bench`, `eval`, `paper`, `report`): records are appended, reports rewritten

The output rule (claim(), which replaced_folder() and the CLI call before any work):
  - moekern never deletes what it did not create. An existing folder that is not empty must be a moekern output of
    the same kind: it holds MARKER (written into every output moekern makes), or it is a checkpoint of an earlier
    moekern (config.json has a "moekern" object) or a run folder of one (its *.jsonl lines are moekern records).
    A MODEL folder is replaced only with overwrite=True (`--overwrite`); a RUNS folder is added to.
  - Always refused: the current directory and its ancestors, the source model and its ancestors, and anything in or
    above moekern's own package (the shipped model lives there). Symlinks are followed first.
  - Checked before any work starts: the target is a folder (not a file), its parent can be written (the lock file is
    created there), and a MODEL folder to replace has no folder moekern could not delete.
  - A lock file beside the target, `.NAME.moekern-lock`, held with flock(2), stops a second writer; the message names
    the holder (pid, host, command, since when). The kernel drops the lock when its holder dies, even by SIGKILL, so
    a lock file left behind is stale by construction and simply taken over (no pid guessing).
  - SIGTERM unwinds like SIGINT (Terminated is a KeyboardInterrupt), so temporary files are removed either way.
  - Files and folders get the modes the umask gives (not tempfile's 0700/0600).

Crash consistency of a MODEL folder (replaced_folder). The content is written into `.NAME.moekern-tmp-XXXX` beside
NAME, under the lock; every file gets its umask mode and is fsynced, MARKER is written last, and then:
  - NAME missing: the temporary folder is renamed to NAME (one atomic rename);
  - NAME exists, Linux with renameat2(RENAME_EXCHANGE) (ext4, xfs, btrfs, tmpfs...): the two folders are swapped in
    one atomic step, and the old content, now at the temporary name, is deleted;
  - elsewhere: NAME is renamed to `.NAME.moekern-old-XXXX`, the temporary folder to NAME, and the old one deleted.
SIGTERM and SIGINT that arrive during these renames are held until they are done. Guarantee: if the writing process
is killed at any point, SIGKILL included, NAME holds either the complete earlier content or the complete new
content. The one exception is the fallback's window between its two renames, where NAME is absent and the complete
earlier content is `.NAME.moekern-old-XXXX`: the next writer of NAME, and moekern.load(NAME) (through recover()),
rename it back before anything else. Whatever hidden `.NAME.moekern-tmp-*` / `-old-*` folder a kill leaves is
deleted by the next writer of NAME, under the lock. The data are fsynced before the rename and the parent folder
after it, so the same should hold after a power cut on a journaling filesystem; that is not tested.

A RUNS folder is never replaced: its records are appended line by line (moekern.bench.records, which also cuts off a
line torn by a kill), so a kill loses at most the line being written.

Reading weights: check_shards() checks every *.safetensors shard of a folder (its header, and that the file holds
all the bytes the header promises) before anything reads it, and check_finite() finds NaN/inf in tensors with one
min/max reduction each, at memory speed.
"""

import contextlib
import ctypes
import errno
import fcntl
import json
import os
import shutil
import signal
import socket
import struct
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from moekern.errors import MoekernError

MODEL, RUNS = "model", "runs"
KIND_NAMES = {MODEL: "model folder (moekern.save, moekern compress)",
              RUNS: "run folder (moekern bench, eval, paper, report)"}
MARKER = ".moekern-output.json"  # {"kind": ..., "moekern": version, "written": time, "command": ...}
EXCHANGE = True  # swap with renameat2(RENAME_EXCHANGE) where the system can; False forces the two-rename fallback

# Called with the name of each step of a save ("claimed", "writing", "written", "sealed", "old-moved", "swapped",
# "cleaned"); the fault-injection test kills the process there. None in normal use.
on_step: Callable[[str], None] | None = None


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like SIGINT's KeyboardInterrupt so that the same cleanup runs; the CLI exits 128 + signum."""

    def __init__(self, signum: int = signal.SIGTERM):
        super().__init__(f"terminated by signal {signum}")
        self.signum = signum


def _step(name: str) -> None:
    if on_step is not None:
        on_step(name)


# ----------------------------------------------------------------------------------------------------------------------
# Signals: SIGTERM unwinds like SIGINT, and neither interrupts a swap
# ----------------------------------------------------------------------------------------------------------------------
_critical_depth = 0
_pending: list[int] = []


def _on_signal(signum, frame):
    if _critical_depth:
        _pending.append(signum)  # raised when the critical section ends
        return
    raise KeyboardInterrupt() if signum == signal.SIGINT else Terminated(signum)


@contextlib.contextmanager
def interruptible():
    """SIGTERM raises Terminated (and SIGINT KeyboardInterrupt) in the main thread while the block runs, so `finally`
    clauses clean up; handlers someone else installed are left alone. Nested uses are harmless."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    defaults = {signal.SIGTERM: signal.SIG_DFL, signal.SIGINT: signal.default_int_handler}
    previous = {}
    for signum, default in defaults.items():
        if signal.getsignal(signum) is default:
            previous[signum] = signal.signal(signum, _on_signal)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


@contextlib.contextmanager
def _critical():
    """SIGTERM/SIGINT that arrive inside are held until it ends, then raised (whichever thread the kernel chose: the
    Python handler always runs in the main thread)."""
    global _critical_depth
    _critical_depth += 1
    try:
        yield
    finally:
        _critical_depth -= 1
        if not _critical_depth and _pending:
            signum = _pending[0]
            _pending.clear()
            raise KeyboardInterrupt() if signum == signal.SIGINT else Terminated(signum)


# ----------------------------------------------------------------------------------------------------------------------
# The output rule
# ----------------------------------------------------------------------------------------------------------------------
_held: set[Path] = set()  # targets this process has claimed: a nested claim (the CLI's, then save's) shares the lock


@contextlib.contextmanager
def claim(path: str | Path, kind: str, *, overwrite: bool = False, sources: Iterable = (),
          command: str | None = None):
    """Check `path` against the output rule for an output of `kind` and hold its lock while the block runs; yields
    the target's real path. Raises MoekernError before anything is written if the rule refuses it."""
    if kind not in KIND_NAMES:
        raise ValueError(f"kind must be {MODEL!r} or {RUNS!r}, got {kind!r}")
    target, shown = _target(path)
    _refuse_protected(target, shown, sources)
    if target in _held:
        _check_contents(target, shown, kind, overwrite)
        yield target
        return
    made = _make_parent(target, shown)
    try:
        lock = _Lock(target, shown, command)
    except MoekernError:
        _unmake(made)
        raise
    _held.add(target)
    new_folder = False  # whether this run makes the folder (then a RUNS folder gets MARKER at the end)
    try:
        with interruptible():
            _clean_leftovers(target)
            _check_contents(target, shown, kind, overwrite)
            _check_writable(target, shown, kind)
            new_folder = not target.exists() or not any(target.iterdir())
            _step("claimed")
            yield target
    finally:
        _held.discard(target)
        if kind == RUNS and new_folder and target.is_dir() and not (target / MARKER).exists():
            with contextlib.suppress(OSError):  # a run folder moekern made: mark it (its records also say so)
                _write_marker(target, kind, command)
        lock.release()
        if not target.exists():
            _unmake(made)  # a run that wrote nothing leaves no empty parent folders either


@contextlib.contextmanager
def replaced_folder(path: str | Path, kind: str = MODEL, *, overwrite: bool = False, sources: Iterable = (),
                    command: str | None = None):
    """Yield an empty temporary folder beside `path`; when the block ends without error it becomes `path` (see the
    module doc for the guarantee), otherwise it is removed. `path` is claimed first (claim())."""
    with claim(path, kind, overwrite=overwrite, sources=sources, command=command) as target:
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.moekern-tmp-", dir=target.parent))
        try:
            _step("writing")
            yield tmp
            _step("written")
            _seal(tmp, kind, command)
            _step("sealed")
            with _critical():
                try:
                    _swap(tmp, target)
                except OSError as exc:
                    raise MoekernError(f"could not put the new {str(path)!r} in place: {exc}") from exc
                _remove(tmp)  # after an exchange it holds the earlier content
            _step("cleaned")
        finally:
            with _critical():
                _remove(tmp)


def output_kind(folder: Path) -> str | None:
    """MODEL or RUNS if `folder` is a moekern output of that kind (module doc), else None."""
    marker = folder / MARKER
    if marker.is_file():
        try:
            kind = json.loads(marker.read_text()).get("kind")
        except (OSError, ValueError, AttributeError):
            kind = None
        return kind if kind in KIND_NAMES else None
    try:
        config = json.loads((folder / "config.json").read_text())
        if isinstance(config, dict) and isinstance(config.get("moekern"), dict):
            return MODEL
    except (OSError, ValueError):
        pass
    records = sorted(folder.glob("*.jsonl"))
    if records and all(_starts_with_a_record(p) for p in records):
        return RUNS
    return None


def _starts_with_a_record(path: Path) -> bool:
    try:
        with path.open("rb") as f:
            first = json.loads(f.readline())
    except (OSError, ValueError):
        return False
    return isinstance(first, dict) and isinstance(first.get("kind"), str) and "run" in first


def _target(path) -> tuple[Path, str]:
    if not isinstance(path, (str, os.PathLike)) or not str(path):
        raise MoekernError(f"the output folder must be a path, got {path!r}")
    return Path(path).expanduser().resolve(), str(path)


def _refuse_protected(target: Path, shown: str, sources: Iterable) -> None:
    cwd = Path.cwd().resolve()
    if target == cwd or target in cwd.parents:
        where = "the current directory" if target == cwd else "a parent of the current directory"
        raise MoekernError(f"{shown!r} is {where}: moekern never writes over it. Give a new folder, e.g. "
                           f"{os.path.join(shown, 'out')!r}")
    package = Path(__file__).resolve().parent
    if target == package or package in target.parents or target in package.parents:
        raise MoekernError(f"{shown!r} is in or above moekern's own package ({package}), which holds the shipped "
                           f"model: write somewhere else")
    for source in sources:
        if source is None or not str(source):
            continue
        source_path = Path(source).expanduser()
        if not source_path.exists():
            continue
        source_path = source_path.resolve()
        if target == source_path or target in source_path.parents:
            what = "is the source model" if target == source_path else "holds the source model"
            raise MoekernError(f"{shown!r} {what} ({source_path}): moekern never modifies its input. "
                               f"Write to a new folder")


def _make_parent(target: Path, shown: str) -> list[Path]:
    """Create the target's missing parent folders; returns those it made, deepest first."""
    made = [p for p in [target.parent, *target.parent.parents] if not p.exists()]
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise MoekernError(f"cannot create the folder {str(target.parent)!r} for {shown!r}: "
                           f"{exc.strerror or exc}") from exc
    return made


def _unmake(made: list[Path]) -> None:
    for folder in made:
        try:
            folder.rmdir()
        except OSError:
            return  # not empty (someone else put something there): keep it and its parents


def _check_contents(target: Path, shown: str, kind: str, overwrite: bool) -> None:
    if not target.exists():
        return
    if not target.is_dir():
        raise MoekernError(f"{shown!r} is a file, not a folder: moekern will not replace it. Give a folder path")
    entries = sorted(os.listdir(target))
    if not entries:
        return
    found = output_kind(target)
    if found is None and kind == RUNS and _holds_only_outputs(target, entries):
        return  # a folder of moekern's outputs (moekern-runs/ after `moekern paper --out moekern-runs/paper`)
    if found is None:
        listed = ", ".join(entries[:4]) + (f" and {len(entries) - 4} more" if len(entries) > 4 else "")
        raise MoekernError(f"{shown!r} already exists and holds files moekern did not write ({listed}); moekern "
                           f"never deletes what it did not create. Give a new or empty folder")
    if found != kind:
        raise MoekernError(f"{shown!r} is a moekern {KIND_NAMES[found]}, not a {KIND_NAMES[kind]}: give another "
                           f"folder")
    if kind == MODEL and not overwrite:
        raise MoekernError(f"{shown!r} already holds a moekern model; pass --overwrite (overwrite=True in Python) to "
                           f"replace it, or give a new folder")


def _holds_only_outputs(target: Path, entries: list[str]) -> bool:
    """Whether every entry of `target` is a moekern output folder, or a lock or leftover that moekern keeps beside
    one (hidden, named .NAME.moekern-...)."""
    return all((name.startswith(".") and ".moekern-" in name) or
               ((target / name).is_dir() and output_kind(target / name) is not None) for name in entries)


def _check_writable(target: Path, shown: str, kind: str) -> None:
    """What the end of the run will need, checked now (the lock file already proved the parent writable)."""
    if not target.exists():
        return
    if kind == MODEL:  # replacing it deletes every folder in it
        for folder, _, _ in os.walk(target):
            if not os.access(folder, os.W_OK | os.X_OK):
                raise MoekernError(f"{shown!r} cannot be replaced: {folder!r} is not writable (permission denied)")
    else:
        if not os.access(target, os.W_OK | os.X_OK):
            raise MoekernError(f"cannot write in {shown!r}: permission denied")
        for file in target.glob("*.jsonl"):
            if not os.access(file, os.W_OK):
                raise MoekernError(f"cannot append to {str(file)!r}: permission denied")


def _leftovers(target: Path) -> tuple[list[Path], list[Path]]:
    """The hidden temporary and earlier-content folders that writes of `target` may have left."""
    prefix = f".{target.name}.moekern-"
    tmp, old = [], []
    for name in os.listdir(target.parent):
        if name.startswith(prefix + "tmp-"):
            tmp.append(target.parent / name)
        elif name.startswith(prefix + "old-"):
            old.append(target.parent / name)
    return tmp, old


def _clean_leftovers(target: Path) -> None:
    """Under the lock: put back the earlier content a killed fallback swap left aside, delete the rest."""
    tmp, old = _leftovers(target)
    if old and not os.path.lexists(target):
        newest = max(old, key=lambda p: p.stat().st_mtime)
        os.rename(newest, target)
        _fsync_dir(target.parent)
        old.remove(newest)
    for leftover in tmp + old:
        _remove(leftover)


def recover(path: str | Path) -> bool:
    """If a killed save left `path` absent with its earlier content aside (module doc), put it back; True if it did.
    moekern.load calls it for a folder that does not exist."""
    target, shown = _target(path)
    if os.path.lexists(target) or not target.parent.is_dir() or not _leftovers(target)[1]:
        return False
    lock = _Lock(target, shown, None)
    try:
        _clean_leftovers(target)
    finally:
        lock.release()
    return os.path.lexists(target)


# ----------------------------------------------------------------------------------------------------------------------
# The lock
# ----------------------------------------------------------------------------------------------------------------------
class _Lock:
    """flock(2) on `.NAME.moekern-lock` beside the target, taken without waiting; the file names its holder."""

    def __init__(self, target: Path, shown: str, command: str | None):
        self.path = target.parent / f".{target.name}.moekern-lock"
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
            except OSError as exc:
                raise MoekernError(f"cannot write in {str(target.parent)!r} (for {shown!r}): "
                                   f"{exc.strerror or exc}") from exc
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _holder(fd)
                os.close(fd)
                raise MoekernError(f"{shown!r} is being written by another moekern process ({holder}); wait for it "
                                   f"to finish, or write elsewhere") from None
            # Its previous holder may have unlinked the file between our open and our flock: lock the new one then.
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        self.fd = fd
        info = {"pid": os.getpid(), "host": socket.gethostname(), "command": command or _command(),
                "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.write(fd, (json.dumps(info) + "\n").encode())

    def release(self) -> None:
        with contextlib.suppress(OSError):
            os.unlink(self.path)  # while still holding it: a waiting process then locks a new file
        os.close(self.fd)


def _holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0))
        return f"pid {info['pid']} on {info['host']}: `{info['command']}`, since {info['since']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "its lock file is being written"


def _command() -> str:
    return " ".join([Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "python", *sys.argv[1:]])


# ----------------------------------------------------------------------------------------------------------------------
# Writing: modes, the marker, durability, the swap
# ----------------------------------------------------------------------------------------------------------------------
def umask() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    current = os.umask(0o022)  # no /proc: read it by setting it (briefly racy with other threads creating files)
    os.umask(current)
    return current


def _seal(tmp: Path, kind: str, command: str | None) -> None:
    """Umask modes on everything written into tmp, every file fsynced, then MARKER written last."""
    mask = umask()
    for folder, _, files in os.walk(tmp):
        os.chmod(folder, 0o777 & ~mask)
        for name in files:
            file = os.path.join(folder, name)
            if os.path.islink(file):
                continue
            os.chmod(file, 0o666 & ~mask)
            _fsync_file(file)
    _write_marker(tmp, kind, command)
    for folder, _, _ in os.walk(tmp):
        _fsync_dir(folder)


def _write_marker(folder: Path, kind: str, command: str | None) -> None:
    from moekern.version import __version__

    marker = folder / MARKER
    marker.write_text(json.dumps({"kind": kind, "moekern": __version__, "written": time.strftime("%Y-%m-%dT%H:%M:%S"),
                                  "command": command or _command()}, indent=2) + "\n")
    os.chmod(marker, 0o666 & ~umask())
    _fsync_file(marker)


def _swap(tmp: Path, target: Path) -> None:
    if not os.path.lexists(target):
        os.rename(tmp, target)
    elif not (EXCHANGE and _exchange(tmp, target)):
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.moekern-old-", dir=target.parent))
        os.rename(target, old)  # onto the empty folder mkdtemp made: a name nobody else can take
        _step("old-moved")
        os.rename(tmp, target)
        _fsync_dir(target.parent)
        _step("swapped")
        _remove(old)
        return
    _fsync_dir(target.parent)
    _step("swapped")


_renameat2 = None


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux renameat2 with RENAME_EXCHANGE); False where that is not possible."""
    global _renameat2
    if _renameat2 is None:
        try:
            _renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
        except (OSError, AttributeError):
            _renameat2 = False
    if _renameat2 is False:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if _renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False  # the filesystem (or kernel) cannot exchange: fall back to two renames
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def _remove(path: Path) -> None:
    if os.path.islink(path) or os.path.isfile(path):
        os.unlink(path)
    elif os.path.lexists(path):
        shutil.rmtree(path, ignore_errors=True)


def _fsync_file(path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems cannot fsync a folder; the rename itself is still atomic
    finally:
        os.close(fd)


def write_file(path: str | Path, text: str) -> Path:
    """Write one file atomically (a temporary file beside it, renamed over it), with the umask's mode."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise MoekernError(f"{str(path)!r} is a folder; give a file name")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.moekern-tmp-", dir=path.parent)
    except OSError as exc:
        raise MoekernError(f"cannot write {str(path)!r}: {exc.strerror or exc}") from exc
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~umask())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


# ----------------------------------------------------------------------------------------------------------------------
# Reading weights
# ----------------------------------------------------------------------------------------------------------------------
INDEX = "model.safetensors.index.json"
_DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1, "I16": 2, "U16": 2, "F16": 2,
                "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8, "C64": 8}
_MAX_HEADER = 100_000_000  # safetensors' own limit


def shard_names(folder: Path) -> list[str]:
    """The weight shards of a folder: those its index lists, else every *.safetensors file."""
    index = folder / INDEX
    if not index.exists():
        return sorted(p.name for p in folder.glob("*.safetensors"))
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        names = sorted(set(weight_map.values()))
        if not all(isinstance(n, str) and n for n in names):
            raise TypeError("a shard name is not a string")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise MoekernError(f"{str(index)!r} is not a valid shard index ({type(exc).__name__}: {exc}); the "
                           f"checkpoint is corrupt") from exc
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        raise MoekernError(f"weight shard {missing[0]!r} listed in {INDEX} is missing from {str(folder)!r}"
                           + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    return names


def check_shards(folder: str | Path) -> list[Path]:
    """Every weight shard of `folder`, each checked without reading its tensors: not empty, a readable header, and
    exactly the bytes its header promises (a truncated copy or download fails here, with its name)."""
    folder = Path(folder)
    return [_check_shard(folder / name) for name in shard_names(folder)]


def _check_shard(path: Path) -> Path:
    def corrupt(why: str) -> MoekernError:
        return MoekernError(f"weight shard {str(path)!r} is corrupt or truncated ({why}); the file is damaged or was "
                            f"not copied completely: copy or download it again")

    size = path.stat().st_size
    if size == 0:
        raise corrupt("empty: 0 bytes")
    if size < 8:
        raise corrupt(f"{size} bytes, shorter than a header")
    with path.open("rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        if length > min(_MAX_HEADER, size - 8):
            raise corrupt(f"its header claims {length:,} bytes in a file of {size:,}")
        try:
            header = json.loads(f.read(length))
        except (ValueError, UnicodeDecodeError):
            raise corrupt("its header is not JSON") from None
    if not isinstance(header, dict):
        raise corrupt("its header is not a JSON object")
    end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            start, stop = entry["data_offsets"]
            count = 1
            for dim in entry["shape"]:
                count *= int(dim)
            ok = 0 <= start <= stop and stop - start == count * _DTYPE_BYTES.get(entry["dtype"], stop - start)
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise corrupt(f"its header entry for {name!r} is malformed")
        end = max(end, stop)
    expected = 8 + length + end
    if size < expected:
        raise corrupt(f"{size:,} bytes, its header needs {expected:,}")
    if size > expected:
        raise corrupt(f"{size - expected:,} bytes after its last tensor")
    return path


def check_finite(named_tensors: Iterable, where: str,
                 hint: str = "is the file damaged? copy or download it again") -> None:
    """Raise MoekernError naming the first floating-point tensor that holds NaN or inf. One aminmax reduction per
    tensor (NaN and inf show in the min or max), at memory speed: ~10 GB/s per CPU core here."""
    import torch

    for name, tensor in named_tensors:
        if not tensor.is_floating_point() or tensor.numel() == 0 or tensor.is_meta:
            continue
        data = tensor.detach()
        if data.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
            data = data.float()
        low, high = torch.aminmax(data)
        if bool(torch.isfinite(low)) and bool(torch.isfinite(high)):
            continue
        bad = int((~torch.isfinite(data)).sum())  # only on failure: the count for the message
        raise MoekernError(f"{where}: tensor {name!r} holds {bad:,} non-finite value{'s' * (bad != 1)} (NaN or inf) "
                           f"of {data.numel():,}; moekern will not use it ({hint})")
