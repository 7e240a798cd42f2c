"""Who writes what, and who reads what: a pure function of the topology, identical on every rank.

| pattern         | written by                              | file per       | read by                    |
| GLOBAL          | global rank 0                           | checkpoint     | every rank                 |
| REPLICATED      | global rank 0                           | checkpoint     | every rank                 |
| PER_RANK        | every rank                              | rank           | its rank                   |
| PER_GROUP(name) | lowest global rank of each instance     | group instance | members of that instance   |
| PER_NODE        | local rank 0 of each node               | node           | ranks of that node         |
| SHARDED         | every rank its distinct DTensor pieces   | shared files   | any rank, any world size   |
|                 | (plain values: global rank 0)           | (full tensors) | (resharded; sharding.py)   |

``discover_topology`` is the only part that talks to other ranks (once, at client construction);
``plan`` never does, so no rank can disagree about the plan and nothing in the save path hangs on it.
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass, field
from typing import Any

from ckptd import format as fmt
from ckptd.protocol import ComponentSpec
from client.components import CheckpointError, SharingPattern, StateComponent

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Topology:
    rank: int
    world_size: int
    node_of: tuple[int, ...]  # node index of every global rank (nodes numbered by their lowest rank)
    groups: dict[str, tuple[tuple[int, ...], ...]] = field(default_factory=dict)  # name -> instances

    @property
    def node(self) -> int:
        return self.node_of[self.rank]

    @property
    def nnodes(self) -> int:
        return max(self.node_of) + 1

    def node_ranks(self, node: int) -> list[int]:
        return [r for r, n in enumerate(self.node_of) if n == node]

    @property
    def local_rank(self) -> int:
        return self.node_ranks(self.node).index(self.rank)

    def node_leader(self, node: int) -> int:
        return self.node_ranks(node)[0]

    def instance_of(self, group: str, rank: int) -> int:
        for i, members in enumerate(self.groups[group]):
            if rank in members:
                return i
        raise CheckpointError(f"rank {rank} belongs to no instance of process group {group!r}")

    def describe(self) -> dict[str, Any]:
        return {
            "world_size": self.world_size,
            "nnodes": self.nnodes,
            "node_of_rank": list(self.node_of),
            "groups": {k: [list(m) for m in v] for k, v in self.groups.items()},
        }


NODE_ID_ENV = "CKPTD_NODE_ID"


def node_identity(environ: dict[str, str] | None = None) -> str:
    """What names this rank's node, the same on every rank of it: ``$CKPTD_NODE_ID`` (an override, e.g. to
    simulate nodes on one machine), else torchrun's ``GROUP_RANK`` (the node rank), else Slurm's
    ``SLURM_NODEID``, else the host name.

    Args:
        environ: the environment to read (default ``os.environ``).

    Example:
        >>> node_identity({"GROUP_RANK": "1"})
        'torchrun-node-1'
        >>> node_identity({"CKPTD_NODE_ID": "a", "GROUP_RANK": "1"})
        'id-a'
    """
    env = os.environ if environ is None else environ
    if env.get(NODE_ID_ENV):
        return f"id-{env[NODE_ID_ENV]}"
    if env.get("GROUP_RANK"):
        return f"torchrun-node-{env['GROUP_RANK']}"
    if env.get("SLURM_NODEID"):
        return f"slurm-node-{env['SLURM_NODEID']}"
    return f"host-{socket.gethostname()}"


def single_process_topology() -> Topology:
    return Topology(rank=0, world_size=1, node_of=(0,))


def _group_ranks(group: Any) -> list[int]:
    import torch.distributed as dist

    if hasattr(group, "get_group") and hasattr(group, "mesh"):  # a 1-D DeviceMesh (or a mesh dim)
        group = group.get_group()
    return sorted(dist.get_process_group_ranks(group))


def daemon_key(endpoint: str | None) -> str:
    """Which daemon an endpoint reaches: an IPC socket is per host, a tcp:// endpoint is one daemon anywhere."""
    if endpoint is None or endpoint.startswith("tcp://"):
        return str(endpoint)
    return f"{socket.gethostname()} {endpoint}"


