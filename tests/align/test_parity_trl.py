"""plinth.align.losses equals TRL 1.16 (the reference, a dev dependency) to 1e-5.

Every reference value comes from TRL's own code running, never from a formula copied here:

- DPO: a real `DPOTrainer` on a tiny random `LlamaForCausalLM` (2 layers, d=64, vocab 128) with
  an in-memory word-level tokenizer. Function level: its `_compute_loss` is driven with a stub
  model whose fused-head output carries fixed per-token log-probs (ragged completion masks) and
  precomputed reference log-probs; one pair per call gives TRL's per-pair loss and rewards (its
  `_metrics`), one call on the batch its mean. Model level: the trainer's own forward computes
  the loss from token ids; ours is fed by log-probs taken from the same model's logits.
- SimPO / ORPO: `CPOTrainer.cpo_loss` / `ORPOTrainer.odds_ratio_loss` and their
  `get_batch_loss_metrics` (total loss and logged stats), run unbound on a SimpleNamespace that
  holds the attributes they read; `concatenated_forward` is stubbed to return fixed log-probs.
- KTO: `KTOTrainer._compute_loss` (and its `_compute_kl_logps`) unbound on a stub `self`, with a
  stub model returning fixed per-token log-probs for the completion and the KL rows.
- Bradley-Terry: `RewardTrainer.compute_loss` unbound on a stub `self` and a stub scorer.
- GRPO / RLOO advantages: real `GRPOTrainer` / `RLOOTrainer` on the tiny model; their
  `_generate_and_score_completions` samples completions and scores them with a reward function
  that returns a fixed list of rewards (one None: TRL's unscorable case).
- GRPO / RLOO policy loss: the same trainers' `_compute_loss`, with
  `_get_per_token_logps_and_entropies` replaced by one that returns fixed per-token log-probs
  (requires_grad, so the gradients are compared too).
Run with -s to print the table of max abs differences.
"""

from __future__ import annotations

import types
from collections import defaultdict

import pytest
import torch

trl = pytest.importorskip("trl")

from plinth.align.losses import (  # noqa: E402
    bradley_terry_loss,
    dpo_loss,
    group_advantages,
    kto_loss,
    orpo_loss,
    policy_loss,
    rloo_advantages,
    simpo_loss,
    token_logps,
)

ATOL = 1e-5
DTYPES = [torch.float64, torch.float32]
_DIFFS: dict[str, float] = {}


def close(name: str, ours, ref) -> None:
    """assert |ours - ref| <= ATOL everywhere, and remember the worst difference for the table."""
    ours = torch.as_tensor(ours).detach().double().cpu()
    ref = torch.as_tensor(ref).detach().double().cpu()
    assert ours.shape == ref.shape or ours.numel() == ref.numel() == 1, (
        name,
        ours.shape,
        ref.shape,
    )
    diff = (ours.reshape(ref.shape) - ref).abs().max().item() if ref.numel() else 0.0
    _DIFFS[name] = max(_DIFFS.get(name, 0.0), diff)
    assert diff <= ATOL, f"{name}: max abs diff {diff:.3g} > {ATOL} (ours {ours}, TRL {ref})"


@pytest.fixture(scope="module", autouse=True)
def _print_table():
    yield
    print("\nparity with TRL", trl.__version__, "(max abs diff)")
    for name, diff in sorted(_DIFFS.items()):
        print(f"  {name:<40} {diff:.2e}")


# ---------------------------------------------------------------------------------------------
# Tiny model, tokenizer and trainers


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(125)} | {"<pad>": 125, "<eos>": 126, "<unk>": 127}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )


def _llama(seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
        pad_token_id=125,
        eos_token_id=126,
        bos_token_id=None,
    )
    return LlamaForCausalLM(cfg)


def _common_args(tmp: str) -> dict:
    return dict(
        output_dir=tmp,
        report_to=[],
        use_cpu=True,
        bf16=False,
        save_strategy="no",
        gradient_accumulation_steps=1,
    )


PAIRS = [
    {"prompt": "t1 t2 t3", "chosen": " t4 t5", "rejected": " t6"},
    {"prompt": "t7 t8", "chosen": " t9", "rejected": " t10 t11 t12"},
    {"prompt": "t13 t14 t15 t16", "chosen": " t17 t18 t19 t20", "rejected": " t21 t22"},
    {"prompt": "t23", "chosen": " t24 t25 t26", "rejected": " t27 t28 t29"},
]


