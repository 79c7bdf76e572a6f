"""Workload shape sets: the Llama lists agree with transformers, names parse, errors are clear."""

import pytest

from benchmarks import workloads


@pytest.mark.parametrize("name", ["llama-tiny", "llama-125m", "llama-1b"])
def test_llama_shape_list_matches_a_meta_device_transformers_model(name):
    pytest.importorskip("transformers")
    config = workloads.LLAMA_CONFIGS[name]
    assert workloads.llama_shapes(config) == workloads.llama_shapes_from_transformers(config)


def test_llama_sizes_are_the_named_models():
    # TinyLlama-1.1B and SmolLM-135M parameter counts from their model cards.
    assert workloads.get_workload("llama-1b").num_elements == 1_100_048_384
    assert workloads.get_workload("llama-125m").num_elements == 134_515_008


def test_transformers_source_is_recorded():
    pytest.importorskip("transformers")
    w = workloads.get_workload("llama-tiny", shapes_from="transformers")
    assert w.source == "transformers LlamaForCausalLM on the meta device"
    assert w.shapes == workloads.get_workload("llama-tiny").shapes


@pytest.mark.parametrize("name, count, numel", [
    ("flat-2^28", 1, 2**28),
    ("flat-1000", 1, 1000),
    ("many-small-2000x4096", 2000, 2000 * 4096),
    ("many-small-3x7", 3, 21),
])
def test_synthetic_workload_names(name, count, numel):
    w = workloads.get_workload(name)
    assert (w.num_tensors, w.num_elements) == (count, numel)
    assert w.to_json()["num_elements"] == numel


@pytest.mark.parametrize("name, message", [
    ("llama-7b", "unknown workload 'llama-7b'"),
    ("flat-abc", "cannot read an element count from 'abc'"),
    ("flat-0", "cannot read an element count"),
    ("many-small-0x10", "counts must be positive"),
])
def test_bad_workload_names_are_rejected_clearly(name, message):
    with pytest.raises(ValueError, match=message):
        workloads.get_workload(name)


def test_bad_shape_source_is_rejected():
    with pytest.raises(ValueError, match="shapes_from must be 'list' or 'transformers'"):
        workloads.get_workload("llama-tiny", shapes_from="hub")


def test_tiny_counterparts_keep_the_kind():
    assert workloads.tiny_counterpart("llama-1b") == "llama-tiny"
    assert workloads.tiny_counterpart("flat-2^28") == "flat-2^12"
    assert workloads.tiny_counterpart("many-small-2000x4096") == "many-small-16x256"
    for name in workloads.TINY_WORKLOADS:
        assert workloads.get_workload(name).num_elements <= workloads.TINY_MAX_ELEMENTS
        assert workloads.tiny_counterpart(name) == name


def test_dtype_configs():
    import torch

    assert workloads.DTYPE_CONFIGS["bf16"].param_dtype == torch.bfloat16
    assert workloads.DTYPE_CONFIGS["bf16"].state_dtype == torch.float32
    assert workloads.DTYPE_CONFIGS["fp32"].to_json() == {
        "name": "fp32", "param_dtype": "float32", "state_dtype": "float32",
        "fisher_dtype": "float32"}