def _nodes_by_daemon(gathered: list[Any]) -> list[str]:
    """Each rank's node name, after reconciling the launcher's nodes with the daemons the ranks reach.

    A node is one daemon: launcher nodes that reach the same daemon (two torchrun launches on one host with
    the default endpoint) become one node, as the host name made them before; unless their ids were given
    explicitly in $CKPTD_NODE_ID, which asks for separate nodes that cannot share a daemon. Ranks of one node
    that reach different daemons are left as the launcher says (a test may point one rank elsewhere). Same
    verdict on every rank (gathered values)."""
    names = [g[0] for g in gathered]
    nodes_of: dict[str, set[str]] = {}
    for name, _, _, key in gathered:
        nodes_of.setdefault(key, set()).add(name)
    merged: dict[str, str] = {}
    for key, nodes in nodes_of.items():
        if len(nodes) == 1:
            continue
        explicit = sorted(n for n in nodes if n.startswith("id-"))
        if explicit:
            raise CheckpointError(
                f"nodes {sorted(nodes)} all reach the daemon at {key.split(' ', 1)[-1]}, but one daemon serves one "
                f"node; give each node its own CKPTD_ENDPOINT, or the same {NODE_ID_ENV}"
            )
        for n in nodes:
            merged[n] = f"daemon-{key}"
    if merged:
        logger.info("launcher nodes %s share one daemon: they are one node for ckptd", sorted(merged))
    return [merged.get(n, n) for n in names]


