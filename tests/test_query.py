"""test.py: query the database of a real run and check what a user sees."""
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

import gallery as gallery_tool  # the repository's gallery.py
import test as query_tool  # the repository's test.py, not a test module
from model import Model
from utils import AMP_DTYPES, resolve_amp

GREEN, RED, GREY = query_tool.GREEN, query_tool.RED, query_tool.GREY


@pytest.fixture(scope='module')
def database_file(trained_run):
    return f"{trained_run['prefix']}_data_base.pth"


@pytest.fixture(scope='module')
def model_file(trained_run):
    return f"{trained_run['prefix']}_model.pth"


def frame_colour(path):
    with Image.open(path) as image:
        return image.convert('RGB').getpixel((1, 1))


def close_to(colour, expected, tolerance=40):  # JPEG shifts colours a little
    return all(abs(a - b) <= tolerance for a, b in zip(colour, expected))


@pytest.mark.slow
def test_query_writes_framed_results_and_one_grid(database_file, tmp_path, capsys):
    database = torch.load(database_file, weights_only=True)
    query = database['test_images'][137]
    query_tool.main(['--data_base', database_file, '--query_img_name', query, '--retrieval_num', '5',
                     '--output_dir', str(tmp_path)])
    out_dir = tmp_path / f"{os.path.basename(os.path.dirname(query))}_{os.path.splitext(os.path.basename(query))[0]}"
    results = sorted(f for f in os.listdir(out_dir) if f.startswith('retrieval_img_'))
    assert len(results) == 5 and {'query_img.jpg', 'grid.png'} <= set(os.listdir(out_dir))
    # ranks 1..5, similarity in the name, best first
    ranks = [int(f.split('_')[2]) for f in results]
    similarities = [float(f.rsplit('_', 1)[1][:-4]) for f in sorted(results, key=lambda f: int(f.split('_')[2]))]
    assert sorted(ranks) == [1, 2, 3, 4, 5] and similarities == sorted(similarities, reverse=True)
    # frames: green exactly for the results of the query's class (as the database says)
    embeddings, labels = database['test_embeddings'], database['test_labels']
    similarity = embeddings @ embeddings[137]
    similarity[137] = -2
    expected_same = [labels[i] == labels[137] for i in similarity.topk(5).indices.tolist()]
    by_rank = sorted(results, key=lambda f: int(f.split('_')[2]))
    seen_green = [close_to(frame_colour(out_dir / f), GREEN) for f in by_rank]
    seen_red = [close_to(frame_colour(out_dir / f), RED) for f in by_rank]
    assert seen_green == expected_same and seen_red == [not s for s in expected_same]
    assert f'{sum(expected_same)}/5' in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.parametrize('flags,message', [
    (['--query_img_name', 'not/in/the/database.jpg'], 'no such image or folder, and not an image of --data_base'),
    (['--retrieval_num', '1000'], 'the gallery holds 999 other images'),
])  # --retrieval_num 0 is refused by the parser (tests/test_utils.py: every numeric flag states its range)
def test_query_errors_name_the_flag(database_file, flags, message):
    database = torch.load(database_file, weights_only=True)
    argv = ['--data_base', database_file, '--query_img_name', database['test_images'][0], *flags]
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        query_tool.main(argv)


@pytest.mark.parametrize('content,message', [(None, 'does not exist'), (b'garbage', 'not a database written by train.py'),
                                             ({'model': {}}, 'no test_embeddings')])
def test_unreadable_database_is_a_clear_error(tmp_path, content, message):
    path = tmp_path / 'db.pth'
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        torch.save(content, path)
    with pytest.raises((FileNotFoundError, ValueError), match=message):
        query_tool.load_database(str(path))


# -----------------------------------------------------------------------------
# queries from outside the database, several queries, model and database that do not fit


