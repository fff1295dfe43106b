"""Embedding network for deep metric learning: an ImageNet backbone trunk, global pooling,
a bias-free linear projection ("refactor") and L2 normalisation; and embedding a set of images
with it (`embed`, `embed_images`), for train.py and test.py alike.

Weights are never downloaded here: `pretrained='imagenet'` reads the official file from the
torch hub cache, so runs are reproducible offline and fail at once when the file is absent.
"""
import math
import os
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

import pretrainedmodels
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from tqdm import tqdm

from utils import ImageDataset, build_transforms, choose, load_torch_file


@dataclass(frozen=True)
class Backbone:
    build: Callable[[], nn.Module]  # weightless classification network, as its ImageNet file expects
    trunk: Callable[[nn.Module], nn.Module]  # classification network -> module returning [B, C, h, w]
    channels: int  # C of the trunk's output
    url: str  # official ImageNet weights; only its file name is used, to find it in the hub cache
    # Input convention the weights were trained with; the data transforms apply it as
    # (image - mean) / std, with image in 0-1 RGB, or in 0-255 BGR when bgr_255 (mean/std then
    # being in that BGR channel order).
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    bgr_255: bool


def children_except(*dropped):
    """Trunk made of the network's children minus the head. Only valid for networks whose
    children are registered in forward order (torchvision's ResNet and GoogLeNet are); names
    are kept so the trunk's state dict keys read like the original network's."""
    def trunk(net):
        return nn.Sequential(OrderedDict((n, m) for n, m in net.named_children() if n not in dropped))
    return trunk


class FeaturesOnly(nn.Module):
    """BN-Inception's forward is hand-written branching, so it cannot be cut into a Sequential;
    its `features` method already stops at the last conv feature map."""

    def __init__(self, net):
        super().__init__()
        del net.global_pool, net.last_linear  # unused by `features`; keep them out of the state dict
        self.net = net

    def forward(self, x):
        return self.net.features(x)


IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
RESNET_TRUNK = children_except('avgpool', 'fc')
# IMAGENET1K_V1 everywhere: the weights the published metric-learning recipes were tuned on.
BACKBONES: dict[str, Backbone] = {
    'resnet50': Backbone(
        build=torchvision.models.resnet50, trunk=RESNET_TRUNK, channels=2048,
        url=torchvision.models.ResNet50_Weights.IMAGENET1K_V1.url,
        mean=IMAGENET_MEAN, std=IMAGENET_STD, bgr_255=False),
    'resnet18': Backbone(
        build=torchvision.models.resnet18, trunk=RESNET_TRUNK, channels=512,
        url=torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url,
        mean=IMAGENET_MEAN, std=IMAGENET_STD, bgr_255=False),
    # The official file holds the aux heads, so they are built for a strict load, then cut.
    # torchvision's transform_input=True maps ImageNet-normalised input x to
    # x * std / 0.5 + (mean - 0.5) / 0.5 = (raw - 0.5) / 0.5: the weights expect raw 0-1 RGB
    # normalised with mean = std = 0.5. We put that in the data transform instead.
    'googlenet': Backbone(
        build=lambda: torchvision.models.googlenet(aux_logits=True, transform_input=False, init_weights=False),
        trunk=children_except('aux1', 'aux2', 'avgpool', 'dropout', 'fc'), channels=1024,
        url=torchvision.models.GoogLeNet_Weights.IMAGENET1K_V1.url,
        mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), bgr_255=False),
    # BN-Inception, ported from Caffe: BGR, 0-255, mean subtraction only.
    'inception': Backbone(
        build=lambda: pretrainedmodels.bninception(num_classes=1000, pretrained=None),
        trunk=FeaturesOnly, channels=1024,
        url=pretrainedmodels.pretrained_settings['bninception']['imagenet']['url'],
        mean=(104, 117, 128), std=(1, 1, 1), bgr_255=True),
}


def max_pool(x):
    return F.adaptive_max_pool2d(x, 1).flatten(1)


def avgmax_pool(x):
    # Sum of average and max pooling, as in Proxy-Anchor's code.
    return F.adaptive_avg_pool2d(x, 1).flatten(1) + max_pool(x)


POOLINGS = {'max': max_pool, 'avgmax': avgmax_pool}


def weights_file(spec, pretrained):
    """Path of the state dict to load, or None for random init. Checked before building anything."""
    if pretrained == 'none':
        return None
    if pretrained == 'imagenet':
        path = os.path.join(torch.hub.get_dir(), 'checkpoints', os.path.basename(spec.url))
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f'ImageNet weights not found at {path} (nothing is downloaded at run time). '
                f'Download {spec.url} on a machine with internet and copy it there '
                f'(the directory follows $TORCH_HOME), or pass --pretrained none for random init '
                f'or --pretrained PATH for a local state dict.')
        return path
    if not os.path.isfile(pretrained):
        raise FileNotFoundError(f'pretrained weights file not found: {pretrained}')
    return pretrained


def some_keys(keys, n=5):
    """The first n of the sorted keys, and how many there are: short enough for an error message."""
    keys = sorted(keys)
    return ', '.join(keys[:n]) + (f', ... ({len(keys)} in all)' if len(keys) > n else '')


