"""Where and how training runs: the processes (accelerate) and their layout (data x context), and `parallelize`, which
applies activation checkpointing, regional compilation, context parallelism and FSDP2 sharding or DDP replication to
a model in one place."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist
from accelerate import Accelerator
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel

from sprint_mm.backbone import compile_blocks
from sprint_mm.errors import check_number
from sprint_mm.preemption import EXIT_PREEMPTED

PRECISIONS = ("no", "fp16", "bf16")
STRATEGIES = ("ddp", "fsdp")
# Up to this many usable CPU cores a run takes one CPU thread unless told otherwise (README, threads on a busy machine).
SMALL_MACHINE_CORES = 4


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity where the platform reports it)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def default_threads(cores: int) -> Optional[int]:
    """The CPU threads of a run that does not set `Trainer.num_threads`: one on a machine of at most
    SMALL_MACHINE_CORES cores, torch's own choice (one per core) above.

    torch's OpenMP threads spin while they wait for each other; whenever another process wants a core, even at the
    lowest priority, a spinning thread holds the core its partner needs and the steps collapse (measured on 2 cores:
    18 steps/s alone, 1 beside a torch job; one thread: 15 and 14). On a few cores a second thread gains little alone
    and loses most beside anything else. The choice depends on the machine only, never on its load at the moment, so
    the same command gives bit-identical weights however busy the machine is."""
    return 1 if cores <= SMALL_MACHINE_CORES else None


@dataclass(frozen=True)
class Parallelism:
    """How a run uses its devices (the `Trainer` options of the same names).

    `strategy` 'ddp' replicates the model; 'fsdp' shards model, EMA and optimizer over the processes (FSDP2, per block
    and at the root; bf16 compute with fp32 reduction under precision 'bf16'; `fsdp_cpu_offload` keeps the shards in
    CPU memory). `compile` compiles each transformer block (regional compilation, `compile_blocks`);
    `activation_checkpointing` recomputes each block's activations in the backward pass; `num_threads` sets torch's
    CPU threads (None: `default_threads`, one on a machine of a few cores, where one thread can be many times faster
    than one per core beside another busy process).
    `context_parallel` N spreads each sample's tokens over N processes (`sprint_mm.context_parallel`); the processes
    form a data x context mesh.
    """

    precision: str = "no"
    strategy: str = "ddp"
    num_threads: Optional[int] = None
    compile: bool = False
    fsdp_cpu_offload: bool = False
    activation_checkpointing: bool = False
    context_parallel: int = 1

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"unknown precision {self.precision!r}; allowed: {', '.join(PRECISIONS)}")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"unknown Trainer.strategy {self.strategy!r}; allowed: {', '.join(STRATEGIES)}")
        if self.sharded and self.precision == "fp16":
            raise ValueError("Trainer.strategy = 'fsdp' does not support Trainer.precision = 'fp16' (use 'bf16') yet")
        if self.fsdp_cpu_offload and not self.sharded:
            raise ValueError("Trainer.fsdp_cpu_offload = True needs Trainer.strategy = 'fsdp'")
        if self.num_threads is not None:
            check_number("Trainer.num_threads", self.num_threads, low=1, integer=True)
        check_number("Trainer.context_parallel", self.context_parallel, low=1, integer=True)

    @property
    def sharded(self) -> bool:
        return self.strategy == "fsdp"

    def refuse_with_fsdp(self, unsupported: bool, what: str) -> None:
        """One line for an option FSDP runs do not support yet."""
        if self.sharded and unsupported:
            raise ValueError(f"Trainer.strategy = 'fsdp' does not support {what} yet")


def set_threads(num_threads: Optional[int] = None) -> int:
    """Set torch's CPU threads: `num_threads` when given, else those of OMP_NUM_THREADS when it is set (torch follows
    it already), else `default_threads`. Returns the count in force."""
    if num_threads is None and not os.environ.get("OMP_NUM_THREADS"):
        num_threads = default_threads(usable_cores())
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    return torch.get_num_threads()


def start_processes(parallelism: Parallelism) -> Accelerator:
    """This process's accelerator (one per process under `accelerate launch` / `torchrun`), its CPU threads, a
    process group for FSDP, TF32 matrix products on CUDA for what runs in float32."""
    set_threads(parallelism.num_threads)
    accelerator = Accelerator(mixed_precision=parallelism.precision)
    if parallelism.sharded:
        ensure_process_group(accelerator.device)
    if accelerator.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    return accelerator


@dataclass(frozen=True)
class ProcessLayout:
    """The processes as a data x branch x context mesh. `data_size` data-parallel groups; this process reads share
    `data_rank` of the work (of every global batch in training, of the sample batches in sampling). Within a data
    group, the processes of a context group (`context`, None without context parallelism) spread the tokens of each
    sample; sampling with CFG-parallel pairs two context groups (`branches`), one per guidance branch. Process r sits
    at (r // (b c), r // c % b, r % c) of the mesh (b branches, c context processes)."""

    data_rank: int = 0
    data_size: int = 1
    context_size: int = 1
    context: Any = None
    branches: Any = None

    @property
    def leads(self) -> bool:
        """Whether this process speaks for its data group (the first of its branches and of its context group)."""
        return all(group is None or dist.get_rank(group) == 0 for group in (self.context, self.branches))


def process_layout(world_size: int, context_size: int, device: torch.device, option: str,
                   branches: int = 1) -> ProcessLayout:
    """The layout of `world_size` processes in data groups of `branches` x `context_size`. A context size (times the
    branches) that does not divide the process count is refused with one line naming `option`."""
    group = branches * context_size
    if world_size % group:
        paired = f" x {branches} CFG-parallel branches" if branches > 1 else ""
        raise ValueError(f"{option} = {context_size}{paired} must divide the number of processes ({world_size}): "
                         f"each data group is {group} processes")
    rank = dist.get_rank() if dist.is_initialized() else 0
    if group == 1:
        return ProcessLayout(rank, world_size)
    mesh = init_device_mesh(device.type, (world_size // group, branches, context_size),
                            mesh_dim_names=("data", "branch", "context"))
    return ProcessLayout(mesh.get_local_rank("data"), world_size // group, context_size,
                         mesh.get_group("context") if context_size > 1 else None,
                         mesh.get_group("branch") if branches > 1 else None)


def spread_model(model: nn.Module, group: Any, option: str) -> None:
    """Every forward of `model` from now on spreads each sample's tokens over the processes of `group` (None: whole
    samples). One line for a backbone that cannot run a share of its sequence (it does not declare
    `shards_sequence`), or attention heads that the group size does not divide (each process attends with h / p)."""
    backbone = model.backbone
    if group is not None:
        size = dist.get_world_size(group)
        if not backbone.shards_sequence:
            raise ValueError(
                f"{option} = {size} needs a backbone that can split its token sequence over processes; "
                f"{type(backbone).__name__} cannot (it does not declare `shards_sequence = True`, which promises that "
                "its blocks take any share of the tokens with their positions and its unembed a box of the grid)")
        for name, heads in backbone.attention_heads().items():
            if heads % size:
                raise ValueError(f"{option} = {size} must divide the number of attention heads ({heads} in {name}): "
                                 f"each process attends with heads / {size} of them")
    backbone.context_group = group


def end_processes(status: int) -> int:
    """A command's exit status, after destroying the process group when its processes ended together (status 0, or
    EXIT_PREEMPTED: every process agreed to stop) or it is this process's alone. Left to the interpreter's exit,
    gloo's worker threads can outlive the group and abort the process ("terminate called without an active
    exception", status 134 instead of the command's own). Not after a failure among several processes: another one may
    still wait in a collective."""
    if not (dist.is_available() and dist.is_initialized()):
        return status
    if status in (0, EXIT_PREEMPTED) or dist.get_world_size() == 1:
        dist.destroy_process_group()
    return status


def ensure_process_group(device: torch.device) -> None:
    """FSDP needs a process group even on one process, where accelerate starts none: a private one-member group."""
    if not dist.is_initialized():
        backend = "cuda:nccl,cpu:gloo" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)


def parallelize(model: nn.Module, ema: nn.Module, trained: nn.Module, accelerator: Accelerator,
                parallelism: Parallelism, layout: ProcessLayout = ProcessLayout()) -> nn.Module:
    """Apply activation checkpointing and compilation to `model`, spread its samples over the context group of
    `layout`, then shard `model` and `ema` (FSDP, over every process: the data x context mesh flattened) or place them
    and replicate `trained` (the model, or the model with the auxiliary modules its objective trains) over the
    processes (DDP). Returns the module a training step calls. The EMA stays eager and whole (it only samples
    previews, on one process)."""
    if parallelism.activation_checkpointing:
        model.backbone.gradient_checkpointing = True
    if parallelism.compile:
        compile_blocks(model)
    spread_model(model, layout.context, "Trainer.context_parallel")
    device = accelerator.device
    if parallelism.sharded:  # placed by sharding, and not wrapped: FSDP reduces the gradients itself
        shard(model, device, precision_policy(parallelism.precision), parallelism.fsdp_cpu_offload)
        shard(ema, device, precision_policy("no"), parallelism.fsdp_cpu_offload)
        return trained
    trained.to(device)
    ema.to(device)
    if accelerator.num_processes == 1:
        return trained
    device_ids = [accelerator.local_process_index] if device.type == "cuda" else None
    # Every trained parameter is in every graph (see Sprint._middle): no scan for unused parameters.
    return Replicated(trained, device_ids=device_ids, static_graph=True)


def fused_optimizer(accelerator: Accelerator, parallelism: Parallelism) -> bool:
    """Whether AdamW may use its fused kernel: always on CUDA; on the CPU not for FSDP's sharded parameters nor under
    fp16's loss scaler."""
    return accelerator.device.type == "cuda" or (not parallelism.sharded and parallelism.precision != "fp16")


class Replicated(DistributedDataParallel):
    """DDP over the trained module that still names its backbone, as every model does (the loss reads it)."""

    @property
    def backbone(self) -> nn.Module:
        return self.module.backbone


def precision_policy(precision: str) -> MixedPrecisionPolicy:
    """bf16 compute with fp32 gradient reduction under 'bf16'; fp32 throughout otherwise."""
    if precision == "bf16":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def shard(module: nn.Module, device: torch.device, policy: MixedPrecisionPolicy, cpu_offload: bool) -> None:
    """fully_shard every block of `module.backbone` and then the root, in place, over all processes.

    With context parallelism the processes of a context group hold the same parameters, and each computes its share of
    their gradient times the group size (`sprint_mm.context_parallel`): sharding over every process (data and
    context) divides the training state by the process count, and the average the reduce-scatter takes over every
    process is the mean gradient over the data groups.

    Gradients are averaged over the processes (tests/test_fsdp.py compares a two-process step with a one-process
    step: gloo's FSDP2 reduction has summed instead of averaged in some torch versions, pytorch issue 162338). A
    parameter without a gradient on one process reduces as zeros there, so the collectives of all processes match."""
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    offload = CPUOffloadPolicy(pin_memory=device.type == "cuda") if cpu_offload else None  # pinning needs CUDA
    options = dict(mesh=mesh, mp_policy=policy, offload_policy=offload)
    for block in module.backbone.blocks:
        fully_shard(block, **options)
    fully_shard(module, **options)
    module.set_reduce_scatter_unused_params(True)
    module.register_forward_hook(own_output, prepend=True)  # before FSDP's post-forward hook reads the output


def own_output(module: nn.Module, args: Any, output: Any) -> Any:
    """The root's output as a tensor of its own when it is a view.

    FSDP2 hooks its pre-backward all-gather onto the root's output; on a view, an in-place op of the caller would drop
    that hook, so torch warns ("returned a view tensor ... wrong gradients") on every forward. Our models return views:
    `unpatchify` rearranges the final layer's output, and an image backbone squeezes the frame axis. The losses never
    write into the output, so the gradients were right (tests/test_fsdp.py compares them with an unsharded model), but
    the warning was printed on every run; one copy of the output per forward removes its cause."""
    if isinstance(output, torch.Tensor) and output._base is not None:
        return output.clone()
    return output


def agreed(accelerator: Accelerator, *flags: bool) -> list[bool]:
    """Each flag true on any process, so that every process takes the same decision (one process alone: as given)."""
    if accelerator.num_processes == 1:
        return [bool(flag) for flag in flags]
    values = torch.tensor([float(flag) for flag in flags], device=accelerator.device)
    return [bool(value) for value in accelerator.reduce(values, reduction="max").tolist()]
