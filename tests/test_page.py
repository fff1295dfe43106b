"""test.py's pages, each query's {folder}/index.html and the contents page {output_dir}/index.html, opened in
headless Chromium at 1200 px wide as a user would open them from disk."""
import html
import json
import os
import re
import shutil
import subprocess
import urllib.parse

import pytest
import torch

import gallery as gallery_tool  # the repository's gallery.py
import test as query_tool  # the repository's test.py, not a test module
from conftest import absent
from test_query import draw_image
from utils import queries_folder

# Appended to a copy of the page: once everything has loaded, it writes into the page what the
# browser shows, each image's natural width and the colour of its frame (a pixel inside the border).
CHECKER = '''<script>
window.addEventListener('load', () => {
  const shown = [...document.querySelectorAll('section')].map(section => [...section.querySelectorAll('figure')].map(
    figure => {
      const image = figure.querySelector('img'), canvas = document.createElement('canvas');
      canvas.width = image.naturalWidth;
      canvas.height = image.naturalHeight;
      const context = canvas.getContext('2d');
      context.drawImage(image, 0, 0);
      return {src: image.getAttribute('src'), href: figure.querySelector('a').getAttribute('href'),
              width: image.naturalWidth, pixel: image.naturalWidth ? [...context.getImageData(2, 2, 1, 1).data] : null,
              class: figure.dataset.class || null, rank: figure.dataset.rank || null, frame: figure.dataset.frame};
    }));
  const sections = [...document.querySelectorAll('section')].map(section => ({
    heading: section.querySelector('h2 a') ? section.querySelector('h2 a').getAttribute('href') : null,
    legend: section.querySelector('p').textContent}));
  const report = document.createElement('pre');
  report.id = 'report';
  report.textContent = JSON.stringify({rows: shown, sections: sections, title: document.title,
                                       scroll_width: document.documentElement.scrollWidth, width: window.innerWidth});
  document.body.appendChild(report);
});
</script>
'''
FRAME_COLOURS = {'green': query_tool.GREEN, 'red': query_tool.RED, 'grey': query_tool.GREY}


def open_in_chromium(page, tmp_path):
    """What headless Chromium shows of the page, 1200 px wide: its title and widths, and per query section
    its heading's link and legend ('sections') and per image the checker's record ('rows')."""
    checked = os.path.join(os.path.dirname(page), 'checked.html')  # beside it: the same relative links
    with open(page) as f, open(checked, 'w') as out:
        out.write(f.read().replace('</body>', CHECKER + '</body>'))
    # file:// pages are each their own origin: reading an image's pixels needs --allow-file-access-from-files
    if shutil.which('chromium') is None:
        absent('needs Chromium, to open the page: apt-get install chromium')
    dom = subprocess.run(['chromium', '--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking',
                          '--disable-component-update', '--disable-sync', '--no-first-run',
                          '--allow-file-access-from-files', '--window-size=1200,900', f'--user-data-dir={tmp_path / "chromium"}',
                          '--virtual-time-budget=5000', '--dump-dom', f'file://{checked}'],
                         capture_output=True, text=True, timeout=120).stdout
    os.remove(checked)
    return json.loads(html.unescape(re.search(r'<pre id="report">(.*?)</pre>', dom, re.S).group(1)))


def close_to(colour, expected, tolerance=40):  # JPEG shifts colours a little
    return all(abs(a - b) <= tolerance for a, b in zip(colour, expected))


@pytest.fixture(scope='module')
def labelled_database(tiny_run, tmp_path_factory):
    """A database as train.py writes it, of 12 drawn images in 3 classes (a colour each), embedded by the tiny run."""
    folder = tmp_path_factory.mktemp('labelled')
    classes = ['red', 'green', 'blue']
    images, labels = [], []
    for i in range(12):
        label = i % 3
        images.append(str(draw_image(folder / f'{classes[label]}_{i}.jpg', classes[label], (60 + 5 * i, 50))))
        labels.append(label)
    model = query_tool.read_model(tiny_run['model_file'], 'cpu', 'the test')
    database = {'test_images': images, 'test_labels': labels, 'test_classes': classes,
                'test_embeddings': gallery_tool.embed_queries(model, images, progress=False), 'args': model.run_args}
    torch.save(database, folder / 'data_base.pth')
    return str(folder / 'data_base.pth'), database


