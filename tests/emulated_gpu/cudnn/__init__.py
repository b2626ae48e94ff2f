"""An emulated cuDNN Frontend for CI: the graph API cupynet/backends/cudnn_conv.py uses, with NumPy convolutions.

It stands where `nvidia-cudnn-frontend` and libcudnn would be (tests/emulated_gpu/cupy says why), and
checks what cuDNN would check, the way cuDNN would do it, so that mistakes in our use show up on a CPU:

  * memory is read and written only through each tensor's dims, strides (in elements) and data type, at
    the integer addresses of the variant pack: a wrong stride or dim scrambles the result, as on a GPU;
    an output whose strides were never set gets NHWC-packed strides, as in the real Frontend;
  * the build sequence validate -> build_operation_graph -> create_execution_plans -> [deselect] ->
    check_support -> build_plans (or build_plan_at_index) is enforced; deselecting before plans exist
    does nothing, as in the real one;
  * the heuristics offer six engines, listed best first: a TF32 tensor-core engine (numerical note
    TENSOR_CORE: rounds float32 inputs to TF32, so strict-fp32 parity fails if it is not deselected), a
    NONDETERMINISTIC engine (its float32 sums are reordered at random on every run, so reproducibility
    tests fail if it is not deselected), plain fp32 engines, a RUNTIME_COMPILATION one and one whose sums
    are REDUCED_PRECISION_REDUCTION;
  * one more engine only a knob search finds (the heuristics never propose it): deterministic split-K
    weight gradients, the sum over N*H*W cut into SPLIT_K_SLC slices whose float32 partial sums are added
    in order. `get_engine_count`, `get_knobs_for_engine` and `create_execution_plan(engine id, {knob
    type: value})` work as in Frontend 1.22, including its bookkeeping of notes: each plan-creating call
    appends the notes of *every* plan again, so a plan added to a graph that already had plans is judged
    (deselected, called run-time compiled) by another plan's notes. A knob value outside the engine's
    range or stride fails check_support;
  * execution is enqueued on the stream the handle is bound to (cudnn.set_stream), so it is recorded by
    a CUDA-graph capture exactly when that stream is capturing;
  * the fused patterns bench/conv_engines.py surveys: a per-channel scale / bias / relu chain in front of
    the convolution's image input (virtual tensors, never in the variant pack) and `genstats` (per-channel
    sum and sum of squares of an fprop's output) behind it, which cupynet's --conv-genstats runs. Whether
    real cuDNN offers genstats for every shape is unknown here; the emulated engines offer it only for
    outputs of a multiple of GENSTATS_CHANNEL_MULTIPLE channels (32: a ResNet's first stage, 16 channels, has
    none), so a model run takes both paths, fused and not (tests may change the multiple).

Convolutions accumulate in float64 and round once to the output type (bfloat16: to nearest even).

Its API is the real Frontend's, held to it by tests/test_frontend_api.py against the installed one (the test
extra's): every public name exists there, parameters pybind11 takes by position only are position-only here
(declared before `/`), keyword names are the real ones, enum members exist there (checked with every Frontend
from 1.22.1 to 1.26.0 on 2026-11-29).
"""
import ctypes
import enum
import functools
import itertools
import time

import numpy as np

__version__ = "1.22.1+emulated"


class data_type(enum.Enum):
    FLOAT = "float32"
    BFLOAT16 = "bfloat16"
    HALF = "float16"


class heur_mode(enum.Enum):
    A = 0
    B = 1
    FALLBACK = 2


class numerical_note(enum.Enum):
    TENSOR_CORE = 0
    DOWN_CONVERT_INPUTS = 1
    NONDETERMINISTIC = 2
    REDUCED_PRECISION_REDUCTION = 3


class behavior_note(enum.Enum):
    RUNTIME_COMPILATION = 0


class knob_type(enum.Enum):
    NOT_SET = 0
    SPLIT_K_BUF = 5
    TILEK = 6
    SPLIT_K_SLC = 9