def load_classifier_weights(net, path, backbone_type):
    """Strictly load an ImageNet-format classification state dict, with a short error on mismatch."""
    state = load_torch_file(path, 'state dict', writer='torch.save')
    expected = net.state_dict()
    problems = []
    if missing := expected.keys() - state.keys():
        problems.append(f'missing keys: {some_keys(missing)}')
    if unexpected := state.keys() - expected.keys():
        problems.append(f'unexpected keys: {some_keys(unexpected)}')
    if wrong := [k for k in expected.keys() & state.keys()
                 if not isinstance(state[k], torch.Tensor) or state[k].shape != expected[k].shape]:
        problems.append(f'wrong shapes: {some_keys(wrong)}')
    if problems:
        raise ValueError(f'{path} is not a {backbone_type} classification state dict '
                         f'(the format of its ImageNet file): ' + '; '.join(problems))
    net.load_state_dict(state)


class Model(nn.Module):
    """images -> L2-normalised embeddings [B, feature_dim].

    backbone_spec: the BACKBONES entry; the data transforms read its input convention.
    pretrained: 'imagenet' (official file from the torch hub cache), 'none' (random init), or
    a PATH to a state dict in the official file's format. The state dict keys of a Model do not
    depend on it, so a saved Model reloads into Model(..., pretrained='none').
    freeze_bn: keep the backbone's BatchNorm running statistics (not its affine parameters)
    fixed during training, as the published recipes do with small metric-learning batches.
    Ignored with pretrained='none': random-init statistics are not worth keeping.
    """

    def __init__(self, backbone_type, feature_dim=512, pretrained='imagenet', pooling='max', freeze_bn=True):
        super().__init__()
        self.backbone_spec = choose(BACKBONES, backbone_type, 'backbone')
        self.pool = choose(POOLINGS, pooling, 'pooling')
        path = weights_file(self.backbone_spec, pretrained)
        net = self.backbone_spec.build()
        if path is not None:
            load_classifier_weights(net, path, backbone_type)
        self.trunk = self.backbone_spec.trunk(net)
        # the embedding layer; named as in the original code, whose checkpoints use this key
        self.refactor = nn.Linear(self.backbone_spec.channels, feature_dim, bias=False)
        self.freeze_bn = freeze_bn and path is not None
        self.train()  # a fresh module is in training mode; apply the BN freeze to it too

    @classmethod
    def from_file(cls, path, not_found=None):
        """The network a run saved in its {run}_model.pth, in eval mode; the run's arguments
        (image size, batch size, ...) are its .run_args. not_found: the message if the file is missing."""
        saved = load_torch_file(path, 'model file', ('model', 'args'), not_found=not_found)
        run_args = saved['args']
        model = cls(run_args['backbone_type'], run_args['feature_dim'], pretrained='none', pooling=run_args['pooling'])
        model.load_state_dict(saved['model'])
        model.run_args = run_args
        return model.eval()

    @property
    def feature_dim(self):
        return self.refactor.out_features

    def train(self, mode=True):
        super().train(mode)
        if self.freeze_bn:
            for m in self.trunk.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    def forward(self, images):
        return F.normalize(self.refactor(self.pool(self.trunk(images))), dim=1)


# -----------------------------------------------------------------------------
# embedding a set of images


def preferred_memory_format(device):
    # channels-last feeds the tensor cores of convolutions on GPUs; on the CPU it does not pay
    return torch.channels_last if device.type == 'cuda' else torch.contiguous_format


@torch.no_grad()
def embed(network, loader, world_size=1, amp_dtype=None, desc='embed', progress=True, memory_format=None):
    """Embeddings of every image of the loader's dataset, in dataset order, each computed once.

    network: a Model, or a wrapper of one (torch.compile) with the same forward. With several
    ranks, rank r's loader holds images r, r + world_size, ... (a strided shard: no padding
    duplicates, unlike DistributedSampler); the shards are gathered back into order.
    """
    network.eval()
    device = next(network.parameters()).device
    memory_format = memory_format or preferred_memory_format(device)
    dataset_size = len(loader.dataset)
    shard = []
    for images, _ in tqdm(loader, desc=desc, leave=False, dynamic_ncols=True, disable=not progress):
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            shard.append(network(images.to(device, non_blocking=True, memory_format=memory_format)).float())
    # feature_dim reaches the Model through torch.compile's wrapper too, which forwards attributes
    shard = torch.cat(shard) if shard else torch.empty(0, network.feature_dim, device=device)
    if world_size == 1:
        return shard
    # all_gather wants equal sizes: pad every shard to the longest, then cut the padding off
    longest = math.ceil(dataset_size / world_size)
    padded = torch.cat([shard, shard.new_zeros(longest - len(shard), shard.shape[1])])
    gathered = [torch.empty_like(padded) for _ in range(world_size)]
    dist.all_gather(gathered, padded)
    embeddings = shard.new_empty(dataset_size, shard.shape[1])
    for rank, part in enumerate(gathered):
        embeddings[rank::world_size] = part[:len(range(rank, dataset_size, world_size))]
    return embeddings


def embed_images(model, paths, image_size, batch_size=64, desc='embed images', progress=True):
    """Embeddings [len(paths), D] of image files on the CPU, as train.py embeds its test set:
    the test transform of the model's input convention at image_size, eval mode."""
    transform = build_transforms(model.backbone_spec, image_size)[1]
    dataset = ImageDataset(paths, [0] * len(paths), transform)  # embed() ignores the labels
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size)
    return embed(model, loader, desc=desc, progress=progress).cpu()
