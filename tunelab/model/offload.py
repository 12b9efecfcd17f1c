"""Layer inputs (and what else a checkpointed layer saves that grows with its row) parked in CPU memory from
forward to backward, copied out and back on a stream beside the compute: `LayerInputOffload`, which
`tunelab.model.layers` puts around each checkpointed decoder layer where the plan offloads (long rows).

tests/test_layers.py checks loss and gradients against transformers' checkpointing and counts what leaves;
scripts/gpu_check.py does the same with pinned and plain copies on a GPU.
"""

from __future__ import annotations

import dataclasses
import functools
import weakref

import torch
from torch.utils.checkpoint import checkpoint

# Pinned (page-locked) buffers copy asynchronously, but torch's pinned allocator rounds each block up to a power of
# two; above this size a layer input goes to ordinary memory: a synchronous copy (~1% of so long a layer's compute),
# and no second input on the GPU for a copy in flight.
PINNED_MAX_BYTES = 256 * 2**20


def plain_checkpoint(function, *args):
    """Non-reentrant checkpoint of function(*args): what every checkpointed layer uses, offloaded or not."""
    return checkpoint(function, *args, use_reentrant=False)


def _copied_synchronously(tensor: torch.Tensor) -> bool:
    """A GPU tensor above PINNED_MAX_BYTES: copied to ordinary CPU memory, synchronously."""
    return tensor.is_cuda and tensor.numel() * tensor.element_size() > PINNED_MAX_BYTES


@dataclasses.dataclass(eq=False)
class _Parked:
    """A tensor a layer saved for backward: on the GPU in `gpu` until it leaves, then in CPU memory in `cpu` until
    backward fetches it back into `gpu`."""

    cpu: torch.Tensor | None
    device: torch.device
    layer: int  # the layer call that saved it (LayerInputOffload counts them)
    gpu: torch.Tensor | None = None
    ready: object = None  # CUDA event: the copy into `gpu` is done (None: nothing to wait for)

    def __del__(self):
        # A copy back never used (backward stopped early): its block belongs to the compute stream, which must not
        # hand it to another kernel before the copy into it ends.
        if self.ready is not None:
            torch.cuda.current_stream(self.device).wait_event(self.ready)


