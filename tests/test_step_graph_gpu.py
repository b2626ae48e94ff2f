"""Whole-step CUDA-graph capture on the GPU: replayed steps equal eager steps bit for bit (how the runs are
compared: tests/step_graph_runs.py); the step options under capture are tests/test_step_options_gpu.py's.

    python -m pytest -m gpu tests/test_step_graph_gpu.py -q       # on a GPU machine (skipped elsewhere)
"""
import json

import numpy as np
import pytest

from cupynet.config import TrainConfig
from cupynet.trainer import Trainer
from step_graph_runs import BASE, STEPS, assert_identical, make_backend, small_dataset, train

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def dataset():
    return small_dataset()


@pytest.mark.parametrize("layout,dtype", [("NHWC", "float32"), ("NCHW", "float32"), ("NHWC", "bfloat16")])
def test_captured_steps_equal_eager_steps(dataset, layout, dtype):
    settings = dict(BASE, data_format=layout, dtype=dtype)
    eager = train(TrainConfig(**settings, cuda_graph="off"), dataset, make_backend(layout, dtype))
    captured = train(TrainConfig(**settings, cuda_graph="on"), dataset, make_backend(layout, dtype))
    runner = captured[0].runner
    assert runner.captured and runner.eager_steps == 2 and runner.replays == STEPS - 2
    assert not eager[0].runner.captured and eager[0].runner.eager_steps == STEPS
    assert_identical(eager, captured)


def test_auto_captures_on_the_gpu_and_the_step_launches_nothing_else(dataset):
    """--cuda-graph auto records on a GPU; after that a step is one graph launch (no kernel launches)."""
    backend = make_backend("NHWC", "float32")
    trainer = Trainer(TrainConfig(**BASE), dataset, backend)
    for _ in range(3):
        trainer.train_step()
    assert trainer.runner.captured
    launches, executions = backend.kernels.launches.copy(), backend.conv.executions.copy()
    for _ in range(4):   # an order upload and an LR fill happen here: copies and CuPy fills, not our kernels
        trainer.train_step()
    assert backend.kernels.launches == launches and backend.conv.executions == executions
    assert trainer.runner.replays == 5


def test_resume_records_again_and_continues_exactly(dataset):
    """A restore drops the recording (its seed and step are stale); the resumed run equals an unbroken one."""
    config = TrainConfig(**BASE, cuda_graph="on")
    unbroken = train(config, dataset, make_backend("NHWC", "float32"))
    first = Trainer(config, dataset, make_backend("NHWC", "float32"))
    for _ in range(5):
        first.train_step()
    arrays, meta = first.checkpoint_arrays(), dict(first.checkpoint_meta(), step=first.step)
    resumed = Trainer(config, dataset, make_backend("NHWC", "float32"))
    for _ in range(3):
        resumed.train_step()        # recorded at the wrong place on purpose, then replaced by the restore
    resumed.restore(arrays, meta, "in-memory checkpoint")
    assert not resumed.runner.captured
    while resumed.step < STEPS:
        resumed.train_step()
    for name, value in unbroken[1].items():
        np.testing.assert_array_equal(resumed.checkpoint_arrays()[name], value, err_msg=name)


def test_nccl_one_rank_is_captured_with_the_all_reduce(dataset):
    """The gradient all-reduce (NCCL, one rank) inside the recording: same result as the eager NCCL run."""
    from cupynet.parallel import NcclGroup

    def run(mode):
        group = NcclGroup([0])
        backend = make_backend("NHWC", "float32")
        comm = group.communicator(0, backend)
        try:
            trainer, state, evaluations, losses = train(TrainConfig(**BASE, cuda_graph=mode), dataset, backend, comm)
            replays = trainer.runner.replays
            trainer.runner.graph = None      # the recording (its NCCL kernels) goes before the communicator
            backend.synchronize()
            return replays, state, evaluations, losses
        finally:
            comm.abort()

    eager, captured = run("off"), run("on")
    assert eager[0] == 0 and captured[0] == STEPS - 2
    assert_identical(eager, captured)


def test_host_communicator_is_never_captured(dataset):
    """Workers sharing one GPU through the host all-reduce run eagerly under auto; 'on' is refused."""
    from cupynet.errors import ConfigError
    from cupynet.parallel import HostGroup
    backend = make_backend("NHWC", "float32")
    comm = HostGroup(1).communicator(0, backend)
    assert not Trainer(TrainConfig(**BASE), dataset, backend, comm).runner.capture
    with pytest.raises(ConfigError, match="host all-reduce"):
        Trainer(TrainConfig(**BASE, cuda_graph="on"), dataset, backend, comm)


def test_the_warm_up_is_reported_once_at_the_first_replayed_step(dataset, tmp_path):
    """The training loop writes one warmup event, at the first replayed step (the eager steps, then the recording
    and its first launch), with the seconds since training started, and prints them; an eager run writes none."""
    from cupynet.report import MetricsLog
    from cupynet.step_graph import WARMUP_STEPS
    from cupynet.stop_request import StopRequest
    from cupynet.train import train_loop
    for mode in ("on", "off"):
        config = TrainConfig(**BASE, cuda_graph=mode, train_steps=6, log_interval=3, checkpoint_interval=100)
        trainer = Trainer(config, dataset, make_backend("NHWC", "float32"))
        model_dir, lines = tmp_path / mode, []
        model_dir.mkdir()
        assert train_loop(trainer, config, str(model_dir), MetricsLog(str(model_dir)), lines.append, chief=True,
                          stop=StopRequest())[1] is False          # not stopped: it reached its 6 steps
        with open(model_dir / "metrics.jsonl") as f:
            warmups = [event for event in map(json.loads, f) if event["event"] == "warmup"]
        said = [line for line in lines if line.startswith("warm-up:")]
        if mode == "on":
            assert [event["step"] for event in warmups] == [WARMUP_STEPS + 1] and warmups[0]["seconds"] > 0
            assert len(said) == 1 and f"the first {WARMUP_STEPS + 1} steps" in said[0]
        else:
            assert warmups == [] and said == []


def test_an_evaluation_builds_its_new_convolutions_untimed_and_training_keeps_its_choices(dataset):
    """With autotuning on, the training step's convolutions are timed and chosen; an evaluation's new shapes (its
    batch of 24 here, 16 in training) take the heuristics' first plan, untimed (the same in every process that
    evaluates the model), while one at a shape training tuned runs the training's choice; a later training step
    still runs its tuned engines."""
    from cupynet.backends.conv_autotune import export_choices
    backend = make_backend("NHWC", "float32")
    trainer = Trainer(TrainConfig(**dict(BASE, eval_batch_size=24), cuda_graph="off"), dataset, backend)
    for _ in range(2):
        trainer.train_step()
    trained = {entry["key"]: entry["plan_index"] for entry in backend.conv.engine_choices()}
    assert trained and all(index is not None for index in trained.values())        # timed and chosen
    exported = len(export_choices(0)["choices"])
    trainer.evaluate(dataset.test)
    evaluation = {entry["key"]: entry["plan_index"] for entry in backend.conv.engine_choices()
                  if entry["key"] not in trained}
    assert evaluation and all(key[1] == 24 and index is None for key, index in evaluation.items()), evaluation
    assert len(export_choices(0)["choices"]) == exported       # nothing of the evaluation's for a checkpoint
    assert {entry["key"]: entry["plan_index"] for entry in backend.conv.engine_choices()
            if entry["key"] in trained} == trained
    trainer.train_step()
    assert backend.conv.executions["fprop"] > 0 and trainer.step == 3
