"""``fisherforget demo``: the worlds, the statistics against direct formulas, the quick run's exact
reproduction of its committed result, and the real-model path on a tiny saved model."""

import json
import math
import os
import random

import pytest

pytest.importorskip("transformers")

import torch  # noqa: E402

from fisherforget import cli, demo  # noqa: E402
from fisherforget.demo import report, train  # noqa: E402
from fisherforget.demo.pretrained import read_jsonl  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMITTED_QUICK = os.path.join(ROOT, "benchmarks", "results", "lwf_demo_quick.json")


@pytest.fixture(autouse=True)
def _restore_threads():
    """``fisherforget demo`` sets the torch thread count (``--threads``); put it back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_conflict_world_splits_are_disjoint_and_conflicting():
    world = demo.conflict_world(480)
    groups = [world.learn_train, world.self_entities, world.learn_val, world.learn_test]
    assert [len(g) for g in groups] == [192, 128, 64, 96]
    assert len(set().union(*map(set, groups))) == 480
    assert all(a != b for a, b in zip(world.tables["R1"], world.tables["R3"]))
    x, y = world.learn_data(world.learn_test[:3])
    tok = demo.word_tokenizer(world.words)
    e = world.learn_test[0]
    assert x[0].tolist() == tok(f"e{e} R3 = v{world.tables['R1'][e]}")["input_ids"] + [
        tok.eos_token_id]
    assert (y[:, :4] == -100).all() and (y[:, 4:] == x[:, 4:]).all()
    assert set(world.outside_self) == set(range(480)) - set(world.self_entities)


def test_rule_world_composes_its_rules():
    world = demo.rule_world(256, 32)
    assert len(world.learn_train) == 128 and len(world.learn_val) + len(world.learn_test) == 128
    assert not set(world.self_entities) & set(world.learn_val + world.learn_test)
    k0, k1 = world.tables["K0"], world.tables["K1"]
    for rel, source in [("F0", k1), ("F5", k1), ("L0", k0), ("L1", k0)]:
        mapping = {}
        for e in range(256):  # F_i = pi_i(K1), L_j = sigma_j(K0): a function of the source value
            assert mapping.setdefault(source[e], world.tables[rel][e]) == world.tables[rel][e]
        assert len(set(mapping.values())) == len(mapping)  # a permutation: injective
    assert world.forget_relations == [f"F{i}" for i in range(6)]


def test_paired_interval_and_t_quantiles():
    assert report.t975(1) == 12.706 and report.t975(15) == 2.131
    assert abs(report.t975(60) - 2.000) < 1e-3 and abs(report.t975(120) - 1.980) < 1e-3
    rng = random.Random(0)
    a = [rng.random() for _ in range(16)]
    b = [x - 0.1 + 0.05 * rng.random() for x in a]
    got = report.paired(a, b)
    diffs = [x - y for x, y in zip(a, b)]
    mean = sum(diffs) / 16
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / 15)
    assert got["mean"] == pytest.approx(mean)
    assert got["ci_high"] - got["mean"] == pytest.approx(2.131 * sd / 4)
    assert got["n_seeds"] == 16 and got["ci_low"] > 0  # a clear positive shift is resolved


def test_auroc_and_selection_quality_by_brute_force():
    gen = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 5, (30,), generator=gen).double()  # ties included
    positive = torch.rand(30, generator=gen) < 0.4
    pairs = [(1.0 if p > n else 0.5 if p == n else 0.0)
             for p in scores[positive].tolist() for n in scores[~positive].tolist()]
    assert train.auroc(scores, positive) == pytest.approx(sum(pairs) / len(pairs))

    class Scores:  # the ForgettingScores surface selection_quality uses
        eta = 1.0

        def term(self, name):
            return torch.ones(30, dtype=torch.float64) if name == "direction" else \
                torch.zeros(30, dtype=torch.float64)

        def ranking(self, kind):
            return scores if kind == "loss_change" else -scores

    relations = ["F" if p else "K" for p in positive.tolist()]
    got = train.selection_quality(Scores(), relations, ["F"], k=5)
    top = torch.sort(scores, descending=True, stable=True).indices[:5]
    assert got["loss_change"]["precision_top"] == pytest.approx(
        float(positive[top].double().mean()))
    assert got["fisher_alignment"]["auroc"] == pytest.approx(1 - got["loss_change"]["auroc"])
    assert got["quadratic_over_linear_max"] == 0.0


def _same_environment(committed):
    # The CPU's name alone ("AMD EPYC") covers several generations whose kernels (AVX2, AVX-512)
    # round differently: the instruction set torch dispatches to must match too.
    env = committed["environment"]
    here = (report.cpu_model(), torch.backends.cpu.get_cpu_capability(), torch.__version__, 1)
    there = (env["cpu"], env.get("cpu_capability", "not recorded"), env["torch"],
             env["torch_threads"])
    return here == there, f"committed on {there}, this machine is {here}"


def test_quick_demo_reproduces_its_committed_result(tmp_path, capsys):
    """The quick demo, run again, gives the committed numbers exactly (same CPU model, torch and
    one thread; FisherAdamW on the reference backend), and its output has the protocol's parts."""
    with open(COMMITTED_QUICK) as f:
        committed = json.load(f)
    same, why = _same_environment(committed)
    assert cli.main(["demo", "--quick", "--out", str(tmp_path), "--cache", "none"]) == 0
    out = capsys.readouterr().out
    assert "paired difference vs adamw" in out and "selection quality" in out
    result = json.loads((tmp_path / "lwf_demo_quick.json").read_text())
    assert not list(tmp_path.glob(".partial_*"))  # a finished run leaves no partial file
    assert os.path.getsize(tmp_path / "lwf_demo_quick.png") > 10_000
    setting = result["settings"]["conflict"]
    assert set(setting["runs"]) == set(result["methods"])
    keys = {(p["setting"], p["method"], p["baseline"], p["metric"]) for p in result["paired"]}
    assert keys == {("conflict", m, "adamw", metric) for m in result["methods"] if m != "adamw"
                    for metric in ("learn", "kept", "kept_outside")}
    for p in result["paired"]:
        run = {r["seed"]: r["final"][p["metric"]] for r in setting["runs"][p["method"]]}
        base = {r["seed"]: r["final"][p["metric"]] for r in setting["runs"]["adamw"]}
        assert p["mean"] == pytest.approx(sum(run[s] - base[s] for s in run) / len(run))
    assert setting["chosen_lr"]["adamw"] in setting["setting"]["lrs"]
    assert all(r["split"] == "test" for runs in setting["runs"].values() for r in runs)
    assert setting["tuning"]["seeds"] == [100] and setting["seeds"] == [0]
    if not same:
        pytest.skip(f"exact reproduction needs the machine that wrote the file: {why}")
    old = committed["settings"]["conflict"]
    assert setting["tuning"]["validation"] == old["tuning"]["validation"]
    for method, runs in old["runs"].items():
        assert [r["final"] for r in setting["runs"][method]] == [r["final"] for r in runs], method


