"""Running the device part of a training step: eagerly, or recorded once as a CUDA graph and replayed.

    runner = StepRunner(backend, capture=True)
    runner(trainer_device_step)     # calls 1..WARMUP_STEPS run it eagerly; the next records it and
                                    # launches the recording; every later call is one graph launch

Why eager steps first: a capture records work without running it, so everything that happens only once
must already have happened: kernels compiled, cuDNN plans built, layer buffers allocated, NCCL's
connections set up (its first collective). After that a step allocates nothing and asks nothing of
the host, so one recording serves every later step.

What the device step may do, so that its recording stays right on every replay: read only device
memory that lives as long as the trainer (parameters, the step counter, the epoch's order, the
learning-rate scalar), never a value fixed by the host at capture time that changes later, and never
synchronize with the host. The trainer keeps to this (cupynet/trainer.py): the host only uploads the
epoch's order at epoch starts and sets the learning rate when it changes, both between launches.
Which steps were eager and which replayed changes nothing in the results: the same kernels run in
the same order on the same buffers (tests/test_step_graph_gpu.py compares them bit for bit).
"""
WARMUP_STEPS = 2      # two, not one: a second eager step proves nothing allocates any more


class StepRunner:
    """Runs a device step eagerly, or (capture=True, GPU backend) as a replayed CUDA graph."""

    def __init__(self, backend, capture, warmup_steps=WARMUP_STEPS, wait_for_peers=None):
        if capture and not hasattr(backend, "capture"):
            raise ValueError(f"CUDA-graph capture needs the GPU backend, not {backend.name}")
        self.backend = backend
        self.capture = capture
        self.warmup_steps = warmup_steps
        self.wait_for_peers = wait_for_peers or (lambda: None)   # a communicator's line-up (data parallel)
        self.eager_steps = 0
        self.graph = None            # the CapturedGraph, once recorded

    @property
    def captured(self):
        return self.graph is not None

    @property
    def replays(self):
        return self.graph.launches if self.graph is not None else 0

    def __call__(self, device_step):
        if self.graph is not None:
            self._launch()
        elif not self.capture or self.eager_steps < self.warmup_steps:
            device_step()
            self.eager_steps += 1
        else:
            self.graph = self.backend.capture(device_step)
            self._launch()           # the recording only recorded: this launch runs the step

    def _launch(self):
        # Replicas sharing a GPU: every rank launches (its barrier kernels) before any rank goes on to host
        # calls that may wait for the whole device (cupynet/shared_gpu.py says why); a no-op otherwise.
        self.wait_for_peers()
        self.graph.launch()
        self.wait_for_peers()
