"""The losses at the gradient level, in fp64, against hand-derived formulas: the value, the
embeddings' gradient and the proxies' gradient of every loss, on a batch with uneven class counts
and classes absent from it; exact scaling with the loss scale; the two-process (DDP) proxy gradient."""
import json
import os
import re

import pytest
import torch
import torch.nn.functional as F

import train
from conftest import BENCH_EXTRA, on_two_ranks, require
from loss import LOSSES, build_loss

C, D, SCALE, MARGIN = 5, 8, 16.0, 0.1
# uneven class counts (3, 1, 2), classes 3 and 4 absent from the batch
LABELS = [0, 0, 0, 1, 2, 2]
ABSENT = [3, 4]
# what the README's table says each loss is: (its value, embeddings' part, proxies' part)
RULES = {
    'normalized_softmax': ('normalized_softmax', 'all', 'all'),
    'positive_proxy': ('normalized_softmax', 'all', 'positive_class_mean'),
    'positive_pull': ('normalized_softmax', 'positive', 'all'),
    'proxy_anchor': ('proxy_anchor', 'all', 'all'),
    'positive_proxy_anchor': ('proxy_anchor', 'all', 'positive_class_mean'),
}


def batch(seed=0, device='cpu', labels=LABELS):
    generator = torch.Generator().manual_seed(seed)
    embeddings = torch.randn(len(labels), D, generator=generator, dtype=torch.float64)
    proxies = torch.randn(C, D, generator=generator, dtype=torch.float64)
    return embeddings.to(device), proxies.to(device), torch.tensor(labels, device=device)


def gradients(loss_name, embeddings, proxies, labels, multiplier=1.0):
    """(loss, dL/d embeddings, dL/d proxies) as loss.py computes them; the backward pass starts from
    multiplier * loss, as a scaled or weighted loss would."""
    loss_fn = build_loss(loss_name, C, D, SCALE).double().to(embeddings.device)
    with torch.no_grad():
        loss_fn.proxies.copy_(proxies)
    embeddings = embeddings.clone().requires_grad_()
    loss = loss_fn(embeddings, labels)
    (multiplier * loss).backward()
    return loss.detach(), embeddings.grad, loss_fn.proxies.grad


def normalized_softmax_by_hand(S, labels):
    """L = mean_i -log softmax(s S_i)[y_i]; dL/dS_ij = s (P_ij - [j = y_i]) / B."""
    B = len(labels)
    P = torch.softmax(SCALE * S, dim=1)
    loss = -torch.log(P[torch.arange(B), labels]).mean()
    return loss, SCALE * (P - F.one_hot(labels, C)) / B


def proxy_anchor_by_hand(S, labels):
    """Kim et al. 2020, eq. 4, and its derivative, pair by pair."""
    B = len(labels)
    present = sorted(set(labels.tolist()))
    loss, dS = 0.0, torch.zeros_like(S)
    for j in range(C):
        positives = [i for i in range(B) if labels[i] == j]
        negatives = [i for i in range(B) if labels[i] != j]
        pull = [torch.exp(-SCALE * (S[i, j] - MARGIN)) for i in positives]
        push = [torch.exp(SCALE * (S[i, j] + MARGIN)) for i in negatives]
        if positives:
            loss = loss + torch.log(1 + sum(pull)) / len(present)
            for i, e in zip(positives, pull):
                dS[i, j] = -SCALE * e / (1 + sum(pull)) / len(present)
        loss = loss + torch.log(1 + sum(push)) / C
        for i, e in zip(negatives, push):
            dS[i, j] = SCALE * e / (1 + sum(push)) / C
    return loss, dS


BY_HAND = {'normalized_softmax': normalized_softmax_by_hand, 'proxy_anchor': proxy_anchor_by_hand}


