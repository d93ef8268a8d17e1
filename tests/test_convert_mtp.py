"""The converted MTP block computes DeepSeek-V3's multi-token prediction, not just some function of
the right tensors.

DeepSeek-V3 (report section 2.2; vLLM's ``DeepSeekMultiTokenPredictorLayer``, the consumer of the
released layout) predicts token ``i + 2`` at position ``i`` from the main model's output ``h_i``
(after its final norm) and the next token ``t_{i+1}``::

    x  = eh_proj(cat(enorm(emb(t_{i+1})), hnorm(h_i)))     # embedding half first
    y  = decoder_layer(x)                                  # causal, rotary at position i
    logits = lm_head(shared_head.norm(y))                  # the shared output head

Megatron-Core 0.19 computes the same (``MultiTokenPredictionLayer._concat_embeddings`` concatenates
``(enorm(embedding), hnorm(hidden_states))``; the hidden states ``GPTModel._postprocess`` hands
``self.mtp`` are the decoder's output after ``decoder.final_layernorm``).  The reference here is
built from transformers' modules and plain torch only, from the HF tensors as written, never from
the converter's table; so a symmetric mapping error (enorm and hnorm swapped, the decoder layer's
weights misplaced) that a round trip cannot see makes this test fail, as the negative control shows.
"""

from __future__ import annotations

import shutil

import pytest
import torch

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

from test_convert import CONFIGS, TOKENS, _hf_model, _save_hf  # noqa: E402

from megatron_dsv3.convert import run  # noqa: E402
from megatron_dsv3.parallel import ParallelLayout  # noqa: E402

pytestmark = pytest.mark.quick  # the quick tier: pytest -m quick (README)

_OWN = ("enorm.", "hnorm.", "eh_proj.", "shared_head.", "embed_tokens.")


def _reference_mtp(model, written: dict[str, torch.Tensor], tokens: torch.Tensor) -> torch.Tensor:
    """DeepSeek's MTP logits ``[b, s - 1, vocab]`` (position ``i`` predicts ``tokens[i + 2]``), from
    the HF tensors ``written`` (layer ``num_hidden_layers``) and transformers' DeepseekV3 modules."""
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3DecoderLayer, DeepseekV3RMSNorm

    c = model.config
    L = c.num_hidden_layers
    prefix = f"model.layers.{L}."

    def norm(name):
        n = DeepseekV3RMSNorm(c.hidden_size, eps=c.rms_norm_eps)
        n.weight.data.copy_(written[prefix + name])
        return n

    layer = DeepseekV3DecoderLayer(c, layer_idx=L).eval()  # L >= first_k_dense_replace: an MoE layer
    layer_state = {k[len(prefix):]: v for k, v in written.items()
                   if k.startswith(prefix) and not k[len(prefix):].startswith(_OWN)}
    layer.load_state_dict(layer_state, strict=True)

    b, s = tokens.shape
    with torch.no_grad():
        h = model.model(tokens).last_hidden_state[:, :-1]  # h_i, i < s - 1: after the final norm
        e = model.model.embed_tokens(tokens[:, 1:])  # emb(t_{i+1})
        x = torch.nn.functional.linear(torch.cat([norm("enorm.weight")(e), norm("hnorm.weight")(h)], dim=-1),
                                       written[prefix + "eh_proj.weight"])
        n = s - 1
        positions = torch.arange(n).expand(b, n)
        rotary = model.model.rotary_emb(x, positions)
        mask = torch.full((n, n), torch.finfo(x.dtype).min).triu(1).expand(b, 1, n, n)
        y = layer(x, attention_mask=mask, position_ids=positions, position_embeddings=rotary)
        y = y[0] if isinstance(y, tuple) else y
        return model.lm_head(norm("shared_head.norm.weight")(y))


def _megatron_mtp(preset, release_dir, tokens: torch.Tensor):
    """Megatron's MTP logits ``[b, s, vocab]`` and the MTP loss it tracks, from one training-mode
    forward of the model ``megatron-dsv3 train`` builds (labels ``tokens`` shifted by one)."""
    from megatron_dsv3.testing import parallel

    _, _, chunks = parallel.build_chunks(preset, ParallelLayout(), ddp=False)
    parallel.load_weights(chunks, str(release_dir))
    gpt = parallel._unwrap(chunks[0])
    captured = {}
    handle = gpt.mtp.register_forward_hook(lambda module, args, output: captured.update(out=output))
    inputs, labels = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
    gpt.train()  # the MTP loss is tracked in training mode only (no dropout: DeepSeek trains without)
    parallel.mtp_loss_and_reset()
    try:
        with torch.no_grad():
            gpt(inputs, torch.arange(inputs.shape[1]).expand_as(inputs), None, labels=labels,
                loss_mask=torch.ones_like(labels, dtype=torch.float32))
            _, mtp = captured["out"].chunk(2, dim=0)  # [main decoder; MTP layer] along the sequence
            logits, _ = gpt.output_layer(mtp)
    finally:
        handle.remove()
        gpt.eval()
    return logits.transpose(0, 1), parallel.mtp_loss_and_reset()


@pytest.fixture(scope="module")
def mtp_source(tmp_path_factory):
    model, mtp = _hf_model(CONFIGS["mtp"], seed=31)
    work = tmp_path_factory.mktemp("convert-mtp")
    written = _save_hf(model, mtp, work / "hf", seed=37)
    reference = _reference_mtp(model, written, TOKENS[:, :-1])
    return model, written, work, reference


def _convert_and_run(hf_dir, out_dir):
    result = run.hf_to_megatron(hf_dir, out_dir, progress=False)
    assert result.preset.mtp_num_layers == 1
    return _megatron_mtp(result.preset, out_dir / "release", TOKENS)


def test_converted_mtp_block_computes_deepseeks_mtp(mtp_source, megatron_single_process):
    _, _, work, reference = mtp_source
    logits, loss = _convert_and_run(work / "hf", work / "megatron")
    n = reference.shape[1]  # Megatron's last position embeds a filler token (id 0); its loss is masked
    assert (logits[:, :n] - reference).abs().max().item() <= 1e-4
    # Megatron's tracked MTP loss: mean over batch x positions of CE(position i -> token i + 2), the
    # last input position (no token i + 2) masked out; not scaled by mtp_loss_scaling_factor.
    expected = torch.nn.functional.cross_entropy(reference.flatten(0, 1), TOKENS[:, 2:].flatten())
    assert loss == pytest.approx(expected.item(), rel=1e-5)


def test_swapped_mtp_norms_are_caught(mtp_source, megatron_single_process):
    """Negative control: enorm and hnorm swapped in the checkpoint give other MTP logits, so the
    comparison above can fail."""
    model, written, work, reference = mtp_source
    L = model.config.num_hidden_layers
    bad = work / "hf-swapped"
    shutil.copytree(work / "hf", bad)
    extra = safetensors_torch.load_file(bad / "mtp.safetensors")
    e, h = f"model.layers.{L}.enorm.weight", f"model.layers.{L}.hnorm.weight"
    assert not torch.equal(extra[e], extra[h])
    extra[e], extra[h] = extra[h].clone(), extra[e].clone()
    safetensors_torch.save_file(extra, bad / "mtp.safetensors")
    logits, _ = _convert_and_run(bad, work / "megatron-swapped")
    n = reference.shape[1]
    assert (logits[:, :n] - reference).abs().max().item() > 1e-2  # measured 0.23 (tolerance above: 1e-4)
