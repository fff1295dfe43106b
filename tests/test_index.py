"""test.py --gallery (gallery.py): index folders of photos with a run's model, keep the index current, search it."""
import os
import signal
import subprocess
import sys

import pytest
import torch

import gallery as gallery_tool  # the repository's gallery.py
import test as query_tool  # the repository's test.py, not a test module
from conftest import BENCH_EXTRA, require
from model import Model
from utils import AMP_DTYPES, load_torch_file, resolve_amp
from test_query import GREY, close_to, draw_image, frame_colour, results_by_rank

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLOURS = ['red', 'green', 'yellow', 'purple', 'orange', 'black', 'white', 'navy']


@pytest.fixture(scope='module')
def network(tiny_run):
    """The tiny run's model and the identity an index records of it."""
    model = query_tool.read_model(tiny_run['model_file'], 'cpu', 'the tests')
    return model, gallery_tool.model_identity(model, tiny_run['model_file'])


def make_photos(folder, n=6):
    """n images of a few sizes and formats, a third of them one folder down; absolute paths, sorted."""
    (folder / 'trip').mkdir(parents=True)
    return sorted(str(draw_image(folder / ('trip' if i % 3 == 0 else '') / f'p{i}.{"png" if i % 2 else "jpg"}',
                                 COLOURS[i], (40 + 10 * i, 60))) for i in range(n))


def as_test_py_embeds(model, paths):
    """Embeddings as test.py makes them of photos by default on the CPU (--amp auto: bf16 where it
    computes bf16)."""
    return gallery_tool.embed_queries(model, paths, progress=False, amp_dtype=AMP_DTYPES[resolve_amp('auto', 'cpu')])


def index_files(network, index_file, folder, **kwargs):
    model, identity = network
    return gallery_tool.update_index(str(index_file), [str(folder)], model, identity, progress=False, **kwargs)


def recording(embedded):
    """An embed function that notes which files it was asked for."""
    def embed_files(model, paths, progress):
        embedded.extend(paths)
        return gallery_tool.embed_queries(model, paths, progress=progress)
    return embed_files


def test_indexing_a_folder_embeds_every_image_under_it(tiny_run, network, tmp_path, capsys):
    photos = make_photos(tmp_path / 'photos')
    (tmp_path / 'photos' / 'notes.txt').write_text('not an image')
    draw_image(tmp_path / 'photos' / '.hidden.jpg', 'red')  # e.g. a viewer's thumbnail
    broken = tmp_path / 'photos' / 'trip' / 'broken.jpg'
    broken.write_bytes(b'\xff\xd8 not really a jpeg')
    query_tool.main(['--model', tiny_run['model_file'], '--gallery', str(tmp_path / 'photos')])

    index_file = tiny_run['model_file'].removesuffix('_model.pth') + '_index.pth'  # the default: beside the model
    index = gallery_tool.load_index(index_file)
    assert index['paths'] == photos
    model, identity = network
    assert torch.allclose(index['embeddings'], as_test_py_embeds(model, photos), atol=1e-5)
    assert index['sizes'].tolist() == [os.stat(p).st_size for p in photos]
    assert index['mtimes'].tolist() == [os.stat(p).st_mtime_ns for p in photos]
    assert index['model'] == identity and identity['file'] == os.path.abspath(tiny_run['model_file'])
    out = capsys.readouterr().out
    assert f'skipped {broken}: not a readable image' in out
    assert '6 images indexed: 6 new, 0 changed, 0 deleted, 0 unchanged, 1 unreadable skipped' in out

    # again: the unreadable image is tried (and named) again, nothing else is done
    written = os.stat(index_file).st_mtime_ns
    query_tool.main(['--model', tiny_run['model_file'], '--gallery', str(tmp_path / 'photos')])
    out = capsys.readouterr().out
    assert f'skipped {broken}' in out and '6 images indexed: 0 new, 0 changed, 0 deleted, 6 unchanged, 1' in out
    assert os.stat(index_file).st_mtime_ns == written