class knob:
    """A knob an engine exposes: its type and the values it takes (min_value to max_value by stride)."""

    def __init__(self, knob_type=knob_type.NOT_SET, max_value=None, min_value=None, stride=None):
        self.type, self.max_value, self.min_value, self.stride = knob_type, max_value, min_value, stride

    def takes(self, value):
        return self.min_value <= value <= self.max_value and (value - self.min_value) % self.stride == 0


class cudnnGraphNotSupportedError(Exception):
    pass


def backend_version():
    return 91900


# ------------------------------------------------------------------ handles

_handles = {}
_handle_ids = itertools.count(0x5000)


def create_handle():
    handle = next(_handle_ids)
    _handles[handle] = 0            # the null stream until set_stream
    return handle


def destroy_handle(handle, /):
    _handles.pop(handle)


def set_stream(handle, stream):
    if handle not in _handles:
        raise RuntimeError(f"set_stream: {handle} is not a live cuDNN handle")
    _handles[handle] = int(stream)


def _stream_of(handle):
    from cupy.cuda.stream import stream_from_pointer
    if handle not in _handles:
        raise RuntimeError(f"execute: {handle} is not a live cuDNN handle")
    return stream_from_pointer(_handles[handle])


# ------------------------------------------------------------------ engines

class _Engine:
    def __init__(self, name, numerical=(), behavior=(), workspace=0, knobs=(), ops=("fprop", "dgrad", "wgrad"),
                 proposed=True, reorders=None, seconds=0.0, stats_accumulate=False, stats_in_half=False):
        self.name = name
        # test engines cupynet must never use for genstats: one that adds into its sums instead of writing
        # them, one that adds them up one value at a time in float16 (sums in a 16-bit precision)
        self.stats_accumulate = stats_accumulate
        self.stats_in_half = stats_in_half
        self.seconds = seconds           # how long a run takes beyond the NumPy work (a test's slow engine)
        self.numerical = tuple(numerical)
        # whether its float32 sums come out in a varying order: what NONDETERMINISTIC says, unless a test
        # builds an engine whose notes do not tell the truth
        self.reorders = numerical_note.NONDETERMINISTIC in self.numerical if reorders is None else reorders
        self.behavior = tuple(behavior)
        self.workspace = workspace
        self.knobs = tuple(knobs)        # knob objects; a plan without a value for one takes its default (1)
        self.ops = ops                   # the operations it supports
        self.proposed = proposed         # offered by the heuristics (else only create_execution_plan reaches it)


ENGINES = (                                  # engine ids are positions; the heuristics' order, best first
    _Engine("tf32 tensor cores", numerical=[numerical_note.TENSOR_CORE, numerical_note.DOWN_CONVERT_INPUTS],
            workspace=1 << 12),
    _Engine("split-k atomics", numerical=[numerical_note.NONDETERMINISTIC], workspace=1 << 14,
            knobs=[knob(knob_type.SPLIT_K_SLC, 64, 1, 1)]),
    _Engine("implicit gemm fp32"),
    _Engine("winograd fp32", workspace=1 << 16),
    _Engine("runtime-compiled", behavior=[behavior_note.RUNTIME_COMPILATION], workspace=1 << 10),
    _Engine("reduced-precision sums", numerical=[numerical_note.REDUCED_PRECISION_REDUCTION]),
    _Engine("split-k slices", workspace=1 << 15, ops=("wgrad",), proposed=False,
            knobs=[knob(knob_type.SPLIT_K_SLC, 32, 1, 1), knob(knob_type.SPLIT_K_BUF, 1, 0, 1)]),
)


GENSTATS_CHANNEL_MULTIPLE = 32              # genstats is supported only for outputs of a multiple of this


# ------------------------------------------------------------------ tensors and the graph

