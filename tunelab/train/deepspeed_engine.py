"""The DeepSpeed ZeRO strategy (`deepspeed = 'zero2'`, 'zero3', ... or a .json), and reading a DeepSpeed checkpoint
back as whole weights. The strategy contract is `tunelab.train.strategy`'s; DeepSpeed's engine owns backward, step and
its own checkpoint format, so those are what this class overrides. The config DeepSpeed gets is built in
`tunelab.train.deepspeed_configs`.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import zipfile
from collections import OrderedDict
from pathlib import Path

import torch

from tunelab.errors import TunelabError
from tunelab.model.parts import split_model
from tunelab.train.distributed import DistEnv
from tunelab.train.strategy import LossModule, SingleProcess, optimizer_state_misfit


class DeepSpeed(SingleProcess):
    """DeepSpeed ZeRO: the engine partitions states (and weights at stage 3) and owns backward and step."""

    name = "DeepSpeed"
    CHECKPOINT_TAG = "deepspeed"
    scales_fp16_loss = True  # its fp16 mode has a dynamic loss scale of its own; a second one would not be undone

    def __init__(self, env: DistEnv, cfg):
        super().__init__(env)
        self.cfg = cfg
        self.zero_stage = 0
        self.owns_process_group = False
        """A one-process run: the group DeepSpeed needs was started here, and `close` ends it."""
        self.set_local_rank = False
        """LOCAL_RANK was set here for DeepSpeed, and `close` removes it: left set, a next `tunelab train` in this
        process would take itself for a torchrun worker and never launch its ranks (`launch.maybe_relaunch`)."""
        self.group_shapes: list[dict[str, tuple]] = []
        """Each optimiser group's parameters, {name in the engine's module: shape}, as DeepSpeed records them in
        a checkpoint (`param_shapes`): what `load_optimizer` compares a checkpoint's with."""

    @property
    def shards_weights(self) -> bool:
        return self.zero_stage == 3

    def _wrap(self, model):
        import deepspeed

        from tunelab.train.deepspeed_configs import build_deepspeed_config

        wrapped = LossModule(model, self.objective)
        precision = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(self.compute_dtype, "fp32")
        ds_config = build_deepspeed_config(self.cfg, precision=precision, world_size=self.env.world_size)
        self.zero_stage = int(ds_config["zero_optimization"].get("stage", 0))
        if self.zero_stage == 3:
            # ZeRO-3 gathers a module's weights around that module's forward, and the objective reads lm_head's
            # weight without calling lm_head: registered with the root, it is gathered for the whole step.
            # (Recent DeepSpeed detects such reads itself; saying it keeps older ones right.)
            _, head, _ = split_model(model)
            for param in (head.weight, head.bias):
                if param is not None:
                    deepspeed.zero.register_external_parameter(wrapped, param)
        if not torch.distributed.is_initialized():  # one process (`tunelab train CFG --deepspeed zero2` on one GPU,
            # as XTuner's tutorials run it): DeepSpeed still talks through torch.distributed
            torch.distributed.init_process_group("nccl" if self.env.device.type == "cuda" else "gloo",
                                                 store=torch.distributed.HashStore(), rank=0, world_size=1)
            if "LOCAL_RANK" not in os.environ:  # which DeepSpeed's engine asserts a launcher has set
                os.environ["LOCAL_RANK"] = "0"
                self.set_local_rank = True
            self.owns_process_group = True
        name_of = {id(param): name for name, param in wrapped.named_parameters()}  # before ZeRO-3 partitions them
        self.group_shapes = [{name_of[id(p)]: tuple(p.shape) for p in group["params"] if p.requires_grad}
                             for group in self.raw_optimizer.param_groups]
        engine, *_ = deepspeed.initialize(model=wrapped, optimizer=self.raw_optimizer, config=ds_config,
                                          dist_init_required=False)
        return engine

    def close(self) -> None:
        if self.owns_process_group and torch.distributed.is_initialized():
            import deepspeed.comm

            # DeepSpeed's own teardown also lets go of the groups it cached (a next run in this process makes new
            # ones); older DeepSpeed has none, and torch's is all there is to do
            getattr(deepspeed.comm, "destroy_process_group", torch.distributed.destroy_process_group)()
        if self.set_local_rank:
            os.environ.pop("LOCAL_RANK", None)
        self.owns_process_group = self.set_local_rank = False

    def forward_loss(self, batch: dict):
        return self.wrapped(batch)

    def accumulating(self, last: bool):
        self.wrapped.set_gradient_accumulation_boundary(last)
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        # the loop already divided by the tokens of every micro-batch: no division by the accumulation steps
        self.wrapped.backward(self._undo_mean_over_ranks(loss), scale_wrt_gas=False)

    def step(self, max_norm: float, *, keep_grad_buffers: bool = False, skip_nonfinite: bool = False) -> float:
        # skip_nonfinite is refused with DeepSpeed (config.checks.combination_errors): its step is the engine's own
        self.wrapped.step()  # clipping (gradient_clipping in the DeepSpeed config), the step and zeroing
        norm = self.wrapped.get_global_grad_norm()
        return float(norm) if norm is not None else 0.0

    def full_state_dict(self, *, trainable_only: bool = False) -> dict | None:
        inner = self.module
        names = {n for n, p in inner.named_parameters() if p.requires_grad} if trainable_only else None
        if self.zero_stage == 3:
            import deepspeed

            state = {}
            for name, param in inner.named_parameters():
                if names is not None and name not in names:
                    continue
                with deepspeed.zero.GatheredParameters([param], modifier_rank=None):  # one weight at a time
                    if self.env.is_main:
                        state[name] = param.detach().to("cpu", copy=True)
            if names is None and self.env.is_main:
                state.update({n: b.detach().cpu() for n, b in inner.named_buffers() if n in inner.state_dict()})
            return state
        if not self.env.is_main:
            return {}
        state = inner.state_dict()
        if names is not None:
            state = {k: v for k, v in state.items() if k in names}
        return {k: v.detach().to("cpu", copy=True) for k, v in state.items()}

    def save_optimizer(self, directory: Path, state: dict) -> None:
        """The engine's own checkpoint (weights and optimizer, ZeRO layout; `load_consolidated_state_dict` reads it)."""
        self.wrapped.save_checkpoint(str(directory), tag=self.CHECKPOINT_TAG)

    def load_optimizer(self, directory: Path, state: dict) -> None:
        if "optimizer" in state or not Path(directory).is_dir():
            super().load_optimizer(directory, state)
            return
        check_saved_groups(Path(directory) / self.CHECKPOINT_TAG, self.group_shapes, Path(directory).parent)
        path, _ = self.wrapped.load_checkpoint(str(directory), tag=self.CHECKPOINT_TAG, load_module_strict=False)
        if path is None:
            raise TunelabError(f"{directory}: no DeepSpeed checkpoint (tag {self.CHECKPOINT_TAG!r}) to resume from.")


