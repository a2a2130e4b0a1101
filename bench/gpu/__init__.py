"""The runtime measured on a machine with a GPU: `python -m bench.gpu --out DIR` (bench/gpu/README.md).

run.py orders the steps and keeps to the budget, plan.py holds the estimates and the decisions,
op_forms.py times export forms one layer at a time, compare.py checks configurations against
the faithful path, kernel_times.py profiles every CUDA kernel per stage and profile_graphs.py
summarises onnxruntime's own profiler per graph.
"""
