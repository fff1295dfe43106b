"""
The input path: what a DataLoader worker spends per training image, on one CPU thread.

  old      PIL decode, RandomResizedCrop and flip on the PIL image, ToTensor and Normalize: float32
           batches (the path before the Model normalised its own input; reimplemented here)
  new      utils.read_image (libjpeg-turbo's decode_jpeg) and utils.build_transforms' train transform
           (torchvision.transforms.v2 on uint8): uint8 batches, normalised by the network on its device
  new, --max_size N   the same, on data_utils.py --max_size N copies of the images, made here in a
           temporary folder as data_utils makes them (PIL LANCZOS thumbnail, JPEG quality 95)

Each is timed over the same --count images (the first, sorted by name, of --images), the files in
the page cache, after one untimed pass; the best of --rounds rounds. Single process, one torch
thread: a worker's cost. The table gives ms per image, what --workers such workers would feed
(images/s, were the cores free for them), and the bytes of a batch of 64 that go to the device.

    python benchmarks/input_bench.py --images /work/cars/cars_train      # Cars196's training JPEGs
    python benchmarks/input_bench.py --images DIR --backbone_type efficientnet_lite0 --max_size 320
"""
import argparse
import glob
import os
import sys
import tempfile
import time

from measure import pin_threads  # beside this script; puts the repo root on sys.path

pin_threads(1)  # a worker's share: one thread

import torch  # noqa: E402
import torchvision.transforms as T  # noqa: E402
from PIL import Image  # noqa: E402

from model import backbone_spec  # noqa: E402
from utils import IMAGE_EXTENSIONS, build_transforms, read_image, read_rgb  # noqa: E402

parser = argparse.ArgumentParser(description='\n\n'.join(__doc__.split('\n\n')[:3]),
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument('--images', required=True, help='a folder of images (the data sets\' JPEGs)')
parser.add_argument('--count', type=int, default=300, help='how many of its images, the first by name')
parser.add_argument('--backbone_type', default='resnet50')
parser.add_argument('--image_size', type=int, default=224)
parser.add_argument('--max_size', type=int, default=400, help="the longer side of data_utils' --max_size copies")
parser.add_argument('--rounds', type=int, default=3)
parser.add_argument('--workers', type=int, default=8, help='the DataLoader workers the throughput column assumes')
parser.add_argument('--batch_size', type=int, default=64, help='for the MB-per-batch column')
args = parser.parse_args()
torch.set_num_threads(1)
load_before = os.getloadavg()


def old_transform(spec, size):
    """The float32 train transform of before: PIL image in, normalised float32 [3, size, size] out."""
    interpolation = T.InterpolationMode(spec.interpolation)
    bgr_255 = [T.Lambda(lambda x: x[[2, 1, 0]] * 255)] if spec.bgr_255 else []
    return T.Compose([T.RandomResizedCrop(size, interpolation=interpolation), T.RandomHorizontalFlip(), T.ToTensor(),
                      *bgr_255, T.Normalize(spec.mean, spec.std)])


def shrunk_copies(paths, max_size, folder):
    """data_utils.write_splits' --max_size copies: the longer side at most max_size, LANCZOS, JPEG 95."""
    copies = []
    for path in paths:
        image = read_rgb(path)
        if max(image.size) > max_size:
            image.thumbnail((max_size, max_size), Image.LANCZOS)
        copies.append(os.path.join(folder, os.path.basename(os.path.splitext(path)[0]) + '.jpg'))
        image.save(copies[-1], 'JPEG', quality=95)
    return copies


def mean_pixels(paths):
    def pixels(path):
        with Image.open(path) as image:  # the header only: nothing decoded
            return image.width * image.height
    return sum(map(pixels, paths)) / len(paths)


def ms_per_image(load, transform, paths):
    """Best of --rounds passes of transform(load(path)) over paths, after one untimed pass; and the
    last output's dtype and bytes per image."""
    torch.manual_seed(0)
    best = float('inf')
    for round_ in range(args.rounds + 1):
        start = time.perf_counter()
        for path in paths:
            out = transform(load(path))
        if round_:
            best = min(best, time.perf_counter() - start)
    return 1000 * best / len(paths), out.dtype, out.numel() * out.element_size()


paths = sorted(p for p in glob.glob(os.path.join(args.images, '*'))
               if os.path.splitext(p)[1].lower() in IMAGE_EXTENSIONS)[:args.count]
if not paths:
    sys.exit(f'error: no images in {args.images}')
spec = backbone_spec(args.backbone_type)
new_transform = build_transforms(spec, args.image_size)[0]
pixels = mean_pixels(paths)

with tempfile.TemporaryDirectory() as folder:
    copies = shrunk_copies(paths, args.max_size, folder)
    copy_pixels = mean_pixels(copies)
    rows = [('old: PIL + float32 normalise', f'{pixels / 1e3:.0f}k', ms_per_image(read_rgb, old_transform(
                spec, args.image_size), paths)),
            ('new: decode_jpeg + v2, uint8', f'{pixels / 1e3:.0f}k', ms_per_image(read_image, new_transform, paths)),
            (f'new, --max_size {args.max_size} copies', f'{copy_pixels / 1e3:.0f}k',
             ms_per_image(read_image, new_transform, copies))]

load_after = os.getloadavg()
cpu = next((line.split(':', 1)[1].strip() for line in open('/proc/cpuinfo') if line.startswith('model name')), 'CPU')
print(f'torch {torch.__version__}, {cpu}, {os.cpu_count()} cores, 1 torch thread, one process; '
      f'{len(paths)} images of {args.images}; {args.backbone_type} convention at {args.image_size} px; '
      f'best of {args.rounds} rounds after 1 untimed')
print(f'load average (1, 5, 15 min) before {", ".join(f"{v:.2f}" for v in load_before)}, '
      f'after {", ".join(f"{v:.2f}" for v in load_after)}'
      # this process adds about 1 to the load of its own while it runs
      + (' (another process was busy on the cores)' if load_before[0] > 0.5 or load_after[0] > 1.5 else ''))
print(f'\n| path | mean pixels | ms / image | {args.workers} workers, images/s | batch of {args.batch_size} | '
      f'MB / batch |\n|---|---:|---:|---:|---|---:|')
for name, size, (ms, dtype, nbytes) in rows:
    print(f'| {name} | {size} | {ms:.2f} | {args.workers * 1000 / ms:.0f} | {str(dtype).removeprefix("torch.")} '
          f'| {args.batch_size * nbytes / 1e6:.1f} |')
