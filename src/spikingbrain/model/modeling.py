"""SpikingBrain hybrid causal language model (Hugging Face ``PreTrainedModel``).

Importing this module registers ``model_type: spikingbrain`` with transformers' Auto classes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from ..ops import rotary_cos_sin, rotary_inv_freq
from ..ops.threads import small_ops_on_one_thread
from ..spiking.apply import spikify
from ..spiking.int8 import prepare_int8_layers
from .cache import RowCaches, SpikingBrainCache
from .checkpoint import CheckpointError, check_state_dict, read_config, read_shapes
from .config import SpikingBrainConfig
from .layers import RMSNorm, SwiGLU
from .mixers import GatedLinearAttention, MixerInputs, ParallelHybridAttention, SoftmaxAttention, build_mixer
from .moe import MoEFeedForward, RouterStats, load_balancing_loss
from .official_format import save_official
from .packed import PackedLinears, packing_available

__all__ = [
    "HybridBlock",
    "SpikingBrainModel",
    "SpikingBrainForCausalLM",
    "SpikingBrainPreTrainedModel",
    "SpikingBrainModelOutput",
    "SpikingBrainCausalLMOutput",
]


@dataclass
class SpikingBrainModelOutput(BaseModelOutputWithPast):
    """Base-model output plus the router statistics of every MoE layer (in layer order; None without MoE)."""

    router_stats: list[RouterStats] | None = None


@dataclass
class SpikingBrainCausalLMOutput(CausalLMOutputWithPast):
    """Causal-LM output plus the load-balancing loss (mean over MoE layers) and the router statistics
    of every MoE layer (in the order of ``config.moe_layers``, summed over streamed chunks)."""

    aux_loss: torch.Tensor | None = None
    router_stats: list[RouterStats] | None = None


class HybridBlock(nn.Module):
    """Pre-norm block: ``x + attn(attn_norm(x))`` then ``+ mlp(mlp_norm(.))`` (a SwiGLU or an MoE)."""

    def __init__(self, config: SpikingBrainConfig, layer_idx: int):
        super().__init__()
        self.mixer_type = config.layer_mixers[layer_idx]
        self.attn_norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.attn = build_mixer(config, self.mixer_type)
        self.mlp_norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.is_moe = layer_idx in config.moe_layers
        self.mlp = MoEFeedForward(config) if self.is_moe else SwiGLU(config.hidden_size, config.intermediate_size)

    def forward(self, x: torch.Tensor, inputs: MixerInputs, cache) -> tuple[torch.Tensor, RouterStats | None]:
        """The block's output and, for an MoE block, its router statistics."""
        x = x + self.attn(self.attn_norm(x), inputs, cache)
        if not self.is_moe:
            return x + self.mlp(self.mlp_norm(x)), None
        if isinstance(cache, RowCaches):  # experts see each row alone: their batch would depend on the neighbours' routing
            return x + torch.cat([self.mlp(self.mlp_norm(x[i : i + 1]))[0] for i in range(x.shape[0])]), None
        y, stats = self.mlp(self.mlp_norm(x), inputs.mask_of_last(x.shape[1]))
        return x + y, stats


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
        if isinstance(module, GatedLinearAttention) and module.delta:  # write strength sigmoid(0) = 1/2 to start
            init.zeros_(module.beta_proj.weight)
            init.zeros_(module.beta_proj.bias)
        if isinstance(module, GatedLinearAttention) and not module.key_tied:
            # New gate parameters as in the SpikingBrain release: xavier-uniform with gain 2^-2.5, zero bias.
            for linear in (m for m in module.gk_proj.modules() if isinstance(m, nn.Linear)):
                init.xavier_uniform_(linear.weight, gain=2**-2.5)
                if linear.bias is not None:
                    init.zeros_(linear.bias)
        elif isinstance(module, SoftmaxAttention) and module.sinks is not None:
            init.normal_(module.sinks, mean=0.0, std=self.config.initializer_range)
        elif isinstance(module, ParallelHybridAttention) and module.combine == "learned":
            init.constant_(module.branch_weights, 0.5)
        elif isinstance(module, ParallelHybridAttention) and module.combine == "residual":
            init.zeros_(module.linear_weights)