@pytest.fixture(scope="module")
def dpo_trainer(tmp_path_factory):
    from datasets import Dataset

    args = trl.DPOConfig(
        per_device_train_batch_size=4, **_common_args(str(tmp_path_factory.mktemp("dpo")))
    )
    tr = trl.DPOTrainer(
        model=_llama(0),
        ref_model=_llama(1),
        args=args,
        train_dataset=Dataset.from_list(PAIRS),
        processing_class=_tokenizer(),
    )
    tr.model.train()
    return tr


PROMPTS = [{"prompt": "t1 t2 t3"}] * 4 + [{"prompt": "t7 t8"}] * 4 + [{"prompt": "t9"}] * 4
# Fixed rewards of 3 groups of 4: a spread group, a group of equal rewards (std 0), one None.
REWARDS = [1.0, 0.0, 2.0, 0.5, 3.0, 3.0, 3.0, 3.0, -1.0, None, 0.25, 4.0]
G = 4


def _fixed_reward(completions, **kwargs):
    assert len(completions) == len(REWARDS)
    return list(REWARDS)


@pytest.fixture(scope="module")
def rl_trainers(tmp_path_factory):
    from datasets import Dataset

    ds = Dataset.from_list(PROMPTS[::G])
    kw = dict(per_device_train_batch_size=len(PROMPTS), num_generations=G, max_completion_length=6)
    grpo = trl.GRPOTrainer(
        model=_llama(0),
        reward_funcs=_fixed_reward,
        processing_class=_tokenizer(),
        train_dataset=ds,
        args=trl.GRPOConfig(**kw, **_common_args(str(tmp_path_factory.mktemp("grpo")))),
    )
    # beta=0 at build time: RLOO would otherwise load a reference model from the hub by name
    rloo = trl.RLOOTrainer(
        model=_llama(0),
        reward_funcs=_fixed_reward,
        processing_class=_tokenizer(),
        train_dataset=ds,
        args=trl.RLOOConfig(beta=0.0, **kw, **_common_args(str(tmp_path_factory.mktemp("rloo")))),
    )
    for tr in (grpo, rloo):
        tr.model.train()
        tr.current_gradient_accumulation_steps = 1  # set by the HF training loop per window
    return grpo, rloo


# ---------------------------------------------------------------------------------------------
# Fixed batches


def _ragged(n: int, t: int, seed: int, dtype, lo: int = 1):
    """Per-token log-probs (n, t) and a ragged right-padded mask (n, t) with lengths in [lo, t]."""
    g = torch.Generator().manual_seed(seed)
    logps = -torch.rand(n, t, generator=g, dtype=torch.float64).mul(3).to(dtype)
    lengths = torch.randint(lo, t + 1, (n,), generator=g)
    lengths[0] = t  # one full-length row
    mask = (torch.arange(t) < lengths[:, None]).long()
    return logps * mask, mask


class _StubLM:
    """Stands in for a model patched with TRL's fused LM head: returns fixed per-token outputs."""

    def __init__(self, pick):
        self.pick = pick  # kwargs -> per-token log-probs (rows, seq - 1)

    def __call__(self, **kwargs):
        lp = self.pick(kwargs)
        z = torch.zeros_like(lp)
        return types.SimpleNamespace(
            log_probs=lp,
            entropy=z,
            mean_logits=z,
            is_top1=z.bool(),
            log_sum_sq_probs=z,
            aux_loss=None,
        )


def _dpo_batch(b: int, t: int, seed: int, dtype):
    """A DPO collator-shaped batch (rows [chosen..., rejected...]) and the per-token log-probs."""
    per_token, shift_mask = _ragged(2 * b, t - 1, seed, dtype)
    completion_mask = torch.cat([torch.zeros(2 * b, 1, dtype=torch.long), shift_mask], 1)
    g = torch.Generator().manual_seed(seed + 1)
    ref = -torch.rand(2 * b, generator=g, dtype=torch.float64).mul(3 * t).to(dtype)
    batch = {
        "input_ids": torch.ones(2 * b, t, dtype=torch.long),
        "attention_mask": torch.ones(2 * b, t, dtype=torch.long),
        "completion_mask": completion_mask,
        "ref_chosen_logps": ref[:b],
        "ref_rejected_logps": ref[b:],
    }
    return batch, per_token


