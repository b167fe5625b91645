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


def tiny_toy(num_examples: int, data_seed: int = 0):
  """``(model, frozen_params, batch)``: the tiny toy classifier (random, key 0) and one toy batch."""
  from dmx.data.toy import generate_toy_data  # pylint: disable=import-outside-toplevel
  from dmx.models.toy import ToyModel, ToyModelConfig  # pylint: disable=import-outside-toplevel
  model = ToyModel(ToyModelConfig.tiny())
  return (model, model.init(jax.random.key(0)),
          generate_toy_data(data_seed, num_examples=num_examples).as_batch())


def tiny_bert(tokenizer, seed: int, **overrides):
  """``(model, params)`` of a random 2-layer BERT over ``tokenizer``'s vocabulary (128 positions)."""
  from dmx.models.bert import BertConfig, BertModel  # pylint: disable=import-outside-toplevel
  config = BertConfig.tiny(vocab_size=tokenizer.vocab_size, max_position_embeddings=128,
                           **overrides)
  model = BertModel(config)
  return model, model.init(jax.random.key(seed), 8)


@pytest.fixture(scope='session')
def sst_model_folder(tmp_path_factory, minilm_tokenizer):
  """A random tiny SST-5 classifier saved as a Hugging Face folder with MiniLM's tokenizer."""
  from dmx.models import hf_import  # pylint: disable=import-outside-toplevel
  model, params = tiny_bert(minilm_tokenizer, 0, head='classification', num_labels=5)
  return hf_import.save_pretrained(tmp_path_factory.mktemp('sst') / 'model', model, params,
                                   minilm_tokenizer)
