"""Start-up cost of building the model: wall time and peak RSS for a ~1B-parameter MoE
config, each way in a fresh process.

    python -m benchmarks.startup [--device cpu] [--experts 32] [--json out.json]

Ways:
  eager  ``MoETransformer(...)`` on the CPU, then ``.to(device)``: what ``build_model``
         did before issue 17 (on a GPU the whole rank's model passes through host memory);
  meta   ``build_model``: every module made on the meta device, this rank's parameters
         allocated once on ``device`` and drawn there.
Both draw the same numbers (tests/test_model.py). Peak RSS is ``ru_maxrss`` of the child,
minus its RSS after importing torch and moe_train (printed as "base"). On the CPU the two
ways allocate the same bytes on the same device, so any difference there is temporaries;
what meta saves on a GPU (host memory and a copy of the model) needs a GPU to measure.

To compare with an older checkout, run this file with PYTHONPATH pointing at that tree:
only "eager" exists there.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = r"""
import json, resource, sys, time
import torch
from moe_train.config import Config
from moe_train.model.transformer import MoETransformer
way, device, experts = sys.argv[1], torch.device(sys.argv[2]), int(sys.argv[3])
torch.set_num_threads(torch.get_num_threads())
cfg = Config()
m = cfg.model
m.vocab_size, m.d_model, m.num_layers, m.num_heads, m.d_ff, m.max_seq_len = 32000, 1024, 16, 16, 4096, 1024
m.moe_every = 2
cfg.moe.num_experts, cfg.moe.d_ff, cfg.moe.top_k = experts, 1536, 2
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
t0 = time.perf_counter()
torch.manual_seed(0)
if way == "eager":
    model = MoETransformer(cfg.model, cfg.moe).to(device)
else:
    model = MoETransformer(cfg.model, cfg.moe, device=device)
if device.type == "cuda":
    torch.cuda.synchronize()
seconds = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
params = sum(p.numel() for p in model.parameters())
print(json.dumps({"way": way, "seconds": seconds, "peak_rss_bytes": peak - base, "base_rss_bytes": base,
                  "params": params, "checksum": float(sum(p.double().sum() for p in model.parameters()))}))
"""


def run(way: str, device: str, experts: int) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, way, device, str(experts)],
                         capture_output=True, text=True, timeout=900)
    if out.returncode != 0:
        return {"way": way, "error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else "failed"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--experts", type=int, default=32)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    results = {way: run(way, args.device, args.experts) for way in ("eager", "meta")}
    gib = 1 << 30
    for way, r in results.items():
        if "error" in r:
            print(f"{way:5s}: not available here ({r['error']})")
            continue
        print(f"{way:5s}: {r['params'] / 1e9:.2f}B parameters, {r['seconds']:.1f} s, peak RSS "
              f"{r['peak_rss_bytes'] / gib:.2f} GiB above base {r['base_rss_bytes'] / gib:.2f} GiB "
              f"(checksum {r['checksum']:.6e})")
    e, m = results["eager"], results["meta"]
    if "error" not in e and "error" not in m:
        print(f"meta / eager: time {m['seconds'] / e['seconds']:.2f}x, "
              f"peak RSS {m['peak_rss_bytes'] / max(e['peak_rss_bytes'], 1):.2f}x, "
              f"same weights: {e['checksum'] == m['checksum']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    main()
