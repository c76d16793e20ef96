"""Document sources: stream documents from text files, JSONL, Parquet, saved HF datasets, or
the Python standard library that ships with the running interpreter.

    from plinth.data.sources import open_source
    for doc in open_source(SourceConfig(kind="stdlib_docs"), max_doc_bytes=16_000_000):
        print(doc.ref, doc.reason or len(doc.text))

Every reader is a generator that holds at most one document (or one Parquet/Arrow batch) in
memory, so corpora larger than memory stream through. Bad input never raises: it comes out as
a `RawDoc` with `text=None` and a `reason` (empty_file, binary, not_utf8, invalid_json,
missing_field, field_not_text, too_large, no_files, missing_path, unreadable, unparsable,
no_docstrings, blank_line; and, for entries never opened, fifo, device, socket, symlink_loop,
broken_symlink, permission_denied, unlistable_dir: see plinth.data.paths) that
the pipeline counts in the manifest and reports with the file (and line) it came from.
"""

from __future__ import annotations

import ast
import gzip
import hashlib
import io
import json
import os
import sys
import sysconfig
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from plinth.data.paths import NotRegularFile, Scan, open_regular, scan_files
from plinth.errors import UsageError

DEFAULT_PATTERNS = {
    "text": ("*.txt", "*.md", "*.rst", "*.txt.gz", "*.md.gz"),
    "jsonl": ("*.jsonl", "*.json", "*.jsonl.gz", "*.json.gz"),
    "parquet": ("*.parquet",),
}
# stdlib directories that hold test suites and test data (deliberately broken files), not
# library code; third-party packages are not the standard library
# tests are not library code; encodings/ is ~120 generated charmap tables (hex rows), which
# teach a small model to print hex instead of Python
STDLIB_SKIP_DIRS = frozenset(
    {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "encodings"}
)
# counted in the manifest like every reason, but normal enough not to warn about one by one
QUIET_REASONS = frozenset({"no_docstrings", "blank_line"})
_BINARY_PROBE = 8192
_BATCH = 1024


@dataclass
class RawDoc:
    """One document as read, or a record of why a piece of input yielded no document."""

    ref: str  # where it came from: a path, path:line, path#row
    text: str | None
    reason: str | None = None  # bad-input reason when text is None
    detail: str = ""  # one line for the user about what was wrong and what to do
    nbytes: int = 0  # UTF-8 size of text (or of the rejected input, when known)
    transform: str | None = None  # "docstrings:<module>": text is Python source to turn into
    # prose; done by `apply_transform` in the worker processes, where the CPU time is


def apply_transform(doc: RawDoc) -> RawDoc:
    """Run a deferred transform (CPU-heavy parsing) and return the final document."""
    if doc.transform is None or doc.text is None:
        return doc
    kind, _, module = doc.transform.partition(":")
    assert kind == "docstrings", doc.transform
    try:
        text = module_docstrings(doc.text, module)
    except (SyntaxError, ValueError, RecursionError) as e:
        return RawDoc(doc.ref, None, "unparsable", f"cannot parse as Python: {e}", doc.nbytes)
    if not text:
        return RawDoc(doc.ref, None, "no_docstrings", "module has no docstrings", doc.nbytes)
    return RawDoc(doc.ref, text, nbytes=len(text.encode("utf-8", "surrogatepass")))


def source_names(sources) -> list[str]:
    """Unique display names: the configured name, else kind (+ file stem), de-duplicated."""
    names: list[str] = []
    for src in sources:
        base = src.name or (
            f"{src.kind}:{Path(src.path.rstrip('/')).name}" if src.path else src.kind
        )
        name, k = base, 2
        while name in names:
            name, k = f"{base}#{k}", k + 1
        names.append(name)
    return names


