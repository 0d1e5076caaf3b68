"""The manifest as a typed record: a folder written by an earlier edgeattn loads, and is written back to the same
bytes; keys this edgeattn does not know and optional keys a folder lacks survive the round trip."""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest

from edgeattn.runtimes.manifest import (
    MANIFEST_NAME,
    FilesInfo,
    KVCacheInfo,
    Manifest,
    ManifestError,
    read_manifest,
    write_manifest,
)

# Written by `convert tiny-llama --block-size 4 --top-blocks 2 --kv-cache int8 --weights int8 --max-length 32`
# when the manifest was still a dict, before the Manifest record existed.
WRITTEN_BY_CONVERT = '''{
  "format": "edgeattn",
  "format_version": 1,
  "edgeattn_version": "0.1.0",
  "source": {
    "model": "tiny-llama",
    "family": "llama",
    "weights_sha256": null
  },
  "spec": {
    "kv_heads": null,
    "gqa_method": "calibrated",
    "uptrain_steps": 0,
    "window": null,
    "sinks": 0,
    "block_size": 4,
    "top_blocks": 2,
    "block_mass": null,
    "kv_cache": "int8",
    "kv_quant": "per-channel"
  },
  "rewrites": [
    "hierarchical: blocks of 4, top 2, local window 4, 0 sinks [2 layers]",
    "kv_quant: KV cache int8 per-channel, 64 bytes/token [2 layers]"
  ],
  "model": {
    "num_layers": 2,
    "num_heads": 4,
    "num_kv_heads": 2,
    "head_dim": 16,
    "hidden_size": 64,
    "vocab_size": 256,
    "bos_token_id": null,
    "eos_token_ids": [],
    "max_length": 32
  },
  "weights": {
    "dtype": "int8",
    "block_size": 32
  },
  "lowering": {
    "requested": "auto",
    "provider": "cpu",
    "chosen": "edgeattn",
    "per_layer": [
      "edgeattn",
      "edgeattn"
    ],
    "op_per_layer": [
      "edgeattn.HierarchicalAttention",
      "edgeattn.HierarchicalAttention"
    ],
    "not_chosen": {
      "ort": "hierarchical attention has no onnxruntime op",
      "onnx": "hierarchical attention with an int8 KV cache (its onnx form keeps fp32 keys)"
    },
    "op": "edgeattn.HierarchicalAttention",
    "norm_fusion": "standard"
  },
  "files": {
    "model": "model.onnx",
    "tokenizer": "tokenizer.json",
    "tokenizer_config": "tokenizer_config.json",
    "golden": "golden.npz"
  },
  "io": {
    "inputs": {
      "input_ids": [
        "batch",
        "sequence"
      ],
      "attention_mask": [
        "batch",
        "total"
      ]
    },
    "outputs": {
      "logits": [
        "batch",
        1,
        256
      ]
    },
    "cache_names": {
      "past": "past_key_values.{layer}.{kind}",
      "present": "present.{layer}.{kind}"
    },
    "shared_past_present_buffer": true
  },
  "kv_cache": {
    "capacity": 32,
    "dtype": "int8",
    "shape_tail": [
      2,
      32,
      16
    ],
    "ring": false,
    "max_positions": 32,
    "bytes_per_token": 128,
    "bytes_at_capacity": 4096,
    "codec": "int8",
    "quant": "per-channel"
  },
  "chat_format": null,
  "op_histogram": {
    "com.microsoft.MatMulNBits": 15,
    "RMSNormalization": 5,
    "Add": 4,
    "Mul": 4,
    "Reshape": 2,
    "edgeattn.HierarchicalAttention": 2,
    "Sigmoid": 2,
    "com.microsoft.GatherBlockQuantized": 1,
    "Shape": 1,
    "Concat": 1,
    "Slice": 1
  },
  "opset": 23,
  "versions": {
    "torch": "2.13.0+cpu",
    "onnx": "1.23.2",
    "onnxruntime": "1.32.0"
  },
  "calibration": {
    "text": "packaged",
    "sha256": "369da90f2e423c39bfb3f9b15bda3abd8578c50f62bbf519c57940060115e38f",
    "max_tokens": 2048
  },
  "numerics": {
    "passed": true,
    "export": {
      "prompt_tokens": 23,
      "decode_steps": 8,
      "max_abs_logit_error": 9.5367431640625e-07,
      "top1_agreement": 1.0,
      "min_top1_agreement": 0.9,
      "passed": true
    },
    "weights": {
      "prompt_tokens": 23,
      "decode_steps": 8,
      "kl_mean": 0.009311276832928908,
      "max_kl": 0.02,
      "top1_agreement": 1.0,
      "min_top1_agreement": 0.75,
      "passed": true
    }
  },
  "sha256": {
    "golden.npz": "e14be1a3175662d0755d3aa0a94235413ccfd8a6db06f8175ebeaf58b1ccfcf8",
    "model.onnx": "28fbec18533f2a4db45671930df6174eabfa0ddd68d6207936c2e5d005385339",
    "model.onnx.data": "ff6a7c5ae7b6e7582585fbf42c8969646e10d75f595b127196a593b1c0f87b8e",
    "tokenizer.json": "310f8669c61a351004eceb6c98a2e1a148a170da9f39adc114fb69fd84d7fd86",
    "tokenizer_config.json": "6bd82b7f21b2af2d103da2245c83de74bede492f6098506f3ce6768634c6dc59"
  }
}
'''

