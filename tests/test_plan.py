"""The fast-path plan: decided once from the settings, the device and the number of processes; off, the run is
transformers + peft as they come, and it trains like the fast path."""

from __future__ import annotations

from tests.train_helpers import capture_model, identity_rows, tiny_cfg
from tunelab.config.schema import TrainConfig
from tunelab.model.plan import FastPathPlan, plan_fast_path


def test_cuda_graphs_are_on_by_default_for_packed_rows_in_one_process():
    assert plan_fast_path(TrainConfig(), "cuda").cuda_graphs  # packed rows are max_length wide: one shape
    assert not plan_fast_path(TrainConfig(), "cuda", world_size=2).cuda_graphs
    assert not plan_fast_path(TrainConfig(), "cpu").cuda_graphs
    assert not plan_fast_path(TrainConfig(use_compile=False), "cuda").cuda_graphs
    assert not plan_fast_path(TrainConfig(pack_to_max_length=False), "cuda").cuda_graphs  # padding would cost
    assert plan_fast_path(TrainConfig(pack_to_max_length=False, cuda_graphs=True), "cuda").cuda_graphs
    # an eager checkpoint around compiled code (MLP slices) cannot be recorded; with offloaded inputs the graphs
    # were recorded again every step (round 16)
    assert not plan_fast_path(TrainConfig(cuda_graphs=True, offload_activations=True), "cuda").cuda_graphs
    assert not plan_fast_path(TrainConfig(cuda_graphs=True, max_length=65536, mlp_chunk_size=8192,
                                          offload_activations=False), "cuda").cuda_graphs


def test_dpo_scoring_its_reference_every_step_runs_without_cuda_graphs():
    """The reference's no-gradient pass cannot reuse the graphs' private memory pool: without graphs DPO held less
    than TRL's DPOTrainer (5.90 against 6.22 GiB, Llama-7B QLoRA, round 14), with them more (6.26)."""
    assert not plan_fast_path(TrainConfig(method="qlora", objective="dpo"), "cuda").cuda_graphs  # adapters off
    assert not plan_fast_path(TrainConfig(method="full", objective="kto"), "cuda").cuda_graphs  # a frozen copy
    assert plan_fast_path(TrainConfig(method="full", objective="dpo", reference="precomputed"), "cuda").cuda_graphs
    assert plan_fast_path(TrainConfig(method="qlora", objective="orpo"), "cuda").cuda_graphs  # no reference
    assert plan_fast_path(TrainConfig(method="qlora", objective="dpo", cuda_graphs=True), "cuda").cuda_graphs


def test_rows_of_8k_and_more_offload_layer_inputs_and_slice_the_mlp_only_past_32k_by_default():
    """Round 16, InternLM2-7B QLoRA: at 8k, inputs offloaded without CUDA graphs ran as fast as graphs with the inputs
    on the GPU (10,181 against 10,170 tokens/s) in 2 GiB less; at 4k graphs were faster (10,594 against 10,245) and
    leaner in reserved memory. Round 14, Llama-3.1-8B QLoRA 32k: inputs in CPU memory with the MLP whole ran faster
    and in less memory than on the GPU with the MLP in 8k slices. Up to 32k the checkpoint stays inside the compiled
    layer and keeps attention's output in CPU memory beside the input (round 21: Llama-3.1-8B QLoRA 32k 7,445
    tokens/s against 6,437 with the checkpoint around, still in less memory than Unsloth); longer rows run the MLP
    in slices, with the checkpoint around."""
    long = plan_fast_path(TrainConfig(method="qlora", max_length=32768), "cuda")
    assert long.offload_activations and long.mlp_slice is None and not long.cuda_graphs
    assert long.checkpoint_inside_compile and long.save_attention and long.keeps_projections
    longer = plan_fast_path(TrainConfig(method="qlora", max_length=65536), "cuda")
    assert longer.mlp_slice == 32768 and not longer.checkpoint_inside_compile
    whole_mlp = plan_fast_path(TrainConfig(method="qlora", max_length=65536, mlp_chunk_size=None), "cuda")
    assert whole_mlp.checkpoint_around and not whole_mlp.checkpoint_inside_compile
    for tokens in (8192, 16384):
        offloaded = plan_fast_path(TrainConfig(method="qlora", max_length=tokens), "cuda")
        assert offloaded.offload_activations and offloaded.checkpoint_inside_compile and not offloaded.cuda_graphs
        assert offloaded.save_attention and offloaded.save_projections
    at_4k = plan_fast_path(TrainConfig(method="qlora", max_length=4096), "cuda")
    assert not at_4k.offload_activations and at_4k.cuda_graphs and at_4k.checkpoint_inside_compile
    assert not (at_4k.save_attention or at_4k.save_projections)  # on the GPU: 2-3 more saved tensors a layer
    no_compile = plan_fast_path(TrainConfig(method="qlora", max_length=8192, use_compile=False), "cuda")
    assert no_compile.offload_activations and not no_compile.save_attention  # eager: the plain checkpoint
    on_gpu = plan_fast_path(TrainConfig(method="qlora", max_length=32768, offload_activations=False), "cuda")
    assert not on_gpu.offload_activations and on_gpu.mlp_slice == 8192  # 'auto' without offloading: 8k slices
    assert plan_fast_path(TrainConfig(method="qlora", max_length=32768, mlp_chunk_size=8192), "cuda").mlp_slice == 8192
    assert not plan_fast_path(TrainConfig(method="qlora", max_length=32768), "cpu").offload_activations
    assert not plan_fast_path(TrainConfig(method="full", max_length=32768, gradient_checkpointing=False),
                              "cuda").offload_activations  # nothing checkpointed to offload
    # several processes (untested with offloading): only when asked
    assert not plan_fast_path(TrainConfig(method="qlora", max_length=32768), "cuda", world_size=2).offload_activations
    assert plan_fast_path(TrainConfig(method="qlora", max_length=32768, offload_activations=True), "cuda",
                          world_size=2).offload_activations


