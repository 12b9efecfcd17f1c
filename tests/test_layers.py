"""How decoder layers run in training (tunelab.model.layers): tunelab's own checkpointing, the offloaded layer
inputs and the MLP in slices give the loss and the gradients of the plain path (fp32, CPU)."""

import pytest
import torch

from tunelab.config.schema import TrainConfig
from tunelab.model import layers as layers_mod
from tunelab.model.load import load_model_for_training
from tunelab.model.loss import causal_lm_loss
from tunelab.model.offload import LayerInputOffload
from tunelab.model.parts import split_model
from tunelab.model.plan import FastPathPlan


def _batch(vocab):
    torch.manual_seed(0)
    ids = torch.randint(5, vocab, (2, 40))
    pos = torch.stack([torch.cat([torch.arange(18), torch.arange(22)]), torch.arange(40)])
    labels = ids.clone()
    labels[0, 20:25] = -100
    return {"input_ids": ids, "labels": labels, "position_ids": pos}


def _lora(model_dir, **overrides):
    settings = dict(pretrained_model_name_or_path=str(model_dir), method="lora", lora_r=8, lora_dropout=0.0,
                    max_length=64, gradient_checkpointing=True)
    cfg = TrainConfig(**{**settings, **overrides})
    torch.manual_seed(1)
    model, _ = load_model_for_training(cfg, torch.device("cpu"))
    model.train()
    for name, p in model.named_parameters():  # B = 0 at init would hide A's gradients
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    return model


def _loss_and_grads(model, batch):
    total, n = causal_lm_loss(model, batch)
    (total / n).backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return total.detach(), grads


def _hf_checkpointing(model):
    """The same model with transformers' own checkpointing back (what it was before run_decoder_layers)."""
    for layer in split_model(model)[0].layers:
        layer.__dict__.pop("forward", None)
        layer.mlp.__dict__.pop("forward", None)
        layer.gradient_checkpointing = True
    return model


def _record_parked(monkeypatch, shapes: list):
    """Record the shape of every tensor LayerInputOffload parks (on CPU a copy, so a wrong fetch would show)."""
    park = LayerInputOffload.park
    monkeypatch.setattr(LayerInputOffload, "park",
                        lambda self, t, *layer: shapes.append(t.shape) or park(self, t, *layer))


@pytest.mark.parametrize("options", [dict(), dict(mlp_slice=16), dict(offload_activations=True)],
                         ids=["checkpoint", "mlp_slices", "offload"])
def test_layer_modes_keep_loss_and_gradients(tiny_llama_dir, options, monkeypatch):
    model = _lora(tiny_llama_dir)
    batch = _batch(model.config.vocab_size)
    decoder_layers = split_model(model)[0].layers
    packed = []
    if options.get("offload_activations"):
        _record_parked(monkeypatch, packed)
    layers_mod.run_decoder_layers(decoder_layers, FastPathPlan(enabled=True, checkpointing=True, **options))
    got_loss, got = _loss_and_grads(model, batch)
    want_loss, want = _loss_and_grads(_hf_checkpointing(model), batch)
    torch.testing.assert_close(got_loss, want_loss, atol=1e-5, rtol=1e-6)
    assert got.keys() == want.keys() and len(got) > 0
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-6, rtol=1e-4, msg=name)
    if options.get("offload_activations"):
        # One tensor per layer, the layer input [batch, seq, hidden]; nothing else (RoPE cos/sin stay put).
        assert packed == [torch.Size([2, 40, model.config.hidden_size])] * len(decoder_layers)


