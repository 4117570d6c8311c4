"""data_tools CLIs end to end (subprocess), determinism, and plain webdataset reading."""
import json
import os
import subprocess
import sys

import numpy as np
import webdataset as wds

from moe_train.data import DataConfig, build_train_loader
from tests.data_fixtures import make_documents, write_corpus

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(args, cwd=ROOT):
    proc = subprocess.run([sys.executable] + args, cwd=cwd, capture_output=True, text=True,
                          timeout=120, env=dict(os.environ, PYTHONPATH=ROOT))
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def test_cli_end_to_end_and_plain_webdataset(tmp_path):
    files = write_corpus(str(tmp_path / "corpus"), make_documents(300, seed=4))
    prefix = str(tmp_path / "tok" / "sp")
    out = run(["data_tools/train_tokenizer.py", "--input", str(tmp_path / "corpus" / "*"),
               "--output", prefix, "--vocab-size", "500", "--model-type", "unigram",
               "--threads", "2"])
    assert "pad=0 unk=1 bos=2 eos=3" in out
    meta = json.load(open(prefix + ".json"))
    assert meta["model_type"] == "unigram" and meta["eos_id"] == 3
    shard_sets = {}
    for procs in ("1", "2"):
        dest = str(tmp_path / f"shards{procs}")
        out = run(["-m", "data_tools.make_shards", "--input"] + files +
                  ["--tokenizer", prefix + ".model", "--output", dest, "--seq-len", "24",
                   "--samples-per-shard", "10", "--val-fraction", "0.1", "--procs", procs])
        assert "train:" in out and "validation:" in out
        manifest = json.load(open(os.path.join(dest, "manifest.json")))
        shard_sets[procs] = [s["sha256"] for s in manifest["splits"]["train"]["shards"]]
        assert "make_shards" in manifest["command"]
        assert manifest["tokenizer"]["sha256"] == meta["sha256"]
        assert manifest["dtype"] == "uint16"
    assert shard_sets["1"] == shard_sets["2"] and len(shard_sets["1"]) > 2   # deterministic
    out = run(["data_tools/inspect_shards.py", os.path.join(dest, "manifest.json"),
               "--tokenizer", prefix + ".model", "--verify"])
    assert "shard-000000.tar" in out and "sample 0" in out

    first = os.path.join(dest, "train", "shard-000000.tar")
    listing = subprocess.run(["tar", "tf", first], capture_output=True, text=True, check=True)
    assert listing.stdout.split()[0] == "000000_0000000.tokens.npy"

    # a plain webdataset pipeline, without moe_train, reads the same samples
    urls = [os.path.join(dest, s["name"]) for s in manifest["splits"]["train"]["shards"]]
    plain = [a for (a,) in wds.WebDataset(urls, shardshuffle=False).decode().to_tuple("tokens.npy")]
    assert len(plain) == manifest["splits"]["train"]["samples"]
    assert plain[0].dtype == np.uint16 and plain[0].shape == (25,)
    cfg = DataConfig(manifest=os.path.join(dest, "manifest.json"), seq_len=24,
                     micro_batch_size=1, num_workers=0, shuffle_shards=False, shuffle_buffer=0)
    ours = [b["input_ids"][0].numpy() for b in build_train_loader(cfg, 0, 1)]
    assert all(np.array_equal(o, p[:-1]) for o, p in zip(ours, plain)) and len(ours) == len(plain)
