"""SentencePiece tokenizer: reading documents, training, encoding.

Documents come from plain-text files, JSONL files (one JSON object per line, text under
`text_field`), or globs of either; `.gz` works for both. A plain-text file is cut into
documents by `text_unit`:

- "block" (default): blank-line-separated blocks (a speech of a play, a paragraph, a
  sonnet); the line breaks inside a block are kept;
- "file": the whole file is one document (leading and trailing blank lines removed);
- "line": every non-empty line is a document (line breaks never reach the tokenizer).

Text must be UTF-8: a bad line is a `TextError` naming file and line, or, with
`on_error="skip"`, skipped (left out of its block) and counted. Windows line ends become
"\n".

Training writes `<prefix>.model`, `<prefix>.vocab` and `<prefix>.json` (special ids,
vocab size, model type, sha256 of the .model file, the options used). The defaults make
`decode(encode(text)) == text` for any UTF-8 text: identity normalisation (no NFKC), no
dummy prefix, whitespace kept as it is (`remove_extra_whitespaces=False`), and byte
fallback for characters outside the vocabulary. Line breaks are text like any other:
documents keep them, so the trainer learns pieces for them ("\n", ".\n", "\n\n" on
verse), and byte fallback covers a line break the vocabulary lacks (`<0x0A>`); generated
text therefore has lines. Special ids are fixed: pad=0, unk=1, bos=2, eos=3.
"""
from __future__ import annotations

import glob
import gzip
import hashlib
import io
import json
import logging
import os
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Optional

import sentencepiece as spm

from moe_train.data.errors import TextError

log = logging.getLogger("moe_train.data")

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
TEXT_UNITS = ("block", "file", "line")
# SentencePiece skips training "sentences" longer than this (bytes); longer documents are
# fed to the trainer in pieces cut at line breaks (see `training_pieces`).
MAX_SENTENCE_BYTES = 1 << 16


@dataclass
class TextStats:
    """Counters of `iter_documents`: documents read and lines skipped (with why)."""

    documents: int = 0
    skipped_lines: int = 0
    skipped_examples: list = field(default_factory=list)

    def skip(self, err: TextError) -> None:
        self.skipped_lines += 1
        if len(self.skipped_examples) < 10:
            self.skipped_examples.append(str(err))
        log.warning("skipping bad input line: %s", err)


def expand_inputs(inputs: Iterable[str]) -> list[str]:
    """Expand globs and directories into a sorted, de-duplicated list of files.

    Raises:
        FileNotFoundError: an input matches no file.
    """
    files: list[str] = []
    for item in inputs:
        if os.path.isdir(item):
            matches = sorted(p for p in glob.glob(os.path.join(item, "**", "*"), recursive=True)
                             if os.path.isfile(p))
        elif any(c in item for c in "*?["):
            matches = sorted(glob.glob(item, recursive=True))
        else:
            matches = [item] if os.path.isfile(item) else []
        if not matches:
            raise FileNotFoundError(f"input {item!r} matches no file")
        files.extend(m for m in matches if m not in files)
    return files


def _open_binary(path: str):
    return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


def _is_jsonl(path: str) -> bool:
    base = path[:-3] if path.endswith(".gz") else path
    return base.endswith(".jsonl") or base.endswith(".json")


def iter_documents(files: list[str], text_field: str = "text", on_error: str = "raise",
                   stats: Optional[TextStats] = None, text_unit: str = "block") -> Iterator[str]:
    """The documents of text/JSONL files in a fixed order (file list order, then file order).

    Args:
        files: input files (see `expand_inputs`).
        text_field: JSONL key holding the document text.
        on_error: "raise" or "skip" for non-UTF-8 lines, bad JSON or a missing field.
        stats: counters to update (documents, skipped lines).
        text_unit: how a plain-text file is cut into documents: "block" (blank-line-
            separated blocks, line breaks kept), "file" or "line" (module docstring).
            JSONL files always give one document per object.

    Returns:
        An iterator of document strings (empty documents are left out).
    """
    if text_unit not in TEXT_UNITS:  # checked now, not at the first document
        raise ValueError(f"text_unit={text_unit!r}: must be one of {', '.join(TEXT_UNITS)}")
    return _documents(files, text_field, on_error, stats if stats is not None else TextStats(),
                      text_unit)


def _documents(files: list[str], text_field: str, on_error: str, stats: TextStats,
               text_unit: str) -> Iterator[str]:
    for path in files:
        jsonl = _is_jsonl(path)
        lines = _iter_lines(path, jsonl, text_field, on_error, stats)
        docs = lines if jsonl or text_unit == "line" else _join_lines(lines, text_unit)
        for text in docs:
            if text:
                stats.documents += 1
                yield text


def _iter_lines(path: str, jsonl: bool, text_field: str, on_error: str,
                stats: TextStats) -> Iterator[str]:
    """The decoded lines of a file (JSONL: each object's text), bad ones raised or skipped."""
    with _open_binary(path) as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                yield _parse_line(path, lineno, raw, jsonl, text_field)
            except TextError as err:
                if on_error != "skip":
                    raise
                stats.skip(err)


