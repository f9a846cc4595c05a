"""What a run on several processes needs (torchrun; NCCL on GPUs, gloo on CPUs): the process
group with its timeout, the collectives the stages share, the update every rank takes the same way
(gradients averaged, one verdict on non-finite values), FSDP2 sharding and whole-tensor checkpoints
of what it shards, and the device's mixed precision, timings and peak memory. A plain `python` run
is rank 0 of 1: all of it works there."""
import datetime
import os
import resource
import time
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from runs import fail, release_run_folders


def setup_distributed(timeout_minutes):
    """torchrun sets RANK and LOCAL_RANK; a plain `python` run is rank 0 of 1."""
    cuda = torch.cuda.is_available()
    device = torch.device(f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if cuda else "cpu")
    if "RANK" in os.environ and not dist.is_initialized():
        if cuda:
            torch.cuda.set_device(device)
        # explicit: NCCL's default (10 min) is shorter than a rank-0 save of an SDXL checkpoint
        dist.init_process_group("nccl" if cuda else "gloo",
                                timeout=datetime.timedelta(minutes=timeout_minutes))
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), device
    return 0, 1, device


def barrier():
    """Every rank calls it, in the same order."""
    if dist.is_initialized():
        dist.barrier()


def all_gather_cat(x, world):
    """Concatenate the (N_r, ...) tensors of all ranks; their lengths first, as they differ."""
    if world == 1:
        return x
    lengths = gather_objects(len(x))
    longest = max(lengths)
    if longest == 0:  # nobody has anything: every rank returns here, together
        return x
    padded = torch.cat([x, x.new_zeros(longest - len(x), *x.shape[1:])])
    gathered = [x.new_empty(longest, *x.shape[1:]) for _ in range(world)]
    dist.all_gather(gathered, padded)
    return torch.cat([part[:length] for part, length in zip(gathered, lengths)])


def weights_fingerprint(params, world):
    """(sum, sum of squares) in fp64 of the weights on every rank: equal rows, equal weights.
    (world, 2)"""
    vector = torch.nn.utils.parameters_to_vector(params).double()
    return all_gather_cat(torch.stack([vector.sum(), vector.square().sum()])[None], world)


def all_reduce_sums(sums, world, device=None):
    """{name: number} summed over all ranks, by one all_reduce of their values (fp64)."""
    values = torch.tensor(list(sums.values()), dtype=torch.float64, device=device)
    if world > 1:
        dist.all_reduce(values)
    return dict(zip(sums, values.tolist()))


def stop_non_finite(out, what, where, lower="--lr", checkpoint="ckpt.pt"):
    """Stop a run on a non-finite loss, gradient, weight or score (what) found in `where`, before
    anything of it is saved, with a way on that works: a lower `lower`, from the intact checkpoint
    or from the start."""
    path = os.path.join(out, checkpoint)
    way = (f"the last good checkpoint {path} is kept: continue it with --resume" if
           os.path.exists(path) else "nothing is kept (it came before any checkpoint): run again "
           "with --resume (it starts over)")
    fail(f"{where}: {what}; {way} and a lower {lower}, or pass another --out")


class NonFiniteUpdate(Exception):
    """A non-finite loss, gradient or weight, found before anything of it is saved; the message
    is the reason (the stage adds where, and a way on: stop_non_finite)."""


def apply_update(params, optimizer, loss, world, max_norm=1.0):
    """Average the gradients of params (those with one) over the ranks: one all_reduce of those
    whole on every rank, the loss with them (sharded ones: FSDP2's reduce-scatter averaged them);
    stop on a non-finite loss, gradient or weight; clip the gradient norm to max_norm; step; free
    the gradients. Every rank calls it in the same order: all reach the same verdict. -> the
    pre-clip norm"""
    params = [param for param in params if param.grad is not None]
    whole = [param for param in params if not isinstance(param.grad, DTensor)]
    flat = torch.cat([param.grad.flatten() for param in whole] + [loss.detach().float()[None]])
    if world > 1:
        dist.all_reduce(flat)
    flat /= world
    for param, grad in zip(whole, flat[:-1].split([param.numel() for param in whole])):
        param.grad.copy_(grad.view_as(param))
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)  # of every shard, clipped for real
    norm = norm.full_tensor() if isinstance(norm, DTensor) else norm
    if not (torch.isfinite(flat).all() and torch.isfinite(norm)):  # the last checkpoint stays good
        raise NonFiniteUpdate("non-finite loss or gradient, stopped before its optimizer step")
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    # a finite gradient can still take a weight to inf (a huge lr): stop before it is saved; each
    # rank checks its shards
    local = [param.to_local() if isinstance(param, DTensor) else param for param in params]
    broken = sum(not torch.isfinite(param).all() for param in local)
    if all_reduce_sums({"broken": broken}, world, flat.device)["broken"]:
        raise NonFiniteUpdate("non-finite weights after an update")
    return norm.item()