def check_source_config(src, where: str) -> None:
    """Config problems a reader cannot work around (missing path, missing extra)."""
    if src.kind in ("text", "jsonl", "parquet", "hf_disk") and not src.path:
        raise UsageError(
            f"{where}.path is required for kind={src.kind}: give a file, directory or glob "
            f"(e.g. {where}.path=corpus/)."
        )
    for key in ("path", "pattern"):
        value = getattr(src, key, None)
        if value and "\x00" in value:
            raise UsageError(
                f"{where}.{key} contains a NUL character, which no file name can hold: "
                f"{value[:200]!r}. Give the path of a file, directory or glob."
            )
    if src.pattern is not None and not src.pattern.strip("/"):
        raise UsageError(
            f"{where}.pattern={src.pattern!r} matches no file name; give a glob such as "
            "'*.txt' or '**/*.md' (or leave it unset for the kind's defaults)."
        )
    needs = {"parquet": "pyarrow", "hf_disk": "datasets"}.get(src.kind)
    if needs:
        try:
            __import__(needs)
        except ImportError:
            raise UsageError(
                f"{where}.kind={src.kind} needs the `{needs}` package: pip install "
                f"'plinth[hf]' (or pip install {needs})."
            ) from None


def open_source(src, max_doc_bytes: int = 16_000_000) -> Iterator[RawDoc]:
    """Stream the documents of one `SourceConfig` in a deterministic order."""
    if src.kind == "stdlib_code":
        return _stdlib_code(max_doc_bytes)
    if src.kind == "stdlib_docs":
        return _stdlib_docs(max_doc_bytes)
    if src.kind == "hf_disk":
        return _hf_disk(src.path, src.text_field, max_doc_bytes)
    return _files_source(src, max_doc_bytes)


# ----------------------------------------------------------------------------- file listing


def scan_source(src) -> Scan:
    """Files a text/jsonl/parquet source reads (sorted) and the entries it skips unopened
    (FIFOs, devices, sockets, symlink loops, broken links, unlistable directories)."""
    patterns = (src.pattern,) if src.pattern else DEFAULT_PATTERNS[src.kind]
    return scan_files(src.path, patterns)


def list_files(src) -> list[Path]:
    """Files a text/jsonl/parquet source reads, sorted; a missing path gives []."""
    return scan_source(src).files


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files() -> list[Path]:
    root = stdlib_dir()
    out = []
    for dirpath, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in STDLIB_SKIP_DIRS and not d.startswith("."))
        out.extend(Path(dirpath) / f for f in sorted(files) if f.endswith(".py"))
    return out


