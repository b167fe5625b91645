"""Tests of the recurrent SST classifier (dmx.models.recurrent)."""

import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dmx.models import recurrent

SENTENCES = [['A', 'fine', 'film', '.'], ['dull'], ['not', 'good', ',', 'not', 'bad'],
             ['fine', 'and', 'good']]


def tiny(cell='gru', bidirectional=True, seed=0):
  vocabulary = recurrent.build_vocabulary(SENTENCES, min_count=1)
  model = recurrent.RecurrentModel(recurrent.RecurrentConfig.tiny(
      len(vocabulary), cell=cell, bidirectional=bidirectional))
  return model, model.init(jax.random.key(seed)), vocabulary


def test_vocabulary_and_encoding():
  vocabulary = recurrent.build_vocabulary(SENTENCES, min_count=2)
  # lower-cased, counted, most frequent first; singletons become <unk>
  assert vocabulary.words == ('<pad>', '<unk>', 'fine', 'good', 'not')
  batch = recurrent.encode_words([['Fine', 'unseen'], ['not']], vocabulary, length=3)
  np.testing.assert_array_equal(batch['input_ids'], [[2, 1, 0], [4, 0, 0]])
  np.testing.assert_array_equal(batch['mask'], [[1, 1, 0], [1, 0, 0]])
  with pytest.raises(ValueError, match='more than length'):
    recurrent.encode_words([['a', 'b']], vocabulary, length=1)
  with pytest.raises(ValueError, match='no words'):
    recurrent.encode_words([[]], vocabulary)
  with pytest.raises(ValueError, match='starts with'):
    recurrent.Vocabulary.from_words(['a', 'b'])


@pytest.mark.parametrize('cell, bidirectional', [('gru', True), ('gru', False), ('lstm', True)])
def test_outputs_do_not_depend_on_padding(cell, bidirectional):
  model, params, vocabulary = tiny(cell, bidirectional)
  short = recurrent.encode_words(SENTENCES, vocabulary)
  long = recurrent.encode_words(SENTENCES, vocabulary, length=12)
  # the padding ids are replaced by arbitrary words: the model must never read them
  long['input_ids'] = np.where(long['mask'], long['input_ids'], 3)
  forward = jax.jit(model.forward)
  logits_short, states = forward(params, short)
  logits_long, _ = forward(params, long)
  np.testing.assert_allclose(logits_short, logits_long, rtol=1e-5, atol=1e-6)
  assert logits_short.shape == (4, 5)
  assert [s.shape[-1] for s in states] == list(model.state_dims)


