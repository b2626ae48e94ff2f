"""bench/vs_torch.py and bench/torch_resnet.py: the PyTorch twin gets cupynet's weights right, and the script runs.

    python -m pytest tests/test_vs_torch.py -q

Where PyTorch is not importable, the tests that need it are skipped (with the reason) and only the
test that the script itself skips cleanly runs. PyTorch is never a dependency of cupynet.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "bench", "vs_torch.py")
ENV_KEYS = ("cupynet", "git_commit", "numpy", "python", "cpu_count", "date", "torch", "torch_cuda", "torch_cudnn")
FORM_KEYS = ("images_per_sec", "images_per_sec_min", "images_per_sec_max", "step_ms", "windows")


@pytest.fixture(scope="module")
def torch():
    return pytest.importorskip("torch", reason="PyTorch is not importable: the cupynet-vs-PyTorch checks need it")


@pytest.fixture(scope="module")
def vs_torch(torch):
    """bench/vs_torch.py as a module, with the quick configuration resolved for the CPU."""
    sys.path.insert(0, os.path.join(REPO, "bench"))
    import vs_torch
    return vs_torch


@pytest.fixture(scope="module")
def quick(vs_torch, torch):
    """(args, torch device, dataset) of --quick: ResNet-8, batch 8, CPU."""
    args = vs_torch.parse_args(["--quick"])
    device = vs_torch.resolve_device(args, torch)
    vs_torch.configure_torch(torch, device, args.tf32)
    return args, device, vs_torch.synthetic_dataset(num_train=32, num_test=8, seed=0)


def one_step_check(vs_torch, torch, quick, layout, perturb=None):
    """verify()'s comparison of one cupynet step and one torch step from copied weights, at float32 tolerances."""
    args, device, dataset = quick
    before, ours, theirs = vs_torch.one_step_each(torch, args, layout, "float32", dataset, device, perturb)
    return vs_torch.compare(before, ours, theirs, vs_torch.TOLERANCES["fp32"])


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_copied_weights_give_cupynets_loss_gradients_and_update(vs_torch, torch, quick, layout):
    # Both sides are plain float32 on the CPU: the loss agrees to a few float32 roundings (fp32 tolerance
    # 1e-5 relative; measured ~1e-7), the gradients up to ReLU-kink flips, the step to the update's rounding
    # (TOLERANCES in bench/vs_torch.py says where each number comes from).
    check = one_step_check(vs_torch, torch, quick, layout)
    assert check["passed"], check
    assert check["loss_rel_error"] < 1e-6
    assert check["loss_cupynet"] == pytest.approx(check["loss_torch"], rel=1e-5)


def test_a_perturbed_copy_fails_the_loss_check(vs_torch, torch, quick):
    # Negative control: one wrong weight (of the dense layer, where BatchNorm cannot absorb it) moves the
    # loss far beyond 1e-5.
    def perturb(model):
        with torch.no_grad():
            model.fc.weight[3, 7] += 0.1
    check = one_step_check(vs_torch, torch, quick, "NHWC", perturb)
    assert not check["passed"]
    assert check["loss_rel_error"] > 100 * check["loss_tolerance"]


def test_a_wrong_batchnorm_momentum_fails_the_step_check(vs_torch, torch, quick):
    # Negative control for the step: torch momentum = decay (the classic mistake; it must be 1 - decay) leaves
    # the loss alone (training uses batch statistics) but moves the moving statistics wrongly.
    def perturb(model):
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.momentum = 0.997
    check = one_step_check(vs_torch, torch, quick, "NCHW", perturb)
    assert check["loss_rel_error"] <= check["loss_tolerance"]
    assert not check["passed"] and "moving" in check["step_worst"]
    assert check["step_rel_error"] > 100 * check["step_tolerance"]