def test_fast_path_off_turns_every_lever_off():
    plain = plan_fast_path(TrainConfig(fast_path=False, offload_activations=True, cuda_graphs=True), "cuda")
    assert plain == FastPathPlan(on_gpu=True, checkpointing=True)
    assert not plain.chunked_loss and not plain.compiled_loss and not plain.fused_dequant


def test_gpu_levers_wait_for_a_gpu_and_long_context_levers_for_long_rows():
    cfg = TrainConfig(method="qlora", max_length=16384, mlp_chunk_size=8192, offload_activations=True)
    gpu, cpu = plan_fast_path(cfg, "cuda"), plan_fast_path(cfg, "cpu")
    assert gpu.varlen_attention and gpu.fused_dequant and gpu.offload_activations and gpu.embeddings_on_cpu
    assert not (cpu.varlen_attention or cpu.fused_dequant or cpu.offload_activations or cpu.compile)
    assert cpu.chunked_loss and cpu.mlp_slice == gpu.mlp_slice == 8192  # these run on any device
    assert plan_fast_path(TrainConfig(max_length=8192, mlp_chunk_size=8192), "cuda").mlp_slice is None
    assert not plan_fast_path(TrainConfig(method="full", embeddings_on_cpu=True), "cuda").embeddings_on_cpu


def test_embedding_rows_are_gathered_ahead_unless_the_rows_are_sharded():
    """The loop gathers a batch's embedding rows as it sends the batch (during the step before) where the embedding
    lives in CPU memory; under sequence parallelism the objective shards the ids first, so it does not."""
    assert plan_fast_path(TrainConfig(method="qlora"), "cuda").embedding_rows_ahead
    assert not plan_fast_path(TrainConfig(method="qlora", sequence_parallel_size=2), "cuda", world_size=2
                              ).embedding_rows_ahead
    assert not plan_fast_path(TrainConfig(method="qlora", embeddings_on_cpu=False), "cuda").embedding_rows_ahead
    assert not plan_fast_path(TrainConfig(method="qlora"), "cpu").embedding_rows_ahead


def test_qlora_keeps_dequantised_weights_for_backward_only_when_asked_and_checkpointed():
    """The 16-bit copy of a 4-bit weight lives until the layer's backward only with qlora_dequant_once (a memory-for-
    time trade) and checkpointing (without it, every layer's copy would wait for backward)."""
    assert not plan_fast_path(TrainConfig(method="qlora"), "cuda").dequantize_once
    assert plan_fast_path(TrainConfig(method="qlora", qlora_dequant_once=True), "cuda").dequantize_once
    assert not plan_fast_path(TrainConfig(method="qlora", qlora_dequant_once=True, gradient_checkpointing=False),
                              "cuda").dequantize_once
    assert not plan_fast_path(TrainConfig(method="qlora", qlora_dequant_once=True), "cpu").dequantize_once


def test_training_with_the_fast_path_off_follows_the_same_curve(tiny_llama_dir, tmp_path, monkeypatch):
    """fast_path = False (transformers' checkpointing, full logits) trains as the fast path does (tunelab's
    checkpointing, the chunked loss): the plain path is the fast path's reference."""
    from tunelab.model.tokenizer import load_tokenizer
    from tunelab.train.loop import train

    rows = identity_rows(load_tokenizer(str(tiny_llama_dir)), copies=2)
    curves = []
    for fast_path in (True, False):
        captured = capture_model(monkeypatch)
        cfg = tiny_cfg(tiny_llama_dir, method="lora", max_steps=4, gradient_checkpointing=True, fast_path=fast_path)
        curves.append(train(cfg, tmp_path / str(fast_path), train_rows=rows, device="cpu").losses)
        # each run took the path it was asked for (else equal curves would compare a path with itself)
        report = captured["fast_path"]  # what the plan the loop made switched on
        assert (report == {"fast_path": "off"}) == (not fast_path), report
    assert len(curves[0]) == 4 and curves[0][4] < curves[0][1]
    for step in curves[0]:
        assert abs(curves[0][step] - curves[1][step]) < 1e-5, step
