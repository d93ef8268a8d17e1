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

Used by the HuggingFace-equivalence test and the checkpoint converter (:mod:`megatron_dsv3.convert`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_dsv3.model.presets import ModelPreset

# (Megatron name inside a decoder layer, HF name inside a layer, transform)
_ATTENTION = [
    ("input_layernorm.weight", "input_layernorm.weight", "copy"),
    ("self_attention.linear_q_down_proj.weight", "self_attn.q_a_proj.weight", "copy"),
    ("self_attention.q_layernorm.weight", "self_attn.q_a_layernorm.weight", "copy"),
    ("self_attention.linear_q_up_proj.weight", "self_attn.q_b_proj.weight", "copy"),
    ("self_attention.linear_q_proj.weight", "self_attn.q_proj.weight", "copy"),
    ("self_attention.linear_kv_down_proj.weight", "self_attn.kv_a_proj_with_mqa.weight", "copy"),
    ("self_attention.kv_layernorm.weight", "self_attn.kv_a_layernorm.weight", "copy"),
    ("self_attention.linear_kv_up_proj.weight", "self_attn.kv_b_proj.weight", "copy"),
    ("self_attention.linear_proj.weight", "self_attn.o_proj.weight", "copy"),
    ("pre_mlp_layernorm.weight", "post_attention_layernorm.weight", "copy"),
]
_COMPRESSED_QUERY = {
    "self_attention.linear_q_down_proj.weight",
    "self_attention.q_layernorm.weight",
    "self_attention.linear_q_up_proj.weight",
}
_PLAIN_QUERY = {"self_attention.linear_q_proj.weight"}
_DENSE_MLP = [
    ("mlp.linear_fc1.weight", ("mlp.gate_proj.weight", "mlp.up_proj.weight"), "glu"),
    ("mlp.linear_fc2.weight", "mlp.down_proj.weight", "copy"),
]
_MOE = [
    ("mlp.router.weight", "mlp.gate.weight", "copy"),
    ("mlp.router.expert_bias", "mlp.gate.e_score_correction_bias", "copy"),
    ("mlp.shared_experts.linear_fc1.weight", ("mlp.shared_experts.gate_proj.weight", "mlp.shared_experts.up_proj.weight"), "glu"),
    ("mlp.shared_experts.linear_fc2.weight", "mlp.shared_experts.down_proj.weight", "copy"),
]
_EXPERT = [
    ("mlp.experts.local_experts.{e}.linear_fc1.weight", ("mlp.experts.{e}.gate_proj.weight", "mlp.experts.{e}.up_proj.weight"), "glu"),
    ("mlp.experts.local_experts.{e}.linear_fc2.weight", "mlp.experts.{e}.down_proj.weight", "copy"),
]
_MTP = [
    ("enorm.weight", "enorm.weight", "copy"),
    ("hnorm.weight", "hnorm.weight", "copy"),
    ("eh_proj.weight", "eh_proj.weight", "copy"),
    ("final_layernorm.weight", "shared_head.norm.weight", "copy"),
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

    def join(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        """The Megatron tensor from its HF tensors (in ``hf`` order)."""
        return torch.cat(tensors, dim=0) if self.transform == "glu" else tensors[0]

    def split(self, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        """``(HF name, tensor)`` of the Megatron tensor; the exact inverse of :meth:`join`."""
        return list(zip(self.hf, tensor.chunk(2, dim=0))) if self.transform == "glu" else [(self.hf[0], tensor)]


def name_table(p: ModelPreset, *, include_mtp: bool = True) -> list[Mapping]:
    """Every parameter (and the expert-bias buffer) of ``p``, Megatron name -> HF name(s)."""
    table = [
        Mapping("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), "copy"),
        Mapping("decoder.final_layernorm.weight", ("model.norm.weight",), "copy"),
        Mapping("output_layer.weight", ("lm_head.weight",), "copy"),
    ]

    # With a compressed query (q_lora_rank) there is no plain q projection, and vice versa.
    unused = _PLAIN_QUERY if p.q_lora_rank is not None else _COMPRESSED_QUERY

    def layer(megatron_prefix: str, hf_prefix: str, moe: bool) -> None:
        rows = [r for r in _ATTENTION if r[0] not in unused] + (_MOE if moe else _DENSE_MLP)
        if moe and not p.expert_bias:
            rows = [r for r in rows if "expert_bias" not in r[0]]
        if moe and not p.num_shared_experts:
            rows = [r for r in rows if "shared_experts" not in r[0]]
        for meg, hf, transform in rows:
            hf = (hf,) if isinstance(hf, str) else hf
            table.append(Mapping(megatron_prefix + meg, tuple(hf_prefix + h for h in hf), transform))
        if moe:
            for e in range(p.num_routed_experts):
                for meg, hf, transform in _EXPERT:
                    hf = (hf,) if isinstance(hf, str) else hf
                    table.append(Mapping(
                        megatron_prefix + meg.format(e=e), tuple(hf_prefix + h.format(e=e) for h in hf), transform
                    ))

    for i in range(p.num_layers):
        layer(f"decoder.layers.{i}.", f"model.layers.{i}.", moe=i >= p.first_k_dense)
    if include_mtp:
        for k in range(p.mtp_num_layers):
            hf_prefix = f"model.layers.{p.num_layers + k}."
            for meg, hf, transform in _MTP:
                table.append(Mapping(f"mtp.layers.{k}.{meg}", (hf_prefix + hf,), transform))
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


def markdown() -> str:
    """The table as ``docs/checkpoints.md`` shows it (``L``: a layer, ``E``: an expert, ``M``: an
    MTP layer, stored by HF as layer ``num_layers + M``); tests check the doc holds it."""
    rows = [("embedding.word_embeddings.weight", "model.embed_tokens.weight", "copy"),
            ("decoder.final_layernorm.weight", "model.norm.weight", "copy"),
            ("output_layer.weight", "lm_head.weight", "copy")]

    def add(meg_prefix: str, hf_prefix: str, entries, note: str = "") -> None:
        for meg, hf, transform in entries:
            hf = (hf,) if isinstance(hf, str) else hf
            meg = meg.replace("{e}", "E")
            names = " + ".join(hf_prefix + h.replace("{e}", "E") for h in hf)
            rows.append((meg_prefix + meg, names, transform + note))

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