def test_reindexing_embeds_only_new_and_changed_files_and_drops_deleted_ones(network, tmp_path):
    photos = make_photos(tmp_path / 'photos')
    index_files(network, tmp_path / 'index.pth', tmp_path / 'photos')
    added = str(draw_image(tmp_path / 'photos' / 'trip' / 'new.png', 'pink'))
    changed = photos[1]
    draw_image(changed, 'cyan', (55, 61))  # another picture under the same name
    os.remove(photos[2])

    embedded = []
    index, report = index_files(network, tmp_path / 'index.pth', tmp_path / 'photos', embed_files=recording(embedded))
    assert sorted(embedded) == sorted([added, changed])
    assert (report.new, report.changed, report.deleted, report.unchanged, report.images) == (1, 1, 1, 4, 6)
    assert str(report) == '6 images indexed: 1 new, 1 changed, 1 deleted, 4 unchanged'
    # the same index a single run makes from scratch
    fresh, _ = index_files(network, tmp_path / 'fresh.pth', tmp_path / 'photos')
    assert index['paths'] == fresh['paths'] and torch.allclose(index['embeddings'], fresh['embeddings'], atol=1e-5)
    assert torch.equal(index['sizes'], fresh['sizes']) and torch.equal(index['mtimes'], fresh['mtimes'])
    assert gallery_tool.load_index(tmp_path / 'index.pth')['paths'] == fresh['paths']  # what is on disk

    # nothing changed: nothing embedded, the file is not even rewritten
    written = os.stat(tmp_path / 'index.pth').st_mtime_ns
    embedded.clear()
    _, report = index_files(network, tmp_path / 'index.pth', tmp_path / 'photos', embed_files=recording(embedded))
    assert embedded == [] and report.unchanged == 6 and os.stat(tmp_path / 'index.pth').st_mtime_ns == written


def another_model(tiny_run, tmp_path):
    """The tiny run's model file with other (random) weights: same architecture, another embedding."""
    checkpoint = load_torch_file(tiny_run['model_file'], 'model file')
    torch.manual_seed(1)
    path = tmp_path / 'other_model.pth'
    other = Model('resnet18', 512, pretrained='none', embedding_norm=checkpoint['args']['embedding_norm'])
    torch.save({**checkpoint, 'model': other.state_dict()}, path)
    return str(path)


def test_an_index_made_with_another_model_is_refused_naming_both(tiny_run, tmp_path):
    make_photos(tmp_path / 'photos')
    index = str(tmp_path / 'index.pth')
    query_tool.main(['--model', tiny_run['model_file'], '--gallery', str(tmp_path / 'photos'), '--index', index])
    kept = open(index, 'rb').read()
    other = another_model(tiny_run, tmp_path)
    outside = str(draw_image(tmp_path / 'query.png', 'pink'))
    for flags in (['--gallery', str(tmp_path / 'photos')], ['--query_img_name', outside]):  # update; query only
        with pytest.raises(ValueError) as error:
            query_tool.main(['--model', other, '--index', index, *flags, '--output_dir', str(tmp_path / 'out')])
        message = str(error.value)
        assert f'--index {index} was made with model {os.path.abspath(tiny_run["model_file"])}' in message
        assert f'not with --model {os.path.abspath(other)}' in message
    assert open(index, 'rb').read() == kept and not (tmp_path / 'out').exists()


def test_queries_search_the_index_in_grey_frames(tiny_run, network, tmp_path, capsys):
    photos = make_photos(tmp_path / 'photos')
    (tmp_path / 'elsewhere').mkdir()
    outside = str(draw_image(tmp_path / 'elsewhere' / 'query.png', 'pink'))
    index_file, out = str(tmp_path / 'index.pth'), tmp_path / 'out'
    query_tool.main(['--model', tiny_run['model_file'], '--gallery', str(tmp_path / 'photos'), '--index', index_file,
                     '--query_img_name', photos[4], outside, '--retrieval_num', '3', '--output_dir', str(out)])
    index = gallery_tool.load_index(index_file)
    model, _ = network
    # a photo of the index: its stored embedding, itself left out; another image: embedded by the model
    own = index['embeddings'] @ index['embeddings'][4]
    own[4] = -2
    other = index['embeddings'] @ as_test_py_embeds(model, [outside])[0]
    for query, similarities in ((photos[4], own), (outside, other)):
        results = results_by_rank(out / os.path.basename(query_tool.query_folder('', query)))
        assert [s for _, s in results] == pytest.approx(similarities.topk(3).values.tolist(), abs=1e-4)
        assert all(close_to(frame_colour(path), GREY) for path, _ in results)
    assert (out / 'retrieval_summary.png').exists() and (out / 'index.html').exists()
    assert '3 results (an index of photos has no classes)' in capsys.readouterr().out

    # later, the index alone: no folders to scan, its own model for the outside query
    query_tool.main(['--index', index_file, '--query_img_name', outside, '--retrieval_num', '3',
                     '--output_dir', str(tmp_path / 'again')])
    again = results_by_rank(tmp_path / 'again' / 'elsewhere_query')
    assert [s for _, s in again] == pytest.approx(other.topk(3).values.tolist(), abs=1e-4)


