"""Device mesh, logical axis rules and shardings: everything the trainer knows about devices.

Models name *logical* axes ('batch', 'embed', 'mlp', ...). A `Partitioner` owns a mesh with
the axes ('data', 'fsdp', 'model') and a list of (logical, mesh axis) rules, and turns logical
PartitionSpecs into `NamedSharding`s for params, optimizer state, batches and activations.

Rule semantics follow T5X/flax: rules are visited in order and a logical name takes the first
rule whose mesh axes are not yet used by another dimension of the same array, so the same
rules serve weights (`[embed, mlp]`) and activations (`[batch, length, embed]`).
"""
import contextlib
import dataclasses
import logging
import math
import numbers
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple, Union

import jax
import numpy as np
from flax.core import spmd as flax_spmd
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ssr_jax.errors import UserError

MESH_AXES = ("data", "fsdp", "model")
MeshAxes = Union[None, str, Tuple[str, ...]]
LogicalRules = Sequence[Tuple[str, MeshAxes]]

# T5X's standard rules: data parallelism plus 1-D model (tensor) parallelism.
STANDARD_RULES: LogicalRules = (
        ("batch", "data"),
        ("vocab", "model"),
        ("mlp", "model"),
        ("heads", "model"),
        ("joined_kv", "model"),
        ("kv", None),
        ("embed", None),
        ("length", None),
        ("relpos_buckets", None),
)

# ZeRO-3 style: weights sharded over 'fsdp' along embed, the batch over data x fsdp; model
# parallel axes as in the standard rules (they only matter when 'model' > 1).
FSDP_RULES: LogicalRules = (
        ("batch", ("data", "fsdp")),
        ("vocab", "model"),
        ("mlp", "model"),
        ("heads", "model"),
        ("joined_kv", "model"),
        ("embed", "fsdp"),
        ("kv", None),
        ("length", None),
        ("relpos_buckets", None),
)

# Standard rules plus 'embed' over 'model' where 'model' is still free: activations between
# layers ([batch, length, embed]) and vectors such as norm scales are split too (T5X's
# activation_partitioning_dims=2). Rule order keeps mlp/heads/vocab ahead of embed.
TENSOR_PARALLEL_RULES: LogicalRules = STANDARD_RULES[:-4] + (
        ("kv", None),
        ("embed", "model"),
        ("length", None),
        ("relpos_buckets", None),
)

RULE_PRESETS = {
        "standard": STANDARD_RULES,
        "fsdp": FSDP_RULES,
        "tensor_parallel": TENSOR_PARALLEL_RULES,
}


def get_rules(rules: Union[str, LogicalRules]) -> Tuple[Tuple[str, MeshAxes], ...]:
    """A preset name or an explicit rule list, validated and normalised to tuples."""
    if isinstance(rules, str):
        if rules not in RULE_PRESETS:
            raise UserError(f"Partitioner.logical_axis_rules={rules!r} is not a preset; use one "
                            f"of {sorted(RULE_PRESETS)} or a list of (logical, mesh_axis) pairs.")
        return tuple(RULE_PRESETS[rules])
    out = []
    for rule in rules:
        if len(rule) != 2 or not isinstance(rule[0], str):
            raise UserError(f"logical axis rule {rule!r} must be a (logical_name, mesh_axis) pair.")
        logical, mesh = rule
        mesh = tuple(mesh) if isinstance(mesh, (list, tuple)) else mesh
        for axis in (mesh if isinstance(mesh, tuple) else (mesh,)):
            if axis is not None and axis not in MESH_AXES:
                raise UserError(f"logical axis rule {rule!r} names mesh axis {axis!r}; "
                                f"mesh axes are {MESH_AXES}.")
        out.append((logical, mesh))
    return tuple(out)


