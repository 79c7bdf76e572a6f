"""`python -m benchmarks --tiny` end to end: the JSON schema, every figure checked against its
definition, the markdown/plot/summary files, and failures and budgets recorded, never raised."""

import importlib.util
import json

import pytest
import torch

from fisherforget import backends
from benchmarks import cli as bench_cli
from benchmarks import report
from benchmarks import step as step_bench

WORKLOADS = "flat-1000,many-small-3x100"
ELEMENTS = {"flat-1000": 1000, "many-small-3x100": 300}
TENSORS = {"flat-1000": 1, "many-small-3x100": 3}

# Minimum bytes per element (docs/benchmarks.md), by benchmark / dtype / setting / variant.
STEP_BYTES = {
    ("fp32", "off"): 28, ("fp32", "fisher"): 36, ("fp32", "fisher+mask"): 37,
    ("bf16", "off"): 22, ("bf16", "fisher"): 30, ("bf16", "fisher+mask"): 31,
}
# torch keeps AdamW moments in the param dtype: bf16 moments for bf16 params.
TORCH_BF16_BYTES = {"off": 14, "fisher": 22, "fisher+mask": 23}
OPS_BYTES = {"fp32": 12, "bf16": 10}  # score: read d, g, F; estimate: read F, g, write F


def _expected_bytes(row):
    if row["benchmark"] != "step":
        return OPS_BYTES[row["dtype"]]
    if row["dtype"] == "bf16" and row["kind"] == "baseline":
        return TORCH_BF16_BYTES[row["setting"]]
    return STEP_BYTES[(row["dtype"], row["setting"])]


# Optimizer state bytes per parameter, excluding the 0-dim step/count scalars.
STATE_BYTES = {
    ("fp32", "off", "baseline"): 8, ("fp32", "off", "ours"): 8,
    ("fp32", "fisher", "baseline"): 12, ("fp32", "fisher", "ours"): 12,
    # composition: moments 8 + Fisher 4 + fp32 frozen weights 4 + snapshots of p, m, v 12
    ("fp32", "fisher+mask", "baseline"): 28, ("fp32", "fisher+mask", "ours"): 13,
    ("bf16", "off", "baseline"): 4, ("bf16", "off", "ours"): 8,
    ("bf16", "fisher", "baseline"): 8, ("bf16", "fisher", "ours"): 12,
    ("bf16", "fisher+mask", "baseline"): 16, ("bf16", "fisher+mask", "ours"): 13,
}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    threads = torch.get_num_threads()
    try:
        rc = bench_cli.main(["step", "score", "estimate", "--tiny", "--device", "cpu",
                       "--workloads", WORKLOADS, "--dtypes", "fp32,bf16", "--out", str(out),
                       "--time-budget", "300"])
    finally:
        torch.set_num_threads(threads)
    docs = {name: json.loads((out / f"{name}.json").read_text())
            for name in ("step", "score", "estimate")}
    return rc, out, docs


def test_run_succeeds_and_writes_every_file(tiny_run):
    rc, out, docs = tiny_run
    assert rc == 0
    for name in docs:
        assert (out / f"{name}.md").exists()
        artifacts = docs[name]["artifacts"]
        if importlib.util.find_spec("matplotlib") is not None:
            assert artifacts["plot"] == f"{name}.png" and (out / f"{name}.png").stat().st_size
        else:
            assert artifacts["plot"] is None and "matplotlib" in artifacts["plot_note"]
    summary = (out / "summary.txt").read_text()
    assert "[step]" in summary and "[score]" in summary and "[estimate]" in summary


def test_document_header(tiny_run):
    _, _, docs = tiny_run
    for name, doc in docs.items():
        assert doc["schema"] == report.SCHEMA and doc["benchmark"] == name and doc["complete"]
        env = doc["environment"]
        assert env["device"]["type"] == "cpu" and env["device"]["name"]
        assert env["versions"]["torch"] == torch.__version__
        assert "triton" in env["versions"] and "torch_cuda" in env["versions"]
        assert "commit" in env["git"] and "dirty" in env["git"]
        assert env["backends"] == backends.status()
        config = doc["config"]
        assert config["mode"] == "tiny" and config["device"] == "cpu"
        assert [w["name"] for w in config["workloads"]] == WORKLOADS.split(",")
        assert [d["name"] for d in config["dtypes"]] == ["fp32", "bf16"]
        copy = doc["copy_bandwidth"]
        assert copy["gbps"] == max(copy["start"]["gbps"], copy["end"]["gbps"]) > 0
        assert doc["wall_seconds"] > 0 and doc["finished_utc"]


def test_every_combination_has_exactly_one_row(tiny_run):
    _, _, docs = tiny_run
    for name, doc in docs.items():
        bench = bench_cli.BENCHMARKS[name]
        variants = bench.variants(torch.device("cpu"), False, False)
        expected = {(w, d, s, v.name) for w in ELEMENTS for d in ("fp32", "bf16")
                    for v in variants for s in v.settings}
        got = [(r["workload"], r["dtype"], r["setting"], r["variant"]) for r in doc["rows"]]
        assert sorted(got) == sorted(expected)