def interrupted_at(victim, interruption):
    """An embed function during which `interruption` happens when it reaches the file `victim`."""
    def embed_files(model, paths, progress):
        if victim in paths:
            interruption()
        return gallery_tool.embed_queries(model, paths, progress=progress)
    return embed_files


def ctrl_c():
    raise KeyboardInterrupt


def test_ctrl_c_while_indexing_keeps_every_chunk_already_embedded(network, tmp_path):
    photos = make_photos(tmp_path / 'photos')
    with pytest.raises(KeyboardInterrupt):  # no periodic save: what is kept is saved on the way out
        index_files(network, tmp_path / 'index.pth', tmp_path / 'photos', chunk_images=2,
                    save_every_s=float('inf'), embed_files=interrupted_at(photos[4], ctrl_c))
    assert gallery_tool.load_index(tmp_path / 'index.pth')['paths'] == photos[:4]  # chunks [0, 1] and [2, 3]
    embedded = []
    _, report = index_files(network, tmp_path / 'index.pth', tmp_path / 'photos', embed_files=recording(embedded))
    assert embedded == photos[4:] and (report.unchanged, report.new) == (4, 2)


@pytest.mark.slow
def test_a_killed_indexing_run_keeps_every_chunk_it_saved(tiny_run, network, tmp_path):
    photos = make_photos(tmp_path / 'photos')
    index = str(tmp_path / 'index.pth')
    # the process is killed outright (no chance to save) while it embeds photos[4]
    script = f'''
import os, signal
import gallery as gallery_tool
import test as query_tool
model = query_tool.read_model({tiny_run["model_file"]!r}, 'cpu', 'the test')
identity = gallery_tool.model_identity(model, {tiny_run["model_file"]!r})
def embed_files(model, paths, progress):
    if {photos[4]!r} in paths:
        os.kill(os.getpid(), signal.SIGKILL)
    return gallery_tool.embed_queries(model, paths, progress=progress)
gallery_tool.update_index({index!r}, [{str(tmp_path / "photos")!r}], model, identity, embed_files=embed_files,
                          chunk_images=2, save_every_s=0, progress=False)
'''
    assert subprocess.run([sys.executable, '-c', script], cwd=ROOT).returncode == -signal.SIGKILL
    assert gallery_tool.load_index(index)['paths'] == photos[:4]
    embedded = []
    _, report = index_files(network, index, tmp_path / 'photos', embed_files=recording(embedded))
    assert embedded == photos[4:] and (report.unchanged, report.new) == (4, 2)


def brute_force(gallery, query, k):
    """Indices and similarities of the k best, ties to the lower index, the query's own row left out."""
    similarities = (gallery.embeddings @ query.embedding).tolist()
    others = (i for i in range(len(similarities)) if i != query.gallery_index)
    order = sorted(others, key=lambda i: (-similarities[i], i))
    return order[:k], [similarities[i] for i in order[:k]]


@pytest.mark.parametrize('block_bytes', [1 << 12, 1 << 26], ids=['many tiles', 'one tile'])
def test_search_is_exact_with_ties_to_the_lower_index(block_bytes):
    g = torch.Generator().manual_seed(0)
    embeddings = torch.nn.functional.normalize(torch.randn(3000, 16, generator=g), dim=1)
    embeddings[[100, 2000]] = embeddings[7].clone()  # the same photo three times
    gallery = gallery_tool.Gallery([f'{i}.jpg' for i in range(3000)], embeddings, None, None, '--index test')
    queries = [gallery_tool.Query(embeddings[7], None, 7), gallery_tool.Query(embeddings[2000], None, 2000),
               gallery_tool.Query(torch.nn.functional.normalize(torch.randn(16, generator=g), dim=0), None, None)]
    results = gallery_tool.search(gallery, queries, 5, block_bytes=block_bytes)
    for query, (indices, similarities) in zip(queries, results):
        expected_indices, expected_similarities = brute_force(gallery, query, 5)
        assert indices == expected_indices and similarities == pytest.approx(expected_similarities, abs=1e-6)
    assert results[0][0][:2] == [100, 2000] and results[1][0][:2] == [7, 100]  # the copies, each query left out
    with pytest.raises(ValueError, match='--retrieval_num 3000: the gallery holds 2999 other images'):
        gallery_tool.search(gallery, queries, 3000)