# The kv_cache of `--block-size 4 --top-blocks 2 --attention-op onnx` (hierarchical attention on standard ops).
HIERARCHICAL_KV_CACHE = {"capacity": 40, "dtype": "float32", "shape_tail": [2, 40, 16], "ring": False, "max_positions": 32,
                         "tokens": 32, "keys_read": 12, "summary_rows": 8, "bytes_per_token": 512,
                         "bytes_at_capacity": 20480, "codec": "fp32", "quant": "per-channel"}

# The smallest manifest the schema accepts, as an older or a hand-made folder has it.
MINIMAL = {"format": "edgeattn", "format_version": 1, "source": {"model": "test"}, "spec": {}, "weights": {"dtype": "fp32"},
           "files": {"model": "model.onnx", "tokenizer": "tokenizer.json"},
           "model": {"num_layers": 2, "vocab_size": 256, "max_length": 32},
           "io": {"cache_names": {"past": "past.{layer}.{kind}", "present": "present.{layer}.{kind}"}},
           "kv_cache": {"capacity": 32, "dtype": "float32", "shape_tail": [2, 32, 16], "ring": False,
                        "bytes_per_token": 512, "codec": "fp32"}}


def _folder(tmp_path, text: str):
    """A folder holding ``text`` as its manifest and an empty file for every file it names."""
    for name in json.loads(text)["files"].values():
        (tmp_path / name).write_bytes(b"")
    (tmp_path / MANIFEST_NAME).write_text(text, encoding="utf-8")
    return tmp_path


def test_a_manifest_written_by_an_earlier_convert_round_trips_to_the_same_dict_and_bytes():
    written = json.loads(WRITTEN_BY_CONVERT)
    manifest = Manifest.from_dict(written)
    assert manifest.to_dict() == written
    assert json.dumps(manifest.to_dict(), indent=2) + "\n" == WRITTEN_BY_CONVERT  # key order too


def test_a_folder_written_by_an_earlier_convert_reads_as_attributes_and_writes_back_unchanged(tmp_path):
    folder = _folder(tmp_path, WRITTEN_BY_CONVERT)
    manifest = read_manifest(folder)
    assert manifest.source.model == "tiny-llama" and manifest.source.weights_sha256 is None
    assert manifest.weights.dtype == "int8" and manifest.weights.block_size == 32
    assert manifest.model.num_layers == 2 and manifest.model.eos_token_ids == []
    assert manifest.files.golden == "golden.npz" and manifest.files.chat_template is None
    assert manifest.io.cache_names.past == "past_key_values.{layer}.{kind}"
    assert manifest.kv_cache.cache_tokens == manifest.kv_cache.capacity == 32
    assert manifest.lowering.op == "edgeattn.HierarchicalAttention" and manifest.spec["block_size"] == 4
    assert manifest.calibration.text == "packaged" and manifest.numerics["passed"]
    assert manifest.chat_format is None and len(manifest.sha256) == 5
    (folder / MANIFEST_NAME).unlink()
    write_manifest(folder, manifest)
    assert (folder / MANIFEST_NAME).read_text(encoding="utf-8") == WRITTEN_BY_CONVERT


