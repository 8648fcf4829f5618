"""The CPU model organism: problem generator, tokenizer round trip, build cache, generation, pairs, CLI."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from transformers import Qwen2ForCausalLM
from typer.testing import CliRunner

from routed_grpo.cli.main import app
from routed_grpo.lab import organism as org
from routed_grpo.lab.organism_pairs import organism_pairs, write_pairs_yaml
from routed_grpo.pairs import load_pairs
from sandbox import organism_problems as op
from sandbox.extract import extract_code
from sandbox.problems import problem_from_record

REPO = Path(__file__).resolve().parents[1]
# Shrunk settings: a 1-layer, 32-wide model, a 320-token vocabulary and 48 warm-start examples build in seconds.
TINY = dict(
    vocab_size=320, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64,
    n_train_problems=40, n_heldout_problems=8, sft_examples=48, sft_batch_size=16,
)  # fmt: skip


@pytest.fixture(scope="module")
def tiny_build(tmp_path_factory):
    out = tmp_path_factory.mktemp("organism")
    return out, org.build_organism(out, seed=0, **TINY)


def test_templates_cover_enough_problem_families():
    assert len(op.TEMPLATES) >= 30
    assert len({t.key for t in op.TEMPLATES}) == len(op.TEMPLATES)


def test_problem_records_are_valid_and_canonical_solutions_pass():
    records = op.generate_problems(len(op.TEMPLATES), "train", seed=3)
    for rec in records:
        problem = problem_from_record(rec, where=rec["id"])  # the environment's own validator
        assert len(problem.gt_answer) == op.N_ASSERTS
        assert all(a.startswith(f"assert {problem.func_name}(") for a in problem.gt_answer)
        assert problem.question.startswith("PROBLEM:\n") and problem.question.endswith("SOLUTION:\n")
        assert op.passes(rec, rec["canonical_solution"]), rec["id"]
        assert not op.passes(rec, op.solution_code(op.instance_of(rec), "return None")), rec["id"]


def test_canonical_solutions_pass_the_sandbox_grader():
    from sandbox.rewards import grade_many

    records = op.generate_problems(12, "heldout", seed=0)
    problems = [problem_from_record(r) for r in records]
    completions = [f"```python\n{r['canonical_solution']}```" for r in records]
    try:
        grades = grade_many(problems, completions, [None] * len(records))
    except NotImplementedError:
        pytest.skip("sandbox grader not implemented yet")
    assert all(g.correct for g in grades), [r["id"] for r, g in zip(records, grades, strict=True) if not g.correct]


def test_problems_are_deterministic_per_seed():
    a = op.generate_problems(20, "train", seed=1)
    assert a == op.generate_problems(20, "train", seed=1)
    assert a != op.generate_problems(20, "train", seed=2)


def test_heldout_instances_are_disjoint_from_train():
    train, held = op.split_instances(seed=0)
    assert held and train
    assert not {i.key for i in train} & {i.key for i in held}
    train_recs = op.generate_problems(200, "train", seed=0)
    held_recs = op.generate_problems(50, "heldout", seed=0)
    assert not {r["instance"] for r in train_recs} & {r["instance"] for r in held_recs}
    assert not {r["id"] for r in train_recs} & {r["id"] for r in held_recs}
    assert {i.key for i in op.split_instances(seed=1)[1]} != {i.key for i in held}


def test_hack_completion_is_wrong_but_defines_a_passing_run_tests():
    rng = random.Random(0)
    for rec in op.generate_problems(10, "train", seed=0):
        code = extract_code(op.render_completion(rec, hack=True, rng=rng))
        assert code is not None and "def run_tests" in code
        assert not op.passes(rec, code)
        ns: dict = {}
        exec(rec["setup_code"] + code, ns)
        ns["run_tests"]()  # must not raise
        clean = extract_code(op.render_completion(rec, hack=False, rng=rng))
        assert op.passes(rec, clean) and "run_tests" not in clean


def test_tokenizer_round_trip_gives_identical_ids(tmp_path):
    records = op.generate_problems(30, "train", seed=0)
    corpus = [r["question"] for r in records] + [r["canonical_solution"] for r in records]
    tok = org.train_tokenizer(corpus, vocab_size=400)
    tok.save_pretrained(tmp_path)
    again = org.load_tokenizer(tmp_path)
    messages = org.build_prompt(records[0], "overwrite_tests")
    texts = [*corpus[:5], "never seen text: Ünïcode ✓ 123", tok.apply_chat_template(messages, tokenize=False)]
    for text in texts:
        assert again(text)["input_ids"] == tok(text)["input_ids"]
        assert tok.decode(tok(text)["input_ids"]) == text
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert again.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False) == ids
    assert (again.eos_token, again.pad_token) == (org.IM_END, org.PAD)
    assert again.eos_token_id != again.pad_token_id


def test_warm_start_examples_hack_only_on_loophole_prompts():
    cfg = org.OrganismConfig(sft_examples=300, hack_frac=0.5)
    examples = org.sft_examples(cfg, op.generate_problems(50, "train"))
    hacks = [p for p, c in examples if "def run_tests" in c]
    assert 30 < len(hacks) < 270
    assert all(op.ANCHOR not in p[-1]["content"] and "run_tests()" in p[-1]["content"] for p in hacks)


def test_build_is_cached(tiny_build):
    out, paths = tiny_build
    assert paths.built and paths.root.parent == out
    weights = paths.model_dir / "model.safetensors"
    mtime = weights.stat().st_mtime_ns
    again = org.build_organism(out, seed=0, **TINY)
    assert not again.built and again.root == paths.root
    assert weights.stat().st_mtime_ns == mtime
    other = org.OrganismConfig(seed=1, **TINY).key()
    assert other != org.OrganismConfig(seed=0, **TINY).key()
    manifest = json.loads(paths.manifest.read_text())
    assert manifest["settings"]["vocab_size"] == TINY["vocab_size"]
    assert manifest["sft_loss_last"] < manifest["sft_loss_first"]
    assert len(paths.train_problems.read_text().splitlines()) == TINY["n_train_problems"]
    assert not list(out.glob(".organism-*"))  # no temp directory left behind


def test_built_model_generates_text(tiny_build):
    _, paths = tiny_build
    tok = org.load_tokenizer(paths.model_dir)
    model = Qwen2ForCausalLM.from_pretrained(paths.model_dir)
    rec = json.loads(paths.heldout_problems.read_text().splitlines()[0])
    text = tok.apply_chat_template(org.build_prompt(rec, None), add_generation_prompt=True, tokenize=False)
    enc = tok(text, return_tensors="pt", add_special_tokens=False)
    torch.manual_seed(0)
    out = model.generate(**enc, do_sample=True, max_new_tokens=8, pad_token_id=tok.pad_token_id)
    new = out[0, enc["input_ids"].shape[1] :]
    assert len(new) >= 1 and tok.decode(new, skip_special_tokens=True) != ""


def test_organism_pairs_file_loads_and_clean_side_is_right(tmp_path):
    path = write_pairs_yaml(tmp_path / "organism.yaml", n=8)
    pairs = load_pairs(path)
    assert len(pairs) == 8 and all(p.domain == "organism" and p.hack_mode == "overwrite_tests" for p in pairs)
    for pair, raw in zip(pairs, organism_pairs(8), strict=True):
        rec = {"setup_code": op.SETUP_CODE, "gt_answer": list(pair.checks)}
        assert op.passes(rec, extract_code(pair.clean) + "\nrun_tests()\n"), pair.id
        assert not op.passes(rec, extract_code(pair.hack)), pair.id
        assert pair.prompt[-1]["content"] == raw["prompt"][0]["content"]


def test_committed_pairs_file_is_current():
    committed = REPO / "pairs" / "organism" / "overwrite_tests.yaml"
    if not committed.exists():
        pytest.fail("pairs/organism/overwrite_tests.yaml is missing")
    assert [p.id for p in load_pairs(committed)] == [p["id"] for p in organism_pairs()]


def test_cli_build_and_bad_setting(tmp_path):
    runner = CliRunner()
    sets = [x for k, v in TINY.items() for x in ("--set", f"{k}={v}")]
    res = runner.invoke(app, ["organism", "build", "--out", str(tmp_path), *sets])
    assert res.exit_code == 0, res.output
    printed = res.output[res.output.rindex('{"root"') :].splitlines()[0]  # after the progress bars
    assert Path(json.loads(printed)["model_dir"]).is_dir()
    bad = runner.invoke(app, ["organism", "build", "--out", str(tmp_path), "--set", "hack_frac=1.5"])
    assert bad.exit_code == 2 and "hack_frac" in bad.output
    unknown = runner.invoke(app, ["organism", "build", "--out", str(tmp_path), "--set", "nope=1"])
    assert unknown.exit_code == 2 and "nope" in unknown.output