def test_backward_direction_reads_the_sentence_reversed():
  """The bidirectional final state equals a unidirectional GRU run on the reversed words."""
  model, params, vocabulary = tiny()
  batch = recurrent.encode_words(SENTENCES, vocabulary, length=6)
  _, (h0, h1) = jax.jit(model.forward)(params, batch)
  hidden = model.config.hidden_dim
  cell_params = params['params']['backward_rnn']['cell']
  cell = recurrent.nn.GRUCell(features=hidden)
  step = jax.jit(lambda carry, inputs: cell.apply({'params': cell_params}, carry, inputs)[0])
  for row, words in enumerate(SENTENCES):
    carry = jnp.zeros((hidden,))
    for position in reversed(range(len(words))):
      carry = step(carry, h0[row, position])
    np.testing.assert_allclose(h1[row, 0, hidden:], carry, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('layer_index', [0, 1])
@pytest.mark.parametrize('traced', [False, True], ids=['static', 'traced'])
def test_forward_from_with_identity_is_the_clean_pass(layer_index, traced):
  model, params, vocabulary = tiny()
  batch = recurrent.encode_words(SENTENCES, vocabulary)
  logits, states = jax.jit(model.forward)(params, batch)

  def resume(states, index, scale):
    return model.forward_from(params, batch, states, index, lambda _, h: h * scale)

  if traced:  # a traced index dispatches with lax.switch
    resume = jax.jit(resume)
  else:
    resume = jax.jit(resume, static_argnums=1)
  np.testing.assert_allclose(resume(states, layer_index, 1.0), logits, rtol=1e-6, atol=1e-6)
  assert not np.allclose(resume(states, layer_index, 0.0), logits)


def test_train_save_and_load(tmp_path):
  labels = [3, 0, 2, 4]
  trained = recurrent.train_recurrent_classifier(
      SENTENCES, labels, SENTENCES, labels, config_overrides=dict(embedding_dim=8, hidden_dim=8),
      min_count=1, epochs=30, batch_size=4, learning_rate=3e-2, embedding_dropout=0.0,
      progress=False)
  assert trained.dev_accuracy == 1.0  # four sentences are easy to memorise
  assert len(trained.history) == 30
  recurrent.save_recurrent(tmp_path / 'model', trained, dict(note='test'))
  loaded, metadata = recurrent.load_recurrent(tmp_path / 'model')
  assert metadata['note'] == 'test' and loaded.vocabulary == trained.vocabulary
  batch = recurrent.encode_words(SENTENCES, loaded.vocabulary)
  np.testing.assert_allclose(loaded.model.forward(loaded.params, batch)[0],
                             trained.model.forward(trained.params, batch)[0], rtol=1e-6)
  with pytest.raises(recurrent.checkpoint.CheckpointError, match='not a dmx recurrent'):
    recurrent.checkpoint.save(tmp_path / 'other', {'x': np.zeros(2)}, {'kind': 'toy'})
    recurrent.load_recurrent(tmp_path / 'other')


def test_bad_config_is_a_one_line_error():
  with pytest.raises(ValueError, match='cell'):
    recurrent.RecurrentConfig(vocab_size=10, cell='rnn')
  with pytest.raises(ValueError, match='vocab_size'):
    recurrent.RecurrentConfig(vocab_size=1)


def test_word_pieces_are_bert_inputs(minilm_tokenizer):
  batch = recurrent.encode_pieces([['unforgettable', 'film'], ['dull']], minilm_tokenizer)
  expected = [minilm_tokenizer(' '.join(words))['input_ids']
              for words in (['unforgettable', 'film'], ['dull'])]
  assert batch['input_ids'].shape == (2, len(expected[0]))
  assert list(batch['input_ids'][0]) == expected[0]
  assert list(batch['input_ids'][1, :3]) == expected[1] and not batch['mask'][1, 3:].any()
  assert expected[0][0] == minilm_tokenizer.cls_token_id
  assert expected[0][-1] == minilm_tokenizer.sep_token_id
  with pytest.raises(ValueError, match='more than length=2'):
    recurrent.encode_pieces([['dull']], minilm_tokenizer, length=2)


def test_frozen_pretrained_embeddings_stay_fixed_and_round_trip(tmp_path, minilm_tokenizer):
  labels = [3, 0, 2, 4]
  table = np.random.default_rng(0).normal(size=(len(minilm_tokenizer), 6)).astype(np.float32)
  trained = recurrent.train_recurrent_classifier(
      SENTENCES, labels, SENTENCES, labels, config_overrides=dict(hidden_dim=6,
                                                                  bidirectional=False),
      epochs=3, batch_size=4, learning_rate=3e-2, progress=False, tokenizer=minilm_tokenizer,
      frozen_embeddings=table)
  params = trained.params['params']
  np.testing.assert_array_equal(np.asarray(params['embedding']['embedding']), table)
  untrained = trained.model.init(jax.random.key(0))['params']
  assert not np.allclose(params['classifier']['kernel'], untrained['classifier']['kernel'])
  assert trained.vocabulary is None and trained.model.config.embedding_dim == 6
  assert list(trained.token_counts(SENTENCES)) == [
      len(minilm_tokenizer(list(words), is_split_into_words=True)['input_ids'])
      for words in SENTENCES]

  recurrent.save_recurrent(tmp_path / 'model', trained)
  loaded, metadata = recurrent.load_recurrent(tmp_path / 'model')
  assert metadata['tokens'] == 'word pieces' and loaded.vocabulary is None
  batch = loaded.encode(SENTENCES)
  np.testing.assert_array_equal(batch['input_ids'], trained.encode(SENTENCES)['input_ids'])
  np.testing.assert_allclose(loaded.model.forward(loaded.params, batch)[0],
                             trained.model.forward(trained.params, batch)[0], rtol=1e-6)
  shutil.rmtree(tmp_path / 'model' / recurrent.TOKENIZER_FOLDER)
  with pytest.raises(recurrent.checkpoint.CheckpointError, match='without its tokenizer'):
    recurrent.load_recurrent(tmp_path / 'model')


def test_frozen_embeddings_must_match_the_tokenizer(minilm_tokenizer):
  with pytest.raises(ValueError, match='pass the tokenizer'):
    recurrent.train_recurrent_classifier(SENTENCES, [0, 1, 2, 3], SENTENCES, [0, 1, 2, 3],
                                         frozen_embeddings=np.zeros((10, 4)), progress=False)
  with pytest.raises(ValueError, match='vocabulary'):
    recurrent.train_recurrent_classifier(SENTENCES, [0, 1, 2, 3], SENTENCES, [0, 1, 2, 3],
                                         tokenizer=minilm_tokenizer,
                                         frozen_embeddings=np.zeros((10, 4)), progress=False)