def _rows(batch: dict, per_token: torch.Tensor, i: int, b: int):
    """Pair i alone: rows i (chosen) and b + i (rejected)."""
    idx = torch.tensor([i, b + i])
    one = {
        k: v[idx]
        for k, v in batch.items()
        if k in ("input_ids", "attention_mask", "completion_mask")
    }
    one["ref_chosen_logps"] = batch["ref_chosen_logps"][i : i + 1]
    one["ref_rejected_logps"] = batch["ref_rejected_logps"][i : i + 1]
    return one, per_token[idx]


def _trl_dpo(tr, batch, per_token):
    tr._metrics["train"].clear()
    loss = tr._compute_loss(_StubLM(lambda kw: per_token), batch, return_outputs=False)
    m = tr._metrics["train"]
    return loss, m["rewards/chosen"][-1], m["rewards/rejected"][-1]


# ---------------------------------------------------------------------------------------------
# DPO


# sigmoid with label smoothing (conservative DPO) is checked against CPOTrainer below: TRL 1.16's
# DPOTrainer applies label_smoothing only to "robust" and "exo_pair".
DPO_CASES = [("sigmoid", 0.0), ("ipo", 0.0), ("hinge", 0.0), ("robust", 0.1)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("loss_type,ls", DPO_CASES)
def test_dpo_matches_trl_dpo_trainer(dpo_trainer, loss_type, ls, dtype):
    b, beta = 6, 0.1
    batch, per_token = _dpo_batch(b, 9, seed=0, dtype=dtype)
    logps = per_token.sum(1)
    lengths = batch["completion_mask"].sum(1)
    tr = dpo_trainer
    tr.beta, tr.loss_types, tr.loss_weights, tr.label_smoothing = beta, [loss_type], [1.0], ls
    tr.precompute_ref_logps = True
    losses, cr, rr = dpo_loss(
        logps[:b],
        logps[b:],
        batch["ref_chosen_logps"],
        batch["ref_rejected_logps"],
        beta=beta,
        loss_type=loss_type,
        label_smoothing=ls,
        chosen_lengths=lengths[:b],
        rejected_lengths=lengths[b:],
    )
    name = f"dpo {loss_type} ls={ls}"
    for i in range(b):
        loss_i, cr_i, rr_i = _trl_dpo(tr, *_rows(batch, per_token, i, b))
        close(f"{name} loss", losses[i], loss_i)
        close(f"{name} rewards", torch.stack([cr[i], rr[i]]), torch.tensor([cr_i, rr_i]))
    loss_all, _, _ = _trl_dpo(tr, batch, per_token)
    close(f"{name} loss", losses.mean(), loss_all)


@pytest.mark.parametrize("dtype", DTYPES)
def test_dpo_label_smoothing_matches_trl_cdpo(dtype):
    """Conservative DPO: TRL CPOTrainer.cpo_loss("sigmoid") fed policy-minus-reference ratios."""
    from trl.experimental.cpo import CPOTrainer

    g = torch.Generator().manual_seed(3)
    c, r, rc, rr = (
        -torch.rand(16, generator=g, dtype=torch.float64).mul(40).to(dtype) for _ in range(4)
    )
    for ls in (0.0, 0.1, 0.3):
        stub = types.SimpleNamespace(
            alpha=0.0,
            loss_type="sigmoid",
            beta=0.1,
            label_smoothing=ls,
            accelerator=types.SimpleNamespace(device=torch.device("cpu")),
        )
        ref_losses, _, _ = CPOTrainer.cpo_loss(stub, c - rc, r - rr)
        losses, _, _ = dpo_loss(c, r, rc, rr, beta=0.1, label_smoothing=ls)
        close(f"dpo sigmoid ls={ls} (cDPO)", losses, ref_losses)


def test_dpo_ipo_needs_lengths():
    x = torch.zeros(2)
    with pytest.raises(ValueError, match="chosen_lengths"):
        dpo_loss(x, x, x, x, beta=0.1, loss_type="ipo")
    with pytest.raises(ValueError, match="loss_type"):
        dpo_loss(x, x, x, x, beta=0.1, loss_type="nope")


def test_dpo_model_level_matches_trl(dpo_trainer):
    """TRL's forward (fused head, labels from the completion mask) vs our log-probs from logits."""
    tr = dpo_trainer
    batch = tr.data_collator([tr.train_dataset[i] for i in range(len(PAIRS))])
    assert (batch["attention_mask"] == 0).any(), "the batch must contain right padding"
    ids, attn, cmask = batch["input_ids"], batch["attention_mask"], batch["completion_mask"]
    b = len(PAIRS)

    def seq_logps(model):
        logits = model(input_ids=ids, attention_mask=attn).logits  # (2B, T, V)
        return (token_logps(logits[:, :-1], ids[:, 1:]) * cmask[:, 1:]).sum(1)  # (2B,)

    with torch.no_grad():
        ours = seq_logps(tr.model)
        ours_ref = seq_logps(tr.ref_model)
        # TRL's own per-sequence log-probs (its reference path, run on each model)
        trl_c, trl_r = tr.compute_ref_log_probs(tr.model, batch)
        trl_rc, trl_rr = tr.compute_ref_log_probs(tr.ref_model, batch)
    close("model logps (policy)", ours, torch.cat([trl_c, trl_r]))
    close("model logps (reference)", ours_ref, torch.cat([trl_rc, trl_rr]))
    assert (ours - ours_ref).abs().max() > 0.1, "policy and reference must differ for a real test"

    lengths = cmask.sum(1)
    tr.precompute_ref_logps, tr.beta, tr.label_smoothing = False, 0.1, 0.1
    for loss_type in ("sigmoid", "hinge", "ipo", "robust"):
        tr.loss_types, tr.loss_weights = [loss_type], [1.0]
        tr._metrics["train"].clear()
        trl_loss = tr.compute_loss(tr.model, batch)
        m = tr._metrics["train"]
        logps = seq_logps(tr.model)
        losses, cr, rr = dpo_loss(
            logps[:b],
            logps[b:],
            ours_ref[:b],
            ours_ref[b:],
            beta=0.1,
            loss_type=loss_type,
            label_smoothing=0.1 if loss_type == "robust" else 0.0,
            chosen_lengths=lengths[:b],
            rejected_lengths=lengths[b:],
        )
        close(f"model dpo {loss_type} loss", losses.mean(), trl_loss)
        close(
            f"model dpo {loss_type} rewards",
            torch.stack([cr.mean(), rr.mean(), (cr - rr).mean()]),
            torch.tensor(
                [m["rewards/chosen"][-1], m["rewards/rejected"][-1], m["rewards/margins"][-1]]
            ),
        )
        # the same gradient reaches the weights
        grads_trl = torch.autograd.grad(trl_loss, list(tr.model.parameters()))
        grads = torch.autograd.grad(losses.mean(), list(tr.model.parameters()))
        close(
            f"model dpo {loss_type} grad",
            torch.cat([g.flatten() for g in grads]),
            torch.cat([g.flatten() for g in grads_trl]),
        )
    tr.label_smoothing = 0.0


# ---------------------------------------------------------------------------------------------
# SimPO, ORPO


def _avg_logps(n: int, seed: int, dtype):
    g = torch.Generator().manual_seed(seed)
    # per-token averages of real log-probs: strictly negative, mostly in (-3, 0)
    return (-(torch.rand(2, n, generator=g, dtype=torch.float64) * 3 + 0.02)).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ls", [0.0, 0.1])
def test_simpo_matches_trl_cpo(dtype, ls):
    from trl.experimental.cpo import CPOTrainer

    c, r = _avg_logps(16, 1, dtype)
    beta, gamma = 2.0, 0.5
    acc = types.SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=lambda x: x)
    stub = types.SimpleNamespace(
        alpha=0.0,
        loss_type="simpo",
        beta=beta,
        simpo_gamma=gamma,
        label_smoothing=ls,
        cpo_alpha=0.0,
        aux_loss_enabled=False,
        accelerator=acc,
    )
    stub.cpo_loss = types.MethodType(CPOTrainer.cpo_loss, stub)
    ref_losses, ref_cr, ref_rr = stub.cpo_loss(c, r)
    z = torch.zeros(())
    stub.concatenated_forward = lambda model, batch: (c, r, z.view(1, 1, 1), z.view(1, 1, 1), z)
    ref_total, _ = CPOTrainer.get_batch_loss_metrics(stub, None, {})
    losses, cr, rr = simpo_loss(c, r, beta=beta, gamma=gamma, label_smoothing=ls)
    close(f"simpo ls={ls} losses", losses, ref_losses)
    close(f"simpo ls={ls} loss", losses.mean(), ref_total)
    close("simpo rewards", torch.stack([cr, rr]), torch.stack([ref_cr, ref_rr]))