class LayerInputOffload:
    """Parks each checkpointed layer input (and attention's output, where the checkpoint keeps it) in CPU memory as
    forward passes it and brings it back for backward.

    The copies run on a stream of their own, beside the layers' kernels: the copy out of layer i's tensors while
    layer i+1 computes (their GPU memory is let go one layer later, when the copy is done), the copy back of layer
    i-1's while layer i's backward computes. So two layers' saved tensors are on the GPU at a time instead of every
    layer's (one layer's above PINNED_MAX_BYTES, copied synchronously). A layer's tensors leave when the next layer
    call begins: those of the last layer before backward never leave, since backward needs them first and their
    memory is held until then anyway (copied out and back, the first layer of backward waits 5 ms of an 8k step's
    758: BENCHMARKS.md, "the last layer's tensors stay for backward"). Tensors above PINNED_MAX_BYTES leave at once,
    freeing their memory. One offloader serves all layers of a model (it keeps the order they were parked in).
    """

    def __init__(self):
        self._stream = None
        self._sources = []  # (GPU tensor, event, layer) of copies out: each source kept until its copy is done
        self._parked: list[weakref.ref] = []  # what waits for backward, in forward order
        self._leaving: list[_Parked] = []  # the latest layer call's, still on the GPU until the next call begins
        self._layer = 0  # layer calls so far: what one call parks is fetched together

    def hooks(self, layer_input: torch.Tensor):
        """saved_tensors_hooks that park what a layer saves for backward that grows with its row, and leave every
        other saved tensor where it is. That is the layer input, recognised by its storage (an eager checkpoint
        saves it as it came), and floating-point tensors nearly as large: of 3 or more dimensions at least half its
        size (an alias of the input that compiled code saves; attention's output where the checkpoint keeps it,
        `save_attention`), or a matmul's output, a row a token, at least an eighth of its size (the q, k, v and o
        projections' outputs where the checkpoint keeps them, `save_projections`). Weights (parameters), what every
        layer shares (RoPE cos/sin, a head's width a token), masks and attention's softmax statistics (a value a
        head and token) stay put."""
        self._layer += 1
        self._copy_out_leaving()
        layer, storage, numel = self._layer, layer_input.untyped_storage().data_ptr(), layer_input.numel()
        tokens = layer_input.shape[:-1].numel()

        def pack(tensor):
            if isinstance(tensor, torch.nn.Parameter):
                return tensor
            row_sized = tensor.is_floating_point() and (
                (tensor.dim() >= 3 and 2 * tensor.numel() >= numel)
                or (tensor.dim() == 2 and tensor.shape[0] == tokens and 8 * tensor.numel() >= numel))
            if row_sized or tensor.untyped_storage().data_ptr() == storage:
                return self.park(tensor, layer)
            return tensor

        def unpack(packed):
            return self.fetch(packed) if isinstance(packed, _Parked) else packed

        return torch.autograd.graph.saved_tensors_hooks(pack, unpack)

    def park(self, tensor: torch.Tensor, layer: int = 0) -> _Parked:
        """Keep `tensor`, saved by layer call number `layer`, for backward: copied to CPU memory when the next layer
        call begins, since its GPU memory is held until that copy ends anyway; one above PINNED_MAX_BYTES at once,
        synchronously, which frees its GPU memory at once too."""
        parked = _Parked(None, tensor.device, layer, gpu=tensor)
        self._parked.append(weakref.ref(parked))
        if _copied_synchronously(tensor):
            self._copy_out(parked)
        else:
            self._leaving.append(parked)
        return parked

    def _copy_out_leaving(self) -> None:
        for parked in self._leaving:
            self._copy_out(parked)
        self._leaving = []

    def _copy_out(self, parked: _Parked) -> None:
        tensor, layer, parked.gpu = parked.gpu, parked.layer, None
        self._release_sources(before=layer)
        if tensor.device.type != "cuda":  # CPU runs (tests): a copy, so that a wrong fetch would show
            parked.cpu = tensor.detach().clone()
        elif _copied_synchronously(tensor):
            parked.cpu = tensor.to("cpu")
        else:
            cpu = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            stream = self._copy_stream(tensor.device)
            stream.wait_stream(torch.cuda.current_stream(tensor.device))
            with torch.cuda.stream(stream):
                cpu.copy_(tensor, non_blocking=True)
                done = torch.cuda.Event()
                done.record(stream)
            # The source must outlive its copy: under CUDA graphs nothing else keeps the next graph from writing
            # over it. It is let go when the next layer's tensors leave or backward fetches, after the compute
            # stream waits for the copy (the same layer's other tensors do not wait: their copies queue behind it).
            self._sources.append((tensor, done, layer))
            parked.cpu = cpu

    def fetch(self, parked: _Parked) -> torch.Tensor:
        self._leaving = []  # backward has begun: what has not left stays
        if parked.device.type != "cuda":
            return parked.cpu if parked.gpu is None else parked.gpu
        self._release_sources()
        alive = [p for p in (ref() for ref in self._parked) if p is not None]
        # Backward reaches the layers in reverse: this layer's tensors are needed now, the latest earlier layer's
        # next, so those are copied while this layer computes.
        following = max((p.layer for p in alive if p.layer < parked.layer), default=None)
        for p in alive:
            if p.layer == parked.layer or (p.layer == following and p.gpu is None and p.cpu.is_pinned()):
                self._start_fetch(p)
        self._parked = [weakref.ref(p) for p in alive if p is not parked]
        if parked.ready is not None:
            torch.cuda.current_stream(parked.device).wait_event(parked.ready)
        gpu, parked.gpu, parked.ready = parked.gpu, None, None
        return gpu

    def _start_fetch(self, parked: _Parked) -> None:
        if parked.gpu is not None:
            return
        if not parked.cpu.is_pinned():
            parked.gpu = parked.cpu.to(parked.device)
            return
        compute = torch.cuda.current_stream(parked.device)
        parked.gpu = torch.empty(parked.cpu.shape, dtype=parked.cpu.dtype, device=parked.device)
        stream = self._copy_stream(parked.device)
        stream.wait_stream(compute)  # the block may have served kernels still queued on the compute stream
        with torch.cuda.stream(stream):
            parked.gpu.copy_(parked.cpu, non_blocking=True)
            parked.ready = torch.cuda.Event()
            parked.ready.record(stream)

    def _release_sources(self, before: int | None = None) -> None:
        """Let go of the sources of finished copies: those of layers before `before` (None: all)."""
        keep = []
        for tensor, done, layer in self._sources:
            if before is None or layer < before:
                torch.cuda.current_stream(tensor.device).wait_event(done)
            else:
                keep.append((tensor, done, layer))
        self._sources = keep

    def _copy_stream(self, device):
        if self._stream is None:
            self._stream = torch.cuda.Stream(device)
        return self._stream

    def call(self, function, *args):
        """function(*args) with what it saves of its input args[0] parked (the checkpoint inside compiled code)."""
        with self.hooks(args[0]):
            return function(*args)

    def checkpoint(self, function, *args):
        """Non-reentrant checkpoint whose saved input args[0] is parked until backward (the checkpoint around
        compiled code or eager code: what the layer saves inside goes to the checkpoint's own hooks and is
        recomputed)."""
        return self.call(functools.partial(plain_checkpoint, function), *args)