def check_saved_groups(tag_dir: Path, mine: list[dict[str, tuple]], checkpoint: Path) -> None:
    """Refuse a DeepSpeed checkpoint whose optimiser was saved with other parameter groups than this run's (`mine`,
    `DeepSpeed.group_shapes`), before DeepSpeed loads anything: ZeRO-1/2 stop on it with a RuntimeError about the
    "parameter-alignment layout", ZeRO-3 with torch's ValueError, each with a traceback from every rank. The order
    of a group's parameters is DeepSpeed's own (round_robin_gradients shuffles it), so each group is compared as a
    set, with its shapes (another lora_r)."""
    saved = saved_param_groups(tag_dir)
    if saved is None:  # no ZeRO record to compare: DeepSpeed says what is wrong with the folder
        return
    if len(saved) != len(mine):
        raise optimizer_state_misfit(checkpoint, f"{len(saved)} parameter groups saved, {len(mine)} now")
    for i, (theirs, ours) in enumerate(zip(saved, mine)):
        if theirs.keys() != ours.keys():
            name = min(theirs.keys() ^ ours.keys())
            where = "saved in it, not trained in it now" if name in theirs else "trained in it now, not saved in it"
            raise optimizer_state_misfit(checkpoint, f"parameter group {i} holds other parameters: "
                                                     f"{_engine_name(name)} {where}")
        for name, shape in ours.items():
            if tuple(theirs[name]) != tuple(shape):
                raise optimizer_state_misfit(checkpoint, f"{_engine_name(name)} was saved of shape "
                                                         f"{list(theirs[name])}, is {list(shape)} now")