@pytest.mark.parametrize("dtype", DTYPES)
def test_orpo_matches_trl(dtype):
    from trl.experimental.orpo import ORPOTrainer

    c, r = _avg_logps(16, 2, dtype)
    c[0], r[1] = -0.3, -1e-3  # both branches of log1mexp (split at -ln 2)
    nll = torch.tensor(1.7, dtype=dtype)
    acc = types.SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=lambda x: x)
    stub = types.SimpleNamespace(beta=0.1, aux_loss_enabled=False, accelerator=acc)
    stub.odds_ratio_loss = types.MethodType(ORPOTrainer.odds_ratio_loss, stub)
    z = torch.zeros(1, 1, 1, dtype=dtype)
    stub.concatenated_forward = lambda model, batch: (c, r, z, z, nll)
    ref_loss, metrics = ORPOTrainer.get_batch_loss_metrics(stub, None, {})
    _, ref_cr, ref_rr, _, _ = stub.odds_ratio_loss(c, r)
    loss, cr, rr, stats = orpo_loss(c, r, nll, beta=0.1)
    close("orpo loss", loss, ref_loss)
    close("orpo rewards", torch.stack([cr, rr]), torch.stack([ref_cr, ref_rr]))
    for ours_key, trl_key in [
        ("log_odds_ratio",) * 2,
        ("log_odds_chosen",) * 2,
        ("nll", "nll_loss"),
    ]:
        close(f"orpo {ours_key}", stats[ours_key], metrics[trl_key])


