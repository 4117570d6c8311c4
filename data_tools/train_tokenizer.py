"""Train a SentencePiece tokenizer (BPE or unigram) from text/JSONL files or globs.

Example:
    python data_tools/train_tokenizer.py --input 'corpus/*.txt' --output tok/sp \
        --vocab-size 32000 --model-type bpe
writes tok/sp.model, tok/sp.vocab and tok/sp.json (pad=0 unk=1 bos=2 eos=3, checksum).
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import command_line, fail  # noqa: E402

from tqdm import tqdm  # noqa: E402

from moe_train.data.errors import TextError  # noqa: E402
from moe_train.data.tokenizer import (TextStats, expand_inputs, iter_documents,  # noqa: E402
                                      train_tokenizer)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", required=True,
                   help="text files, .jsonl files (one document per object), globs or dirs")
    p.add_argument("--text-unit", choices=["block", "file", "line"], default="block",
                   help="documents of a text file: blank-line-separated blocks with their line "
                        "breaks (default), the whole file, or every line")
    p.add_argument("--output", required=True, help="output prefix (writes .model/.vocab/.json)")
    p.add_argument("--vocab-size", type=int, default=32000)
    p.add_argument("--model-type", choices=["bpe", "unigram"], default="bpe")
    p.add_argument("--no-byte-fallback", action="store_true",
                   help="map unknown characters to <unk> instead of UTF-8 bytes (lossy)")
    p.add_argument("--character-coverage", type=float, default=0.9995)
    p.add_argument("--text-field", default="text", help="JSONL field holding the text")
    p.add_argument("--max-documents", type=int, default=0,
                   help="sample at most this many documents for training (0 = all)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--on-error", choices=["raise", "skip"], default="raise",
                   help="non-UTF-8 or bad JSON lines: stop (default) or skip and count")
    args = p.parse_args(argv)
    try:
        files = expand_inputs(args.input)
        stats = TextStats()
        docs = tqdm(iter_documents(files, args.text_field, args.on_error, stats, args.text_unit),
                    desc="documents", unit="doc")
        meta = train_tokenizer(docs, args.output, args.vocab_size, args.model_type,
                               not args.no_byte_fallback, args.character_coverage,
                               args.max_documents, args.threads,
                               extra={"command": command_line(), "inputs": files, "text_unit": args.text_unit,
                                      "skipped_input_lines": stats.skipped_lines})
    except (TextError, FileNotFoundError, ValueError, RuntimeError) as exc:
        fail(str(exc))
    print(f"wrote {args.output}.model ({meta['model_type']}, vocab {meta['vocab_size']}, "
          f"pad={meta['pad_id']} unk={meta['unk_id']} bos={meta['bos_id']} "
          f"eos={meta['eos_id']}) from {stats.documents} documents"
          + (f", skipped {stats.skipped_lines} bad lines" if stats.skipped_lines else ""))


if __name__ == "__main__":
    main()
