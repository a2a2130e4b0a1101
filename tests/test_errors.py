"""runtime.errors.engine_failure: an engine's failure in one line, with what to lower when memory ran out."""
from pathlib import Path

import pytest

from runtime.errors import OUT_OF_MEMORY_HINT, EngineError, engine_failure

ORT_OOM = ("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : Non-zero status code returned while running MatMul node. "
           "Name:'/blocks.2/attn/MatMul' Status Message: bfc_arena.cc:359 AllocateRawInternal Failed to allocate memory "
           "for requested buffer of size 805306368\nstack line 2")


def test_out_of_memory_gets_the_hint_once_and_other_failures_none():
    error = engine_failure("sam_encoder failed", RuntimeError(ORT_OOM))
    assert isinstance(error, EngineError) and "\n" not in str(error)
    assert str(error).startswith("sam_encoder failed: [ONNXRuntimeError]") and str(error).endswith(f"({OUT_OF_MEMORY_HINT})")
    wrapped = engine_failure("gdino_head failed", error)  # a runner's error, wrapped again by its stage
    assert str(wrapped).count(OUT_OF_MEMORY_HINT) == 1
    assert OUT_OF_MEMORY_HINT in str(engine_failure("x", RuntimeError("CUDA failure 2: out of memory")))
    assert OUT_OF_MEMORY_HINT in str(engine_failure("x", MemoryError("std::bad_alloc")))
    plain = engine_failure("sam_decoder failed on 3 boxes", RuntimeError("Got invalid dimensions for input: boxes"))
    assert str(plain) == "sam_decoder failed on 3 boxes: Got invalid dimensions for input: boxes"
    assert str(engine_failure("x", RuntimeError())) == "x: RuntimeError"


def test_a_stage_that_runs_out_of_memory_says_what_to_lower(full_tiny_engine_dir, monkeypatch):
    from runtime.image_io import read_image
    from runtime.pipeline import Pipeline

    pipeline = Pipeline.open(full_tiny_engine_dir, dataset="mvtec", category="bottle")

    class OutOfMemory:
        def run(self, *args, **kwargs):
            raise RuntimeError(ORT_OOM)

    monkeypatch.setattr(pipeline.segmenter, "_encoder_runner", OutOfMemory())
    with pytest.raises(EngineError) as caught:
        pipeline(read_image(Path(__file__).parent / "data" / "bottle_demo.png"))
    assert str(caught.value).startswith("sam_encoder failed: ") and "decoder_chunk" in str(caught.value)
