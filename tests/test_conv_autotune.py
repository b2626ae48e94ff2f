"""CPU tests of the autotuner's choice of split-K settings (cupynet/backends/conv_autotune.py).

`split_k_engines` only reads an operation graph's engines and their knobs, so a stand-in for the cuDNN
Frontend's graph (the external library, not our code) is enough to check which engines and slices it
offers: the heuristics' engines first, powers of two from 2 to 64 that the knob takes; `spread` shares
them out. (Which of those build, under the notes, is tested on the emulated GPU.) Old checkpoints'
choices are adopted with split-K off; what is not a choice is left out.
"""
from types import SimpleNamespace

import pytest

from cupynet.backends import conv_autotune
from cupynet.backends.conv_autotune import Candidate, engine_ids, split_k_engines, spread

SPLIT, OTHER = "SPLIT_K_SLC", "TILEK"


class Graph:
    """An operation graph whose engine i exposes knobs[i] (None: the engine refuses this graph)."""

    def __init__(self, knobs, names=()):
        self.knobs, self.names = knobs, list(names)

    def get_engine_count(self):
        return len(self.knobs)

    def get_knobs_for_engine(self, engine):
        if self.knobs[engine] is None:
            raise RuntimeError(f"Failed to get knobs for engine: {engine}")
        return self.knobs[engine]

    def get_plan_name_at_index(self, index):
        return self.names[index]


def knob(kind, low, high, stride=1):
    return SimpleNamespace(type=kind, min_value=low, max_value=high, stride=stride)


def test_engines_with_the_split_knob_and_the_powers_of_two_it_takes_up_to_64():
    graph = Graph([[knob(OTHER, 0, 4)], [knob(SPLIT, 1, 20)], None, [knob(SPLIT, 0, 1 << 20, 4), knob(OTHER, 1, 2)],
                   [knob(SPLIT, 1, 1)]])
    assert split_k_engines(graph, SPLIT, [], (RuntimeError,)) == [(1, [2, 4, 8, 16]), (3, [4, 8, 16, 32, 64])]


def test_the_heuristics_engines_come_first_then_by_id():
    graph = Graph([[knob(SPLIT, 1, 4)], [knob(SPLIT, 1, 4)], [knob(SPLIT, 1, 4)], [knob(SPLIT, 1, 4)]])
    assert [engine for engine, _ in split_k_engines(graph, SPLIT, [2, 7, 0], (RuntimeError,))] == [2, 0, 1, 3]


def test_an_engine_refusing_the_graph_is_skipped_but_other_errors_are_not_hidden():
    assert split_k_engines(Graph([None, [knob(SPLIT, 2, 2)]]), SPLIT, [], (RuntimeError,)) == [(1, [2])]
    with pytest.raises(RuntimeError):
        split_k_engines(Graph([None]), SPLIT, [], (ValueError,))


@pytest.mark.parametrize("count,picked", [(8, [2, 4, 8, 16, 32, 64]), (6, [2, 4, 8, 16, 32, 64]), (4, [2, 8, 16, 64]),
                                          (2, [2, 64]), (1, [16])])
def test_a_share_is_spread_over_the_values_both_ends_included(count, picked):
    assert spread([2, 4, 8, 16, 32, 64], count) == picked


def test_engine_ids_come_from_plan_names_in_order_without_repeats():
    graph = Graph([], names=["eng12_k2=1_k3=0", "eng0_k2=4", "eng12_k2=2", "unnamed"])
    candidates = [Candidate(index, graph, (), index, 0) for index in range(4)]
    assert engine_ids(candidate.name for candidate in candidates) == [12, 0]


def test_choices_saved_before_the_key_said_split_k_or_tune_in_graph_are_adopted_with_them_off(monkeypatch):
    """A checkpoint written before split-K settings existed has 14-element keys, one written before engines
    could be timed in a graph 15-element keys; they are the same convolutions with those switches off, so a
    resume on the same GPU and cuDNN still adopts its engines."""
    environment = {"gpu": "H100", "cudnn": 91900}
    monkeypatch.setattr(conv_autotune, "_environment", lambda device_id: environment)
    conv_autotune.forget_choices()
    oldest = ["wgrad", 128, 16, 32, 32, 16, 3, 3, 1, 1, "NHWC", "bfloat16", False, True]
    old = ["wgrad", 128, 16, 32, 32, 16, 3, 3, 1, 1, "NHWC", "bfloat16", False, True, True]
    new = ["fprop", 128, 16, 32, 32, 16, 3, 3, 1, 1, "NHWC", "bfloat16", False, True, False, True]
    assert conv_autotune.import_choices({"environment": environment,
                                         "choices": [[oldest, 3], [old, ["split_k", 7, 16]], [new, 2]]}, 0) == 3
    assert conv_autotune.export_choices(0)["choices"] == [[new, 2], [oldest + [False, False], 3],
                                                          [old + [False], ["split_k", 7, 16]]]
    assert conv_autotune._CHOICES[(0, tuple(old + [False]))] == ("split_k", 7, 16)
    conv_autotune.forget_choices()


def test_saved_entries_that_are_not_choices_are_left_out(monkeypatch):
    """A checkpoint's metadata edited or damaged by hand: what is not a plan index or a split-K setting is
    not adopted (that convolution is timed again) and the rest still is."""
    environment = {"gpu": "H100", "cudnn": 91900}
    monkeypatch.setattr(conv_autotune, "_environment", lambda device_id: environment)
    conv_autotune.forget_choices()
    key = ["fprop", 128, 16, 32, 32, 16, 3, 3, 1, 1, "NHWC", "bfloat16", False, True, False, False]
    entries = [[key, "3"], [key, ["split_k", 7]], [key, ["split_k", "7", 16]], [key, 2.0], [key], 5,
               [key, ["split_k", 7, 16]]]
    assert conv_autotune.import_choices({"environment": environment, "choices": entries}, 0) == 1
    assert conv_autotune._CHOICES == {(0, tuple(key)): ("split_k", 7, 16)}
    conv_autotune.forget_choices()
