"""What the experiment scripts under docs/ (``docs/*_experiment.py``) share: the demo's
data, made once and reused, and running one step of an experiment as a command.

    from benchmarks.experiments import prepare_demo_data, run_command
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_command(cmd: list[str]) -> None:
    """Runs one step of an experiment script from the repository root, echoing it; the
    venv's bin first on PATH (torchrun, deepspeed), one OpenMP thread unless set."""
    print("+ " + " ".join(map(shlex.quote, cmd)), flush=True)
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    subprocess.run(cmd, check=True, cwd=REPO, env=env)


def prepare_demo_data(data: Path, corpus: str = "shakespeare", seq_lens: tuple[int, ...] = (128,),
                      run=run_command) -> list[Path]:
    """Corpus, tokenizer and shards as ``launchers/demo.sh`` makes them, each made once
    and reused: ``data/corpus``, ``data/tok/sp.model`` (vocab 2048), and per sequence
    length S the packed shards (``data/shards`` for the demo's 128, ``data/shards_sS``
    otherwise). Returns the shard manifests in ``seq_lens`` order. The experiment
    scripts under docs/ share this so that they train on the demo's data."""
    data, py = Path(data), sys.executable
    if not (data / "corpus" / "source.json").is_file():
        run([py, "data_tools/prepare_corpus.py", corpus, "--out", str(data / "corpus")])
    inputs = str(data / "corpus" / ("*.txt" if corpus == "shakespeare" else "corpus.jsonl"))
    if not (data / "tok" / "sp.model").is_file():
        run([py, "data_tools/train_tokenizer.py", "--input", inputs, "--output", str(data / "tok" / "sp"),
             "--vocab-size", "2048"])
    manifests = []
    for seq_len in seq_lens:
        shards = data / ("shards" if seq_len == 128 else f"shards_s{seq_len}")
        if not (shards / "manifest.json").is_file():
            run([py, "data_tools/make_shards.py", "--input", inputs, "--tokenizer", str(data / "tok" / "sp.model"),
                 "--output", str(shards), "--seq-len", str(seq_len), "--val-fraction", "0.02",
                 "--samples-per-shard", "1024"])
        manifests.append(shards / "manifest.json")
    return manifests