# ---------------------------------------------------------------------------------------------
# KTO


def _kto_stub(beta, dw, uw, calculate_kl=True):
    from accelerate import Accelerator

    stub = types.SimpleNamespace(
        model=types.SimpleNamespace(training=True),
        accelerator=Accelerator(cpu=True),
        calculate_KL=calculate_kl,
        precompute_ref_logps=True,
        aux_loss_enabled=False,
        loss_type="kto",
        beta=beta,
        desirable_weight=dw,
        undesirable_weight=uw,
        _tp_size=1,
        _total_train_tokens=0,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
    )
    stub._compute_kl_logps = types.MethodType(trl.KTOTrainer._compute_kl_logps, stub)
    return stub


def _trl_kto(stub, labels, per_token, ref, kl_per_token, ref_kl):
    n, t = per_token.shape[0], per_token.shape[1] + 1
    batch = {
        "label": labels,
        "input_ids": torch.zeros(n, t, dtype=torch.long),
        "attention_mask": torch.ones(n, t, dtype=torch.long),
        "completion_mask": torch.ones(n, t, dtype=torch.long),
        "KL_input_ids": torch.ones(kl_per_token.shape[0], t, dtype=torch.long),
        "KL_attention_mask": torch.ones(kl_per_token.shape[0], t, dtype=torch.long),
        "KL_completion_mask": torch.ones(kl_per_token.shape[0], t, dtype=torch.long),
        "ref_logps": ref,
        "ref_KL_logps": ref_kl,
    }

    def pick(kw):  # KL rows are all ones, completion rows all zeros
        return kl_per_token if bool(kw["input_ids"].eq(1).all()) else per_token

    stub._metrics["train"].clear()
    loss = trl.KTOTrainer._compute_loss(stub, _StubLM(pick), batch, return_outputs=False)
    return loss, dict(stub._metrics["train"])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "kl_shift", [-10.0, 30.0]
)  # 30: the KL estimate is negative and clamps to 0
def test_kto_matches_trl(dtype, kl_shift):
    n, beta, dw, uw = 10, 0.1, 1.33, 0.7
    per_token, _ = _ragged(n, 7, 5, dtype)
    kl_per_token, _ = _ragged(n, 7, 6, dtype)
    g = torch.Generator().manual_seed(7)
    ref = -torch.rand(n, generator=g, dtype=torch.float64).mul(20).to(dtype)
    ref_kl = (-torch.rand(n, generator=g, dtype=torch.float64).mul(20) + kl_shift).to(dtype)
    labels = torch.tensor([1, 0, 0, 1, 1, 0, 1, 0, 0, 1], dtype=torch.bool)
    logps, kl_logps = per_token.sum(1), kl_per_token.sum(1)
    stub = _kto_stub(beta, dw, uw)
    losses, cr, rr, kl = kto_loss(
        logps[labels],
        logps[~labels],
        kl_logps,
        ref[labels],
        ref[~labels],
        ref_kl,
        beta=beta,
        desirable_weight=dw,
        undesirable_weight=uw,
    )
    ref_loss, m = _trl_kto(stub, labels, per_token, ref, kl_per_token, ref_kl)
    close("kto loss", losses.nanmean(), ref_loss)
    close("kto kl", kl, m["kl"][-1])
    close(
        "kto rewards (means)",
        torch.stack([cr.mean(), rr.mean()]),
        torch.tensor([m["rewards/chosen"][-1], m["rewards/rejected"][-1]]),
    )
    assert (kl == 0) == (kl_shift > 0)
    # per row: one completion against the same KL rows
    ch, rj = iter(range(len(cr))), iter(range(len(rr)))
    for i in range(n):
        loss_i, m_i = _trl_kto(
            stub, labels[i : i + 1], per_token[i : i + 1], ref[i : i + 1], kl_per_token, ref_kl
        )
        j = next(ch) if labels[i] else len(cr) + next(rj)
        close("kto loss", losses[j], loss_i)
        key, rewards = ("rewards/chosen", cr) if labels[i] else ("rewards/rejected", rr)
        close("kto rewards", rewards[j if labels[i] else j - len(cr)], m_i[key][-1])