class _Tensor:
    _uids = itertools.count(1)

    def __init__(self, name, dim=None, stride=None, data_type=None):
        self.name = name
        self.dim = list(dim) if dim is not None else None
        self.stride = list(stride) if stride is not None else None
        self.data_type = data_type
        self.is_output = False
        self.is_virtual = False          # an intermediate of a fused graph: no memory, no pointer
        self.uid = next(self._uids)

    def set_output(self, value, /):
        self.is_output = bool(value)
        return self

    def set_dim(self, dim, /):
        self.dim = [int(d) for d in dim]
        return self

    def set_stride(self, stride, /):
        self.stride = [int(s) for s in stride]
        return self

    def set_data_type(self, data_type):
        self.data_type = data_type
        return self

    def get_uid(self):
        return self.uid

    def get_dim(self):
        return list(self.dim)

    def get_stride(self):
        return list(self.stride)


_STAGES = ("created", "validated", "operation graph", "plans created", "supported")


class pygraph:
    def __init__(self, io_data_type=None, intermediate_data_type=None, compute_data_type=None, handle=None,
                 name="graph"):
        self.io_data_type = io_data_type
        self.compute_data_type = compute_data_type
        self.handle = handle
        self.tensors = []
        self.conv = None
        self.pointwise = []              # (op, input, operand or None, output) in graph order
        self.stats = None                # genstats: (input, sum, sum of squares)
        self.stage = "created"
        self.plans = []                  # (engine id, {knob type: value}) per plan index
        self._numerical = []             # the notes a plan index is judged by (Frontend 1.22's bookkeeping)
        self._behavior = []
        self.barred = set()              # deselected plan indices
        self.built = set()               # built plan indices

    # ------------------------------------------------------------- description

    def tensor(self, name, dim, stride, data_type=None):
        t = _Tensor(name, dim, stride, data_type if data_type is not None else self.io_data_type)
        self.tensors.append(t)
        return t

    def _convolution(self, op, a, b, pre_padding, post_padding, stride, dilation, compute_data_type, name):
        if self.conv is not None:
            raise RuntimeError("the emulated Frontend holds one convolution per graph")
        output = _Tensor(f"{name}::output", data_type=self.compute_data_type)
        self.tensors.append(output)
        self.conv = dict(op=op, a=a, b=b, out=output, pre=list(pre_padding), post=list(post_padding),
                         stride=list(stride), dilation=list(dilation), compute=compute_data_type)
        return output

    def conv_fprop(self, image, weight, pre_padding, post_padding, stride, dilation, compute_data_type=None,
                   name="fprop"):
        return self._convolution("fprop", image, weight, pre_padding, post_padding, stride, dilation,
                                 compute_data_type, name)

    def conv_dgrad(self, loss, filter, pre_padding, post_padding, stride, dilation, compute_data_type=None,
                   name="dgrad"):
        return self._convolution("dgrad", loss, filter, pre_padding, post_padding, stride, dilation,
                                 compute_data_type, name)

    def conv_wgrad(self, image, loss, pre_padding, post_padding, stride, dilation, compute_data_type=None,
                   name="wgrad"):
        return self._convolution("wgrad", image, loss, pre_padding, post_padding, stride, dilation,
                                 compute_data_type, name)

    def _pointwise(self, op, x, operand, name):
        out = _Tensor(f"{name}::output", dim=x.dim, stride=x.stride, data_type=self.compute_data_type)
        out.is_virtual = True
        self.tensors.append(out)
        self.pointwise.append((op, x, operand, out))
        return out

    def scale(self, input, scale, name="scale", compute_data_type=None):
        return self._pointwise("scale", input, scale, name)

    def bias(self, input, bias, name="bias", compute_data_type=None):
        return self._pointwise("bias", input, bias, name)

    def relu(self, input, name="relu", compute_data_type=None):
        return self._pointwise("relu", input, None, name)

    def genstats(self, input, name="genstats"):
        if self.conv is None or input is not self.conv["out"] or self.conv["op"] != "fprop":
            raise cudnnGraphNotSupportedError("the emulated Frontend computes genstats of an fprop output only")
        k = input.dim[1] if input.dim else self._fprop_output_dims()[1]
        sums = [_Tensor(f"{name}::{part}", dim=[1, k, 1, 1], stride=[k, 1, k, k], data_type=data_type.FLOAT)
                for part in ("sum", "sq_sum")]
        self.tensors.extend(sums)
        self.stats = (input, *sums)
        return tuple(sums)

    def _image(self, tensor, pointers):
        """A conv input as float64: read from memory, or computed through the pointwise chain that made it."""
        if not tensor.is_virtual:
            return _read(tensor, pointers[tensor.uid])
        op, x, operand, _ = next(node for node in self.pointwise if node[3] is tensor)
        value = self._image(x, pointers)
        if op == "relu":
            return np.maximum(value, 0.0)
        per_channel = _read(operand, pointers[operand.uid])
        return value * per_channel if op == "scale" else value + per_channel

    # ------------------------------------------------------------- build sequence

    def _require(self, stage, call):
        if _STAGES.index(self.stage) < _STAGES.index(stage):
            raise RuntimeError(f"{call} before {stage} (the graph is {self.stage})")

    def validate(self):
        c = self.conv
        if c is None:
            raise ValueError("validate: the graph has no operation")
        for key in ("pre", "post", "stride", "dilation"):
            if len(c[key]) != 2:
                raise ValueError(f"validate: {key} must have 2 entries, got {c[key]}")
        if c["dilation"] != [1, 1] or c["pre"] != c["post"] or c["pre"][0] != c["pre"][1]:
            raise cudnnGraphNotSupportedError("the emulated Frontend runs symmetric padding, no dilation")
        out = c["out"]
        if out.dim is None:
            if c["op"] != "fprop":
                raise ValueError(f"validate: the {c['op']} output needs set_dim (its shape cannot be inferred)")
            out.dim = self._fprop_output_dims()
        if out.stride is None:               # the real Frontend's default for an unset output stride
            n, ch, h, w = out.dim
            out.stride = [h * w * ch, 1, w * ch, ch]
        if self.conv["b"].is_virtual or any(node[3] is not self.conv["a"] and not any(
                later[1] is node[3] for later in self.pointwise) for node in self.pointwise):
            raise cudnnGraphNotSupportedError("the emulated Frontend fuses a pointwise chain into the image input only")
        for t in self.tensors:
            if t.dim is None or len(t.dim) != 4 or t.stride is None or len(t.stride) != 4:
                raise ValueError(f"validate: tensor {t.name} needs 4 dims and 4 strides, got {t.dim} {t.stride}")
        self._check_shapes()
        self.stage = "validated"

    def _fprop_output_dims(self):
        c = self.conv
        n, _, h, w = c["a"].dim
        k, _, r, s = c["b"].dim
        pad, stride = c["pre"][0], c["stride"][0]
        return [n, k, (h + 2 * pad - r) // stride + 1, (w + 2 * pad - s) // stride + 1]

    def _check_shapes(self):
        """The dims of image, filter and result must be those of one convolution."""
        c = self.conv
        op = c["op"]
        image, weight, result = {"fprop": (c["a"], c["b"], c["out"]), "dgrad": (c["out"], c["b"], c["a"]),
                                 "wgrad": (c["a"], c["out"], c["b"])}[op]
        n, ch, h, w = image.dim
        k, wc, r, s = weight.dim
        pad, stride = c["pre"][0], c["stride"][0]
        expected = [n, k, (h + 2 * pad - r) // stride + 1, (w + 2 * pad - s) // stride + 1]
        if wc != ch or result.dim != expected:
            raise ValueError(f"validate: {op} image {image.dim}, filter {weight.dim}, result {result.dim} "
                             f"(expected {expected}) are not one convolution")

    def build_operation_graph(self):
        self._require("validated", "build_operation_graph")
        self.stage = "operation graph"

    def create_execution_plans(self, modes, /):
        self._require("operation graph", "create_execution_plans")
        if not modes:
            raise ValueError("create_execution_plans: no heuristics mode")
        float_io = self.io_data_type == data_type.FLOAT
        self._add_plans([(i, {}) for i, engine in enumerate(ENGINES)
                         if engine.proposed and (float_io or not engine.name.endswith(" fp32"))])

    def get_engine_count(self):
        self._require("operation graph", "get_engine_count")
        return len(ENGINES)

    def get_knobs_for_engine(self, engine_id, /):
        self._require("operation graph", "get_knobs_for_engine")
        if not 0 <= engine_id < len(ENGINES):
            raise RuntimeError(f"Failed to get knobs for engine: no engine {engine_id}")
        return list(ENGINES[engine_id].knobs)

    def create_execution_plan(self, engine_id, knobs, /):
        self._require("operation graph", "create_execution_plan")
        if not 0 <= engine_id < len(ENGINES):
            raise RuntimeError(f"create_execution_plan: no engine {engine_id}")
        if not all(isinstance(key, knob_type) and isinstance(value, int) for key, value in knobs.items()):
            raise TypeError(f"create_execution_plan: knobs map knob_type to int, got {knobs!r}")
        self._add_plans([(engine_id, dict(knobs))])

    def _add_plans(self, plans):
        """As Frontend 1.22's query_properties: the notes of every plan so far are appended again, so plan i
        is judged by entry i of a list that only lines up with the plans while one call made them all."""
        self.plans += plans
        self._numerical += [ENGINES[engine].numerical for engine, _ in self.plans]
        self._behavior += [ENGINES[engine].behavior for engine, _ in self.plans]
        self.stage = "plans created"

    def deselect_numeric_notes(self, notes, /):
        """Bars the plans created so far whose notes (as the Frontend keeps them) match; before any plan
        exists there is nothing to bar."""
        if _STAGES.index(self.stage) < _STAGES.index("plans created"):
            return
        notes = set(notes)
        self.barred |= {i for i in range(len(self.plans)) if notes & set(self._numerical[i])}

    def _supported(self, index):
        engine, knobs = self.plans[index]
        if self.conv["op"] not in ENGINES[engine].ops:
            return False
        if self.stats is not None and self.stats[1].dim[1] % GENSTATS_CHANNEL_MULTIPLE:
            return False
        offered = {k.type: k for k in ENGINES[engine].knobs}
        return all(key in offered and offered[key].takes(value) for key, value in knobs.items())

    def _candidates(self):
        return [i for i in range(len(self.plans)) if i not in self.barred and self._supported(i)]

    def check_support(self):
        self._require("plans created", "check_support")
        if not self._candidates():
            raise cudnnGraphNotSupportedError("No execution plans built successfully")
        self.stage = "supported"

    def build_plans(self, policy=None):
        self._require("supported", "build_plans")
        self.built.add(self._candidates()[0])

    def get_execution_plan_count(self):
        return len(self.plans)

    def _plan_at(self, index):
        if not 0 <= index < len(self.plans):
            raise ValueError(f"plan index {index} out of range ({len(self.plans)} plans)")
        return self.plans[index]

    def build_plan_at_index(self, index):
        self._require("supported", "build_plan_at_index")
        engine, _ = self._plan_at(index)
        if index in self.barred:
            raise RuntimeError(f"plan {index} ({ENGINES[engine].name}) was deselected")
        if not self._supported(index):
            raise cudnnGraphNotSupportedError(f"plan {index} ({ENGINES[engine].name}) does not support this graph")
        self.built.add(index)

    def get_plan_name_at_index(self, index):
        engine, knobs = self._plan_at(index)
        return "".join([f"eng{engine}"] + [f"_k{key.value}={value}" for key, value in sorted(
            knobs.items(), key=lambda item: item[0].value)]) + f" ({ENGINES[engine].name})"

    def get_behavior_notes_for_plan_at_index(self, index, /):
        self._plan_at(index)
        return list(self._behavior[index])

    def get_workspace_size_plan_at_index(self, index):
        return ENGINES[self._plan_at(index)[0]].workspace

    def _default_plan(self):
        plans = [i for i in self._candidates() if i in self.built]
        if not plans:
            raise RuntimeError("execute: no plan was built (build_plans)")
        return plans[0]

    def _default_engine(self):
        return self.plans[self._default_plan()][0]

    def get_workspace_size(self):
        return ENGINES[self._default_engine()].workspace

    # ------------------------------------------------------------- execution

    def execute(self, tensor_to_device_buffer, workspace, handle=None):
        self._enqueue(self._default_plan(), tensor_to_device_buffer, workspace, handle)

    def execute_plan_at_index(self, tensor_to_device_buffer, workspace, index, handle=None):
        self._plan_at(index)
        if index not in self.built:
            raise RuntimeError(f"execute_plan_at_index: plan {index} was not built")
        self._enqueue(index, tensor_to_device_buffer, workspace, handle)

    def _enqueue(self, plan, variant_pack, workspace, handle):
        engine, knobs = self.plans[plan]
        handle = self.handle if handle is None else handle
        pointers = {}
        for key, value in variant_pack.items():
            tensor = key if isinstance(key, _Tensor) else next((t for t in self.tensors if t.uid == key), None)
            if tensor is None or tensor not in self.tensors:
                raise ValueError(f"variant pack: {key!r} is not a tensor of this graph")
            if type(value) is not int:
                raise TypeError(f"variant pack: the emulation takes integer device pointers, got {type(value)}")
            pointers[tensor.uid] = value
        c = self.conv
        for tensor in self.tensors:
            if not tensor.is_virtual and not pointers.get(tensor.uid):
                raise ValueError(f"variant pack: no pointer for tensor {tensor.name}")
        if ENGINES[engine].workspace and not workspace:
            raise ValueError(f"{ENGINES[engine].name} needs {ENGINES[engine].workspace} bytes of workspace, "
                             f"got a null pointer")
        _stream_of(handle).enqueue(lambda: self._run(engine, knobs, pointers), f"cuDNN {c['op']}")

    def _run(self, engine, knobs, pointers):
        if ENGINES[engine].seconds:
            time.sleep(ENGINES[engine].seconds)
        c = self.conv
        a = self._image(c["a"], pointers)
        b = _read(c["b"], pointers[c["b"].uid])
        if ENGINES[engine].name == "tf32 tensor cores":
            a, b = _tf32(a), _tf32(b)
        pad, stride = c["pre"][0], c["stride"][0]
        out = c["out"]
        if c["op"] == "fprop":
            result = _fprop(a, b, pad, stride)
        elif c["op"] == "dgrad":
            result = _dgrad(a, b, pad, stride, out.dim)
        else:
            result = _wgrad(a, b, pad, stride, out.dim, knobs.get(knob_type.SPLIT_K_SLC, 1))
        if ENGINES[engine].reorders:
            result = _reordered_float32_sum(result)
        _write(out, pointers[out.uid], result)
        if self.stats is not None:
            stored = _read(out, pointers[out.uid])         # the statistics of the output as written
            _, total, squares = self.stats
            sums = ((total, stored.sum(axis=(0, 2, 3))), (squares, (stored * stored).sum(axis=(0, 2, 3))))
            if ENGINES[engine].stats_in_half:
                per_channel = stored.transpose(1, 0, 2, 3).reshape(stored.shape[1], -1).astype(np.float16)
                with np.errstate(over="ignore"):        # float16 sums of squares overflow: that is the fault
                    sums = ((total, np.cumsum(per_channel, axis=1, dtype=np.float16)[:, -1]),
                            (squares, np.cumsum(per_channel * per_channel, axis=1, dtype=np.float16)[:, -1]))
            for tensor, value in sums:
                value = np.asarray(value, dtype=np.float64)
                if ENGINES[engine].stats_accumulate:
                    value = value + _read(tensor, pointers[tensor.uid]).reshape(value.shape)
                _write(tensor, pointers[tensor.uid], value.reshape(tensor.dim))


# ------------------------------------------------------------------ memory through dims and strides

def _storage(tensor):
    dt = tensor.data_type
    if dt == data_type.FLOAT:
        return np.float32
    if dt == data_type.BFLOAT16:
        return np.uint16
    raise cudnnGraphNotSupportedError(f"the emulated Frontend has no {dt}")


def _view(tensor, pointer):
    storage = np.dtype(_storage(tensor))
    extent = 1 + sum((d - 1) * s for d, s in zip(tensor.dim, tensor.stride))
    element = ctypes.c_uint16 if storage == np.uint16 else ctypes.c_float
    flat = np.ctypeslib.as_array(ctypes.cast(pointer, ctypes.POINTER(element)), shape=(extent,))
    return np.lib.stride_tricks.as_strided(flat, shape=tensor.dim,
                                           strides=[s * storage.itemsize for s in tensor.stride])


def _read(tensor, pointer):
    raw = np.array(_view(tensor, pointer))
    if raw.dtype == np.uint16:                       # bfloat16 bits
        return (raw.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    return raw.astype(np.float64)


def _write(tensor, pointer, values):
    view = _view(tensor, pointer)
    values32 = values.astype(np.float32)
    if view.dtype == np.uint16:
        bits = values32.view(np.uint32)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        nan = np.isnan(values32)
        view[...] = np.where(nan, (bits >> 16) | 0x40, rounded).astype(np.uint16)
    else:
        view[...] = values32


def _tf32(values):
    """float32 inputs rounded to TF32 (10 mantissa bits, nearest even), as tensor cores read them."""
    bits = values.astype(np.float32).view(np.uint32)
    bits = (bits + 0xFFF + ((bits >> 13) & 1)) & 0xFFFFE000
    return bits.astype(np.uint32).view(np.float32).astype(np.float64)


def _reordered_float32_sum(values):
    """What atomics do to float32 sums: the last bits depend on the order, which changes on every run."""
    values32 = values.astype(np.float32)
    noise = np.random.default_rng().integers(-1, 2, size=values.shape)
    up, down = np.nextafter(values32, np.float32(np.inf)), np.nextafter(values32, np.float32(-np.inf))
    return np.where(noise > 0, up, np.where(noise < 0, down, values32)).astype(np.float64)


# ------------------------------------------------------------------ the convolutions (logical NCHW / KCRS)

def _windows(size_out, stride, offset):
    return slice(offset, offset + stride * (size_out - 1) + 1, stride)


def _fprop(x, w, pad, stride):
    n, _, h, wd = x.shape
    k, _, r, s = w.shape
    ho, wo = (h + 2 * pad - r) // stride + 1, (wd + 2 * pad - s) // stride + 1
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    y = np.zeros((n, ho, wo, k))
    for i in range(r):
        for j in range(s):
            window = xp[:, :, _windows(ho, stride, i), _windows(wo, stride, j)]
            y += np.tensordot(window, w[:, :, i, j], axes=([1], [1]))
    return y.transpose(0, 3, 1, 2)


def _dgrad(dy, w, pad, stride, dx_dims):
    n, c, h, wd = dx_dims
    _, _, r, s = w.shape
    _, _, ho, wo = dy.shape
    dxp = np.zeros((n, h + 2 * pad, wd + 2 * pad, c))
    for i in range(r):
        for j in range(s):
            dxp[:, _windows(ho, stride, i), _windows(wo, stride, j), :] += np.tensordot(dy, w[:, :, i, j],
                                                                                       axes=([1], [0]))
    return dxp[:, pad:pad + h, pad:pad + wd, :].transpose(0, 3, 1, 2)


def _wgrad(x, dy, pad, stride, dw_dims, slices=1):
    """slices > 1: split-K, the sum over the batch's positions cut into that many slices (by image), each
    partial sum rounded to float32 and the partials added in order in float32, as a split-K engine's
    deterministic reduction does (other last bits than one sum; the same on every run)."""
    k, c, r, s = dw_dims
    _, _, ho, wo = dy.shape
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    dw = np.zeros((k, c, r, s))
    bounds = np.linspace(0, dy.shape[0], slices + 1).astype(int)
    for i in range(r):
        for j in range(s):
            window = xp[:, :, _windows(ho, stride, i), _windows(wo, stride, j)]
            if slices == 1:
                dw[:, :, i, j] = np.tensordot(dy, window, axes=([0, 2, 3], [0, 2, 3]))
                continue
            partials = [np.tensordot(dy[lo:hi], window[lo:hi], axes=([0, 2, 3], [0, 2, 3])).astype(np.float32)
                        for lo, hi in zip(bounds[:-1], bounds[1:])]
            dw[:, :, i, j] = functools.reduce(np.add, partials)
    return dw
