"""FSDP2 (``fully_shard``) wrapping of the transformer, used under Lightning's ``ModelParallelStrategy``.

Each block is its own FSDP unit so that only one block's full parameters are materialised at a time, and the
root unit holds the embedding, final norm and head. MoE and AoE layers call every expert on every rank each
step (on an empty slice if needed), so all ranks issue the same collectives even when routing differs.
"""

from __future__ import annotations

from torch.distributed.device_mesh import DeviceMesh

from aoe_lightning.models import Transformer


def shard_transformer(model: Transformer, device_mesh: DeviceMesh) -> None:
    from torch.distributed.fsdp import fully_shard

    mesh = device_mesh["data_parallel"] if device_mesh.mesh_dim_names else device_mesh
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)


def fsdp_strategy(sharded_checkpoint: bool = True):
    """Lightning's ``ModelParallelStrategy`` as pure FSDP2: one data-parallel mesh dimension over every
    process of every node, no tensor parallelism. (With ``"auto"`` sizes Lightning would split the processes
    of a node across tensor parallelism instead.)"""
    from lightning.pytorch.strategies import ModelParallelStrategy

    class FullyShardedDataParallel(ModelParallelStrategy):
        def setup_environment(self) -> None:
            self._data_parallel_size = self.num_nodes * self.num_processes
            self._tensor_parallel_size = 1
            super().setup_environment()

    return FullyShardedDataParallel(save_distributed_checkpoint=sharded_checkpoint)
