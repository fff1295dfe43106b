"""
Training throughput: how close does the real training loop come to the network's own speed?

  pure   train.train_epoch over a random batch already in memory (on the device): forward,
         loss, backward and optimizer step, nothing else
  loop   train.train_epoch over the DataLoader train.build_loader makes for train.py, on the
         synthetic set on disk: JPEG decoding, RandomResizedCrop and flip in --num_workers
         processes that restart every epoch, as train.py's do (uint8 batches, which the network
         normalises)
  warmup (--warmup, instead of the above) a step of a warm-up epoch (--warmup_epochs: the trunk
         held still, outside autograd) against a normal step: train.train_epoch over batches in
         memory, Proxy-Anchor (whose recipe warms up), the trunk's BatchNorm frozen as it is with
         --pretrained weights; warm-up and normal epochs in turns

Both take the network, loss, optimizer and loader from train.py's own functions and defaults
(train.parse_args), so the compute is the same and only where the batches come from differs.
The target: the loop reaches at least 85% of the pure rate on 2 CPU cores, resnet18 at 112 px.

    python benchmarks/train_bench.py                     # resnet18, 112 px, batch 64, workers 0,1,2
    python benchmarks/train_bench.py --source_size 500 --max_size 128  # CUB-sized sources, data_utils --max_size
    python benchmarks/train_bench.py --warmup --batch_size 16  # warm-up step / normal step, about a minute

The defaults take about 4.5 minutes on 2 idle cores. Each worker setting gets one warm-up epoch,
then --epochs timed epochs, each next to a pure round of as many steps, so that a machine whose
load drifts shifts both sides of a ratio alike; rates are the median over rounds. On CUDA it also
measures resnet50 at 224 px in fp32 and --amp bf16, each contiguous and channels-last.
"""
import argparse
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # the script lives in benchmarks/, train.py in the repo root

import torch  # noqa: E402

import train  # noqa: E402
from data_utils import load_splits, prepare_synthetic, split_path  # noqa: E402
from model import BACKBONES, backbone_spec, preferred_memory_format  # noqa: E402
from utils import add_device_argument, atomic_path, build_transforms, flatten_split, read_image, resolve_device  # noqa: E402

