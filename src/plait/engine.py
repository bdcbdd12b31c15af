"""The Engine: one training step of a layer list, whatever the layout.

A step takes this data-parallel rank's share of the global batch, splits it
into `microbatches` equal micro-batches and runs this rank's part of the
pipeline schedule on them. Afterwards every parameter's `.grad` holds exactly
the gradient of the mean loss over the whole global batch, as one process
running `loss_fn(nn.Sequential(*layers)(x), y).backward()` would (under ZeRO,
with a plait.parallel.zero.ShardedOptimizer, each dp rank holds its shard of
those gradients instead, and `.grad` is None).

It composes the pieces on a mesh with axes "pp" and "dp":
- partition.py cuts the layers into pp x virtual_stages stages;
- schedule.py gives this rank's list of actions;
- pipeline.py executes them (with pp = 1 the list is F0 B0 F1 B1 ...:
  plain gradient accumulation);
- data_parallel.py sums each stage's gradients over its dp replicas while
  the last micro-batch's backward runs.

A schedule whose actions split backwards into I and W (parallel/weight_grad.py)
makes this rank's nn.Linear modules defer their weight gradients to W, and
drives the data-parallel reduction itself: a stage's buckets are launched
after its last W of the step (ZeRO 0 and 1) or after each of its W (ZeRO 2).
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Callable, Iterator, Mapping, Sequence

import torch
import torch.distributed as dist
from torch import nn

from plait import checkpointing
from plait.model.gpt import sample_next
from plait.model.materialize import Init, is_meta, materialize
from plait.parallel.data_parallel import GradientSync
from plait.parallel.grad_norm import scale_, squared_norm
from plait.parallel.p2p import p2p_plan
from plait.parallel.partition import Partition, partition
from plait.parallel.pipeline import PipelineExecutor
from plait.parallel.schedule import V_SCHEDULES, Action, make_schedule, rank_stages, schedule_layout, stage_rank
from plait.parallel.tied import TiedGradients, find_tied
from plait.parallel.weight_grad import defer_linears
from plait.stop import STOP_SIGNALS
from plait.watchdog import wait

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
_STOP_NUMBERS = frozenset(int(signal.Signals[name]) for name in STOP_SIGNALS)  # [Note: stop agreement]


class Engine:
    """Runs training and evaluation steps of `layers` on a device mesh.

    Args:
        layers: the model as an ordered list of modules (or an nn.Sequential);
            each takes and returns one tensor.
        loss_fn: `loss_fn(output, targets)`, a mean over the micro-batch.
        mesh: a DeviceMesh with axes "pp" and "dp" (plait.make_mesh); None for one process.
        schedule: "gpipe", "1f1b", "interleaved-1f1b", "zb1p", "zbv" or "dualpipev" (used when pp > 1); or
            the training actions themselves, {pp rank: [Action, ...]} for every pp rank (kinds
            F, B, I, W; parallel/schedule.py validates them), used as given, also with pp = 1.
            zb1p, zbv and dualpipev split backwards into I and W (parallel/zero_bubble.py).
        microbatches: micro-batches per step on this data-parallel rank; with
            one pipeline stage this is gradient accumulation.
        virtual_stages: stages per pipeline rank (interleaved-1f1b: 2 or more); None: 2 for zbv
            and dualpipev, whose V is two stages per rank, else 1.
        partition_method: how layers are cut into stages: "uniform", "params", "profile".
        split: manual cut indices, overriding `partition_method`.
        autocast_dtype: run forwards under `torch.autocast` in this dtype
            (e.g. torch.bfloat16); None for the parameters' own dtype.
        bucket_mb: gradient bucket size in MiB for the data-parallel all-reduce.
        init: `init(layer_index, layer, device)`, for layers built on the meta device:
            each rank gives real memory (`to_empty` on `device`) only to the layers of
            its own stages and calls `init` on each; the others stay on the meta
            device, untouched (plait.model.materialize; `plait.model.gpt_init` for
            the GPT). Partitioning by "uniform", "params" or `split` works on meta
            layers; "profile" times real layers and is refused.
        device: where meta layers are materialised (default: the CPU).
        activation_checkpointing: "none", "selective" or "full" (plait.checkpointing), applied
            to every layer but the first and last.
        layout: how stages sit on ranks, for actions given as a dict: "loop" (stage s on rank
            s % pp) or "v" (zbv's and dualpipev's); a named schedule brings its own (`schedule_layout`).
    """

    def __init__(self, layers: Sequence[nn.Module], loss_fn: LossFn, mesh=None, *,
                 schedule: str | Mapping[int, Sequence[Action]] = "1f1b", microbatches: int = 1, virtual_stages: int | None = None,
                 partition_method: str = "uniform", split: Sequence[int] | None = None,
                 autocast_dtype: torch.dtype | None = None, bucket_mb: float = 25.0,
                 sample_input: torch.Tensor | None = None, init: Init | None = None,
                 device: torch.device | str | None = None, activation_checkpointing: str = "none",
                 layout: str = "loop"):
        layers = list(layers)
        on_meta = any(is_meta(layer) for layer in layers)
        if on_meta and init is None:
            raise ValueError("layers on the meta device need an initialiser: Engine(..., init=fn) with "
                             "fn(layer_index, layer, device) setting every parameter and buffer")
        if on_meta and partition_method == "profile":
            raise ValueError("partition_method='profile' times real layers and these are on the meta device; "
                             "use 'params' or 'uniform', or a manual split with partition_method='params'")
        # Before the partition: "profile" then times the layers as they will run.
        checkpointing.apply(layers, activation_checkpointing)
        self.loss_fn = loss_fn
        self.mesh = mesh
        self.num_microbatches = microbatches
        self.autocast_dtype = autocast_dtype
        self.dp_size = mesh["dp"].size() if mesh is not None else 1
        self.pp_size = mesh["pp"].size() if mesh is not None else 1
        self.pp_rank = mesh["pp"].get_local_rank() if mesh is not None else 0
        self.dp_rank = mesh["dp"].get_local_rank() if mesh is not None else 0
        if self.pp_size == 1 and isinstance(schedule, str):
            schedule, virtual_stages = "1f1b", 1  # one stage: F0 B0 F1 B1 ... is accumulation
        if virtual_stages is None:  # a V's one valid count; every other schedule's default
            virtual_stages = 2 if isinstance(schedule, str) and schedule in V_SCHEDULES else 1
        self.schedule = schedule
        if isinstance(schedule, str):
            layout = schedule_layout(schedule)
        self.layout = layout
        num_stages = self.pp_size * virtual_stages
        self.partition: Partition = partition(layers, num_stages, partition_method, split, sample_input,
                                              [stage_rank(st, self.pp_size, layout) for st in range(num_stages)])
        if mesh is not None and partition_method == "profile" and split is None:
            box = [self.partition]  # timings differ between ranks; every rank must cut the same way
            dist.broadcast_object_list(box, src=0)
            self.partition = box[0]
        # This rank's stages, and the global index of each layer it holds (for state_dict keys).
        self.stage_ids = rank_stages(self.pp_rank, self.pp_size, virtual_stages, layout)
        self.layer_ids = [j for s in self.stage_ids for j in self.partition.stage_layers(s)]
        # Keys that name a weight another key already names (the tied LM head), for checkpoints.
        # Found by identity, before any layer is materialised (a meta tied weight is one object).
        first_key: dict[nn.Parameter, str] = {}
        self.tied_keys: dict[str, str] = {}
        for j, layer in enumerate(layers):
            for name, p in layer.named_parameters(remove_duplicate=False):
                self.tied_keys.update({f"{j}.{name}": first_key[p]} if p in first_key else {})
                first_key.setdefault(p, f"{j}.{name}")
        layer_stage = [s for s in range(num_stages) for _ in self.partition.stage_layers(s)]
        tied = find_tied(layers, layer_stage, self.pp_size, layout) if self.pp_size > 1 else []
        # Only this rank's layers get memory; the rest of the list stays on the meta device.
        real = materialize(layers, self.layer_ids, init, device or "cpu") if on_meta else {}
        tied = [(real.get(p, p), ranks) for p, ranks in tied]
        self.layers = {j: layers[j] for j in self.layer_ids}
        stages = {s: nn.Sequential(*(layers[j] for j in self.partition.stage_layers(s))) for s in self.stage_ids}
        self.module = nn.Sequential(*stages.values())  # this rank's part, for parameters() and .train()
        self._param_list: list[nn.Parameter] | None = None  # taken once, by _params
        pp_ranks = mesh["pp"].mesh.flatten().tolist() if mesh is not None else [0]
        self._pp_ranks = pp_ranks
        self.executor = PipelineExecutor(stages, num_stages, pp_ranks, loss_fn, self._autocast, self.describe,
                                         {s: self.partition.stage_layers(s) for s in self.stage_ids}, layout)
        # This rank's actions, and its plan of sends and receives around them (parallel/p2p.py).
        if isinstance(schedule, str):
            train = make_schedule(schedule, self.pp_size, microbatches, virtual_stages)
        else:  # given as actions: p2p_plan below validates them (simulate)
            train = {r: list(acts) for r, acts in schedule.items()}
        evaluate = make_schedule("forward-only", self.pp_size, microbatches, virtual_stages, layout)
        self.train_actions = train[self.pp_rank]
        self.eval_actions = evaluate[self.pp_rank]
        lead = self.executor.lead
        self.train_plan = p2p_plan(train, self.pp_size, microbatches, virtual_stages, lead, layout)[self.pp_rank]
        # Generation runs one micro-batch (the growing sequence) forward through the pipeline.
        one = make_schedule("forward-only", self.pp_size, 1, virtual_stages, layout)
        self.generate_actions = one[self.pp_rank]
        self.generate_plan = p2p_plan(one, self.pp_size, 1, virtual_stages, lead, layout)[self.pp_rank]
        self.eval_plan = p2p_plan(evaluate, self.pp_size, microbatches, virtual_stages, lead, layout)[self.pp_rank]
        self.is_last_stage = num_stages - 1 in self.stage_ids
        # I and W: this rank's linear layers defer their weight gradients to W (parallel/weight_grad.py),
        # and each stage's last backward action of the step (W or B) is where its gradients are complete.
        self.split_backward = any(a.kind in ("I", "W") for a in self.train_actions)
        if self.split_backward:  # only stages that run an I: a stage whose backwards are all B needs no split
            defer_linears(stages[s] for s in stages if any(a.kind == "I" and a.stage == s for a in self.train_actions))
        # Each stage's weights whose gradients W adds (a weight tied to a module of I too, included).
        self._deferred = {s: {p for mod in stage.modules() if mod.__dict__.get("_plait_deferred")
                              for p in (mod.weight, mod.bias) if p is not None and p.requires_grad and p.is_leaf}
                          for s, stage in stages.items()}
        self._last_backward = {a.stage: a for a in self.train_actions if a.kind in ("B", "W")}
        self.dp_group = mesh.get_group("dp") if self.dp_size > 1 else None
        self.pp_group = mesh.get_group("pp") if self.pp_size > 1 else None
        self.grad_sync = None
        self._before_access: list[Callable[[], None]] = []
        self._grad_norm = None  # (norm, its device tensor) of the last train_step
        # [Note: stop agreement] `stop_signal()` says whether this rank was asked to stop (the
        # signal's number, or 0; plait/stop.py; None: no agreement). Each train_step adds it to the
        # loss's all-reduce, which every rank of the job joins: one more number in a collective the
        # step makes anyway. After it every rank holds the same sum, so all stop after the same
        # step; `stop_agreed` is the signal to name: this rank's own, else the sum when it is a stop
        # signal's number (one rank was asked), else -1 (several were, and this one not). Only the
        # decision (non-zero) must agree across ranks; the name is for rank 0's line.
        self.stop_signal: Callable[[], int] | None = None
        self.stop_agreed = 0
        self.tied = None
        if tied:
            columns = mesh.mesh.reshape(self.pp_size, self.dp_size).T.tolist()
            self.tied = TiedGradients(tied, set(self.parameters()), columns)
        if self.dp_group is not None:
            # Under ZeRO a bucket holds one stage's gradients, and a tied weight one of its own, so
            # that both holders of the tied weight cut it into the same shards (parallel/data_parallel.py).
            tied_index = {p: n for n, (p, _) in enumerate(tied)}  # the same list on every rank
            keys = {p: (s, tied_index.get(p, -1)) for s, stage in stages.items() for p in stage.parameters()}
            users: dict[nn.Parameter, set[int]] = {}  # a weight tied between two stages of this rank has two
            for s, stage in stages.items():
                for p in stage.parameters():
                    users.setdefault(p, set()).add(s)
            self.grad_sync = GradientSync(list(self.parameters()), self.dp_group, bucket_bytes=int(bucket_mb * 2**20),
                                          describe=self.describe, keys=keys, stages=users)
            # W's gradients are added outside autograd, where no hook sees them: they go to the buckets.
            self.executor.weight_grads.accumulate = self.grad_sync.add_grad

    def before_parameter_access(self, fn: Callable[[], None]) -> None:
        """Call `fn()` before the Engine hands out or loads its parameters (parameters,
        named_parameters, state_dict, load_state_dict): a writer still in flight, such as
        ZeRO's overlapped all-gather, lands first."""
        self._before_access.append(fn)

    def _settle(self) -> None:
        for fn in self._before_access:
            fn()

    def describe(self, rank: int) -> str:
        """A global rank with its mesh coordinates, for messages: "rank 3 (dp=1, pp=1)"."""
        return f"rank {rank} (dp={rank % self.dp_size}, pp={rank // self.dp_size})"

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        device = next(self.module.parameters()).device
        return torch.autocast(device.type, dtype=self.autocast_dtype)

    def _split(self, inputs: torch.Tensor, targets: torch.Tensor):
        m = self.num_microbatches
        if inputs.size(0) % m:
            raise ValueError(f"a batch of {inputs.size(0)} rows does not split into {m} micro-batches")
        return list(inputs.chunk(m)), list(targets.chunk(m))

    def train_step(self, inputs: torch.Tensor, targets: torch.Tensor) -> float:
        """Forward and backward over this rank's share; returns the global mean loss.

        Every rank of the job calls it with its data-parallel share (pipeline
        ranks of one replica get the same share). Gradients are accumulated
        into `.grad` (call the optimizer's zero_grad between steps, as usual).
        """
        if not self.module.training:  # [Note: host time per step] train() walks every module
            self.module.train()
        m, sync = self.num_microbatches, self.grad_sync
        split = self.split_backward
        if sync is not None:
            sync.prepare(explicit=split)

        def on_backward(action):
            if sync is not None and not split:  # ZeRO-2 sends every micro-batch; otherwise only in the last backward
                sync.begin_backward(action.stage, last=action.microbatch == m - 1)
            elif sync is not None and sync.zero == 2 and action.kind == "W":  # W's buckets go as they fill
                sync.begin_weight_grads(action.stage, self._deferred[action.stage])

        def after_backward(action):
            # [Note: reduction after W] With I and W no hook can tell when a stage's gradients are
            # complete (W adds them outside autograd), so the schedule does: after the stage's last
            # W (or B) of the step, or at ZeRO-2 after each micro-batch's, its buckets are launched.
            if sync is None or not split or action.kind == "I":
                return
            if sync.zero == 2 or action == self._last_backward[action.stage]:
                sync.complete(action.stage)

        # Equal micro-batches and equal shares: the mean over the global batch is the
        # sum over replicas and micro-batches of loss / (m * dp).
        total = self.executor.run(self.train_actions, self.train_plan, *self._split(inputs, targets),
                                  loss_scale=1.0 / (m * self.dp_size), on_backward=on_backward,
                                  after_backward=after_backward)
        flags = sync.finish() if sync is not None else []
        if sync is not None and self.executor.recorder is not None:
            for name, start, end in sync.spans():
                self.executor.recorder.add("wait" if name.startswith("wait") else "allreduce", name, start, end)
        if self.tied is not None:
            sharded = sync is not None and sync.zero > 0  # then the reduced gradient is the bucket's shard
            self.tied.sync(self.describe, grad_of=(lambda p: sync.bucket_of(p).shard) if sharded else None)
        # [Note: one read per step] The loss, the gradient norm and the used-flags come back to
        # the host in one transfer: the step's only synchronisation with the device.
        stop = self.stop_signal is not None
        values = self._reduce_and_read(total, self._grad_norm_sq(), flags, stop=stop)
        if sync is not None:
            sync.apply_flags(values[3 if stop else 2:], keep=self.tied.params if self.tied is not None else frozenset())
        self._grad_norm = (values[1] ** 0.5, self._norm_tensor)
        return values[0]

    @torch.no_grad()
    def eval_step(self, inputs: torch.Tensor, targets: torch.Tensor) -> float:
        """The global mean loss over the batch, forward only."""
        self.module.eval()
        total = self.executor.run(self.eval_actions, self.eval_plan, *self._split(inputs, targets), loss_scale=1.0)
        return self._reduce_and_read(total, torch.zeros_like(total), [])[0]

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, block_size: int, temperature: float = 0.8,
                 top_k: int | None = 40, generator: torch.Generator | None = None,
                 vocab: int | None = None) -> torch.Tensor:
        """Sample continuations of idx (B, T) through the pipeline; returns (B, T + new) on every rank.

        Every rank of the job calls it with the same `idx`; each replica runs its own
        pipeline, so no rank needs more than its own layers. Each token is one
        forward-only pass of the last `block_size` positions through the stages;
        the last stage samples it as `plait.model.generate` does (only its
        `generator` is drawn from) and broadcasts it to the other ranks of its
        pipeline. In one process it is `generate(nn.Sequential(*layers), ...)`. `vocab`: the
        tokenizer's size, when the model's vocabulary is padded past it.
        """
        self.module.eval()
        ex = self.executor
        last: list[torch.Tensor] = []
        # The last stage's "loss" keeps the last position's logits (B, V) instead.
        saved_loss_fn, saved_recorder = ex.loss_fn, ex.recorder
        ex.loss_fn = lambda out, _targets: last.append(out[:, -1, :]) or out.new_zeros(())
        ex.recorder = None  # generation is not part of any traced step
        try:
            for _ in range(max_new_tokens):
                x = idx[:, -block_size:]
                ex.run(self.generate_actions, self.generate_plan, [x], [x], loss_scale=1.0)
                if self.is_last_stage:
                    nxt = sample_next(last.pop(), temperature, top_k, generator, vocab)  # (B, 1)
                else:
                    nxt = torch.empty(idx.size(0), 1, dtype=torch.long, device=idx.device)
                if self.pp_group is not None:
                    sampler = self._pp_ranks[stage_rank(self.executor.num_stages - 1, self.pp_size, self.layout)]
                    work = dist.broadcast(nxt, src=sampler, group=self.pp_group, async_op=True)
                    me = self.describe(dist.get_rank())
                    wait(work, lambda s: f"{me} waited {s:.0f} s for the next sampled token from "
                                         f"{self.describe(sampler)}")
                idx = torch.cat([idx, nxt], dim=1)
        finally:
            ex.loss_fn, ex.recorder = saved_loss_fn, saved_recorder
        return idx

    def _grad_norm_sq(self) -> torch.Tensor:
        """This rank's share of the squared global gradient norm, on the device.

        Replicas hold identical gradients, so only the first replica counts; a tied
        copy counts once, on its first holder. Under ZeRO each replica holds its own
        shard of the gradients, and each counts that.
        """
        device = next(self.module.parameters()).device
        elsewhere = self.tied.owned_elsewhere if self.tied is not None else set()
        if self.grad_sync is not None and self.grad_sync.zero > 0:
            return self.grad_sync.shard_norm_sq(skip=elsewhere)
        if self.dp_rank != 0:
            return torch.zeros((), dtype=torch.float64, device=device)
        return squared_norm((p.grad for p in self._params() if p.grad is not None and p not in elsewhere),
                            device)  # [Note: grouped norm]

    def _reduce_and_read(self, loss_sum: torch.Tensor, norm_sq: torch.Tensor, flags: list[torch.Tensor],
                         stop: bool = False) -> list:
        """Sum the micro-batch losses and the norm's shares over all ranks; read them and `flags`.

        Returns [global mean loss, squared gradient norm, *flags], and with `stop` [loss, norm,
        sum of the asking ranks' signal numbers, *flags] ([Note: stop agreement]), setting
        `stop_agreed`. Only last-stage ranks hold a loss: summing over every rank and
        dividing by dp gives every rank the same global mean.
        """
        parts = [loss_sum / self.num_microbatches, norm_sq]
        if stop:
            signum = self.stop_signal()
            parts.append(norm_sq.new_full((), float(signum)))  # a fill on the device: no host copy to wait on
        both = torch.stack(parts)
        if self.mesh is not None and dist.get_world_size() > 1:
            work = dist.all_reduce(both, async_op=True)
            me = self.describe(dist.get_rank())
            wait(work, lambda s: f"{me} waited {s:.0f} s in the loss all-reduce over all "
                                 f"{dist.get_world_size()} ranks")
            both[0] /= self.dp_size
        self._norm_tensor = both[1].sqrt()
        values = torch.cat([both, *(f.double() for f in flags)]).tolist()
        if stop:
            total = int(values[2])
            self.stop_agreed = 0 if total == 0 else signum if signum else total if total in _STOP_NUMBERS else -1
        return values

    def clip_grad_norm_(self, max_norm: float) -> float:
        """Clip the gradients by their global norm over all ranks; returns the norm before clipping.

        The norm was computed and read by the last `train_step`; with max_norm <= 0
        nothing is clipped. The scaling stays on the device (no synchronisation).
        """
        if self._grad_norm is None:
            raise RuntimeError("clip_grad_norm_ needs a train_step first")
        norm, norm_tensor = self._grad_norm
        if max_norm > 0:
            scale = torch.clamp(max_norm / (norm_tensor + 1e-6), max=1.0)
            if self.grad_sync is not None and self.grad_sync.zero > 0:
                self.grad_sync.scale_shards_(scale)
                return norm
            scale_([p.grad for p in self._params() if p.grad is not None], scale)
        return norm

    def _params(self) -> list[nn.Parameter]:
        """This rank's parameters as a list, for the step's own loops.

        [Note: host time per step] Walking the module tree costs the host 0.2 ms per walk for
        gpt2-124m here, and `train()` 0.5 ms: a GPU's step is launched from the host, and the
        plain loop `benchmarks/gpu.py` compares with walks it once. The Parameter objects never
        change once the Engine is built (ZeRO moves their storage, load_state_dict copies into
        them), so the list is taken once; and train_step calls train() only after eval_step or
        generate left the module in eval mode.
        """
        if self._param_list is None:
            self._param_list = list(self.module.parameters())
        return self._param_list

    def parameters(self) -> Iterator[nn.Parameter]:
        """This rank's parameters (a tied weight once), for any torch.optim optimizer."""
        self._settle()
        return self.module.parameters()

    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """This rank's parameters with their `nn.Sequential(*layers)` names."""
        self._settle()
        seen = set()
        for j in self.layer_ids:
            for name, p in self.layers[j].named_parameters():
                if p not in seen:
                    seen.add(p)
                    yield f"{j}.{name}", p

    def state_dict(self) -> dict[str, torch.Tensor]:
        """This rank's part of the model, keyed as in `nn.Sequential(*layers).state_dict()`."""
        self._settle()
        return {f"{j}.{k}": v for j in self.layer_ids for k, v in self.layers[j].state_dict().items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load this rank's part; `state` may hold the whole model (other layers' keys are ignored)."""
        self._settle()
        for j in self.layer_ids:
            prefix = f"{j}."
            self.layers[j].load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
