"""Shared pytest fixtures for the dmx unit tests."""

import jax
import pytest


@pytest.fixture(params=[jax.jit, lambda function: function], ids=['jit', 'nojit'])
def jit_or_not(request):
  """Wraps a function with ``jax.jit`` or leaves it as is, to test both paths."""
  return request.param


@pytest.fixture(scope='session')
def minilm_folder():
  """The real all-MiniLM-L6-v2 checkpoint folder; fails (never skips) without its package."""
  from dmx.models.hf_import import ModelLoadError, bundled_minilm_folder  # pylint: disable=import-outside-toplevel
  try:
    return bundled_minilm_folder()
  except ModelLoadError as error:
    pytest.fail(str(error))


@pytest.fixture(scope='session')
def minilm_tokenizer(minilm_folder):
  """MiniLM's fast uncased WordPiece tokenizer."""
  import transformers  # pylint: disable=import-outside-toplevel
  return transformers.AutoTokenizer.from_pretrained(str(minilm_folder))
