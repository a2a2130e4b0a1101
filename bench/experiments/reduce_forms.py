"""Micro-benchmark: the deformable-attention weighted sum over 16 samples, in two ONNX forms (run once
on an H200, bench/results/reduce_forms_cuda-h200_2026-11-26.json; bench/gpu/op_forms.py times the forms
the export chooses between)."""
import json
import os
import time

import numpy as np
from onnx import helper as h, TensorProto as T
import onnxruntime as ort
ort.preload_dlls()
B, D, Q, P = 40, 32, 13294, 16
def model(kind):
    if kind == "last":   # (B,D,Q,P) * (B,1,Q,P) -> ReduceSum axis -1 (the export's form)
        x = h.make_tensor_value_info("v", T.FLOAT, [B, D, Q, P]); w = h.make_tensor_value_info("w", T.FLOAT, [B, 1, Q, P])
        ax = h.make_tensor("ax", T.INT64, [1], [-1]); out = [B, D, Q]
    else:                # (P,B,D,Q) * (P,B,1,Q) -> ReduceSum axis 0
        x = h.make_tensor_value_info("v", T.FLOAT, [P, B, D, Q]); w = h.make_tensor_value_info("w", T.FLOAT, [P, B, 1, Q])
        ax = h.make_tensor("ax", T.INT64, [1], [0]); out = [B, D, Q]
    y = h.make_tensor_value_info("y", T.FLOAT, out)
    nodes = [h.make_node("Mul", ["v", "w"], ["m"]), h.make_node("ReduceSum", ["m", "ax"], ["y"], keepdims=0)]
    g = h.make_graph(nodes, kind, [x, w], [y], initializer=[ax])
    return h.make_model(g, opset_imports=[h.make_opsetid("", 17)], ir_version=8)
res = {}
for kind in ("last", "first"):
    s = ort.InferenceSession(model(kind).SerializeToString(), providers=["CUDAExecutionProvider"])
    shp = [i.shape for i in s.get_inputs()]
    feeds = {i.name: ort.OrtValue.ortvalue_from_numpy(np.random.rand(*i.shape).astype(np.float32), "cuda", 0) for i in s.get_inputs()}
    io = s.io_binding()
    for k, v in feeds.items(): io.bind_ortvalue_input(k, v)
    io.bind_output("y", "cuda")
    for _ in range(3): s.run_with_iobinding(io)
    t = time.perf_counter(); n = 20
    for _ in range(n): s.run_with_iobinding(io)
    io.synchronize_outputs()
    res[kind] = (time.perf_counter() - t) / n * 1e3
    print(kind, shp, f"{res[kind]:.3f} ms a call", flush=True)
json.dump(res, open(os.path.join(os.environ.get("OUT", "."), "reduce_forms.json"), "w"))
