import pytest
import torch

import dcbs.evaluate as ev
from dcbs.config import ConfigError
from dcbs.evaluate import EvalSettings, eval_settings_for, evaluate_synset, get_eval_pool, train_and_test
from conftest import needs_cxx
from dcbs.fast_ops import build_model


def test_learning_rate_drops_tenfold_after_half_the_epochs(monkeypatch):
    """Reference: Epoch+1 epochs; after epoch Epoch//2+1 a new SGD with lr x0.1 (momentum restarts)."""
    created, epochs_done = [], []
    real_sgd = torch.optim.SGD

    def spy_sgd(params, lr, **kw):
        created.append((lr, len(epochs_done), kw))
        return real_sgd(params, lr=lr, **kw)

    real_epoch = ev.epoch

    def spy_epoch(*a, **kw):
        epochs_done.append(1)
        return real_epoch(*a, **kw)

    monkeypatch.setattr(ev.torch.optim, "SGD", spy_sgd)
    monkeypatch.setattr(ev, "epoch", spy_epoch)
    net = build_model("ConvNetW32", 1, 10, (28, 28))
    x, y = torch.randn(20, 1, 28, 28), torch.arange(10).repeat(2)
    s = EvalSettings(epochs=10, lr=0.01, batch_train=8, dsa_strategy="none", dc_aug=None)
    train_and_test(net, x, y, x, y, s, torch.Generator().manual_seed(0))
    assert len(epochs_done) == 11  # Epoch + 1 epochs, as the reference
    assert [round(c[0], 8) for c in created] == [0.01, 0.001]
    assert created[1][1] == 10 // 2 + 2  # new optimizer right after epoch index Epoch//2+1
    assert all(c[2] == {"momentum": 0.9, "weight_decay": 0.0005} for c in created)


def test_evaluation_epochs_default_by_augmentation():
    f = lambda arch, ds, dsa, given=None: eval_settings_for(arch, ds, "ConvNet", 1, dsa, 0.01, 256, given).epochs
    assert f("ConvNet", "CIFAR10", "none") == 300
    assert f("ConvNet", "MNIST", "none") == 1000          # DC augmentation for MNIST
    assert f("ConvNetBN", "CIFAR10", "none") == 1000      # crop_noise for BatchNorm ConvNet
    assert f("ConvNet", "CIFAR10", "color_crop") == 1000   # DSA
    assert f("ConvNet", "CIFAR10", "color_crop", 42) == 42  # a value given is always respected


def test_eval_pools():
    assert get_eval_pool("S", "ConvNet") == ["ConvNet"]
    assert get_eval_pool("M", "ConvNet") == ["MLP", "ConvNet", "LeNet", "AlexNet", "VGG11", "ResNet18"]
    assert "ConvNetBN" in get_eval_pool("N", "ConvNet")


def test_training_learns_a_separable_set_and_is_deterministic():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 1, 28, 28, generator=g)
    y = torch.arange(10).repeat(4)
    x = x + 3 * torch.nn.functional.one_hot(y, 28 * 28)[:, :].view(40, 1, 28, 28).float() * 10
    s = EvalSettings(epochs=30, lr=0.01, batch_train=16, dsa_strategy="none", dc_aug=None)
    accs = []
    for _ in range(2):
        torch.manual_seed(1)
        net = build_model("ConvNetW32", 1, 10, (28, 28))
        _, acc_train, acc_test = train_and_test(net, x, y, x, y, s, torch.Generator().manual_seed(5))
        accs.append(acc_test)
    assert accs[0] == accs[1] and accs[0] > 0.5


def test_seed_signature_evaluate_synset_with_dataloader():
    from types import SimpleNamespace
    from torch.utils.data import DataLoader, TensorDataset
    x, y = torch.randn(10, 1, 28, 28), torch.arange(10)
    args = SimpleNamespace(lr_net=0.01, batch_train=256, epoch_eval_train=2, dsa=False, dc_aug_param=None)
    net, acc_train, acc_test = evaluate_synset(0, build_model("ConvNetW32", 1, 10, (28, 28)), x, y,
                                               DataLoader(TensorDataset(x, y), batch_size=4), args)
    assert 0.0 <= acc_test <= 1.0 and args.epoch_eval_train == 2  # args is not modified


def alone_and_together(dsa, device="cpu", dtype=torch.float32):
    """Three ConvNetW32 trained one by one (train_and_test) and together (train_and_test_batched),
    same seeds: (model(i) builder, [(net, acc_train, acc_test)] alone, (params, acc_train, acc_test))."""
    from dcbs.evaluate import train_and_test_batched
    from dcbs.seeding import generator, seeded
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(20, 1, 28, 28, generator=g), torch.arange(10).repeat(2)
    xt, yt = torch.randn(60, 1, 28, 28, generator=g), torch.randint(0, 10, (60,), generator=g)
    x, xt = x.to(device, dtype), xt.to(device, dtype)
    y, yt = y.to(device), yt.to(device)
    s = EvalSettings(epochs=5, lr=0.01, batch_train=8, dsa_strategy=dsa, dc_aug=None)

    def model(i):
        with seeded(0, "m", i):
            return build_model("ConvNetW32", 1, 10, (28, 28)).to(device, dtype)

    alone = [train_and_test(model(i), x, y, xt, yt, s, generator(0, "g", i)) for i in range(3)]
    together = train_and_test_batched([model(i) for i in range(3)], x, y, xt, yt, s,
                                      [generator(0, "g", i) for i in range(3)])
    return model, alone, together


