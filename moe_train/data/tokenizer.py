"""Tokenizers and documents: reading documents, training a SentencePiece model, encoding.

Documents come from plain-text files, JSONL files (one JSON object per line, text under
`text_field`), parquet files (one document per row, text in the column `text_field`,
read in record batches so memory stays bounded whatever the file size), or globs and
folders of these; `.gz` and `.zst` work for text and JSONL (read as a stream). A
plain-text file is cut into documents by `text_unit`:

- "block" (default): blank-line-separated blocks (a speech of a play, a paragraph, a
  sonnet); the line breaks inside a block are kept;
- "file": the whole file is one document (leading and trailing blank lines removed);
- "line": every non-empty line is a document (line breaks never reach the tokenizer).

Text must be UTF-8: a bad line (or a parquet row whose text is null or not a string) is
a `TextError` naming file and line (row), or, with `on_error="skip"`, skipped (left out of
its block) and counted. A file that cannot be read on (a truncated `.gz`/`.zst`, a parquet
file without its footer or the text column) is an `InputFileError` naming it, whatever
`on_error` says. Windows line ends become "\n".

`Tokenizer` reads either kind: a SentencePiece `.model` or a `tokenizer.json` of the
`tokenizers` library (GPT-2 / Llama / Qwen style byte-level BPE). Its BOS/EOS/PAD ids come
from the model (SentencePiece), else from a `tokenizer_config.json` beside the
`tokenizer.json`, else from the well-known names among its special tokens
(`SPECIAL_NAMES`); any of them can be named instead (`make_shards.py --bos-token ...`).

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
import zlib
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Optional, Union

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


class InputFileError(TextError):
    """An input file that cannot be read (on): truncated, corrupt, or without the text
    column. Never skipped: the documents after the fault would be lost silently.

    Args:
        path: input file.
        reason: what is wrong and what to do.
    """

    def __init__(self, path: str, reason: str):
        super().__init__(path, 0, reason)
        self.args = (f"{path}: {reason}",)

    def __str__(self) -> str:
        return self.args[0]

    def __reduce__(self):
        return (InputFileError, (self.path, self.reason))


def _strip_compression(path: str) -> str:
    for ext in (".gz", ".zst"):
        if path.endswith(ext):
            return path[:-len(ext)]
    return path


def _is_jsonl(path: str) -> bool:
    base = _strip_compression(path)
    return base.endswith(".jsonl") or base.endswith(".json")


def _zstd_chunks(path: str) -> Iterator[bytes]:
    """The decompressed bytes of a `.zst` file, frame after frame, as a stream. A file
    that ends inside a frame (truncated) raises: zstandard's own stream reader would
    just stop there."""
    import zstandard

    dctx = zstandard.ZstdDecompressor()
    obj, started = dctx.decompressobj(), False
    with open(path, "rb") as f:
        while raw := f.read(1 << 20):
            while raw:
                started = True
                try:
                    out = obj.decompress(raw)
                except zstandard.ZstdError as exc:
                    raise OSError(f"zstd: {exc}") from None
                if out:
                    yield out
                if not obj.eof:
                    break
                raw = obj.unused_data  # the next frame starts here
                obj, started = dctx.decompressobj(), False
    if started and not obj.eof:
        raise EOFError("the file ends inside a zstd frame")


def _binary_lines(path: str) -> Iterator[bytes]:
    """The raw lines of a text/JSONL file (`.gz` and `.zst` decompressed as a stream)."""
    if path.endswith(".zst"):
        rest = b""
        for chunk in _zstd_chunks(path):
            lines = (rest + chunk).split(b"\n")
            rest = lines.pop()
            yield from (line + b"\n" for line in lines)
        if rest:
            yield rest
        return
    with (gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")) as f:
        yield from f


def iter_documents(files: list[str], text_field: str = "text", on_error: str = "raise",
                   stats: Optional[TextStats] = None, text_unit: str = "block") -> Iterator[str]:
    """The documents of text/JSONL/parquet files in a fixed order (file list order, then file order).

    Args:
        files: input files (see `expand_inputs`).
        text_field: JSONL key / parquet column holding the document text.
        on_error: "raise" or "skip" for non-UTF-8 lines, bad JSON, a missing field, or a
            parquet row whose text is null or not a string (a file that cannot be read
            on always raises `InputFileError`).
        stats: counters to update (documents, skipped lines).
        text_unit: how a plain-text file is cut into documents: "block" (blank-line-
            separated blocks, line breaks kept), "file" or "line" (module docstring).
            JSONL files always give one document per object, parquet one per row.

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
        if path.endswith(".parquet"):
            docs = _parquet_texts(path, text_field, on_error, stats)
        else:
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
    lineno = 0
    lines = _binary_lines(path)
    while True:
        try:
            raw = next(lines)
        except StopIteration:
            return
        except (EOFError, OSError, zlib.error) as exc:
            raise InputFileError(path, f"cannot read on after line {lineno}: truncated or corrupt file "
                                       f"({type(exc).__name__}: {exc}); re-create or remove it") from None
        lineno += 1
        try:
            yield _parse_line(path, lineno, raw, jsonl, text_field)
        except TextError as err:
            if on_error != "skip":
                raise
            stats.skip(err)


