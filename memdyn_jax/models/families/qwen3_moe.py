"""Qwen3-MoE (`Qwen3MoeForCausalLM`: Qwen3-30B-A3B, Qwen3-235B-A22B): Qwen3's attention (an
RMSNorm over each head's q and k before RoPE, `attention_bias` on q/k/v and o_proj) and, in
place of the dense MLP, a top-k routed mixture of SwiGLU experts on every layer
(`moe.SparseMoE`: HF's routing, dropless, grouped-matmul experts; where routing ties may
differ from HF is in its docstring). One sliding window on every layer where
`use_sliding_window` sets one (HF's mask, not Qwen3's `max_window_layers`).

The experts are `ModelConfig` fields (`num_experts`, `num_experts_per_tok`,
`moe_intermediate_size`, `norm_topk_prob`); the load-balancing loss's coefficient
(`router_aux_loss_coef`) and whether HF adds it to its loss (`output_router_logits`) are read
for the trainer (`train.loss.router_aux_coefficient`). HF also builds stacks that mix dense
MLP layers in (`mlp_only_layers`, `decoder_sparse_step` > 1): not implemented (one scanned
block for every layer), so such a config is refused, naming the field.

Checkpoints: the hub's (and what `save_pretrained` of the installed transformers writes,
reverting its loader's conversion) hold one tensor per expert,
`mlp.experts.{e}.{gate,up,down}_proj.weight`; that is what we write. The installed
transformers keeps them fused in memory, `mlp.experts.gate_up_proj` (experts, 2 x inner,
hidden) and `mlp.experts.down_proj` (experts, hidden, inner), and writes that layout with
`save_original_format=False`: we read it too.
"""
from __future__ import annotations

from typing import Any

from flax import nnx

from memdyn_jax.models import layers, moe
from memdyn_jax.models.config import ModelConfig, unsupported
from memdyn_jax.models.families import llama
from memdyn_jax.models.registry import BATCHED_LINEAR, LINEAR, Family, KeyRule
from memdyn_jax.models.transformer import attn_block_kwargs

EXPERT_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


class Qwen3MoeBlock(nnx.Module):
  """h += attn(rmsnorm(h)); h += moe(rmsnorm(h)). With a `stats_mask` it also returns the
  router's statistics over the tokens the mask marks (`transformer.CausalLM.has_router`)."""

  def __init__(self, cfg: ModelConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
    norm = lambda: layers.RMSNorm(cfg.hidden_size, cfg.norm_eps, param_dtype=param_dtype,
                                  rngs=rngs)
    self.input_layernorm = norm()
    self.self_attn = layers.Attention(**attn_block_kwargs(cfg, dtype, param_dtype), rngs=rngs)
    self.post_attention_layernorm = norm()
    self.mlp = moe.SparseMoE(cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts,
                             cfg.num_experts_per_tok, norm_topk_prob=cfg.norm_topk_prob,
                             act=cfg.hidden_act, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, h, *, stats_mask=None, **attn_kwargs):
    attn_out, kv = self.self_attn(self.input_layernorm(h), **attn_kwargs)
    h = h + attn_out
    out, stats = self.mlp(self.post_attention_layernorm(h), stats_mask)
    h = h + out
    return (h, kv) if stats_mask is None else (h, kv, stats)


class Qwen3MoeForCausalLM(llama.LlamaForCausalLM):
  has_router = True

  def make_block(self, rngs):
    return Qwen3MoeBlock(self.cfg, dtype=self.dtype, param_dtype=self.param_dtype, rngs=rngs)


# ----------------------------------------------------------------------------- HF config


def dense_layers(hf) -> list[int]:
  """The layers HF's `Qwen3MoeDecoderLayer` gives a dense MLP rather than experts."""
  only = set(hf.mlp_only_layers or ())
  return [i for i in range(hf.num_hidden_layers)
          if i in only or not (hf.num_experts > 0 and (i + 1) % hf.decoder_sparse_step == 0)]


def config_fields(hf, raw) -> dict[str, Any]:
  experts, top_k = int(hf.num_experts), int(hf.num_experts_per_tok)
  if experts < 1:
    raise unsupported("num_experts", experts, "a Qwen3-MoE stack without experts is dense")
  if int(hf.decoder_sparse_step) < 1:
    raise unsupported("decoder_sparse_step", hf.decoder_sparse_step, "must be >= 1")
  dense = dense_layers(hf)
  if dense:
    field = ("mlp_only_layers" if set(dense) & set(hf.mlp_only_layers or ())
             else "decoder_sparse_step")
    raise unsupported(field, getattr(hf, field), f"it makes layers {dense} dense MLPs; only "
                      "stacks with experts on every layer are implemented")
  if not 0 < top_k <= experts:
    raise unsupported("num_experts_per_tok", top_k, f"must be in [1, num_experts = {experts}]")
  window = hf.sliding_window  # None unless use_sliding_window (set so by the config class)
  bias = bool(getattr(hf, "attention_bias", False))
  fields = llama.decoder_fields(hf, raw, windows=(int(window) if window else 0,)
                                * hf.num_hidden_layers, qkv_bias=bias, out_bias=bias)
  return dict(fields, qk_norm="head", qk_norm_style="cast_then_scale", mlp_bias=False,
              num_experts=experts, num_experts_per_tok=top_k,
              moe_intermediate_size=int(hf.moe_intermediate_size),
              norm_topk_prob=bool(hf.norm_topk_prob),
              router_aux_loss_coef=float(hf.router_aux_loss_coef),
              router_aux_loss_in_hf_loss=bool(getattr(hf, "output_router_logits", False)))


# ----------------------------------------------------------------------------- HF tensors


def key_rules(cfg: ModelConfig) -> list[KeyRule]:
  """Llama's attention and norm tensors (with q/k norms); the router `mlp.gate`; one tensor
  per expert and projection (written), or HF's fused expert tensors (read)."""
  p = "model.layers.{i}.mlp."
  rules = [r for r in llama.key_rules(cfg) if ".mlp." not in r.hf]
  rules.append(KeyRule(p + "gate.weight", "blocks.mlp.router.kernel", LINEAR))
  rules += [KeyRule(p + f"experts.{{e}}.{x}.weight", f"blocks.mlp.{x}", LINEAR)
            for x in EXPERT_PROJECTIONS]
  inner = cfg.moe_intermediate_size
  rules += [KeyRule(p + "experts.gate_up_proj", f"blocks.mlp.{x}", BATCHED_LINEAR,
                    fused=(inner, inner), part=part, read_only=True)
            for part, x in enumerate(("gate_proj", "up_proj"))]
  rules.append(KeyRule(p + "experts.down_proj", "blocks.mlp.down_proj", BATCHED_LINEAR,
                       read_only=True))
  return rules


FAMILY = Family(
    name="qwen3_moe",
    model_types={"qwen3_moe": "Qwen3MoeForCausalLM"},
    config_fields=config_fields,
    key_rules=key_rules,
    model_class=Qwen3MoeForCausalLM,
    tiny_configs={
        # GQA with an explicit head_dim, untied embeddings, 8 experts (top 2, renormalised)
        # narrower than the dense width, and experts that some test tokens never reach.
        "qwen3_moe": dict(vocab_size=211, hidden_size=48, intermediate_size=80,
                          moe_intermediate_size=24, num_experts=8, num_experts_per_tok=2,
                          norm_topk_prob=True, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, head_dim=16, max_position_embeddings=128,
                          rope_theta=1e6, tie_word_embeddings=False, output_router_logits=True,
                          router_aux_loss_coef=0.01),
    },
)