def logical_to_mesh_spec(logical: Optional[PartitionSpec], rules: LogicalRules,
                         shape: Optional[Sequence[int]] = None,
                         mesh_sizes: Optional[Mapping[str, int]] = None) -> PartitionSpec:
    """Maps one logical PartitionSpec to a mesh PartitionSpec.

    With `shape` and `mesh_sizes`, a dimension that the chosen mesh axes do not divide stays
    unsharded (e.g. 6 heads on model=4), instead of failing inside jit.
    """
    if logical is None:
        return PartitionSpec()
    names = tuple(logical)
    assigned: list = [None] * len(names)
    used: set = set()
    for rule_logical, mesh_axes in rules:
        for i, name in enumerate(names):
            if name != rule_logical or assigned[i] is not None or mesh_axes is None:
                continue
            axes = mesh_axes if isinstance(mesh_axes, tuple) else (mesh_axes,)
            if used.intersection(axes):
                continue
            if shape is not None and mesh_sizes is not None:
                if shape[i] % math.prod(mesh_sizes[a] for a in axes):
                    continue
            assigned[i] = mesh_axes
            used.update(axes)
    while assigned and assigned[-1] is None:
        assigned.pop()
    return PartitionSpec(*assigned)


@dataclasses.dataclass(frozen=True)
class DataLayout:
    """Which slice of the global batch this host feeds."""

    global_batch_size: int
    per_host_batch_size: int
    shard_index: int  # this host's slice of the batch (hosts with equal slices share data)
    num_shards: int

    @property
    def shard_info(self) -> Tuple[int, int]:
        return self.shard_index, self.num_shards


