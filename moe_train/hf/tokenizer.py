"""The Hugging Face tokenizer files of an export, built from our SentencePiece model.

Our tokenizer (``moe_train/data/tokenizer.py``) is SentencePiece BPE with identity
normalisation, no dummy prefix, whitespace kept as it is and byte fallback; ``encode``
adds no special token, and the shards put ``BOS`` before a document only when the data
manifest says ``add_bos`` (``EOS`` always follows one; generation starts from ``EOS``).

The export writes ``tokenizer.json`` (a ``tokenizers`` BPE built by transformers'
``SpmConverter.build_tokenizer_from_spm_proto``, which follows the model's own normaliser
settings and ranks merges by piece score), ``tokenizer_config.json`` (class
``PreTrainedTokenizerFast``, so ``AutoTokenizer`` does not pick the architecture's
byte-level tokenizer; special tokens as pieces; ``split_special_tokens`` so that the
text "<s>" encodes as characters, as SentencePiece does) and a copy of the
SentencePiece model as ``tokenizer.model``. ``tokenizer(text)`` adds BOS iff the manifest
said ``add_bos`` (so a document starts as in training); with ``add_special_tokens=False``
the ids are exactly ``Tokenizer.encode(text)``.

A ``tokenizer.json`` of the ``tokenizers`` library (shards made with one) is copied as it
is (``write_tokenizer_json``), with a ``tokenizer_config.json`` naming its BOS/EOS/PAD
tokens (the ids the data manifest recorded); ``check_tokenizer_json`` then compares
``AutoTokenizer`` with the ``tokenizers`` library on the probe texts.

``write_tokenizer`` checks the written files (through ``AutoTokenizer``) against SentencePiece on probe
texts (spaces, tabs, newlines, digits, accents, CJK, emoji, control characters, and the
model's own pieces); a difference is an error naming the text.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

PROBES = (
    "Hello world", "  two leading spaces", "trailing spaces   ", "tab\tseparated\tvalues",
    "line one\nline two\n\nafter a blank line\n", "\n\n\n", " ", "", "a  b   c    d",
    "12345 6.02e23 -7 1,000,000", "naïve café straße façade jalapeño", "ёлка мир δέλτα λόγος",
    "日本語のテキスト 中文", "emoji 😀 ✓ 🚀🚀", "don't e-mail \"quotes\" (parens) [brackets]",
    "<s> </s> <pad> <unk> are text here", "\u00a0no-break\u2028line sep\u200bzero width",
    "ＡＢＣ full width", "Windows\r\nline end", "x" * 40, "The quick brown fox jumps over the lazy dog.",
)


def _proto(model_path: str):
    from transformers.convert_slow_tokenizer import import_protobuf

    proto = import_protobuf().ModelProto()
    proto.ParseFromString(Path(model_path).read_bytes())
    return proto


def build_backend(model_path: str, add_bos: bool):
    """A ``tokenizers.Tokenizer`` encoding like the SentencePiece model at ``model_path``
    (plus BOS in front when ``add_bos``)."""
    import sentencepiece as spm
    from tokenizers.processors import TemplateProcessing
    from transformers.convert_slow_tokenizer import SpmConverter

    proto = _proto(model_path)
    vocab = {piece.piece: i for i, piece in enumerate(proto.pieces)}
    if not hasattr(SpmConverter, "build_tokenizer_from_spm_proto"):
        import transformers
        raise ValueError(f"transformers {transformers.__version__} cannot build a tokenizer.json from a "
                         f"SentencePiece model (SpmConverter.build_tokenizer_from_spm_proto); install the "
                         f"version of the hf extra (pip install 'moe_train[hf]')")
    backend = SpmConverter.build_tokenizer_from_spm_proto(proto, vocab)
    if backend is None:
        raise ValueError(f"{model_path}: a SentencePiece model of type "
                         f"{proto.trainer_spec.model_type} cannot be converted (BPE and unigram can)")
    sp = spm.SentencePieceProcessor(model_file=model_path)
    if add_bos:
        bos = sp.id_to_piece(sp.bos_id())
        backend.post_processor = TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                    special_tokens=[(bos, sp.bos_id())])
    return backend, sp


def special_tokens(sp) -> dict[str, str]:
    """bos/eos/unk/pad pieces of the SentencePiece model (ids < 0 are absent)."""
    ids = {"bos_token": sp.bos_id(), "eos_token": sp.eos_id(), "unk_token": sp.unk_id(), "pad_token": sp.pad_id()}
    return {name: sp.id_to_piece(i) for name, i in ids.items() if i >= 0}


def special_ids(sp) -> dict[str, int | None]:
    """config.json's bos/eos/pad ids."""
    return {name: (i if i >= 0 else None)
            for name, i in (("bos_token_id", sp.bos_id()), ("eos_token_id", sp.eos_id()),
                            ("pad_token_id", sp.pad_id()))}


