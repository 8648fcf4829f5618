"""`routed-grpo eval` takes the run's base model as transformers resolves it: an id it cannot resolve (offline, not in
the hub cache) ends in transformers' own error and exit 2, not a traceback."""

import yaml
from typer.testing import CliRunner

from routed_grpo.adapter import DEPLOYED, QUARANTINE
from routed_grpo.cli.main import app


def test_eval_reports_an_unresolvable_base_model_id(tmp_path):
    run = tmp_path / "run"
    for block in (DEPLOYED, QUARANTINE):
        (run / "final" / block).mkdir(parents=True)
    config = {
        "arm": "routed",
        "model": {"model_name_or_path": "acme/not-cached", "model_revision": "main"},
        "training": {"adapter_init_seed": 0},
        "script": {},
    }
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    result = CliRunner().invoke(app, ["eval", str(run)])
    assert result.exit_code == 2, result.output
    assert "acme/not-cached" in result.output and "Traceback" not in result.output
