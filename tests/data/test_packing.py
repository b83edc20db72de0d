"""Packing: per-record statistics of a packed batch equal the unpacked ones; no attention across records."""

from __future__ import annotations

import pytest
import torch

from dft_lightning.attention import VARLEN_SDPA
from dft_lightning.batch import MicroBatch
from dft_lightning.data.batching import PackedStepCollator, pack_records, pad_packed, pad_rows
from dft_lightning.data.demo import DemoMathDataModule
from dft_lightning.modeling import CausalLMWithTokenStats, load_causal_lm


@pytest.fixture(scope="module")
def rows(tiny_dir, tmp_path_factory):
    dm = DemoMathDataModule(num_train=12, num_test=4, tokenizer=str(tiny_dir), batch_size=4,
                            data_dir=str(tmp_path_factory.mktemp("data")))
    dm.setup("fit")
    return dm.datasets["train"]


def per_record(model, batch):
    """{row_id: (summed logp, logp of each supervised token)} for one micro-batch."""
    with torch.no_grad():
        logp = model(batch)["logp"]
    seq, mask = batch.sequence_ids[:, 1:], batch.target_mask
    out = {}
    for index, row_id in enumerate(batch.row_ids):
        picked = logp[(seq == index) & mask]
        out[row_id] = (picked.sum(), picked)
    return out


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_equals_unpacked_per_record(tiny_dir, rows, attn):
    model = CausalLMWithTokenStats(load_causal_lm(str(tiny_dir), attn_implementation=attn), chunk_size=64).eval()
    bins = pack_records(rows, capacity=400)
    assert len(bins) < len(rows) and max(len(b) for b in bins) >= 3  # records really share rows
    packed = per_record(model, pad_packed(bins, pad_id=0))
    unpacked = per_record(model, pad_rows(rows, pad_id=0))
    assert packed.keys() == unpacked.keys()
    for row_id, (total, tokens) in unpacked.items():
        torch.testing.assert_close(packed[row_id][0], total, rtol=1e-5, atol=1e-5, msg=row_id)
        torch.testing.assert_close(packed[row_id][1], tokens, rtol=1e-5, atol=1e-5, msg=row_id)


def test_records_start_fresh(rows):
    batch = pad_packed(pack_records(rows, capacity=400), pad_id=0)
    seq, labels, pos = batch.sequence_ids, batch.labels, batch.position_ids
    starts = (seq[:, 1:] != seq[:, :-1]) & (seq[:, 1:] >= 0)
    assert int(starts.sum()) == len(rows) - seq.shape[0]  # every record after the first of its row
    assert (labels[:, 1:][starts] == -100).all()  # a record's first token is never a target
    assert (pos[:, 1:][starts] == 0).all()
    lengths = sorted(len(r["input_ids"]) for r in rows)
    assert sorted(int((seq == i).sum()) for i in range(len(rows))) == lengths


def test_packing_keeps_every_token_and_fills_rows(rows):
    micro = PackedStepCollator(micro_batch_size=2, pad_id=0, pack_length=512)(rows)
    assert sum(mb.real_tokens() for mb in micro) == sum(len(r["input_ids"]) for r in rows)
    bins = pack_records(rows, capacity=512)
    loads = [sum(len(r["input_ids"]) for r in b) for b in bins]
    assert max(loads) <= 512
    assert sum(load <= 256 for load in loads) <= 1  # first-fit-decreasing: at most one bin half empty
    with pytest.raises(ValueError, match="more than data.pack_length=16"):
        pack_records(rows, capacity=16)


def test_segments_cover_records_and_padding():
    rows = [{"input_ids": [1] * n, "labels": [2] * n, "row_id": str(n)} for n in (3, 2, 1, 5, 6)]
    batch = pad_packed([[rows[0], rows[1]], [rows[2], rows[3]], [rows[4]]], pad_id=0)
    assert batch.packed and batch.segments == [[3, 2, 1], [1, 5], [6]]  # row 0's padding is a run of its own
    cu, longest = batch.cu_seqlens()
    assert cu.tolist() == [0, 3, 5, 6, 7, 12, 18] and cu.dtype == torch.int32 and longest == 6
    assert not pad_rows(rows, pad_id=0).packed
    with pytest.raises(ValueError, match="do not cover rows"):
        MicroBatch(batch.input_ids, batch.labels, batch.attention_mask, batch.sequence_ids, segments=[[3, 2], [6], [6]])
    noop = MicroBatch.no_op(batch)
    assert noop.packed and noop.supervised_tokens() == 0 and noop.input_ids.shape == (1, 2)


