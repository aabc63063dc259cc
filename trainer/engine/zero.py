"""DeepSpeed ZeRO-1/2 as a :class:`~trainer.engine.strategy.Strategy`.

The DeepSpeed config is derived from ours (:func:`deepspeed_config`), never hand-written: the
micro-batch is the per-rank share of the method's global P×K batch, precision follows
``train.precision`` (through DeepSpeed's torch-autocast mode, see :func:`deepspeed_config`),
gradient clipping is ``train.clip_grad`` set explicitly (DeepSpeed's own
default is not "off"), the optimizer is ours (built from the method's parameter groups, handed to
DeepSpeed as a client optimizer), and the LR is the engine's per-epoch schedule written into that
optimizer's param groups (no DeepSpeed scheduler). Memory banks are not module buffers: they stay
ours, in fp32, outside what DeepSpeed casts, broadcasts or saves.

Checkpoints hold the strategy-independent format of :mod:`trainer.engine.strategy`: the full fp32
model and the unsharded optimizer state. ZeRO's shards are consolidated at save and re-sharded at
load, so a run moves between world sizes and between DDP and DeepSpeed with nothing to convert
offline, and every file loads with ``torch.load(weights_only=True)`` — DeepSpeed's own checkpoint
files are pickles bound to the world size they were written at (moving them needs its
universal-checkpoint conversion, offline). The price is one all-reduce of the optimizer state at
each save (bytes: 4 × parameters × state tensors; ViT-B/16 with SGD momentum: ~0.35 GB).

Why the shards are read through each parameter's ``_hp_mapping`` (the fragment addresses ZeRO
attaches to every parameter, which its own ``safe_get_full_optimizer_state`` reads) and not through
that function: DeepSpeed links the optimizer-state fragments once, after the FIRST parameter group's
first step, so with two groups (weights and biases, as both papers train) the second group's state
is never linked and the function raises; and before the first step there is no state to set at all.
The addresses themselves are fixed at initialisation, so reading the optimizer's own flat state
through them is exact for every group, before or after any step.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
from torch import nn

from trainer import dist
from trainer.config import OptimConfig
from trainer.engine.optim import build_optimizer
from trainer.engine.strategy import ParamGroups, Setup, Strategy

log = logging.getLogger(__name__)

BUCKET = 50_000_000
"""Elements per ZeRO reduce / all-gather bucket."""


def deepspeed_config(*, zero_stage: int, precision: str, clip_grad: float, global_batch: int,
                     world_size: int) -> dict[str, Any]:
    """DeepSpeed's JSON config for our run (what ``deepspeed.json`` in the run dir holds).

    bf16/fp16 use DeepSpeed's torch-autocast mode, not its ``bf16``/``fp16`` sections: those cast the
    whole module — BatchNorm necks, LayerNorms, the classifier — to 16 bits, a different model from
    DDP's autocast run (and the papers' AMP), and the module's own inference passes (bank
    initialisation, clustering, evaluation) would need casts of their inputs. With autocast a
    DeepSpeed run is the DDP run with sharded state at every precision.
    """
    if global_batch % world_size:
        raise ValueError(f"the global batch of {global_batch} images does not split over {world_size} ranks")
    micro = global_batch // world_size
    cfg: dict[str, Any] = {
        "train_batch_size": global_batch,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": float(clip_grad),
        "zero_optimization": {
            "stage": zero_stage,
            # ZeRO-2 reduces each gradient to its owner's shard in buckets of this many elements: 5e7 fp32
            # (200 MB) rather than DeepSpeed's 5e8 (2 GB, more than ViT-B's whole gradient) per bucket
            "reduce_bucket_size": BUCKET,
            "allgather_bucket_size": BUCKET,
            "reduce_scatter": True,
            "contiguous_gradients": True,
            "overlap_comm": False,
        },
        "zero_allow_untested_optimizer": True,  # our torch SGD/Adam: ZeRO-1/2 partition any torch optimizer
        "steps_per_print": 2**31 - 1,  # our metrics log the steps
        "wall_clock_breakdown": False,
    }
    if precision in ("bf16", "fp16"):
        # torch autocast inside DeepSpeed, as under DDP: fp32 weights (ZeRO's partitions are the fp32
        # master weights), bf16/fp16 matmuls and convolutions, gradients reduced in fp32 (no module is
        # listed as safe to communicate in lower precision); fp16 adds ZeRO's gradient scaler.
        cfg["torch_autocast"] = {"enabled": True, "dtype": "bfloat16" if precision == "bf16" else "float16",
                                 "lower_precision_safe_modules": []}
    return cfg


class DeepSpeedStrategy(Strategy):
    """DeepSpeed ZeRO stage 1 (optimizer state sharded) or 2 (and gradients), over the process group."""

    name = "deepspeed"

    def __init__(self, device: torch.device, precision: str = "fp32", sync_bn: bool = False,
                 clip_grad: float = 0.0, *, zero_stage: int = 2, global_batch: int) -> None:
        super().__init__(device, precision, sync_bn, clip_grad)
        self.zero_stage = zero_stage
        self.config = deepspeed_config(zero_stage=zero_stage, precision=precision, clip_grad=clip_grad,
                                       global_batch=global_batch, world_size=dist.get_world_size())
        self.engine: Any = None
        self.optimizer: torch.optim.Optimizer | None = None

    def describe(self) -> dict[str, Any]:
        return {"strategy": self.name, "deepspeed": self.config}

    def setup(self, model: nn.Module, groups: ParamGroups, optim_cfg: OptimConfig) -> Setup:
        # the accelerator is chosen when deepspeed is first imported: ours, not its guess
        os.environ.setdefault("DS_ACCELERATOR", "cuda" if self.device.type == "cuda" else "cpu")
        import deepspeed

        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
        _ensure_process_group()
        self.params = [list(g["params"]) for g in groups]
        model = self._place(model)
        self.optimizer = build_optimizer(groups, optim_cfg)
        self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=self.optimizer, config=self.config,
                                                    dist_init_required=False)
        return self.engine, self.optimizer

    def unwrap(self, module: nn.Module) -> nn.Module:
        inner = getattr(module, "module", module)
        return inner if isinstance(inner, nn.Module) else module

    def backward_and_step(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)
        self.engine.step()  # reduces (ZeRO-2: already reduced in backward), clips, steps, zeroes the gradients

    # -- the strategy-independent checkpoint --------------------------------------------------
    def _members(self) -> list[tuple[nn.Parameter, torch.Tensor]]:
        """Every parameter in the method's group order, with this rank's flat fp32 partition of its
        group (the tensor the torch optimizer steps)."""
        assert self.optimizer is not None, "setup() first"
        return [(p, self.optimizer.param_groups[gi]["params"][0])
                for gi, group in enumerate(self.params) for p in group]

    @staticmethod
    def _gather(members: list[tuple[nn.Parameter, torch.Tensor | None]]) -> list[torch.Tensor]:
        """Full tensors from each rank's fragments (``members[i]``: a parameter and the flat partition-sized
        tensor holding its fragment, None where this rank has none): one all-reduce over all of them."""
        sizes = [p.numel() for p, _ in members]
        buf = torch.zeros(sum(sizes), dtype=torch.float32, device=dist.comm_device())
        offset = 0
        for (p, flat), n in zip(members, sizes):
            mapping = _mapping(p)
            if mapping is not None and flat is not None:
                lp, hp = mapping.lp_fragment_address, mapping.hp_fragment_address
                buf.narrow(0, offset + lp.start, lp.numel).copy_(flat.narrow(0, hp.start, hp.numel))
            offset += n
        if dist.get_world_size() > 1:
            dist.all_reduce(buf)  # each element is owned by exactly one rank: the sum is the element
        out, offset = [], 0
        for (p, _), n in zip(members, sizes):
            out.append(buf.narrow(0, offset, n).view(p.shape).cpu().clone())
            offset += n
        return out

    @staticmethod
    def _scatter(flat: torch.Tensor, p: nn.Parameter, full: torch.Tensor) -> None:
        """Copy this rank's fragment of ``full`` (a whole tensor shaped like ``p``) into the flat partition."""
        mapping = _mapping(p)
        if mapping is None:
            return
        lp, hp = mapping.lp_fragment_address, mapping.hp_fragment_address
        flat.narrow(0, hp.start, hp.numel).copy_(full.reshape(-1).narrow(0, lp.start, lp.numel).to(flat.device))

    def model_state_dict(self, module: nn.Module) -> dict[str, torch.Tensor]:
        inner = self.unwrap(module)
        state = inner.state_dict()
        if self.precision != "fp32":  # the module holds bf16/fp16 copies: save the fp32 master weights
            names = {id(p): name for name, p in inner.named_parameters()}
            members = self._members()
            masters = self._gather(list(members))
            for (p, _), full in zip(members, masters):
                state[names[id(p)]] = full
        return state

    def load_model_state_dict(self, module: nn.Module, state: dict[str, torch.Tensor]) -> None:
        inner = self.unwrap(module)
        inner.load_state_dict(state)  # the module's copies (cast to its dtype)
        names = {id(p): name for name, p in inner.named_parameters()}
        with torch.no_grad():
            for p, flat in self._members():  # and the fp32 master fragments this rank owns, from the fp32 values
                self._scatter(flat, p, state[names[id(p)]].to(torch.float32))

    def optimizer_state_dict(self) -> dict[str, Any]:
        assert self.optimizer is not None
        members = self._members()
        inner = self.optimizer.state
        keys = sorted({k for _, f in members for k, v in inner.get(f, {}).items()
                       if torch.is_tensor(v) and v.shape == f.shape})
        keys = dist.broadcast_object(keys)  # every rank gathers the same keys, in the same order
        full = {k: self._gather([(p, inner[f][k] if k in inner.get(f, {}) else None) for p, f in members])
                for k in keys}
        state: dict[int, dict[str, Any]] = {}
        for i, (_, f) in enumerate(members):
            entry: dict[str, Any] = {k: full[k][i] for k in keys}
            # per-group scalars (Adam's step): one value for the whole flat partition, so for each member
            entry.update({k: (v.clone() if torch.is_tensor(v) else v) for k, v in inner.get(f, {}).items()
                          if k not in keys})
            if entry:
                state[i] = entry
        groups, index = [], 0
        for g, group in zip(self.optimizer.param_groups, self.params):
            groups.append({**{k: v for k, v in g.items() if k != "params"},
                           "params": list(range(index, index + len(group)))})
            index += len(group)
        return {"state": state, "param_groups": groups}

    def load_optimizer_state_dict(self, state: dict[str, Any]) -> None:
        assert self.optimizer is not None
        saved_groups = state["param_groups"]
        if [len(g["params"]) for g in saved_groups] != [len(g) for g in self.params]:
            raise ValueError(f"optimizer state for groups of {[len(g['params']) for g in saved_groups]} parameters, "
                             f"this model has {[len(g) for g in self.params]}")
        saved = state["state"]
        with torch.no_grad():
            for i, (p, flat) in enumerate(self._members()):
                if i not in saved:
                    continue
                own = self.optimizer.state.setdefault(flat, {})
                for k, v in saved[i].items():
                    if torch.is_tensor(v) and v.shape == p.shape:
                        if k not in own:
                            own[k] = torch.zeros_like(flat)
                        self._scatter(own[k], p, v.to(flat.dtype))
                    else:  # a per-group scalar (Adam's step): the same value from every member
                        own[k] = v.clone() if torch.is_tensor(v) else v
        for g, s in zip(self.optimizer.param_groups, saved_groups):
            g.update({k: v for k, v in s.items() if k != "params"})


def _mapping(p: nn.Parameter) -> Any:
    """ZeRO's fragment addresses of ``p`` on this rank (None: none of ``p`` lives in this rank's partition)."""
    return getattr(p, "_hp_mapping", None)

def _ensure_process_group() -> None:
    """DeepSpeed needs a process group even for one process: a one-rank group over an in-memory store
    (no port, nothing to discover) when the run has none."""
    import torch.distributed as tdist

    if not tdist.is_initialized():
        device = dist.info().device
        backend = "nccl" if device.type == "cuda" else "gloo"  # gloo cannot reduce CUDA tensors
        tdist.init_process_group(backend, store=tdist.HashStore(), rank=0, world_size=1,
                                 device_id=device if backend == "nccl" else None)
    os.environ.setdefault("LOCAL_RANK", str(dist.info().local_rank))  # DeepSpeed asserts it is set