@pytest.mark.parametrize("dsa", ["none", "color_crop_cutout_scale_rotate"])
def test_batched_models_equal_models_trained_alone(dsa):
    """float64: on the CPU a model trained alone takes the first-order fast path (channels-last
    blocks, hand-written backward passes) and the batched ones the differentiable layers under
    vmap, so in float32 their rounding differs, and over 18 steps one ReLU input within rounding of
    zero (-1.5e-7 in one DSA run) can flip its mask and move the weights by ~1e-2 relative."""
    model, alone, (params, acc_train, acc_test) = alone_and_together(dsa, dtype=torch.float64)
    assert acc_test == [a[2] for a in alone] and acc_train == [a[1] for a in alone]
    for i, (net, _, _) in enumerate(alone):
        for k, v in net.state_dict().items():
            assert torch.allclose(params[k][i], v, rtol=1e-9, atol=1e-11), k
    # the models in a batch are different models (own init and data order)
    w = params["blocks.0.0.weight"]
    assert not torch.allclose(w[0], w[1]) and not torch.allclose(w[1], w[2])
    first = {k: torch.stack([model(i).state_dict()[k] for i in range(3)]) for k in params}
    assert not torch.allclose(first["blocks.0.0.weight"][0], first["blocks.0.0.weight"][1])


def test_batched_refuses_batchnorm_models():
    from dcbs.evaluate import batchable, train_and_test_batched
    bn = build_model("ConvNetBN", 1, 10, (28, 28))
    assert not batchable(bn) and batchable(build_model("ConvNet", 1, 10, (28, 28)))
    with pytest.raises(ValueError, match="BatchNorm"):
        train_and_test_batched([bn, bn], torch.randn(2, 1, 28, 28), torch.arange(2), torch.randn(2, 1, 28, 28),
                               torch.arange(2), EvalSettings(1, 0.01, 2, "none", None), [None, None])


def test_eval_mode_m_trains_every_listed_architecture(digits, tmp_path):
    """Cross-architecture evaluation: one mean per architecture of the M pool (1 epoch, tiny data)."""
    from types import SimpleNamespace
    from dcbs.condense import Condenser
    cfg = SimpleNamespace(method="DC", eval_mode="M", model="ConvNet", num_eval=1, eval_batch=1, seed=0,
                          dataset="digits", ipc=1, dsa_strategy="none", lr_net=0.01, batch_train=256,
                          epoch_eval_train=1, compile=False, ops="fast")
    import dataclasses
    # 60 of the 540 test images: testing ResNet18 and VGG11 is most of the work, and any accuracy in [0, 1] passes
    small = dataclasses.replace(digits, images_test=digits.images_test[:60], labels_test=digits.labels_test[:60])
    ev = Condenser(cfg, small, None, None, torch.device("cpu"), "test")
    x = digits.images_train[[int(ix[0]) for ix in digits.indices_class]]
    out = ev.evaluate(x, torch.arange(10), 0, 0)
    assert sorted(out) == sorted(["MLP", "ConvNet", "LeNet", "AlexNet", "VGG11", "ResNet18"])
    assert all(len(v) == 1 and 0.0 <= v[0] <= 1.0 for v in out.values())


def test_eval_batch_default_is_all_models_on_cuda_and_one_on_the_cpu():
    from dcbs.evaluate import auto_eval_batch
    assert auto_eval_batch(None, "cuda", 20) == 20 and auto_eval_batch(None, "cuda:1", 10) == 10
    assert auto_eval_batch(None, "cpu", 20) == 1
    assert auto_eval_batch(4, "cpu", 20) == 4 and auto_eval_batch(4, "cuda", 20) == 4


@needs_cxx
def test_compiled_test_pass_gives_the_eager_logits_and_accuracy(monkeypatch):
    """--compile: the compiled forward is used and predicts what the eager one does."""
    torch.manual_seed(0)
    net = build_model("ConvNetW32", 1, 10, (28, 28)).eval()
    x = torch.randn(300, 1, 28, 28)  # a batch of 256 and a remainder of 44: both shapes a test set makes
    with torch.inference_mode():
        eager = net(x)[0]
        compiled = ev.compiled_forward(net)(x[:256])[0]
    assert torch.allclose(compiled, eager[:256], rtol=1e-4, atol=1e-5)
    y = eager.argmax(1)
    y[::3] = (y[::3] + 1) % 10  # a third wrong: accuracy 2/3 either way
    calls = []
    real = ev.compiled_forward
    monkeypatch.setattr(ev, "compiled_forward", lambda n: calls.append(n) or real(n))
    assert ev.test_accuracy(net, x, y) == pytest.approx(2 / 3) and calls == []
    assert ev.test_accuracy(net, x, y, compiled=True) == pytest.approx(2 / 3) and calls == [net]
    # the setting reaches the test pass of a whole evaluation
    s = eval_settings_for("ConvNetW32", "MNIST", "ConvNet", 1, "none", 0.01, 8, 1, compile_test=True)
    plain = eval_settings_for("ConvNetW32", "MNIST", "ConvNet", 1, "none", 0.01, 8, 1)
    assert s.compile_test and not plain.compile_test
    train_and_test(net, x[:10], y[:10], x, y, s, torch.Generator().manual_seed(0))
    assert calls == [net, net]