def test_sdpa_runs_packed_rows_per_record_and_matches_the_dense_mask(tiny_dir, rows):
    """sdpa decoders switch to the per-record backend; it equals the block-diagonal mask, gradients too."""
    varlen = CausalLMWithTokenStats(load_causal_lm(str(tiny_dir), attn_implementation="sdpa"), chunk_size=64)
    assert varlen.attn_implementation() == VARLEN_SDPA
    dense = CausalLMWithTokenStats(load_causal_lm(str(tiny_dir), attn_implementation="sdpa"), chunk_size=64)
    dense.lm.config._attn_implementation = "sdpa"  # the dense block-diagonal mask path
    assert dense.attn_implementation() == "sdpa"
    batch = pad_packed(pack_records(rows, capacity=400), pad_id=0)
    assert batch.input_ids.shape[0] >= 2 and (batch.sequence_ids < 0).any()  # several rows, padding
    results = []
    for model in (varlen, dense):
        logp = model(batch)["logp"]
        mask = batch.target_mask
        logp[mask].sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        results.append((logp[mask].detach(), grads))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=1e-5)
    assert results[0][1].keys() == results[1][1].keys()
    for name, grad in results[0][1].items():
        torch.testing.assert_close(grad, results[1][1][name], rtol=1e-4, atol=1e-6, msg=name)


def test_varlen_backend_is_not_saved_in_the_exported_config(tiny_dir, tmp_path):
    model = CausalLMWithTokenStats(load_causal_lm(str(tiny_dir), attn_implementation="sdpa"))
    assert model.attn_implementation() == VARLEN_SDPA
    model.lm.save_pretrained(tmp_path)
    assert VARLEN_SDPA not in (tmp_path / "config.json").read_text()


def test_varlen_backend_checks_the_segments():
    from dft_lightning.attention import varlen_sdpa_forward

    module = torch.nn.Module()
    q = k = v = torch.zeros(1, 2, 6, 4)
    with pytest.raises(ValueError, match="covers 5 tokens, the row has 6"):
        varlen_sdpa_forward(module, q, k, v, None, packed_segments=[[3, 2]])
    out, _ = varlen_sdpa_forward(module, q, k, v, None, packed_segments=[[2, 4]])
    assert out.shape == (1, 6, 2, 4)


