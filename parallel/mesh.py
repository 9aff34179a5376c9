"""The device mesh: world = PP x DP, with expert-parallel groups carved out of DP.

Rank layout (row-major over the mesh dims ("pp", "edp", "ep")):

    rank = pp_rank * dp + dp_rank,     dp_rank = edp_rank * ep + ep_rank

so the EP group (ranks that exchange tokens by all-to-all) is a run of consecutive ranks, which
keeps it inside a node when EP <= GPUs per node. The expert-data-parallel group (EDP, size
dp / ep) holds replicas of the same expert shard; ZeRO-1 shards expert optimizer state over it,
dense optimizer state over the whole DP group.

`check_parallel_config` runs before any rank does work, so a config that cannot run fails with
one message naming the numbers instead of a hang.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from train.config import Config
from train.errors import ConfigError

SCHEDULES = ("interleaved_1f1b", "1f1b", "interleaved_zero_bubble")


def check_parallel_config(cfg: Config, world_size: int) -> None:
    """Raise ConfigError (naming the numbers) if cfg cannot run on world_size ranks."""
    p, m = cfg.parallel, cfg.model
    if p.pp * p.dp != world_size:
        raise ConfigError(
            f"parallel.pp * parallel.dp = {p.pp} * {p.dp} = {p.pp * p.dp} does not match the "
            f"world size {world_size}")
    if p.dp % p.ep != 0:
        raise ConfigError(f"parallel.ep={p.ep} must divide parallel.dp={p.dp} "
                          "(expert-parallel groups are carved out of data parallelism)")
    if m.n_routed_experts % p.ep != 0:
        raise ConfigError(f"model.n_routed_experts={m.n_routed_experts} is not divisible by "
                          f"parallel.ep={p.ep}")
    chunks = p.pp * p.virtual_stages
    if m.num_layers < chunks:
        raise ConfigError(
            f"model.num_layers={m.num_layers} cannot be split over parallel.pp * "
            f"parallel.virtual_stages = {p.pp} * {p.virtual_stages} = {chunks} pipeline chunks "
            "(each chunk needs at least one layer)")
    if p.schedule not in SCHEDULES:
        raise ConfigError(f"parallel.schedule={p.schedule!r}; choose one of {list(SCHEDULES)}")
    n = p.microbatches
    if p.schedule == "1f1b":
        if p.virtual_stages != 1:
            raise ConfigError(f"parallel.schedule='1f1b' runs one stage per rank but "
                              f"parallel.virtual_stages={p.virtual_stages}; use "
                              "'interleaved_1f1b' for virtual stages")
        if n < p.pp:
            raise ConfigError(f"parallel.microbatches={n} must be >= parallel.pp={p.pp} for "
                              "the 1f1b schedule")
    else:
        rounds = max(1, n // p.pp)
        if n % rounds != 0:
            raise ConfigError(
                f"parallel.microbatches={n} must be a multiple of the number of rounds "
                f"max(1, microbatches // pp) = {rounds} (pp={p.pp}) for schedule {p.schedule!r}")
    per_step = p.dp * n
    if cfg.data.global_batch_size % per_step != 0:
        raise ConfigError(
            f"data.global_batch_size={cfg.data.global_batch_size} is not divisible by "
            f"parallel.dp * parallel.microbatches = {p.dp} * {n} = {per_step}")


@dataclass
class ParallelMesh:
    """This rank's place in the mesh and the process groups it talks over."""

    device_mesh: DeviceMesh
    pp: int
    dp: int
    ep: int
    pp_rank: int
    dp_rank: int
    ep_rank: int
    edp_rank: int
    pp_group: dist.ProcessGroup
    dp_group: dist.ProcessGroup  # all replicas of one pipeline stage (dense ZeRO-1 group)
    ep_group: dist.ProcessGroup  # ranks exchanging tokens for one MoE layer
    edp_group: dist.ProcessGroup  # replicas of one expert shard (expert ZeRO-1 group)
    world_group: dist.ProcessGroup

    @property
    def edp(self) -> int:
        return self.dp // self.ep

    @property
    def rank(self) -> int:
        return self.pp_rank * self.dp + self.dp_rank

    @property
    def world_size(self) -> int:
        return self.pp * self.dp

    def global_rank(self, pp_rank: int, dp_rank: int) -> int:
        """Global rank of the mesh position (pp_rank, dp_rank)."""
        return pp_rank * self.dp + dp_rank


def build_mesh(cfg: Config, device_type: str = "cpu") -> ParallelMesh:
    """Validate cfg against the initialised default process group, then build the mesh."""
    if not dist.is_initialized():
        raise RuntimeError("build_mesh needs an initialised default process group")
    world = dist.get_world_size()
    check_parallel_config(cfg, world)
    p = cfg.parallel
    mesh = init_device_mesh(device_type, (p.pp, p.dp // p.ep, p.ep),
                            mesh_dim_names=("pp", "edp", "ep"))
    dp_mesh = mesh["edp", "ep"]._flatten("dp")
    rank = dist.get_rank()
    pp_rank, dp_rank = divmod(rank, p.dp)
    edp_rank, ep_rank = divmod(dp_rank, p.ep)
    assert mesh.get_coordinate() == [pp_rank, edp_rank, ep_rank] or \
        tuple(mesh.get_coordinate()) == (pp_rank, edp_rank, ep_rank)
    return ParallelMesh(
        device_mesh=mesh, pp=p.pp, dp=p.dp, ep=p.ep,
        pp_rank=pp_rank, dp_rank=dp_rank, ep_rank=ep_rank, edp_rank=edp_rank,
        pp_group=mesh.get_group("pp"), dp_group=dp_mesh.get_group(),
        ep_group=mesh.get_group("ep"), edp_group=mesh.get_group("edp"),
        world_group=dist.group.WORLD)