def expected_frame(query_class, result_class):
    return 'grey' if query_class is None else 'green' if result_class == query_class else 'red'


def test_the_page_shows_every_image_framed_as_its_label_says(labelled_database, tmp_path):
    database_file, database = labelled_database
    images, labels, classes = database['test_images'], database['test_labels'], database['test_classes']
    queries = [images[0], images[4], str(draw_image(tmp_path / 'mine.png', 'red'))]  # the last from outside
    out = tmp_path / 'out'
    query_tool.main(['--data_base', database_file, '--query_img_name', *queries, '--retrieval_num', '6',
                     '--output_dir', str(out)])
    rows = open_in_chromium(str(out / 'index.html'), tmp_path)['rows']

    assert len(rows) == 3 and all(len(row) == 7 for row in rows)  # a row per query: itself, then 6 results
    assert all(shown['width'] > 0 for row in rows for shown in row)  # every image loaded
    for (query, *results), path in zip(rows, queries):
        # each image links to its original, relative to the page, and shows that image's class
        linked = [os.path.normpath(out / urllib.parse.unquote(shown['href'])) for shown in [query] + results]
        assert linked[0] == path and all(os.path.isfile(p) for p in linked)
        assert [shown['class'] for shown in results] == [classes[labels[images.index(p)]] for p in linked[1:]]
        assert query['class'] == (classes[labels[images.index(path)]] if path in images else None)
        # the frames the browser draws: green for the query's class, red for another, grey without one
        for shown in [query] + results:
            colour = 'grey' if shown is query else expected_frame(query['class'], shown['class'])
            assert shown['frame'] == colour and close_to(shown['pixel'], FRAME_COLOURS[colour])
        if path in images:  # the ranking: the query left out, most similar first
            own = images.index(path)
            similarities = database['test_embeddings'] @ database['test_embeddings'][own]
            similarities[own] = -2
            assert linked[1:] == [images[i] for i in similarities.topk(6).indices.tolist()]
            assert [shown['rank'] for shown in results] == [str(r) for r in range(1, 7)]
    frames = [shown['frame'] for row in rows[:2] for shown in row[1:]]
    assert 'green' in frames and 'red' in frames and {shown['frame'] for shown in rows[2]} == {'grey'}


@pytest.mark.slow  # a second query run and browser start
def test_the_page_still_shows_its_images_when_the_results_folder_moves(labelled_database, tmp_path):
    database_file, database = labelled_database
    query_tool.main(['--data_base', database_file, '--query_img_name', database['test_images'][1],
                     '--retrieval_num', '3', '--output_dir', str(tmp_path / 'out')])
    shutil.move(tmp_path / 'out', tmp_path / 'moved')
    page = open(tmp_path / 'moved' / 'index.html').read()
    assert str(tmp_path) not in page  # no absolute path, so no link that a move breaks
    rows = open_in_chromium(str(tmp_path / 'moved' / 'index.html'), tmp_path)['rows']
    assert len(rows) == 1 and len(rows[0]) == 4 and all(shown['width'] > 0 for shown in rows[0])


