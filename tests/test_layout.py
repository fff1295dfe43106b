"""The layout of the scripts, read from their source: one job per script, and a ground floor,
utils.py, that imports no module of the project. No modules import each other in a circle, not
even inside a function, so that each one can be read, imported and tested on what is below it.
utils.py's old commands say where they went."""
import ast
import glob
import os
import subprocess
import sys

import pytest

import utils

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ('data_utils', 'model', 'loss', 'utils', 'train', 'test', 'gallery', 'report', 'export')


def project_files():
    """{module name: path} of the repository's top-level modules and of the benchmarks' scripts
    (which import the former, and their measure.py, by these names)."""
    paths = glob.glob(os.path.join(ROOT, '*.py')) + glob.glob(os.path.join(ROOT, 'benchmarks', '*.py'))
    return {os.path.splitext(os.path.basename(path))[0]: path for path in paths}


def imported_modules(path):
    """The top-level name of every module a file imports, wherever it does: ast.walk reaches the
    imports inside functions, which are imports all the same."""
    with open(path, encoding='utf-8') as f:
        tree = ast.parse(f.read(), path)
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split('.')[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:  # the project has no packages
            names.add(node.module.split('.')[0])
    return names


def import_graph(files):
    """{module: the project's modules it imports, sorted} of {module name: path}."""
    return {name: sorted(imported_modules(path) & set(files)) for name, path in files.items()}


def find_cycle(graph):
    """Modules [a, b, ..., a] of which each imports the next, or None: a depth-first search that
    meets a module already on its path has gone round."""
    path, cleared = [], set()

    def visit(module):
        if module in path:
            return path[path.index(module):] + [module]
        if module in cleared:
            return None
        path.append(module)
        cycle = next(filter(None, map(visit, graph[module])), None)
        path.pop()
        cleared.add(module)
        return cycle

    return next(filter(None, map(visit, sorted(graph))), None)


def test_the_graph_holds_every_script():
    assert set(SCRIPTS) <= set(project_files())


def test_imports_inside_functions_count(tmp_path):
    path = tmp_path / 'script.py'
    path.write_text('import os.path\n\n\ndef figure():\n    from loss import build_loss\n    import model as m\n')
    assert imported_modules(path) == {'os', 'loss', 'model'}


def test_utils_imports_no_module_of_the_project():
    assert import_graph(project_files())['utils'] == []


def test_no_modules_import_each_other_in_a_circle():
    cycle = find_cycle(import_graph(project_files()))
    assert cycle is None, f'modules that import each other in a circle: {" -> ".join(cycle)}'


def test_a_circle_is_found_and_named():
    assert find_cycle({'a': ['b'], 'b': ['c'], 'c': ['a'], 'd': ['a']}) == ['a', 'b', 'c', 'a']
    assert find_cycle({'a': ['a']}) == ['a', 'a']
    assert find_cycle({'a': ['b', 'c'], 'b': ['c'], 'c': []}) is None  # shared floors are no circle

# -----------------------------------------------------------------------------
# utils.py's old commands


@pytest.mark.parametrize('argv,command', [
    (['plot', 'x.csv', '--mean_over_seeds'], 'python report.py plot x.csv --mean_over_seeds'),
    (['table', 'a b_statistics.csv'], "python report.py table 'a b_statistics.csv'"),
    (['map', 'x_data_base.pth'], 'python report.py map x_data_base.pth'),
    (['structure'], 'python report.py structure'),
    (['export', '--model', 'x_model.pth', '--format', 'onnx'], 'python export.py --model x_model.pth --format onnx'),
])
def test_each_old_command_names_the_new_one_with_its_arguments(argv, command):
    assert utils.moved(argv) == f'utils.py {argv[0]} has moved: {command}'


def test_utils_py_alone_says_what_moved_where():
    assert 'plot, table, map and structure moved to python report.py' in utils.moved([])
    assert 'export to python export.py' in utils.moved([])


@pytest.mark.slow  # seconds: a fresh interpreter
def test_an_old_command_fails_naming_the_new_one():
    done = subprocess.run([sys.executable, 'utils.py', 'plot', 'x.csv'], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode != 0 and not done.stdout
    assert done.stderr == 'utils.py plot has moved: python report.py plot x.csv\n'
