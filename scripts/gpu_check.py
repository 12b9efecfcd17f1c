"""The fast path's correctness guard, on a GPU (the device tool; CI has none). Exit code 0: every check passed.

    python3 scripts/gpu_check.py [--only NAME ...]    # NAME: kernel, loss, adamw8bit, paths, options, graphs,
                                                      #       inbackward, long, identity

The reference is the plain path, `fast_path = False`: transformers and peft as they come (eager, sdpa with the
block-diagonal mask transformers builds from position_ids, full-vocabulary logits, peft's LoRA forward, bitsandbytes'
dequantisation, the input embedding on the GPU, no compile, no CUDA graphs). Against it, on the same packed batch:

    loss:      |fast - plain| / |plain|            <= 1e-2
    gradients: ||g_fast - g_plain|| / ||g_plain||  <= 5e-2 over all trained weights together, cosine >= 0.995

and the fast path must be no further from an fp32 run of the plain path than 2x the plain bf16 path (+ 1e-3); the
same with the LoRA options that change what the fast path runs (an adapter on lm_head, DoRA, rsLoRA, a saved
embedding).
Also: the varlen kernel against per-sample sdpa in fp64; the loss with a trained lm_head against fp64 autograd;
tunelab's 8-bit AdamW against bitsandbytes' own over several steps (bit for bit); CUDA graphs and offloaded layer
inputs against compiled layers over steps of two micro-batches; updates made inside backward against the step after
it, under CUDA graphs; on one long row,
offloaded inputs and MLP slices against the fast path without them; and a tiny model trained to a new identity (as
`tunelab demo` does) with the default fast path and with it off, full fine-tuning and QLoRA with LoRA dropout 0.1 as
the qlora configs use it (and, for QLoRA, the fast path's eager code with torch's dropout: layers not compiled, the
MLP in slices) and with dropout 0 (the adapter added into the 4-bit weight): the loss curves must agree and every
model must answer with the new name.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, __file__.rsplit("/scripts/", 1)[0])

from tunelab.config.schema import TrainConfig  # noqa: E402
from tunelab.model import attention  # noqa: E402
from tunelab.model.load import load_model_for_training  # noqa: E402
from tunelab.model.loss import causal_lm_objective  # noqa: E402
from tunelab.model.plan import plan_fast_path  # noqa: E402
from tunelab.model.tiny import make_model  # noqa: E402

FAILED = []


def check(name, ok, detail):
    print(f"{'PASS' if ok else 'FAIL'} {name}: {detail}", flush=True)
    if not ok:
        FAILED.append(name)


def packed_batch(vocab, device):
    """Two rows of 512 tokens: several samples each, first token of each sample untrained, some prompts untrained."""
    torch.manual_seed(1)
    lengths = [[100, 200, 212], [37, 475]]
    ids = torch.randint(3, vocab, (2, 512))
    pos = torch.cat([torch.cat([torch.arange(n) for n in row])[None] for row in lengths])
    labels = ids.clone()
    labels[pos == 0] = -100
    labels[:, 5:20] = -100
    return {"input_ids": ids.to(device), "labels": labels.to(device), "position_ids": pos.to(device)}


def kernel_check(device):
    print("varlen kernel:", attention._KERNEL and sorted(attention._KERNEL[1]))
    torch.manual_seed(0)
    cu = torch.tensor([0, 100, 300, 512, 549, 1024], dtype=torch.int32, device=device)
    q = torch.randn(1024, 8, 64, device=device)
    k, v = torch.randn(1024, 2, 64, device=device), torch.randn(1024, 2, 64, device=device)
    ref = attention._segmented_sdpa(q.double(), k.double(), v.double(), cu, None)
    out = attention._varlen_flash(q.bfloat16(), k.bfloat16(), v.bfloat16(), cu, 475, None).double()
    err = ((out - ref).norm() / ref.norm()).item()
    check("varlen kernel vs fp64 per-sample sdpa (GQA 8/2)", err < 1e-2, f"rel err {err:.2e}")
    # fp32 q/k/v under bf16 autocast (full fine-tuning with fp32 master weights: RoPE promotes q and k) must take the
    # bf16 varlen kernel too, not the per-sample loop
    calls = []
    flash = attention._varlen_flash
    attention._varlen_flash = lambda *a, **kw: calls.append(1) or flash(*a, **kw)
    try:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out4, _ = attention.varlen_attention_forward(
                None, q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], None,
                cu_seq_lens_q=cu, max_length_q=475)
    finally:
        attention._varlen_flash = flash
    err = ((out4[0].double() - ref).norm() / ref.norm()).item()
    check("fp32 inputs under bf16 autocast take the varlen kernel", calls == [1] and out4.dtype == torch.bfloat16
          and err < 1e-2, f"kernel calls {len(calls)}, {out4.dtype}, rel err {err:.2e}")


def loss_check(device):
    """The loss with a trained lm_head (full fine-tuning), on the GPU path: the compiled softmax gradient and the
    weight gradient summed in fp32 over chunks, against autograd through full fp32 logits."""
    from tunelab.model.loss import LinearCrossEntropy

    torch.manual_seed(0)
    hidden = torch.randn(3000, 256, device=device, requires_grad=True)
    weight = (torch.randn(5000, 256, device=device) / 16).requires_grad_()
    targets = torch.randint(0, 5000, (3000,), device=device)
    ref = torch.nn.functional.cross_entropy(hidden.double() @ weight.double().t(), targets, reduction="sum")
    ref.backward()
    want = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = LinearCrossEntropy.apply(hidden, targets, weight, None, None, 700, True)
    loss.backward()
    rel = abs(float(loss) - float(ref)) / abs(float(ref))
    errs = [float((got - w).norm() / w.norm()) for got, w in zip((hidden.grad, weight.grad), want)]
    from tunelab.model.loss import fp32_epilogue_supported

    check("loss with a trained lm_head, bf16 chunks vs fp64 autograd", rel <= 1e-2 and max(errs) <= 2e-2,
          f"loss rel {rel:.2e}, grads rel {errs[0]:.2e} / {errs[1]:.2e}, "
          f"weight gradient summed in the matmul epilogue: {fp32_epilogue_supported(torch.bfloat16)}")


def long_row(vocab, device, tokens=4096):
    """One row that is one whole sample (the long-context case: cuDNN attention, offload, MLP slices)."""
    torch.manual_seed(3)
    ids = torch.randint(3, vocab, (1, tokens), device=device)
    return {"input_ids": ids, "labels": ids.clone(), "position_ids": torch.arange(tokens, device=device)[None]}


def grads_and_loss(cfg, model_dir, device, dtype, batch_fn=packed_batch):
    """Loss and trained-weight gradients of one batch, the model loaded and the loss run as `tunelab train` does."""
    torch.manual_seed(0)
    cfg = dataclasses.replace(cfg, dtype=dtype)
    plan = plan_fast_path(cfg, device)
    model, _ = load_model_for_training(cfg, device, plan)
    gen = torch.Generator().manual_seed(2)
    for name, p in sorted(model.named_parameters()):
        if "lora_B" in name:  # peft starts B at zero, which would leave A's gradient zero: start both random
            p.data.copy_((torch.randn(p.shape, generator=gen) * 0.02).to(p.dtype))
    model.train()
    batch = batch_fn(model.config.vocab_size, device)
    amp = torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == "bf16")
    with amp:
        loss_sum, n = causal_lm_objective(plan)(model, batch)
    (loss_sum / n).backward()
    grads = {k: p.grad.float().flatten() for k, p in model.named_parameters() if p.requires_grad}
    return float(loss_sum / n), torch.cat([grads[k] for k in sorted(grads)])


def path_check(method, model_dir, device, label=None, **lora_settings):
    """The fast path, eager and with compiled layers, against the plain path on one packed batch; `lora_settings`
    (an adapter on lm_head, DoRA, trained biases, saved embeddings) as a user sets them in the config."""
    label = label or method
    cfg = TrainConfig(pretrained_model_name_or_path=str(model_dir), method=method, lora_r=16, lora_alpha=32,
                      lora_dropout=0.0, gradient_checkpointing=True, max_length=512, loss_chunk_size=128,
                      use_compile=False, **lora_settings)
    plain = dataclasses.replace(cfg, fast_path=False)  # transformers + peft as they come
    loss_ref, g_ref = grads_and_loss(plain, model_dir, device, dtype="fp32")
    loss_plain, g_plain = grads_and_loss(plain, model_dir, device, dtype="bf16")
    loss_fast, g_fast = grads_and_loss(cfg, model_dir, device, dtype="bf16")
    rel = abs(loss_fast - loss_plain) / abs(loss_plain)
    check(f"{label}: loss fast vs plain", rel <= 1e-2, f"{loss_fast:.5f} vs {loss_plain:.5f} (fp32 {loss_ref:.5f})")
    g_err = ((g_fast - g_plain).norm() / g_plain.norm()).item()
    cos = torch.nn.functional.cosine_similarity(g_fast, g_plain, dim=0).item()
    check(f"{label}: adapter grads fast vs plain", g_err <= 5e-2 and cos >= 0.995, f"rel {g_err:.2e}, cos {cos:.5f}")
    # the same fast path with torch.compile'd decoder layers (no graphs: one batch)
    loss_comp, g_comp = grads_and_loss(dataclasses.replace(cfg, use_compile=True, cuda_graphs=False), model_dir,
                                       device, dtype="bf16")
    rel = abs(loss_comp - loss_plain) / abs(loss_plain)
    c_err = ((g_comp - g_plain).norm() / g_plain.norm()).item()
    check(f"{label}: compiled fast path vs plain", rel <= 1e-2 and c_err <= 5e-2,
          f"loss {loss_comp:.5f}, grads rel {c_err:.2e}")
    plain_to_ref = ((g_plain - g_ref).norm() / g_ref.norm()).item()
    for kind, g in (("fast", g_fast), ("compiled fast", g_comp)):  # compiled QLoRA merges adapters into weights
        to_ref = ((g - g_ref).norm() / g_ref.norm()).item()
        check(f"{label}: {kind} no further from fp32 than plain bf16", to_ref <= 2 * plain_to_ref + 1e-3,
              f"{to_ref:.2e} vs {plain_to_ref:.2e}")


def long_context_check(method, model_dir, device):
    """On one 4096-token row (cuDNN attention for a row of one sample): the fast path against the plain path, and
    offloaded layer inputs (pinned and plain copies), MLP slices, and compiled layers with offloaded inputs that keep
    the attention block's results (`save_attention`) against the fast path without them."""
    from tunelab.model import offload

    cfg = TrainConfig(pretrained_model_name_or_path=str(model_dir), method=method, lora_r=16, lora_alpha=32,
                      lora_dropout=0.0, gradient_checkpointing=True, max_length=4096, use_compile=False,
                      mlp_chunk_size=None)
    base_loss, base_g = grads_and_loss(cfg, model_dir, device, dtype="bf16", batch_fn=long_row)
    plain_loss, plain_g = grads_and_loss(dataclasses.replace(cfg, fast_path=False), model_dir, device, dtype="bf16",
                                         batch_fn=long_row)
    rel, g_err = abs(base_loss - plain_loss) / abs(plain_loss), ((base_g - plain_g).norm() / plain_g.norm()).item()
    check(f"{method}: long row, fast path (cuDNN attention) vs plain", rel <= 1e-2 and g_err <= 5e-2,
          f"loss {base_loss:.5f} vs {plain_loss:.5f}, grads rel {g_err:.2e}")
    variants = [("offload (pinned copies)", dict(offload_activations=True), 10**12),
                ("offload (plain copies)", dict(offload_activations=True), 0),
                ("MLP slices of 1024", dict(mlp_chunk_size=1024), 10**12),
                ("offload + MLP slices", dict(offload_activations=True, mlp_chunk_size=1024), 10**12),
                # the checkpoint inside the compiled layer keeps the attention block (attention's output, the q, k,
                # v and o projections' outputs), parked beside the input
                ("compiled, offloaded, attention kept", dict(offload_activations=True, use_compile=True), 10**12)]
    pinned_max = offload.PINNED_MAX_BYTES
    for name, settings, pinned in variants:
        offload.PINNED_MAX_BYTES = pinned
        loss, g = grads_and_loss(dataclasses.replace(cfg, **settings), model_dir, device, dtype="bf16",
                                 batch_fn=long_row)
        rel = abs(loss - base_loss) / abs(base_loss)
        g_err = ((g - base_g).norm() / base_g.norm()).item()
        check(f"{method}: {name} vs without", rel <= 1e-2 and g_err <= 5e-2,
              f"loss {loss:.5f} vs {base_loss:.5f}, grads rel {g_err:.2e}")
    offload.PINNED_MAX_BYTES = pinned_max


