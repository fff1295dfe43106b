"""A run's embedding network for other runtimes, its preprocessing written in the file and beside it:

    python export.py --model results/{run}_model.pth --format onnx [--out PATH]

onnx, onnxscript and onnxruntime (pip install -r requirements-export.txt) are imported only when an
export runs: without them the rest of the project works, and export.py says what to install.
"""
import argparse
import json
import os

import numpy as np
import torch
from torchvision.transforms import v2

from model import Model
from utils import HelpFormatter, atomic_path, build_transforms, run_script

EXPORT_REQUIREMENTS = 'requirements-export.txt'
EXPORT_TOLERANCE = 1e-4  # largest |onnxruntime - PyTorch| per embedding coordinate
# Each step of the test transform as the exported file's users must repeat it, keyed by its type:
# read off the transform build_transforms() makes, so the description cannot drift from it. The
# normalisation is not among them: the network does it (model.InputConvention), in the file too.
PREPROCESSING_STEPS = {
    v2.Resize: lambda t: {'step': 'resize', 'shorter_side': t.size[0], 'interpolation': t.interpolation.value,
                          'antialias': t.antialias},
    v2.CenterCrop: lambda t: {'step': 'center_crop', 'height': t.size[0], 'width': t.size[1]},
}


def preprocessing(backbone_spec, image_size, feature_dim):
    """How an image file becomes the exported network's input, and what comes out: a JSON-able dict."""
    test_transform = build_transforms(backbone_spec, image_size)[1]
    return {'decode': 'RGB, 8 bits per channel (PIL: Image.open(path).convert("RGB"))',
            'steps': [PREPROCESSING_STEPS[type(step)](step) for step in test_transform.transforms],
            'input': {'name': 'images', 'dtype': 'uint8', 'shape': ['batch', 3, image_size, image_size],
                      'does': 'RGB 0-255, channels first; the network applies its mean and std itself'},
            'output': {'name': 'embeddings', 'dtype': 'float32', 'shape': ['batch', feature_dim],
                       'does': 'L2-normalised: cosine similarity is the dot product'}}


def import_export_packages(export_format):
    try:
        import onnx  # noqa: F401  (the exporter writes with it)
        import onnxruntime
        import onnxscript  # noqa: F401  (torch.onnx's exporter translates with it)
    except ImportError as e:
        raise ModuleNotFoundError(f'export --format {export_format} needs onnx, onnxscript and onnxruntime '
                                  f'({e.name} is missing): pip install -r {EXPORT_REQUIREMENTS}') from None
    return onnxruntime


def export_onnx(model, example, description, path):
    """Write the network to path as ONNX, batch size dynamic, description in its metadata; check
    that onnxruntime embeds the example as PyTorch does. Returns the largest difference."""
    onnxruntime = import_export_packages('onnx')
    model = model.eval()
    program = torch.onnx.export(model, (example,), dynamo=True, verbose=False, input_names=['images'],
                                output_names=['embeddings'], dynamic_shapes={'images': {0: torch.export.Dim('batch')}})
    program.model.metadata_props.update({key: json.dumps(value) for key, value in description.items()})
    with atomic_path(path) as tmp:
        program.save(tmp, external_data=False)
        session = onnxruntime.InferenceSession(tmp, providers=['CPUExecutionProvider'])
        with torch.no_grad():
            expected = model(example).numpy()
        difference = float(np.abs(session.run(None, {'images': example.numpy()})[0] - expected).max())
        if difference > EXPORT_TOLERANCE:
            raise ValueError(f'{path}: onnxruntime differs from PyTorch by {difference:.2g} (> {EXPORT_TOLERANCE}); '
                             f'not written')
    return difference


EXPORT_FORMATS = {'onnx': ('.onnx', export_onnx)}  # format -> (file suffix, writer)


def export(model_path, export_format, out=None):
    """The embedding network of a run's _model.pth, written for another runtime (default: beside it,
    {run}_model.onnx), with its preprocessing in the file's metadata and in {out}_preprocessing.json."""
    suffix, write = EXPORT_FORMATS[export_format]
    not_found = f'model file {model_path} not found: export --model names the _model.pth of a run'
    if not os.path.isfile(model_path):  # said whatever is installed
        raise FileNotFoundError(not_found)
    import_export_packages(export_format)  # before the slow part: a missing package is said at once
    model = Model.from_file(model_path, not_found=not_found)
    run = model.run_args
    out = out or os.path.splitext(model_path)[0] + suffix
    description = {'preprocessing': preprocessing(model.backbone_spec, run['image_size'], run['feature_dim']),
                   'run': {key: run.get(key) for key in ('run_name', 'backbone_type', 'pooling', 'feature_dim',
                                                          'image_size')} | {'model_file': os.path.basename(model_path)}}
    torch.manual_seed(0)  # a batch of 2: the exporter needs more than one row to keep the batch size dynamic
    example = torch.randint(0, 256, (2, 3, run['image_size'], run['image_size']), dtype=torch.uint8)
    difference = write(model, example, description, out)
    sidecar = os.path.splitext(out)[0] + '_preprocessing.json'
    with atomic_path(sidecar) as tmp, open(tmp, 'w') as f:
        json.dump(description, f, indent=2)
    return out, sidecar, difference


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="A run's embedding network for other runtimes (onnx: "
                                                 f'pip install -r {EXPORT_REQUIREMENTS}).',
                                     formatter_class=HelpFormatter)
    parser.add_argument('--model', required=True, help='{run}_model.pth written by train.py')
    parser.add_argument('--format', default='onnx', choices=list(EXPORT_FORMATS))
    parser.add_argument('--out', help='default: {run}_model.onnx beside the model', metavar='PATH')
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    out, sidecar, difference = export(args.model, args.format, args.out)
    print(f'wrote {out} (onnxruntime matches PyTorch to {difference:.1e}) and its preprocessing, {sidecar}')


if __name__ == '__main__':
    run_script(main)