def test_ivf_search_probing_every_list_finds_what_exact_search_does():
    require('faiss', BENCH_EXTRA)
    g = torch.Generator().manual_seed(0)
    embeddings = torch.nn.functional.normalize(torch.randn(2000, 16, generator=g), dim=1)
    gallery = gallery_tool.Gallery([f'{i}.jpg' for i in range(2000)], embeddings, None, None, '--index test')
    queries = [gallery_tool.Query(embeddings[i], None, i) for i in (3, 500)] + [
        gallery_tool.Query(torch.nn.functional.normalize(torch.randn(16, generator=g), dim=0), None, None)]
    ivf = gallery_tool.build_ivf(embeddings)
    assert ivf.nlist == 45  # about sqrt(2000) lists
    ivf.nprobe = ivf.nlist
    for (ivf_indices, ivf_similarities), (indices, similarities) in zip(
            gallery_tool.search(gallery, queries, 10, ivf=ivf), gallery_tool.search(gallery, queries, 10)):
        assert ivf_indices == indices and ivf_similarities == pytest.approx(similarities, abs=1e-6)


@pytest.mark.slow  # several runs of test.py; the ivf itself is tested above
def test_search_ivf_is_built_once_kept_in_the_index_and_dropped_when_it_changes(tiny_run, tmp_path, capsys):
    require('faiss', BENCH_EXTRA)
    photos = make_photos(tmp_path / 'photos')
    index = str(tmp_path / 'index.pth')
    run = ['--model', tiny_run['model_file'], '--gallery', str(tmp_path / 'photos'), '--index', index,
           '--query_img_name', photos[0], '--retrieval_num', '4']
    query_tool.main(run + ['--output_dir', str(tmp_path / 'exact')])
    query_tool.main(run + ['--search', 'ivf', '--output_dir', str(tmp_path / 'ivf')])
    assert f'{index}: built its ivf (2 lists)' in capsys.readouterr().out
    assert 'ivf' in gallery_tool.load_index(index)
    query_tool.main(run + ['--search', 'ivf', '--output_dir', str(tmp_path / 'ivf')])
    assert 'built its ivf' not in capsys.readouterr().out
    folder = os.path.basename(query_tool.query_folder('', photos[0]))
    # with its few lists all probed (--nprobe 32 by default), the ivf finds what exact search does
    assert [s for _, s in results_by_rank(tmp_path / 'ivf' / folder)] == \
        pytest.approx([s for _, s in results_by_rank(tmp_path / 'exact' / folder)], abs=1e-4)
    os.remove(photos[5])
    query_tool.main(run[:6])  # re-index only
    assert 'ivf' not in gallery_tool.load_index(index)  # built for rows that are gone


def test_amp_none_indexes_in_fp32_and_the_default_precision_agrees_with_it(tiny_run, network, tmp_path):
    photos = make_photos(tmp_path / 'photos')
    model, _ = network
    fp32 = gallery_tool.embed_queries(model, photos, progress=False)
    indexed = {}
    for amp in ('none', 'auto'):
        index_file = tmp_path / f'{amp}_index.pth'
        query_tool.main(['--model', tiny_run['model_file'], '--gallery', str(tmp_path / 'photos'),
                         '--index', str(index_file), '--amp', amp])
        indexed[amp] = gallery_tool.load_index(str(index_file))['embeddings']
    assert torch.allclose(indexed['none'], fp32, atol=1e-5)
    # bf16 rounds the network's activations, not the ranking: each photo's two embeddings nearly agree
    assert (indexed['auto'] * fp32).sum(dim=1).min() > 0.99