def _engine_name(name: str) -> str:
    """A parameter's name in the model, without the `model.` of the LossModule the engine wraps."""
    return name[len("model."):] if name.startswith("model.") else name


def saved_param_groups(tag_dir: Path) -> list[dict] | None:
    """The parameter groups a DeepSpeed checkpoint's ZeRO optimiser state holds, in order, each {name: shape}: the
    `param_shapes` of its model-states file (`*model_states.pt` in the tag folder). Read with torch's weights-only
    unpickler, its tensors memory-mapped, not read; a file that unpickler refuses (an object DeepSpeed or a client
    state put there) has just its pickle read, every class but OrderedDict and torch.Size a stand-in, no tensor
    data. None where there is no file or no such record (no ZeRO), or the file cannot be read."""
    files = sorted(Path(tag_dir).glob("*model_states.pt"))
    if not files:
        return None
    try:
        try:
            saved = torch.load(files[0], map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # mmap needs torch.save's zip format; an older file is read whole
            saved = torch.load(files[0], map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        saved = _read_pickle_only(files[0])
    except Exception:  # unreadable: DeepSpeed's own load says how
        return None
    groups = saved.get("param_shapes") if isinstance(saved, dict) else None
    if not isinstance(groups, list) or not all(isinstance(group, dict) and all(
            isinstance(name, str) and _is_shape(shape) for name, shape in group.items()) for group in groups):
        return None  # (a record of something else, stand-ins among it: DeepSpeed's own load says what it is)
    return groups


def _is_shape(value) -> bool:
    return isinstance(value, (tuple, list)) and all(type(size) is int for size in value)


class _StandIn:
    """Whatever a model-states file pickled besides dicts, lists and shapes: built from nothing, read by nobody."""

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass

    def __setitem__(self, key, value):
        pass

    def append(self, value):
        pass

    def extend(self, values):
        pass


class _ShapesOnly(pickle.Unpickler):
    """An unpickler that builds OrderedDict and torch.Size and nothing else that is named: no code of the file's
    choosing runs, and the tensors' storages are left unread."""

    def find_class(self, module, name):
        known = {("collections", "OrderedDict"): OrderedDict, ("torch", "Size"): torch.Size}
        return known.get((module, name), _StandIn)

    def persistent_load(self, pid):
        return None


def _read_pickle_only(file: Path):
    """The object in a torch.save zip file, through `_ShapesOnly`; None if it is not such a file."""
    try:
        with zipfile.ZipFile(file) as archive:
            pickled = next(n for n in archive.namelist() if n == "data.pkl" or n.endswith("/data.pkl"))
            with archive.open(pickled) as data:
                return _ShapesOnly(data).load()
    except Exception:
        return None


def load_consolidated_state_dict(path) -> dict:
    """Whole fp32 weights from a DeepSpeed checkpoint directory, in one process (for `convert pth_to_hf`).

    `path` is a directory written by `engine.save_checkpoint` (it holds `latest` or a tag folder of
    `*_model_states.pt`), e.g. WORK_DIR/iter_N/optimizer or an XTuner `iter_N.pth/` folder.
    """
    path = Path(path)
    tag = None
    if not (path / "latest").exists():
        if any(path.glob("*model_states.pt")):  # the tag folder itself was given
            path, tag = path.parent, path.name
        else:
            raise TunelabError(f"{path}: not a DeepSpeed checkpoint (no 'latest' file and no *_model_states.pt).")
    try:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    except ImportError:
        raise TunelabError(f"{path} is a DeepSpeed checkpoint; reading it needs DeepSpeed: "
                           "pip install 'tunelab[deepspeed]'.") from None
    state = get_fp32_state_dict_from_zero_checkpoint(str(path), tag=tag)
    # tunelab's engines wrap LossModule, whose only child is `model`: strip that prefix to get the HF names back
    # (a plain HF causal LM always has a top-level key outside `model.`, e.g. lm_head.weight).
    stripped = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
    wrapped = len(stripped) == len(state) and any(k.startswith(("model.", "base_model.")) for k in stripped)
    return stripped if wrapped else state
