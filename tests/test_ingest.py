"""Corpora as the ecosystem keeps them, tokenized with an existing tokenizer.json:
parquet (several row groups, a null row, a missing column, a truncated file) and
.jsonl.zst inputs; a `tokenizers` byte-level BPE trained here; equal shards for --procs 1
and 2; 3 training steps on such shards, `generate` and `export --format hf` afterwards;
the vocabulary check at train start-up; and TensorBoard runs side by side in one
logging.dir (a resumed run continuing its own folder), read back by EventMultiplexer."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from moe_train.data.build import STAGING, make_shards
from moe_train.data.errors import TextError
from moe_train.data.shards import iter_shard
from moe_train.data.tokenizer import InputFileError, Tokenizer
from tests.data_fixtures import make_documents

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
zstandard = pytest.importorskip("zstandard")
tokenizers = pytest.importorskip("tokenizers")

ROOT = Path(__file__).resolve().parents[1]
DOCS = make_documents(240, seed=11)
NULL_ROW = 37  # 1-based row of the parquet file whose text is null


def train_tokenizer_json(path: Path, docs: list[str], vocab: int = 320) -> None:
    """A GPT-2 style byte-level BPE with <|endoftext|> (BOS and EOS) and <pad>."""
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers

    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|endoftext|>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(docs, trainer)
    tok.save(str(path))


def write_zst(path: Path, docs: list[str], frames: int = 2) -> None:
    """JSONL compressed as several zstd frames (as `cat a.zst b.zst` makes)."""
    lines = [json.dumps({"text": d}) + "\n" for d in docs]
    step = -(-len(lines) // frames)
    path.write_bytes(b"".join(zstandard.ZstdCompressor().compress("".join(lines[i:i + step]).encode())
                              for i in range(0, len(lines), step)))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """data/part-0.parquet (first 150 documents, row groups of 40, row NULL_ROW null) and
    data/part-1.jsonl.zst (the rest); a tokenizer.json trained on the documents."""
    root = tmp_path_factory.mktemp("ingest")
    data = root / "data"
    data.mkdir()
    texts = list(DOCS[:150])
    texts.insert(NULL_ROW - 1, None)
    pq.write_table(pa.table({"id": list(range(len(texts))), "text": texts}), data / "part-0.parquet",
                   row_group_size=40)
    write_zst(data / "part-1.jsonl.zst", DOCS[150:])
    train_tokenizer_json(root / "tokenizer.json", DOCS)
    return root


def read_tokens(out: Path, split: str) -> np.ndarray:
    """A split's token stream back from its shards (samples overlap by one token)."""
    manifest = json.loads((out / "manifest.json").read_text())
    parts = []
    for shard in manifest["splits"][split]["shards"]:
        for _, sample in iter_shard(str(out / shard["name"]), shard["samples"], 0, shard["samples"],
                                    manifest["sample_tokens"], manifest["dtype"]):
            parts.append(sample if not parts else sample[1:])
    stream = np.concatenate(parts)
    return stream[stream != manifest["pad_id"]]


