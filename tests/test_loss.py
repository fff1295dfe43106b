"""The method at the gradient level: positive_proxy against an independent computation."""
import pytest
import torch
import torch.nn.functional as F

from loss import NormalizedSoftmaxLoss, PositiveProxyLoss, build_loss

B, C, D, SCALE = 6, 5, 8, 16.0


def batch(seed=0, device='cpu'):
    generator = torch.Generator().manual_seed(seed)
    embeddings = torch.randn(B, D, generator=generator, dtype=torch.float64)
    proxies = torch.randn(C, D, generator=generator, dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 3, 4, 1])
    return embeddings.to(device), proxies.to(device), labels.to(device)


def gradients(loss_class, embeddings, proxies, labels):
    loss_fn = loss_class(C, D, SCALE).double().to(embeddings.device)
    with torch.no_grad():
        loss_fn.proxies.copy_(proxies)
    embeddings = embeddings.clone().requires_grad_()
    loss = loss_fn(embeddings, labels)
    loss.backward()
    return loss.detach(), embeddings.grad, loss_fn.proxies.grad


def reference(embeddings, proxies, labels):
    """By hand: dL/dS = scale * (softmax(scale S) - onehot(y)) / B, then the chain rule
    through the L2 normalisations, which autograd is asked only to apply (vector-Jacobian)."""
    embeddings = embeddings.clone().requires_grad_()
    proxies = proxies.clone().requires_grad_()
    f, p = F.normalize(embeddings, dim=-1), F.normalize(proxies, dim=-1)
    S = (f @ p.t()).detach()
    dS = SCALE * (torch.softmax(SCALE * S, dim=1) - F.one_hot(labels, C)) / B
    loss = F.cross_entropy(SCALE * S, labels)
    df_full = dS @ p.detach()                                    # every proxy pushes or pulls f_i
    rows = torch.arange(B, device=labels.device)
    df_positive = dS[rows, labels, None] * p.detach()[labels]    # only p_{y_i} pulls f_i
    dp = dS.t() @ f.detach()
    grads = {}
    for name, df in (('full', df_full), ('positive', df_positive)):
        grads[name] = torch.autograd.grad(f, embeddings, df, retain_graph=True)[0]
    grads['proxies'] = torch.autograd.grad(p, proxies, dp)[0]
    return loss, grads


def test_positive_proxy_embedding_gradient_keeps_only_own_proxy_term(device):
    embeddings, proxies, labels = batch(device=device)
    _, grad_embeddings, _ = gradients(PositiveProxyLoss, embeddings, proxies, labels)
    _, expected = reference(embeddings, proxies, labels)
    torch.testing.assert_close(grad_embeddings, expected['positive'])
    # and that is a real change from normalized softmax, not a coincidence of the test data
    assert not torch.allclose(grad_embeddings, expected['full'])


def test_positive_proxy_has_normalized_softmax_value_and_proxy_gradient(device):
    embeddings, proxies, labels = batch(1, device=device)
    loss_pp, _, grad_proxies_pp = gradients(PositiveProxyLoss, embeddings, proxies, labels)
    loss_ns, _, grad_proxies_ns = gradients(NormalizedSoftmaxLoss, embeddings, proxies, labels)
    expected_loss, expected = reference(embeddings, proxies, labels)
    torch.testing.assert_close(loss_pp, expected_loss)
    torch.testing.assert_close(loss_ns, expected_loss)
    torch.testing.assert_close(grad_proxies_pp, expected['proxies'])
    torch.testing.assert_close(grad_proxies_ns, expected['proxies'])


def test_normalized_softmax_embedding_gradient_is_the_full_softmax_gradient(device):
    embeddings, proxies, labels = batch(2, device=device)
    _, grad_embeddings, _ = gradients(NormalizedSoftmaxLoss, embeddings, proxies, labels)
    _, expected = reference(embeddings, proxies, labels)
    torch.testing.assert_close(grad_embeddings, expected['full'])


def test_negative_proxies_do_not_push_embeddings(device):
    """With a single class present per embedding, moving any other proxy leaves dL/df unchanged
    in direction for positive_proxy (only p_{y_i} appears), while normalized softmax changes."""
    embeddings, proxies, labels = batch(3, device=device)
    moved = proxies.clone()
    moved[4] = torch.randn(D, dtype=torch.float64, device=device)  # a negative for every row but row 4
    rows = labels != 4
    for loss_class, changes in ((PositiveProxyLoss, False), (NormalizedSoftmaxLoss, True)):
        g1 = F.normalize(gradients(loss_class, embeddings, proxies, labels)[1][rows], dim=-1)
        g2 = F.normalize(gradients(loss_class, embeddings, moved, labels)[1][rows], dim=-1)
        assert torch.allclose(g1, g2) != changes, loss_class.__name__


@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
def test_loss_runs_in_fp32_under_reduced_precision_inputs(dtype, device):
    loss_fn = build_loss('positive_proxy', C, D).to(device)
    embeddings = torch.randn(B, D, device=device).to(dtype).requires_grad_()
    loss = loss_fn(embeddings, batch(device=device)[2])
    assert loss.dtype == torch.float32
    loss.backward()
    assert embeddings.grad.dtype == dtype and torch.isfinite(embeddings.grad).all()


def test_predict_returns_nearest_proxy_class():
    loss_fn = build_loss('normalized_softmax', C, D)
    with torch.no_grad():
        loss_fn.proxies.copy_(torch.randn(C, D) * torch.arange(1, C + 1)[:, None])  # norms must not matter
    embeddings = F.normalize(loss_fn.proxies.detach(), dim=-1)[[3, 0, 4]] + 0.01 * torch.randn(3, D)
    assert loss_fn.predict(embeddings).tolist() == [3, 0, 4]


def test_build_loss_names_the_choices_for_an_unknown_loss():
    with pytest.raises(ValueError, match='normalized_softmax'):
        build_loss('triplet', C, D)