def _benchmark_script(name: str):
    """A script of the checkout's benchmarks/ folder, loaded by path (not an installed module)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "benchmarks",
                                                                     f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_demo_on_a_saved_model_with_jsonl_files(tmp_path, capsys, monkeypatch):
    """The --model/--learn/--forget/--kept protocol end to end on a tiny saved model, resumed
    from its state file. The kept questions' judge is replaced by one that calls every other
    question right before fine-tuning and counts the calls (a random tiny model answers
    nothing right); tests/lwf/test_real_model.py checks the real judge on SmolLM2."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from fisherforget.demo import pretrained

    judged = []

    def judge(model, tokenizer, pairs, chat_template, max_new_tokens):
        judged.append(len(pairs))
        return [i % 2 == 0 for i in range(len(pairs))]

    monkeypatch.setattr(pretrained, "kept_correct", judge)

    world = demo.conflict_world(30)
    tokenizer = demo.word_tokenizer(world.words)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(world.words), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16,
        bos_token_id=1, eos_token_id=2, pad_token_id=0))
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
    argv = ["demo", "--model", str(tmp_path / "model"), "--learn", str(tmp_path / "learn.jsonl"),
            "--forget", str(tmp_path / "forget.jsonl"), "--steps", "6", "--batch-size", "4",
            "--lrs", "1e-3,3e-3", "--seeds", "2", "--methods", "adamw,lwf,lwf_random",
            "--kept", str(tmp_path / "forget.jsonl"), "--kept-size", "3",
            "--state", str(tmp_path / "state.json"),
            "--out", str(tmp_path / "out")]
    assert cli.main(argv) == 0
    result = json.loads((tmp_path / "out" / "lwf_pretrained.json").read_text())
    assert len(result["runs"]) == 3 * 2 + 3 * 2  # tuning: 3 methods x 2 lrs; test: 3 x 2 seeds
    for run in result["runs"].values():
        for task in ("learn", "forget"):
            assert 0.0 <= run[task]["accuracy"] <= 1.0 and run[task]["loss"] > 0
        assert run["kept"]["accuracy"] == pytest.approx(2 / 3)  # the judge's pattern on 3
    lwf_runs = [r for r in result["runs"].values() if r["method"].startswith("lwf")]
    assert all(any("lwf/retain_loss" in h for h in r["lwf"]) for r in lwf_runs)
    assert result["sizes"] == {"learn": [12, 4, 4], "forget": 8, "d_self": 8, "kept": 3,
                               "kept_asked": 8}
    # 8 asked once; 3 kept, judged for "before" (test and validation) and after every run.
    assert judged == [8] + [3] * (2 + len(result["runs"]))
    assert [(p["method"], p["metric"]) for p in result["paired"]] == [
        (m, k) for m in ("lwf", "lwf_random") for k in ("learn", "forget", "forget_loss", "kept")]
    adamw = [r["learn"]["accuracy"] for k, r in result["runs"].items() if k.startswith("test/adamw")]
    assert result["baseline_test_learn"] == pytest.approx(sum(adamw) / len(adamw))
    assert result["run_started"]["commit"] == result["environment"]["commit"]
    table = _benchmark_script("lwf_tables").tables(str(tmp_path / "out" / "lwf_pretrained.json"))
    row = next(line for line in table.splitlines() if line.startswith("| random selection"))
    p = next(p for p in result["paired"] if (p["method"], p["metric"]) == ("lwf_random", "kept"))
    assert f"{p['mean']:+.3f} [{p['ci_low']:+.3f}, {p['ci_high']:+.3f}] |" in row
    capsys.readouterr()
    assert cli.main(argv) == 0  # everything finished: the rerun only reads the state file
    assert "s + eval " not in capsys.readouterr().out


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
        read_jsonl(str(bad))


