#!/usr/bin/env python3
"""Writes the fuzz targets' seed corpora (tests/fuzz/corpus/<target>/):
small valid inputs of each format, and a few near misses. Run from the
repository root after `bazel build //proto:py_protos`:
    PYTHONPATH=bazel-bin /usr/bin/python3 tests/fuzz/make_seeds.py
"""
import json
import os
import struct

from proto import collective_pb2, expert_pb2, status_pb2, tensor_pb2

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus")


def write(target, name, data):
    os.makedirs(os.path.join(ROOT, target), exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    with open(os.path.join(ROOT, target, name), "wb") as f:
        f.write(data)


def tensor(shape, values=None, dtype=tensor_pb2.DTYPE_FP32):
    count = 1
    for d in shape:
        count *= d
    values = values if values is not None else [0.5] * count
    return tensor_pb2.Tensor(shape=shape, dtype=dtype, data=struct.pack(f"<{len(values)}f", *values))


# Tensors.
write("tensor_codec", "batch", tensor([2, 4]).SerializeToString())
write("tensor_codec", "empty", tensor([0, 4]).SerializeToString())
write("tensor_codec", "bf16", tensor_pb2.Tensor(shape=[1, 4], dtype=tensor_pb2.DTYPE_BF16,
                                               data=b"\x80\x3f" * 4).SerializeToString())
write("tensor_codec", "short", tensor_pb2.Tensor(shape=[2, 4], dtype=tensor_pb2.DTYPE_FP32,
                                                data=b"\0" * 7).SerializeToString())
write("tensor_codec", "nan", tensor([1, 4], [float("nan")] * 4).SerializeToString())

# Ring segments: two cut bytes, then a RingChunk.
chunk = collective_pb2.RingChunk(id=collective_pb2.CollectiveId(step=3, group_id=7), sender_rank=1,
                                 phase=collective_pb2.RING_PHASE_REDUCE_SCATTER, ring_step=2,
                                 chunk_index=1, offset_elements=64, buffer_elements=1000,
                                 data=struct.pack("<5f", 1, 2, 3, 4, 5), sequence_id=4)
write("ring_segment", "segment", b"\x03\x11" + chunk.SerializeToString())
write("ring_segment", "no_data", b"\x00\x00" + collective_pb2.RingChunk(
    id=collective_pb2.CollectiveId(step=1)).SerializeToString())
write("ring_segment", "truncated", b"\x05\x09" + chunk.SerializeToString()[:-3])

# Weight chunks: one-byte length, then an ExpertWeightsChunk (d_model 4, d_ff 8).
def chunk_of(kind, shape, data, last=False, offset=0, expert=1):
    return expert_pb2.ExpertWeightsChunk(expert_id=expert, kind=kind, shape=shape, offset_bytes=offset,
                                         data=data, last=last).SerializeToString()


def framed(*messages):
    out = b""
    for m in messages:
        assert len(m) < 256
        out += bytes([len(m)]) + m
    return out


K = expert_pb2
write("weight_chunks", "complete", framed(
    chunk_of(K.EXPERT_TENSOR_KIND_W1_WEIGHT, [4, 8], b"\0" * 128),
    chunk_of(K.EXPERT_TENSOR_KIND_W1_BIAS, [8], b"\0" * 32),
    chunk_of(K.EXPERT_TENSOR_KIND_W2_WEIGHT, [8, 4], b"\0" * 128),
    chunk_of(K.EXPERT_TENSOR_KIND_W2_BIAS, [4], b"\0" * 16, last=True)))
write("weight_chunks", "far_offset", framed(
    chunk_of(K.EXPERT_TENSOR_KIND_W1_BIAS, [8], b"\0" * 8, offset=(1 << 63) - 4)))
write("weight_chunks", "wrong_shape", framed(chunk_of(K.EXPERT_TENSOR_KIND_W1_BIAS, [9], b"\0" * 4)))

# Serving configs.
write("config", "hybrid", """model { d_model: 8 d_ff: 16 num_experts: 4 top_k: 2 seed: 1 }
cluster {
  servers { name: "a" address: "127.0.0.1:1" }
  servers { name: "b" address: "127.0.0.1:2" }
  strategy: PLACEMENT_STRATEGY_HYBRID
}
""")
write("config", "dynamic", """model { d_model: 8 d_ff: 16 num_experts: 3 top_k: 1
  overflow: OVERFLOW_POLICY_DROP capacity_factor: 1.5 }
cluster {
  servers { name: "a" address: "x:1" }
  strategy: PLACEMENT_STRATEGY_DYNAMIC
  load_profile { expert_load: [1, 5, 2] }
  slots_per_server: 3
}
""")

# Safetensors: header length, JSON header, data.
def safetensors(header, data):
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


write("safetensors", "two", safetensors(
    {"a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]},
     "b": {"dtype": "BF16", "shape": [3], "data_offsets": [16, 22]},
     "__metadata__": {"format": "pt"}}, b"\0" * 22))
write("safetensors", "overlap", safetensors(
    {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
     "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}}, b"\0" * 24))
write("safetensors", "huge_length", struct.pack("<Q", 1 << 40) + b"{}")
write("safetensors", "f16_and_i64", safetensors(
    {"a": {"dtype": "F16", "shape": [2], "data_offsets": [0, 4]},
     "b": {"dtype": "I64", "shape": [1], "data_offsets": [4, 12]}}, b"\0\x3c\0\xc0" + b"\0" * 8))

# Checkpoint indexes (the directory holds model-00001-of-00001.safetensors
# of d_model 4, d_ff 8, 2 experts).
shard = "model-00001-of-00001.safetensors"
names = ["gate.weight"] + [f"experts.{e}.{w}.{k}" for e in range(2) for w in ("w1", "w2")
                           for k in ("weight", "bias")]
write("checkpoint_index", "complete", json.dumps(
    {"metadata": {"total_size": 0, "step": "1", "lineage": "x"},
     "weight_map": {n: shard for n in names}}))
write("checkpoint_index", "escape", json.dumps(
    {"weight_map": dict({n: shard for n in names}, **{"gate.weight": "../x.safetensors"})}))
write("checkpoint_index", "missing", json.dumps({"weight_map": {"gate.weight": shard}}))

# Dispatch requests (d_model 4; experts 0 and 2 hosted).
write("dispatch", "forward", expert_pb2.DispatchRequest(
    sequence_id=1, expert_id=0, tokens=tensor([3, 4])).SerializeToString())
write("dispatch", "training", expert_pb2.DispatchRequest(
    sequence_id=2, expert_id=2, tokens=tensor([2, 4]), training=True,
    request_id=9).SerializeToString())
write("dispatch", "versioned", expert_pb2.DispatchRequest(
    sequence_id=3, expert_id=2, tokens=tensor([1, 4]),
    version=expert_pb2.StateVersion(placement_epoch=1, weights_step=0)).SerializeToString())
write("dispatch", "backward", expert_pb2.BackwardDispatchRequest(
    sequence_id=4, expert_id=2, request_id=9, grad_output=tensor([2, 4])).SerializeToString())
write("dispatch", "other_layer", expert_pb2.DispatchRequest(
    sequence_id=5, expert_id=0, layer=3, tokens=tensor([1, 4])).SerializeToString())

# Dispatch answers: two cut bytes, then a DispatchResponse.
answer = expert_pb2.DispatchResponse(sequence_id=6, output=tensor([2, 4]), compute_micros=10,
                                     compute_dtype=tensor_pb2.DTYPE_FP32)
write("dispatch_answer", "answer", b"\x05\x0b" + answer.SerializeToString())
write("dispatch_answer", "bf16", b"\x01\x02" + expert_pb2.DispatchResponse(
    sequence_id=7, output=tensor_pb2.Tensor(shape=[1, 4], dtype=tensor_pb2.DTYPE_BF16,
                                            data=b"\x80\x3f" * 4)).SerializeToString())
write("dispatch_answer", "error", b"\x00\x03" + expert_pb2.DispatchResponse(
    sequence_id=8, error=status_pb2.Status(code=5, message="not hosted"),
    server_version=expert_pb2.StateVersion(placement_epoch=2)).SerializeToString())
write("dispatch_answer", "output_then_error", b"\x07\x13" + answer.SerializeToString() +
      expert_pb2.DispatchResponse(error=status_pb2.Status(code=13)).SerializeToString())
write("dispatch_answer", "truncated", b"\x04\x09" + answer.SerializeToString()[:-5])
