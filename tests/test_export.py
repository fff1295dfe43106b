"""export.py: a run's embedding network as ONNX, which onnxruntime runs as PyTorch does."""
import importlib.util
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

import export
import gallery as gallery_tool  # the repository's gallery.py
import test as query_tool  # the repository's test.py, not a test module
import utils
from conftest import EXPORT_EXTRA, require, write_tiny_run
from test_query import draw_image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


BACKBONES = ['resnet18', 'timm:test_vit.r160_in1k']  # a classic CNN, and a timm ViT (random weights)


def export_packages():
    """onnxruntime, once onnx, onnxscript and it are there (else a skip, or a failure in CI)."""
    for module in ('onnx', 'onnxscript'):
        require(module, EXPORT_EXTRA)
    return require('onnxruntime', EXPORT_EXTRA)


@pytest.fixture(scope='module', params=BACKBONES)
def exported(request, tmp_path_factory):
    onnxruntime = export_packages()
    model_file = write_tiny_run(str(tmp_path_factory.mktemp('run')), request.param)['model_file']
    export.main(['--model', model_file, '--format', 'onnx'])
    onnx_file = model_file.removesuffix('.pth') + '.onnx'  # the default: beside the model
    model = query_tool.read_model(model_file, 'cpu', 'the test')
    return {'onnx': onnx_file, 'model': model, 'run': model.run_args,
            'session': onnxruntime.InferenceSession(onnx_file, providers=['CPUExecutionProvider'])}


@pytest.fixture(scope='module')
def photos(tmp_path_factory):
    folder = tmp_path_factory.mktemp('photos')
    sizes = [(90, 60), (40, 75), (33, 33), (120, 47), (64, 64), (50, 90), (77, 41)]  # odd sizes test the crop
    colours = ['red', 'green', 'yellow', 'purple', 'orange', 'black', 'white']
    return [str(draw_image(folder / f'p{i}.{"png" if i % 2 else "jpg"}', c, s))
            for i, (s, c) in enumerate(zip(sizes, colours))]


@pytest.mark.slow
def test_onnxruntime_embeds_batches_of_any_size_as_pytorch_does(exported, photos):
    session, model = exported['session'], exported['model']
    assert isinstance(session.get_inputs()[0].shape[0], str)  # a named, dynamic batch dimension
    transform = utils.build_transforms(model.backbone_spec, exported['run']['image_size'])[1]
    images = torch.stack([transform(utils.read_image(p)) for p in photos])
    assert session.get_inputs()[0].type == 'tensor(uint8)' and images.dtype == torch.uint8  # what the loaders ship
    for batch in (1, 3, 7):
        with torch.no_grad():
            expected = model(images[:batch]).numpy()
        embeddings = session.run(['embeddings'], {'images': images[:batch].numpy()})[0]
        assert embeddings.shape == (batch, exported['run']['feature_dim'])
        assert np.abs(embeddings - expected).max() < 1e-4


@pytest.mark.slow
def test_the_preprocessing_is_written_in_the_file_and_beside_it(exported):
    metadata = exported['session'].get_modelmeta().custom_metadata_map
    sidecar = exported['onnx'].removesuffix('.onnx') + '_preprocessing.json'
    with open(sidecar) as f:
        assert json.load(f)['preprocessing'] == json.loads(metadata['preprocessing'])
    steps = json.loads(metadata['preprocessing'])['steps']
    # the backbone's input convention at the run's 32 px: resized to 32 / crop fraction, centre crop;
    # the network normalises its uint8 input itself
    spec = exported['model'].backbone_spec
    assert [s['step'] for s in steps] == ['resize', 'center_crop']
    assert steps[0]['shorter_side'] == round(32 / spec.crop_pct) and steps[0]['interpolation'] == spec.interpolation
    assert (steps[1]['height'], steps[1]['width']) == (32, 32)
    assert json.loads(metadata['preprocessing'])['input']['dtype'] == 'uint8'
    assert json.loads(metadata['run'])['backbone_type'] == exported['run']['backbone_type']


def docs_snippet():
    """The onnxruntime example of docs/search.md (the export section)."""
    with open(os.path.join(ROOT, 'docs', 'search.md')) as f:
        page = f.read()
    return re.search(r'<!-- onnxruntime snippet -->\n```python\n(.*?)```', page, re.S).group(1)


@pytest.mark.slow
def test_the_docs_snippet_embeds_an_image_as_test_py_does(exported, photos):
    snippet = docs_snippet()
    assert len(snippet.strip().splitlines()) <= 12
    onnx_file, image = re.findall(r"'([^']+\.(?:onnx|jpg))'", snippet)
    namespace = {}
    for photo in photos:
        exec(snippet.replace(onnx_file, exported['onnx']).replace(image, photo), namespace)
        expected = gallery_tool.embed_queries(exported['model'], [photo], progress=False)[0]
        # PIL's resize in the snippet, the antialiased tensor resize in test.py: a level apart in a
        # few pixels, which moved the ViT's embedding by 1.4e-4 (the network itself agrees to 1e-4)
        assert np.abs(namespace['embedding'] - expected.numpy()).max() < 1e-3


def test_a_missing_model_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=f'model file {tmp_path}/none_model.pth not found'):
        export.main(['--model', str(tmp_path / 'none_model.pth')])
    assert not os.listdir(tmp_path)


@pytest.mark.slow  # a fresh interpreter importing torch, and an export
def test_export_py_writes_the_file_and_its_preprocessing_as_a_user_runs_it(tiny_run, tmp_path):
    export_packages()
    out = tmp_path / 'm.onnx'
    cli = subprocess.run([sys.executable, 'export.py', '--model', tiny_run['model_file'], '--out', str(out)],
                         capture_output=True, text=True, cwd=ROOT)
    assert cli.returncode == 0, cli.stderr
    assert cli.stdout.startswith(f'wrote {out} (onnxruntime matches PyTorch to ')
    assert cli.stdout.endswith(f'and its preprocessing, {tmp_path}/m_preprocessing.json\n')
    assert sorted(os.listdir(tmp_path)) == ['m.onnx', 'm_preprocessing.json']


@pytest.mark.slow  # a fresh interpreter importing torch
def test_without_the_export_packages_it_says_what_to_install(tiny_run, tmp_path):
    # onnxscript made unimportable, as in an environment without requirements-export.txt
    argv = ['export.py', '--model', tiny_run['model_file'], '--out', str(tmp_path / 'm.onnx')]
    script = (f"import runpy, sys; sys.modules['onnxscript'] = None; sys.argv = {argv!r}; "
              "runpy.run_path('export.py', run_name='__main__')")
    cli = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True, cwd=ROOT)
    assert cli.returncode != 0 and not os.listdir(tmp_path)
    said = re.fullmatch(r'error: export --format onnx needs onnx, onnxscript and onnxruntime \((\w+) is missing\): '
                        r'pip install -r requirements-export\.txt', cli.stderr.strip().splitlines()[-1])
    # the one named: onnxscript, or one that is not installed here either (requirements.txt alone)
    assert said and (said.group(1) == 'onnxscript' or importlib.util.find_spec(said.group(1)) is None)
