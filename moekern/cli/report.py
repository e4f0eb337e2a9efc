"""`moekern report RUN_DIR...`: one markdown report, plots and JSON from bench, eval and paper runs
(moekern.bench.harness.run_report)."""

from pathlib import Path

from moekern.cli.common import settings_from


def add_parser(sub) -> None:
    report = sub.add_parser(
        "report",
        help="one markdown report (the paper's Table 3), plots and JSON from bench and eval runs",
        description="Read the *.jsonl records of the RUN_DIRs and write report.md, report.json and PNG plots. A "
        "folder of `moekern paper` (even an interrupted one) gets the paper report of its latest run.",
    )
    report.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR")
    report.add_argument("--out", type=Path, default=None, metavar="DIR", help="default: the first RUN_DIR")
    report.set_defaults(run=run, writes="runs")


def run(args) -> int:
    from moekern.bench.harness import ReportSettings, run_report

    return run_report(settings_from(ReportSettings, args))