def test_cache_tokens_leave_out_the_rows_that_hold_block_summaries():
    kv = KVCacheInfo.from_dict(HIERARCHICAL_KV_CACHE)
    assert (kv.capacity, kv.tokens, kv.cache_tokens) == (40, 32, 32)
    assert kv.to_dict() == HIERARCHICAL_KV_CACHE and list(kv.to_dict()) == list(HIERARCHICAL_KV_CACHE)


def test_absent_keys_stay_absent_and_null_ones_stay_null():
    manifest = Manifest.from_dict(MINIMAL)
    assert manifest.to_dict() == MINIMAL
    assert manifest.weights.block_size is None and manifest.kv_cache.max_positions is None
    assert manifest.chat_format is None and manifest.sha256 is None and manifest.model.eos_token_ids is None
    nulls = copy.deepcopy(MINIMAL)
    nulls.update(chat_format=None)
    nulls["weights"]["block_size"] = None
    nulls["kv_cache"].update(max_positions=None, quant=None)
    nulls["source"]["weights_sha256"] = None
    assert Manifest.from_dict(nulls).to_dict() == nulls


def test_keys_this_edgeattn_does_not_know_are_kept():
    newer = copy.deepcopy(MINIMAL)
    newer.update(signature={"by": "ci", "keys": [1, 2]}, extra=1, absent=None)
    newer["kv_cache"]["layout_version"] = 3
    newer["files"]["draft_model"] = "draft.onnx"
    newer["io"]["cache_names"]["scales"] = "scales.{layer}.{kind}"
    manifest = Manifest.from_dict(newer)
    assert manifest.to_dict() == newer
    assert manifest.extra["signature"] == {"by": "ci", "keys": [1, 2]}
    assert manifest.files.extra == {"draft_model": "draft.onnx"}


def test_the_record_shares_no_lists_or_dicts_with_the_dict_it_came_from():
    source = json.loads(WRITTEN_BY_CONVERT)
    manifest = Manifest.from_dict(source)
    source["spec"]["window"] = 99
    source["kv_cache"]["shape_tail"].append(1)
    assert manifest.spec["window"] is None and manifest.kv_cache.shape_tail == [2, 32, 16]
    manifest.to_dict()["numerics"]["passed"] = False
    assert manifest.numerics["passed"]


def test_a_dict_the_schema_refuses_is_no_manifest():
    damaged = copy.deepcopy(MINIMAL)
    del damaged["kv_cache"]["codec"]
    with pytest.raises(ManifestError, match="codec"):
        Manifest.from_dict(damaged)


def test_a_manifest_the_runtime_would_refuse_is_not_written(tmp_path):
    folder = _folder(tmp_path, json.dumps(MINIMAL))
    (folder / MANIFEST_NAME).unlink()
    manifest = Manifest.from_dict(MINIMAL)
    float64 = dataclasses.replace(manifest, kv_cache=dataclasses.replace(manifest.kv_cache, dtype="float64"))
    with pytest.raises(ManifestError, match="dtype"):
        write_manifest(folder, float64)
    elsewhere = dataclasses.replace(manifest, files=FilesInfo(model="../model.onnx", tokenizer="tokenizer.json"))
    with pytest.raises(ManifestError, match="outside the folder"):
        write_manifest(folder, elsewhere)
    assert not (folder / MANIFEST_NAME).exists()
    write_manifest(folder, manifest)
    assert read_manifest(folder) == manifest
