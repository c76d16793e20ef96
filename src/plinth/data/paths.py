"""Finding and opening input files without hanging: only regular files are ever opened.

    scan = scan_files("corpus/", ("*.txt",))       # or a glob: "corpus/**/*.txt"
    scan.files    # regular files, sorted
    scan.skipped  # [Skipped(path, reason, detail)]: fifo, device, socket, symlink_loop,
                  # broken_symlink, permission_denied, unlistable_dir

Opening a FIFO blocks until a writer appears (forever, in a corpus directory); opening a
device can have side effects; a symlink loop under `**` multiplies paths without end. So
directories are walked without following symlinked directories, every candidate is
`stat`-ed before it is opened, and `open_regular` opens with O_NONBLOCK and checks again on
the open descriptor (a file swapped for a FIFO in between is still refused).
"""

from __future__ import annotations

import errno
import fnmatch
import io
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

_KINDS = (
    (stat.S_ISFIFO, "fifo", "a named pipe (FIFO), not a file: reading it would wait forever"),
    (stat.S_ISCHR, "device", "a character device, not a file"),
    (stat.S_ISBLK, "device", "a block device, not a file"),
    (stat.S_ISSOCK, "socket", "a socket, not a file"),
)


class NotRegularFile(OSError):
    """A path that is not a readable regular file; `reason` is the manifest's skip reason."""

    def __init__(self, path, reason: str, detail: str):
        super().__init__(f"{path}: {detail}")
        self.path, self.reason, self.detail = str(path), reason, detail


@dataclass(frozen=True)
class Skipped:
    path: str
    reason: str
    detail: str


@dataclass
class Scan:
    files: list[Path] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)


def _mode_problem(mode: int) -> tuple[str, str] | None:
    for test, reason, detail in _KINDS:
        if test(mode):
            return reason, detail
    if stat.S_ISDIR(mode):
        return "directory", "a directory where a file was expected"
    if not stat.S_ISREG(mode):
        return "not_a_file", "not a regular file"
    return None


def path_problem(path: str | Path) -> tuple[str, str] | None:
    """(reason, detail) when `path` is not a regular file that can be opened, else None.
    Nothing is opened. Missing paths give ("missing_path", ...)."""
    try:
        st = os.stat(path)
    except OSError as e:
        return _stat_error(path, e)
    return _mode_problem(st.st_mode)


def _stat_error(path, e: OSError) -> tuple[str, str]:
    if e.errno == errno.ELOOP:
        return "symlink_loop", "a symbolic link that loops back on itself; remove or fix it"
    if e.errno in (errno.ENOENT, errno.ENOTDIR) and os.path.islink(path):
        target = os.readlink(path)[:200]
        return "broken_symlink", f"a symbolic link to {target!r}, which does not exist"
    if e.errno == errno.ENOENT:
        return "missing_path", "no such file or directory"
    if e.errno == errno.EACCES:
        return "permission_denied", "permission denied; make it readable (chmod +r) or remove it"
    return "unreadable", f"cannot stat: {e.strerror}"


