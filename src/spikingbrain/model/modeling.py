"""SpikingBrain hybrid causal language model (Hugging Face ``PreTrainedModel``)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from ..ops import rotary_cos_sin, rotary_inv_freq
from .cache import SpikingBrainCache
from .checkpoint import CheckpointError, check_state_dict, read_config, read_shapes
from .config import SpikingBrainConfig
from .layers import RMSNorm, SwiGLU
from .mixers import GatedLinearAttention, MixerInputs, build_mixer

__all__ = ["HybridBlock", "SpikingBrainModel", "SpikingBrainForCausalLM", "SpikingBrainPreTrainedModel"]


class HybridBlock(nn.Module):
    """Pre-norm block: ``x + attn(attn_norm(x))`` then ``+ mlp(mlp_norm(.))``."""

    def __init__(self, config: SpikingBrainConfig, layer_idx: int):
        super().__init__()
        self.mixer_type = config.layer_mixers[layer_idx]
        self.attn_norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.attn = build_mixer(config, self.mixer_type)
        self.mlp_norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mlp = SwiGLU(config.hidden_size, config.intermediate_size)

    def forward(self, x: torch.Tensor, inputs: MixerInputs, cache) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), inputs, cache)
        return x + self.mlp(self.mlp_norm(x))


class SpikingBrainPreTrainedModel(PreTrainedModel):
    """Weight initialisation and Hugging Face plumbing shared by SpikingBrain models."""

    config_class = SpikingBrainConfig
    base_model_prefix = "model"
    _input_embed_layer = "embeddings"  # the release's name (transformers' accessors look it up)
    supports_gradient_checkpointing = True
    _no_split_modules = ["HybridBlock"]

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, strict: bool = True, **kwargs):
        """Load like transformers, but from safetensors only, and (``strict``) fail on any weight mismatch."""
        folder = Path(pretrained_model_name_or_path)
        if folder.is_dir():
            read_config(folder)
            shapes = read_shapes(folder)
            if strict:
                config = kwargs.get("config") or cls.config_class.from_pretrained(folder)
                with torch.device("meta"):
                    expected = {n: p.shape for n, p in cls(config).state_dict().items()}
                tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
                check_state_dict(str(folder), {n: shapes[n] for n in set(shapes) - tied}, expected, allowed_missing=tied)
        kwargs["use_safetensors"] = True
        want_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(pretrained_model_name_or_path, *args, output_loading_info=True, **kwargs)
        if strict:
            problems = {k: sorted(map(str, info.get(k) or ())) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
            problems = {k: v for k, v in problems.items() if v}
            if problems or info.get("error_msgs"):
                raise CheckpointError(
                    f"{pretrained_model_name_or_path}: weights do not match config.json: {problems or info['error_msgs']}; "
                    "check that config.json belongs to these weights, or pass strict=False to initialise what is missing"
                )
        return (model, info) if want_info else model

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, GatedLinearAttention):
            # New gate parameters as in the SpikingBrain release: xavier-uniform with gain 2^-2.5, zero bias.
            for linear in module.gk_proj:
                init.xavier_uniform_(linear.weight, gain=2**-2.5)
                if linear.bias is not None:
                    init.zeros_(linear.bias)


def _positions(attention_mask: torch.Tensor | None, past: int, length: int, batch: int, device) -> torch.Tensor:
    """Rotary positions of the new tokens: counted over real tokens when a padding mask is given."""
    if attention_mask is None:
        return torch.arange(past, past + length, device=device).expand(batch, length)
    positions = attention_mask.long().cumsum(-1) - 1
    return positions[:, -length:].clamp(min=0)


def _key_mask(attention_mask: torch.Tensor | None, total: int) -> torch.Tensor | None:
    """Boolean mask over all ``total`` positions (past + new), or None when nothing is padded."""
    if attention_mask is None or bool(attention_mask.all()):
        return None
    mask = attention_mask.bool()
    if mask.shape[1] < total:  # a mask that covers only the new tokens: the past was not padded
        mask = torch.cat((mask.new_ones(mask.shape[0], total - mask.shape[1]), mask), dim=1)
    return mask[:, mask.shape[1] - total :]


class SpikingBrainModel(SpikingBrainPreTrainedModel):
    """Embeddings, hybrid blocks and the final norm."""

    def __init__(self, config: SpikingBrainConfig):
        super().__init__(config)
        self.embeddings = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(HybridBlock(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.gradient_checkpointing = False
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: SpikingBrainCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        x = self.embeddings(input_ids) if inputs_embeds is None else inputs_embeds
        B, T = x.shape[:2]
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None:
            cache = SpikingBrainCache.for_config(self.config)
        past = 0 if cache is None else cache.seen_tokens
        limit = self.config.max_sequence_length
        if limit is not None and past + T > limit:
            raise ValueError(
                f"sequence of {past + T} tokens exceeds max_sequence_length={limit} in the model config; "
                "shorten the input or raise max_sequence_length (null = unlimited)"
            )
        if position_ids is None:
            position_ids = _positions(attention_mask, past, T, B, x.device)
        cos, sin = rotary_cos_sin(position_ids, rotary_inv_freq(self.config.head_dim, self.config.rope_theta, x.device))
        inputs = MixerInputs(cos=cos.to(x.dtype), sin=sin.to(x.dtype), key_mask=_key_mask(attention_mask, past + T))
        for i, layer in enumerate(self.layers):
            layer_cache = None if cache is None else cache.layers[i]
            if self.gradient_checkpointing and self.training:
                x = self._gradient_checkpointing_func(layer.__call__, x, inputs, layer_cache)
            else:
                x = layer(x, inputs, layer_cache)
        if cache is not None:
            cache.seen_tokens += T
        return BaseModelOutputWithPast(last_hidden_state=self.norm(x), cache=cache if use_cache else None)


class SpikingBrainForCausalLM(SpikingBrainPreTrainedModel, GenerationMixin):
    """SpikingBrain language model with streaming prefill and ``generate()`` support."""

    _tied_weights_keys = {"lm_head.weight": "model.embeddings.weight"}

    def __init__(self, config: SpikingBrainConfig):
        super().__init__(config)
        self.model = SpikingBrainModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the model builds its own SpikingBrainCache

    def save_pretrained(self, save_directory, *args, official_format: bool = False, **kwargs):
        """Save in our format, or (``official_format=True``) in the released SpikingBrain-7B layout."""
        if official_format:
            from .official import save_official  # official.py builds on this module

            return save_official(self, save_directory, max_shard_size=kwargs.get("max_shard_size", "5GB"))
        return super().save_pretrained(save_directory, *args, **kwargs)

    def new_cache(self) -> SpikingBrainCache:
        """An empty inference cache for this model."""
        return SpikingBrainCache.for_config(self.config)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: SpikingBrainCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        past_key_values: SpikingBrainCache | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """Logits (and loss with ``labels``); long inputs stream through the cache in inference mode."""
        cache = past_key_values if cache is None else cache
        use_cache = self.config.use_cache if use_cache is None else use_cache
        inputs = input_ids if input_ids is not None else inputs_embeds
        T = 0 if inputs is None else inputs.shape[1]
        if not torch.is_grad_enabled() and T > self.config.streaming_chunk_size:
            hidden, cache = self._streaming_prefill(
                input_ids, inputs_embeds, attention_mask, position_ids, cache, logits_to_keep, labels is not None
            )
        else:
            out = self.model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                cache=cache,
                inputs_embeds=inputs_embeds,
                use_cache=use_cache,
            )
            hidden, cache = out.last_hidden_state, out.cache
            if logits_to_keep and labels is None:
                hidden = hidden[:, -logits_to_keep:]
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=cache if use_cache else None)

    def _streaming_prefill(self, input_ids, inputs_embeds, attention_mask, position_ids, cache, logits_to_keep, keep_all):
        """Run a long input chunk by chunk through the cache, keeping only the hidden states asked for."""
        if cache is None:
            cache = self.new_cache()
        source = input_ids if input_ids is not None else inputs_embeds
        B, T = source.shape[:2]
        past = cache.seen_tokens
        if attention_mask is not None and attention_mask.shape[1] < past + T:
            attention_mask = torch.cat(
                (attention_mask.new_ones(B, past + T - attention_mask.shape[1]), attention_mask), dim=1
            )
        first_kept = 0 if (keep_all or not logits_to_keep) else T - logits_to_keep
        kept = []
        step = self.config.streaming_chunk_size
        for start in range(0, T, step):
            end = min(T, start + step)
            out = self.model(
                input_ids=None if input_ids is None else input_ids[:, start:end],
                inputs_embeds=None if inputs_embeds is None else inputs_embeds[:, start:end],
                attention_mask=None if attention_mask is None else attention_mask[:, : past + end],
                position_ids=None if position_ids is None else position_ids[:, start:end],
                cache=cache,
                use_cache=True,
            )
            if end > first_kept:
                kept.append(out.last_hidden_state[:, max(0, first_kept - start) :])
        return torch.cat(kept, dim=1), cache