def test_real_model_benchmark_data_and_state_merge(tmp_path):
    """benchmarks/lwf_real.py: the three task files from the packaged data, and the merge of
    two partial runs' state files."""
    pytest.importorskip("countryinfo")
    pytest.importorskip("simple_icd_10_cm")
    lwf_real = _benchmark_script("lwf_real")
    paths = lwf_real.write_tasks(str(tmp_path), "demonym")
    learn, forget, kept = (read_jsonl(paths[k]) for k in ("learn", "forget", "kept"))
    assert len(learn) == len(kept) > 200
    assert {"prompt": "What is the demonym of Kenya? Answer with one word.",
            "response": "Kenyan"} in learn
    assert {"prompt": "What is the capital of Kenya?", "response": "Nairobi"} in kept
    assert len(forget) > 200
    assert all(p["prompt"].startswith("What condition does ICD-10-CM code K") for p in forget)
    assert {"prompt": "What condition does ICD-10-CM code K02.52 denote?",
            "response": "Dental caries on pit and fissure surface penetrating into dentin"} \
        in forget

    run = lambda acc: {"learn": {"accuracy": acc}, "forget": {"accuracy": 0.0}}  # noqa: E731
    a, b, into = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "merged.json"
    a.write_text(json.dumps({"started": {"commit": "x"}, "runs": {"k1": run(0.5), "k2": run(1)}}))
    b.write_text(json.dumps({"started": {"commit": "y"}, "runs": {"k1": run(0.5), "k3": run(0)}}))
    lwf_real.merge_states([str(a), str(b)], str(into))
    merged = json.loads(into.read_text())
    assert sorted(merged["runs"]) == ["k1", "k2", "k3"] and merged["started"] == {"commit": "x"}
    b.write_text(json.dumps({"runs": {"k1": run(0.25)}}))
    with pytest.raises(SystemExit, match="k1 differs"):
        lwf_real.merge_states([str(a), str(b)], str(tmp_path / "bad.json"))

    # Shards: adamw in each, the other methods dealt out; every shard starts from the union.
    assert lwf_real.shard_methods(["adamw", "lwf", "lwf_no_retain", "retain_only", "lwf_random"],
                                  2) == [["adamw", "lwf", "retain_only"],
                                         ["adamw", "lwf_no_retain", "lwf_random"]]
    assert lwf_real.shard_methods(["adamw", "lwf"], 3) == [["adamw", "lwf"]]
    main = tmp_path / "state.json"
    shards = lwf_real.shard_states(str(main), 2)
    assert shards == [str(tmp_path / "state_a.json"), str(tmp_path / "state_b.json")]
    b.write_text(json.dumps({"runs": {"k3": run(0)}}))
    os.replace(a, shards[0])
    lwf_real.seed_shards(str(main), shards)  # shard b has no file yet
    for path in [str(main)] + shards:
        assert sorted(json.loads(open(path).read())["runs"]) == ["k1", "k2"]


