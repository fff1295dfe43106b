"""Downloads on demand: ImageNet weights into their library's cache, --pretrained URL, and CUB with
data_utils.py --download, each against a server on 127.0.0.1 that the test starts (it serves
files, answers Range requests, or cuts a response halfway). Nothing leaves the machine, and the
user's caches are untouched: TORCH_HOME and the Hugging Face cache point into tmp_path."""
import hashlib
import http.server
import io
import os
import socket
import subprocess
import sys
import tarfile
import threading
import time

import pytest
import torch
import torchvision

import data_utils
import train
from model import Model, backbone_spec, timm_weights_file, torch_hub_file, weights_file
from test_data_utils import cub_entries, make_cub
from utils import DownloadError, download, load_torch_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VIT = 'test_vit.r160_in1k'  # timm's tiny test ViT, as tests/test_backbones.py uses


class Handler(http.server.BaseHTTPRequestHandler):
    """Serves server.files {name: bytes}; answers a Range request with the rest of the file (206)
    when server.ranges; cuts the next server.cut[name] responses of a file after half its bytes."""

    def do_GET(self):
        server = self.server
        name = self.path.lstrip('/').split('?')[0]
        requested = self.headers.get('Range')
        server.requests.append((name, requested))
        if name not in server.files:
            self.send_error(404)
            return
        body, start = server.files[name], 0
        if requested and server.ranges:
            start = int(requested.removeprefix('bytes=').split('-')[0])
            if start >= len(body):
                self.send_error(416)
                return
            self.send_response(206)
            self.send_header('Content-Range', f'bytes {start}-{len(body) - 1}/{len(body)}')
        else:
            self.send_response(200)
        rest = body[start:]
        self.send_header('Content-Length', str(len(rest)))
        self.end_headers()
        if server.cut.get(name, 0) > 0:
            server.cut[name] -= 1
            self.wfile.write(rest[:len(rest) // 2])
            self.close_connection = True  # the connection closes with half the bytes sent
            return
        self.wfile.write(rest)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    """A file server on 127.0.0.1 for one test: .files, .cut, .ranges, .requests, and .url(name)."""
    httpd = http.server.ThreadingHTTPServer(('127.0.0.1', 0), Handler)
    httpd.files, httpd.cut, httpd.ranges, httpd.requests = {}, {}, True, []
    httpd.url = lambda name: f'http://127.0.0.1:{httpd.server_address[1]}/{name}'
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    """An empty torch hub cache: its checkpoints folder, where downloaded weights land."""
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch'))
    monkeypatch.delenv('HF_HUB_OFFLINE', raising=False)
    return tmp_path / 'torch' / 'hub' / 'checkpoints'


def resnet18_bytes():
    """A resnet18 state dict in its ImageNet file's format, with BatchNorm statistics no fresh
    network has (a frozen-BN run keeps them, so a trained model shows whether it started from it)."""
    net, generator = torchvision.models.resnet18(), torch.Generator().manual_seed(0)
    for module in net.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.normal_(generator=generator)
    buffer = io.BytesIO()
    torch.save(net.state_dict(), buffer)
    return buffer.getvalue()


@pytest.fixture(scope='module')
def weights():
    """(content, its torch-hub name resnet18-<sha256 prefix>.pth) of a resnet18 weights file."""
    content = resnet18_bytes()
    return content, f'resnet18-{hashlib.sha256(content).hexdigest()[:8]}.pth'


def leftovers(folder):
    return sorted(os.listdir(folder)) if os.path.isdir(folder) else []

# -----------------------------------------------------------------------------
# utils.download


def test_a_download_lands_whole_under_its_name(server, tmp_path):
    server.files['f.bin'] = content = os.urandom(3 << 20)
    path = download(server.url('f.bin'), str(tmp_path / 'f.bin'), sha256=hashlib.sha256(content).hexdigest()[:8],
                    progress=False)
    assert open(path, 'rb').read() == content and leftovers(tmp_path) == ['f.bin']


def test_a_cut_download_leaves_no_file_and_the_next_starts_again(server, tmp_path):
    server.files['f.bin'] = content = os.urandom(1 << 20)
    server.cut['f.bin'] = 1
    with pytest.raises(DownloadError, match=r'cut short after \d+ of 1048576 bytes'):
        download(server.url('f.bin'), str(tmp_path / 'f.bin'), progress=False)
    assert leftovers(tmp_path) == []
    download(server.url('f.bin'), str(tmp_path / 'f.bin'), progress=False)
    assert (tmp_path / 'f.bin').read_bytes() == content
    assert [r for _, r in server.requests] == [None, None]  # started again, not resumed


def test_a_resumable_download_continues_where_it_was_cut(server, tmp_path):
    server.files['a.tgz'] = content = os.urandom(1 << 20)
    server.cut['a.tgz'] = 1
    path = str(tmp_path / 'a.tgz')
    with pytest.raises(DownloadError):
        download(server.url('a.tgz'), path, md5=hashlib.md5(content).hexdigest(), resume=True, progress=False)
    assert leftovers(tmp_path) == ['a.tgz.part']  # never under the final name
    kept = os.path.getsize(path + '.part')
    download(server.url('a.tgz'), path, md5=hashlib.md5(content).hexdigest(), resume=True, progress=False)
    assert open(path, 'rb').read() == content and leftovers(tmp_path) == ['a.tgz']
    assert server.requests[-1] == ('a.tgz', f'bytes={kept}-')


def test_a_server_without_ranges_gives_the_whole_file_again(server, tmp_path):
    server.files['a.tgz'] = content = os.urandom(1 << 20)
    server.cut['a.tgz'], server.ranges = 1, False
    path = str(tmp_path / 'a.tgz')
    with pytest.raises(DownloadError):
        download(server.url('a.tgz'), path, resume=True, progress=False)
    download(server.url('a.tgz'), path, md5=hashlib.md5(content).hexdigest(), resume=True, progress=False)
    assert open(path, 'rb').read() == content  # the kept half was not prepended to it


def test_a_wrong_digest_deletes_the_file_and_names_it(server, tmp_path):
    server.files['a.tgz'] = b'not what was published'
    path = str(tmp_path / 'a.tgz')
    with pytest.raises(ValueError) as error:
        download(server.url('a.tgz'), path, md5='0' * 32, resume=True, progress=False)
    assert path in str(error.value) and server.url('a.tgz') in str(error.value) and 'deleted' in str(error.value)
    assert leftovers(tmp_path) == []


def test_a_silent_server_times_out_within_the_timeout(tmp_path):
    """A server that accepts the connection and never answers: the download gives up after `timeout`."""
    with socket.socket() as silent:
        silent.bind(('127.0.0.1', 0))
        silent.listen()
        start = time.monotonic()
        with pytest.raises(DownloadError):
            download(f'http://127.0.0.1:{silent.getsockname()[1]}/f.bin', str(tmp_path / 'f.bin'), timeout=1,
                     progress=False)
        assert time.monotonic() - start < 5
    assert leftovers(tmp_path) == []


def test_offline_fetches_nothing(server, tmp_path):
    server.files['f.bin'] = b'x'
    with pytest.raises(DownloadError, match='offline'):
        download(server.url('f.bin'), str(tmp_path / 'f.bin'), offline=True)
    assert server.requests == [] and leftovers(tmp_path) == []

# -----------------------------------------------------------------------------
# weights: the official file into the torch hub cache, and --pretrained URL


def test_the_imagenet_file_is_downloaded_into_the_torch_hub_cache_and_loaded(server, torch_home, weights):
    content, name = weights
    server.files[name] = content
    path = torch_hub_file(server.url(name))
    assert path == str(torch_home / name) and open(path, 'rb').read() == content
    assert torch_hub_file(server.url(name)) == path and len(server.requests) == 1  # cached: not fetched again
    assert leftovers(torch_home) == [name]


def test_a_file_that_fails_the_hash_in_its_name_is_deleted_named_and_never_loaded(server, torch_home, weights):
    content, _ = weights
    name = 'resnet18-00000000.pth'
    server.files[name] = content
    with pytest.raises(ValueError) as error:
        weights_file(backbone_spec('resnet18'), server.url(name))
    message = str(error.value)
    assert str(torch_home / name) in message and server.url(name) in message and 'sha256' in message
    assert leftovers(torch_home) == []


def test_a_cut_download_of_weights_is_never_loaded_and_the_next_run_fetches_it_whole(server, torch_home, weights):
    content, name = weights
    server.files[name] = content
    server.cut[name] = 1
    with pytest.raises(FileNotFoundError) as error:
        Model('resnet18', feature_dim=8, pretrained=server.url(name))
    assert 'cut short' in str(error.value) and str(torch_home / name) in str(error.value)
    assert leftovers(torch_home) == []
    model = Model('resnet18', feature_dim=8, pretrained=server.url(name))
    state = load_torch_file(str(torch_home / name), 'state dict')
    assert torch.equal(model.trunk.bn1.running_mean, state['bn1.running_mean'])


@pytest.mark.parametrize('switch', ['offline', 'HF_HUB_OFFLINE'])
def test_offline_the_missing_file_is_named_with_its_url_and_the_alternatives(switch, server, torch_home, weights,
                                                                            monkeypatch):
    content, name = weights
    server.files[name] = content
    if switch == 'HF_HUB_OFFLINE':
        monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    start = time.monotonic()
    with pytest.raises(FileNotFoundError) as error:
        torch_hub_file(server.url(name), offline=switch == 'offline')
    assert time.monotonic() - start < 10
    message = str(error.value)
    assert str(torch_home / name) in message and server.url(name) in message
    assert '--pretrained none' in message and '--pretrained PATH' in message
    assert server.requests == [] and leftovers(torch_home) == []


def test_timm_weights_out_of_reach_are_said_at_once(tmp_path, monkeypatch):
    """A hub that does not answer (here a closed port on 127.0.0.1) is said in seconds, not after
    huggingface_hub's half a minute of retries."""
    import huggingface_hub
    monkeypatch.delenv('HF_HUB_OFFLINE', raising=False)
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_CACHE', str(tmp_path / 'hf'))
    with socket.socket() as closed:
        closed.bind(('127.0.0.1', 0))
        port = closed.getsockname()[1]
    monkeypatch.setattr(huggingface_hub.constants, 'ENDPOINT', f'http://127.0.0.1:{port}')
    start = time.monotonic()
    with pytest.raises(FileNotFoundError) as error:
        timm_weights_file(VIT)
    assert time.monotonic() - start < 10
    assert f'timm/{VIT}' in str(error.value) and f'127.0.0.1:{port}' in str(error.value)
    assert '--pretrained none' in str(error.value)


def run_argv(data, out, *flags):
    return ['--data_path', str(data), '--data_name', 'synthetic', '--backbone_type', 'resnet18', '--image_size', '32',
            '--batch_size', '8', '--num_epochs', '1', '--num_workers', '0', '--output_dir', str(out), *flags]


@pytest.fixture
def small_data(tmp_path):
    data = tmp_path / 'data'
    data_utils.prepare_synthetic(str(data), num_classes=10, images_per_class=10, image_size=32)
    return data


def environment(tmp_path, **extra):
    env = {key: value for key, value in os.environ.items() if key != 'HF_HUB_OFFLINE'}
    return {**env, 'TORCH_HOME': str(tmp_path / 'torch'), 'HF_HOME': str(tmp_path / 'hf'), **extra}


@pytest.mark.slow  # a fresh interpreter trains one epoch
def test_a_run_starts_from_weights_at_a_url_and_caches_them(server, small_data, tmp_path, weights):
    content, name = weights
    server.files[name] = content
    out = tmp_path / 'results'
    argv = run_argv(small_data, out, '--pretrained', server.url(name))
    run_name = train.parse_args(argv).run_name  # before the run: after it, its files are there
    done = subprocess.run([sys.executable, os.path.join(ROOT, 'train.py'), *argv], capture_output=True, text=True,
                          env=environment(tmp_path), cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    cached = tmp_path / 'torch' / 'hub' / 'checkpoints' / name
    assert cached.read_bytes() == content
    # BatchNorm statistics stay frozen in training: the run's model still holds the served ones
    saved = torch.load(out / f'{run_name}_model.pth', weights_only=True)
    served = torch.load(cached, weights_only=True)
    assert torch.equal(saved['model']['trunk.bn1.running_mean'], served['bn1.running_mean'])
    assert [n for n, _ in server.requests] == [name]  # fetched once, then read from the cache


@pytest.mark.slow  # a fresh interpreter
@pytest.mark.parametrize('switch', ['--offline', 'HF_HUB_OFFLINE=1'])
def test_offline_a_run_stops_in_seconds_with_the_clear_message(switch, small_data, tmp_path):
    """The script's own ending (utils.run_script), timed from its start, after the imports."""
    code = ('import sys, time, train, utils\n'
            'start = time.monotonic()\n'
            'try:\n'
            '    utils.run_script(train.main, sys.argv[1:])\n'
            'finally:\n'
            '    print(f"seconds {time.monotonic() - start:.2f}", file=sys.stderr)\n')
    flags = ['--offline'] if switch == '--offline' else []
    env = environment(tmp_path, **({'HF_HUB_OFFLINE': '1'} if switch != '--offline' else {}))
    done = subprocess.run([sys.executable, '-c', code, *run_argv(small_data, tmp_path / 'results', *flags)],
                          capture_output=True, text=True, env=env, cwd=ROOT)
    assert done.returncode == 1 and 'Traceback' not in done.stderr
    seconds, error = done.stderr.strip().splitlines()[-2:]  # the exit's message comes after the finally
    expected = os.path.join(str(tmp_path / 'torch'), 'hub', 'checkpoints', 'resnet18-f37072fd.pth')
    assert error.startswith('error: ImageNet weights not found at ' + expected)
    assert 'https://download.pytorch.org/models/resnet18-f37072fd.pth' in error and '--pretrained none' in error
    assert float(seconds.split()[1]) < 10
    assert not (tmp_path / 'results').exists()

# -----------------------------------------------------------------------------
# CUB: data_utils.py --download


@pytest.fixture(scope='module')
def cub_release(tmp_path_factory):
    """(a CUB_200_2011.tgz laid out as the official one, its MD5, a folder prepared from the same
    files the old way: extracted by hand into DIR/cub/)."""
    by_hand = str(tmp_path_factory.mktemp('by_hand'))
    base = make_cub(by_hand, cub_entries(), nested=True)
    with open(os.path.join(base, 'train_test_split.txt'), 'w') as f:
        f.writelines(f'{i} {i % 2}\n' for i in range(1, len(cub_entries()) + 1))
    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode='w:gz') as tar:
        tar.add(base, arcname='CUB_200_2011')
    data_utils.prepare_cub(by_hand)
    content = archive.getvalue()
    return content, hashlib.md5(content).hexdigest(), by_hand


def relative_splits(data_path):
    root = os.path.join(data_path, 'cub')
    return {split: {name: [os.path.relpath(p, root) for p in paths] for name, paths in classes.items()}
            for split, classes in data_utils.load_splits(data_path, 'cub').items()}


def download_cub(data_path, url, md5):
    data_utils.main(['--data_path', str(data_path), '--data_name', 'cub', '--download', '--download_url', url,
                     '--download_md5', md5])


def test_cub_is_downloaded_checked_extracted_and_split_as_by_hand(server, cub_release, tmp_path):
    content, md5, by_hand = cub_release
    server.files['CUB_200_2011.tgz'] = content
    download_cub(tmp_path, server.url('CUB_200_2011.tgz'), md5)
    assert relative_splits(str(tmp_path)) == relative_splits(by_hand)
    assert leftovers(tmp_path) == ['cub']  # the archive is gone once extracted, and no temporary folder stays
    download_cub(tmp_path, server.url('CUB_200_2011.tgz'), md5)  # there already: nothing fetched again
    assert len(server.requests) == 1


def test_a_wrong_md5_is_refused_and_leaves_nothing(server, cub_release, tmp_path):
    content, md5, _ = cub_release
    server.files['CUB_200_2011.tgz'] = content
    with pytest.raises(ValueError) as error:
        download_cub(tmp_path, server.url('CUB_200_2011.tgz'), '0' * 32)
    assert 'CUB_200_2011.tgz' in str(error.value) and md5 in str(error.value)
    assert leftovers(tmp_path) == []


def test_a_cut_cub_download_leaves_no_folder_and_is_resumed(server, cub_release, tmp_path):
    content, md5, by_hand = cub_release
    server.files['CUB_200_2011.tgz'] = content
    server.cut['CUB_200_2011.tgz'] = 1
    with pytest.raises(FileNotFoundError, match='run the command again to resume'):
        download_cub(tmp_path, server.url('CUB_200_2011.tgz'), md5)
    assert leftovers(tmp_path) == ['CUB_200_2011.tgz.part']
    download_cub(tmp_path, server.url('CUB_200_2011.tgz'), md5)
    assert server.requests[-1][1] == f'bytes={len(content) // 2}-'
    assert relative_splits(str(tmp_path)) == relative_splits(by_hand)


def test_a_failed_extraction_leaves_no_half_written_folder(cub_release, tmp_path):
    content, _, _ = cub_release
    truncated = content[:len(content) * 2 // 3]  # its checksum is right, its archive is not
    (tmp_path / 'CUB_200_2011.tgz').write_bytes(truncated)
    with pytest.raises(ValueError, match='extraction failed'):
        download_cub(tmp_path, 'http://127.0.0.1:9/CUB_200_2011.tgz', hashlib.md5(truncated).hexdigest())
    assert leftovers(tmp_path) == ['CUB_200_2011.tgz']  # kept for another try; nothing extracted
    assert not os.path.exists(data_utils.split_path(str(tmp_path), 'cub'))


def test_a_data_set_without_an_official_archive_says_where_to_get_it(tmp_path):
    with pytest.raises(ValueError, match='car has no fixed official address.*docs/data.md'):
        data_utils.main(['--data_path', str(tmp_path), '--data_name', 'car', '--download'])
    assert leftovers(tmp_path) == []