def test_measured_rows_figures_follow_their_definitions(tiny_run):
    _, _, docs = tiny_run
    for doc in docs.values():
        copy = doc["copy_bandwidth"]["gbps"]
        rows = [r for r in doc["rows"] if r["status"] == "ok"]
        assert rows
        for row in rows:
            assert row["num_elements"] == ELEMENTS[row["workload"]]
            assert row["num_tensors"] == TENSORS[row["workload"]]
            assert 0 < row["min_s"] <= row["median_s"] <= row["max_s"]
            assert row["repeats"] >= doc["config"]["timing"]["min_reps"]
            assert row["min_bytes_per_element"] == _expected_bytes(row), row["variant"]
            assert row["min_bytes_per_call"] == row["min_bytes_per_element"] * row["num_elements"]
            assert row["gbps"] == pytest.approx(row["min_bytes_per_call"] / row["median_s"] / 1e9)
            assert row["copy_fraction"] == pytest.approx(row["gbps"] / copy)
            assert row["peak_allocated_bytes"] is None  # CPU: no allocator statistics
            for key, value in row["speedup"].items():
                base_name, _, base_setting = key.partition(" [")
                base_setting = base_setting.rstrip("]") or "default"
                base = next(b for b in doc["rows"] if b["status"] == "ok"
                            and (b["workload"], b["dtype"], b["variant"], b["setting"])
                            == (row["workload"], row["dtype"], base_name, base_setting))
                assert value == pytest.approx(base["median_s"] / row["median_s"])


def test_step_speedups_cover_each_baseline(tiny_run):
    _, _, docs = tiny_run
    for row in docs["step"]["rows"]:
        if row["status"] != "ok" or row["kind"] != "ours":
            continue
        keys = set(row["speedup"])
        assert {"torch-adamw-fused [off]", "torch-adamw-foreach [off]"} <= keys
        if row["setting"] != "off":
            assert f"composition [{row['setting']}]" in keys
    for name in ("score", "estimate"):
        for row in docs[name]["rows"]:
            if row["status"] == "ok" and row["kind"] == "ours":
                assert set(row["speedup"]) == {"torch-plain" if name == "score"
                                               else "torch-foreach"}


def test_step_state_bytes_per_param(tiny_run):
    _, _, docs = tiny_run
    for row in docs["step"]["rows"]:
        if row["status"] != "ok":
            continue
        scalars = sum(v for k, v in row["state_breakdown_bytes_per_param"].items()
                      if k in ("step", "fisher_count"))
        want = STATE_BYTES[(row["dtype"], row["setting"], row["kind"])]
        assert row["state_bytes_per_param"] - scalars == pytest.approx(want), row["variant"]
        if row["kind"] == "ours" and row["setting"] == "fisher+mask":
            assert row["state_breakdown_bytes_per_param"]["mask"] == 1


def test_unavailable_backends_are_skipped_with_their_reason(tiny_run):
    _, _, docs = tiny_run
    for doc in docs.values():
        for row in doc["rows"]:
            if row["status"] == "skipped":
                assert row["reason"]
                backend = row["backend"]
                if backend is not None and not backends.is_available(backend):
                    assert backends.unavailable_reason(backend) in row["reason"]
            else:
                assert row["status"] == "ok", row
        # The reference backend always runs, on CPU in the main pass.
        assert any(r["variant"] == "fisherforget-reference" and r["status"] == "ok"
                   for r in doc["rows"])


def test_markdown_lists_measured_rows_and_reasons(tiny_run):
    _, out, docs = tiny_run
    text = (out / "step.md").read_text()
    assert "| workload | dtype | setting | variant | median ms | GB/s | % of copy |" in text
    assert "**CPU figures**" in text
    for row in docs["step"]["rows"]:
        if row["status"] == "skipped":
            assert row["reason"] in text


def test_from_json_redoes_tables_and_summary(tiny_run, capsys):
    _, out, _ = tiny_run
    (out / "summary.txt").unlink()
    (out / "score.md").unlink()
    assert bench_cli.main(["--from-json", str(out)]) == 0
    assert (out / "score.md").exists() and (out / "summary.txt").exists()
    assert "[estimate]" in capsys.readouterr().out


def test_failing_variant_is_recorded_and_the_rest_still_run(tmp_path, monkeypatch):
    original = step_bench.StepBenchmark.build

    def build(self, variant, *args, **kwargs):
        if variant.name == "composition":
            raise RuntimeError("synthetic failure")
        return original(self, variant, *args, **kwargs)

    monkeypatch.setattr(step_bench.StepBenchmark, "build", build)
    rc = bench_cli.main(["step", "--tiny", "--device", "cpu", "--workloads", "flat-100",
                         "--dtypes", "fp32", "--settings", "fisher", "--out", str(tmp_path)])
    assert rc == 1
    rows = json.loads((tmp_path / "step.json").read_text())["rows"]
    failed = [r for r in rows if r["status"] == "failed"]
    assert [r["variant"] for r in failed] == ["composition"]
    assert failed[0]["reason"] == "RuntimeError: synthetic failure"
    assert any(r["variant"] == "fisherforget-reference" and r["status"] == "ok" for r in rows)


def test_spent_budget_skips_rows_but_completes_the_files(tmp_path):
    rc = bench_cli.main(["estimate", "--tiny", "--device", "cpu", "--workloads", "flat-100",
                         "--dtypes", "fp32", "--out", str(tmp_path), "--time-budget", "0"])
    assert rc == 0
    doc = json.loads((tmp_path / "estimate.json").read_text())
    assert doc["complete"]
    assert {r["status"] for r in doc["rows"]} == {"skipped"}
    assert any("time budget" in r["reason"] for r in doc["rows"])


@pytest.mark.parametrize("argv, message", [
    (["nonsense"], "unknown benchmark"),
    (["step", "--dtypes", "fp8"], "--dtypes: unknown"),
    (["step", "--settings", "sometimes"], "--settings: unknown"),
])
def test_bad_arguments_say_what_is_wrong(argv, message, tmp_path):
    with pytest.raises(SystemExit, match=message):
        bench_cli.main(argv + ["--tiny", "--device", "cpu", "--workloads", "flat-10",
                               "--out", str(tmp_path)])