def test_parquet_and_zst_shards_are_equal_for_any_procs_and_keep_documents(corpus):
    with pytest.raises(TextError, match=rf"part-0.parquet:{NULL_ROW}: row {NULL_ROW}: column 'text' is null"):
        make_shards([str(corpus / "data")], str(corpus / "tokenizer.json"), str(corpus / "bad"), seq_len=16)
    assert not (corpus / "bad" / "manifest.json").exists() and not (corpus / "bad" / STAGING).exists()
    assert not list((corpus / "bad").rglob("*.tar"))  # nothing written half
    digests = {}
    for procs in (1, 2):
        out = corpus / f"shards{procs}"
        manifest = make_shards([str(corpus / "data" / "*")], str(corpus / "tokenizer.json"), str(out), seq_len=16,
                               val_fraction=0.1, samples_per_shard=32, num_procs=procs, on_error="skip",
                               chunk_docs=16)
        digests[procs] = [s["sha256"] for sp in ("train", "validation") for s in manifest["splits"][sp]["shards"]]
    assert digests[1] == digests[2] and len(digests[1]) > 3
    assert manifest["skipped_input_lines"] == 1
    tok = Tokenizer(str(corpus / "tokenizer.json"))
    assert manifest["tokenizer"] == {**tok.describe(), "kind": "tokenizers"}
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 0, 1)  # <|endoftext|>, <pad>: found by name
    assert manifest["eos_id"] == 0 and manifest["pad_id"] == 1 and manifest["vocab_size"] == tok.vocab_size
    docs = []
    for split in ("train", "validation"):
        stream = read_tokens(out, split).tolist()
        assert stream[-1] == tok.eos_id
        cut = [i for i, t in enumerate(stream) if t == tok.eos_id]
        docs += [tok.decode(stream[a + 1:b]) for a, b in zip([-1] + cut, cut)]
        assert manifest["splits"][split]["documents"] == len(cut)
    assert sorted(docs) == sorted(DOCS)  # every document once, boundaries kept, exact text