def run_query(database_file, queries, output_dir, k, *flags):
    query_tool.main(['--data_base', str(database_file), '--query_img_name', *map(str, queries),
                     '--retrieval_num', str(k), '--output_dir', str(output_dir), *map(str, flags)])


def results_by_rank(folder):
    """[(jpg path, similarity)] of one query's results, rank 1 first."""
    names = sorted((f for f in os.listdir(folder) if f.startswith('retrieval_img_')),
                   key=lambda f: int(f.split('_')[2]))
    return [(folder / f, float(f.rsplit('_', 1)[1][:-4])) for f in names]


def inside_frame(path):
    """The pixels within the frame, as floats: the same image framed in another colour compares equal."""
    with Image.open(path) as image:
        return np.asarray(image.convert('RGB'), dtype=np.float32)[16:-16, 16:-16]


def draw_image(path, colour, size=(90, 60)):
    """An image no data set holds: a disc on a plain background."""
    image = Image.new('RGB', size, 'skyblue')
    ImageDraw.Draw(image).ellipse((size[0] // 4, 5, 3 * size[0] // 4, size[1] - 5), fill=colour)
    image.save(path)
    return path


def test_queries_are_embedded_in_the_precision_of_the_gallery_they_search():
    def dtype(flags, gallery_amp=None):
        return query_tool.embedding_dtype(query_tool.parse_args(['--data_base', 'run_data_base.pth', '--query_img_name',
                                                                 'q.jpg', '--device', 'cpu', *flags]), gallery_amp)
    # by default: a run's database as train.py embedded it, whatever this CPU computes fastest
    assert dtype([], 'none') is None and dtype([], 'bf16') == torch.bfloat16
    assert dtype([]) == AMP_DTYPES[resolve_amp('auto', 'cpu')]  # photos of --gallery: bf16 where the CPU computes it
    assert dtype(['--amp', 'none'], 'bf16') is None and dtype(['--amp', 'bf16'], 'none') == torch.bfloat16  # as asked


def test_test_py_without_a_database_shows_its_usage_and_asks_for_one(capsys):
    with pytest.raises(SystemExit) as exited:
        query_tool.parse_args([])
    said = capsys.readouterr().err
    assert exited.value.code == 2 and said.startswith('usage: ')
    assert 'error: --data_base is required' in said and '--gallery FOLDER --model PATH' in said


@pytest.mark.parametrize('flags,message', [
    (['--data_base', 'run_data_base.pth'], 'name the queries, --query_img_name IMAGE_OR_FOLDER or --random_queries N'),
    (['--data_base', 'run_data_base.pth', '--index', 'photos_index.pth', '--random_queries', '2'],
     '--data_base and --gallery/--index are two galleries: search one at a time')])
def test_a_database_needs_queries_and_is_searched_alone(flags, message, capsys):
    with pytest.raises(SystemExit):
        query_tool.parse_args(flags)
    assert message in capsys.readouterr().err


def test_each_database_and_index_has_its_own_results_folder_by_default():
    def folder(*flags):
        return query_tool.parse_args([*flags, '--random_queries', '2']).output_dir
    assert folder('--data_base', 'results/a_seed0_data_base.pth') == os.path.join('results', 'a_seed0_queries')
    assert folder('--data_base', 'elsewhere/b_seed0_data_base.pth') == os.path.join('results', 'b_seed0_queries')
    assert folder('--index', 'results/a_seed0_index.pth') == os.path.join('results', 'a_seed0_index_queries')
    assert folder('--data_base', 'a_seed0_data_base.pth', '--output_dir', 'mine') == 'mine'


def test_the_sheet_has_a_title_and_a_legend_of_the_frames_it_shows(tmp_path):
    image = str(draw_image(tmp_path / 'a.png', 'white'))

    def sheet(*colours):
        """(the header above the rows, the rows) of a sheet of two queries whose results are framed so."""
        rows = [[query_tool.Tile(image, GREY, 'query: a.png', '')] +
                [query_tool.Tile(image, colour, '#1  0.900', 'cls') for colour in colours]] * 2
        gallery = gallery_tool.Gallery([image], torch.zeros(1, 4), None, None, '--data_base x_data_base.pth', 'x_seed0')
        full = np.asarray(query_tool.summary_sheet(rows, gallery))
        plain = np.asarray(query_tool.draw_sheet(rows, query_tool.SUMMARY_TILE))
        assert (full[-len(plain):] == plain).all()  # the rows as draw_sheet draws them, under a header
        return full[:-len(plain)]

    def shows(header, colour):  # a legend swatch: a square outline in the frame's exact colour (text is anti-aliased)
        return (header == colour).all(axis=-1).sum() > 50
    labelled, photos = sheet(GREEN, RED, GREEN), sheet(GREY, GREY)
    assert shows(labelled, GREEN) and shows(labelled, RED) and not shows(labelled, GREY)
    assert shows(photos, GREY) and not shows(photos, GREEN) and not shows(photos, RED)
    assert (labelled.min(axis=-1) < 60).sum() > 500  # the title and the legend's words, in black


@pytest.mark.slow
def test_a_copy_of_a_database_image_retrieves_what_the_image_itself_does(database_file, model_file, tmp_path):
    database = torch.load(database_file, weights_only=True)
    original = database['test_images'][137]
    copy = tmp_path / 'elsewhere' / 'copy.jpg'
    copy.parent.mkdir()
    shutil.copy(original, copy)
    # the saved model embeds it as train.py embedded the test set, in the run's precision: its stored
    # embedding again (in bf16 to about 1e-4: train.py embedded it in a batch of 64, this alone)
    model = query_tool.load_model(model_file, database, database_file, 'cpu')
    amp = database['args']['amp']
    assert torch.allclose(gallery_tool.embed_queries(model, [str(copy)], amp_dtype=AMP_DTYPES[amp])[0],
                          database['test_embeddings'][137], atol=1e-5 if amp == 'none' else 1e-3)

    run_query(database_file, [original], tmp_path / 'out', 5)
    run_query(database_file, [copy], tmp_path / 'out', 6)
    inside = results_by_rank(tmp_path / 'out' / query_tool.query_folder('', original))
    outside = results_by_rank(tmp_path / 'out' / 'elsewhere_copy')
    # not in the database, so not left out: itself first, then the database image's own results
    assert outside[0][1] == pytest.approx(1, abs=1e-4)
    query_image = tmp_path / 'out' / 'elsewhere_copy' / 'query_img.jpg'
    assert np.abs(inside_frame(outside[0][0]) - inside_frame(query_image)).mean() < 2
    assert [s for _, s in outside[1:]] == pytest.approx([s for _, s in inside], abs=2e-4)
    for (seen, _), (expected, _) in zip(outside[1:], inside):
        assert np.abs(inside_frame(seen) - inside_frame(expected)).mean() < 2  # JPEG noise only
    # no ground truth: every frame neutral
    assert all(close_to(frame_colour(path), GREY) for path, _ in outside)
    # --amp none embeds the query in fp32, whatever the database's precision: the same image first
    run_query(database_file, [copy], tmp_path / 'fp32', 1, '--amp', 'none')
    [(found, similarity)] = results_by_rank(tmp_path / 'fp32' / 'elsewhere_copy')
    assert np.abs(inside_frame(found) - inside_frame(outside[0][0])).mean() < 2 and similarity > 0.999


@pytest.mark.slow
def test_a_new_image_gets_k_results_in_neutral_frames_and_a_grid(database_file, tmp_path, capsys):
    image = draw_image(tmp_path / 'new.png', 'red')
    run_query(database_file, [image], tmp_path / 'out', 4)
    folder = tmp_path / 'out' / f'{tmp_path.name}_new'
    results = results_by_rank(folder)
    similarities = [s for _, s in results]
    assert len(results) == 4 and similarities == sorted(similarities, reverse=True) and -1 <= min(similarities)
    assert all(close_to(frame_colour(path), GREY) for path, _ in results)
    with Image.open(folder / 'grid.png') as grid:
        assert grid.format == 'PNG' and grid.width > 4 * grid.height  # one row: the query and 4 results
    assert 'outside the database' in capsys.readouterr().out
    assert not (tmp_path / 'out' / 'retrieval_summary.png').exists()  # one query: its grid is enough


@pytest.mark.slow
def test_several_queries_give_a_grid_each_and_a_summary_row_each(database_file, tmp_path):
    database = torch.load(database_file, weights_only=True)
    photos = tmp_path / 'photos'
    photos.mkdir()
    for name, colour in (('a.png', 'red'), ('b.jpg', 'green'), ('c.png', 'yellow')):
        draw_image(photos / name, colour)
    (photos / 'notes.txt').write_text('not an image')
    in_database = database['test_images'][0]

    run_query(database_file, [in_database, photos / 'a.png'], tmp_path / 'two', 3)
    run_query(database_file, [photos], tmp_path / 'three', 3)
    assert {f for f in os.listdir(tmp_path / 'two') if (tmp_path / 'two' / f / 'grid.png').exists()} == \
        {query_tool.query_folder('', in_database), 'photos_a'}
    assert {f for f in os.listdir(tmp_path / 'three') if (tmp_path / 'three' / f / 'grid.png').exists()} == \
        {'photos_a', 'photos_b', 'photos_c'}
    with Image.open(tmp_path / 'two' / 'retrieval_summary.png') as two, \
            Image.open(tmp_path / 'three' / 'retrieval_summary.png') as three, \
            Image.open(tmp_path / 'two' / 'photos_a' / 'grid.png') as grid:
        # one row per query under the same title, as wide as the query and its 3 results in small tiles
        assert two.format == three.format == 'PNG'
        row = three.height - two.height
        assert two.width == three.width and 2 * row < two.height < 3 * row
        assert 4 * query_tool.SUMMARY_TILE < two.width < grid.width and row < grid.height


@pytest.mark.slow
def test_the_model_is_loaded_only_for_queries_from_outside(database_file, model_file, tmp_path):
    database = torch.load(database_file, weights_only=True)
    # the run's results folder is gone: its model cannot be found from the database's arguments
    moved = tmp_path / 'moved_data_base.pth'
    torch.save({**database, 'args': {**database['args'], 'output_dir': str(tmp_path / 'gone')}}, moved)
    run_query(moved, [database['test_images'][0]], tmp_path / 'out', 3)
    assert (tmp_path / 'out' / query_tool.query_folder('', database['test_images'][0]) / 'grid.png').exists()

    outside = shutil.copy(database['test_images'][0], tmp_path / 'outside.jpg')
    cli = subprocess.run([sys.executable, 'test.py', '--data_base', str(moved), '--query_img_name', str(outside),
                          '--output_dir', str(tmp_path / 'out')],
                         capture_output=True, text=True, cwd=os.path.dirname(query_tool.__file__))
    assert cli.returncode != 0 and cli.stderr.strip().splitlines()[-1].startswith('error: model file ')
    assert str(tmp_path / 'gone') in cli.stderr and 'pass --model' in cli.stderr
    run_query(moved, [outside], tmp_path / 'out', 3, '--model', model_file)
    assert len(results_by_rank(tmp_path / 'out' / f'{tmp_path.name}_outside')) == 3


def smaller_embeddings(database_file, model_file, tmp_path):
    database = torch.load(database_file, weights_only=True)
    embeddings = torch.nn.functional.normalize(torch.randn(len(database['test_images']), 128), dim=1)
    torch.save({**database, 'test_embeddings': embeddings}, tmp_path / 'db128.pth')
    return tmp_path / 'db128.pth', model_file


def googlenet_model(database_file, model_file, tmp_path):
    checkpoint = torch.load(model_file, weights_only=True)
    torch.save({**checkpoint, 'model': Model('googlenet', 512, pretrained='none', embedding_norm=checkpoint['args']['embedding_norm']).state_dict(),
                'args': {**checkpoint['args'], 'backbone_type': 'googlenet'}}, tmp_path / 'googlenet_model.pth')
    return database_file, tmp_path / 'googlenet_model.pth'


def another_run_model(database_file, model_file, tmp_path):
    checkpoint = torch.load(model_file, weights_only=True)  # the same architecture, freshly initialised
    torch.save({**checkpoint, 'model': Model('resnet18', 512, pretrained='none', embedding_norm=checkpoint['args']['embedding_norm']).state_dict()},
               tmp_path / 'other_model.pth')
    return database_file, tmp_path / 'other_model.pth'


@pytest.mark.slow
@pytest.mark.parametrize('make_files,message', [
    (smaller_embeddings, '512-d embeddings vs 128-d'),
    (googlenet_model, 'backbone_type googlenet vs resnet18'),
    (another_run_model, 'does not reproduce the embeddings'),
])
def test_a_model_that_does_not_fit_the_database_is_a_clear_error(database_file, model_file, tmp_path,
                                                                  make_files, message):
    database, model = make_files(database_file, model_file, tmp_path)
    outside = draw_image(tmp_path / 'new.png', 'red')
    with pytest.raises(ValueError, match=message) as error:
        run_query(database, [outside], tmp_path / 'out', 3, '--model', model)
    assert str(database) in str(error.value) and str(model) in str(error.value)
    assert not (tmp_path / 'out').exists()


@pytest.mark.slow
def test_an_inshop_query_image_is_searched_in_the_gallery_with_its_ground_truth(database_file, tmp_path):
    database = torch.load(database_file, weights_only=True)
    # In-shop's layout: the first 100 test images become queries, outside the gallery
    images, labels, embeddings = database['test_images'], database['test_labels'], database['test_embeddings']
    inshop = {**database, 'query_images': images[:100], 'query_labels': labels[:100],
              'query_embeddings': embeddings[:100],
              'test_images': images[100:], 'test_labels': labels[100:], 'test_embeddings': embeddings[100:]}
    torch.save(inshop, tmp_path / 'inshop.pth')
    run_query(tmp_path / 'inshop.pth', [images[3]], tmp_path / 'out', 5)
    expected = (embeddings[100:] @ embeddings[3]).topk(5).indices.tolist()
    results = results_by_rank(tmp_path / 'out' / query_tool.query_folder('', images[3]))
    assert [s for _, s in results] == pytest.approx((embeddings[100:] @ embeddings[3])[expected].tolist(), abs=1e-4)
    colours = [GREEN if labels[100 + i] == labels[3] else RED for i in expected]
    assert all(close_to(frame_colour(path), colour) for (path, _), colour in zip(results, colours))


def test_query_names_are_checked_before_anything_is_written(tmp_path):
    for name in ('x.jpg', 'x.png'):
        draw_image(tmp_path / name, 'red')
    (tmp_path / 'notes.txt').write_text('not an image')
    paths = query_tool.query_paths([str(tmp_path), str(tmp_path / 'x.jpg')])  # named twice: queried once
    assert sorted(map(os.path.basename, paths)) == ['x.jpg', 'x.png']
    with pytest.raises(ValueError, match='would both be written to'):  # one folder, x/
        query_tool.check_distinct_folders(paths, 'out')
    with pytest.raises(ValueError, match='notes.txt is not a readable image'):
        query_tool.check_outside_image(str(tmp_path / 'notes.txt'), 'db.pth')
    (tmp_path / 'empty').mkdir()
    with pytest.raises(ValueError, match='the folder holds no images'):
        query_tool.query_paths([str(tmp_path / 'empty')])