def test_each_query_run_keeps_its_pages_and_the_contents_page_links_every_one(labelled_database, tmp_path):
    database_file, database = labelled_database
    images, out = database['test_images'], tmp_path / 'out'
    first, second, outside = images[0], images[4], str(draw_image(tmp_path / 'mine.png', 'red'))
    run = ['--data_base', database_file, '--retrieval_num', '8', '--output_dir', str(out), '--query_img_name']
    query_tool.main(run + [first])
    first_page = out / os.path.basename(query_tool.query_folder('', first)) / 'index.html'
    kept = first_page.read_text()
    query_tool.main(run + [second, outside])  # a second run into the same folder

    assert first_page.read_text() == kept  # the first run's page is still there, untouched
    contents = open_in_chromium(str(out / 'index.html'), tmp_path)
    assert contents['title'] == '3 query pages in out/'
    linked = {os.path.normpath(out / urllib.parse.unquote(section['heading'])) for section in contents['sections']}
    assert linked == {str(out / os.path.basename(query_tool.query_folder('', q)) / 'index.html')
                      for q in (first, second, outside)}
    assert all(len(row) == 9 and all(shown['width'] > 0 for shown in row) for row in contents['rows'])
    # 8 results and the query fit 1200 px, or wrap: never a horizontal scroll bar
    assert contents['scroll_width'] <= contents['width'] == 1200

    own = open_in_chromium(str(first_page), tmp_path)  # the first query's own page
    assert own['title'] == f'{os.path.basename(first)}: 8 nearest images in --data_base {database_file}'
    assert len(own['rows']) == 1 and all(shown['width'] > 0 for shown in own['rows'][0])
    assert own['scroll_width'] <= own['width']
    # the legend says what this query's frames mean: its class is known, or it is not
    legends = {os.path.basename(os.path.dirname(section['heading'])): section['legend']
               for section in contents['sections']}
    assert 'green' in legends[os.path.basename(query_tool.query_folder('', first))]
    assert 'not an image of the database' in legends[os.path.basename(query_tool.query_folder('', outside))]
    assert 'green' not in legends[os.path.basename(query_tool.query_folder('', outside))]


def test_two_databases_queried_with_the_defaults_keep_their_sheets_and_pages_apart(labelled_database, tmp_path):
    database_file, _ = labelled_database
    databases = [database_file, str(shutil.copy(database_file, tmp_path / 'other_seed1_data_base.pth'))]
    for path in databases:  # the same images drawn from each: the same query folder names
        query_tool.main(['--data_base', path, '--random_queries', '3', '--retrieval_num', '3'])
    # the test runs in an empty folder of its own (conftest.py): the default is its results/
    assert sorted(os.listdir('results')) == sorted(os.path.basename(queries_folder(path)) for path in databases)
    for path in databases:
        folder = queries_folder(path)
        assert os.path.isfile(os.path.join(folder, 'retrieval_summary.png'))
        pages = query_tool.query_pages(folder)
        assert len(pages) == 3 and {record['gallery'] for _, record in pages} == {f'--data_base {path}'}
        assert open(os.path.join(folder, 'index.html')).read().count('<section>') == 3


def drawn_queries(database_file, out, *flags):
    query_tool.main(['--data_base', database_file, '--retrieval_num', '3', '--output_dir', str(out), *flags])
    return {record['query'] for _, record in query_tool.query_pages(str(out))}


def test_random_queries_are_gallery_images_drawn_from_the_seed(labelled_database, tmp_path):
    database_file, database = labelled_database
    names = {os.path.basename(path) for path in database['test_images']}
    drawn = drawn_queries(database_file, tmp_path / 'a', '--random_queries', '4', '--seed', '0')
    assert len(drawn) == 4 and drawn <= names  # no default query: only the 4 drawn
    assert drawn_queries(database_file, tmp_path / 'b', '--random_queries', '4', '--seed', '0') == drawn
    assert drawn_queries(database_file, tmp_path / 'c', '--random_queries', '4', '--seed', '1') != drawn
    assert (tmp_path / 'a' / 'retrieval_summary.png').exists()  # the sheet of them, a row each
    with pytest.raises(ValueError, match='--random_queries 13: --data_base .* holds only 12 images'):
        query_tool.main(['--data_base', database_file, '--random_queries', '13', '--output_dir', str(tmp_path / 'd')])
