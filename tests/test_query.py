"""test.py: query the database of a real run and check what a user sees."""
import os

import pytest
import torch
from PIL import Image

import test as query_tool  # the repository's test.py, not a test module

GREEN, RED = query_tool.GREEN, query_tool.RED


@pytest.fixture(scope='module')
def database_file(trained_run):
    return f"{trained_run['prefix']}_data_base.pth"


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
    (['--query_img_name', 'not/in/the/database.jpg'], 'is not among'),
    (['--retrieval_num', '1000'], 'the gallery holds 999 other images'),
    (['--retrieval_num', '0'], '--retrieval_num'),
])
def test_query_errors_name_the_flag(database_file, flags, message):
    database = torch.load(database_file, weights_only=True)
    argv = ['--data_base', database_file, '--query_img_name', database['test_images'][0], *flags]
    with pytest.raises(ValueError, match=message):
        query_tool.main(argv)


@pytest.mark.parametrize('content,message', [(None, 'does not exist'), (b'garbage', 'not a readable'),
                                             ({'model': {}}, 'missing')])
def test_unreadable_database_is_a_clear_error(tmp_path, content, message):
    path = tmp_path / 'db.pth'
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        torch.save(content, path)
    with pytest.raises((FileNotFoundError, ValueError), match=message):
        query_tool.load_database(str(path))