def discover_topology(process_groups: dict[str, Any] | None, gloo_group: Any, endpoint: str | None = None) -> Topology:
    """Collect node membership and every instance of every named group (one all_gather, at start-up).

    Args:
        process_groups: the named groups of PER_GROUP components (ProcessGroups or 1-D DeviceMeshes).
        gloo_group: the client's own gloo group the gather runs on.
        endpoint: this rank's daemon endpoint; ranks that reach one daemon are one node.

    Example:
        >>> discover_topology(None, group, "ipc:///tmp/ckptd-0/ckptd.sock").nnodes  # doctest: +SKIP
        2
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        if process_groups:
            raise CheckpointError("process_groups were given but torch.distributed is not initialized")
        return single_process_topology()
    rank, world = dist.get_rank(), dist.get_world_size()
    host = node_identity()
    mine = {name: _group_ranks(g) for name, g in (process_groups or {}).items()}
    for name in mine:
        if not fmt.is_valid_key(name):
            raise CheckpointError(f"process group name {name!r} is invalid; expected {fmt.KEY_PATTERN}")
    gathered: list[Any] = [None] * world
    mine_daemon = daemon_key(endpoint)
    dist.all_gather_object(gathered, (host, mine, os.environ.get("LOCAL_WORLD_SIZE"), mine_daemon), group=gloo_group)
    names = _nodes_by_daemon(gathered)
    hosts: list[str] = []
    node_of = []
    for h in names:
        if h not in hosts:
            hosts.append(h)
        node_of.append(hosts.index(h))
    for r, (h, _, local_world, _) in enumerate(gathered):
        count = node_of.count(node_of[r])
        if names[r] != h:
            continue  # launcher nodes merged onto one daemon: their LOCAL_WORLD_SIZE counts the launcher's node
        if local_world and local_world.isdigit() and int(local_world) != count:
            # The launcher's view and ours disagree: two nodes share a name (or one node has two), so files
            # per node would collide or split. Every rank sees the same gathered values and raises alike.
            raise CheckpointError(
                f"rank {r}: {count} ranks report node {h!r}, but its LOCAL_WORLD_SIZE is {local_world}; every node "
                f"needs its own identity: set {NODE_ID_ENV} per node, or leave it unset to use GROUP_RANK, "
                "SLURM_NODEID or the host name"
            )
    groups: dict[str, tuple[tuple[int, ...], ...]] = {}
    names = set(mine)
    for r, (_, theirs, _, _) in enumerate(gathered):
        if set(theirs) != names:
            raise CheckpointError(
                f"rank {r} declared process groups {sorted(theirs)}, rank {rank} declared {sorted(names)}; "
                "every rank must pass the same group names"
            )
    for name in sorted(names):
        instances = sorted({tuple(theirs[name]) for _, theirs, _, _ in gathered}, key=lambda m: m[0])
        seen: set[int] = set()
        for members in instances:
            if seen & set(members):
                raise CheckpointError(f"process group {name!r}: instances overlap ({instances}); expected a partition")
            seen |= set(members)
        if seen != set(range(world)):
            raise CheckpointError(f"process group {name!r} does not cover every rank: instances {instances}")
        groups[name] = tuple(instances)
    return Topology(rank=rank, world_size=world, node_of=tuple(node_of), groups=groups)


@dataclass(frozen=True)
class ComponentPlan:
    component: StateComponent
    writers: tuple[int, ...]  # global ranks that write a file of this component
    writes: bool  # this rank writes one
    filename: str  # this rank's file to write (if writes) or to read (for the model: the index)
    rank: int | None = None
    group_instance: int | None = None
    node: int | None = None
    is_model_index: bool = False

    @property
    def key(self) -> str:
        return self.component.key

    @property
    def pattern(self) -> SharingPattern:
        return self.component.sharing_pattern  # type: ignore[return-value]


def _instance_members(topo: Topology, comp: StateComponent) -> tuple[tuple[int, ...], ...]:
    name = comp.process_group_name
    if name not in topo.groups:
        if topo.world_size == 1:
            return ((0,),)
        raise CheckpointError(
            f"component {comp.key!r} is PER_GROUP over {name!r}, but no such process group was given; "
            f"pass process_groups={{{name!r}: group}} (known: {sorted(topo.groups)})"
        )
    return topo.groups[name]


def plan_component(comp: StateComponent, topo: Topology) -> ComponentPlan:
    pattern = comp.sharing_pattern
    key = comp.key
    if pattern in (SharingPattern.GLOBAL, SharingPattern.REPLICATED):
        is_model = key == fmt.MODEL_KEY
        name = fmt.MODEL_INDEX_NAME if is_model else fmt.component_filename(key, pattern.value)
        return ComponentPlan(comp, (0,), topo.rank == 0, name, is_model_index=is_model)
    if pattern == SharingPattern.PER_RANK:
        name = fmt.component_filename(key, pattern.value, rank=topo.rank)
        return ComponentPlan(comp, tuple(range(topo.world_size)), True, name, rank=topo.rank)
    if pattern == SharingPattern.PER_GROUP:
        instances = _instance_members(topo, comp)
        group = comp.process_group_name
        idx = next(i for i, m in enumerate(instances) if topo.rank in m)
        name = fmt.component_filename(key, pattern.value, group=group, instance=idx)
        writers = tuple(m[0] for m in instances)
        return ComponentPlan(comp, writers, topo.rank == instances[idx][0], name, group_instance=idx)
    if pattern == SharingPattern.PER_NODE:
        node = topo.node
        name = fmt.component_filename(key, pattern.value, node=node)
        writers = tuple(topo.node_leader(n) for n in range(topo.nnodes))
        return ComponentPlan(comp, writers, topo.rank == topo.node_leader(node), name, node=node)
    if pattern == SharingPattern.SHARDED:
        # Every rank may hold pieces; which ranks did write is known only from the save's vote (placements),
        # so the commit names the writers then (``component_spec``).
        is_model = key == fmt.MODEL_KEY
        name = fmt.MODEL_INDEX_NAME if is_model else fmt.component_filename(key, pattern.value)
        return ComponentPlan(comp, tuple(range(topo.world_size)), True, name, is_model_index=is_model)
    raise CheckpointError(f"component {key!r}: unknown sharing pattern {pattern!r}")


def plan(components: list[StateComponent], topo: Topology) -> list[ComponentPlan]:
    keys = [c.key for c in components]
    dupes = sorted({k for k in keys if keys.count(k) > 1})
    if dupes:
        raise CheckpointError(f"component keys must be unique; {dupes} appear more than once")
    return [plan_component(c, topo) for c in components]


def component_spec(p: ComponentPlan, topo: Topology, writers: list[int] | None = None) -> ComponentSpec:
    """What the manifest records about a component (sent by rank 0 with the commit information).

    ``writers``: the ranks that wrote a SHARDED component's pieces (from the save's vote)."""
    comp = p.component
    across: list[int] | None = None
    instances: list[list[int]] | None = None
    if p.pattern in (SharingPattern.REPLICATED, SharingPattern.SHARDED):
        across = list(range(topo.world_size))
    elif p.pattern == SharingPattern.PER_GROUP:
        members = _instance_members(topo, comp)
        instances = [list(m) for m in members]
        across = None
    return ComponentSpec(
        key=comp.key,
        sharing_pattern=p.pattern.value,
        ranks=list(p.writers) if writers is None else sorted(writers),
        replicated_across=across,
        group_name=comp.process_group_name if p.pattern == SharingPattern.PER_GROUP else None,
        group_instances=instances,
        required=comp.required,
        metadata=dict(comp.metadata),
    )