def test_offload_keeps_the_last_layers_input_on_the_device(tiny_llama_dir, monkeypatch):
    """A layer's saved tensors leave for CPU memory when the next layer call begins, so the last layer's, which
    backward needs first, never leave; loss and gradients are those of the plain path, a second step's too."""
    model = _lora(tiny_llama_dir)
    batch = _batch(model.config.vocab_size)
    decoder_layers = split_model(model)[0].layers
    left = []
    copy_out = LayerInputOffload._copy_out
    monkeypatch.setattr(LayerInputOffload, "_copy_out",
                        lambda self, parked: left.append(parked.layer) or copy_out(self, parked))
    layers_mod.run_decoder_layers(decoder_layers, FastPathPlan(enabled=True, checkpointing=True,
                                                               offload_activations=True))
    n = len(decoder_layers)
    for step in range(2):
        left.clear()
        got_loss, got = _loss_and_grads(model, batch)
        assert left == list(range(step * n + 1, step * n + n))  # layer calls are counted across steps
    want_loss, want = _loss_and_grads(_hf_checkpointing(model), batch)
    torch.testing.assert_close(got_loss, want_loss, atol=1e-5, rtol=1e-6)
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-6, rtol=1e-4, msg=name)


@pytest.mark.parametrize("options", [dict(), dict(offload_activations=True), dict(mlp_slice=16),
                                     dict(offload_activations=True, mlp_slice=16)],
                         ids=["inside", "inside_offloaded", "around", "around_offloaded"])
def test_compiled_layers_keep_loss_and_gradients(tiny_llama_dir, options, monkeypatch):
    """Compiled layers, the checkpoint inside the compiled function (AOTAutograd recomputes in its backward graph)
    or around it (as with MLP slices), each with its input parked or not, give the plain path's loss and gradients;
    parked is each layer's input and nothing else (not the weights, not RoPE's cos/sin). aot_eager: the same
    tracing and partitioning as the GPU's inductor, without generating kernels."""
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: real_compile(fn, backend="aot_eager"))
    torch._dynamo.reset()
    packed = []
    _record_parked(monkeypatch, packed)
    model = _lora(tiny_llama_dir)
    batch = _batch(model.config.vocab_size)
    plan = FastPathPlan(enabled=True, checkpointing=True, compile=True, **options)
    assert plan.checkpoint_inside_compile == ("mlp_slice" not in options)
    decoder_layers = split_model(model)[0].layers
    layers_mod.run_decoder_layers(decoder_layers, plan)
    got_loss, got = _loss_and_grads(model, batch)
    want_loss, want = _loss_and_grads(_hf_checkpointing(model), batch)
    torch.testing.assert_close(got_loss, want_loss, atol=1e-5, rtol=1e-6)
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-6, rtol=1e-4, msg=name)
    offloaded = options.get("offload_activations", False)
    assert packed == [torch.Size([2, 40, model.config.hidden_size])] * len(decoder_layers) * offloaded


def _attention_calls(prof) -> tuple[int, int]:
    """(forward, backward) calls of the CPU's flash attention kernel in a profile."""
    names = [event.name for event in prof.events()]
    forward = "aten::_scaled_dot_product_flash_attention_for_cpu"
    return names.count(forward), names.count(forward + "_backward")