def test_copy_weights_refuses_other_blocks_and_depths(vs_torch, torch, quick):
    from torch_resnet import ResNetV1, copy_weights
    args, _, dataset = quick
    trainer = vs_torch.cupynet_trainer(args, "NHWC", "float32", dataset)
    with pytest.raises(ValueError, match="ResNet-8 vs torch ResNet-14"):
        copy_weights(trainer, ResNetV1(14))
    trainer.model.block = "v2"
    with pytest.raises(ValueError, match="block 'v1' only"):
        copy_weights(trainer, ResNetV1(8))


def test_graph_update_is_torch_sgd(vs_torch, torch):
    # The CUDA-graph form's foreach SGD (LR in a 0-d tensor) equals torch.optim.SGD with weight decay and
    # momentum, over two steps (the second uses the momentum buffer). Same float32 ops: 1e-6 relative.
    generator = torch.Generator().manual_seed(0)
    params = [torch.randn(5, 3, generator=generator), torch.randn(7, generator=generator)]
    grads = [[torch.randn(p.shape, generator=generator) for p in params] for _ in range(2)]
    reference = [torch.nn.Parameter(p.clone()) for p in params]
    optimizer = torch.optim.SGD(reference, lr=0.1, momentum=0.9, weight_decay=1e-4)
    buffers = [torch.zeros_like(p) for p in params]
    for step_grads in grads:
        vs_torch.sgd_foreach(torch, params, step_grads, buffers, torch.tensor(0.1), 0.9, 1e-4)
        for p, g in zip(reference, step_grads):
            p.grad = g.clone()
        optimizer.step()
    for ours, theirs in zip(params, reference):
        np.testing.assert_allclose(ours.numpy(), theirs.detach().numpy(), rtol=1e-6, atol=1e-7)


