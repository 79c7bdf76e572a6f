"""``fisherforget demo``: the built-in benchmark's pipeline (``--quick``) and the real-model path on
a tiny saved model. These check the pipeline and the metrics' ranges, not which method wins."""

import json
import os

import pytest

pytest.importorskip("transformers")

from fisherforget import cli, demo  # noqa: E402


@pytest.fixture(autouse=True)
def _restore_threads():
    """``fisherforget demo`` sets the torch thread count (``--threads``); put it back."""
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_world_splits_are_disjoint_and_conflicting():
    world = demo.build_world(120)
    groups = [world.learn_train, world.forget_only, world.learn_val, world.learn_test]
    assert sum(map(len, groups)) == 120
    assert len(set().union(*map(set, groups))) == 120
    assert all(a != b for a, b in zip(world.tables["R1"], world.tables["R3"]))
    x, y = world.facts("R3", world.learn_test[:3], table="R1")
    tok = demo.word_tokenizer(world.words)
    e = world.learn_test[0]
    assert x[0].tolist() == tok(f"e{e} R3 = v{world.tables['R1'][e]}")["input_ids"] + [
        tok.eos_token_id]
    assert (y[:, :4] == -100).all() and (y[:, 4:] == x[:, 4:]).all()


@pytest.mark.slow
def test_demo_quick_runs_and_prints_the_table(tmp_path, capsys):
    assert cli.main(["demo", "--quick", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "learning acc" in out and "forgetting acc" in out and "kept acc" in out
    for label in demo.METHOD_LABELS.values():
        assert label in out
    result = json.loads((tmp_path / "lwf_demo_quick.json").read_text())
    assert os.path.getsize(tmp_path / "lwf_demo_quick_curves.png") > 10_000
    assert set(result["summary"]) == set(demo.METHODS)
    for method, row in result["summary"].items():
        for metric in ("learn", "forget", "kept"):
            assert 0.0 <= row[metric]["mean"] <= 1.0, (method, metric)
        assert row["wall_s"]["mean"] > 0
    # the pre-training really learned the facts the benchmark is about
    assert all(v > 0.9 for v in result["pretraining"][0]["conflicted"].values())
    assert result["pretraining"][0]["clean"]["R3"] < 0.5  # R3 was never shown to it
    for method in ("lwf", "lwf_random", "lwf_lowest"):
        assert result["runs"][method][0]["lwf_phases"] > 0
        shares = result["runs"][method][0]["selected_relations"]
        assert set(shares) == {"R1", "R2", "R3"} and abs(sum(shares.values()) - 1) < 1e-9
    assert result["runs"]["lwf_early"][0]["lwf_phases"] == 1
    curve = result["runs"]["adamw"][0]["curve"]
    assert curve[0]["step"] == 0 and curve[-1]["step"] == result["settings"]["steps"]


def test_demo_on_a_saved_model_with_jsonl_files(tmp_path, capsys):
    """The --model/--learn/--forget path end to end, on a tiny model saved to disk."""
    world = demo.build_world(30)
    tokenizer = demo.word_tokenizer(world.words)
    model = demo.tiny_llama(len(world.words), seed=0)
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    with open(tmp_path / "learn.jsonl", "w") as f:
        for e in range(20):
            f.write(json.dumps({"prompt": f"e{e} R3 =", "response": f"v{world.tables['R1'][e]}"})
                    + "\n")
    with open(tmp_path / "forget.jsonl", "w") as f:
        for e in range(8):
            f.write(json.dumps({"prompt": f"e{e} R2 =", "response": f"v{world.tables['R2'][e]}"})
                    + "\n")
    code = cli.main(["demo", "--model", str(tmp_path / "model"), "--learn",
                     str(tmp_path / "learn.jsonl"), "--forget", str(tmp_path / "forget.jsonl"),
                     "--steps", "6", "--batch-size", "4", "--lr", "1e-3",
                     "--methods", "adamw,lwf,lwf_random", "--out", str(tmp_path / "out")])
    assert code == 0
    out = capsys.readouterr().out
    assert "FisherAdamW + LWF (top FC)" in out
    result = json.loads((tmp_path / "out" / "lwf_pretrained.json").read_text())
    for method in ("before", "adamw", "lwf", "lwf_random"):
        for task in ("learn", "forget"):
            metrics = result["results"][method][task]
            assert 0.0 <= metrics["accuracy"] <= 1.0 and metrics["loss"] > 0
    assert any("lwf/phase" in entry for entry in result["results"]["lwf"]["log"])
    assert result["sizes"]["learn"] == [12, 4, 4] and result["sizes"]["d_self"] == 8


def test_demo_argument_errors(tmp_path):
    with pytest.raises(SystemExit):
        cli.main(["demo", "--learn", "x.jsonl"])
    with pytest.raises(SystemExit):
        cli.main(["demo", "--model", "x"])
    with pytest.raises(SystemExit):
        cli.main(["demo", "--methods", "sgd"])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a"}\n')
    with pytest.raises(SystemExit, match="prompt' and 'response"):
        demo.read_jsonl(str(bad))
