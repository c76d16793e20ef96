"""plinth task heads as transformers models: copied by `plinth export` next to an exported
classification/regression head (plinth never imports this file; transformers does).

    from transformers import AutoModelForSequenceClassification
    model = AutoModelForSequenceClassification.from_pretrained(OUT, trust_remote_code=True)

A plinth head is a linear layer (with bias) on a pooled hidden state: the mean over real tokens
(`plinth_pooling: mean`, what sentence encoders such as all-MiniLM are trained for), the first
token (`cls`) or the last real token (`last`). transformers' own *ForSequenceClassification
classes pool differently (BERT: a tanh pooler over [CLS]; Llama, GPT-2: no bias), so they cannot
hold these weights exactly. The classes below are those base models (BertModel, LlamaModel,
GPT2Model, ...; weights under their usual `bert.` / `model.` / `transformer.` names) plus
plinth's pooling and the head (`classifier` for BERT, `score` for decoders, as transformers
names them). The model types are `plinth_<type>`, so loading without trust_remote_code fails
loudly instead of silently building transformers' own head with random weights.

Inputs are padded on the right (the attention mask marks the real tokens).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import (
    BertConfig,
    BertModel,
    BertPreTrainedModel,
    GPT2Config,
    GPT2Model,
    GPT2PreTrainedModel,
    LlamaConfig,
    LlamaModel,
    LlamaPreTrainedModel,
    MistralConfig,
    MistralModel,
    MistralPreTrainedModel,
    Qwen2Config,
    Qwen2Model,
    Qwen2PreTrainedModel,
)
from transformers.modeling_outputs import SequenceClassifierOutput

try:
    from transformers import Qwen3Config, Qwen3Model, Qwen3PreTrainedModel
except ImportError:  # transformers before 4.51 has no Qwen3 (and no plinth_qwen3 export)
    Qwen3Config = Qwen3Model = Qwen3PreTrainedModel = None


def plinth_pool(h: torch.Tensor, attention_mask: torch.Tensor, how: str) -> torch.Tensor:
    """(B, T, D) -> (B, D) as plinth.models.heads.pool does."""
    if how == "cls":
        return h[:, 0]
    if how == "last":
        positions = torch.arange(h.shape[1], device=h.device)
        last = (positions * attention_mask.to(positions.dtype)).argmax(dim=1)
        return h[torch.arange(h.shape[0], device=h.device), last]
    m = attention_mask.to(h.dtype).unsqueeze(-1)
    return (h * m).sum(dim=1) / m.sum(dim=1).clamp(min=1)


class _PlinthHead:
    """forward shared by every family: base model -> plinth pooling -> linear head."""

    head_name = "score"
    token_types = False  # the base model takes token_type_ids (BERT)

    def _make_head(self, config) -> None:
        self.num_labels = config.num_labels
        setattr(self, self.head_name, nn.Linear(config.hidden_size, config.num_labels))

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None,
                position_ids=None, inputs_embeds=None, labels=None, output_attentions=None,
                output_hidden_states=None, return_dict=None, **kwargs):
        shape = input_ids.shape if input_ids is not None else inputs_embeds.shape[:2]
        device = input_ids.device if input_ids is not None else inputs_embeds.device
        if attention_mask is None:
            attention_mask = torch.ones(shape, dtype=torch.long, device=device)
        extra = {"token_type_ids": token_type_ids} if self.token_types else {"use_cache": False}
        out = getattr(self, self.base_model_prefix)(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
            inputs_embeds=inputs_embeds, output_attentions=output_attentions,
            output_hidden_states=output_hidden_states, return_dict=True, **extra,
        )
        pooled = plinth_pool(out.last_hidden_state, attention_mask, self.config.plinth_pooling)
        logits = getattr(self, self.head_name)(pooled)
        loss = None if labels is None else self._loss(logits, labels)
        if return_dict is False:
            rest = (logits, out.hidden_states, out.attentions)
            return ((loss,) if loss is not None else ()) + tuple(x for x in rest if x is not None)
        return SequenceClassifierOutput(loss=loss, logits=logits,
                                        hidden_states=out.hidden_states,
                                        attentions=out.attentions)

    def _loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        kind = self.config.problem_type
        if kind == "regression":
            target = labels.to(logits.dtype)
            if self.num_labels == 1:
                return nn.functional.mse_loss(logits.squeeze(-1), target.view(-1))
            return nn.functional.mse_loss(logits, target)
        if kind == "multi_label_classification":
            return nn.functional.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))
        return nn.functional.cross_entropy(logits.view(-1, self.num_labels), labels.view(-1))


# ------------------------------------------------------------------------------------- BERT

class PlinthBertConfig(BertConfig):
    model_type = "plinth_bert"


class PlinthBertForSequenceClassification(_PlinthHead, BertPreTrainedModel):
    config_class = PlinthBertConfig
    head_name = "classifier"
    token_types = True

    def __init__(self, config):
        super().__init__(config)
        self.bert = BertModel(config, add_pooling_layer=False)
        self._make_head(config)
        self.post_init()


# ------------------------------------------------------------------------- decoder families

class PlinthLlamaConfig(LlamaConfig):
    model_type = "plinth_llama"


class PlinthLlamaForSequenceClassification(_PlinthHead, LlamaPreTrainedModel):
    config_class = PlinthLlamaConfig

    def __init__(self, config):
        super().__init__(config)
        self.model = LlamaModel(config)
        self._make_head(config)
        self.post_init()


class PlinthMistralConfig(MistralConfig):
    model_type = "plinth_mistral"


class PlinthMistralForSequenceClassification(_PlinthHead, MistralPreTrainedModel):
    config_class = PlinthMistralConfig

    def __init__(self, config):
        super().__init__(config)
        self.model = MistralModel(config)
        self._make_head(config)
        self.post_init()


class PlinthQwen2Config(Qwen2Config):
    model_type = "plinth_qwen2"


class PlinthQwen2ForSequenceClassification(_PlinthHead, Qwen2PreTrainedModel):
    config_class = PlinthQwen2Config

    def __init__(self, config):
        super().__init__(config)
        self.model = Qwen2Model(config)
        self._make_head(config)
        self.post_init()


if Qwen3Config is not None:

    class PlinthQwen3Config(Qwen3Config):
        model_type = "plinth_qwen3"

    class PlinthQwen3ForSequenceClassification(_PlinthHead, Qwen3PreTrainedModel):
        config_class = PlinthQwen3Config

        def __init__(self, config):
            super().__init__(config)
            self.model = Qwen3Model(config)
            self._make_head(config)
            self.post_init()


class PlinthGPT2Config(GPT2Config):
    model_type = "plinth_gpt2"


class PlinthGPT2ForSequenceClassification(_PlinthHead, GPT2PreTrainedModel):
    config_class = PlinthGPT2Config

    def __init__(self, config):
        super().__init__(config)
        self.transformer = GPT2Model(config)
        self._make_head(config)
        self.post_init()