def _mask_over(attention_mask: torch.Tensor | None, total: int) -> torch.Tensor | None:
    """The 2-D mask over all ``total`` positions (past + new): a mask that covers only the
    newest positions is extended with ones on the left (the cached past was not padded)."""
    if attention_mask is None or attention_mask.shape[1] == total:
        return attention_mask
    if attention_mask.shape[1] > total:
        return attention_mask[:, attention_mask.shape[1] - total :]
    ones = attention_mask.new_ones(attention_mask.shape[0], total - attention_mask.shape[1])
    return torch.cat((ones, attention_mask), dim=1)


def _positions(mask: torch.Tensor | None, past: int, length: int, batch: int, device) -> torch.Tensor:
    """Rotary positions of the new tokens: counted over real tokens when a padding mask is given."""
    if mask is None:
        return torch.arange(past, past + length, device=device).expand(batch, length)
    return (mask.long().cumsum(-1) - 1)[:, -length:].clamp(min=0)


#: A forward of at most this many token rows (batch x new tokens) without gradients on CPU is a decode step: PyTorch
#: runs its blocks on one thread, our kernels on the caller's count (``ops.threads``).
DECODE_STEP_MAX_ROWS = 8


def _is_decode_step(x: torch.Tensor) -> bool:
    return x.device.type == "cpu" and not torch.is_grad_enabled() and x.shape[0] * x.shape[1] <= DECODE_STEP_MAX_ROWS


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
    ) -> SpikingBrainModelOutput:
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
        mask = _mask_over(attention_mask, past + T)
        if position_ids is None:
            position_ids = _positions(mask, past, T, B, x.device)
        cos, sin = rotary_cos_sin(position_ids, rotary_inv_freq(self.config.head_dim, self.config.rope_theta, x.device))
        key_mask = None if mask is None or bool(mask.all()) else mask.bool()
        inputs = MixerInputs(cos=cos.to(x.dtype), sin=sin.to(x.dtype), key_mask=key_mask)
        router_stats = []
        with small_ops_on_one_thread(_is_decode_step(x)):
            for i, layer in enumerate(self.layers):
                layer_cache = None if cache is None else cache.layers[i]
                if self.gradient_checkpointing and self.training:
                    x, stats = self._gradient_checkpointing_func(layer.__call__, x, inputs, layer_cache)
                else:
                    x, stats = layer(x, inputs, layer_cache)
                if stats is not None:
                    router_stats.append(stats)
        if cache is not None:
            cache.seen_tokens += T
        return SpikingBrainModelOutput(
            last_hidden_state=self.norm(x), cache=cache if use_cache else None, router_stats=router_stats or None
        )


    def forward_rows(self, input_ids: torch.LongTensor, caches: list[SpikingBrainCache | None]) -> torch.Tensor:
        """Final hidden states ``[B, 1, hidden]`` of one new token per row, row ``i`` read through ``caches[i]``
        (None: a padding row, left without state).

        Each row's caches, rotary positions and sequence mixing are its own, exactly as in a one-row
        forward; embeddings, projections, norms and MLPs run once over the whole batch.
        """
        if input_ids.shape != (len(caches), 1):
            raise ValueError(f"input_ids must be [rows, 1] = {(len(caches), 1)}, got {tuple(input_ids.shape)}")
        limit = self.config.max_sequence_length
        past = [0 if c is None else c.seen_tokens for c in caches]
        if limit is not None and max(past) + 1 > limit:
            raise ValueError(
                f"sequence of {max(past) + 1} tokens exceeds max_sequence_length={limit} in the model config; "
                "shorten the input or raise max_sequence_length (null = unlimited)"
            )
        x = self.embeddings(input_ids)
        positions = torch.tensor(past, device=x.device).view(-1, 1)
        cos, sin = rotary_cos_sin(positions, rotary_inv_freq(self.config.head_dim, self.config.rope_theta, x.device))
        inputs = MixerInputs(cos=cos.to(x.dtype), sin=sin.to(x.dtype), key_mask=None)
        with small_ops_on_one_thread(_is_decode_step(x)):
            for i, layer in enumerate(self.layers):
                x, _ = layer(x, inputs, RowCaches.of_layer(caches, i))
        for cache in caches:
            if cache is not None:
                cache.seen_tokens += 1
        return self.norm(x)


