"""tunelab's preference losses and log-probabilities checked against TRL's own code (not formulas we wrote).

For the same token ids and the same weights, each test runs tunelab's objective (`PreferenceObjective` on a collated,
packed batch, the chunked log-prob path) and a real TRL trainer instance built on the same tiny model (`DPOTrainer`,
`KTOTrainer`, `RewardTrainer`, and the experimental `CPOTrainer` / `ORPOTrainer`), calling TRL's loss method on a batch
made by TRL's own collator; it compares the loss and every parameter's gradient. Where tunelab and TRL 1.16 differ on
purpose, the test pins down the difference exactly (what TRL computes instead), so a change on either side shows up:

* DPO sigmoid with `label_smoothing`: tunelab is conservative DPO; TRL 1.16's 'sigmoid' ignores label_smoothing
  (it only reads it for 'robust', 'exo_pair', 'aot'). tunelab's value equals TRL's sigmoid loss on the pair mixed with
  TRL's sigmoid loss on the swapped pair, (1 - eps) and eps.
* ORPO: TRL's NLL term is the token mean over prompt *and* reply of every chosen sequence of the batch (like the
  official ORPO code without `disable_prompt_loss`); tunelab's is the mean over each chosen reply's tokens, averaged
  over pairs (the paper's L_SFT of y_w given x). The odds-ratio term is the same.
* Which tokens are the reply: TRL's DPO/KTO tokenisation of chat data takes everything after the generation prompt,
  so the template's '\\n' after <|im_end|> is a completion token; tunelab trains the template's generation block,
  reply + <|im_end|>. TRL's experimental CPO/ORPO add BOS before the prompt and EOS after that '\\n'.
* IPO's logged rewards: tunelab's are beta x the mean token log-ratio, TRL's beta x the summed one (the loss agrees).

Needs trl (skipped without it). Runs on the CPU in a few seconds; nothing is downloaded.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

from tunelab.data.collate import collate  # noqa: E402
from tunelab.data.encode_preference import encode_kto, encode_pairs, row_capacity  # noqa: E402
from tunelab.data.packing import pack_rows  # noqa: E402
from tunelab.data.preference import normalise_kto, normalise_preference  # noqa: E402
from tunelab.data.preference_fields import unused_preference_fields  # noqa: E402
from tunelab.data.templates import get_template  # noqa: E402
from tunelab.model import preference_losses as L  # noqa: E402
from tunelab.model.logprobs import sequence_logprobs  # noqa: E402
from tunelab.model.preference import PreferenceObjective, PreferenceSettings  # noqa: E402

TEMPLATE = "qwen_chat"
MAX_LENGTH = 96
RAW_PAIRS = [
    {"prompt": "What is 2 plus 2?", "chosen": "It is 4.", "rejected": "No idea, sorry."},
    {"prompt": "Who are you? Please introduce yourself.", "chosen": "I am an AI assistant. How can I help you today?",
     "rejected": "No."},
    {"prompt": "Give three tips for staying healthy.", "chosen": "Sleep, water, walks.",
     "rejected": "The quick brown fox jumps over the lazy dog."},
]
RAW_KTO = [
    {"prompt": "What is 2 plus 2?", "completion": "It is 4.", "label": True},
    {"prompt": "Who are you?", "completion": "The lazy dog.", "label": False},
    {"prompt": "Give three tips for staying healthy.", "completion": "Sleep, water, walks.", "label": True},
    {"prompt": "What is the capital of China?", "completion": "Paris, of course.", "label": False},
]


# --- fixtures and helpers -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tok(tiny_tokenizer_dir):
    """A tokenizer of our own (TRL sets pad_token on the one it is given), pad = EOS as TRL would set it."""
    from transformers import AutoTokenizer

    t = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    t.pad_token = t.eos_token
    return t


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _causal_lm(path, noise_seed=None):
    """The tiny model (fp32, train mode); with noise_seed its weights moved by seeded noise (policy != reference)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    if noise_seed is not None:
        g = torch.Generator().manual_seed(noise_seed)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model.train()