def _join_lines(lines: Iterable[str], text_unit: str) -> Iterator[str]:
    """Lines -> blocks (a blank or whitespace-only line ends one) or one whole file."""
    block: list[str] = []
    for line in lines:
        if text_unit == "block" and not line.strip():
            if block:
                yield "\n".join(block)
            block = []
        elif block or line.strip():  # "file": leading blank lines dropped, inner ones kept
            block.append(line)
    while block and not block[-1].strip():
        block.pop()
    if block:
        yield "\n".join(block)


def _parse_line(path: str, lineno: int, raw: bytes, jsonl: bool, text_field: str) -> str:
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise TextError(path, lineno, f"not valid UTF-8 (byte {exc.start} of the line: "
                                      f"{raw[exc.start:exc.start + 4]!r})") from None
    line = line.rstrip("\r\n") if not jsonl else line.strip()
    if not jsonl or not line:
        return line
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise TextError(path, lineno, f"invalid JSON: {exc.msg}") from None
    if not isinstance(obj, dict) or not isinstance(obj.get(text_field), str):
        raise TextError(path, lineno, f"no string field {text_field!r}")
    return obj[text_field]


def training_pieces(documents: Iterable[str], max_bytes: int = MAX_SENTENCE_BYTES) -> Iterator[str]:
    """Documents as SentencePiece training sentences: one longer than `max_bytes` (a
    whole play with `text_unit="file"`) is cut at line breaks (a longer line by
    characters) instead of being silently skipped by the trainer."""
    for doc in documents:
        if len(doc.encode("utf-8")) <= max_bytes:
            yield doc
            continue
        piece: list[str] = []
        size = 0
        for line in doc.split("\n"):
            n = len(line.encode("utf-8")) + 1
            if piece and size + n > max_bytes:
                yield "\n".join(piece)
                piece, size = [], 0
            while n > max_bytes:  # one huge line: cut it by characters (UTF-8 <= 4 bytes each)
                cut = max_bytes // 4
                yield line[:cut]
                line = line[cut:]
                n = len(line.encode("utf-8")) + 1
            piece.append(line)
            size += n
        if piece:
            yield "\n".join(piece)


def file_sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def train_tokenizer(documents: Iterable[str], prefix: str, vocab_size: int,
                    model_type: str = "bpe", byte_fallback: bool = True,
                    character_coverage: float = 0.9995, input_sentence_size: int = 0,
                    num_threads: int = 1, extra: Optional[dict] = None) -> dict:
    """Train a SentencePiece model and write `<prefix>.model/.vocab/.json`.

    Args:
        documents: document strings (each is one training "sentence"; longer ones are cut
            at line breaks, `training_pieces`).
        prefix: output path prefix.
        vocab_size: requested size; on a tiny corpus SentencePiece may stop earlier, the
            real size is in the returned metadata.
        model_type: "bpe" or "unigram".
        byte_fallback: encode unknown characters as UTF-8 bytes (lossless round trip).
        character_coverage: fraction of characters covered by pieces.
        input_sentence_size: sample at most this many documents (0 = all).
        num_threads: trainer threads.
        extra: more metadata to write into the .json (e.g. the command line).

    Returns:
        The metadata written to `<prefix>.json`.
    """
    if model_type not in ("bpe", "unigram"):
        raise ValueError(f"model_type={model_type!r}: must be 'bpe' or 'unigram'")
    os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
    model = io.BytesIO()
    options = dict(
        vocab_size=vocab_size, model_type=model_type, byte_fallback=byte_fallback,
        character_coverage=character_coverage, normalization_rule_name="identity",
        add_dummy_prefix=False, remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True, split_digits=True, hard_vocab_limit=False,
        max_sentence_length=MAX_SENTENCE_BYTES, input_sentence_size=input_sentence_size,
        shuffle_input_sentence=True, num_threads=num_threads,
        pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID, minloglevel=2)
    spm.SentencePieceTrainer.train(sentence_iterator=training_pieces(documents), model_writer=model,
                                   **options)
    with open(prefix + ".model", "wb") as f:
        f.write(model.getvalue())
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    with open(prefix + ".vocab", "w", encoding="utf-8") as f:
        for i in range(sp.get_piece_size()):
            f.write(f"{sp.id_to_piece(i)}\t{sp.get_score(i)}\n")
    meta = {"model": os.path.basename(prefix + ".model"), "vocab_size": sp.get_piece_size(),
            "requested_vocab_size": vocab_size, "model_type": model_type,
            "pad_id": PAD_ID, "unk_id": UNK_ID, "bos_id": BOS_ID, "eos_id": EOS_ID,
            "sha256": file_sha256(prefix + ".model"), "options": options}
    meta.update(extra or {})
    with open(prefix + ".json", "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=2, sort_keys=True)
    return meta


class Tokenizer:
    """A trained SentencePiece model with its special ids and checksum.

    Args:
        path: the `.model` file.
    """

    def __init__(self, path: str):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"tokenizer model {path!r} does not exist")
        self.path = path
        self.sp = spm.SentencePieceProcessor(model_file=path)
        self.sha256 = file_sha256(path)
        self.vocab_size = self.sp.get_piece_size()
        self.pad_id, self.bos_id, self.eos_id = self.sp.pad_id(), self.sp.bos_id(), self.sp.eos_id()

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.sp.encode(texts)

    def decode(self, ids: Iterable[int]) -> str:
        return self.sp.decode([int(i) for i in ids])

    def __getstate__(self):
        return {"path": self.path}

    def __setstate__(self, state):
        self.__init__(state["path"])