class SpikingBrainForCausalLM(SpikingBrainPreTrainedModel, GenerationMixin):
    """SpikingBrain language model with streaming prefill and ``generate()`` support."""

    _tied_weights_keys = {"lm_head.weight": "model.embeddings.weight"}

    def __init__(self, config: SpikingBrainConfig):
        super().__init__(config)
        self.model = SpikingBrainModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()
        if config.weight_quantization:
            prepare_int8_layers(self, config.weight_quantization)
        if config.spiking:
            spikify(self, **config.spiking)

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the model builds its own SpikingBrainCache

    def save_pretrained(self, save_directory, *args, official_format: bool = False, **kwargs):
        """Save in our format, or (``official_format=True``) in the released SpikingBrain-7B layout."""
        if official_format:
            return save_official(self, save_directory, max_shard_size=kwargs.get("max_shard_size", "5GB"))
        return super().save_pretrained(save_directory, *args, **kwargs)

    def new_cache(self) -> SpikingBrainCache:
        """An empty inference cache for this model."""
        return SpikingBrainCache.for_config(self.config)

    @torch.inference_mode()
    def decode_rows(self, input_ids: torch.LongTensor, caches: list[SpikingBrainCache | None], packed: bool = False) -> torch.Tensor:
        """Logits ``[B, vocab]`` of one new token per row, each row continuing its own cache (None: padding row).

        A row's logits equal a one-row decode step on its cache up to the rounding of the batched
        matmuls; with the number of rows fixed, they do not depend on the other rows. ``packed``
        computes the linears with oneDNN-packed copies of their weights for this number of rows
        (:mod:`.packed`: faster on CPU, the linear weights' memory a second time).
        """
        if not packed or not packing_available():
            return self.lm_head(self.model.forward_rows(input_ids, caches))[:, 0]
        store = self.__dict__.setdefault("_packed_linears", {})
        linears = store.setdefault(len(caches), PackedLinears(self, len(caches)))
        with linears.active():
            return self.lm_head(self.model.forward_rows(input_ids, caches))[:, 0]

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
    ) -> SpikingBrainCausalLMOutput:
        """Logits (and loss with ``labels``); long inputs stream through the cache in inference mode.

        Under ``no_grad`` an input longer than ``config.streaming_chunk_size`` runs chunk by chunk
        through the cache (a temporary one when ``use_cache`` is off), keeping only the hidden
        states whose logits are asked for, so memory does not grow with the input's length.
        With MoE layers the output has ``aux_loss`` (load-balancing loss, mean over MoE layers)
        and ``router_stats``; with ``labels`` the loss includes ``router_aux_loss_coef * aux_loss``.
        """
        cache = past_key_values if cache is None else cache
        use_cache = self.config.use_cache if use_cache is None else use_cache
        source = input_ids if input_ids is not None else inputs_embeds
        T = 0 if source is None else source.shape[1]
        step = T
        if not torch.is_grad_enabled() and T > self.config.streaming_chunk_size:
            step = self.config.streaming_chunk_size
            cache = self.new_cache() if cache is None else cache
        past = 0 if cache is None else cache.seen_tokens
        mask = _mask_over(attention_mask, past + T)
        first_kept = T - logits_to_keep if logits_to_keep and labels is None else 0
        kept, router_stats = [], None
        for start in range(0, max(T, 1), max(step, 1)):
            end = start + step
            out = self.model(
                input_ids=None if input_ids is None else input_ids[:, start:end],
                inputs_embeds=None if inputs_embeds is None else inputs_embeds[:, start:end],
                attention_mask=None if mask is None else mask[:, : past + min(end, T)],
                position_ids=None if position_ids is None else position_ids[:, start:end],
                cache=cache,
                use_cache=use_cache or cache is not None,
            )
            cache = out.cache
            if out.router_stats is not None:  # summed over streamed chunks
                router_stats = [a + b for a, b in zip(router_stats, out.router_stats)] if router_stats else out.router_stats
            if end > first_kept:
                kept.append(out.last_hidden_state[:, max(0, first_kept - start) :])
        hidden = kept[0] if len(kept) == 1 else torch.cat(kept, dim=1)
        logits = self.lm_head(hidden)
        aux_loss = load_balancing_loss(router_stats or [])
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
            if aux_loss is not None and self.config.router_aux_loss_coef:
                loss = loss + self.config.router_aux_loss_coef * aux_loss
        return SpikingBrainCausalLMOutput(
            loss=loss, logits=logits, cache=cache if use_cache else None, aux_loss=aux_loss, router_stats=router_stats
        )


AutoConfig.register(SpikingBrainConfig.model_type, SpikingBrainConfig, exist_ok=True)
AutoModel.register(SpikingBrainConfig, SpikingBrainModel, exist_ok=True)
AutoModelForCausalLM.register(SpikingBrainConfig, SpikingBrainForCausalLM, exist_ok=True)