def _args(config_cls, tmp_path, **settings):
    """A TRL config for a CPU run in fp32 (TRL's configs default bf16 to True, which would autocast the reference)."""
    return config_cls(output_dir=str(tmp_path), report_to="none", use_cpu=True, bf16=False, save_strategy="no",
                      logging_strategy="no", per_device_train_batch_size=2, **settings)


PAIRS_DATA = [{"prompt": "a", "chosen": "b", "rejected": "c"}]  # trainers want a train_dataset; never iterated


def _dataset(rows):
    return datasets.Dataset.from_list(rows)


def _sequences(row):
    """[(ids, labels)] of each sequence of a tunelab row (position ids restart at 0 at each)."""
    pos = row["position_ids"]
    starts = [i for i, p in enumerate(pos) if p == 0] + [len(pos)]
    return [(row["input_ids"][a:b], row["labels"][a:b]) for a, b in zip(starts, starts[1:])]


def _prompt_and_reply(ids, labels):
    """tunelab's split of a sequence: the untrained start, and the trained tokens (one contiguous run)."""
    trained = [i for i, lab in enumerate(labels) if lab != -100]
    assert trained == list(range(trained[0], trained[-1] + 1))
    return ids[:trained[0]], ids[trained[0]:trained[-1] + 1]


def _pair_units(tok, raw=RAW_PAIRS):
    pairs = [normalise_preference(r) for r in raw]
    return [e.row for e in encode_pairs(get_template(TEMPLATE), tok, pairs, MAX_LENGTH)]


def _packed(units, tok):
    """Packed rows as training collates them (padded with the tokenizer's pad token)."""
    return collate(pack_rows(units, row_capacity(MAX_LENGTH)), pad_token_id=tok.pad_token_id)


def _trl_pair_examples(units, swap=False):
    """TRL DPO examples (prompt_ids, chosen_ids, rejected_ids) of exactly tunelab's tokens: the reply is what
    tunelab trains (the trailing '\\n' of the template, untrained, is left off; it is after every scored token)."""
    out = []
    for row in units:
        (pc, c), (pr, r) = [_prompt_and_reply(*s) for s in _sequences(row)]
        assert pc == pr
        out.append({"prompt_ids": pc, "chosen_ids": r if swap else c, "rejected_ids": c if swap else r})
    return out


