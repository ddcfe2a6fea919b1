"""The whole sharding story: a 3-axis device mesh, and rules from logical axis names to mesh axes.

Parameters name their axes logically in gpt/model.py ("vocab", "embed", "heads", "mlp", ...). RULES maps
those names to the mesh axes ("data", "fsdp", "tensor"). With the default mesh (every device on `data`)
each rule that names fsdp or tensor maps onto an axis of size 1, so everything is replicated: plain data
parallelism. Give devices to `fsdp` and parameters plus optimizer state are split over it (ZeRO-3); give
them to `tensor` and attention heads, the MLP hidden layer and the vocabulary are split Megatron-style.
DP -> FSDP -> TP is a change of mesh shape, never of code.

A rule whose mesh axis is already used by an earlier dimension of the same array leaves that dimension
unsharded (Flax's logical-axis resolution), so activations ("batch", "seq", "embed") shard their batch over
data x fsdp and keep embed whole.
"""

from __future__ import annotations

import contextlib
import math

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from gpt.config import ConfigError, MeshConfig

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")  # the global batch is split over both

RULES = (
    ("batch", BATCH_AXES),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),  # grouped-query attention's key/value heads
    ("mlp", "tensor"),
    ("embed", "fsdp"),
    ("head_dim", None),
    ("pos", None),
    ("seq", None),
    ("layers", None),  # scan_layers' stacked axis: every device holds every layer's slice of a parameter
)


def mesh_shape(m: MeshConfig, n_devices: int) -> tuple[int, int, int]:
    """Resolve -1 (at most one) to the devices left over; the product must be the device count."""
    sizes = [m.mesh_data, m.mesh_fsdp, m.mesh_tensor]
    if sizes.count(-1) > 1:
        # The default is mesh_data=-1; a user who sets another axis to -1 means "that one takes the rest".
        sizes = [1 if s == -1 and a == "data" else s for s, a in zip(sizes, AXES)]
    if any(s == 0 or s < -1 for s in sizes):
        raise ConfigError(f"mesh sizes {dict(zip(AXES, sizes))}: each must be a positive integer or -1")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if n_devices % known:
            raise ConfigError(f"mesh {dict(zip(AXES, sizes))} does not divide the {n_devices} devices")
        sizes[sizes.index(-1)] = n_devices // known
    if math.prod(sizes) != n_devices:
        raise ConfigError(f"mesh data={sizes[0]} x fsdp={sizes[1]} x tensor={sizes[2]} = {math.prod(sizes)} "
                          f"devices, but there are {n_devices}")
    return tuple(sizes)


def initialize_distributed(m: MeshConfig) -> None:
    """Join a multi-process run, before JAX touches any device. Explicit flags win; `distributed=True`
    lets JAX read the cluster's environment (SLURM, TPU pods, Open MPI)."""
    if m.num_processes < 1 or not 0 <= m.process_id < m.num_processes:
        raise ConfigError(f"process_id={m.process_id} with num_processes={m.num_processes}: "
                          "need 0 <= process_id < num_processes")
    if m.num_processes > 1 and not m.coordinator_address:
        raise ConfigError(f"num_processes={m.num_processes} needs --coordinator_address=HOST:PORT of process 0")
    if m.num_processes == 1 and not m.distributed:
        return
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU collectives across processes
    if m.num_processes > 1:
        jax.distributed.initialize(m.coordinator_address, m.num_processes, m.process_id)
    else:
        jax.distributed.initialize()


def make_mesh(m: MeshConfig) -> jax.sharding.Mesh:
    # Auto axes: XLA propagates shardings from the ones we declare (recent JAX defaults to Explicit).
    return jax.make_mesh(mesh_shape(m, jax.device_count()), AXES,
                         axis_types=(jax.sharding.AxisType.Auto,) * len(AXES))


@contextlib.contextmanager
def activate(mesh: jax.sharding.Mesh):
    """The mesh and rules in force while tracing, so the model's activation constraints resolve."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(RULES):
        yield


def logical_to_sharding(logical_specs, mesh: jax.sharding.Mesh):
    """A tree of logical PartitionSpecs -> the tree of NamedShardings on this mesh."""
    return nn.logical_to_mesh_sharding(logical_specs, mesh, RULES)


def batch_sharding(mesh: jax.sharding.Mesh, leading: int = 0) -> NamedSharding:
    """Sharding of a [..., batch, seq] array whose batch axis comes after `leading` unsplit axes."""
    return NamedSharding(mesh, P(*([None] * leading), BATCH_AXES))


def check_batch(batch_size: int, mesh: jax.sharding.Mesh) -> None:
    ways = mesh.shape["data"] * mesh.shape["fsdp"]
    if batch_size % ways:
        raise ConfigError(f"batch_size={batch_size} does not split over data x fsdp = {ways} devices: "
                          f"use a multiple of {ways}")


def global_batch(local_rows: np.ndarray, sharding: NamedSharding, global_shape: tuple[int, ...]) -> jax.Array:
    """Assemble the global batch from the rows this process loaded (every process loads only its own)."""
    return jax.make_array_from_process_local_data(sharding, local_rows, global_shape)


def process_rows(sharding: NamedSharding, global_shape: tuple[int, ...], axis: int) -> slice:
    """The contiguous range of global rows (along `axis`) that this process's devices hold."""
    index = sharding.addressable_devices_indices_map(global_shape).values()
    starts = [idx[axis].start or 0 for idx in index]
    stops = [global_shape[axis] if idx[axis].stop is None else idx[axis].stop for idx in index]
    return slice(min(starts), max(stops))


def shard_init(init_fn, mesh: jax.sharding.Mesh, *args):
    """Shapes and shardings of what init_fn(*args) returns (Flax boxes carry the logical axes), and a jitted
    init that creates every array directly in its shard: no device ever holds a replicated full copy."""
    boxed = jax.eval_shape(init_fn, *args)
    # An optimizer's placeholders for parameters another of its transforms owns (optax's MaskedNode) come boxed
    # like those parameters: unbox them, so they stay empty nodes instead of getting a sharding.
    boxed = jax.tree.map(lambda x: x.value if isinstance(x, nn.Partitioned) and not hasattr(x.value, "shape") else x,
                         boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    shardings = logical_to_sharding(nn.get_partition_spec(boxed), mesh)
    unboxed = jax.tree.map(lambda x: x.value if isinstance(x, nn.Partitioned) else x, boxed,
                           is_leaf=lambda x: isinstance(x, nn.Partitioned))  # no constraint outside jit
    jax.tree_util.tree_map_with_path(_check_divides, unboxed, shardings)
    abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), unboxed, shardings)
    init = jax.jit(lambda *a: nn.unbox(init_fn(*a)), out_shardings=shardings)
    return abstract, shardings, init


def _check_divides(path, x, sharding: NamedSharding) -> None:
    """One line, instead of JAX's IndivisibleError, when a parameter's axis does not split over its mesh axes
    (3 heads over tensor=4, one key/value head over tensor=2)."""
    for size, axes in zip(x.shape, sharding.spec):
        names = (axes,) if isinstance(axes, str) else tuple(axes or ())
        ways = math.prod(sharding.mesh.shape[a] for a in names)
        if size % ways:
            where = ".".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)
            raise ConfigError(f"{where} has an axis of {size} that does not split over mesh {' x '.join(names)} = "
                              f"{ways}: make n_embd, n_head, n_kv_head, the MLP width and the vocabulary multiples of it, or "
                              "use a smaller mesh axis")
