"""The README's commands, run as written: every ```bash block under "Quick start" and under "Your own
photos in three commands", in order, in a copy of the repository that has no results/ or data/ yet
(pip install lines left out: this environment is the one they made)."""
import glob
import os
import re
import shlex
import subprocess
import sys

import pytest

from conftest import REPOSITORY, copy_of_repository
from test_own_data import write_own_photos
from utils import queries_folder, run_prefix

# what a run leaves beside its database, as the quick start's table lists them
RUN_FILES = ('_statistics.csv', '_results.png', '_embedding_map.png', '_model.pth', '_data_base.pth', '_args.json')


def readme_section(heading):
    """The README's text from `## heading` to the next heading of that level."""
    with open(os.path.join(REPOSITORY, 'README.md'), encoding='utf-8') as f:
        readme = f.read()
    return re.split(r'^## ', readme.split(f'\n## {heading}\n', 1)[1], flags=re.M)[0]


def readme_commands(heading):
    """The commands of every ```bash block of the section, each split as a shell splits it; lines
    continued with a backslash are one command, and pip install lines are left out."""
    commands = []
    for block in re.findall(r'^```bash\n(.*?)^```', readme_section(heading), flags=re.M | re.S):
        for line in block.replace('\\\n', ' ').splitlines():
            words = shlex.split(line, comments=True)
            if words and words[:2] != ['pip', 'install']:
                commands.append(words)
    return commands


def run_as_written(commands, folder):
    """Each `python SCRIPT ...` command in `folder`, in order, with this interpreter; each must succeed."""
    for command in commands:
        assert command[0] == 'python' and command[1].endswith('.py'), f'not a python command: {shlex.join(command)}'
        done = subprocess.run([sys.executable, *command[1:]], cwd=folder, capture_output=True, text=True)
        assert done.returncode == 0, f'{shlex.join(command)} failed:\n{done.stderr[-3000:]}'


def check_promised_files(commands, folder):
    """Each database a test.py command names: the run's files beside it, and the sheet and contents
    page of its queries in their folder."""
    databases = [command[command.index('--data_base') + 1] for command in commands if '--data_base' in command]
    assert databases, 'no test.py --data_base command in the section'
    for database in databases:
        for suffix in RUN_FILES:
            assert os.path.isfile(os.path.join(folder, run_prefix(database) + suffix)), run_prefix(database) + suffix
        for page in ('retrieval_summary.png', 'index.html'):
            assert os.path.isfile(os.path.join(folder, queries_folder(database), page))


def shown_images(page):
    """The paths of the images a Markdown page shows (![...](path) or <img src="path">), from the repository."""
    with open(os.path.join(REPOSITORY, page), encoding='utf-8') as f:
        text = f.read()
    targets = re.findall(r'!\[[^\]]*\]\(([^)\s]+)\)|<img src="([^"]+)"', text)
    return [os.path.normpath(os.path.join(os.path.dirname(page), markdown or html)) for markdown, html in targets]


def test_the_figures_of_the_readme_and_the_docs_live_in_docs_images():
    pages = ['README.md'] + [os.path.relpath(page, REPOSITORY)
                             for page in glob.glob(os.path.join(REPOSITORY, 'docs', '*.md'))]
    shown = {page: shown_images(page) for page in pages}
    assert shown['README.md']  # the method figure and the quick start's sheet at least
    for page, images in shown.items():
        for image in images:  # results/ is run output: a run or a cleanup would change or remove them
            assert image.startswith(os.path.join('docs', 'images', '')), f'{page} shows {image}'
            assert os.path.isfile(os.path.join(REPOSITORY, image)), f'{page} shows {image}, which is missing'


@pytest.mark.slow  # trains ResNet-18 from scratch for 10 epochs: 2 to 6 minutes on 2 cores
def test_the_quick_start_runs_as_written(tmp_path):
    folder = copy_of_repository(tmp_path / 'repository')
    commands = readme_commands('Quick start')
    run_as_written(commands, folder)
    check_promised_files(commands, folder)


@pytest.mark.slow  # 20 epochs of pretrained EfficientNet-Lite0 at 224 px on 24 photos, as the README says
def test_the_own_photo_commands_run_as_written_on_six_classes_of_eight_photos(tmp_path):
    folder = copy_of_repository(tmp_path / 'repository')
    write_own_photos(folder / 'data' / 'my_photos')  # the README's data/my_photos/<class>/, 6 classes of 8
    commands = readme_commands('Your own photos in three commands')
    assert [command[1] for command in commands] == ['data_utils.py', 'train.py', 'test.py']
    run_as_written(commands, folder)
    check_promised_files(commands, folder)
