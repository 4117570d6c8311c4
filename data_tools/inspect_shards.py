"""Per-shard statistics and a decoded sample of a shard set.

Example:
    python data_tools/inspect_shards.py data/corpus/manifest.json --tokenizer tok/sp.model
Reads every shard of the chosen splits (checks counts, dtype, length; --verify also
checks the sha256 recorded in the manifest) and prints one decoded sample.
"""
import argparse
import hashlib
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import fail  # noqa: E402

import numpy as np  # noqa: E402
from tqdm import tqdm  # noqa: E402

from moe_train.data.errors import ShardError  # noqa: E402
from moe_train.data.loader import resolve_shards  # noqa: E402
from moe_train.data.shards import iter_shard, load_manifest  # noqa: E402
from moe_train.data.tokenizer import load_tokenizer  # noqa: E402


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("manifest", help="manifest.json path or URL")
    p.add_argument("--split", nargs="*", default=None, help="splits to inspect (default all)")
    p.add_argument("--tokenizer", default="", help=".model or tokenizer.json to decode a sample")
    p.add_argument("--sample", type=int, default=0, help="index of the sample to decode")
    p.add_argument("--verify", action="store_true", help="check shard sha256 (local files)")
    args = p.parse_args(argv)
    try:
        manifest = load_manifest(args.manifest)
        print(f"seq_len {manifest['seq_len']}, dtype {manifest['dtype']}, vocab "
              f"{manifest['vocab_size']}, tokenizer sha256 {manifest['tokenizer']['sha256'][:12]}")
        print(f"made by: {manifest['command']}")
        first = None
        for split in args.split or list(manifest["splits"]):
            if not manifest["splits"][split]["shards"]:
                print(f"[{split}] no shards")
                continue
            urls, counts = resolve_shards(manifest, args.manifest, split, "", False, "split")
            print(f"[{split}] {'shard':<40} {'samples':>8} {'tokens':>10} {'pad%':>6} "
                  f"{'eos/sample':>10}")
            for url, count, entry in tqdm(list(zip(urls, counts,
                                                   manifest["splits"][split]["shards"])),
                                          desc=split, unit="shard", leave=False):
                pad = eos = 0
                for j, sample in iter_shard(url, count, 0, count, manifest["sample_tokens"],
                                            manifest["dtype"]):
                    if isinstance(sample, ShardError):
                        raise sample
                    pad += int(np.sum(sample == manifest["pad_id"]))
                    eos += int(np.sum(sample == manifest["eos_id"]))
                    if first is None and j == args.sample:
                        first = (url, sample)
                if args.verify:
                    with open(url, "rb") as f:
                        if hashlib.sha256(f.read()).hexdigest() != entry["sha256"]:
                            raise ShardError(url, None, "sha256 differs from the manifest")
                total = count * manifest["sample_tokens"]
                print(f"  {os.path.basename(url):<40} {count:>8} {entry['tokens']:>10} "
                      f"{100 * pad / total:>5.1f}% {eos / count:>10.2f}")
    except (ShardError, ValueError, OSError) as exc:
        fail(str(exc))
    if first is not None and args.tokenizer:
        tok = load_tokenizer(args.tokenizer, manifest)
        if tok.sha256 != manifest["tokenizer"]["sha256"]:
            print("warning: this tokenizer is not the one the shards were made with")
        ids = [int(t) for t in first[1] if int(t) != manifest["pad_id"]]
        print(f"sample {args.sample} of {os.path.basename(first[0])} ({len(ids)} tokens):")
        print(repr(tok.decode(ids)))
    elif first is not None:
        print(f"sample {args.sample} token ids: {first[1][:32].tolist()} ...")


if __name__ == "__main__":
    main()