def open_regular(path: str | Path) -> io.BufferedReader:
    """Open a regular file for binary reading; NotRegularFile (an OSError) for anything else,
    without blocking on FIFOs or touching devices."""
    problem = path_problem(path)
    if problem is not None:
        raise NotRegularFile(path, *problem)
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0)
    try:
        fd = os.open(path, flags | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        reason, detail = _stat_error(path, e)
        raise NotRegularFile(path, reason, detail) from None
    try:
        problem = _mode_problem(os.fstat(fd).st_mode)
        if problem is not None:  # swapped between the stat and the open
            raise NotRegularFile(path, *problem)
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_regular(path: str | Path) -> bytes:
    """The whole of a regular file (NotRegularFile for FIFOs, devices, loops, ...)."""
    with open_regular(path) as f:
        return f.read()


# ------------------------------------------------------------------------------- listing


def scan_files(path: str, patterns: tuple[str, ...]) -> Scan:
    """The regular files `path` names: itself, the files under it matching `patterns`, or
    the matches of a glob (`*`, `?`, `[...]`, `**`). Hidden names are not matched (as with
    glob). Entries that match but are not regular files, and directories that cannot be
    listed, come back in `skipped`, never silently dropped. Symlinked directories are not
    followed; symlinked files are."""
    import glob

    if glob.has_magic(path):
        return _scan_glob(path)
    scan = Scan()
    p = Path(path)
    try:
        st = os.stat(p)
    except OSError as e:
        reason, detail = _stat_error(p, e)
        if reason != "missing_path":
            scan.skipped.append(Skipped(str(p), reason, detail))
        return scan
    if stat.S_ISDIR(st.st_mode):
        _walk(p, lambda rel: any(_match_name(rel, pat) for pat in patterns), scan)
    elif (problem := _mode_problem(st.st_mode)) is not None:
        scan.skipped.append(Skipped(str(p), *problem))
    else:
        scan.files.append(p)
    return scan


def _match_name(rel: tuple[str, ...], pat: str) -> bool:
    """rglob-style: a pattern without `/` matches the file name; with `/`, the path's end."""
    pparts = tuple(x for x in pat.split("/") if x)
    if not pparts or len(pparts) > len(rel):
        return False
    return all(_match_part(n, q) for n, q in zip(rel[-len(pparts) :], pparts, strict=True))


def _match_part(name: str, pat: str) -> bool:
    if name.startswith(".") and not pat.startswith("."):
        return False
    return fnmatch.fnmatchcase(name, pat)


def _match_glob(rel: tuple[str, ...], pparts: tuple[str, ...]) -> bool:
    """Whole-path glob match with `**` as zero or more directories."""
    if not pparts:
        return not rel
    head, rest = pparts[0], pparts[1:]
    if head == "**":
        return any(
            _match_glob(rel[i:], rest)
            for i in range(len(rel) + 1)
            if not any(n.startswith(".") for n in rel[:i])
        )
    return bool(rel) and _match_part(rel[0], head) and _match_glob(rel[1:], rest)


def _scan_glob(path: str) -> Scan:
    import glob

    parts = Path(path).parts
    k = next(i for i, part in enumerate(parts) if glob.has_magic(part))
    root = Path(*parts[:k]) if k else Path(".")
    pparts = tuple(parts[k:])
    scan = Scan()
    if not root.is_dir():
        return scan
    depth = None if "**" in pparts else len(pparts)  # bounded: only as deep as the pattern
    hidden = any(q.startswith(".") for q in pparts)
    _walk(root, lambda rel: _match_glob(rel, pparts), scan, depth, prune_hidden=not hidden)
    return scan


def _walk(
    root: Path, matches, scan: Scan, max_depth: int | None = None, prune_hidden: bool = True
) -> None:
    """Files under `root` whose relative parts satisfy `matches`; symlinked directories are
    not entered (so loops cannot multiply paths); unlistable directories are recorded."""
    found: list[Path] = []

    def onerror(e: OSError) -> None:
        where = e.filename or str(root)
        if e.errno == errno.EACCES:
            detail = "directory cannot be listed (permission denied); fix its permissions"
        else:
            detail = f"directory cannot be listed: {e.strerror}"
        scan.skipped.append(Skipped(str(where), "unlistable_dir", detail))

    for dirpath, dirs, files in os.walk(root, onerror=onerror, followlinks=False):
        rel_dir = Path(dirpath).relative_to(root).parts
        if max_depth is not None and len(rel_dir) >= max_depth - 1:
            dirs[:] = []
        else:
            dirs[:] = sorted(d for d in dirs if not (prune_hidden and d.startswith(".")))
        # symlinks to directories are listed in `dirs` and not entered; broken and looping
        # links are listed in `files`, where path_problem names them
        for name in files:
            rel = (*rel_dir, name)
            if not matches(rel):
                continue
            f = Path(dirpath) / name
            problem = path_problem(f)
            if problem is None:
                found.append(f)
            elif problem[0] != "directory":
                scan.skipped.append(Skipped(str(f), *problem))
    scan.files.extend(sorted(found))
    scan.skipped.sort(key=lambda s: s.path)
