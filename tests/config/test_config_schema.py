"""The schema documents itself, presets keep their promises, cross-field rules explain."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from plinth.config.load import leaf_fields, sections
from plinth.config.presets import PRESETS
from plinth.config.schema import Config, ModelConfig, OptimConfig


def test_every_field_and_section_is_documented():
    undocumented = [k for k, info in leaf_fields() if len((info.description or "").strip()) < 40]
    assert undocumented == [], f"fields without a real docstring: {undocumented}"
    short_sections = [k for k, cls in sections() if len((cls.__doc__ or "").strip()) < 20]
    assert short_sections == []


def test_schema_covers_the_options_users_tune():
    keys = {k for k, _ in leaf_fields()}
    expected = {
        "model.arch",
        "model.n_layers",
        "model.d_model",
        "model.n_heads",
        "model.n_kv_heads",
        "model.d_ff",
        "model.activation",
        "model.norm",
        "model.positional",
        "model.rope_theta",
        "model.dropout",
        "model.tie_embeddings",
        "model.qk_norm",
        "model.norm_position",
        "model.type_vocab_size",
        "model.vocab_size",
        "model.max_seq_len",
        "pretrain.objective",
        "pretrain.mask_ratio",
        "data.sources",
        "pretrain.max_steps",
        "pretrain.max_tokens",
        "pretrain.max_epochs",
        "finetune.method",
        "finetune.rank",
        "finetune.alpha",
        "finetune.lora_dropout",
        "finetune.target_modules",
        "finetune.freeze_layers",
        "finetune.task",
        "finetune.num_labels",
        "finetune.epochs",
        "optim.name",
        "optim.lr",
        "optim.betas",
        "optim.eps",
        "optim.weight_decay",
        "optim.schedule",
        "optim.warmup_steps",
        "optim.min_lr_ratio",
        "optim.grad_clip",
        "optim.global_batch",
        "optim.batch_unit",
        "optim.micro_batch",
        "optim.z_loss",
        "optim.early_stop.metric",
        "optim.early_stop.patience",
        "seed",
        "hardware.device",
        "hardware.precision",
        "hardware.activation_checkpointing",
        "hardware.compile",
        "hardware.num_workers",
        "distributed.strategy",
        "distributed.shard_size",
        "distributed.param_dtype",
        "distributed.reduce_dtype",
        "distributed.reshard_after_forward",
        "distributed.bucket_mb",
        "distributed.backend",
        "distributed.timeout_s",
        "inference.temperature",
        "inference.top_k",
        "inference.top_p",
        "inference.repetition_penalty",
        "inference.beam_width",
        "inference.max_new_tokens",
        "inference.batch_size",
        "inference.stop",
        "compress.quantization",
        "compress.pruning",
        "compress.distill_teacher",
        "tracking.run_name",
        "tracking.output_dir",
        "tracking.log_every",
        "tracking.eval_every",
        "tracking.checkpoint_every",
        "tracking.sample_every",
        "tracking.sinks",
    }
    assert expected - keys == set()


def test_defaults_validate_and_build_a_small_model():
    cfg = Config()
    assert cfg.objective == "clm"
    assert 1e6 < cfg.model.param_count() < 20e6


@pytest.mark.parametrize("name", [n for n, p in PRESETS.items() if p.nominal_params])
def test_presets_match_the_parameter_count_their_names_promise(name):
    preset = PRESETS[name]
    fields = {k.split(".", 1)[1]: v for k, v in preset.values.items() if k.startswith("model.")}
    n = ModelConfig(**fields).param_count()
    assert abs(n - preset.nominal_params) / preset.nominal_params < 0.10, n


def test_well_known_shapes_count_like_their_checkpoints():
    # GPT-2 small: 124,439,808 parameters (learned positions, biases, layernorm, tied)
    gpt2 = ModelConfig(
        n_layers=12,
        d_model=768,
        n_heads=12,
        activation="gelu",
        norm="layernorm",
        positional="learned",
        bias=True,
        tie_embeddings=True,
        vocab_size=50257,
        max_seq_len=1024,
    )
    assert gpt2.param_count() == 124_439_808
    # Llama-2-7B: 6,738,415,616 parameters
    llama = ModelConfig(n_layers=32, d_model=4096, n_heads=32, d_ff=11008, vocab_size=32000)
    assert llama.param_count() == 6_738_415_616
    # BERT-base (BertModel without its pooler): 108,891,648 (post-norm, token types, tied head)
    bert = ModelConfig(arch="encoder", n_layers=12, d_model=768, n_heads=12, activation="gelu",
                       norm="layernorm", norm_position="post", positional="learned", bias=True,
                       type_vocab_size=2, tie_embeddings=True, vocab_size=30522, max_seq_len=512)
    assert bert.param_count() == 108_891_648


@pytest.mark.parametrize(
    ("fields", "needle"),
    [
        ({"d_model": 256, "n_heads": 5}, "n_heads (5) must divide d_model (256)"),
        ({"n_heads": 4, "n_kv_heads": 3}, "n_kv_heads (3) must divide n_heads (4)"),
        ({"d_model": 30, "n_heads": 2}, "rope needs an even head_dim"),
        ({"arch": "encoder_decoder", "norm_position": "post"}, "norm_position=post is implemented"),
        ({"type_vocab_size": 2}, "type_vocab_size=2 needs arch=encoder"),
    ],
)
def test_cross_field_rules_explain_the_fix(fields, needle):
    with pytest.raises(ValidationError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        ModelConfig(**fields)


def test_objective_follows_arch_unless_set_against_it():
    assert Config(model={"arch": "encoder"}).objective == "mlm"
    assert Config(model={"arch": "encoder_decoder"}).objective == "span"
    with pytest.raises(ValidationError, match=r"does not fit model\.arch=encoder"):
        Config(model={"arch": "encoder"}, pretrain={"objective": "clm"})


def test_batch_accumulation_is_derived_and_checked():
    o = OptimConfig(global_batch=64, micro_batch=8)
    assert o.accum_steps(seq_len=256) == 8
    assert o.accum_steps(seq_len=256, world_size=2) == 4
    t = OptimConfig(global_batch=16384, batch_unit="tokens", micro_batch=8)
    assert t.sequences_per_step(256) == 64 and t.accum_steps(256, 4) == 2
    with pytest.raises(ValueError, match="not a multiple of micro_batch"):
        OptimConfig(global_batch=20, micro_batch=8).accum_steps(256)
    with pytest.raises(ValueError, match="not a multiple of the sequence length"):
        OptimConfig(global_batch=1000, batch_unit="tokens").sequences_per_step(256)


def test_unknown_fields_are_rejected_by_every_section():
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        Config(optim={"lrr": 1})
