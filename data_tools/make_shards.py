"""Tokenize text/JSONL/parquet into webdataset tar shards of packed [seq_len + 1] samples.

Examples:
    python data_tools/make_shards.py --input 'corpus/*.jsonl' --tokenizer tok/sp.model \
        --output data/corpus --seq-len 2048 --val-fraction 0.005 --procs 8
    python data_tools/make_shards.py --input fineweb/data/ --tokenizer qwen/tokenizer.json \
        --output data/fineweb --seq-len 2048 --procs 8
write data/corpus/{train,validation}/shard-NNNNNN.tar and data/corpus/manifest.json.
Output is identical for the same input, whatever --procs is; a failed run leaves the
output directory as it was.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import command_line, fail  # noqa: E402

from tqdm import tqdm  # noqa: E402

from moe_train.data.build import make_shards  # noqa: E402
from moe_train.data.errors import TextError  # noqa: E402


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", required=True,
                   help="text files, .jsonl files (one document per object), .parquet files (one "
                        "per row), .gz/.zst compressed text or JSONL; globs or dirs")
    p.add_argument("--text-unit", choices=["block", "file", "line"], default="block",
                   help="documents of a text file: blank-line-separated blocks with their line "
                        "breaks (default), the whole file, or every line")
    p.add_argument("--tokenizer", required=True,
                   help="sentencepiece .model, or a tokenizer.json of the tokenizers library")
    for name in ("bos", "eos", "pad"):
        p.add_argument(f"--{name}-token", default=None,
                       help=f"{name.upper()} token (text or id) when the tokenizer names none or another")
    p.add_argument("--output", required=True, help="output directory")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--val-fraction", type=float, default=0.01,
                   help="fraction of documents (chosen by content hash) for validation")
    p.add_argument("--shard-mb", type=float, default=256.0, help="target shard size in MB")
    p.add_argument("--samples-per-shard", type=int, default=0,
                   help="exact samples per shard (overrides --shard-mb)")
    p.add_argument("--procs", type=int, default=os.cpu_count() or 1,
                   help="tokenizer processes")
    p.add_argument("--text-field", default="text", help="JSONL field / parquet column holding the text")
    p.add_argument("--add-bos", action="store_true", help="put BOS before every document")
    p.add_argument("--on-error", choices=["raise", "skip"], default="raise",
                   help="non-UTF-8 or bad JSON lines, null or non-string text: stop (default) or "
                        "skip and count")
    args = p.parse_args(argv)
    try:
        with tqdm(desc="tokenize", unit="doc", delay=1.0) as bar:  # no bar when it fails at once
            manifest = make_shards(args.input, args.tokenizer, args.output, args.seq_len,
                                   args.val_fraction, int(args.shard_mb * (1 << 20)),
                                   args.samples_per_shard, args.procs, args.text_field,
                                   args.add_bos, args.on_error, command_line(), bar,
                                   args.text_unit, args.bos_token, args.eos_token, args.pad_token)
    except (TextError, FileNotFoundError, ValueError) as exc:
        fail(str(exc))
    for name, split in manifest["splits"].items():
        print(f"{name}: {len(split['shards'])} shards, {split['samples']} samples, "
              f"{split['tokens']} tokens, {split['documents']} documents")
    if manifest["skipped_input_lines"]:
        print(f"skipped {manifest['skipped_input_lines']} bad input lines or rows")
    tok = manifest["tokenizer"]
    print(f"tokenizer {tok['kind']} {tok['model']}: vocab {tok['vocab_size']}, bos {tok['bos_id']}, "
          f"eos {tok['eos_id']}, pad {tok['pad_id']}")
    if tok["pad_id"] == tok["eos_id"]:
        print("warning: PAD is EOS: the loader masks pad labels, so the model never learns to end a "
              "document; name another --pad-token if the tokenizer has one")
    print(f"wrote {os.path.join(args.output, 'manifest.json')} (dtype {manifest['dtype']})")


if __name__ == "__main__":
    main()