def stat_signature(src) -> str:
    """A cheap fingerprint of a source's inputs (names, sizes, modification times) used to
    decide whether a prepared dataset is still current without reading every byte."""
    h = hashlib.sha256()
    if src.kind.startswith("stdlib"):
        h.update(f"{sys.version}|{stdlib_dir()}".encode())
        files = stdlib_files()
    elif src.kind == "hf_disk":
        root = Path(src.path)
        files = sorted(f for f in root.rglob("*") if f.is_file()) if root.exists() else []
    else:
        scan = scan_source(src)
        files = scan.files
        for skip in scan.skipped:
            h.update(f"{skip.path}|{skip.reason}\n".encode())
    for f in files:
        try:
            st = f.stat()
        except OSError:
            continue
        h.update(f"{f}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------------- decoding


def decode_bytes(data: bytes, ref: str) -> RawDoc:
    """Bytes -> RawDoc: empty, binary (NUL bytes) and non-UTF-8 input become reasons."""
    if not data.strip():
        return RawDoc(ref, None, "empty_file", "file is empty or whitespace only", len(data))
    if b"\x00" in data[:_BINARY_PROBE]:
        return RawDoc(ref, None, "binary", "contains NUL bytes: looks binary, skipped", len(data))
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        return RawDoc(
            ref,
            None,
            "not_utf8",
            f"not UTF-8 (invalid byte at offset {e.start}); re-encode it as UTF-8",
            len(data),
        )
    return RawDoc(ref, text.removeprefix("\ufeff"), nbytes=len(data))


def _open_binary(path: Path) -> io.BufferedIOBase:
    """A regular file (NotRegularFile for FIFOs, devices, ...: never blocks), gunzipped."""
    f = open_regular(path)
    if path.suffix != ".gz":
        return f
    g = gzip.GzipFile(fileobj=f, mode="rb")
    g.myfileobj = f  # closed with the GzipFile (as when gzip opens the file itself)
    return g


def _read_limited(path: Path, limit: int) -> tuple[bytes | None, str | None]:
    """Whole file, unless it is larger than `limit` (then nothing is read into memory)."""
    f = _open_binary(path)
    with f:
        size = os.fstat(f.fileno()).st_size if path.suffix != ".gz" else 0
        if size > limit:
            return None, f"{size:,} bytes, over data.max_doc_bytes={limit:,}"
        data = f.read(limit + 1)
    if len(data) > limit:
        return None, f"over data.max_doc_bytes={limit:,} bytes once decompressed"
    return data, None


def _read_doc_file(path: Path, ref: str, limit: int) -> RawDoc:
    try:
        data, too_large = _read_limited(path, limit)
    except NotRegularFile as e:
        return RawDoc(ref, None, e.reason, e.detail)
    except (OSError, EOFError, gzip.BadGzipFile, zlib.error) as e:
        return RawDoc(ref, None, "unreadable", f"cannot read: {e}")
    if data is None:
        return RawDoc(ref, None, "too_large", f"{too_large}; skipped unread")
    return decode_bytes(data, ref)


# ------------------------------------------------------------------------------ file sources


def _files_source(src, limit: int) -> Iterator[RawDoc]:
    scan = scan_source(src)
    for skip in scan.skipped:
        yield RawDoc(skip.path, None, skip.reason, skip.detail)
    files = scan.files
    if not files and scan.skipped:
        return
    if not files:
        p = Path(src.path)
        if p.is_dir():
            pats = src.pattern or ", ".join(DEFAULT_PATTERNS[src.kind])
            yield RawDoc(
                src.path,
                None,
                "no_files",
                f"directory has no files matching {pats}; set the source's `pattern` "
                "(e.g. pattern='*.py') or point `path` at the files",
            )
        else:
            yield RawDoc(src.path, None, "missing_path", "no such file, directory or glob match")
        return
    for f in files:
        if src.kind == "text":
            yield _read_doc_file(f, str(f), limit)
        elif src.kind == "jsonl":
            yield from _jsonl_file(f, src.text_field, limit)
        else:
            yield from _parquet_file(f, src.text_field, limit)


def _jsonl_file(path: Path, field: str, limit: int) -> Iterator[RawDoc]:
    try:
        f = _open_binary(path)
        head = f.peek(_BINARY_PROBE)[:_BINARY_PROBE] if hasattr(f, "peek") else b""
    except NotRegularFile as e:
        yield RawDoc(str(path), None, e.reason, e.detail)
        return
    except (OSError, EOFError, zlib.error) as e:
        yield RawDoc(str(path), None, "unreadable", f"cannot open: {e}")
        return
    with f:
        if b"\x00" in head:
            yield RawDoc(str(path), None, "binary", "contains NUL bytes: not a JSONL text file")
            return
        lineno, any_line = 0, False
        while True:
            try:
                line = f.readline(limit + 1)
            except (OSError, EOFError, zlib.error) as e:
                yield RawDoc(f"{path}:{lineno + 1}", None, "unreadable", f"read failed: {e}")
                return
            if not line:
                break
            lineno += 1
            any_line = True
            ref = f"{path}:{lineno}"
            if len(line) > limit and not line.endswith(b"\n"):
                size = len(line)
                while chunk := f.readline(1 << 20):  # skip the rest of the line, 1 MB at a time
                    size += len(chunk)
                    if chunk.endswith(b"\n"):
                        break
                yield RawDoc(
                    ref,
                    None,
                    "too_large",
                    f"line of {size:,} bytes is over data.max_doc_bytes={limit:,}; skipped",
                    size,
                )
                continue
            if not line.strip():
                yield RawDoc(ref, None, "blank_line", "blank line", len(line))
                continue
            try:
                record = json.loads(line)
            except UnicodeDecodeError:
                yield RawDoc(ref, None, "not_utf8", "line is not UTF-8", len(line))
                continue
            except ValueError as e:
                where = f"{e.msg} at column {e.colno}" if hasattr(e, "msg") else str(e)[:200]
                yield RawDoc(ref, None, "invalid_json", f"not JSON ({where})")
                continue
            except RecursionError:
                yield RawDoc(ref, None, "invalid_json", "JSON nested too deeply to read")
                continue
            yield _record_text(record, field, ref, len(line))
        if not any_line:
            yield RawDoc(str(path), None, "empty_file", "file is empty")


def _record_text(record, field: str, ref: str, nbytes: int) -> RawDoc:
    if not isinstance(record, dict) or field not in record or record[field] is None:
        keys = list(record)[:8] if isinstance(record, dict) else type(record).__name__
        return RawDoc(
            ref,
            None,
            "missing_field",
            f"record has no '{field}' field (has {keys}); set the source's text_field",
            nbytes,
        )
    text = record[field]
    if not isinstance(text, str):
        return RawDoc(
            ref,
            None,
            "field_not_text",
            f"'{field}' is a {type(text).__name__}, not a string",
            nbytes,
        )
    if not text.strip():
        return RawDoc(ref, None, "empty", f"'{field}' is empty", nbytes)
    return _unicode_doc(ref, text, field)


def _unicode_doc(ref: str, text: str, field: str) -> RawDoc:
    """A document of valid Unicode: JSON `\\ud800` escapes and Arrow strings can carry lone
    surrogates, which no UTF-8 encoder (the text store, the tokenizer) accepts."""
    try:
        return RawDoc(ref, text, nbytes=len(text.encode("utf-8")))
    except UnicodeEncodeError as e:
        return RawDoc(
            ref,
            None,
            "not_utf8",
            f"'{field}' holds a lone surrogate at character {e.start} (e.g. a \\ud800 escape); "
            "not valid Unicode text",
            len(text),
        )


def _parquet_file(path: Path, field: str, limit: int) -> Iterator[RawDoc]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for corrupt files
        yield RawDoc(str(path), None, "unreadable", f"not a readable Parquet file: {e}")
        return
    names = pf.schema_arrow.names
    if field not in names:
        yield RawDoc(
            str(path),
            None,
            "missing_field",
            f"no column '{field}' (columns: {names[:8]}); set the source's text_field",
        )
        return
    row = 0
    batches = pf.iter_batches(batch_size=_BATCH, columns=[field])
    for batch in _guarded(batches):
        if isinstance(batch, RawDoc):
            batch.ref = f"{path}#{row}"
            yield batch
            return
        for value in batch.column(0).to_pylist():
            yield _column_value(value, field, f"{path}#{row}", limit)
            row += 1


def _guarded(batches) -> Iterator:
    """The batches of a columnar reader; a read error (a corrupt page past a valid footer)
    ends them with one `unreadable` RawDoc instead of an exception."""
    while True:
        try:
            batch = next(batches, None)
        except Exception as e:  # pyarrow and datasets raise many types for corrupt data
            yield RawDoc("", None, "unreadable", f"read failed: {e}"[:300])  # ref: the caller
            return
        if batch is None:
            return
        yield batch


def _column_value(value, field: str, ref: str, limit: int) -> RawDoc:
    if value is None:
        return RawDoc(ref, None, "missing_field", f"'{field}' is null")
    if isinstance(value, bytes):
        if len(value) > limit:
            return RawDoc(ref, None, "too_large", f"{len(value):,} bytes", len(value))
        return decode_bytes(value, ref)
    if not isinstance(value, str):
        return RawDoc(ref, None, "field_not_text", f"'{field}' is a {type(value).__name__}")
    if len(value) > limit:  # characters >= bytes/4: a cheap first test before encoding
        n = len(value.encode("utf-8", "surrogatepass"))
        if n > limit:
            return RawDoc(ref, None, "too_large", f"{n:,} bytes, over max_doc_bytes", n)
    if not value.strip():
        return RawDoc(ref, None, "empty", f"'{field}' is empty")
    return _unicode_doc(ref, value, field)


def _hf_disk(path: str, field: str, limit: int) -> Iterator[RawDoc]:
    import datasets

    if not Path(path).exists():
        yield RawDoc(path, None, "missing_path", "no such directory")
        return
    try:
        loaded = datasets.load_from_disk(path)
    except Exception as e:  # FileNotFoundError, or datasets' own errors for non-dataset dirs
        yield RawDoc(
            path,
            None,
            "unreadable",
            f"not a dataset saved with datasets.save_to_disk ({type(e).__name__}: {e})",
        )
        return
    parts = (
        [(name, loaded[name]) for name in sorted(loaded)]
        if isinstance(loaded, datasets.DatasetDict)
        else [("", loaded)]
    )
    for split, ds in parts:
        prefix = f"{path}/{split}" if split else path
        if field not in ds.column_names:
            yield RawDoc(
                prefix,
                None,
                "missing_field",
                f"no column '{field}' (columns: {ds.column_names[:8]}); set the source's "
                "text_field",
            )
            continue
        row = 0
        batches = iter(ds.select_columns([field]).iter(batch_size=_BATCH))
        for batch in _guarded(batches):
            if isinstance(batch, RawDoc):
                batch.ref = f"{prefix}#{row}"
                yield batch
                break
            for value in batch[field]:
                yield _column_value(value, field, f"{prefix}#{row}", limit)
                row += 1


# ---------------------------------------------------------------------------------- stdlib


def _stdlib_code(limit: int) -> Iterator[RawDoc]:
    root = stdlib_dir()
    for f in stdlib_files():
        yield _read_doc_file(f, f"stdlib/{f.relative_to(root)}", limit)


def _stdlib_docs(limit: int) -> Iterator[RawDoc]:
    """pydoc's topic pages (the language reference as prose), then one document per module:
    its docstring and the docstrings of its public classes and functions, with signatures."""
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions strip pydoc_data
        topics = {}
    for name in sorted(topics):
        text = topics[name]
        yield RawDoc(f"pydoc_topics/{name}", text, nbytes=len(text.encode()))
    root = stdlib_dir()
    for f in stdlib_files():
        rel = f.relative_to(root)
        raw = _read_doc_file(f, f"stdlib_docs/{rel}", limit)
        if raw.text is None:
            yield raw
            continue
        parts = rel.with_suffix("").parts
        module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        raw.transform = f"docstrings:{module}"
        yield raw


def module_docstrings(source: str, module: str) -> str:
    """The docstrings of a module's source as one prose document (nothing is imported)."""
    tree = ast.parse(source)
    parts = []
    doc = ast.get_docstring(tree)
    if doc:
        parts.append(f"{module}\n\n{doc}")

    def visit(node, prefix: str) -> None:
        for child in node.body:
            if not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                continue
            if child.name.startswith("_") and child.name != "__init__":
                continue
            qual = f"{prefix}{child.name}"
            d = ast.get_docstring(child)
            if d:
                sig = "" if isinstance(child, ast.ClassDef) else f"({ast.unparse(child.args)})"
                kind = "class " if isinstance(child, ast.ClassDef) else ""
                parts.append(f"{kind}{qual}{sig}\n\n{d}")
            if isinstance(child, ast.ClassDef):
                visit(child, f"{qual}.")

    visit(tree, f"{module}.")
    return "\n\n\n".join(parts)
