"""The `routed-grpo` command line: one typer app with a sub-app per area.

The core's commands (`pairs`, `sandbox`) live in `routed_grpo/cli/`; the lab's (`organism`, `experiment`, `study`,
`demo`, `eval`, `compare`, and the DIAGNOSTIC `pairs diagnose`) in `routed_grpo/lab/cli/`. This module is the only
place that joins them.
"""

import typer

from routed_grpo.cli import pairs_cmd, sandbox_cmd
from routed_grpo.lab.cli import diagnose_cmd, experiment_cmd, organism_cmd

app = typer.Typer(no_args_is_help=True, help="Gradient routing against reward hacking for TRL GRPO.")


@app.callback()
def main(verbose: bool = typer.Option(False, "--verbose", help="Show warnings known to be harmless here.")) -> None:
    from routed_grpo.utils import quiet_known_noise

    quiet_known_noise(verbose)


app.add_typer(sandbox_cmd.app, name="sandbox", help="Grade completions in the loophole environment.")
PAIRS_HELP = "Validate (hack, clean) pairs; cache their activations; extract, score, placebo and generalise v_act."
pairs_cmd.app.command("diagnose")(diagnose_cmd.diagnose)  # DIAGNOSTIC (reads labels): the lab's, joined here
app.add_typer(pairs_cmd.app, name="pairs", help=PAIRS_HELP)
app.add_typer(organism_cmd.app, name="organism", help="Build the CPU model organism.")
app.add_typer(experiment_cmd.app, name="experiment", help="Evaluate and compare runs.")
app.command("demo")(experiment_cmd.demo)
app.command("study")(experiment_cmd.study)
app.command("eval", help="Deployment evaluation of a run (same as `experiment eval`).")(experiment_cmd.eval_cmd)
app.command("compare", help="Report across arms and seeds (same as `experiment compare`).")(experiment_cmd.compare_cmd)

if __name__ == "__main__":
    app()
