"""moe_train: Mixture-of-Experts pretraining with expert parallelism and DeepSpeed ZeRO.

A folder per stage of a run; imports only go down (bottom first), with no cycles:

  config_checks, parallel/, data/   shared checks; ranks, groups, collectives, launch; data
  moe/, model/                      router -> dispatcher -> experts -> layer; the transformer
  config                            the root Config composing every section
  checkpoint/                       formats, manifests, atomic publish, which one to resume
  train/                            the loop, the step, the DeepSpeed bridge, metrics
  inference/                        a checkpoint in one process: load, generate, int8, eval
  transform/, hf/                   checkpoint in, checkpoint out; Hugging Face both ways
  commands/, cli, __main__          one small file per ``moe-train`` subcommand

docs/layout.md has the map file by file; tests/test_layout.py checks the rules.
"""

__version__ = "0.1.0"