def by_hand(loss_name, embeddings, proxies, labels):
    """(loss, dL/d embeddings, dL/d proxies) from the formulas: G = dL/dS by hand; each embedding
    gets sum_j G_ij p_j (all) or G_iy_i p_y_i (positive); each proxy sum_i G_ij f_i (all) or
    (1/n_j) sum_{i: y_i = j} G_ij f_i (positive_class_mean). Autograd only applies the L2
    normalisations' Jacobians (vector-Jacobian products)."""
    value, embedding_part, proxy_part = RULES[loss_name]
    embeddings, proxies = embeddings.clone().requires_grad_(), proxies.clone().requires_grad_()
    f, p = F.normalize(embeddings, dim=-1), F.normalize(proxies, dim=-1)
    S = (f @ p.t()).detach()
    loss, G = BY_HAND[value](S, labels)
    f, p_ = f.detach(), p.detach()
    df = torch.zeros_like(f)
    for i, y in enumerate(labels.tolist()):
        df[i] = sum(G[i, j] * p_[j] for j in range(C)) if embedding_part == 'all' else G[i, y] * p_[y]
    dp = torch.zeros_like(p_)
    for j in range(C):
        members = [i for i, y in enumerate(labels.tolist()) if y == j]
        if proxy_part == 'all':
            dp[j] = sum(G[i, j] * f[i] for i in range(len(labels)))
        elif members:
            dp[j] = sum(G[i, j] * f[i] for i in members) / len(members)
    return (loss, torch.autograd.grad(F.normalize(embeddings, dim=-1), embeddings, df)[0],
            torch.autograd.grad(F.normalize(proxies, dim=-1), proxies, dp)[0])


def test_every_loss_has_a_hand_derived_rule():
    assert set(RULES) == set(LOSSES)


@pytest.mark.parametrize('loss_name', LOSSES)
def test_value_and_both_gradients_match_the_hand_derived_formulas(loss_name, device):
    embeddings, proxies, labels = batch(device=device)
    ours = gradients(loss_name, embeddings, proxies, labels)
    expected = by_hand(loss_name, embeddings, proxies, labels)
    for what, got, want in zip(('value', 'embeddings', 'proxies'), ours, expected):
        torch.testing.assert_close(got, want, msg=lambda m: f'{loss_name} {what}: {m}')


@pytest.mark.parametrize('loss_name', ['positive_proxy', 'positive_proxy_anchor'])
def test_positive_proxy_rules_differ_from_their_full_loss_only_in_the_proxies_gradient(loss_name, device):
    full = {'positive_proxy': 'normalized_softmax', 'positive_proxy_anchor': 'proxy_anchor'}[loss_name]
    embeddings, proxies, labels = batch(1, device=device)
    loss, grad_embeddings, grad_proxies = gradients(loss_name, embeddings, proxies, labels)
    full_loss, full_embeddings, full_proxies = gradients(full, embeddings, proxies, labels)
    assert torch.equal(loss, full_loss) and torch.equal(grad_embeddings, full_embeddings)
    assert not torch.allclose(grad_proxies, full_proxies)
    # an absent class's proxy learns nothing; under the full loss it is pushed by every embedding
    assert torch.equal(grad_proxies[ABSENT], torch.zeros_like(grad_proxies[ABSENT]))
    assert (full_proxies[ABSENT].norm(dim=-1) > 0).all()


@pytest.mark.parametrize('loss_name', ['positive_proxy', 'positive_proxy_anchor'])
def test_negatives_never_move_a_proxy(loss_name, device):
    """Moving the embeddings of every other class leaves proxy 0's gradient as it was."""
    embeddings, proxies, labels = batch(2, device=device)
    moved = embeddings.clone()
    others = labels != 0
    moved[others] = torch.randn(int(others.sum()), D, dtype=torch.float64, device=device)
    grad_before, grad_after = (gradients(loss_name, e, proxies, labels)[2][0] for e in (embeddings, moved))
    torch.testing.assert_close(grad_after, grad_before)
    full = {'positive_proxy': 'normalized_softmax', 'positive_proxy_anchor': 'proxy_anchor'}[loss_name]
    full_before, full_after = (gradients(full, e, proxies, labels)[2][0] for e in (embeddings, moved))
    assert not torch.allclose(full_after, full_before)


def test_positive_pull_embeddings_are_pulled_by_their_own_proxy_only(device):
    """The ablation (the old rule): each embedding's gradient lies along its own proxy, so moving
    another proxy leaves its direction as it was; normalized softmax's changes."""
    embeddings, proxies, labels = batch(3, device=device)
    moved = proxies.clone()
    moved[4] = torch.randn(D, dtype=torch.float64, device=device)  # a negative of every embedding
    for loss_name, changes in (('positive_pull', False), ('normalized_softmax', True)):
        g1, g2 = (F.normalize(gradients(loss_name, embeddings, p, labels)[1], dim=-1) for p in (proxies, moved))
        assert torch.allclose(g1, g2) != changes, loss_name