def write_tokenizer(model_path: str, out: Path, add_bos: bool, max_len: int) -> list[str]:
    """Writes the tokenizer files into ``out``; returns the names written. Raises
    ValueError when the written tokenizer encodes a probe text differently."""
    from transformers import PreTrainedTokenizerFast

    backend, sp = build_backend(model_path, add_bos)
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, **special_tokens(sp), add_bos_token=add_bos,
                                  add_eos_token=False, split_special_tokens=True,
                                  clean_up_tokenization_spaces=False, model_max_length=max_len)
    tok.save_pretrained(str(out))
    config_path = out / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config.update(tokenizer_class="PreTrainedTokenizerFast", add_bos_token=add_bos, add_eos_token=False)
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    shutil.copyfile(model_path, out / "tokenizer.model")
    check_tokenizer(out, sp, add_bos)
    return sorted(p.name for p in out.iterdir() if p.name.startswith(("tokenizer", "special_tokens")))


def probe_texts(sp) -> list[str]:
    """PROBES plus text made of the model's own pieces (every 7th, in runs of 5)."""
    pieces = [sp.id_to_piece(i).replace("\u2581", " ") for i in range(sp.get_piece_size())
              if not (sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i))]
    runs = ["".join(pieces[j:j + 35:7]) for j in range(0, len(pieces), 35)]
    return list(PROBES) + runs


def check_tokenizer(directory: Path, sp, add_bos: bool) -> None:
    """``AutoTokenizer.from_pretrained(directory)`` encodes every probe text to
    SentencePiece's ids (BOS first when ``add_bos``; none with ``add_special_tokens=False``)
    and decodes them back to SentencePiece's text."""
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(directory))
    for text in probe_texts(sp):
        ours = sp.encode(text)
        theirs = hf(text, add_special_tokens=False, verbose=False)["input_ids"]
        with_special = hf(text, verbose=False)["input_ids"]
        expected = ([sp.bos_id()] if add_bos else []) + ours
        if theirs != ours or with_special != expected:
            raise ValueError(f"the exported tokenizer encodes {text!r} as {with_special}, SentencePiece as "
                             f"{expected}; the tokenizer cannot be exported exactly")
        if hf.decode(ours) != sp.decode(ours):
            raise ValueError(f"the exported tokenizer decodes {ours} as {hf.decode(ours)!r}, SentencePiece as "
                             f"{sp.decode(ours)!r}")


def write_tokenizer_json(tok, out: Path, add_bos: bool, max_len: int) -> list[str]:
    """Copies ``tok``'s ``tokenizer.json`` (a ``moe_train.data.tokenizer.Tokenizer`` of
    kind "tokenizers") into ``out`` as it is, with a ``tokenizer_config.json`` naming its
    special tokens; returns the names written. Raises ValueError when ``AutoTokenizer``
    reading them encodes or decodes a probe text differently."""
    shutil.copyfile(tok.path, out / "tokenizer.json")
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": max_len,
              "clean_up_tokenization_spaces": False, "add_bos_token": add_bos, "add_eos_token": False}
    for name in ("bos", "eos", "pad"):
        i = getattr(tok, f"{name}_id")
        if i is not None:
            config[f"{name}_token"] = tok.hf.id_to_token(i)
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    check_tokenizer_json(out, tok)
    return ["tokenizer.json", "tokenizer_config.json"]


def check_tokenizer_json(directory: Path, tok) -> None:
    """``AutoTokenizer.from_pretrained(directory)`` encodes every probe text (and text
    made of the vocabulary's own tokens) to ``tok``'s ids and decodes them back alike."""
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(directory))
    vocab = sorted(tok.hf.get_vocab().items(), key=lambda kv: kv[1])
    pieces = [tok.decode([i]) for _, i in vocab[::7][:200]]
    for text in list(PROBES) + ["".join(pieces[j:j + 5]) for j in range(0, len(pieces), 5)]:
        ours = tok.encode(text)
        theirs = hf(text, add_special_tokens=False, verbose=False)["input_ids"]
        if theirs != ours:
            raise ValueError(f"the exported tokenizer encodes {text!r} as {theirs}, the tokenizers library as "
                             f"{ours}; the tokenizer cannot be exported exactly")
        if hf.decode(ours) != tok.decode(ours):
            raise ValueError(f"the exported tokenizer decodes {ours} as {hf.decode(ours)!r}, the tokenizers "
                             f"library as {tok.decode(ours)!r}")
