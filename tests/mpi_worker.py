"""Run under mpiexec by test_launch_mpi.py: rank discovery through the MPI environment,
MASTER_ADDR broadcast through mpi4py, then an expert-parallel layer over gloo that must
match a single-process computation of the same global batch."""

import torch
import torch.distributed as dist

from moe_train.moe.config import MoEConfig
from moe_train.moe.layer import MoELayer
from moe_train.parallel.groups import build_groups
from moe_train.parallel.init import init_distributed
from moe_train.parallel.topology import Topology


def main() -> None:
    env, device = init_distributed(timeout_s=60)
    assert env.source == "mpi", env
    groups = build_groups(Topology(env.world_size, env.world_size, 4), env.rank)
    cfg = MoEConfig(num_experts=4, top_k=2, d_ff=16, capacity_factor=1.0, seed=5)
    torch.manual_seed(0)
    layer = MoELayer(cfg, 8, ep_group=groups.ep)
    torch.manual_seed(0)
    single = MoELayer(cfg, 8)
    gen = torch.Generator().manual_seed(1)
    chunks = [torch.randn(10, 8, generator=gen) for _ in range(env.world_size)]
    y = layer(chunks[env.rank]).y
    y.sum().backward()
    want = single(chunks[env.rank]).y
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-6)
    dist.barrier()
    print(f"OK rank {env.rank} of {env.world_size} via {env.source}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
