"""The toy-task notebook runs end to end (with tiny sizes) and holds no library logic."""

import ast
import os
import re
from pathlib import Path

import pytest

nbformat = pytest.importorskip('nbformat')
nbclient = pytest.importorskip('nbclient')

REPO_ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO_ROOT / 'notebooks' / 'toy_task.ipynb'

TINY_PARAMETERS = """\
from dmx.pipelines.toy import ToyExperimentConfig
config = ToyExperimentConfig.tiny(num_examples=300, epochs=1, diffmask_steps=30)
log_every = 10
num_shown = 2
progress = False
"""


def _code_cells(notebook):
  return [cell for cell in notebook.cells if cell.cell_type == 'code']

def _execute(notebook, tmp_path, monkeypatch, timeout: int) -> None:
  """Runs every cell in a fresh kernel; raises CellExecutionError on the first failing cell.

  ``DMX_KEEP_EXECUTED_NOTEBOOK=path`` saves the executed copy, to look at by hand.
  """
  # the kernel inherits this environment: dmx importable from the checkout, no display needed
  python_path = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get('PYTHONPATH')) if p)
  monkeypatch.setenv('PYTHONPATH', python_path)
  monkeypatch.setenv('MPLBACKEND', 'Agg')
  monkeypatch.setenv('JAX_PLATFORMS', 'cpu')
  client = nbclient.NotebookClient(notebook, timeout=timeout, kernel_name='python3',
                                   resources={'metadata': {'path': str(tmp_path)}})
  client.execute()
  if os.environ.get('DMX_KEEP_EXECUTED_NOTEBOOK'):
    nbformat.write(notebook, os.environ['DMX_KEEP_EXECUTED_NOTEBOOK'])


def _check_executed(notebook, min_figures: int) -> str:
  """Asserts every code cell ran without error and drew enough figures; returns the printed text."""
  code_cells = _code_cells(notebook)
  assert all(cell.execution_count is not None for cell in code_cells), 'a code cell did not run'
  errors = [output for cell in code_cells for output in cell.outputs
            if output.output_type == 'error']
  assert not errors, errors
  images = [output for cell in code_cells for output in cell.outputs
            if output.output_type == 'display_data' and 'image/png' in output.get('data', {})]
  assert len(images) >= min_figures, f'expected at least {min_figures} figures, got {len(images)}'
  return ''.join(output.get('text', '') for cell in code_cells for output in cell.outputs
                 if output.output_type == 'stream')



def _parameters_cells(notebook):
  return [cell for cell in _code_cells(notebook) if 'parameters' in cell.metadata.get('tags', [])]


def _python_source(cell) -> str:
  # IPython magics ('%matplotlib inline') are not Python; blank them out before parsing
  return re.sub(r'^\s*[%!].*$', '', cell.source, flags=re.MULTILINE)


@pytest.fixture(scope='module')
def notebook():
  return nbformat.read(NOTEBOOK, as_version=4)


def test_notebook_is_stored_without_outputs(notebook):
  for cell in _code_cells(notebook):
    assert cell.outputs == [] and cell.execution_count is None, cell.source[:80]


def test_parameters_cell_is_tagged_and_holds_the_real_defaults(notebook):
  cells = _parameters_cells(notebook)
  assert len(cells) == 1, 'exactly one code cell must be tagged "parameters"'
  assert 'config = ToyExperimentConfig()' in cells[0].source
  # the parameters sit near the top, before any data is generated or model trained
  index = _code_cells(notebook).index(cells[0])
  assert index <= 2, index


def test_notebook_defines_no_functions_or_classes(notebook):
  for cell in _code_cells(notebook):
    tree = ast.parse(_python_source(cell))
    for node in ast.walk(tree):
      assert not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)), (
          f'library logic belongs in dmx, not in the notebook: {cell.source[:80]!r}')
    assert not re.search(r'^\s*(def|class)\s', cell.source, flags=re.MULTILINE)


def test_notebook_runs_with_tiny_parameters(notebook, tmp_path, monkeypatch):
  cells = _parameters_cells(notebook)
  assert len(cells) == 1
  cells[0].source = TINY_PARAMETERS
  _execute(notebook, tmp_path, monkeypatch, timeout=600)

  # ground truth, loss curve, bottleneck, training curves, two keep-probability heatmaps
  text = _check_executed(notebook, min_figures=6)
  assert 'accuracy: train' in text and 'diffmask hidden' in text and 'uniform' in text


# ---------------------------------------------------------------------------
# The SST analysis notebook: reads finished ``dmx diffmask sst`` runs (here: tiny ones)

SST_NOTEBOOK = REPO_ROOT / 'notebooks' / 'sst_analysis.ipynb'


def test_sst_notebook_runs_on_tiny_diffmask_runs(tmp_path, monkeypatch, sst_model_folder):
  from tests.test_diffmask_text import parse, sst_args
  from dmx.pipelines import diffmask_text

  sst_notebook = nbformat.read(SST_NOTEBOOK, as_version=4)
  code_cells = _code_cells(sst_notebook)
  for cell in code_cells:  # stored clean, and no library logic in the notebook
    assert cell.outputs == [] and cell.execution_count is None, cell.source[:80]
    assert not any(isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
                   for node in ast.walk(ast.parse(_python_source(cell)))), cell.source[:80]
  cells = _parameters_cells(sst_notebook)
  assert len(cells) == 1 and code_cells.index(cells[0]) <= 2
  assert "'runs/sst_minilm/model'" in cells[0].source
  assert "'runs/sst_minilm_diffmask_input'" in cells[0].source
  assert "'runs/sst_minilm_diffmask_hidden'" in cells[0].source

  model_folder = sst_model_folder
  run_dirs = {gate: str(tmp_path / f'run_{gate}') for gate in ('input', 'hidden')}
  for gate, folder in run_dirs.items():  # 2 steps, 8 dev sentences: a smoke test of the plumbing
    options = {'--steps': '2', '--max-eval-examples': '8', '--num-heatmaps': '0'}
    diffmask_text.run_from_args(parse('sst', sst_args(model_folder, folder, gate, **options)),
                                'sst')
  cells[0].source = (f'model_dir = {str(model_folder)!r}\n'
                     f'run_dirs = {run_dirs!r}\n'
                     'num_shown = 2\n'
                     "new_sentence = 'a gripping , funny film .'\n")
  _execute(sst_notebook, tmp_path, monkeypatch, timeout=300)

  # per-depth lines, two heatmap figures, Figure 8b, two explained sentences
  text = _check_executed(sst_notebook, min_figures=6)
  assert 'macro-F1 masked' in text and 'masked at the deepest depth' in text
  assert 'hidden states masked per depth' in text and 'gripping' in text