def test_compile_failure_is_a_config_error_that_names_the_flag(monkeypatch):
    def broken(*a, **kw):
        raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found\n\nSet TORCHDYNAMO_VERBOSE=1 ...")
    monkeypatch.setattr(ev.torch, "compile", lambda *a, **kw: broken)
    with pytest.raises(ConfigError, match=r"--compile: torch.compile failed \(RuntimeError: InvalidCxx") as e:
        ev.check_compile("cpu")
    assert "\n" not in str(e.value) and "without --compile " in str(e.value)
    net = build_model("ConvNetW32", 1, 10, (28, 28))
    x, y = torch.randn(4, 1, 28, 28), torch.arange(4)
    with pytest.raises(ConfigError, match="--compile"):
        ev.test_accuracy(net, x, y, compiled=True)
    assert ev.test_accuracy(net, x, y) >= 0.0  # the eager pass does not touch torch.compile
    monkeypatch.setattr(ev, "_compiled_embed", None)
    with pytest.raises(ConfigError, match="--compile: torch.compile failed"):
        ev.embed_no_grad(net, x, compiled=True)
    assert ev.embed_no_grad(net, x).shape == (4, 32 * 4 * 4)


def test_compiled_test_pass_has_room_for_every_convnet_variant(monkeypatch):
    """The ConvNet variants and LeNet/AlexNet/VGG11 share one forward; with torch's default limit of
    8 compiled versions per forward the ninth (variant, batch shape) would silently run eagerly."""
    graphs = []

    def counting(gm, example_inputs):  # a backend that records each compilation and runs it as traced
        graphs.append(gm)
        return gm.forward

    monkeypatch.setattr(ev, "compiled_forward", lambda net: torch.compile(net, backend=counting, dynamic=False))
    torch._dynamo.reset()
    try:
        names = ["ConvNetW32", "ConvNetW64", "ConvNetD1", "ConvNetD2", "ConvNetNP", "ConvNetMP"]
        x, y = torch.randn(11, 1, 28, 28), torch.arange(11) % 10
        for name in names:
            net = build_model(name, 1, 10, (28, 28))
            assert ev.test_accuracy(net, x, y, batch_size=8, compiled=True) == ev.test_accuracy(net, x, y)
        assert len(graphs) == 2 * len(names)  # batches of 8 and 3 for each: none fell back to eager
    finally:
        torch._dynamo.reset()


def test_compiled_embedding_is_one_graph_for_every_fresh_network(monkeypatch):
    """DM builds a new network each iteration: the compiled embedding takes it as an argument, so
    the code traced for the first serves the others (a recompile per iteration would cost seconds
    each); no graph is kept for the real side."""
    graphs = []

    def counting(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    monkeypatch.setattr(ev, "_compiled_embed", torch.compile(ev._embed, backend=counting, dynamic=False))
    torch._dynamo.reset()
    try:
        x = torch.randn(6, 1, 28, 28)
        for seed in range(3):
            torch.manual_seed(seed)
            net = build_model("ConvNetW32", 1, 10, (28, 28))
            for p in net.parameters():
                p.requires_grad_(False)
            got = ev.embed_no_grad(net, x, compiled=True)
            torch.testing.assert_close(got, net.embed(x), rtol=1e-5, atol=1e-6)
            assert not got.requires_grad
        assert len(graphs) == 1
    finally:
        torch._dynamo.reset()


@needs_cxx
@pytest.mark.parametrize("model,channel,im_size", [("ConvNet", 1, (28, 28)), ("ConvNet", 3, (32, 32)),
                                                   ("ConvNetBN", 1, (28, 28))])
def test_compiled_embedding_gives_the_eager_embedding(monkeypatch, model, channel, im_size):
    """Inductor's code for DM's real embeddings (with the first block's pooling folded in on the
    one-channel shape) gives the eager embedding up to float32 rounding; BatchNorm in train mode
    updates its running statistics as the eager pass does."""
    monkeypatch.setattr(ev, "_compiled_embed", None)
    torch.manual_seed(0)
    nets = [build_model(model, channel, 10, im_size) for _ in range(2)]
    nets[1].load_state_dict(nets[0].state_dict())
    x = torch.randn(20, channel, *im_size)
    eager, compiled = (ev.embed_no_grad(net.train(), x, compiled=c) for net, c in zip(nets, (False, True)))
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)
    for a, b in zip(nets[0].buffers(), nets[1].buffers()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
