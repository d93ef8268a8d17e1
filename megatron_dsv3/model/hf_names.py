"""The one table between our Megatron parameter names and HuggingFace DeepSeek-V3/V2 checkpoint names.

Megatron names are those of a single-stage ``GPTModel`` built from the ``dsv3`` spec (tensor- and
expert-parallel shards are resharded by Megatron's distributed checkpoint, so one table serves every
layout).  HF names are those of the released checkpoints (``model.layers.N.mlp.experts.E.gate_proj``
...; the MTP module is stored as layer ``num_layers``).  Two transforms are needed:

* ``glu``: Megatron's SwiGLU ``linear_fc1`` is ``[gate; up]`` stacked by rows; HF keeps
  ``gate_proj`` and ``up_proj``.
* ``copy`` for everything else.  In particular the rotary rows of ``q_b_proj`` and
  ``kv_a_proj_with_mqa`` stay as DeepSeek stores them (interleaved pairs): Megatron's MLA
  de-interleaves them itself before rotating (``mla_rotary_interleaved`` in
  ``megatron/core/models/common/embeddings/rope_utils.py``), as transformers does with
  ``rope_interleave=True``.

Each row also gives the tensor's shape from the preset, so the HF names a checkpoint must hold and
their shapes (:func:`hf_shapes`, what the converter checks a checkpoint against) come from here too.
Used by the HuggingFace-equivalence test and the checkpoint converter (:mod:`megatron_dsv3.convert`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_dsv3.model.presets import ModelPreset

# (Megatron name inside a decoder layer, HF name(s) inside a layer, transform, the Megatron tensor's
# shape from the preset).  The shapes are the HF layout's (DeepSeek's ``modeling_deepseek.py``,
# transformers' ``modeling_deepseek_v3.py``): a glu row's HF tensors are its two halves by rows.
# tests/test_hf_equivalence.py holds them against the model Megatron builds and transformers'.
_ATTENTION = [
    ("input_layernorm.weight", "input_layernorm.weight", "copy", lambda p: (p.hidden_size,)),
    ("self_attention.linear_q_down_proj.weight", "self_attn.q_a_proj.weight", "copy",
     lambda p: (p.q_lora_rank, p.hidden_size)),
    ("self_attention.q_layernorm.weight", "self_attn.q_a_layernorm.weight", "copy", lambda p: (p.q_lora_rank,)),
    ("self_attention.linear_q_up_proj.weight", "self_attn.q_b_proj.weight", "copy",
     lambda p: (p.num_attention_heads * p.qk_head_dim, p.q_lora_rank)),
    ("self_attention.linear_q_proj.weight", "self_attn.q_proj.weight", "copy",
     lambda p: (p.num_attention_heads * p.qk_head_dim, p.hidden_size)),
    ("self_attention.linear_kv_down_proj.weight", "self_attn.kv_a_proj_with_mqa.weight", "copy",
     lambda p: (p.kv_lora_rank + p.qk_rope_head_dim, p.hidden_size)),
    ("self_attention.kv_layernorm.weight", "self_attn.kv_a_layernorm.weight", "copy", lambda p: (p.kv_lora_rank,)),
    ("self_attention.linear_kv_up_proj.weight", "self_attn.kv_b_proj.weight", "copy",
     lambda p: (p.num_attention_heads * (p.qk_nope_head_dim + p.v_head_dim), p.kv_lora_rank)),
    ("self_attention.linear_proj.weight", "self_attn.o_proj.weight", "copy",
     lambda p: (p.hidden_size, p.num_attention_heads * p.v_head_dim)),
    ("pre_mlp_layernorm.weight", "post_attention_layernorm.weight", "copy", lambda p: (p.hidden_size,)),
]
_COMPRESSED_QUERY = {
    "self_attention.linear_q_down_proj.weight",
    "self_attention.q_layernorm.weight",
    "self_attention.linear_q_up_proj.weight",
}
_PLAIN_QUERY = {"self_attention.linear_q_proj.weight"}
_DENSE_MLP = [
    ("mlp.linear_fc1.weight", ("mlp.gate_proj.weight", "mlp.up_proj.weight"), "glu",
     lambda p: (2 * p.ffn_hidden_size, p.hidden_size)),
    ("mlp.linear_fc2.weight", "mlp.down_proj.weight", "copy", lambda p: (p.hidden_size, p.ffn_hidden_size)),
]
_MOE = [
    ("mlp.router.weight", "mlp.gate.weight", "copy", lambda p: (p.num_routed_experts, p.hidden_size)),
    ("mlp.router.expert_bias", "mlp.gate.e_score_correction_bias", "copy", lambda p: (p.num_routed_experts,)),
    ("mlp.shared_experts.linear_fc1.weight", ("mlp.shared_experts.gate_proj.weight", "mlp.shared_experts.up_proj.weight"),
     "glu", lambda p: (2 * p.num_shared_experts * p.moe_ffn_hidden_size, p.hidden_size)),
    ("mlp.shared_experts.linear_fc2.weight", "mlp.shared_experts.down_proj.weight", "copy",
     lambda p: (p.hidden_size, p.num_shared_experts * p.moe_ffn_hidden_size)),
]
_EXPERT = [
    ("mlp.experts.local_experts.{e}.linear_fc1.weight", ("mlp.experts.{e}.gate_proj.weight", "mlp.experts.{e}.up_proj.weight"),
     "glu", lambda p: (2 * p.moe_ffn_hidden_size, p.hidden_size)),
    ("mlp.experts.local_experts.{e}.linear_fc2.weight", "mlp.experts.{e}.down_proj.weight", "copy",
     lambda p: (p.hidden_size, p.moe_ffn_hidden_size)),
]
_MTP = [
    ("enorm.weight", "enorm.weight", "copy", lambda p: (p.hidden_size,)),
    ("hnorm.weight", "hnorm.weight", "copy", lambda p: (p.hidden_size,)),
    ("eh_proj.weight", "eh_proj.weight", "copy", lambda p: (p.hidden_size, 2 * p.hidden_size)),
    ("final_layernorm.weight", "shared_head.norm.weight", "copy", lambda p: (p.hidden_size,)),
]
_TOP = [
    ("embedding.word_embeddings.weight", "model.embed_tokens.weight", "copy", lambda p: (p.vocab_size, p.hidden_size)),
    ("decoder.final_layernorm.weight", "model.norm.weight", "copy", lambda p: (p.hidden_size,)),
    ("output_layer.weight", "lm_head.weight", "copy", lambda p: (p.vocab_size, p.hidden_size)),
]

# The released checkpoints also store, in each MTP layer, copies of the embedding and the output
# head (DeepSeek-V3's inference code gives the MTP module its own references to them); Megatron's MTP
# shares the model's.  Import ignores them; export writes them so the layout is the released one.
_MTP_COPIES = [
    ("embed_tokens.weight", "embedding.word_embeddings.weight"),
    ("shared_head.head.weight", "output_layer.weight"),
]

@dataclass(frozen=True)
class Mapping:
    megatron: str
    hf: tuple[str, ...]
    transform: str
    shape: tuple[int, ...]  # the Megatron tensor's

    def hf_shapes(self) -> list[tuple[str, tuple[int, ...]]]:
        """``(HF name, shape)`` of each HF tensor (a glu's are the two halves of :attr:`shape` by rows)."""
        if self.transform == "glu":
            return [(name, (self.shape[0] // 2, *self.shape[1:])) for name in self.hf]
        return [(self.hf[0], self.shape)]

    def join(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        """The Megatron tensor from its HF tensors (in ``hf`` order)."""
        return torch.cat(tensors, dim=0) if self.transform == "glu" else tensors[0]

    def split(self, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        """``(HF name, tensor)`` of the Megatron tensor; the exact inverse of :meth:`join`."""
        return list(zip(self.hf, tensor.chunk(2, dim=0))) if self.transform == "glu" else [(self.hf[0], tensor)]


def name_table(p: ModelPreset, *, include_mtp: bool = True) -> list[Mapping]:
    """Every parameter (and the expert-bias buffer) of ``p``, Megatron name -> HF name(s)."""
    table: list[Mapping] = []

    def add(rows, megatron_prefix: str, hf_prefix: str, **fields) -> None:
        for meg, hf, transform, shape in rows:
            hf = (hf,) if isinstance(hf, str) else hf
            hf_names = tuple(hf_prefix + h.format(**fields) for h in hf)
            table.append(Mapping(megatron_prefix + meg.format(**fields), hf_names, transform, tuple(shape(p))))

    add(_TOP, "", "")

    # With a compressed query (q_lora_rank) there is no plain q projection, and vice versa.
    unused = _PLAIN_QUERY if p.q_lora_rank is not None else _COMPRESSED_QUERY

    def layer(megatron_prefix: str, hf_prefix: str, moe: bool) -> None:
        rows = [r for r in _ATTENTION if r[0] not in unused] + (_MOE if moe else _DENSE_MLP)
        if moe and not p.expert_bias:
            rows = [r for r in rows if "expert_bias" not in r[0]]
        if moe and not p.num_shared_experts:
            rows = [r for r in rows if "shared_experts" not in r[0]]
        add(rows, megatron_prefix, hf_prefix)
        if moe:
            for e in range(p.num_routed_experts):
                add(_EXPERT, megatron_prefix, hf_prefix, e=e)

    for i in range(p.num_layers):
        layer(f"decoder.layers.{i}.", f"model.layers.{i}.", moe=i >= p.first_k_dense)
    if include_mtp:
        for k in range(p.mtp_num_layers):
            hf_prefix = f"model.layers.{p.num_layers + k}."
            add(_MTP, f"mtp.layers.{k}.", hf_prefix)
            layer(f"mtp.layers.{k}.mtp_model_layer.", hf_prefix, moe=p.num_moe_layers > 0)
    return table


def hf_to_megatron(hf: dict[str, torch.Tensor], p: ModelPreset, *, include_mtp: bool = False) -> dict:
    """A Megatron state dict from HF checkpoint tensors (the names of the released checkpoints)."""
    return {m.megatron: m.join([hf[name] for name in m.hf]) for m in name_table(p, include_mtp=include_mtp)}


def megatron_to_hf(state: dict[str, torch.Tensor], p: ModelPreset, *, include_mtp: bool = False) -> dict:
    """HF checkpoint tensors from a Megatron state dict; the exact inverse of :func:`hf_to_megatron`."""
    return {name: t for m in name_table(p, include_mtp=include_mtp) for name, t in m.split(state[m.megatron])}


def mtp_copies(p: ModelPreset) -> list[tuple[str, str]]:
    """``(HF name, Megatron name)`` of the copies each MTP layer of a released checkpoint holds."""
    return [(f"model.layers.{p.num_layers + k}.{hf}", meg)
            for k in range(p.mtp_num_layers) for hf, meg in _MTP_COPIES]


def hf_shapes(p: ModelPreset) -> dict[str, tuple[int, ...]]:
    """The shape of every tensor name a released checkpoint of ``p`` holds (MTP and its copies
    included; FP8 block scales aside), in the table's order."""
    table = name_table(p, include_mtp=True)
    shapes = {name: shape for m in table for name, shape in m.hf_shapes()}
    by_megatron = {m.megatron: m for m in table}
    shapes.update({hf: by_megatron[meg].shape for hf, meg in mtp_copies(p)})
    return shapes


def markdown() -> str:
    """The table as ``docs/checkpoints.md`` shows it (``L``: a layer, ``E``: an expert, ``M``: an
    MTP layer, stored by HF as layer ``num_layers + M``); tests check the doc holds it."""
    rows = []

    def add(meg_prefix: str, hf_prefix: str, entries, note: str = "") -> None:
        for meg, hf, transform, _ in entries:
            hf = (hf,) if isinstance(hf, str) else hf
            meg = meg.replace("{e}", "E")
            names = " + ".join(hf_prefix + h.replace("{e}", "E") for h in hf)
            rows.append((meg_prefix + meg, names, transform + note))

    add("", "", _TOP)
    add("decoder.layers.L.", "model.layers.L.", _ATTENTION)
    add("decoder.layers.L.", "model.layers.L.", _DENSE_MLP, " (dense layers)")
    add("decoder.layers.L.", "model.layers.L.", _MOE, " (MoE layers)")
    add("decoder.layers.L.", "model.layers.L.", _EXPERT, " (MoE layers)")
    add("mtp.layers.M.", "model.layers.(num_layers+M).", _MTP)
    rows.append(("mtp.layers.M.mtp_model_layer.*", "model.layers.(num_layers+M).*", "as a decoder layer"))
    for hf, meg in _MTP_COPIES:
        rows.append((meg, f"model.layers.(num_layers+M).{hf}", "export only (a copy)"))
    out = ["| Megatron (`--spec dsv3`) | HuggingFace (DeepSeek-V3 release) | transform |", "| --- | --- | --- |"]
    out += [f"| `{m}` | `{h}` | {t} |" for m, h, t in rows]
    return "\n".join(out) + "\n"