def cuda_graph_check(method, model_dir, device):
    """Compiled layers replayed as CUDA graphs, and compiled layers with their inputs parked in CPU memory (the plan
    keeps graphs off there), train like compiled layers launched kernel by kernel: four optimizer steps of two
    micro-batches each, as `tunelab train` runs them (with graphs: a graph generation a micro-batch, gradients
    summed in buffers of their own); the first step's summed gradients, then the losses step by step."""
    from tunelab.train.loop import allocate_grad_buffers

    histories, first_grads = {}, {}
    variants = {"compiled": (False, False), "CUDA graphs": (True, False), "compiled, offloaded": (False, True)}
    for name, (graphs, offload) in variants.items():
        cfg = TrainConfig(pretrained_model_name_or_path=str(model_dir), method=method, lora_r=16, lora_alpha=32,
                          lora_dropout=0.0, gradient_checkpointing=True, max_length=512, use_compile=True,
                          cuda_graphs=graphs, offload_activations=offload, loss_chunk_size=128)
        torch.manual_seed(0)
        plan = plan_fast_path(cfg, device)
        assert plan.checkpoint_inside_compile and (plan.cuda_graphs, plan.offload_activations) == (graphs, offload)
        model, _ = load_model_for_training(cfg, device, plan)
        objective = causal_lm_objective(plan)
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-3)
        first = packed_batch(model.config.vocab_size, device)
        second = {k: v.flip(0) for k, v in first.items()}
        if graphs:
            allocate_grad_buffers(model)
        losses = []
        for step in range(4):
            total = 0.0
            for batch in (first, second):
                if graphs:
                    torch.compiler.cudagraph_mark_step_begin()
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    loss_sum, n = objective(model, batch)
                (loss_sum / n / 2).backward()
                total += float(loss_sum / n) / 2
            if step == 0:
                first_grads[name] = [p.grad.float().clone() for p in params]
            optimizer.step()
            optimizer.zero_grad(set_to_none=not graphs)
            losses.append(total)
        histories[name] = losses
    want_g, want = first_grads["compiled"], histories["compiled"]
    for name in list(variants)[1:]:
        got_g, got = first_grads[name], histories[name]
        g_err = max(float((a - b).norm() / b.norm().clamp_min(1e-12)) for a, b in zip(got_g, want_g))
        check(f"{method}: {name} vs compiled, gradients summed over 2 micro-batches", g_err <= 5e-2,
              f"grads rel {g_err:.2e}")
        worst = max(abs(a - b) / abs(b) for a, b in zip(got, want))
        check(f"{method}: {name} vs compiled, 4 steps x 2 micro-batches", worst <= 1e-2 and got[-1] < got[0],
              f"losses {[round(x, 4) for x in got]} vs {[round(x, 4) for x in want]}")