parser = argparse.ArgumentParser(description='\n\n'.join(__doc__.split('\n\n')[:3]),
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument('--backbone_type', default='resnet18', choices=list(BACKBONES))
parser.add_argument('--image_size', type=int, default=112)
parser.add_argument('--batch_size', type=int, default=64)
parser.add_argument('--amp', default='none', choices=list(train.AMP_DTYPES))
parser.add_argument('--num_workers', default='0,1,2', help='comma-separated DataLoader worker counts to compare')
parser.add_argument('--epochs', type=int, default=2, help='timed epochs (and pure rounds) per worker setting')
add_device_argument(parser)
parser.add_argument('--data_path', help='where the synthetic set is, or is generated; default: a temporary folder')
parser.add_argument('--source_size', type=int, default=64,
                    help="side of the synthetic images generated (data_utils' --image_size); 64 is its default")
parser.add_argument('--max_size', type=int, help="train on data_utils' --max_size copies of the images")
parser.add_argument('--out', help='also write the Markdown table to this file (atomically)')
parser.add_argument('--warmup', action='store_true', help='time a warm-up step against a normal step instead')
parser.add_argument('--steps', type=int, default=5, help='--warmup: steps per timed epoch')
args = parser.parse_args()
workers_list = [int(w) for w in args.num_workers.split(',')]
load_before = os.getloadavg()


def timed(run):
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def write_table(header, rows):
    """The header, the load average at the start and now, then the rows: printed, and written to --out."""
    load_after = os.getloadavg()
    table = '\n'.join([
        header,
        f'load average (1, 5, 15 min) before {", ".join(f"{v:.2f}" for v in load_before)}, '
        f'after {", ".join(f"{v:.2f}" for v in load_after)}',
        '', *rows, ''])
    print('\n' + table)
    if args.out:
        with atomic_path(args.out) as tmp_path, open(tmp_path, 'w') as f:  # a crash mid-write keeps any previous table
            f.write(table)


def cpu_name():
    with open('/proc/cpuinfo') as f:
        return next((line.split(':', 1)[1].strip() for line in f if line.startswith('model name')), 'CPU')

# -----------------------------------------------------------------------------
# --warmup: what a warm-up step costs against a normal one


WARMUP_CLASSES = 100  # CUB's training classes: as many proxies as a real run's


def warmup_step_times(folder):
    """(seconds per warm-up step, per normal step, their ratio): medians over --epochs rounds, each
    one warm-up epoch (1) and one normal epoch (2) of --steps steps, after one untimed round."""
    spec = backbone_spec(args.backbone_type)
    weights = os.path.join(folder, 'weights.pth')  # random, but --pretrained: its BatchNorm is frozen
    torch.save(spec.build().state_dict(), weights)
    targs = train.parse_args(['--backbone_type', args.backbone_type, '--pretrained', weights, '--loss_name',
                              'proxy_anchor', '--warmup_epochs', '1', '--image_size', str(args.image_size),
                              '--batch_size', str(args.batch_size), '--amp', args.amp, '--device', args.device])
    device = torch.device(targs.device)
    training = train.build_training(targs, WARMUP_CLASSES, device)
    images = torch.randint(0, 256, (args.batch_size, 3, args.image_size, args.image_size), dtype=torch.uint8,
                           device=device)  # what the loader ships: the network normalises it
    labels = torch.randint(WARMUP_CLASSES, (args.batch_size,), device=device)
    batches = [(images.to(memory_format=training.memory_format), labels)] * args.steps
    warm_up, normal = [], []
    for round_ in range(args.epochs + 1):
        seconds = [timed(lambda: train.train_epoch(training, batches, epoch, progress=False)) / args.steps
                   for epoch in (1, 2)]
        if round_:
            warm_up.append(seconds[0])
            normal.append(seconds[1])
    return (statistics.median(warm_up), statistics.median(normal),
            statistics.median(w / n for w, n in zip(warm_up, normal)))


if args.warmup:
    with tempfile.TemporaryDirectory() as folder:
        warm_up, normal, ratio = warmup_step_times(folder)
    write_table(f'torch {torch.__version__} on '
                f'{torch.cuda.get_device_name() if resolve_device(args.device) == "cuda" else cpu_name()}, '
                f'{os.cpu_count()} cores, {torch.get_num_threads()} torch threads; median of {args.epochs} rounds of '
                f'{args.steps} steps per epoch, after 1 untimed round',
                ['| backbone | size | batch | precision | loss | normal step ms | warm-up step ms | warm-up / normal |',
                 '|---|---:|---:|---|---|---:|---:|---:|',
                 f'| {args.backbone_type} | {args.image_size} | {args.batch_size} | '
                 f'{"fp32" if args.amp == "none" else args.amp} | proxy_anchor | {1000 * normal:.0f} | '
                 f'{1000 * warm_up:.0f} | {ratio:.2f} |'])
    sys.exit()

# -----------------------------------------------------------------------------
# data: the synthetic set on disk, its train split as train.py reads it

temporary = tempfile.TemporaryDirectory()  # removed at exit; unused when --data_path is given
data_path = args.data_path or temporary.name
if not os.path.exists(split_path(data_path, 'synthetic', max_size=args.max_size)):
    prepare_synthetic(data_path, image_size=args.source_size, max_size=args.max_size)
splits = load_splits(data_path, 'synthetic', max_size=args.max_size)
train_classes = sorted(splits['train'])
train_images, train_labels = flatten_split(splits['train'], train_classes)
# an existing --data_path may hold another size than --source_size: report what is decoded
decoded = read_image(train_images[0]).shape[:0:-1]  # (width, height)

# -----------------------------------------------------------------------------
# one configuration: pure rounds and loop epochs, side by side for each worker count

# train.py lays images out in preferred_memory_format(device, backbone): channels-last for CNNs.
# Asking build_training for another layout measures what that choice buys.
MEMORY_FORMATS = {'channels_last': torch.channels_last, 'contiguous': torch.contiguous_format}


def measure(backbone_type, image_size, amp, layout):
    """{workers: (pure img/s, loop img/s)} and the layout used, for one configuration."""
    def train_args(workers):
        return train.parse_args(['--data_path', data_path, '--data_name', 'synthetic', '--backbone_type', backbone_type,
                                 '--pretrained', 'none', '--image_size', str(image_size), '--batch_size',
                                 str(args.batch_size), '--amp', amp, '--num_workers', str(workers),
                                 '--device', args.device])
    targs = train_args(workers_list[0])
    device = torch.device(targs.device)
    memory_format = preferred_memory_format(device) if layout == 'auto' else MEMORY_FORMATS[layout]
    # --pretrained none: random weights cost the same compute as pretrained ones, and need no file
    training = train.build_training(targs, len(train_classes), device, memory_format=memory_format)
    train_transform, _ = build_transforms(training.model.backbone_spec, image_size)

    # uint8, as the loader ships it, already where train_epoch would move it, so its .to() is a
    # no-op and the step (the network's normalisation included) is all there is
    images = torch.randint(0, 256, (args.batch_size, 3, image_size, image_size), dtype=torch.uint8,
                           device=device).to(memory_format=memory_format)
    labels = torch.randint(len(train_classes), (args.batch_size,), device=device)
    train.train_epoch(training, [(images, labels)] * 3, 1, progress=False)  # warm-up

    rates = {}
    for workers in workers_list:
        targs = train_args(workers)
        loader = train.build_loader(train_images, train_labels, train_transform, True, targs, device)
        batches = [(images, labels)] * len(loader)
        pure, loop = [], []
        for epoch in range(args.epochs + 1):  # epoch 0 warms up the files' page cache and the workers' start
            loader.sampler.set_epoch(epoch)  # as train.py: a new order every epoch
            loop_time = timed(lambda: train.train_epoch(training, loader, epoch, progress=False))
            if epoch:
                pure_time = timed(lambda: train.train_epoch(training, batches, epoch, progress=False))
                loop.append(len(loader) * args.batch_size / loop_time)
                pure.append(len(batches) * args.batch_size / pure_time)
        rates[workers] = statistics.median(pure), statistics.median(loop)
        print(f'  {backbone_type} {image_size}px {amp} {layout}, {workers} workers: pure '
              + ' '.join(f'{r:.1f}' for r in pure) + ', loop ' + ' '.join(f'{r:.1f}' for r in loop) + ' img/s',
              flush=True)
    return rates, 'channels_last' if memory_format == torch.channels_last else 'contiguous'


# -----------------------------------------------------------------------------
# run every configuration, then the table

device_type = resolve_device(args.device)
train.use_fast_cuda_kernels(torch.device(device_type))  # as train.py: on CUDA, cuDNN autotuning and TF32
configurations = [(args.backbone_type, args.image_size, args.amp, 'auto')]
if device_type == 'cuda':
    configurations += [('resnet50', 224, amp, layout) for amp in ('none', 'bf16')
                       for layout in ('contiguous', 'channels_last')]
header = (f'torch {torch.__version__} on {torch.cuda.get_device_name() if device_type == "cuda" else "CPU"}, '
          f'{os.cpu_count()} cores, {torch.get_num_threads()} torch threads; synthetic set: '
          f'{len(train_images)} train images decoded at {decoded[0]}x{decoded[1]}'
          + (f' (--max_size {args.max_size} copies)' if args.max_size else '')
          + f', {len(train_images) // args.batch_size} batches per epoch; median of {args.epochs} timed epochs '
          f'after 1 warm-up')
print(header, flush=True)

rows = []
for backbone_type, image_size, amp, layout in configurations:
    rates, layout = measure(backbone_type, image_size, amp, layout)
    for workers, (pure, loop) in rates.items():
        rows.append(f'| {backbone_type} | {image_size} | {args.batch_size} | {"fp32" if amp == "none" else amp} | '
                    f'{layout} | {workers} | {pure:.1f} | {loop:.1f} | {loop / pure:.2f} | '
                    f'{"yes" if loop >= 0.85 * pure else "no"} |')
write_table(header, ['| backbone | size | batch | precision | layout | workers | pure img/s | loop img/s | loop / pure '
                     '| ≥ 85% |', '|---|---:|---:|---|---|---:|---:|---:|---:|---|', *rows])