@pytest.mark.parametrize("kept", ["attention_and_projections", "attention", "nothing"])
def test_offloaded_layers_keep_attention_for_backward_instead_of_recomputing_it(tiny_llama_dir, kept, monkeypatch):
    """Offloaded rows, the checkpoint inside the compiled layer (the plan's arrangement at long context): with
    save_attention the checkpoint keeps attention's output and softmax statistics, so backward runs the attention
    kernel's backward without running its forward again; with save_projections too, the q, k, v and o projections'
    outputs, so backward recomputes only the norms, RoPE and the MLP. What is kept waits in CPU memory beside the
    layer input, the statistics (a value a head and token) stay on the device; the MLP's intermediates and the LoRA A
    products (rank 4 of 64: a sixteenth, as r = 64 is of a 7B model's 4096) are recomputed, not kept. Loss and
    gradients are the plain path's every way."""
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: real_compile(fn, backend="aot_eager"))
    torch._dynamo.reset()
    model = _lora(tiny_llama_dir, lora_r=4)
    ids = torch.randint(5, model.config.vocab_size, (2, 40))
    batch = {"input_ids": ids, "labels": ids.clone(), "position_ids": torch.arange(40).expand(2, 40)}  # whole rows
    attention, projections_kept = kept != "nothing", kept == "attention_and_projections"
    plan = FastPathPlan(enabled=True, checkpointing=True, compile=True, offload_activations=True,
                        save_attention=attention, save_projections=projections_kept)
    decoder_layers = split_model(model)[0].layers
    report = layers_mod.run_decoder_layers(decoder_layers, plan)
    note = {"attention_and_projections": "(attention's inputs and outputs kept)",
            "attention": "(attention's outputs kept)", "nothing": None}[kept]
    assert note in report["compile"] if note else "kept" not in report["compile"]
    _loss_and_grads(model, batch)  # compiles
    parked = []
    _record_parked(monkeypatch, parked)
    with torch.profiler.profile() as prof:
        got_loss, got = _loss_and_grads(model, batch)
    n = len(decoder_layers)
    assert _attention_calls(prof) == ((n if attention else 2 * n), n)
    hidden, heads = model.config.hidden_size, model.config.num_attention_heads
    head_dim, kv_width = hidden // heads, model.config.num_key_value_heads * hidden // heads
    projections = [(80, hidden), (80, kv_width), (80, kv_width), (80, hidden)]  # q, k, v, o of 2 x 40 tokens
    want_parked = [(2, 40, hidden)] + [(2, heads, 40, head_dim)] * attention + projections * projections_kept
    assert sorted(map(tuple, parked)) == sorted(map(tuple, want_parked * n))
    want_loss, want = _loss_and_grads(_hf_checkpointing(model), batch)
    torch.testing.assert_close(got_loss, want_loss, atol=1e-5, rtol=1e-6)
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-6, rtol=1e-4, msg=name)


def test_compiled_layers_with_hashed_lora_dropout_compile_once_and_recompute_the_masks(tiny_llama_dir, monkeypatch):
    """The lean LoRA forward with hashed dropout (p = 0.1), compiled with the checkpoint inside: one compiled graph
    serves every layer (a recompile per layer would leave most layers eager), and backward recomputes the masks
    forward used: loss and gradients equal those of the same compiled layers without checkpointing, same seed."""
    from torch._dynamo.testing import CompileCounterWithBackend

    from tunelab.model.fast import use_lean_lora

    counter = CompileCounterWithBackend("aot_eager")
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: real_compile(fn, backend=counter))
    torch._dynamo.reset()
    results = []
    for checkpointing in (True, False):
        model = _lora(tiny_llama_dir, lora_dropout=0.1)
        assert use_lean_lora(model, hashed_dropout=True) > 0
        decoder_layers = split_model(model)[0].layers
        layers_mod.run_decoder_layers(decoder_layers,
                                      FastPathPlan(enabled=True, checkpointing=checkpointing, compile=True))
        batch = _batch(model.config.vocab_size)  # (seeds torch itself)
        torch.manual_seed(11)
        results.append(_loss_and_grads(model, batch))
        if checkpointing:
            assert counter.frame_count == 1 and len(decoder_layers) > 1
            torch.manual_seed(12)
            other_loss, _ = _loss_and_grads(model, batch)
    (got_loss, got), (want_loss, want) = results
    assert not torch.equal(other_loss, got_loss)  # the masks do change with the seed
    torch.testing.assert_close(got_loss, want_loss, atol=1e-5, rtol=1e-6)
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-6, rtol=1e-4, msg=name)


def test_hashed_lora_dropout_compiles_with_the_checkpoint_inside_as_shapes_change(tiny_llama_dir, caplog):
    """Packed rows whose length changes between steps (no CUDA graphs) with LoRA dropout 0.1: inductor compiles the
    checkpoint inside the layer with the hashed masks, no fallback (torch 2.11's inductor fails there with torch's
    dropout; checked on the CPU, where its partitioner is the same)."""
    from tunelab.model.fast import use_lean_lora

    torch._dynamo.reset()
    model = _lora(tiny_llama_dir, lora_dropout=0.1)
    use_lean_lora(model, hashed_dropout=True)
    layers_mod.run_decoder_layers(split_model(model)[0].layers,
                                  FastPathPlan(enabled=True, checkpointing=True, compile=True))
    with caplog.at_level("WARNING", logger="tunelab.model.layers"):
        for length in (40, 48, 33):
            ids = torch.randint(5, model.config.vocab_size, (1, length))
            batch = {"input_ids": ids, "labels": ids.clone(), "position_ids": torch.arange(length)[None]}
            _, grads = _loss_and_grads(model, batch)
            assert all(torch.isfinite(g).all() for g in grads.values())
            assert all(g.abs().sum() > 0 for name, g in grads.items() if "lora_A" in name)
    assert "checkpoint around the compiled forward" not in caplog.text