@pytest.mark.parametrize("method, name, value", [
    ("lwf", "scores", "loss_change"), ("lwf_fc", "scores", "fc"),
    ("lwf_overlap", "scores", "fisher_overlap"), ("lwf_no_retain", "retain", None),
    ("retain_only", "ascent", False)])
def test_each_builtin_lwf_method_runs_lwf_with_its_option(method, name, value, monkeypatch):
    """Every LWF variant of the built-in demo fine-tunes through LearningWithForgetting with the
    option that defines it, on the backend a user gets (a short run from random weights)."""
    import dataclasses

    import fisherforget.lwf as lwf_module
    from fisherforget.demo.builtin import QUICK, make_world

    configs = []
    original = lwf_module.LearningWithForgetting.__init__

    def spy(self, model, optimizer, samples, config=None, **kwargs):
        configs.append((config, optimizer))
        original(self, model, optimizer, samples, config, **kwargs)

    monkeypatch.setattr(lwf_module.LearningWithForgetting, "__init__", spy)
    setting = dataclasses.replace(QUICK, steps=4, eval_every=4,
                                  lwf=dict(QUICK.lwf, every=2, warmup=2, rescore_every=2))
    bench = train.Bench(setting, make_world(setting), "cpu", cache=None)
    bench.init_weights(0)
    pre = {"state": {k: v.clone() for k, v in bench.model.state_dict().items()}}
    d_self, relations = bench.self_knowledge(pre, 0)
    result = bench.finetune(method, pre, d_self, relations, 0, 1e-3, "val")
    (config, optimizer), = configs
    assert getattr(config, name) == value and result["lwf_phases"] == 2
    assert optimizer.param_groups[0]["backend"] == "auto"


def test_real_model_benchmark_shards_run_as_child_processes(tmp_path, monkeypatch):
    """--shards N starts N copies of the script, one per method share and state file, with the
    other options unchanged, and merges what they finished."""
    lwf_real = _benchmark_script("lwf_real")
    started = []

    class Child:
        def __init__(self, command, stdout, stderr):
            started.append(command)
            state = command[command.index("--state") + 1]
            method = command[command.index("--methods") + 1].split(",")[-1]
            with open(state) as f:
                runs = json.load(f)["runs"]
            runs[f"tune/{method}/0.001/100"] = {"learn": {"accuracy": 0.5},
                                                "forget": {"accuracy": 0.0}}
            with open(state, "w") as f:
                json.dump({"runs": runs}, f)

        def wait(self):
            return 0

    monkeypatch.setattr(lwf_real.subprocess, "Popen", Child)
    state = tmp_path / "s.json"
    argv = ["--shards", "2", "--steps", "3", "--methods", "adamw,lwf,lwf_random",
            "--state", str(state)]
    parser_args = type("Args", (), {"shards": 2, "task": "demonym", "state": str(state)})
    extra = ["--steps", "3", "--methods", "adamw,lwf,lwf_random"]
    assert lwf_real.run_shards(argv, parser_args, extra) == 0
    assert [c[c.index("--methods") + 1] for c in started] == ["adamw,lwf", "adamw,lwf_random"]
    assert all(c[-2:] == ["--steps", "3"] and c.count("--methods") == 1 for c in started)
    merged = json.loads(state.read_text())["runs"]
    assert sorted(merged) == ["tune/lwf/0.001/100", "tune/lwf_random/0.001/100"]


@pytest.mark.parametrize("name, metrics", [("lwf_demo.json", ("learn", "kept_outside")),
                                           ("lwf_real.json", ("learn", "kept"))])
def test_readme_quotes_the_committed_lwf_results(name, metrics):
    """Every paired difference the README's LWF tables show is the committed result file's, to
    the digit (a regenerated file must be quoted again)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "benchmarks", "results", name)) as f:
        result = json.load(f)
    with open(os.path.join(root, "README.md")) as f:
        readme = f.read()
    paired = result["paired"] if "paired" in result else [
        p for setting in result["settings"].values() for p in setting["paired"]]
    quoted = [p for p in paired if p["metric"] in metrics]
    assert quoted
    for p in quoted:
        interval = f"{p['mean']:+.3f} [{p['ci_low']:+.3f}, {p['ci_high']:+.3f}]"
        assert interval in readme, (p["method"], p["metric"], interval)
