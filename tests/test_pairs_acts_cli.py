"""`routed-grpo pairs activations` and the commands that read its cache (`extract`, `score`, `generalise --acts`):
the cache is reused without a forward pass and gives what `--model` gives; stale caches and mismatched v_acts are
refused (exit 2, no output); hub ids resolve as transformers resolves them; output files keep the user's umask."""

import os
import re
import shutil

import pytest
import torch
from typer.testing import CliRunner
from vact_helpers import write_pairs

from routed_grpo.activations import load_pair_activations
from routed_grpo.cli.main import app
from routed_grpo.vact import load_vact

runner = CliRunner()
ADAPTER = ["--rank", "4", "--targets", "q_proj,down_proj", "--device", "cpu"]


def _run(*args):
    return runner.invoke(app, ["pairs", *map(str, args)])


def _table(output: str) -> list[str]:
    """The score table's lines (progress bars, their cursor escapes and loading messages dropped)."""
    lines = re.split(r"[\r\n]", re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", output))
    return [x.strip() for x in lines if x.strip().startswith(("pair  ", "overwrite_tests.", "exit_code.", "AUROC"))]


class Forwards:
    """Counts decoder-layer forwards in this process (a global module pre-hook)."""

    def __enter__(self):
        self.n = 0

        def hook(module, args):
            if type(module).__name__.endswith("DecoderLayer"):
                self.n += 1

        self.handle = torch.nn.modules.module.register_module_forward_pre_hook(hook)
        return self

    def __exit__(self, *exc):
        self.handle.remove()


@pytest.fixture
def pairs_dir(tmp_path):
    d = tmp_path / "pairs"
    d.mkdir()
    write_pairs(d / "overwrite.yaml", n=3)
    write_pairs(d / "exit.yaml", n=3, mode="exit_code")
    return d


def test_cache_is_reused_without_a_forward_and_matches_the_model_path(tmp_path, tiny_model_dir, pairs_dir):
    acts = tmp_path / "acts.safetensors"
    with Forwards() as f:
        result = _run("activations", "--model", tiny_model_dir, "--pairs", pairs_dir, "--out", acts, *ADAPTER)
    assert result.exit_code == 0, result.output
    assert f.n > 0
    cache = load_pair_activations(acts)
    assert cache.hack.shape == (6, 4, 4) and len(cache.pair_ids) == 6 and cache.metadata["dtype"] == "float32"
    assert cache.tags[cache.pair_ids.index("exit_code.fn.add_0")] == ["mode:exit_code", "domain:function"]
    written = acts.read_bytes()
    with Forwards() as f:
        result = _run("activations", "--model", tiny_model_dir, "--pairs", pairs_dir, "--out", acts, *ADAPTER)
        assert result.exit_code == 0 and "up to date" in result.output, result.output
        vact = tmp_path / "a.safetensors"
        assert _run("extract", "--acts", acts, "--pairs", pairs_dir, "--out", vact).exit_code == 0
        from_cache = _run("score", "--acts", acts, "--pairs", pairs_dir, "--vact", vact)
    assert f.n == 0, "a second call and every --acts reader must run no forward pass"
    assert acts.read_bytes() == written
    args = ("extract", "--model", tiny_model_dir, "--pairs", pairs_dir, "--out", tmp_path / "m.safetensors", *ADAPTER)
    assert _run(*args).exit_code == 0
    (v_acts, m_acts), (v_model, m_model) = load_vact(tmp_path / "a.safetensors"), load_vact(tmp_path / "m.safetensors")
    torch.testing.assert_close(v_acts, v_model, rtol=0, atol=0)
    assert m_acts["adapter_fingerprint_parts"] == m_model["adapter_fingerprint_parts"]
    args = ("score", "--model", tiny_model_dir, "--pairs", pairs_dir, "--vact", tmp_path / "a.safetensors")
    from_model = _run(*args, "--device", "cpu")
    assert from_cache.exit_code == from_model.exit_code == 0, from_cache.output + from_model.output
    assert _table(from_cache.output) == _table(from_model.output)
    assert len(_table(from_cache.output)) == 8  # header, 6 pairs, AUROC
    with Forwards() as f:
        assert (
            _run(
                "activations", "--model", tiny_model_dir, "--pairs", pairs_dir, "--out", acts, *ADAPTER, "--force"
            ).exit_code
            == 0
        )
    assert f.n > 0


def test_stale_cache_and_foreign_vact_are_refused_without_output(tmp_path, tiny_model_dir, pairs_dir):
    acts = tmp_path / "acts.safetensors"
    assert _run("activations", "--model", tiny_model_dir, "--pairs", pairs_dir, "--out", acts, *ADAPTER).exit_code == 0
    other = tmp_path / "seed1.safetensors"
    args = ("extract", "--model", tiny_model_dir, "--pairs", pairs_dir, "--out", other, *ADAPTER, "--init-seed", "1")
    assert _run(*args).exit_code == 0
    result = _run("score", "--acts", acts, "--pairs", pairs_dir, "--vact", other)
    assert result.exit_code == 2
    assert "init seed 1 in the file, 0 in the cache" in result.output and str(acts) in result.output
    write_pairs(pairs_dir / "more.yaml", n=1, mode="hardcode")  # the pairs change after the cache was written
    out = tmp_path / "stale.safetensors"
    result = _run("extract", "--acts", acts, "--pairs", pairs_dir, "--out", out)
    assert result.exit_code == 2 and "pairs_hash" in result.output and "changed" in result.output
    assert not out.exists()
    result = _run("extract", "--acts", acts, "--pairs", pairs_dir, "--out", out, "--mode", "deploy")
    assert result.exit_code == 2 and not out.exists()
    result = _run("extract", "--acts", tmp_path / "missing.safetensors", "--pairs", pairs_dir, "--out", out)
    assert result.exit_code == 2 and "missing.safetensors" in result.output and not out.exists()
    result = _run("extract", "--acts", acts, "--model", tiny_model_dir, "--pairs", pairs_dir, "--out", out)
    assert result.exit_code == 2 and "exactly one of --model" in result.output


def test_generalise_writes_its_three_files_and_refuses_a_key_with_one_value(tmp_path, tiny_model_dir, pairs_dir):
    acts = tmp_path / "acts.safetensors"
    assert _run("activations", "--model", tiny_model_dir, "--pairs", pairs_dir, "--out", acts, *ADAPTER).exit_code == 0
    out = tmp_path / "report"
    result = _run("generalise", "--acts", acts, "--pairs", pairs_dir, "--out", out, "--n-haar", 50, "--n-perm", 50)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == [
        "generalise_mode.json",
        "generalise_mode.md",
        "generalise_mode.png",
    ]
    rows = [x for x in (out / "generalise_mode.md").read_text().splitlines() if x.startswith("| ")][1:]
    assert [r.split("|")[1].strip() for r in rows] == [
        "exit_code",
        "overwrite_tests",
        "mean of held-out",
        "all (in-sample)",
    ]
    assert (out / "generalise_mode.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    bad = tmp_path / "bad"
    result = _run("generalise", "--acts", acts, "--out", bad, "--by", "domain")
    assert result.exit_code == 2 and "'domain'" in result.output and "mode (2)" in result.output
    assert not bad.exists()


def test_output_files_get_the_users_umask(tmp_path, tiny_model_dir, pairs_dir):
    old = os.umask(0o027)
    try:
        acts, vact, placebo, report = (tmp_path / n for n in ("a.safetensors", "v.safetensors", "p.safetensors", "r"))
        assert (
            _run(
                "activations",
                "--model",
                tiny_model_dir,
                "--pairs",
                pairs_dir,
                "--out",
                acts,
                *ADAPTER,
                "--batch-size",
                2,
            ).exit_code
            == 0
        )
        assert _run("extract", "--acts", acts, "--pairs", pairs_dir, "--out", vact).exit_code == 0
        assert _run("placebo", "--like", vact, "--seed", 1, "--out", placebo).exit_code == 0
        assert _run("generalise", "--acts", acts, "--out", report, "--n-haar", 5, "--n-perm", 5).exit_code == 0
    finally:
        os.umask(old)
    for path in (acts, vact, placebo, *report.iterdir()):
        assert path.stat().st_mode & 0o777 == 0o666 & ~0o027, path


def _hub_cache(root, repo_id, model_dir):
    """`model_dir`'s files laid out as huggingface_hub caches a download of `repo_id` (refs/main -> snapshot)."""
    repo = root / f"models--{repo_id.replace('/', '--')}"
    commit = "0" * 40
    shutil.copytree(model_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)


def test_hub_ids_resolve_offline_from_the_hub_cache(tmp_path, tiny_model_dir, pairs_dir, monkeypatch):
    import huggingface_hub.constants as hub

    cache_root = tmp_path / "hub"
    _hub_cache(cache_root, "acme/tiny-coder", tiny_model_dir)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(cache_root))
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    acts = tmp_path / "acts.safetensors"
    result = _run("activations", "--model", "acme/tiny-coder", "--pairs", pairs_dir, "--out", acts, *ADAPTER)
    assert result.exit_code == 0, result.output
    assert load_pair_activations(acts).metadata["model_name"] == "acme/tiny-coder"
    local = tmp_path / "local.safetensors"
    args = ("activations", "--model", tiny_model_dir, "--pairs", pairs_dir, "--out", local, *ADAPTER)
    assert _run(*args).exit_code == 0
    torch.testing.assert_close(load_pair_activations(acts).hack, load_pair_activations(local).hack, rtol=0, atol=0)
    out = tmp_path / "v.safetensors"
    result = _run("extract", "--model", "acme/not-cached", "--pairs", pairs_dir, "--out", out, *ADAPTER)
    assert result.exit_code == 2 and not out.exists()
    assert "acme/not-cached" in result.output and "no such model directory" not in result.output


def test_the_sensor_travels_from_the_cache_to_the_v_act_and_back_to_score(tmp_path, tiny_model_dir, pairs_dir):
    acts, vact = tmp_path / "acts.safetensors", tmp_path / "v.safetensors"
    args = ("activations", "--model", tiny_model_dir, "--pairs", pairs_dir, "--out", acts, *ADAPTER)
    result = _run(*args, "--sensor", "residual:1")
    assert result.exit_code == 0 and "sensor residual:1" in result.output, result.output
    cache = load_pair_activations(acts)
    assert cache.hack.shape == (6, 1, 32) and cache.metadata["sensor"] == "residual:1"
    assert "up to date" not in _run(*args).output  # a cache at another sensor is not reused for the bottleneck
    assert _run(*args, "--sensor", "residual:1").exit_code == 0
    assert _run("extract", "--acts", acts, "--pairs", pairs_dir, "--out", vact).exit_code == 0
    v, meta = load_vact(vact)
    assert v.shape == (1, 32) and meta["sensor"] == "residual:1" and meta["module_names"] == ["layers.1"]
    # score rebuilds the adapter with the file's sensor and gives what the cache gives
    from_model = _run("score", "--model", tiny_model_dir, "--pairs", pairs_dir, "--vact", vact, "--device", "cpu")
    from_cache = _run("score", "--acts", acts, "--pairs", pairs_dir, "--vact", vact)
    assert from_model.exit_code == from_cache.exit_code == 0, from_model.output + from_cache.output
    assert _table(from_model.output) == _table(from_cache.output)
    # a bottleneck cache cannot score a residual v_act: refused naming the sensor, exit 2
    bottleneck = tmp_path / "b.safetensors"
    assert (
        _run("activations", "--model", tiny_model_dir, "--pairs", pairs_dir, "--out", bottleneck, *ADAPTER).exit_code
        == 0
    )
    result = _run("score", "--acts", bottleneck, "--pairs", pairs_dir, "--vact", vact)
    assert result.exit_code == 2 and "sensor 'residual:1'" in result.output
    result = _run(*args, "--sensor", "residual:9")
    assert (
        result.exit_code == 2
        and "--sensor 'residual:9'" in result.output
        and "layer 9 does not exist" in result.output
    )
