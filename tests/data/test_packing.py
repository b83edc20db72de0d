"""Packing: per-record statistics of a packed batch equal the unpacked ones; no attention across records."""

from __future__ import annotations

import pytest
import torch

from dft_lightning.attention import VARLEN_SDPA, segment_lengths
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
    keys = ("input_ids", "labels", "attention_mask", "position_ids", "sequence_ids", "packed")
    with torch.no_grad():
        logp, _ = model(**{k: batch[k] for k in keys})
    seq, mask = batch["sequence_ids"][:, 1:], batch["labels"][:, 1:] != -100
    out = {}
    for index, row_id in enumerate(batch["row_ids"]):
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
    seq, labels, pos = batch["sequence_ids"], batch["labels"], batch["position_ids"]
    starts = (seq[:, 1:] != seq[:, :-1]) & (seq[:, 1:] >= 0)
    assert int(starts.sum()) == len(rows) - seq.shape[0]  # every record after the first of its row
    assert (labels[:, 1:][starts] == -100).all()  # a record's first token is never a target
    assert (pos[:, 1:][starts] == 0).all()
    lengths = sorted(len(r["input_ids"]) for r in rows)
    assert sorted(int((seq == i).sum()) for i in range(len(rows))) == lengths


def test_packing_keeps_every_token_and_fills_rows(rows):
    micro = PackedStepCollator(micro_batch_size=2, pad_id=0, pack_length=512)(rows)
    assert sum(int(mb["attention_mask"].sum()) for mb in micro) == sum(len(r["input_ids"]) for r in rows)
    bins = pack_records(rows, capacity=512)
    loads = [sum(len(r["input_ids"]) for r in b) for b in bins]
    assert max(loads) <= 512
    assert sum(load <= 256 for load in loads) <= 1  # first-fit-decreasing: at most one bin half empty
    with pytest.raises(ValueError, match="more than data.pack_length=16"):
        pack_records(rows, capacity=16)


def test_segment_lengths():
    seq = torch.tensor([[0, 0, 0, 1, 1, -1], [2, 3, 3, 3, 3, 3], [4, 4, 4, 4, 4, 4]])
    assert segment_lengths(seq) == [[3, 2, 1], [1, 5], [6]]


def test_sdpa_runs_packed_rows_per_record_and_matches_the_dense_mask(tiny_dir, rows):
    """sdpa decoders switch to the per-record backend; it equals the block-diagonal mask, gradients too."""
    varlen = CausalLMWithTokenStats(load_causal_lm(str(tiny_dir), attn_implementation="sdpa"), chunk_size=64)
    assert varlen.attn_implementation() == VARLEN_SDPA
    dense = CausalLMWithTokenStats(load_causal_lm(str(tiny_dir), attn_implementation="sdpa"), chunk_size=64)
    dense.lm.config._attn_implementation = "sdpa"  # the dense block-diagonal mask path
    assert dense.attn_implementation() == "sdpa"
    batch = pad_packed(pack_records(rows, capacity=400), pad_id=0)
    assert batch["input_ids"].shape[0] >= 2 and (batch["sequence_ids"] < 0).any()  # several rows, padding
    keys = ("input_ids", "labels", "attention_mask", "position_ids", "sequence_ids", "packed")
    results = []
    for model in (varlen, dense):
        logp, _ = model(**{k: batch[k] for k in keys})
        mask = batch["labels"][:, 1:] != -100
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
    keys = ("input_ids", "labels", "attention_mask", "position_ids", "sequence_ids", "packed")
    grads = []
    for checkpointing in (False, True):
        lm = load_causal_lm(str(tiny_dir), attn_implementation="sdpa")
        if checkpointing:
            lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model = CausalLMWithTokenStats(lm, chunk_size=64).train()
        logp, _ = model(**{k: batch[k] for k in keys})
        logp[batch["labels"][:, 1:] != -100].sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-5, atol=1e-6, msg=name)