def test_quick_verifies_then_writes_ratios(torch, tmp_path):
    out = tmp_path / "vs_torch.json"
    result = subprocess.run([sys.executable, SCRIPT, "--quick", "--json", str(out)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "torch-graph: skipped" in result.stdout           # CPU: no CUDA graph, and it says so
    report = json.loads(out.read_text())
    assert report["benchmark"] == "vs_torch"
    for key in ENV_KEYS:
        assert key in report["environment"], key
    assert report["args"]["cuda_graph"] == "auto" and report["args"]["repeats"] >= 5
    assert {(c["layout"], c["dtype"]) for c in report["verification"]} == {("NHWC", "float32"), ("NCHW", "float32")}
    assert all(check["passed"] for check in report["verification"])
    rows = report["results"]
    assert {row["layout"] for row in rows} == {"NCHW", "NHWC"}
    for row in rows:
        assert row["torch_graph"] is None and row["ratio_vs_torch_graph"] is None
        for form in (row["torch_eager"], row["cupynet"]):
            for key in FORM_KEYS:
                assert key in form, key
            assert form["images_per_sec_min"] <= form["images_per_sec"] <= form["images_per_sec_max"]
            assert form["images_per_sec"] > 0 and form["windows"] >= 5
        expected = row["cupynet"]["images_per_sec"] / row["torch_eager"]["images_per_sec"]
        assert row["ratio_vs_torch_eager"] == pytest.approx(expected, abs=1e-3)


def test_a_timing_that_fails_is_recorded_and_the_others_still_run(vs_torch, torch, tmp_path, monkeypatch, capsys):
    """A timing failing at run time (injected: PyTorch's out of memory in NCHW, a cuDNN failure of cupynet's in
    NHWC, which the CPU cannot produce) leaves that figure None with its error, the row's other figures
    measured, and exit 1."""
    real = vs_torch.torch_form

    def torch_form(torch_, form, args, layout, dtype, device):
        if layout == "NCHW":
            raise RuntimeError("CUDA out of memory. Tried to allocate 2 GiB\nmore detail")
        return real(torch_, form, args, layout, dtype, device)

    real_measure = vs_torch.layouts.measure

    def measure(depth, batch, layout, *args, **kwargs):     # and cupynet's own timing, in the other layout
        if layout == "NHWC":
            raise RuntimeError("cuDNN engine failed")
        return real_measure(depth, batch, layout, *args, **kwargs)

    monkeypatch.setattr(vs_torch, "torch_form", torch_form)
    monkeypatch.setattr(vs_torch.layouts, "measure", measure)
    out = tmp_path / "vs_torch.json"
    assert vs_torch.main(["--quick", "--json", str(out)]) == 1
    rows = {row["layout"]: row for row in json.loads(out.read_text())["results"]}
    assert rows["NCHW"]["errors"] == {"torch_eager": "RuntimeError: CUDA out of memory. Tried to allocate 2 GiB"}
    assert rows["NCHW"]["torch_eager"] is None and rows["NCHW"]["ratio_vs_torch_eager"] is None
    assert rows["NCHW"]["cupynet"]["images_per_sec"] > 0
    assert rows["NHWC"]["errors"] == {"cupynet": "RuntimeError: cuDNN engine failed"}
    assert rows["NHWC"]["cupynet"] is None and rows["NHWC"]["ratio_vs_torch_eager"] is None
    assert rows["NHWC"]["torch_eager"]["images_per_sec"] > 0
    captured = capsys.readouterr()
    assert "2 timing(s) failed" in captured.err and "cupynet NHWC float32: failed" in captured.out


def test_without_torch_the_script_skips_with_one_line(tmp_path):
    # Runs whether or not PyTorch is installed: the import is blocked in the child process.
    out = tmp_path / "vs_torch.json"
    code = ("import runpy, sys; sys.modules['torch'] = None; "
            f"sys.argv = [{SCRIPT!r}, '--quick', '--json', {str(out)!r}]; "
            f"runpy.run_path({SCRIPT!r}, run_name='__main__')")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("vs_torch: skipped: PyTorch is not importable (")
    assert len(result.stdout.strip().splitlines()) == 1
    assert "Traceback" not in result.stderr
    assert not out.exists()


@pytest.mark.parametrize("args,flag", [(["--dtypes", "float16"], "--dtypes"), (["--wgrad-chunks", "17"], "--wgrad-chunks"),
                                       (["--batch", "4", "--wgrad-chunks", "8"], "--wgrad-chunks 8"),
                                       (["--wgrad-streams", "0"], "--wgrad-streams")])
def test_bad_flags_exit_with_one_line(tmp_path, args, flag):
    result = subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert flag in result.stderr and "Traceback" not in result.stderr


def test_the_step_options_reach_both_of_cupynets_runs(monkeypatch):
    """--conv-split-k, --conv-genstats, --conv-pixel-pairs, --residual-grad-sums and --no-conv-deterministic reach
    the cupynet run checked against PyTorch (cupynet_config) and the timed one (layouts.measure); without them, both
    run the defaults. No PyTorch needed: its timing is a stand-in here."""
    sys.path.insert(0, os.path.join(REPO, "bench"))
    import vs_torch
    timed = []

    def measure(depth, batch, layout, dtype, args, dataset, **options):
        timed.append(options)
        return {"images_per_sec": 2.0}

    monkeypatch.setattr(vs_torch.layouts, "measure", measure)
    monkeypatch.setattr(vs_torch, "torch_form", lambda *args: {"images_per_sec": 1.0})
    for flags, expected in (([], (False, False, True, False, False)),
                            (["--conv-split-k", "--conv-genstats", "--no-conv-deterministic", "--conv-pixel-pairs",
                              "--residual-grad-sums"], (True, True, False, True, True))):
        args = vs_torch.parse_args(flags)
        config = vs_torch.cupynet_config(args, "NHWC", "float32")
        assert (config.conv_split_k, config.conv_genstats, config.conv_deterministic, config.conv_pixel_pairs,
                config.residual_grad_sums) == expected
        row = vs_torch.benchmark_row(None, args, "NHWC", "float32", None, type("Device", (), {"type": "cpu"}))
        assert row["ratio_vs_torch_eager"] == 2.0
        assert tuple(timed[-1][name] for name in ("conv_split_k", "conv_genstats", "conv_deterministic",
                                                  "conv_pixel_pairs", "residual_grad_sums")) == expected


def test_cupynet_and_its_torch_twin_train_alike_step_after_step(torch):
    """The recipe over many steps, not one: cupynet's NumPy reference and its PyTorch twin trained with the stock
    torch.optim.SGD (momentum 0.9, weight decay 1e-4 on every parameter), both in float64 from the same weights, on
    the same augmented batches of the built-in sample, BatchNorm momentum 1 - decay. Early training amplifies any
    difference (ResNet-20 at LR 0.1, measured: about 2x per step, 3e-15 after two steps, 2e-11 after twelve; this
    test's ResNet-8, 5e-14 after ten, with PyTorch 2.13 on the CPU), so a
    difference in the recipe (weight decay skipping BatchNorm's parameters, another momentum form or BatchNorm
    momentum, a summed instead of a mean loss) would show within a few steps, far above rounding's 1e-9.
    Then the moving statistics and the evaluation's logits."""
    sys.path.insert(0, os.path.join(REPO, "bench"))
    from torch_resnet import DENSE_WEIGHT, ResNetV1, copy_weights, twin_tensors
    from cupynet.backends.numpy_backend import NumpyBackend
    from cupynet.data import builtin_sample_dir, load_cifar10
    from cupynet.model import ResNet
    from cupynet.optim import MomentumSGD
    from cupynet.sampling import StepSampler

    depth, batch, decay, steps = 8, 32, 0.9, 10
    be = NumpyBackend("NCHW", "float64")
    data = load_cifar10(builtin_sample_dir(), validation_size=0)
    model = ResNet(be, depth, "v1", bn_decay=decay)
    model.init(np.random.default_rng(0))
    optimizer = MomentumSGD(be, model.params, momentum=0.9, weight_decay=1e-4)
    optimizer.set_learning_rate(0.1)
    twin = ResNetV1(depth, bn_momentum=1 - decay).double()
    copy_weights(model, twin)                     # float32 on the way: cupynet takes the rounded values back

    def twin_arrays():
        """The twin's tensors in float64, named and shaped as cupynet's."""
        return {name: (t.detach().numpy().T if name == DENSE_WEIGHT else t.detach().numpy())
                for name, t in twin_tensors(twin).items()}

    twin_state = twin_arrays()
    model.params.load_state_dict({name: twin_state[name] for name in model.params.state_dict()})
    model.state.load_state_dict({name: twin_state[name] for name in model.state.state_dict()})
    torch_sgd = torch.optim.SGD(twin.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    sampler = StepSampler(0, len(data.train.labels), batch)
    x, labels = np.empty((batch, 3, 32, 32)), np.empty(batch, np.int32)

    def difference():
        ours = {**model.params.state_dict(), **model.state.state_dict()}
        theirs = twin_arrays()
        return max(np.linalg.norm(ours[name] - theirs[name]) / np.linalg.norm(ours[name]) for name in ours)

    for step in range(steps):
        be.augment_batch(data.train.images, data.train.labels, sampler.rows(step), 0, step, True, x, labels)
        loss = float(model.forward_backward(x, labels))
        optimizer.step()
        torch_sgd.zero_grad()
        twin_loss = torch.nn.functional.cross_entropy(twin(torch.from_numpy(x)), torch.from_numpy(labels).long())
        twin_loss.backward()
        torch_sgd.step()
        assert loss == pytest.approx(twin_loss.item(), rel=1e-9), step
        assert difference() < 1e-9, step          # every parameter and moving statistic
    test_x, test_labels = np.empty((64, 3, 32, 32)), np.empty(64, np.int32)
    be.augment_batch(data.test.images, data.test.labels, np.arange(64), 0, 0, False, test_x, test_labels)
    twin.eval()                                   # the moving statistics
    with torch.no_grad():
        twin_logits = twin(torch.from_numpy(test_x)).numpy()
    np.testing.assert_allclose(model.forward(test_x, train=False), twin_logits, rtol=1e-9, atol=1e-12)