@pytest.mark.parametrize('loss_name', LOSSES)
def test_gradients_scale_exactly_with_the_loss_scale(loss_name, device):
    """What fp16 loss scaling (GradScaler) and the mean reduction do: multiply the gradient that
    arrives. A power of two multiplies floats exactly, so the gradients must be exactly 1024 x."""
    embeddings, proxies, labels = batch(4, device=device)
    _, e1, p1 = gradients(loss_name, embeddings, proxies, labels)
    _, e2, p2 = gradients(loss_name, embeddings, proxies, labels, multiplier=1024.0)
    assert torch.equal(e2, 1024 * e1) and torch.equal(p2, 1024 * p1)


def test_proxy_anchor_matches_pytorch_metric_learning(device):
    """Value and both gradients against pytorch-metric-learning 2.9's ProxyAnchorLoss (same proxies)."""
    losses = require('pytorch_metric_learning.losses', BENCH_EXTRA)
    embeddings, proxies, labels = batch(5, device=device, labels=[0, 0, 1, 3, 3, 3, 2])
    reference = losses.ProxyAnchorLoss(C, D, margin=MARGIN, alpha=SCALE).double().to(device)
    with torch.no_grad():
        reference.proxies.copy_(proxies)
    leaf = embeddings.clone().requires_grad_()
    value = reference(leaf, labels)
    value.backward()
    ours = gradients('proxy_anchor', embeddings, proxies, labels)
    for got, want in zip(ours, (value.detach(), leaf.grad, reference.proxies.grad)):
        torch.testing.assert_close(got, want)


def test_proxy_anchor_uses_its_official_initialisation_and_alpha():
    torch.manual_seed(0)
    loss_fn = build_loss('proxy_anchor', 1000, 512, scale=32.0)
    # Kaiming normal, fan_out (= the number of classes for a classes x dim matrix): std sqrt(2 / 1000)
    assert loss_fn.proxies.std().item() == pytest.approx((2 / 1000) ** 0.5, rel=0.02)
    assert loss_fn.scale == 32.0 and loss_fn.margin == MARGIN


def test_adamw_still_moves_a_proxy_whose_class_left_the_batch():
    """What the README says of an absent class: its gradient is zero, but AdamW's momentum keeps
    moving its proxy for a while; a proxy that never had a gradient keeps its direction (weight
    decay only shrinks it, and the loss sees directions only)."""
    loss_fn = build_loss('positive_proxy', C, D, SCALE)
    optimizer = torch.optim.AdamW(loss_fn.parameters(), lr=1e-2, weight_decay=1e-4)  # train.py's recipe
    embeddings = torch.randn(len(LABELS), D)
    for labels in ([0, 1, 2], [0, 1]):  # class 2 in the first step only; classes 3 and 4 never
        before = loss_fn.proxies.detach().clone()
        optimizer.zero_grad()
        loss_fn(embeddings[:len(labels)], torch.tensor(labels)).backward()
        optimizer.step()
    assert torch.equal(loss_fn.proxies.grad[2], torch.zeros(D))
    assert not torch.equal(loss_fn.proxies.detach()[2], before[2])
    after = loss_fn.proxies.detach()
    assert (after[ABSENT].norm(dim=-1) < before[ABSENT].norm(dim=-1)).all()
    torch.testing.assert_close(F.normalize(after[ABSENT], dim=-1), F.normalize(before[ABSENT], dim=-1))


