"""Shared pytest fixtures for the dmx unit tests."""

import jax
import pytest


@pytest.fixture(params=[jax.jit, lambda function: function], ids=['jit', 'nojit'])
def jit_or_not(request):
  """Wraps a function with ``jax.jit`` or leaves it as is, to test both paths."""
  return request.param
