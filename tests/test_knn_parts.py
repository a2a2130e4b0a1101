"""bench.experiments.knn_parts: the lite call's parts, timed (the numbers are for reading; here: they are there)."""
import json

from bench.experiments import knn_parts


def test_every_part_is_timed(lite_engine_dir, tmp_path):
    out = tmp_path / "parts.json"
    assert knn_parts.main(["--engine-dir", str(lite_engine_dir), "--iters", "2", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["features_shape"][1] == 4096 and report["n"] == 400
    parts = ("cnn_features_ms", "transpose_numpy_ms", "transpose_opencv_ms", "sample_product_ms",
             "panel_products_ms", "selection_pass_ms")
    assert all(report[key] > 0 for key in parts) and report["call_ms"] > report["panel_products_ms"]