def proxy_gradients_on_one_rank(rank, embeddings, proxies, labels):
    """One of two gloo processes, as under torchrun: each loss inside DDP, half the batch each."""
    half = slice(rank * len(labels) // 2, (rank + 1) * len(labels) // 2)
    grads = {}
    for loss_name in LOSSES:
        loss_fn = build_loss(loss_name, C, D, SCALE).double()
        with torch.no_grad():
            loss_fn.proxies.copy_(proxies)
        trainer = torch.nn.parallel.DistributedDataParallel(loss_fn)  # kept: its hooks reduce the gradient
        trainer(embeddings[half], labels[half]).backward()
        grads[loss_name] = loss_fn.proxies.grad.numpy()  # by value: this process ends before it is read
    return grads


@pytest.mark.slow
def test_two_processes_give_the_proxies_the_gradient_of_the_whole_batch(tmp_path):
    """DDP over 2 gloo processes, each with half the batch: class counts differ between the halves
    (class 0: 3 and 1, class 2: 0 and 2), so n_j, and Proxy-Anchor's log-sum-exps, must be those of the
    global batch."""
    embeddings, proxies, labels = batch(6, labels=[0, 0, 0, 1, 0, 2, 2, 1])
    results = on_two_ranks(proxy_gradients_on_one_rank, tmp_path, embeddings, proxies, labels)
    for loss_name in LOSSES:
        _, _, whole_batch = gradients(loss_name, embeddings, proxies, labels)
        for rank in range(2):
            torch.testing.assert_close(torch.from_numpy(results[rank][loss_name]), whole_batch,
                                       msg=lambda m: f'{loss_name}, rank {rank}: {m}')


@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
@pytest.mark.parametrize('loss_name', ['positive_proxy', 'proxy_anchor'])
def test_loss_runs_in_fp32_under_reduced_precision_inputs(dtype, loss_name, device):
    loss_fn = build_loss(loss_name, C, D).to(device)
    embeddings = torch.randn(len(LABELS), D, device=device).to(dtype).requires_grad_()
    loss = loss_fn(embeddings, torch.tensor(LABELS, device=device))
    assert loss.dtype == torch.float32
    loss.backward()
    assert embeddings.grad.dtype == dtype and torch.isfinite(embeddings.grad).all()
    assert loss_fn.proxies.grad.dtype == torch.float32


def test_predict_returns_nearest_proxy_class():
    loss_fn = build_loss('normalized_softmax', C, D)
    with torch.no_grad():
        loss_fn.proxies.copy_(torch.randn(C, D) * torch.arange(1, C + 1)[:, None])  # norms must not matter
    embeddings = F.normalize(loss_fn.proxies.detach(), dim=-1)[[3, 0, 4]] + 0.01 * torch.randn(3, D)
    assert loss_fn.predict(embeddings).tolist() == [3, 0, 4]


def test_build_loss_names_the_choices_for_an_unknown_loss():
    with pytest.raises(ValueError, match='normalized_softmax.*proxy_anchor'):
        build_loss('triplet', C, D)


@pytest.mark.parametrize('backbone', ['resnet50', 'timm:vit_small_patch16_224.dino'])
def test_proxy_anchor_trains_with_its_official_warm_up_epoch(backbone):
    """Proxy-Anchor's recipe (one warm-up epoch) is its default, named against, so no hash;
    the other losses keep the backbone family's recipe."""
    family_warmup = train.parse_args(['--backbone_type', backbone]).warmup_epochs
    for loss_name in LOSSES:
        args = train.parse_args(['--backbone_type', backbone, '--loss_name', loss_name])
        assert args.warmup_epochs == (1 if 'anchor' in loss_name else family_warmup), loss_name
        assert args.run_name.endswith(f'_{loss_name}_512_20_seed0'), args.run_name
    changed = train.parse_args(['--loss_name', 'proxy_anchor', '--warmup_epochs', '0']).run_name
    assert re.fullmatch(r'car_resnet50_proxy_anchor_512_20_[0-9a-f]{6}_seed0', changed), changed


@pytest.mark.parametrize('pretrained', ['imagenet', 'none'])
def test_positive_proxy_centres_its_embeddings_from_scratch_and_from_imagenet(pretrained):
    """positive_proxy's recipe centres the embeddings, named against, so no hash: it stopped its
    proxies' collapse from scratch and lifted Cars196 R@1 from ImageNet weights
    (docs/results.md#proxy-collapse-from-scratch); the other losses keep none."""
    for loss_name in LOSSES:
        args = train.parse_args(['--loss_name', loss_name, '--pretrained', pretrained])
        assert args.embedding_norm == ('batchnorm' if loss_name == 'positive_proxy' else 'none'), loss_name
    assert train.parse_args(['--pretrained', pretrained]).run_name.endswith('_positive_proxy_512_20_seed0') \
        == (pretrained == 'imagenet')  # from scratch the hash is --pretrained none's
    uncentred = train.parse_args(['--embedding_norm', 'none']).run_name
    assert re.fullmatch(r'car_resnet50_positive_proxy_512_20_[0-9a-f]{6}_seed0', uncentred), uncentred


def test_a_run_from_before_the_centring_default_is_not_written_over(tmp_path):
    """A pretrained positive_proxy run begun when its default was --embedding_norm none has the name
    a default run has now: a fresh run refuses to write over it, naming what differs."""
    older = train.parse_args(['--output_dir', str(tmp_path), '--embedding_norm', 'none'])
    older_prefix = str(tmp_path / train.parse_args(['--output_dir', str(tmp_path)]).run_name)
    with open(f'{older_prefix}_args.json', 'w') as f:
        json.dump(vars(older), f, default=str)
    with pytest.raises(ValueError, match='--embedding_norm none there, batchnorm now'):
        train.parse_args(['--output_dir', str(tmp_path)])