def test_passes_without_gradient_run_the_compiled_forward_and_generation_the_plain_one(tiny_llama_dir, monkeypatch):
    """The reference pass of DPO (adapters off, no gradient, training mode) and evaluation go through the layer's
    compiled forward, so they round as the training pass does; generation with its KV cache stays eager."""
    real_compile, calls = torch.compile, []

    def compile_(fn, **kwargs):
        compiled = real_compile(fn, backend="aot_eager")
        if kwargs:  # the training forward (compiled with options); the scoring forward is compiled plain
            return compiled
        return lambda *args, **kw: calls.append(1) or compiled(*args, **kw)

    monkeypatch.setattr(torch, "compile", compile_)
    torch._dynamo.reset()
    model = _lora(tiny_llama_dir)
    batch = _batch(model.config.vocab_size)
    layers = split_model(model)[0].layers
    with torch.no_grad():
        want = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
    layers_mod.run_decoder_layers(layers, FastPathPlan(enabled=True, checkpointing=True, compile=True))
    for mode in ("train", "eval"):
        getattr(model, mode)()
        calls.clear()
        with torch.no_grad(), model.disable_adapter():
            got = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        assert len(calls) == len(layers), mode
        with torch.no_grad():
            got = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    calls.clear()
    model.generate(input_ids=batch["input_ids"][:1, :8], max_new_tokens=3, do_sample=False)
    assert calls == []


def test_a_failed_compile_with_the_checkpoint_inside_falls_back_to_the_checkpoint_around(tiny_llama_dir, monkeypatch,
                                                                                         caplog):
    """When inductor cannot compile the checkpoint inside (torch 2.11: dropout with changing shapes), the layer runs
    with the checkpoint around its compiled forward: same loss and gradients, a warning, no second attempt."""
    calls = []
    real_compile = torch.compile

    def compile_(fn, **kwargs):
        compiled = real_compile(fn, backend="aot_eager")
        if fn.__name__ == "forward" and fn.__qualname__.startswith("_checkpointed"):
            def failing(*args, **kw):
                calls.append(1)
                raise torch._dynamo.exc.BackendCompilerFailed(None, AssertionError("Node add_1 was invalid"), None)
            return failing
        return compiled

    monkeypatch.setattr(torch, "compile", compile_)
    torch._dynamo.reset()
    model = _lora(tiny_llama_dir)
    batch = _batch(model.config.vocab_size)
    decoder_layers = split_model(model)[0].layers
    layers_mod.run_decoder_layers(decoder_layers, FastPathPlan(enabled=True, checkpointing=True, compile=True))
    with caplog.at_level("WARNING", logger="tunelab.model.layers"):
        got_loss, got = _loss_and_grads(model, batch)
        _loss_and_grads(model, batch)
    assert len(calls) == 1  # the first layer tried once; the class then goes the other way
    assert "checkpoint around the compiled forward" in caplog.text
    want_loss, want = _loss_and_grads(_hf_checkpointing(model), batch)
    torch.testing.assert_close(got_loss, want_loss, atol=1e-5, rtol=1e-6)
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-6, rtol=1e-4, msg=name)