def test_bad_inputs_get_one_line_naming_the_file(corpus, tmp_path):
    tok = str(corpus / "tokenizer.json")
    pq.write_table(pa.table({"content": ["a", "b"], "lang": ["en", "fr"]}), tmp_path / "other.parquet")
    with pytest.raises(InputFileError, match=r"other.parquet: no column 'text'; its columns are content, lang "
                                             r"\(name the text column with --text-field\)"):
        make_shards([str(tmp_path / "other.parquet")], tok, str(tmp_path / "o"), seq_len=16)
    good = (corpus / "data" / "part-0.parquet").read_bytes()
    (tmp_path / "cut.parquet").write_bytes(good[:len(good) // 2])
    with pytest.raises(InputFileError, match=r"cut.parquet: not a readable parquet file"):
        make_shards([str(tmp_path / "cut.parquet")], tok, str(tmp_path / "o"), seq_len=16)
    zst = (corpus / "data" / "part-1.jsonl.zst").read_bytes()
    (tmp_path / "cut.jsonl.zst").write_bytes(zst[:-20])
    with pytest.raises(InputFileError, match=r"cut.jsonl.zst: cannot read on after line \d+: truncated or corrupt"):
        make_shards([str(tmp_path / "cut.jsonl.zst")], tok, str(tmp_path / "o"), seq_len=16, on_error="skip")
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").rglob("*.*"))
    # the command line: one line on stderr, exit status 2
    proc = subprocess.run([sys.executable, "data_tools/make_shards.py", "--input", str(tmp_path / "other.parquet"),
                           "--tokenizer", tok, "--output", str(tmp_path / "o")], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "other.parquet: no column 'text'" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    # a tokenizer.json without special tokens: named with flags
    train_tokenizer_json(tmp_path / "plain.json", DOCS[:50], vocab=280)
    raw = json.loads((tmp_path / "plain.json").read_text())
    raw["added_tokens"] = []
    (tmp_path / "plain.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="no EOS token found among its special tokens; name one with --eos-token"):
        Tokenizer(str(tmp_path / "plain.json"))
    named = Tokenizer(str(tmp_path / "plain.json"), eos="<|endoftext|>", pad="1")
    assert (named.bos_id, named.eos_id, named.pad_id) == (None, 0, 1)


RUNNER = r"""
import json, sys
from moe_train.config import config_from_dict
from moe_train.train import train
raw, resume = json.loads(sys.argv[1]), sys.argv[2]
try:
    result = train(config_from_dict(raw), resume=resume)
    print("RESULT " + json.dumps(sorted(result.losses)))
except ValueError as err:
    print("RESULT " + json.dumps(str(err)))
"""


def run_train(raw: dict, resume: str = "none", **changes):
    """``train`` in a process of its own (DeepSpeed keeps groups per process); returns
    the steps it trained or the ValueError's message, and its stdout."""
    raw = json.loads(json.dumps(raw))
    for key, value in changes.items():
        section, name = key.split("__")
        raw[section][name] = value
    proc = subprocess.run([sys.executable, "-c", RUNNER, json.dumps(raw), resume], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env=dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(proc.stdout.split("RESULT ")[-1]), proc.stdout


def test_train_generate_export_and_tensorboard_runs_on_tokenizer_json_shards(corpus, tmp_path):
    from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer

    shards = corpus / "shards1"
    if not (shards / "manifest.json").exists():
        make_shards([str(corpus / "data")], str(corpus / "tokenizer.json"), str(shards), seq_len=16,
                    val_fraction=0.1, samples_per_shard=32, on_error="skip")
    vocab = json.loads((shards / "manifest.json").read_text())["vocab_size"]
    # a model export --format hf represents exactly (Qwen3-MoE), as small as it goes
    raw = {"model": {"vocab_size": 384, "d_model": 32, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2,
                     "d_ff": 48, "mlp_activation": "swiglu", "norm": "rmsnorm", "position": "rope",
                     "max_seq_len": 32, "qk_norm": True, "moe_every": 1, "tie_embeddings": False},
           "moe": {"num_experts": 4, "top_k": 2, "d_ff": 16, "activation": "swiglu", "normalize_topk": True,
                   "capacity_factor": None, "eval_capacity_factor": None, "jitter_eps": 0.0},
           "parallel": {"expert_parallel_size": 1, "zero_stage": 1, "timeout_s": 120},
           "data": {"manifest": str(shards / "manifest.json"), "seq_len": 16, "micro_batch_size": 4,
                    "num_workers": 0},
           "train": {"max_steps": 3, "seed": 7}, "optim": {"lr": 1e-2, "warmup_steps": 1, "impl": "loop"},
           "checkpoint": {"dir": str(tmp_path / "ckpt")},
           "logging": {"dir": str(tmp_path / "tb"), "every_steps": 1, "peak_flops": 1e12}}
    error, _ = run_train(raw, model__vocab_size=100)  # fails before any event file
    assert error == f"model.vocab_size = 100: the tokenizer of {shards / 'manifest.json'} has {vocab} tokens; raise it"
    assert not (tmp_path / "tb").exists() or not any((tmp_path / "tb").rglob("events*"))
    steps, stdout = run_train(raw)
    assert steps == [1, 2, 3]
    assert f"# TensorBoard: tensorboard --logdir {tmp_path / 'tb'} (this run: run-" in stdout
    assert run_train(raw, "auto", train__max_steps=4)[0] == [4]  # resumed: continues its run folder
    second = dict(raw["checkpoint"], dir=str(tmp_path / "ckpt2"))
    assert run_train(raw, checkpoint__dir=second["dir"], logging__run_name="second", train__max_steps=1)[0] == [1]

    tb = EventMultiplexer().AddRunsFromDirectory(str(tmp_path / "tb"))
    tb.Reload()
    runs = sorted(tb.Runs())
    assert len(runs) == 2 and runs[1] == "second" and runs[0].startswith("run-"), runs
    assert [e.step for e in tb.Scalars(runs[0], "train/lm_loss")] == [1, 2, 3, 4]  # resumed: same run
    assert [e.step for e in tb.Scalars("second", "train/lm_loss")] == [1]

    gen = subprocess.run([sys.executable, "-m", "moe_train", "generate", "--checkpoint", str(tmp_path / "ckpt"),
                          "--prompt", DOCS[0][:20], "--max-new-tokens", "8", "--greedy"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert gen.returncode == 0, gen.stderr[-2000:]
    assert "step 4" in gen.stdout and f"--- sample 1\n{DOCS[0][:20]}" in gen.stdout

    pytest.importorskip("transformers")
    from moe_train.hf.export import export_hf

    report = export_hf(tmp_path / "ckpt", tmp_path / "hf")
    assert (tmp_path / "hf" / "tokenizer.json").read_bytes() == (corpus / "tokenizer.json").read_bytes()
    assert "tokenizer.json" in report.tokenizer_files
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (config["eos_token_id"], config["pad_token_id"]) == (0, 1)
