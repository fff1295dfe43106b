"""
Images/s of one backbone on this machine, for training and for embedding, at several sizes:

  train   train.train_epoch over batches already in memory: forward, proxy loss, backward and the
          AdamW step of train.py's own optimizer, with train.py's defaults for the backbone
  embed   train.embed over the same batches: eval mode, no gradients, as the test set is embedded

No data loading: what the network costs, nothing else. Each rate is the median of --rounds
rounds of --batches batches, after one warm-up batch.

    python benchmarks/backbone_speed.py --backbone_type efficientnet_lite0 --image_sizes 224,64
"""
import argparse
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # the script lives in benchmarks/, train.py in the repo root

import torch  # noqa: E402

import train  # noqa: E402
from model import embed  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument('--backbone_type', default='efficientnet_lite0', type=train.backbone_type)
parser.add_argument('--pretrained', default='none', help='as train.py; the compute is the same, but the BN freeze differs')
parser.add_argument('--image_sizes', default='224,64')
parser.add_argument('--batch_size', type=int, default=64)
parser.add_argument('--batches', type=int, default=3)
parser.add_argument('--rounds', type=int, default=3)
args = parser.parse_args()
CLASSES = 50  # the synthetic set's training classes


def rate(run, batches):
    start = time.perf_counter()
    run()
    return batches * args.batch_size / (time.perf_counter() - start)


def measure(image_size):
    targs = train.parse_args(['--backbone_type', args.backbone_type, '--pretrained', args.pretrained,
                              '--image_size', str(image_size), '--batch_size', str(args.batch_size), '--device', 'cpu'])
    training = train.build_training(targs, CLASSES, torch.device('cpu'))
    batch = (torch.randn(args.batch_size, 3, image_size, image_size), torch.randint(CLASSES, (args.batch_size,)))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*batch), batch_size=args.batch_size)
    # epoch 2: past the warm-up epoch of the ViT recipe, so the whole network trains
    train_step = lambda n: train.train_epoch(training, [batch] * n, 2, progress=False)  # noqa: E731
    embed_batches = lambda n: [embed(training.model, loader, progress=False) for _ in range(n)]  # noqa: E731
    train_step(1), embed_batches(1)  # warm-up
    train_rates = [rate(lambda: train_step(args.batches), args.batches) for _ in range(args.rounds)]
    embed_rates = [rate(lambda: embed_batches(args.batches), args.batches) for _ in range(args.rounds)]
    return statistics.median(train_rates), statistics.median(embed_rates)


load_before = os.getloadavg()[0]
rows = [(size, *measure(size)) for size in map(int, args.image_sizes.split(','))]
print(f'{args.backbone_type}, batch {args.batch_size}, fp32, {torch.get_num_threads()} threads; '
      f'load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after')
print('| image size | train img/s | embed img/s |\n|---:|---:|---:|')
for size, train_rate, embed_rate in rows:
    print(f'| {size} | {train_rate:.1f} | {embed_rate:.1f} |')