def test_mlp_slices_are_used_only_above_the_slice(tiny_llama_dir):
    model = _lora(tiny_llama_dir)
    mlp = split_model(model)[0].layers[0].mlp
    calls = []
    forward = type(mlp).forward
    type(mlp).forward = lambda self, x: calls.append(x.shape[0] if x.dim() == 2 else tuple(x.shape)) or forward(self, x)
    try:
        layers_mod.run_decoder_layers([split_model(model)[0].layers[0]], FastPathPlan(enabled=True, mlp_slice=16))
        x = torch.randn(2, 20, model.config.hidden_size)
        out = mlp(x)
        assert calls == [16, 16, 8]  # 40 tokens in slices of 16
        assert out.shape == (2, 20, model.config.hidden_size)
        calls.clear()
        mlp(torch.randn(1, 16, model.config.hidden_size))
        assert calls == [(1, 16, model.config.hidden_size)]  # short enough: one call, unsliced
    finally:
        type(mlp).forward = forward


def test_generation_after_the_takeover_is_unchanged(tiny_llama_dir):
    model = _lora(tiny_llama_dir).eval()
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        before = model.generate(input_ids=ids, max_new_tokens=6, do_sample=False)
        layers_mod.run_decoder_layers(split_model(model)[0].layers, FastPathPlan(enabled=True, checkpointing=True,
                                                                                mlp_slice=2))
        after = model.generate(input_ids=ids, max_new_tokens=6, do_sample=False)
    assert torch.equal(before, after)


def test_training_with_slices_follows_the_same_curve(tiny_llama_dir, tmp_path):
    from tests.train_helpers import identity_rows, tiny_cfg
    from tunelab.model.tokenizer import load_tokenizer
    from tunelab.train.loop import train

    rows = identity_rows(load_tokenizer(str(tiny_llama_dir)), copies=2)
    curves = []
    for name, chunk in (("plain", None), ("sliced", 8)):
        cfg = tiny_cfg(tiny_llama_dir, method="lora", max_length=64, mlp_chunk_size=chunk, max_steps=4,
                       gradient_checkpointing=True)
        curves.append(train(cfg, tmp_path / name, train_rows=rows, device="cpu").losses)
    assert len(curves[0]) == 4 and curves[0].keys() == curves[1].keys()  # {step: loss}
    for step in curves[0]:
        assert abs(curves[0][step] - curves[1][step]) < 1e-5, step


@pytest.mark.parametrize("keep_for_backward", [True, False], ids=["kept", "dequantised_again"])
def test_compiled_qlora_layers_dequantise_again_in_backward_with_the_same_numbers(tiny_llama_dir, keep_for_backward,
                                                                                 monkeypatch):
    """QLoRA layers compiled with the checkpoint inside, 4-bit weights dequantised by the fused forward: kept for
    backward (qlora_dequant_once) or dequantised again there (an autograd.Function inside the compiled checkpoint),
    loss and adapter gradients are bitsandbytes' own forward's under transformers' checkpointing, and the forward
    saves no MLP activation for backward: the checkpoint recomputes them (on an H200, torch 2.11's plain checkpoint
    did not tag the autograd.Function's ops and saved their activations: FastPathPlan.checkpoint_tags_each_op)."""
    pytest.importorskip("bitsandbytes")
    from tunelab.model.fast import patch_4bit_linears

    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: real_compile(fn, backend="aot_eager", fullgraph=True))
    torch._dynamo.reset()
    model = _lora(tiny_llama_dir, method="qlora")
    batch = _batch(model.config.vocab_size)
    want_loss, want = _loss_and_grads(model, batch)  # bitsandbytes' own forward, transformers' checkpointing

    plan = FastPathPlan(enabled=True, checkpointing=True, compile=True, four_bit=True, dequantize_once=keep_for_backward)
    assert plan.checkpoint_tags_each_op == (not keep_for_backward)
    layers = split_model(model)[0].layers
    assert patch_4bit_linears(model, fused=plan.fused_dequant, keep_for_backward=keep_for_backward) == 7 * len(layers)
    layers_mod.run_decoder_layers(layers, plan)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        got_loss, got = _loss_and_grads(model, batch)
    torch.testing.assert_close(got_loss, want_loss, atol=1e-5, rtol=1e-6)
    assert got.keys() == want.keys() and len(got) > 0
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-6, rtol=1e-4, msg=name)
    activations = [shape for shape in saved if shape[:2] == batch["input_ids"].shape]
    assert activations and all(shape[-1] != model.config.intermediate_size for shape in activations)