def parquet_text_column(path: str, text_field: str):
    """Opens a parquet file (footer and schema only) and checks its text column.

    Returns:
        The ``pyarrow.parquet.ParquetFile``.

    Raises:
        InputFileError: not a readable parquet file, or no string column ``text_field``.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise InputFileError(path, f"not a readable parquet file (truncated or corrupt: {exc})") from None
    schema = pf.schema_arrow
    if text_field not in schema.names:
        raise InputFileError(path, f"no column {text_field!r}; its columns are {', '.join(schema.names)} "
                                   f"(name the text column with --text-field)")
    kind = schema.field(text_field).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_null(kind)):
        raise InputFileError(path, f"column {text_field!r} holds {kind}, not text (name the text column "
                                   f"with --text-field)")
    return pf


def _parquet_texts(path: str, text_field: str, on_error: str, stats: TextStats,
                   batch_rows: int = 1024) -> Iterator[str]:
    """One document per row, read in record batches of `batch_rows` rows."""
    import pyarrow as pa

    pf = parquet_text_column(path, text_field)
    row = 0
    try:
        for batch in pf.iter_batches(batch_size=batch_rows, columns=[text_field]):
            for text in batch.column(0).to_pylist():
                row += 1
                if isinstance(text, str):
                    yield text
                    continue
                err = TextError(path, row, f"row {row}: column {text_field!r} is "
                                           f"{'null' if text is None else type(text).__name__}, not a string")
                if on_error != "skip":
                    raise err
                stats.skip(err)
    except (pa.ArrowException, OSError) as exc:
        raise InputFileError(path, f"cannot read on after row {row}: truncated or corrupt parquet "
                                   f"file ({exc}); re-create or remove it") from None


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
        what = "null" if isinstance(obj, dict) and text_field in obj and obj[text_field] is None else "missing"
        raise TextError(path, lineno, f"no string field {text_field!r} ({what} or not a string)")
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


TOKENIZER_KINDS = ("sentencepiece", "tokenizers")
# Well-known names of the special tokens of `tokenizers` files (Llama 3, SentencePiece
# conversions, Gemma, GPT-2 / Qwen); the first one that is a special token wins.
SPECIAL_NAMES = {
    "bos": ("<|begin_of_text|>", "<s>", "<bos>", "<|startoftext|>", "[BOS]", "<|endoftext|>"),
    "eos": ("<|end_of_text|>", "</s>", "<eos>", "<|endoftext|>", "[EOS]"),
    "pad": ("<pad>", "<|pad|>", "[PAD]", "<|padding|>", "<|finetune_right_pad_id|>"),
}
Special = Union[str, int, None]


def tokenizer_kind(path: str) -> str:
    """"tokenizers" for a `tokenizer.json` (any `.json`), else "sentencepiece"."""
    return "tokenizers" if path.endswith(".json") else "sentencepiece"


class Tokenizer:
    """A tokenizer file of either kind with its special ids and checksum.

    Args:
        path: a SentencePiece `.model` or a `tokenizer.json` of the `tokenizers` library.
        bos, eos, pad: the special tokens, by token text or id, overriding what the
            tokenizer says (needed for a `tokenizer.json` that names none).

    Raises:
        FileNotFoundError: no such file.
        ValueError: unreadable file, a named token it lacks, or no EOS / PAD token found.
    """

    def __init__(self, path: str, bos: Special = None, eos: Special = None, pad: Special = None):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"tokenizer model {path!r} does not exist")
        self.path, self.kind, self.named = path, tokenizer_kind(path), (bos, eos, pad)
        self.sha256 = file_sha256(path)
        if self.kind == "sentencepiece":
            self.sp = spm.SentencePieceProcessor(model_file=path)
            self.vocab_size = self.sp.get_piece_size()
            found = {"bos": self.sp.bos_id(), "eos": self.sp.eos_id(), "pad": self.sp.pad_id()}
        else:
            from tokenizers import Tokenizer as HFTokenizer

            try:
                self.hf = HFTokenizer.from_file(path)
            except Exception as exc:  # noqa: BLE001 - the library raises a bare Exception
                raise ValueError(f"tokenizer {path}: not a readable tokenizer.json ({exc})") from None
            found = self._hf_specials()
            self.vocab_size = max([self.hf.get_vocab_size(with_added_tokens=True)]
                                  + [i + 1 for i in found.values() if i is not None])
        for name, value in zip(("bos", "eos", "pad"), (bos, eos, pad)):
            if value is not None and value != "":
                found[name] = self._token_id(name, value)
        self.bos_id, self.eos_id, self.pad_id = (found[k] if found[k] is not None and found[k] >= 0 else None
                                                 for k in ("bos", "eos", "pad"))
        for name in ("eos", "pad"):
            if getattr(self, f"{name}_id") is None:
                hint = " (a tokenizer with only <|endoftext|>, as GPT-2's: --pad-token '<|endoftext|>' pads " \
                       "with it, and its labels are then masked)" if name == "pad" else ""
                raise ValueError(f"tokenizer {path}: no {name.upper()} token found among its special tokens; "
                                 f"name one with --{name}-token TOKEN{hint}")

    def _hf_specials(self) -> dict:
        """bos/eos/pad ids from a tokenizer_config.json beside the file, else from the
        well-known names among the special tokens."""
        specials = {t.content: i for i, t in self.hf.get_added_tokens_decoder().items() if t.special}
        config = os.path.join(os.path.dirname(os.path.abspath(self.path)), "tokenizer_config.json")
        named: dict = {}
        if os.path.isfile(config):
            with open(config, encoding="utf-8") as f:
                raw = json.load(f)
            for name in ("bos", "eos", "pad"):
                token = raw.get(f"{name}_token")
                token = token.get("content") if isinstance(token, dict) else token
                if isinstance(token, str) and self.hf.token_to_id(token) is not None:
                    named[name] = self.hf.token_to_id(token)
        for name, candidates in SPECIAL_NAMES.items():
            if name not in named:
                named[name] = next((specials[c] for c in candidates if c in specials), None)
        return named

    def _token_id(self, name: str, value: Special) -> int:
        if isinstance(value, int) or (isinstance(value, str) and value.isdigit()):
            i = int(value)
            ok = 0 <= i < self.vocab_size
        elif self.kind == "sentencepiece":
            i = self.sp.piece_to_id(value)
            ok = self.sp.id_to_piece(i) == value
        else:
            i = self.hf.token_to_id(value)
            ok = i is not None
        if not ok:
            raise ValueError(f"--{name}-token {value!r}: tokenizer {self.path} has no such token")
        return i

    def describe(self) -> dict:
        """What a shard manifest records under "tokenizer"."""
        return {"model": os.path.abspath(self.path), "kind": self.kind, "sha256": self.sha256,
                "vocab_size": self.vocab_size, "bos_id": self.bos_id, "eos_id": self.eos_id,
                "pad_id": self.pad_id}

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; no special token is added."""
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        if self.kind == "sentencepiece":
            return self.sp.encode(texts)
        # encode_batch_fast: the library's batch encoding (its threads) without offsets
        return [e.ids for e in self.hf.encode_batch_fast(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        ids = [int(i) for i in ids]
        if self.kind == "sentencepiece":
            return self.sp.decode(ids)
        return self.hf.decode(ids, skip_special_tokens=False)

    def __getstate__(self):
        return {"path": self.path, "named": self.named}

    def __setstate__(self, state):
        self.__init__(state["path"], *state["named"])


def load_tokenizer(path: str, manifest: Optional[dict] = None) -> Tokenizer:
    """The tokenizer at ``path`` with the special ids a shard ``manifest`` recorded for it
    (when the manifest was made with this very file: same sha256), so that generation and
    export use the ids the shards hold even where they were named with flags."""
    rec = (manifest or {}).get("tokenizer", {})
    if rec.get("sha256") and rec.get("kind") and os.path.isfile(path) and file_sha256(path) == rec["sha256"]:
        return Tokenizer(path, rec.get("bos_id"), rec.get("eos_id"), rec.get("pad_id"))
    return Tokenizer(path)
