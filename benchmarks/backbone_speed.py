"""
Images/s of the backbones on this machine, for training and for embedding, side by side in one
run, in each precision and layout, with and without torch.compile:

  train   train.train_epoch over batches already in memory: forward, proxy loss, backward and the
          AdamW step of train.py's own optimizer, with train.py's defaults for the backbone
  embed   model.embed over the same batches: eval mode, no gradients, as the test set is embedded

  fp32 / bf16      --amp none / --amp bf16 (autocast; the loss stays fp32)
  contiguous / cl  the images and weights in the contiguous or the channels-last layout

No data loading: what the network costs, nothing else. Each rate is the median of --rounds
rounds of --batches batches, after one warm-up batch. The last column is what train.py's
defaults (--amp auto, the layout of model.preferred_memory_format, no --compile) gain over fp32
contiguous, which is --amp none in the layout before channels-last became the CPU's default.

    python benchmarks/backbone_speed.py                                   # every family, 224 and 128 px
    python benchmarks/backbone_speed.py --backbone_types efficientnet_lite0 --image_sizes 96 --compile off
"""
import argparse
import os
import platform
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # the script lives in benchmarks/, train.py in the repo root

import torch  # noqa: E402

import train  # noqa: E402
from model import backbone_spec, embed, preferred_memory_format  # noqa: E402
from utils import AMP_DTYPES, atomic_path, computes_bf16, precision_label, resolve_amp  # noqa: E402

# a classic CNN, Lite0, BN-Inception and a timm ViT: one of every family and input convention
BACKBONES = 'resnet50,efficientnet_lite0,inception,timm:vit_small_patch16_224'
LAYOUTS = {'contiguous': torch.contiguous_format, 'cl': torch.channels_last}
CLASSES = 50  # the synthetic set's training classes

parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument('--backbone_types', default=BACKBONES, help='comma-separated, as train.py --backbone_type')
parser.add_argument('--image_sizes', default='224,128')
parser.add_argument('--amps', default='none,bf16', help='comma-separated --amp values')
parser.add_argument('--layouts', default='contiguous,cl', help=f'comma-separated, of {",".join(LAYOUTS)}')
parser.add_argument('--compile', default='off,on', help='comma-separated: off, on')
parser.add_argument('--batch_size', type=int, default=32)
parser.add_argument('--batches', type=int, default=2)
parser.add_argument('--rounds', type=int, default=3)
parser.add_argument('--out', help='also write the Markdown table to this file (atomically)')
args = parser.parse_args()
DEVICE = torch.device('cpu')


def rate(run, batches):
    start = time.perf_counter()
    run()
    return batches * args.batch_size / (time.perf_counter() - start)


def measure(backbone_type, image_size, amp, layout, compiled):
    """(train img/s, embed img/s) of one configuration."""
    targs = train.parse_args(['--backbone_type', backbone_type, '--pretrained', 'none', '--image_size', str(image_size),
                              '--batch_size', str(args.batch_size), '--amp', amp, '--device', 'cpu']
                             + (['--compile'] if compiled else []))
    # --pretrained none: random weights cost the same compute as pretrained ones, and need no file
    training = train.build_training(targs, CLASSES, DEVICE, memory_format=LAYOUTS[layout])
    # uint8, as the data loader ships it: the network's own normalisation is part of its cost
    images = torch.randint(0, 256, (args.batch_size, 3, image_size, image_size),
                           dtype=torch.uint8).to(memory_format=LAYOUTS[layout])
    batch = (images, torch.randint(CLASSES, (args.batch_size,)))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*batch), batch_size=args.batch_size)
    # epoch 2: past the warm-up epoch of the ViT recipe, so the whole network trains
    train_batches = lambda n: train.train_epoch(training, [batch] * n, 2, progress=False)  # noqa: E731
    embed_batches = lambda n: [embed(training.network, loader, amp_dtype=AMP_DTYPES[amp], progress=False,  # noqa: E731
                                     memory_format=LAYOUTS[layout]) for _ in range(n)]
    train_batches(1), embed_batches(1)  # warm-up, and compilation with --compile
    train_rates = [rate(lambda: train_batches(args.batches), args.batches) for _ in range(args.rounds)]
    embed_rates = [rate(lambda: embed_batches(args.batches), args.batches) for _ in range(args.rounds)]
    return statistics.median(train_rates), statistics.median(embed_rates)


def default_configuration(backbone_type, image_size):
    """The (amp, layout, compiled) train.py runs this backbone at this size in here by default."""
    amp = train.parse_args(['--backbone_type', backbone_type, '--image_size', str(image_size), '--device', 'cpu']).amp
    fmt = preferred_memory_format(DEVICE, backbone_spec(backbone_type))
    return amp, next(k for k, v in LAYOUTS.items() if v == fmt), False


def cpu_name():
    try:
        with open('/proc/cpuinfo') as f:
            cpuinfo = f.read()
    except OSError:
        return platform.processor() or platform.machine(), ''
    name = next(line.split(':', 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith('model name'))
    flags = set(next(line.split(':', 1)[1] for line in cpuinfo.splitlines() if line.startswith('flags')).split())
    wanted = ('avx2', 'avx512f', 'avx512_bf16', 'amx_bf16', 'amx_tile')
    return name, ' '.join(flag for flag in wanted if flag in flags)


amps, layouts = args.amps.split(','), args.layouts.split(',')
compiles = [{'off': False, 'on': True}[c] for c in args.compile.split(',')]
configurations = [(amp, layout, compiled) for compiled in compiles for amp in amps for layout in layouts]
load_before = os.getloadavg()[0]
rows = []
for backbone_type in args.backbone_types.split(','):
    for image_size in map(int, args.image_sizes.split(',')):
        default = default_configuration(backbone_type, image_size)
        rates = {c: measure(backbone_type, image_size, *c) for c in configurations}
        fp32 = ('none', 'contiguous', False)
        for kind, column in (('train', 0), ('embed', 1)):
            gain = (f'{rates[default][column] / rates[fp32][column]:.2f}x'
                    if default in rates and fp32 in rates else 'n/a')
            rows.append(f'| {backbone_type} | {image_size} | {kind} | '
                        + ' | '.join(f'{rates[c][column]:.1f}' for c in configurations) + f' | {gain} |')
        print(rows[-2], rows[-1], sep='\n', flush=True)

name, flags = cpu_name()
head = [f'{precision_label(a)} {layout}' + (' compiled' if c else '') for a, layout, c in configurations]
table = '\n'.join([
    f'{name} ({flags}), {torch.get_num_threads()} threads, torch {torch.__version__}, batch {args.batch_size}; '
    f'bf16 in hardware: {computes_bf16("cpu")}; --amp auto runs {precision_label(resolve_amp("auto", "cpu"))}; '
    f'load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after',
    '',
    '| backbone | px | images/s of | ' + ' | '.join(head) + ' | the defaults (--amp auto) vs fp32 contiguous |',
    '|---|---:|---|' + '---:|' * (len(head) + 1),
    *rows])
print('\n' + table)
if args.out:
    with atomic_path(args.out) as tmp, open(tmp, 'w') as f:
        f.write(table + '\n')