def in_backward_check(method, optimizer_name, model_dir, device):
    """Updates inside backward (`optimizer_in_backward`, no clipping, one micro-batch a step), under compiled layers
    replayed as CUDA graphs, train like the step after backward: five steps of tunelab's 8-bit AdamW (a parameter at a
    time) or torch's fused AdamW (a layer at a time), the same losses and trained weights."""
    from tunelab.train.optim import StepsInBackward, build_optimizer

    runs = {}
    for inside in (False, True):
        cfg = TrainConfig(pretrained_model_name_or_path=str(model_dir), method=method, lora_r=16, lora_alpha=32,
                          lora_dropout=0.0, max_length=512, use_compile=True, cuda_graphs=True, loss_chunk_size=128,
                          max_norm=0.0, accumulative_counts=1, dtype="bf16", optimizer=optimizer_name,
                          optimizer_in_backward=inside)
        torch.manual_seed(0)
        plan = plan_fast_path(cfg, device)
        assert plan.cuda_graphs and plan.optimizer_in_backward == inside
        model, _ = load_model_for_training(cfg, device, plan)
        objective = causal_lm_objective(plan)
        model.train()
        optimizer = build_optimizer(model, cfg, device)
        stepper = StepsInBackward(optimizer, model) if inside else optimizer
        updates = []
        if inside:  # count the updates: every trained parameter once a step
            stepper._step_bucket = lambda params, update=stepper._step_bucket: (updates.extend(params), update(params))
        batch = packed_batch(model.config.vocab_size, device)
        losses = []
        for step in range(5):
            torch.compiler.cudagraph_mark_step_begin()
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss_sum, n = objective(model, batch if step % 2 == 0 else {k: v.flip(0) for k, v in batch.items()})
            (loss_sum / n).backward()
            stepper.step()
            stepper.zero_grad(set_to_none=True)
            losses.append(float(loss_sum / n))
        trained = [p for p in model.parameters() if p.requires_grad]
        every_update = len(updates) == 5 * len(trained) and {id(p) for p in updates} == {id(p) for p in trained}
        runs[inside] = losses, torch.cat([p.detach().float().flatten() for p in trained]), every_update
    (want, want_w, _), (got, got_w, every_update) = runs[False], runs[True]
    worst = max(abs(a - b) / abs(b) for a, b in zip(got, want))
    # Over all trained weights together: where a gradient element is near 0, Adam turns a last-bit difference (a
    # matmul kernel chosen by another memory address) into a whole lr step, so one small tensor alone says little.
    w_err = float((got_w - want_w).norm() / want_w.norm())
    check(f"{method}, {optimizer_name}: updates in backward vs after it, CUDA graphs, 5 steps", worst <= 1e-3
          and w_err <= 1e-2 and every_update and got[-1] < got[0], f"losses {[round(x, 4) for x in got]} vs "
          f"{[round(x, 4) for x in want]}, trained weights rel {w_err:.1e}, each parameter updated once a step: "
          f"{every_update}")


