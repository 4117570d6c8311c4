"""A stand-in for ``python -m moe_train train`` that keeps the trainer's preemption
contract in a few lines, without torch, to test the Slurm plumbing (signals through the
batch shell and srun, exit 85, requeue, resume) in seconds:

    MOE_TRAIN_PYTHON="python tests/slurm/fake_trainer.py" sbatch slurm/train_multinode.sbatch ...

The launcher then runs ``python tests/slurm/fake_trainer.py -m moe_train train ARGS``; the
arguments are ignored. Environment: FAKE_DIR (state: ``latest`` holds the last
checkpointed step), FAKE_STEPS (default 40), FAKE_STEP_S (seconds per step, 0.25),
FAKE_FAIL="STEP:RANK" (that rank exits 3 at that step). Rank from SLURM_PROCID.

Contract (moe_train.train): on SIGUSR1 or SIGTERM stop at the next step boundary,
checkpoint, exit 85; exit 0 when done; any other code is a failure.
"""

import os
import signal
import socket
import sys
import time

EXIT_REQUEUE = 85

rank = int(os.environ.get("SLURM_PROCID", "0"))
world = int(os.environ.get("SLURM_NTASKS", "1"))
state_dir = os.environ["FAKE_DIR"]
steps = int(os.environ.get("FAKE_STEPS", "40"))
step_s = float(os.environ.get("FAKE_STEP_S", "0.25"))
fail_step, _, fail_rank = os.environ.get("FAKE_FAIL", ":").partition(":")
stop = []


def say(text):
    print(f"[fake rank {rank}] {text}", flush=True)


def on_signal(signum, frame):
    stop.append(signal.Signals(signum).name)
    say(f"got {signal.Signals(signum).name}")


signal.signal(signal.SIGUSR1, on_signal)
signal.signal(signal.SIGTERM, on_signal)
latest = os.path.join(state_dir, "latest")
start = int(open(latest).read()) if os.path.exists(latest) else 0
say(f"world {world} on node {os.environ.get('SLURMD_NODENAME', '?')} ({socket.gethostname()}), "
    f"MASTER_ADDR={os.environ.get('MASTER_ADDR')} MASTER_PORT={os.environ.get('MASTER_PORT')}")
if start and rank == 0:
    say(f"resumed from {latest} at step {start}")
for step in range(start + 1, steps + 1):
    time.sleep(step_s)
    if fail_step and int(fail_step) == step and int(fail_rank) == rank:
        say(f"failing at step {step}")
        sys.exit(3)
    if rank == 0:
        say(f"step {step}/{steps}")
    if stop:
        if rank == 0:
            with open(latest + ".tmp", "w") as f:
                f.write(str(step))
            os.replace(latest + ".tmp", latest)
        say(f"stopping at step {step} on {stop[0]}: checkpoint written, exit {EXIT_REQUEUE}")
        sys.exit(EXIT_REQUEUE)
if rank == 0:
    with open(latest, "w") as f:
        f.write(str(steps))
say("done")
