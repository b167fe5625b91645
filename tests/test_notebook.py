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
  # the kernel inherits this environment: dmx importable from the checkout, no display needed
  python_path = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get('PYTHONPATH')) if p)
  monkeypatch.setenv('PYTHONPATH', python_path)
  monkeypatch.setenv('MPLBACKEND', 'Agg')
  monkeypatch.setenv('JAX_PLATFORMS', 'cpu')
  client = nbclient.NotebookClient(notebook, timeout=600, kernel_name='python3',
                                   resources={'metadata': {'path': str(tmp_path)}})
  client.execute()  # raises CellExecutionError on the first failing cell

  code_cells = _code_cells(notebook)
  assert all(cell.execution_count is not None for cell in code_cells), 'a code cell did not run'
  errors = [output for cell in code_cells for output in cell.outputs
            if output.output_type == 'error']
  assert not errors, errors
  images = [output for cell in code_cells for output in cell.outputs
            if output.output_type == 'display_data' and 'image/png' in output.get('data', {})]
  # ground truth, loss curve, bottleneck, training curves, two keep-probability heatmaps
  assert len(images) >= 6, f'expected at least 6 figures, got {len(images)}'
  text = ''.join(output.get('text', '') for cell in code_cells for output in cell.outputs
                 if output.output_type == 'stream')
  assert 'accuracy: train' in text and 'diffmask hidden' in text and 'uniform' in text