def adamw_8bit_check(device):
    """tunelab's 8-bit AdamW (bitsandbytes' without its sync per parameter) against bnb.optim.AdamW8bit: the same
    weights and states after 10 steps, bit for bit, and a state_dict of ours continues identically in theirs."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        print("bitsandbytes missing: 8-bit AdamW not checked")
        return
    from tunelab.train.adamw_8bit import AdamW8bit

    # LoRA-shaped matrices, and one below bitsandbytes' min_8bit_size (kept in 32-bit state: bitsandbytes' own path)
    shapes = [(4096, 64), (64, 4096), (512, 512), (10, 10)]
    gen = torch.Generator(device=device).manual_seed(0)
    start = [torch.randn(shape, device=device, generator=gen) for shape in shapes]

    def make(cls):
        params = [torch.nn.Parameter(w.clone()) for w in start]
        return params, cls([{"params": params[:3], "weight_decay": 0.01}, {"params": params[3:], "weight_decay": 0.0}],
                           lr=1e-3, betas=(0.9, 0.999))

    (ours_p, ours), (theirs_p, theirs) = make(AdamW8bit), make(bnb.optim.AdamW8bit)

    for step in range(10):
        seed = 1000 + step
        for params, optimizer in ((ours_p, ours), (theirs_p, theirs)):
            grads = torch.Generator(device=device).manual_seed(seed)
            for p in params:
                p.grad = torch.randn(p.shape, device=device, generator=grads) * 1e-2
            optimizer.step()
    same = all(torch.equal(a, b) for a, b in zip(ours_p, theirs_p))
    diff = max(float((a - b).detach().abs().max()) for a, b in zip(ours_p, theirs_p))
    states = all(torch.equal(ours.state[a][k], theirs.state[b][k]) for a, b in zip(ours_p, theirs_p)
                 for k in ours.state[a] if torch.is_tensor(ours.state[a][k]))
    check("8-bit AdamW (ours) vs bitsandbytes' AdamW8bit, 10 steps", same and states,
          f"weights equal: {same} (max |diff| {diff:.1e}), states equal: {states}")
    resumed_p, resumed = make(bnb.optim.AdamW8bit)
    for p, q in zip(resumed_p, ours_p):
        p.data.copy_(q.data)
    resumed.load_state_dict(ours.state_dict())
    for step in range(2):
        for params, optimizer in ((ours_p, ours), (resumed_p, resumed)):
            grads = torch.Generator(device=device).manual_seed(2000 + step)
            for p in params:
                p.grad = torch.randn(p.shape, device=device, generator=grads) * 1e-2
            optimizer.step()
    same = all(torch.equal(a, b) for a, b in zip(ours_p, resumed_p))
    check("8-bit AdamW: our state_dict continues in bitsandbytes' class", same, f"weights equal after 2 steps: {same}")


def identity_check(method, device, base=None, name="TuneBot", lora_dropout=0.1):
    """Train a tiny model to a new identity, as `tunelab demo` does, with the default fast path and with it off:
    the two loss curves agree (windows of 5 steps, or of an epoch with LoRA dropout, within 5% + 0.05) and both
    models answer with the new name. With LoRA dropout, so do the fast path's eager variants, which keep torch's
    dropout where compiled code hashes its masks: layers not compiled, and the MLP run in slices outside the
    compiled layer.

    QLoRA runs with `lora_dropout` (0.1 as the qlora configs; 0 takes the fast path that adds the adapter into the
    4-bit weight, `nf4_merge`'s kernel on a GPU with Triton, as Unsloth's settings do).

    Full fine-tuning starts from random weights (every weight must learn, as in the demo). LoRA on a random tiny
    model learns too slowly to answer anything, so QLoRA starts from the model full fine-tuning taught (`base`) and
    teaches it another name, as a user re-brands a chat model. Returns the plain run's last checkpoint's model folder.
    """
    from tunelab.data import self_cognition
    from tunelab.model.tiny import make_model
    from tunelab.train.layout import MODEL_DIR
    from tunelab.train.loop import train

    tmp = Path(tempfile.mkdtemp(prefix=f"identity_{method}_"))
    if base is None:
        base = make_model(tmp / "base", "llama", hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                          intermediate_size=256)
    data = self_cognition.write(tmp / "self_cognition.json", name=name, author="tunelab", n=600)
    settings = dict(pretrained_model_name_or_path=str(base), method=method, data_path=str(data),
                    data_format="conversation", prompt_template="qwen_chat", SYSTEM="", max_length=256,
                    batch_size=4, accumulative_counts=1, lr_scheduler="cosine", warmup_ratio=0.05,
                    max_epochs=8, save_steps=10**6, logging_steps=1000, evaluation_freq=10**6,
                    evaluation_inputs=["who are you?", "请介绍一下你自己"], eval_max_new_tokens=32, seed=0)
    if method == "full":
        settings.update(lr=3e-3, lora_dropout=0.0)
        falls_to = 0.3  # from random weights the loss falls more than 3x
    else:  # as the qlora configs: 8-bit AdamW, LoRA dropout 0.1 (or 0, as Unsloth's settings)
        settings.update(lr=5e-3, lora_r=16, lora_alpha=32, lora_dropout=lora_dropout, optimizer="adamw_8bit")
        falls_to = 0.5  # a taught model starts near 1.1 (only the name is new); r=16 on it ends near 0.4 (CPU run)
    runs = {"fast path": dict(fast_path=True), "off": dict(fast_path=False)}
    if settings["lora_dropout"]:
        runs.update({"fast path, layers not compiled": dict(fast_path=True, use_compile=False),
                     "fast path, MLP in slices": dict(fast_path=True, mlp_chunk_size=64)})
    curves, answers = {}, {}
    for i, (run, changes) in enumerate(runs.items()):
        work = tmp / f"work_{i}"
        result = train(TrainConfig(**settings, **changes), work, device=str(device))
        curves[run] = [result.losses[s] for s in sorted(result.losses)]
        outputs = work / f"eval_outputs_iter_{result.step}.txt"
        if not outputs.is_file():  # stopped by a signal (a time limit) before its last step: nothing was asked
            raise SystemExit(f"FAIL {method}: identity run '{run}' stopped at step {result.step} before its end, so "
                             "it answered no questions; give the check more time")
        answers[run] = outputs.read_text(encoding="utf-8").count(name)
        if run == "off":
            taught = Path(result.last_checkpoint) / MODEL_DIR
    plain = curves["off"]
    label = method if method == "full" else f"{method} (LoRA dropout {settings['lora_dropout']})"
    # Without dropout both runs see the same numbers, so 5-step windows agree. With LoRA dropout the two paths draw
    # different masks and the curves wander apart step by step; compare them epoch by epoch instead.
    width = 5 if settings["lora_dropout"] == 0 else len(plain) // settings["max_epochs"]

    def window_means(curve):
        return [sum(curve[i:i + width]) / len(curve[i:i + width]) for i in range(0, len(curve), width)]

    for run, fast in curves.items():
        if run == "off":
            continue
        worst = max(abs(a - b) - 0.05 * b for a, b in zip(window_means(fast), window_means(plain)))
        check(f"{label}: identity training, {run} vs off, loss curves", len(fast) == len(plain) and worst <= 0.05
              and fast[-1] < falls_to * fast[0] and plain[-1] < falls_to * plain[0],
              f"{len(fast)} steps, loss {fast[0]:.3f} -> {fast[-1]:.3f} vs {plain[0]:.3f} -> {plain[-1]:.3f}, "
              f"largest gap of a {width}-step window beyond 5% of the plain loss: {worst:.3f} (at most 0.05)")
    check(f"{label}: identity training, every run answers with the new name",
          all(count >= 2 for count in answers.values()),
          ", ".join(f"{run}: {count} answers name {name}" for run, count in answers.items()))
    return taught


CHECKS = ("kernel", "loss", "adamw8bit", "paths", "options", "graphs", "inbackward", "long", "identity")
LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# LoRA settings that change what the fast path runs: an adapter on lm_head takes full logits instead of the chunked
# loss, DoRA layers run peft's forward, a saved embedding is trained whole
LORA_OPTIONS = {"adapter on lm_head": dict(lora_target_modules=LINEAR + ["lm_head"]),
                "DoRA": dict(use_dora=True),
                "DoRA + rsLoRA + lm_head": dict(use_dora=True, use_rslora=True, lora_target_modules=LINEAR + ["lm_head"]),
                "embed_tokens saved": dict(lora_modules_to_save=["embed_tokens"])}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=CHECKS, default=list(CHECKS))
    only = set(parser.parse_args(argv).only)
    device = torch.device("cuda")
    print(torch.__version__, torch.cuda.get_device_name(0))
    if "kernel" in only:
        kernel_check(device)
    if "loss" in only:
        loss_check(device)
    if "adamw8bit" in only:
        adamw_8bit_check(device)
    methods, optimizers = ["lora"], ["adamw"]
    try:
        import bitsandbytes  # noqa: F401

        methods.append("qlora")
        optimizers.append("adamw_8bit")
    except ImportError:
        print("bitsandbytes missing: qlora and adamw_8bit not checked")
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = make_model(tmp, "llama", hidden_size=256, num_layers=2, num_heads=4, num_kv_heads=2,
                               intermediate_size=512)
        for method in methods:
            if "paths" in only:
                path_check(method, model_dir, device)
            if "options" in only:
                for label, settings in LORA_OPTIONS.items():
                    path_check(method, model_dir, device, label=f"{method} {label}", **settings)
            if "graphs" in only:
                cuda_graph_check(method, model_dir, device)
            if "inbackward" in only:
                for optimizer_name in optimizers:
                    in_backward_check(method, optimizer_name, model_dir, device)
            if "long" in only:
                long_context_check(method, model_dir, device)
    if "identity" in only:
        taught = identity_check("full", device)
        if "qlora" in methods:
            for lora_dropout in (0.1, 0.0):
                identity_check("qlora", device, base=taught, name="NovaBot", lora_dropout=lora_dropout)
    print("ALL PASSED" if not FAILED else f"FAILED: {FAILED}")
    return 1 if FAILED else 0


if __name__ == "__main__":
    sys.exit(main())