def test_kto_kl_override_and_no_kl():
    """`kl=` (an all-reduced mean) replaces the local estimate, and is clamped like it."""
    c, r = torch.tensor([-3.0, -5.0]), torch.tensor([-4.0])
    rc, rr = torch.tensor([-4.0, -4.5]), torch.tensor([-3.5])
    kl_rows, ref_kl_rows = torch.tensor([-2.0, -6.0]), torch.tensor([-3.0, -3.0])  # mean 0.0 -> 0
    base = kto_loss(c, r, kl_rows, rc, rr, ref_kl_rows, beta=0.1)
    over = kto_loss(c, r, kl_rows, rc, rr, ref_kl_rows, beta=0.1, kl=torch.tensor(2.5))
    assert base[3].item() == 0.0 and over[3].item() == 2.5
    assert not torch.allclose(base[0], over[0])
    same = kto_loss(c, r, torch.tensor([0.5]), rc, rr, torch.tensor([-2.0]), beta=0.1)
    close("kto kl override", over[0], same[0])


@pytest.mark.parametrize("dtype", DTYPES)
def test_kto_without_kl_rows_matches_trl(dtype):
    """TRL's calculate_KL=False: the reference point is 0; ours when kl_logps is None."""
    n = 6
    per_token, _ = _ragged(n, 5, 8, dtype)
    ref = (
        -torch.rand(n, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
        .mul(9)
        .to(dtype)
    )
    labels = torch.tensor([1, 0, 1, 1, 0, 0], dtype=torch.bool)
    logps = per_token.sum(1)
    ref_loss, m = _trl_kto(
        _kto_stub(0.1, 1.0, 1.0, calculate_kl=False), labels, per_token, ref, per_token, ref
    )
    losses, _, _, kl = kto_loss(
        logps[labels], logps[~labels], None, ref[labels], ref[~labels], None, beta=0.1
    )
    close("kto no-KL loss", losses.nanmean(), ref_loss)
    close("kto no-KL kl", kl, m["kl"][-1])


# ---------------------------------------------------------------------------------------------
# Reward model


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_margin", [False, True])
@pytest.mark.parametrize("center", [None, 0.01])
def test_bradley_terry_matches_trl_reward_trainer(dtype, with_margin, center):
    from accelerate import Accelerator

    g = torch.Generator().manual_seed(11)
    c, r, margin = (
        torch.randn(12, generator=g, dtype=torch.float64).mul(2).to(dtype) for _ in range(3)
    )
    stub = types.SimpleNamespace(
        model=types.SimpleNamespace(training=True),
        accelerator=Accelerator(cpu=True),
        _tp_size=1,
        _total_train_tokens=0,
        _metrics={"train": defaultdict(list)},
        args=types.SimpleNamespace(center_rewards_coefficient=center),
    )
    inputs = {
        "input_ids": torch.zeros(24, 3, dtype=torch.long),
        "attention_mask": torch.ones(24, 3),
    }
    if with_margin:
        inputs["margin"] = margin

    def scorer(**kw):
        return types.SimpleNamespace(logits=torch.cat([c, r]).unsqueeze(-1))

    ref = trl.RewardTrainer.compute_loss(stub, scorer, inputs)
    ours = bradley_terry_loss(
        c, r, margin if with_margin else None, center_rewards_coefficient=center
    )
    close(f"bradley-terry margin={with_margin} center={center}", ours, ref)


# ---------------------------------------------------------------------------------------------
# GRPO and RLOO


def _rewards_tensor():
    return torch.tensor([float("nan") if x is None else x for x in REWARDS], dtype=torch.float32)


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_group_advantages_match_trl_grpo(rl_trainers, scale):
    grpo, _ = rl_trainers
    grpo.scale_rewards, grpo.beta = scale, 0.0
    out = grpo._generate_and_score_completions(list(PROMPTS))
    ours = group_advantages(_rewards_tensor(), G, scale=scale)
    close(f"grpo advantages scale={scale}", ours, out["advantages"])
    assert ours[4:8].abs().max() == 0 and ours[9] == 0  # equal rewards; the unscorable one


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("kl_beta", [0.0, 0.05])
def test_rloo_advantages_match_trl(rl_trainers, normalize, kl_beta):
    _, rloo = rl_trainers
    rloo.normalize_advantages, rloo.beta = normalize, kl_beta
    n, t = len(PROMPTS), 6
    old, _ = _ragged(n, t, 21, torch.float32)
    ref, _ = _ragged(n, t, 22, torch.float32)
    # fixed policy (first call) and reference (second call) per-token log-probs
    rloo.ref_model = rloo.model if kl_beta else None  # any model: the stub ignores it
    calls = []

    def fixed(model, input_ids, attention_mask, logits_to_keep, *args, **kwargs):
        calls.append(model)
        return (old, ref)[len(calls) - 1][:, :logits_to_keep], None, None

    rloo._get_per_token_logps_and_entropies = fixed
    try:
        out = rloo._generate_and_score_completions(list(PROMPTS))
    finally:
        del rloo._get_per_token_logps_and_entropies
        rloo.ref_model = None
    assert len(calls) == (2 if kl_beta else 1)
    mask = out["completion_mask"].float()
    t_out = mask.shape[1]
    seq_kl = ((old[:, :t_out] - ref[:, :t_out]) * mask).sum(-1)
    ours = rloo_advantages(
        _rewards_tensor(), G, normalize=normalize, seq_kl=seq_kl, kl_beta=kl_beta
    )
    close(f"rloo advantages normalize={normalize} beta={kl_beta}", ours, out["advantages"])
    close("rloo old_logps", (old[:, :t_out] * mask).sum(-1), out["old_logps"])


def _policy_batch(dtype, seed=31):
    n, t = 8, 7
    logps, mask = _ragged(n, t, seed, dtype)
    mask[-1] = 0  # an empty completion (e.g. truncated away)
    logps = logps * mask
    g = torch.Generator().manual_seed(seed + 1)
    # drifts up to +-0.5 so that the ratio clips on both sides
    old = logps + (torch.rand(n, t, generator=g, dtype=torch.float64) - 0.5).to(dtype)
    ref = logps + (torch.rand(n, t, generator=g, dtype=torch.float64) - 0.5).to(dtype)
    adv = torch.randn(n, generator=g, dtype=torch.float64).to(dtype)
    return logps, old * mask, ref * mask, adv, mask


def _grad_of(fn, logps):
    x = logps.clone().requires_grad_(True)
    loss = fn(x)
    (grad,) = torch.autograd.grad(loss, x)
    return loss.detach(), grad


GRPO_CASES = [
    (lt, beta, eps_high, old, bias)
    for lt in ("grpo", "dr_grpo", "dapo")
    for beta, bias in ((0.0, True), (0.04, True), (0.04, False))
    for eps_high in (None, 0.28)
    for old in (True, False)
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("loss_type,kl_beta,eps_high,with_old,bias", GRPO_CASES)
def test_policy_loss_matches_trl_grpo(
    rl_trainers, dtype, loss_type, kl_beta, eps_high, with_old, bias
):
    grpo, _ = rl_trainers
    logps, old, ref, adv, mask = _policy_batch(dtype)
    assert (mask.sum(1) == 0).any(), "an empty completion must be in the batch"
    n, t = logps.shape
    grpo.loss_type, grpo.beta, grpo.max_completion_length = loss_type, kl_beta, 10
    grpo.epsilon_low, grpo.epsilon_high = 0.2, 0.2 if eps_high is None else eps_high
    grpo.args.use_bias_correction_kl = bias
    inputs = {
        "prompt_ids": torch.zeros(n, 2, dtype=torch.long),
        "prompt_mask": torch.ones(n, 2, dtype=torch.long),
        "completion_ids": torch.zeros(n, t, dtype=torch.long),
        "completion_mask": mask,
        "advantages": adv,
        "num_items_in_batch": mask.sum(),
        "ref_per_token_logps": ref,
    }
    if with_old:
        inputs["old_per_token_logps"] = old

    def trl_loss(x):
        grpo._get_per_token_logps_and_entropies = lambda *a, **k: (x, torch.zeros_like(x), None)
        grpo._metrics["train"].clear()
        try:
            return grpo._compute_loss(grpo.model, inputs)
        finally:
            del grpo._get_per_token_logps_and_entropies

    ref_loss, ref_grad = _grad_of(trl_loss, logps)
    m = dict(grpo._metrics["train"])

    def our_loss(x):
        loss, our_loss.stats = policy_loss(
            x,
            old if with_old else None,
            adv,
            mask,
            loss_type=loss_type,
            epsilon_low=0.2,
            epsilon_high=eps_high,
            ref_logps=ref,
            kl_beta=kl_beta,
            max_completion_length=10,
            kl_bias_correction=bias,
        )
        return loss

    loss, grad = _grad_of(our_loss, logps)
    name = (
        f"grpo loss {loss_type}"
        + (f" +kl(bias={bias})" if kl_beta else "")
        + (" eps_high" if eps_high else "")
    )
    close(name, loss, ref_loss)
    close(name + " grad", grad, ref_grad)
    stats = our_loss.stats
    close("grpo clip_ratio", stats["clip_ratio"], m["clip_ratio/region_mean"][-1])
    close(
        "grpo clip_ratio low/high",
        torch.stack([stats["clip_ratio/low_mean"], stats["clip_ratio/high_mean"]]),
        torch.tensor([m["clip_ratio/low_mean"][-1], m["clip_ratio/high_mean"][-1]]),
    )
    if kl_beta:
        close("grpo kl", stats["kl"], m["kl"][-1])
    if with_old:
        assert stats["clip_ratio"] > 0, (
            "the batch must clip somewhere for the test to mean anything"
        )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("eps_high", [None, 0.28])
def test_policy_loss_rloo_matches_trl(rl_trainers, dtype, eps_high):
    _, rloo = rl_trainers
    logps, old, _, adv, mask = _policy_batch(dtype, seed=41)
    old = (
        logps + (old - logps) * 0.2
    )  # summed ratios: keep them near 1 so some clip and some do not
    n, t = logps.shape
    rloo.epsilon_low, rloo.epsilon_high = 0.2, 0.2 if eps_high is None else eps_high
    inputs = {
        "prompt_ids": torch.zeros(n, 2, dtype=torch.long),
        "prompt_mask": torch.ones(n, 2, dtype=torch.long),
        "completion_ids": torch.zeros(n, t, dtype=torch.long),
        "completion_mask": mask,
        "advantages": adv,
        "old_logps": (old * mask).sum(1),
    }

    def trl_loss(x):
        rloo._get_per_token_logps_and_entropies = lambda *a, **k: (x, torch.zeros_like(x), None)
        rloo._metrics["train"].clear()
        try:
            return rloo._compute_loss(rloo.model, inputs)
        finally:
            del rloo._get_per_token_logps_and_entropies

    ref_loss, ref_grad = _grad_of(trl_loss, logps)
    m = dict(rloo._metrics["train"])

    def our_loss(x):
        loss, our_loss.stats = policy_loss(
            x, old, adv, mask, loss_type="rloo", epsilon_low=0.2, epsilon_high=eps_high
        )
        return loss

    loss, grad = _grad_of(our_loss, logps)
    close("rloo loss", loss, ref_loss)
    close("rloo loss grad", grad, ref_grad)
    close("rloo clip_ratio", our_loss.stats["clip_ratio"], m["clip_ratio/region_mean"][-1])
    assert 0 < our_loss.stats["clip_ratio"] < 1


def test_policy_loss_bad_arguments():
    x, mask, adv = torch.zeros(2, 3), torch.ones(2, 3), torch.zeros(2)
    with pytest.raises(ValueError, match="max_completion_length"):
        policy_loss(x, None, adv, mask, loss_type="dr_grpo")
    with pytest.raises(ValueError, match="ref_logps"):
        policy_loss(x, None, adv, mask, kl_beta=0.1)
    with pytest.raises(ValueError, match="reward"):
        policy_loss(x, None, adv, mask, loss_type="rloo", kl_beta=0.1)
    with pytest.raises(ValueError, match="num_generations"):
        group_advantages(torch.zeros(5), 2)
    # dapo with a global token count (accumulation / ranks) divides by it instead
    loss, _ = policy_loss(x - 1, None, adv + 1, mask, loss_type="dapo", num_items=12)
    close("dapo num_items", loss, torch.tensor(-6 / 12))