def shard(units, world, device):
    """FSDP2 (torch's fully_shard: ZeRO-3) over `units`, inner ones first: each rank keeps
    1/world of their weights, gradients and AdamW moments, and gathers a unit's weights only
    while it runs (forward, and again in backward). One process: nothing to shard."""
    if world == 1:
        return
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mesh = init_device_mesh(device.type, (world,))
    # a GPU gathers bf16 copies and reduces fp32 gradients (the autocast of the unsharded step)
    policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
              if device.type == "cuda" else MixedPrecisionPolicy())
    for unit in units:  # each unit is called as a module: it gathers and frees its own weights
        fully_shard(unit, mesh=mesh, reshard_after_forward=True, mp_policy=policy)


def trained_names(model, optimizer):
    """The names of the parameters an optimizer updates, in its order."""
    names = {param: name for name, param in model.named_parameters()}
    return [names[param] for group in optimizer.param_groups for param in group["params"]]


def gather_training(model, optimizer):
    """A checkpoint's "lora" (the trained weights as one vector, in the optimizer's order) and
    "optimizer" (its state by parameter name): whole tensors on CPU, the same at any world size,
    sharded or not. A collective: rank 0 gets them, the others {}."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)
    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    weights = get_model_state_dict(model, options=options)
    state = get_optimizer_state_dict(model, optimizer, options=options)
    if not weights:
        return {}
    names = trained_names(model, optimizer)
    return dict(lora=torch.cat([weights[name].flatten() for name in names]), optimizer=state)


def scatter_training(model, optimizer, checkpoint):
    """gather_training's entries back into a model and its optimizer at any world size, sharded
    or not (each rank takes its shards)."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)
    params = dict(model.named_parameters())  # a sharded one has its whole shape
    names = trained_names(model, optimizer)
    chunks = checkpoint["lora"].split([params[name].numel() for name in names])
    weights = {name: chunk.view(params[name].shape) for name, chunk in zip(names, chunks)}
    options = StateDictOptions(full_state_dict=True, strict=False)
    set_model_state_dict(model, weights, options=options)
    set_optimizer_state_dict(model, optimizer, checkpoint["optimizer"], options=options)


def whole_state(model):
    """model.state_dict() with its sharded tensors gathered whole, to CPU (a collective)."""
    return {name: value.full_tensor().cpu() if isinstance(value, DTensor) else value
            for name, value in model.state_dict().items()}


def local_numel(params):
    """The elements of params this rank holds (its shards of sharded ones)."""
    return sum((p.to_local() if isinstance(p, DTensor) else p).numel() for p in params)


def close_distributed():
    """The run's end: every rank waits for the others and leaves the process group (torchrun);
    the run folder's lock goes."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    release_run_folders()


def gather_objects(obj):
    """Every rank's obj, in rank order (a collective: call it on every rank)."""
    if not dist.is_initialized():
        return [obj]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


@contextmanager
def timing(seconds, key):
    """Add the wall time of the block (a GPU's queued work included) to seconds[key]."""
    start = time.perf_counter()
    yield
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    seconds[key] = seconds.get(key, 0.0) + time.perf_counter() - start


def mixed_precision(device):
    """bf16 autocast on a GPU (frozen weights bf16, trained ones fp32); none on CPU (all fp32)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def peak_memory_mb():
    """GPU: peak allocated; CPU: peak resident memory of this process."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
