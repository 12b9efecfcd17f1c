"""Fitting a run to a GPU card, from the memory estimate (`tunelab.model.memory`): the fast-path plan and the
preference reference the card holds, the fewest GPUs a long row must be split over, and `tunelab plan`'s report."""

from __future__ import annotations

from dataclasses import replace

from tunelab.errors import TunelabError
from tunelab.model.freeze import partial, trained_part
from tunelab.model.memory import GIB, available_cpu_memory, estimate_memory, sharded_by_engine
from tunelab.model.plan import plan_fast_path
from tunelab.model.shapes import model_shape


def choose_reference(cfg, device=None, plan=None) -> str | None:
    """`cfg.resolved_reference()` for this run: with reference = 'auto', full fine-tuning takes a frozen copy when
    the estimate with the copy fits on `device` (a CPU: always) and the engine does not shard the weights (FSDP,
    ZeRO-3 would hold a whole copy on every GPU), else precomputes the reference's log-probabilities."""
    if cfg.reference != "auto" or cfg.method != "full" or cfg.resolved_reference() is None:
        return cfg.resolved_reference()
    if "weights" in sharded_by_engine(cfg):
        return cfg.resolved_reference(copy_fits=False)
    try:
        fits = estimate_memory(replace(cfg, reference="copy"), device, plan).fits
    except TunelabError:  # the model's shape is not known here: the choice that needs no memory
        fits = False
    return cfg.resolved_reference(copy_fits=fits is not False)


def fit_plan_to_card(cfg, device=None, plan=None, *, world_size: int | None = None, card_bytes: int | None = None):
    """The run's `FastPathPlan` for the card (`device`, or `card_bytes` for one that is not here) and this machine's
    CPU memory. Offloaded rows keep the checkpoint inside the compiled layer, which keeps attention's output and the
    q, k, v, o projections (the fastest arrangement), but holds more of the recomputed MLP at once, and parks the
    projections in CPU memory. The first arrangement that the card holds (and, keeping the projections, the CPU
    memory available now): as planned; without the projections; the checkpoint around the compiled layer
    (Llama-3.1-8B QLoRA 32k: 14.7 GiB reserved inside with the projections, 13.7 without, 12.7 around; BENCHMARKS.md,
    "the checkpoint keeps attention's output at long context" and "the checkpoint keeps the q, k, v and o projections
    at long context"). Where none fits, the plan stays as it is (and the estimate names settings that would)."""
    plan = plan or plan_fast_path(cfg, "cuda", world_size or cfg.sequence_parallel_size)
    if not (plan.offload_activations and plan.checkpoint_inside_compile):
        return plan
    candidates = [plan]
    if plan.keeps_projections:
        candidates.append(replace(plan, save_projections=False))
    candidates.append(replace(plan, checkpoint_around=True, save_attention=False, save_projections=False))
    cpu_free = available_cpu_memory()
    try:
        for candidate in candidates:
            est = estimate_memory(cfg, device, candidate, world_size=world_size, card_bytes=card_bytes)
            if est.fits is not False and (not candidate.keeps_projections or est.fits_in_cpu_memory(cpu_free)):
                return candidate
    except TunelabError:  # the model's shape is not known here
        pass
    return plan


def smallest_sequence_parallel(cfg, card_bytes: int) -> int | None:
    """The fewest GPUs each row of `cfg.max_length` must be split over (`sequence_parallel_size`) for a step to fit
    a card of `card_bytes`, with the run on that many GPUs (the engine of `cfg` sharding over them); None: no size
    up to the model's attention heads fits. Only sizes that divide the attention heads are tried."""
    heads = model_shape(cfg.pretrained_model_name_or_path).num_attention_heads
    for size in (n for n in range(1, heads + 1) if heads % n == 0):
        split = replace(cfg, sequence_parallel_size=size)
        if estimate_memory(split, world_size=size, card_bytes=card_bytes).fits:
            return size
    return None


def plan_report(cfg, device=None, plan=None, *, world_size: int | None = None, card_bytes: int | None = None) -> str:
    """A short text table of the estimate, for `tunelab plan` (per GPU, on `world_size` GPUs). `plan`: the run's own,
    fitted to its card already (the training loop's); without one, the plan `cfg` gets, fitted to the card here."""
    from tunelab.data.dataset import row_length

    plan = plan or fit_plan_to_card(cfg, device, world_size=world_size, card_bytes=card_bytes)
    reference = choose_reference(cfg, device, plan)
    if reference and reference != cfg.reference:
        cfg = replace(cfg, reference=reference)
    est = estimate_memory(cfg, device, plan, world_size=world_size, card_bytes=card_bytes)
    unit = "a sample and its KL sequence" if cfg.objective == "kto" else "a pair"
    objective = "" if cfg.objective == "sft" else f", objective {cfg.objective}" + (
        f" (reference: {reference})" if reference else "") + f", rows of {row_length(cfg)} tokens ({unit})"
    lines = [f"memory plan for {cfg.pretrained_model_name_or_path} ({cfg.method}, max_length {cfg.max_length}, "
             f"batch_size {cfg.batch_size}, gradient checkpointing "
             f"{'on' if cfg.resolved_gradient_checkpointing() else 'off'}{objective})"]
    if partial(cfg):
        part = trained_part(cfg)
        lines.append(f"  partial fine-tuning: {part.params:,} of {part.total:,} parameters train, backward through "
                     f"{part.backward_layers} of {model_shape(cfg.pretrained_model_name_or_path).num_hidden_layers} "
                     f"layers")
    if est.world_size > 1:
        engine = cfg.deepspeed or ("fsdp" if cfg.fsdp else "ddp")
        split = (f", each row over {cfg.sequence_parallel_size} (sequence parallel)"
                 if cfg.sequence_parallel_size > 1 else "")
        lines.append(f"  per GPU, on {est.world_size} GPUs ({engine}{split})")
    for name, value in est.parts.items():
        lines.append(f"  {name:<30} {value / GIB:8.2f} GiB")
    lines.append(f"  {'peak allocated (estimate)':<30} {est.total / GIB:8.2f} GiB")
    lines.append(f"  {'with CUDA context and slack':<30} {est.with_overhead / GIB:8.2f} GiB")
    if est.cpu_offload_bytes:
        lines.append(f"  {'CPU memory (offloaded)':<30} {est.cpu_offload_bytes / GIB:8.2f} GiB  "
                     f"({', '.join(est.cpu_offload)})")
    if est.device_bytes is not None:
        lines.append(f"  {est.device_name}: {est.device_bytes / GIB:.1f} GiB -> {est.verdict}")
    if est.device_bytes is not None and cfg.objective == "sft" and (not est.fits or cfg.sequence_parallel_size > 1):
        size = smallest_sequence_parallel(cfg, est.device_bytes)
        need = (f"sequence_parallel_size = {size} at least (each row over {size} GPUs)" if size and size > 1 else
                "one GPU is enough (sequence_parallel_size = 1)" if size else
                "no sequence_parallel_size up to the attention heads fits")
        lines.append(f"  rows of {cfg.max_length} tokens on {est.device_name}: {need}")
    for s in est.suggestions:
        lines.append(f"  try: {s}")
    return "\n".join(lines)
