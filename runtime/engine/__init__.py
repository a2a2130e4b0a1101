"""What runs the graphs: onnxruntime sessions and runners, the custom-op library, and the
host and device work around them (resizing, pixel canvases, memory bounds, timing)."""
