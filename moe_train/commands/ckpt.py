"""``moe-train ckpt``: list a run's checkpoints, verify them against their manifests
(``ckpt verify PATH``), or make one loadable at any layout (``ckpt canonical PATH``)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def cmd_ckpt(args: argparse.Namespace) -> int:
    """Lists a run's checkpoints (step, tokens, topology, complete or not, size),
    verifies checkpoints against their manifests (``ckpt verify PATH``), or converts one
    into a canonical checkpoint that loads at any layout (``ckpt canonical PATH``)."""
    from moe_train.checkpoint.canonical import complete_canonical
    from moe_train.checkpoint.state import LATEST, list_checkpoints
    from moe_train.config import load_config

    if args.action == "verify":
        return _verify(args.path or args.dir)
    if args.action == "canonical":
        return _canonical(args.path or args.dir)
    if args.path:
        raise ValueError(f"`ckpt {args.path}`: the actions are list (default), verify PATH and canonical PATH")
    root = args.dir
    if args.config:
        root = load_config(args.config, args.overrides).checkpoint.dir
    if not root:
        raise ValueError("give a checkpoint directory (--dir) or --config")
    entries = list_checkpoints(root)
    if not entries:
        print(f"no checkpoints under {root}")
        return 0
    pointer = Path(root) / LATEST
    latest = pointer.read_text().strip() if pointer.is_file() else None
    print(f"{'checkpoint':<24} {'step':>8} {'tokens':>14} {'world':>5} {'ep':>3} {'MiB':>8}  state")
    for path, meta, complete in entries:
        size = sum(f.stat().st_size for f in path.iterdir() if f.is_file()) / 2 ** 20
        topo = (meta or {}).get("topology", {})
        status = "complete" if complete else "INCOMPLETE (ignored by --resume auto)"
        if path.name == latest:
            status += ", latest"
        if complete and complete_canonical(path):
            status += ", + canonical (any layout)"
        print(f"{path.name:<24} {(meta or {}).get('step', '?'):>8} {(meta or {}).get('tokens_seen', '?'):>14,} "
              f"{topo.get('world_size', '?'):>5} {topo.get('ep_size', '?'):>3} {size:>8.1f}  {status}"
              if meta else f"{path.name:<24} {'?':>8} {'?':>14} {'?':>5} {'?':>3} {size:>8.1f}  {status}")
    return 0


def _verify(target: str | None) -> int:
    """Checks one checkpoint (a step directory) or every checkpoint under a
    checkpoint.dir against its manifest, without loading a model. Exit 0 when all pass,
    3 when any fails (each problem on its own line)."""
    from moe_train.checkpoint.state import list_checkpoints, read_meta
    from moe_train.checkpoint.verify import verify_checkpoint

    if not target:
        raise ValueError("ckpt verify needs a checkpoint directory: moe-train ckpt verify PATH")
    path = Path(target)
    if not path.exists():
        raise ValueError(f"ckpt verify {target}: no such directory")
    steps = [path] if (path / "meta.json").is_file() else [p for p, _, _ in list_checkpoints(path)
                                                            if p.name.startswith("step_")]
    if not steps:
        raise ValueError(f"ckpt verify {target}: neither a checkpoint (no meta.json) nor a directory of them")
    failed = 0
    for step_dir in steps:
        if (read_meta(step_dir) or {}).get("kind") == "canonical":  # PATH/canonical itself
            failed += _verify_canonical(step_dir)
            continue
        problems = verify_checkpoint(step_dir)
        meta = read_meta(step_dir) or {}
        files = meta.get("manifest", {}).get("files", {})
        tensors = sum(len(f["tensors"]) for f in files.values())
        if problems:
            failed += 1
            print(f"FAILED  {step_dir}: {len(problems)} problem(s)")
            for problem in problems:
                print(f"  - {problem}")
        else:
            kind = "weights only" if meta.get("weights_only") else "weights + optimizer + RNG"
            print(f"OK      {step_dir}: {len(files)} files, {tensors} tensors match the manifest ({kind})")
        failed += _verify_canonical(step_dir / "canonical")
    return 3 if failed else 0


def _verify_canonical(path: Path) -> int:
    """Prints the verification of a step's canonical checkpoint, if it has one; 1 if it fails."""
    from moe_train.checkpoint.canonical import verify

    if not path.is_dir():
        return 0
    problems = verify(path)
    if problems:
        print(f"FAILED  {path}: {len(problems)} problem(s)")
        for problem in problems:
            print(f"  - {problem}")
        return 1
    manifest = json.loads((path / "meta.json").read_text())["manifest"]
    print(f"OK      {path}: {len(manifest['files'])} files, {len(manifest['tensors'])} tensors match the "
          f"manifest (canonical: any layout)")
    return 0


def _canonical(target: str | None) -> int:
    """``ckpt canonical PATH``: writes PATH/canonical from an engine checkpoint
    (``moe_train.transform.convert``: the saved number of ranks, gloo on CPU when not
    launched)."""
    from moe_train.checkpoint.state import read_meta
    from moe_train.transform.convert import convert

    if not target:
        raise ValueError("ckpt canonical needs an engine checkpoint: moe-train ckpt canonical PATH")
    if not Path(target).exists():
        raise ValueError(f"ckpt canonical {target}: no such directory")
    out = convert(target)
    meta = read_meta(out)
    topo, size = meta["topology"], sum(f["bytes"] for f in meta["manifest"]["files"].values()) / 2 ** 20
    print(f"OK      {out}: canonical checkpoint of step {meta['step']} from the ZeRO partitions of "
          f"{topo['world_size']} ranks (ep {topo['ep_size']}); {len(meta['manifest']['tensors'])} tensors, "
          f"{size:.1f} MiB, verified. `moe-train train --resume {out}` loads it at any world size, ep "
          f"dividing {topo['num_experts']} and ZeRO stage 0-2 (--resume auto picks it at another layout)")
    return 0


def register(subparsers) -> None:
    ck = subparsers.add_parser("ckpt", help="list a run's checkpoints (step, tokens, topology, complete), "
                                            "verify them (ckpt verify PATH), or make one loadable at any layout "
                                            "(ckpt canonical PATH)")
    ck.add_argument("action", nargs="?", default="list", choices=["list", "verify", "canonical"],
                    help="list (default); verify PATH against its manifest (no model, no GPU); canonical "
                         "PATH: write PATH/canonical, which resumes at any world size, ep and ZeRO stage "
                         "(runs the saved number of ranks: gloo processes on this CPU, or under a launcher)")
    ck.add_argument("path", nargs="?", default=None,
                    help="verify, canonical: a step_N directory or a checkpoint.dir (canonical: its newest)")
    ck.add_argument("--dir", default=None, help="checkpoint directory (checkpoint.dir)")
    ck.add_argument("--config", default=None, help="or: read checkpoint.dir from this config")
    ck.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    ck.set_defaults(func=cmd_ckpt)
