"""The scale benchmark's model shapes are the real models': with their own vocabularies and embeddings, the
planner's parameter counts from these configs give the published totals."""

from __future__ import annotations

import pytest
from transformers import LlamaConfig

from bench.scale_bench import SHAPES
from tasks.planning.shapes import model_shape


@pytest.mark.parametrize(("shape", "vocab", "tied", "published"), [
    ("tinyllama", 32000, False, 1_100_048_384),  # TinyLlama-1.1B
    ("llama-3.1-8b", 128256, False, 8_030_261_248),
    ("llama-3.1-70b", 128256, False, 70_553_706_496),
])
def test_shapes_give_the_published_parameter_counts(shape, vocab, tied, published):
    planned = model_shape(LlamaConfig(**SHAPES[shape], vocab_size=vocab, tie_word_embeddings=tied))
    assert planned.layers * planned.block_params + planned.stem_params == published