def test_sliding_window_layers_keep_their_window_on_packed_rows(tiny_dir, rows, tmp_path):
    """Records longer than the window: per record, packed rows give what transformers' own
    sliding-window mask gives unpacked."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(tiny_dir)
    config.use_sliding_window, config.sliding_window = True, 8
    config.layer_types = ["sliding_attention"] * config.num_hidden_layers
    AutoModelForCausalLM.from_pretrained(tiny_dir, config=config).save_pretrained(tmp_path)
    model = CausalLMWithTokenStats(load_causal_lm(str(tmp_path), attn_implementation="sdpa"), chunk_size=64).eval()
    assert model.attn_implementation() == VARLEN_SDPA
    assert min(len(r["input_ids"]) for r in rows) > 8
    packed = per_record(model, pad_packed(pack_records(rows, capacity=400), pad_id=0))
    unpacked = per_record(model, pad_rows(rows, pad_id=0))
    plain = CausalLMWithTokenStats(load_causal_lm(str(tiny_dir), attn_implementation="sdpa"), chunk_size=64).eval()
    full_window = per_record(plain, pad_rows(rows, pad_id=0))
    for row_id, (_, tokens) in unpacked.items():
        torch.testing.assert_close(packed[row_id][1], tokens, rtol=1e-5, atol=1e-5, msg=row_id)
    assert any(not torch.allclose(unpacked[r][0], full_window[r][0]) for r in unpacked)  # the window matters
    eager = CausalLMWithTokenStats(load_causal_lm(str(tmp_path), attn_implementation="eager"), chunk_size=64)
    with pytest.raises(NotImplementedError, match="eager attention and sliding-window layers"):
        per_record(eager, pad_packed(pack_records(rows, capacity=400), pad_id=0))


def test_packed_rows_under_activation_checkpointing_match(tiny_dir, rows):
    """Recomputed layers get the same record spans: gradients equal those without checkpointing."""
    batch = pad_packed(pack_records(rows, capacity=400), pad_id=0)
    grads = []
    for checkpointing in (False, True):
        lm = load_causal_lm(str(tiny_dir), attn_implementation="sdpa")
        if checkpointing:
            lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model = CausalLMWithTokenStats(lm, chunk_size=64).train()
        logp = model(batch)["logp"]
        logp[batch.target_mask].sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-5, atol=1e-6, msg=name)


def _reference_flash_kernels():
    """Torch stand-ins for the flash-attention kernels (same signatures as flash_attn's), causal sdpa per run."""
    import torch.nn.functional as F

    def dense(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
              deterministic=False):  # [batch, time, heads, dim]
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             is_causal=causal, scale=softmax_scale, enable_gqa=True)
        return out.transpose(1, 2)

    def varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=None, max_seqlen_k=None, dropout_p=0.0,
               softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, deterministic=False):
        assert torch.equal(cu_seqlens_q, cu_seqlens_k)  # [tokens, heads, dim], runs given by cu_seqlens
        out = torch.empty_like(q)
        bounds = cu_seqlens_q.tolist()
        for a, b in zip(bounds[:-1], bounds[1:], strict=True):
            out[a:b] = dense(q[None, a:b], k[None, a:b], v[None, a:b], softmax_scale=softmax_scale, causal=causal)[0]
        return out

    return dense, varlen


BACKENDS = ["eager", "sdpa_per_record", "sdpa_dense_mask", "flash_attention_2", "flash_attention_3"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_micro_batches_of_four_rows_equal_unpacked_on_every_backend(tiny_dir, rows, backend, monkeypatch):
    """Four packed rows per micro-batch, through each attention branch (flash: transformers' real routing with
    only the kernels swapped), give every record the statistics it has alone, unpacked."""
    import transformers.modeling_flash_attention_utils as fa

    lm = load_causal_lm(str(tiny_dir), attn_implementation="eager" if backend == "eager" else "sdpa")
    if backend == "sdpa_dense_mask":
        lm._supports_attention_backend = False  # as for model classes that do not look attention up by name
    model = CausalLMWithTokenStats(lm, chunk_size=64).eval()
    expected = {"eager": "eager", "sdpa_per_record": VARLEN_SDPA, "sdpa_dense_mask": "sdpa"}.get(backend, backend)
    if backend.startswith("flash"):
        dense, varlen = _reference_flash_kernels()
        monkeypatch.setattr(fa, "_lazy_imports", lambda *a, **k: (dense, varlen, None, fa._pad_input, fa._unpad_input))
        monkeypatch.setattr(fa, "_loaded_implementation", None)
        model.text_config._attn_implementation = backend
    assert model.attn_implementation() == expected
    reference = CausalLMWithTokenStats(load_causal_lm(str(tiny_dir), attn_implementation="eager"), chunk_size=64)
    unpacked = per_record(reference.eval(), pad_rows(rows, pad_id=0))
    micro = PackedStepCollator(micro_batch_size=4, pad_id=0, pack_length=256)(rows)
    assert micro[0].input_ids.shape[0] == 4 and max(len(r) for mb in micro for r in mb.segments) >= 3
    packed = {k: v for mb in micro for k, v in per_record(model, mb).items()}
    assert packed.keys() == unpacked.keys()
    for row_id, (_, tokens) in unpacked.items():
        torch.testing.assert_close(packed[row_id][1], tokens, rtol=1e-4, atol=1e-4, msg=row_id)