def _assert_same_grads(ours, theirs, atol=1e-5, rtol=1e-4):
    theirs = dict(theirs.named_parameters())
    seen = 0
    for name, p in ours.named_parameters():
        q = theirs[name]
        if p.grad is None or q.grad is None:
            assert (p.grad is None or not p.grad.any()) and (q.grad is None or not q.grad.any()), name
            continue
        torch.testing.assert_close(p.grad, q.grad, atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")
        seen += 1
    assert seen > 0


def _tunelab_loss(model, batch, settings, reference_model=None):
    objective = PreferenceObjective(settings, chunk_size=7, reference_model=reference_model)  # several chunks
    loss_sum, units = objective(model, batch)
    return loss_sum / units, objective


def _dpo_trainer(tmp_path, tok, policy, reference, **settings):
    from trl import DPOConfig, DPOTrainer

    return DPOTrainer(model=policy, ref_model=reference, args=_args(DPOConfig, tmp_path, **settings),
                      train_dataset=_dataset(PAIRS_DATA), processing_class=tok)


# --- log-probabilities ----------------------------------------------------------------------------------------------


def test_sequence_logprobs_sum_and_mean_equal_trls_for_the_same_tokens(tiny_llama_dir, tok, tmp_path):
    """Per sequence, the sum of the reply tokens' log-probs (DPO, KTO) and their mean (IPO, ORPO, SimPO), tunelab's
    chunked path against TRL's fused LM head (what DPOTrainer / KTOTrainer score with) and against TRL's
    get_batch_logps on full logits (what CPOTrainer / ORPOTrainer score with)."""
    from trl.experimental.cpo import CPOTrainer
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    units = _pair_units(tok)
    # one pair a row: sequences in order chosen, rejected, chosen, ...
    batch = collate(units, pad_token_id=tok.pad_token_id)
    ours_model = _causal_lm(tiny_llama_dir, noise_seed=1)
    with torch.no_grad():
        ours = sequence_logprobs(ours_model, batch, chunk_size=7)
    ours_mean = ours / batch["sequence_tokens"]

    trainer = _dpo_trainer(tmp_path, tok, _causal_lm(tiny_llama_dir, noise_seed=1), _causal_lm(tiny_llama_dir))
    inputs = DataCollatorForPreference(pad_token_id=tok.pad_token_id)(_trl_pair_examples(units))
    labels = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, -100)
    with torch.no_grad():  # the lines of DPOTrainer._compute_loss that score the policy
        out = trainer.model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], labels=labels,
                            fused_lm_head=True)
        fused = out.log_probs.sum(1)
        logits = _causal_lm(tiny_llama_dir, noise_seed=1)(input_ids=inputs["input_ids"],
                                                          attention_mask=inputs["attention_mask"]).logits
        full_sum = CPOTrainer.get_batch_logps(logits, labels, average_log_prob=False)
        full_mean = CPOTrainer.get_batch_logps(logits, labels, average_log_prob=True)
    n = len(units)
    # TRL's batch is [chosen of every pair, rejected of every pair]; tunelab's [chosen, rejected] per pair
    trl_order = torch.cat([torch.arange(0, 2 * n, 2), torch.arange(1, 2 * n, 2)])
    torch.testing.assert_close(fused, ours[trl_order], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(full_sum, ours[trl_order], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(full_mean, ours_mean[trl_order], atol=1e-6, rtol=1e-5)
    # the same tokens are scored: TRL's completion mask counts what tunelab trains (prompt masked, <|im_end|> in)
    assert inputs["completion_mask"].sum(1).tolist() == batch["sequence_tokens"][trl_order].tolist()
    assert out.label_mask.sum(1).tolist() == batch["sequence_tokens"][trl_order].tolist()
    # and DPOTrainer's own metric reads the same mean over pairs (loss computed with the reference)
    trainer.compute_loss(trainer.model, inputs)
    assert trainer._metrics["train"]["logps/chosen"][-1] == pytest.approx(ours[0::2].mean().item(), abs=1e-4)
    assert trainer._metrics["train"]["logps/rejected"][-1] == pytest.approx(ours[1::2].mean().item(), abs=1e-4)


def test_which_tokens_trl_counts_as_the_reply_of_chat_data(tiny_llama_dir, tok, tmp_path):
    """TRL tokenising the same conversations with the same template (tunelab's ChatML as the tokenizer's
    chat_template): the prompt is identical; DPO/KTO's completion is tunelab's trained tokens plus the template's
    '\\n' after <|im_end|>; the experimental CPO/ORPO add BOS to the prompt and EOS after that '\\n'. The extra
    tokens change the summed log-prob by their own log-probs (measured here on the tiny model)."""
    from trl import DPOConfig, DPOTrainer, KTOConfig, KTOTrainer
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    chat_tok = copy.deepcopy(tok)
    chat_tok.chat_template = get_template(TEMPLATE).to_jinja()
    units = _pair_units(tok)
    newline = tok("\n", add_special_tokens=False).input_ids
    assert len(newline) == 1
    conversational = [{"prompt": [{"role": "user", "content": r["prompt"]}],
                       "chosen": [{"role": "assistant", "content": r["chosen"]}],
                       "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in RAW_PAIRS]

    dpo = DPOTrainer(model=_causal_lm(tiny_llama_dir), ref_model=_causal_lm(tiny_llama_dir),
                     args=_args(DPOConfig, tmp_path / "dpo", max_length=None), train_dataset=_dataset(conversational),
                     processing_class=chat_tok)
    kto = KTOTrainer(model=_causal_lm(tiny_llama_dir), ref_model=_causal_lm(tiny_llama_dir),
                     args=_args(KTOConfig, tmp_path / "kto", max_length=None),
                     train_dataset=_dataset(conversational), processing_class=chat_tok)
    cpo = CPOTrainer(model=_causal_lm(tiny_llama_dir), args=_args(CPOConfig, tmp_path / "cpo", max_length=None),
                     train_dataset=_dataset(conversational), processing_class=chat_tok)
    model = _causal_lm(tiny_llama_dir)
    with torch.no_grad():  # tunelab's summed reply log-probs, [chosen, rejected] per pair
        ours = sequence_logprobs(model, collate(units, pad_token_id=tok.pad_token_id))
    for i, row in enumerate(units):
        (prompt, chosen), (_, rejected) = [_prompt_and_reply(*s) for s in _sequences(row)]
        ex = dpo.train_dataset[i]
        assert ex["prompt_ids"] == prompt
        assert ex["chosen_ids"] == chosen + newline and ex["rejected_ids"] == rejected + newline
        # KTOTrainer unpairs into [every chosen reply, then every rejected reply]
        assert kto.train_dataset[i]["prompt_ids"] == prompt
        assert kto.train_dataset[i]["completion_ids"] == chosen + newline
        assert kto.train_dataset[len(units) + i]["completion_ids"] == rejected + newline
        ex = cpo.train_dataset[i]
        assert ex["prompt_input_ids"] == [tok.bos_token_id] + prompt
        assert ex["chosen_input_ids"] == [tok.bos_token_id] + prompt + chosen + newline + [tok.eos_token_id]
        assert ex["chosen_labels"] == [-100] * (len(prompt) + 1) + chosen + newline + [tok.eos_token_id]
        # TRL's summed log-prob of its completion (chosen + '\n') = tunelab's sum + the '\n' token's own log-prob
        with torch.no_grad():
            ids = torch.tensor([prompt + chosen + newline])
            token_logps = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1).gather(
                -1, ids[0, 1:, None])[:, 0]
        trl_sum = token_logps[len(prompt) - 1:].sum().item()
        assert trl_sum == pytest.approx(ours[2 * i].item() + token_logps[-1].item(), abs=1e-4)
        assert token_logps[-1].item() < -1e-3  # the extra term is not ~0: TRL's sum really differs


# --- DPO ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss_type,beta", [("sigmoid", 0.1), ("sigmoid", 0.5), ("ipo", 0.1), ("hinge", 0.1)])
def test_dpo_loss_and_gradients_equal_trls_dpo_trainer(tiny_llama_dir, tok, tmp_path, loss_type, beta):
    """DPOTrainer.compute_loss (a real trainer, a separate reference model) against tunelab's DPO with a frozen
    reference copy ('copy'): loss and every gradient, on packed rows; IPO on mean token log-probs on both sides."""
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    units = _pair_units(tok)
    ours_model = _causal_lm(tiny_llama_dir, noise_seed=1)
    ours, objective = _tunelab_loss(ours_model, _packed(units, tok),
                                    PreferenceSettings("dpo", beta=beta, dpo_loss=loss_type, reference="copy"),
                                    reference_model=_causal_lm(tiny_llama_dir))
    ours.backward()

    theirs_model = _causal_lm(tiny_llama_dir, noise_seed=1)
    trainer = _dpo_trainer(tmp_path, tok, theirs_model, _causal_lm(tiny_llama_dir), loss_type=[loss_type], beta=beta)
    inputs = DataCollatorForPreference(pad_token_id=tok.pad_token_id)(_trl_pair_examples(units))
    theirs = trainer.compute_loss(theirs_model, inputs)
    theirs.backward()

    assert abs(ours.item() - 0.6931) > 1e-2 or loss_type != "sigmoid"  # the policy really differs from the reference
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    _assert_same_grads(ours_model, theirs_model)
    metrics = {k: v[0].item() / len(units) for k, v in objective.take_metrics().items()}
    rewards = trainer._metrics["train"]
    if loss_type == "ipo":  # tunelab logs IPO's rewards on mean token log-probs, TRL on sums (the loss agrees)
        assert metrics["reward_chosen"] != pytest.approx(rewards["rewards/chosen"][-1], abs=1e-3)
        return
    assert metrics["reward_chosen"] == pytest.approx(rewards["rewards/chosen"][-1], abs=1e-4)
    assert metrics["reward_margin"] == pytest.approx(rewards["rewards/margins"][-1], abs=1e-4)
    assert metrics["accuracy"] == pytest.approx(rewards["rewards/accuracies"][-1])


def test_dpo_with_the_adapters_off_reference_equals_trls_peft_dpo(tiny_llama_dir, tok, tmp_path):
    """LoRA: tunelab's 'adapters_off' reference against DPOTrainer given a peft_config (TRL's reference is then the
    model with its new adapter disabled), the same adapter weights on both sides; loss and adapter gradients."""
    from peft import LoraConfig, get_peft_model
    from trl import DPOConfig, DPOTrainer
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    lora = dict(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"])
    units = _pair_units(tok)
    ours_model = get_peft_model(_causal_lm(tiny_llama_dir), LoraConfig(**lora))
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for name, p in ours_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    ours, _ = _tunelab_loss(ours_model, _packed(units, tok),
                            PreferenceSettings("dpo", beta=0.5, reference="adapters_off"))
    ours.backward()

    trainer = DPOTrainer(model=_causal_lm(tiny_llama_dir), args=_args(DPOConfig, tmp_path, beta=0.5),
                         train_dataset=_dataset(PAIRS_DATA), processing_class=tok, peft_config=LoraConfig(**lora))
    theirs_model = trainer.model
    assert trainer.ref_model is None and "ref" not in theirs_model.peft_config
    with torch.no_grad():
        adapters = dict(ours_model.named_parameters())
        for name, p in theirs_model.named_parameters():
            if "lora_" in name:
                p.copy_(adapters[name])
    theirs = trainer.compute_loss(theirs_model, DataCollatorForPreference(pad_token_id=tok.pad_token_id)(
        _trl_pair_examples(units)))
    theirs.backward()
    assert abs(ours.item() - 0.6931) > 1e-2
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    _assert_same_grads(ours_model, theirs_model)


def test_dpo_label_smoothing_is_conservative_dpo_which_trl_1_16_sigmoid_ignores(tiny_llama_dir, tok, tmp_path):
    """tunelab's sigmoid loss with label_smoothing eps (cDPO) = (1 - eps) TRL sigmoid(pair) + eps TRL sigmoid(swapped
    pair), loss and gradients. TRL 1.16's own 'sigmoid' with label_smoothing = eps returns the plain DPO loss."""
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    eps, beta = 0.2, 0.5
    units = _pair_units(tok)
    ours_model = _causal_lm(tiny_llama_dir, noise_seed=1)
    ours, _ = _tunelab_loss(ours_model, _packed(units, tok),
                            PreferenceSettings("dpo", beta=beta, label_smoothing=eps, reference="copy"),
                            reference_model=_causal_lm(tiny_llama_dir))
    ours.backward()

    collator = DataCollatorForPreference(pad_token_id=tok.pad_token_id)
    theirs_model = _causal_lm(tiny_llama_dir, noise_seed=1)
    trainer = _dpo_trainer(tmp_path, tok, theirs_model, _causal_lm(tiny_llama_dir), beta=beta, label_smoothing=eps)
    straight = trainer.compute_loss(theirs_model, collator(_trl_pair_examples(units)))
    swapped = trainer.compute_loss(theirs_model, collator(_trl_pair_examples(units, swap=True)))
    theirs = (1 - eps) * straight + eps * swapped
    theirs.backward()
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    _assert_same_grads(ours_model, theirs_model)

    # TRL 1.16: label_smoothing does not enter 'sigmoid' (trl/trainer/dpo_trainer.py, `if loss_type == "sigmoid"`)
    plain, _ = _tunelab_loss(_causal_lm(tiny_llama_dir, noise_seed=1), _packed(units, tok),
                             PreferenceSettings("dpo", beta=beta, reference="copy"),
                             reference_model=_causal_lm(tiny_llama_dir))
    torch.testing.assert_close(straight.detach(), plain.detach(), atol=1e-5, rtol=1e-5)
    assert abs(ours.item() - straight.item()) > 1e-3


# --- ORPO -----------------------------------------------------------------------------------------------------------


def _orpo_batch(units, tok):
    """TRL's (experimental) ORPO/CPO batch of exactly tunelab's tokens, through TRL's DPODataCollatorWithPadding."""
    from trl.experimental.utils import DPODataCollatorWithPadding

    features = []
    for row in units:
        feature = {}
        for kind, (ids, labels) in zip(("chosen", "rejected"), _sequences(row)):
            prompt, reply = _prompt_and_reply(ids, labels)
            feature[f"{kind}_input_ids"] = prompt + reply
            feature[f"{kind}_attention_mask"] = [1] * len(prompt + reply)
            feature[f"{kind}_labels"] = [-100] * len(prompt) + reply
        feature["prompt_input_ids"] = prompt
        feature["prompt_attention_mask"] = [1] * len(prompt)
        features.append(feature)
    return DPODataCollatorWithPadding(pad_token_id=tok.pad_token_id)(features)


def test_orpo_odds_ratio_term_equals_trls_and_its_nll_term_differs_as_documented(tiny_llama_dir, tok, tmp_path):
    """ORPOTrainer (experimental, a real instance): its mean reply log-probs and odds-ratio term equal tunelab's
    (value and gradient). Its NLL term is not tunelab's: TRL's is the token mean of -log p over prompt and reply of
    all chosen sequences of the batch (checked here against tunelab's log-probs with every token trained); tunelab's
    is -mean over each chosen reply's tokens, averaged over pairs."""
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    beta = 0.25
    units = _pair_units(tok)
    batch = _packed(units, tok)
    ours_model = _causal_lm(tiny_llama_dir, noise_seed=1)
    ours, objective = _tunelab_loss(ours_model, batch, PreferenceSettings("orpo", beta=beta))
    nll_ours = objective.take_metrics()["nll_chosen"][0] / len(units)

    theirs_model = _causal_lm(tiny_llama_dir, noise_seed=1)
    trainer = ORPOTrainer(model=theirs_model, args=_args(ORPOConfig, tmp_path, beta=beta),
                          train_dataset=_dataset(PAIRS_DATA), processing_class=tok)
    trl_batch = _orpo_batch(units, tok)
    # ORPOTrainer.get_batch_loss_metrics, its first lines: forward, then odds_ratio_loss; loss = nll - losses.mean()
    chosen, rejected, _, _, nll_theirs = trainer.concatenated_forward(theirs_model, trl_batch)
    or_losses, *_ = trainer.odds_ratio_loss(chosen, rejected)
    theirs = nll_theirs - or_losses.mean()
    with torch.no_grad():
        whole, _ = trainer.get_batch_loss_metrics(theirs_model, trl_batch)
    torch.testing.assert_close(whole, theirs.detach())

    # the mean reply log-probs (what the odds ratio reads) agree
    with torch.no_grad():
        sums = sequence_logprobs(_causal_lm(tiny_llama_dir, noise_seed=1),
                                 collate(units, pad_token_id=tok.pad_token_id))
        means = sums / collate(units, pad_token_id=tok.pad_token_id)["sequence_tokens"]
    torch.testing.assert_close(chosen.detach(), means[0::2], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(rejected.detach(), means[1::2], atol=1e-6, rtol=1e-5)

    # the odds-ratio term, value and gradient: tunelab's -beta log sigma(log odds ratio) vs TRL's -losses.mean()
    pc, pr = (sequence_logprobs(ours_model, batch, chunk_size=7) / batch["sequence_tokens"]).view(-1, 2).unbind(1)
    ours_or = (L.orpo_losses(pc, pr, beta=beta) + pc).mean()
    theirs_or = -or_losses.mean()
    torch.testing.assert_close(ours_or, theirs_or, atol=1e-6, rtol=1e-5)
    ours_model.zero_grad()
    theirs_model.zero_grad()
    ours_or.backward()
    theirs_or.backward()
    _assert_same_grads(ours_model, theirs_model)

    # the NLL terms: TRL's = token mean over prompt + reply (all positions but the first) of the chosen sequences
    torch.testing.assert_close(ours - nll_ours, theirs.detach() - nll_theirs.detach(), atol=1e-5, rtol=1e-5)
    all_trained = []
    for row in units:
        ids = sum(_prompt_and_reply(*_sequences(row)[0]), [])  # the chosen sequence of TRL's batch
        all_trained.append({"input_ids": ids, "labels": list(ids), "position_ids": list(range(len(ids))),
                            "sequence_kind": [0]})
    full = collate(all_trained, pad_token_id=tok.pad_token_id)
    with torch.no_grad():
        every_token = sequence_logprobs(_causal_lm(tiny_llama_dir, noise_seed=1), full)
    torch.testing.assert_close(nll_theirs.detach(), -every_token.sum() / full["sequence_tokens"].sum(),
                               atol=1e-5, rtol=1e-5)
    assert abs(nll_ours.item() - nll_theirs.item()) > 1e-2


# --- SimPO ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_simpo_loss_and_gradients_equal_trls_cpo_trainer(tiny_llama_dir, tok, tmp_path, smoothing):
    """CPOTrainer (experimental) with loss_type='simpo' and cpo_alpha=0 (pure SimPO: TRL's default cpo_alpha=1 adds
    an NLL term, CPO-SimPO), get_batch_loss_metrics: loss and gradients equal tunelab's SimPO."""
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    beta, gamma = 2.0, 0.5
    units = _pair_units(tok)
    ours_model = _causal_lm(tiny_llama_dir, noise_seed=1)
    ours, _ = _tunelab_loss(ours_model, _packed(units, tok),
                            PreferenceSettings("simpo", beta=beta, simpo_gamma=gamma, label_smoothing=smoothing))
    ours.backward()

    theirs_model = _causal_lm(tiny_llama_dir, noise_seed=1)
    trainer = CPOTrainer(model=theirs_model, args=_args(CPOConfig, tmp_path, loss_type="simpo", cpo_alpha=0.0,
                                                        beta=beta, simpo_gamma=gamma, label_smoothing=smoothing),
                         train_dataset=_dataset(PAIRS_DATA), processing_class=tok)
    theirs, _ = trainer.get_batch_loss_metrics(theirs_model, _orpo_batch(units, tok))
    theirs.backward()
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    _assert_same_grads(ours_model, theirs_model)


# --- KTO ------------------------------------------------------------------------------------------------------------


def test_kto_loss_and_gradients_equal_trls_kto_trainer(tiny_llama_dir, tok, tmp_path):
    """KTOTrainer.compute_loss (a real trainer, separate reference) on tunelab's KTO units (each reply and its KL
    sequence, the same token ids): loss with unequal weights and the clamped, detached KL estimate, and gradients."""
    from trl import KTOConfig, KTOTrainer
    from trl.trainer.kto_trainer import DataCollatorForUnpairedPreference

    beta, wd, wu = 0.5, 1.0, 1.5
    samples = [normalise_kto(r) for r in RAW_KTO]
    units = [u.row for per_sample in encode_kto(get_template(TEMPLATE), tok, samples, MAX_LENGTH) for u in per_sample]
    ours_model = _causal_lm(tiny_llama_dir)
    reference = _causal_lm(tiny_llama_dir, noise_seed=2)
    settings = PreferenceSettings("kto", beta=beta, kto_desirable_weight=wd, kto_undesirable_weight=wu,
                                  reference="copy")
    ours, objective = _tunelab_loss(ours_model, _packed(units, tok), settings, reference_model=reference)
    ours.backward()
    kl_ours = objective.take_metrics()["kl"][0].item()

    examples = []
    for row, sample in zip(units, samples):
        (p, reply), (kp, kl_reply) = [_prompt_and_reply(*s) for s in _sequences(row)]
        assert p == kp
        examples.append({"prompt_ids": p, "completion_ids": reply, "KL_completion_ids": kl_reply,
                         "label": sample["label"]})
    theirs_model = _causal_lm(tiny_llama_dir)
    trainer = KTOTrainer(model=theirs_model, ref_model=_causal_lm(tiny_llama_dir, noise_seed=2),
                         args=_args(KTOConfig, tmp_path, beta=beta, desirable_weight=wd, undesirable_weight=wu),
                         train_dataset=_dataset([{"prompt": "a", "completion": "b", "label": True},
                                                 {"prompt": "a", "completion": "c", "label": False}]),
                         processing_class=tok)
    theirs = trainer.compute_loss(theirs_model, DataCollatorForUnpairedPreference(pad_token_id=tok.pad_token_id)(
        examples))
    theirs.backward()
    assert kl_ours > 0  # the estimate is not clamped away here, so it is compared too
    assert trainer._metrics["train"]["kl"][-1] == pytest.approx(kl_ours, abs=1e-5)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    _assert_same_grads(ours_model, theirs_model)


# --- reward model ---------------------------------------------------------------------------------------------------


def _reward_model(path):
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=torch.float32).train()


def test_bradley_terry_loss_and_gradients_equal_trls_reward_trainer(tiny_llama_dir, tok, tmp_path):
    """RewardTrainer.compute_loss (a real trainer; transformers' sequence-classification head read at the last
    non-pad token) against tunelab's reward objective (the head at each packed sequence's last token); without a
    margin. tunelab has no margin: a 'margin' field is reported unused, and TRL's margin loss is not reproduced."""
    from trl import RewardConfig, RewardTrainer
    from trl.trainer.reward_trainer import DataCollatorForPreference

    units = _pair_units(tok)
    ours_model = _reward_model(tiny_llama_dir)
    theirs_model = copy.deepcopy(ours_model)
    with torch.no_grad():  # a head that is not ~0, so the scores differ
        ours_model.score.weight.normal_(0, 1, generator=torch.Generator().manual_seed(3))
        theirs_model.score.weight.copy_(ours_model.score.weight)
    ours, _ = _tunelab_loss(ours_model, _packed(units, tok), PreferenceSettings("reward"))
    ours.backward()

    trainer = RewardTrainer(model=theirs_model, args=_args(RewardConfig, tmp_path),
                            train_dataset=_dataset([{"chosen": "a b", "rejected": "a c"}]), processing_class=tok)
    examples = [dict(zip(("chosen_ids", "rejected_ids"), (ids for ids, _ in _sequences(row)))) for row in units]
    inputs = DataCollatorForPreference(pad_token_id=tok.pad_token_id)(examples)
    assert not (inputs["input_ids"][:, :1] == tok.pad_token_id).any()
    theirs = trainer.compute_loss(theirs_model, inputs)
    theirs.backward()
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    _assert_same_grads(ours_model, theirs_model)

    # TRL's margin: -log sigma(s_c - s_r - margin); tunelab reads no margin and says so
    margins = [dict(e, margin=1.0) for e in examples]
    with torch.no_grad():
        with_margin = trainer.compute_loss(theirs_model, DataCollatorForPreference(pad_token_id=tok.pad_token_id)(
            margins))
    assert with_margin.item() > theirs.item() + 1e-3
    assert unused_preference_fields({**RAW_PAIRS[0], "margin": 1.0}) == ["margin"]


def test_reward_scores_where_trl_and_transformers_read_them_when_sequences_end_with_eos(tiny_llama_dir, tok,
                                                                                        tmp_path):
    """pad = EOS (tunelab's choice for a tokenizer without a pad token) and a template whose sequences end with EOS
    (mistral, llama2_chat): transformers' sequence-classification forward (TRL's RewardTrainer, and the exported
    model) reads the last token that is not pad, the one before the EOS; so does tunelab."""
    from trl import RewardConfig, RewardTrainer
    from trl.trainer.reward_trainer import DataCollatorForPreference

    pairs = [normalise_preference(r) for r in RAW_PAIRS]
    units = [e.row for e in encode_pairs(get_template("mistral"), tok, pairs, MAX_LENGTH)]
    assert all(ids[-1] == tok.pad_token_id == tok.eos_token_id for row in units for ids, _ in _sequences(row))
    ours_model = _reward_model(tiny_llama_dir)
    with torch.no_grad():
        ours_model.score.weight.normal_(0, 1, generator=torch.Generator().manual_seed(3))
    theirs_model = copy.deepcopy(ours_model)
    with torch.no_grad():
        ours, _ = _tunelab_loss(ours_model, _packed(units, tok), PreferenceSettings("reward"))
        trainer = RewardTrainer(model=theirs_model, args=_args(RewardConfig, tmp_path),
                                train_dataset=_dataset([{"chosen": "a b", "rejected": "a c"}]), processing_class=tok)
        examples = [dict(zip(("chosen_ids", "rejected_ids"), (ids for ids, _ in _sequences(row)))) for row in units]
        theirs = trainer.compute_loss(theirs_model, DataCollatorForPreference(pad_token_id=tok.pad_token_id)(examples))
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