class Partitioner:
    """Mesh + logical axis rules; builds every sharding the trainer uses.

    Args:
        mesh_shape: mesh axis -> size, e.g. {'data': -1, 'fsdp': 1, 'model': 1}; one -1
            takes the remaining devices. Axes left out have size 1.
        logical_axis_rules: a preset name ('standard', 'fsdp', 'tensor_parallel') or a
            sequence of (logical, mesh axis or tuple of mesh axes or None) pairs.
        devices: defaults to all of `jax.devices()`.
    """

    def __init__(self, mesh_shape: Optional[Mapping[str, int]] = None,
                 logical_axis_rules: Union[str, LogicalRules] = "standard",
                 devices: Optional[Sequence[Any]] = None):
        self.rules = get_rules(logical_axis_rules)
        devices = list(jax.devices() if devices is None else devices)
        self.mesh_sizes = _resolve_mesh_shape(dict(mesh_shape or {"data": -1}), len(devices))
        self._mesh = _make_mesh(self.mesh_sizes, devices)

    @property
    def mesh(self) -> Mesh:
        return self._mesh

    def __repr__(self):
        return f"Partitioner(mesh={self.mesh_sizes}, rules={len(self.rules)} rules)"

    # --- shardings ---------------------------------------------------------------------------
    def mesh_spec(self, logical: Optional[PartitionSpec],
                  shape: Optional[Sequence[int]] = None) -> PartitionSpec:
        return logical_to_mesh_spec(logical, self.rules, shape, self.mesh_sizes)

    def sharding(self, spec: PartitionSpec = PartitionSpec()) -> NamedSharding:
        return NamedSharding(self._mesh, spec)

    def replicated(self) -> NamedSharding:
        return NamedSharding(self._mesh, PartitionSpec())

    def logical_to_sharding(self, logical_tree: Any, shapes: Any = None) -> Any:
        """A tree of logical PartitionSpecs (optionally with a matching tree of shaped leaves,
        which enables the divisibility fallback) -> tree of NamedShardings."""
        is_spec = lambda x: isinstance(x, PartitionSpec) or x is None  # noqa: E731
        if shapes is None:
            return jax.tree.map(lambda s: self.sharding(self.mesh_spec(s)), logical_tree,
                                is_leaf=is_spec)
        return jax.tree.map(
                lambda s, x: self.sharding(self.mesh_spec(s, np.shape(x))), logical_tree, shapes,
                is_leaf=is_spec)

    def param_shardings(self, abstract_params: Any, logical_axes: Any) -> Any:
        """Shardings for params from their shapes and the model's logical axes."""
        is_spec = lambda x: isinstance(x, PartitionSpec) or x is None  # noqa: E731
        if jax.tree.structure(abstract_params) != jax.tree.structure(logical_axes,
                                                                     is_leaf=is_spec):
            raise ValueError("param_logical_axes() does not have the structure of the params: "
                             f"{jax.tree.structure(logical_axes, is_leaf=is_spec)} vs "
                             f"{jax.tree.structure(abstract_params)}")
        return self.logical_to_sharding(logical_axes, abstract_params)

    def model_param_shardings(self, model: Any) -> Tuple[Any, Any]:
        """(abstract params, their shardings) of a BaseModel, from its logical axes."""
        abstract = model.abstract_params()
        return abstract, self.param_shardings(abstract, model.param_logical_axes())

    def opt_state_shardings(self, abstract_opt_state: Any, abstract_params: Any,
                            param_shardings: Any) -> Any:
        """Shardings for an optax state by matching its leaves to params by tree path.

        A leaf whose key path ends with a param's path takes that param's sharding when the
        shapes agree. Factored second moments (Adafactor's v_row / v_col) have the param's
        shape with one dimension removed: the removed dimension's mesh axis is dropped. If
        that dimension cannot be identified unambiguously, or nothing matches (step counts,
        dummies), the leaf is replicated; such leaves are small.
        """
        by_path: Dict[Tuple[str, ...], Tuple[Tuple[int, ...], PartitionSpec]] = {}
        flat_params = jax.tree_util.tree_flatten_with_path(abstract_params)[0]
        flat_shard = jax.tree.leaves(param_shardings)
        for (path, leaf), sharding in zip(flat_params, flat_shard):
            by_path[_path_key(path)] = (tuple(np.shape(leaf)), sharding.spec)
        max_len = max((len(k) for k in by_path), default=0)

        def leaf_sharding(path, leaf):
            key = _path_key(path)
            shape = tuple(np.shape(leaf))
            for start in range(max(0, len(key) - max_len), len(key)):
                if key[start:] in by_path:
                    p_shape, p_spec = by_path[key[start:]]
                    return self.sharding(_reduced_spec(shape, p_shape, p_spec))
            return self.replicated()

        return jax.tree_util.tree_map_with_path(leaf_sharding, abstract_opt_state)

    # --- batches -----------------------------------------------------------------------------
    @property
    def batch_mesh_axes(self) -> Tuple[str, ...]:
        """The mesh axes the batch dimension is split over (from the 'batch' rule)."""
        spec = self.mesh_spec(PartitionSpec("batch"))
        if not len(spec) or spec[0] is None:
            return ()
        return spec[0] if isinstance(spec[0], tuple) else (spec[0],)

    @property
    def num_batch_shards(self) -> int:
        return math.prod(self.mesh_sizes[a] for a in self.batch_mesh_axes)

    def batch_spec(self) -> PartitionSpec:
        axes = self.batch_mesh_axes
        if not axes:
            return PartitionSpec()
        return PartitionSpec(axes if len(axes) > 1 else axes[0])

    def batch_sharding(self) -> NamedSharding:
        return self.sharding(self.batch_spec())

    def data_layout(self, global_batch_size: int, num_microbatches: int = 1) -> DataLayout:
        """This host's share of the global batch: per-host size and shard index/count.

        Hosts whose devices hold the same rows of the batch (e.g. the 'model' axis spans
        hosts) get the same shard index and must read the same examples.
        """
        shards = self.num_batch_shards
        if (isinstance(global_batch_size, bool)
                or not isinstance(global_batch_size, numbers.Integral) or global_batch_size <= 0):
            raise UserError(f"BATCH_SIZE={global_batch_size!r} must be a positive integer "
                            f"(a multiple of {shards * num_microbatches} on this mesh).")
        if global_batch_size % (shards * num_microbatches):
            raise UserError(
                    f"BATCH_SIZE={global_batch_size} is not divisible by the batch mesh axes "
                    f"{self.batch_mesh_axes or '(none)'} of size {shards}"
                    + (f" times num_microbatches={num_microbatches}" if num_microbatches > 1
                       else "") + "; choose a multiple of "
                    f"{shards * num_microbatches}.")
        sharding = self.batch_sharding()
        index_map = sharding.addressable_devices_indices_map((global_batch_size,))
        rows = sorted({(idx[0].start or 0, idx[0].stop or global_batch_size)
                       for idx in index_map.values()})
        start, stop = rows[0][0], rows[-1][1]
        covered = sum(b - a for a, b in rows)
        if covered != stop - start:
            raise UserError(f"this host's devices hold non-contiguous rows {rows} of the batch; "
                            "reorder the mesh so each host's devices are adjacent on 'data'.")
        per_host = stop - start
        return DataLayout(global_batch_size=global_batch_size, per_host_batch_size=per_host,
                          shard_index=start // per_host, num_shards=global_batch_size // per_host)

    def make_global_batch(self, local_batch: Mapping[str, np.ndarray]) -> Dict[str, jax.Array]:
        """Host-local numpy arrays (this host's rows) -> global arrays sharded over the batch."""
        sharding = self.batch_sharding()
        num_hosts_rows = self._rows_multiplier()
        out = {}
        for key, value in local_batch.items():
            value = np.asarray(value)
            global_shape = (value.shape[0] * num_hosts_rows,) + value.shape[1:]
            out[key] = jax.make_array_from_process_local_data(sharding, value, global_shape)
        return out

    def _rows_multiplier(self) -> int:
        """Global batch rows / this host's rows, from the mesh (same for every batch)."""
        n = self.num_batch_shards
        index_map = self.batch_sharding().addressable_devices_indices_map((n,))
        local_rows = {idx[0].start or 0 for idx in index_map.values()}
        return n // len(local_rows) if self.batch_mesh_axes else 1

    def host_rows(self, x: jax.Array) -> np.ndarray:
        """This host's rows of a global [batch, ...] array, in the order of its host batch
        (`data_layout(batch)`), read from its own devices' shards: no collective. Works for
        batch-sharded and replicated arrays; other dimensions must not be sharded."""
        layout = self.data_layout(x.shape[0])
        start = layout.shard_index * layout.per_host_batch_size
        stop = start + layout.per_host_batch_size
        if x.is_fully_addressable:
            return np.asarray(x)[start:stop]
        out = np.empty((stop - start,) + tuple(x.shape[1:]), x.dtype)
        filled = np.zeros(stop - start, bool)
        for shard in x.addressable_shards:
            if any((s.start or 0) != 0 or s.stop not in (None, n)
                   for s, n in zip(shard.index[1:], x.shape[1:])):
                raise ValueError("host_rows needs arrays sharded on the batch dimension only")
            a = shard.index[0].start or 0
            b = x.shape[0] if shard.index[0].stop is None else shard.index[0].stop
            lo, hi = max(a, start), min(b, stop)
            if lo < hi and not filled[lo - start:hi - start].all():
                out[lo - start:hi - start] = np.asarray(shard.data)[lo - a:hi - a]
                filled[lo - start:hi - start] = True
        if not filled.all():
            raise ValueError("this host's devices do not hold all of its rows")
        return out

    # --- activations -------------------------------------------------------------------------
    @contextlib.contextmanager
    def activation_context(self):
        """Mesh + logical rules in scope, so `nn.with_logical_constraint` / nnx sharding
        annotations inside the model resolve against this mesh. Enter it around calls of
        jitted functions (tracing happens there); it cannot be entered inside jit."""
        with jax.set_mesh(self._mesh), flax_spmd.logical_axis_rules(self.rules):
            yield


# --- bytes per device -----------------------------------------------------------------------
def shard_bytes(abstract: Any, shardings: Any) -> int:
    """Bytes one device holds of a tree of (abstract) arrays with these shardings: the
    largest device's share (shards are even unless a dimension does not divide)."""
    total = 0
    for leaf, sharding in zip(jax.tree.leaves(abstract), jax.tree.leaves(shardings)):
        total += int(math.prod(sharding.shard_shape(leaf.shape))) * np.dtype(leaf.dtype).itemsize
    return total


def bytes_on_device(tree: Any, device: Any) -> int:
    """Bytes of a tree of global arrays that live on one device."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        for shard in leaf.addressable_shards:
            if shard.device == device:
                total += shard.data.size * shard.data.dtype.itemsize
    return total


def _path_key(path) -> Tuple[str, ...]:
    parts = []
    for p in path:
        for attr in ("key", "name", "idx"):
            if hasattr(p, attr):
                parts.append(str(getattr(p, attr)))
                break
        else:
            parts.append(str(p))
    return tuple(parts)


def _reduced_spec(shape: Tuple[int, ...], p_shape: Tuple[int, ...],
                  p_spec: PartitionSpec) -> PartitionSpec:
    """Spec for a leaf matched to a param: same shape -> same spec; one dim fewer -> drop
    the removed dim's entry (factored moments); otherwise replicate."""
    full = tuple(p_spec) + (None,) * (len(p_shape) - len(p_spec))
    if shape == p_shape:
        return p_spec
    if len(shape) == len(p_shape) - 1:
        candidates = {full[:i] + full[i + 1:] for i in range(len(p_shape))
                      if p_shape[:i] + p_shape[i + 1:] == shape}
        if len(candidates) == 1:
            spec = list(candidates.pop())
            while spec and spec[-1] is None:
                spec.pop()
            return PartitionSpec(*spec)
    return PartitionSpec()


def _resolve_mesh_shape(mesh_shape: Dict[str, int], num_devices: int) -> Dict[str, int]:
    unknown = set(mesh_shape) - set(MESH_AXES)
    if unknown:
        raise UserError(f"Partitioner.mesh_shape has unknown axes {sorted(unknown)}; "
                        f"mesh axes are {MESH_AXES}.")
    sizes = {a: int(mesh_shape.get(a, 1)) for a in MESH_AXES}
    fill = [a for a, s in sizes.items() if s == -1]
    if len(fill) > 1 or any(s == 0 or s < -1 for s in sizes.values()):
        raise UserError(f"Partitioner.mesh_shape={mesh_shape}: sizes must be positive, with at "
                        "most one -1 (fills the remaining devices).")
    known = math.prod(s for s in sizes.values() if s != -1)
    if fill:
        if num_devices % known:
            raise UserError(f"Partitioner.mesh_shape={mesh_shape}: the fixed axes (product "
                            f"{known}) do not divide the {num_devices} devices.")
        sizes[fill[0]] = num_devices // known
    elif known != num_devices:
        raise UserError(f"Partitioner.mesh_shape={mesh_shape} has {known} devices but "
                        f"{num_devices} are available; make the product equal, or use -1 on "
                        "one axis.")
    return sizes


def _make_mesh(sizes: Mapping[str, int], devices: Sequence[Any]) -> Mesh:
    shape = tuple(sizes[a] for a in MESH_AXES)
    try:
        from jax.experimental import mesh_utils  # topology-aware device order on TPU/GPU
        grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
    except Exception as e:  # pylint: disable=broad-except
        logging.info("create_device_mesh failed (%s); using the plain device order.", e)
        grid = np.asarray(devices).reshape(shape)
    auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    return Mesh(grid, MESH_AXES, axis_types=auto)
