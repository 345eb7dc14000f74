"""``qvl-data``: thin click commands over the pipeline; no logic lives here. The build options are generated
from BuildConfig's fields (qvl_data/config.py), the others are the commands' own."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from qvl_data.config import BuildConfig, load_config
from qvl_data.errors import QvlError
from qvl_data.options import (
    CONTEXT_SETTINGS,
    OptionsCommand,
    add_options,
    click_options,
    config_option,
    usage_error_line,
)

# click >= 8.2 raises this for a group called without a command (8.1 printed the help and exited)
_NO_ARGS_IS_HELP = getattr(click.exceptions, "NoArgsIsHelpError", ())


class CommandGroup(click.Group):
    """qvl-data's group: its commands list the common options first, and every whole-run problem or
    usage mistake prints one ``error: ...`` line and exits 2 (click's own usage block would be 4 lines)."""

    command_class = OptionsCommand

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):  # noqa: ANN001
        if not standalone_mode:  # the caller handles errors and exit codes
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except _NO_ARGS_IS_HELP as e:  # `qvl-data` alone: the help, as click prints it
            e.show()
            sys.exit(e.exit_code)
        except click.UsageError as e:
            click.echo(f"error: {usage_error_line(e)}", err=True)
            sys.exit(2)
        except click.ClickException as e:
            click.echo(f"error: {e.format_message()}", err=True)
            sys.exit(e.exit_code)
        except QvlError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)
        except click.Abort:
            click.echo("Aborted!", err=True)
            sys.exit(1)
        sys.exit(rv if isinstance(rv, int) else 0)


def _build_options(*stages: str) -> list[click.Option]:
    """--config and the BuildConfig options of ``stages``, generated from their declarations."""
    config = config_option("YAML file of build options (keys: the long options with _ for -).")
    return [config, *click_options(BuildConfig, stages)]


def _config(config_path: str | None, **overrides) -> BuildConfig:
    if overrides.get("set_vars") == ():
        overrides["set_vars"] = None
    elif overrides.get("set_vars"):
        overrides["set_vars"] = list(overrides["set_vars"])
    return load_config(BuildConfig, config_path, overrides)


def _encode_config(config_path: str | None, **overrides) -> BuildConfig:
    """The config of a command that loads the processor: a bad --model fails here, in one line."""
    from qvl_data.processor import check_model_source

    config = _config(config_path, **overrides)
    check_model_source(config.model)
    return config


@click.group(cls=CommandGroup, context_settings=CONTEXT_SETTINGS)
@click.version_option(package_name="qvl")
def main() -> None:
    """qvl-data: validate, convert and encode Qwen2.5-VL SFT datasets into Arrow shards, offline.

    \b
    qvl-data build                    the three demo datasets -> ./data/qvl-demo
    qvl-data build --dataset-dir my_data --dataset mine --out out/ --num-proc 16
    qvl-data validate --dataset-dir my_data --dataset mine
    qvl-data convert --dataset-dir my_data --dataset mine --out unified.parquet
    qvl-data inspect --sample 3       look at what will be trained on
    """


@main.command("demo-data")
def demo_data() -> None:
    """Fetch (once, through pip) and verify LLaMA-Factory 0.9.5's demo datasets; print their folder."""
    from qvl_data.demo import fetch_demo_data

    click.echo(fetch_demo_data())


@main.command()
@add_options(_build_options("read", "encode", "write"))
def build(config_path: str | None, **overrides) -> None:
    """Validate, encode and shard datasets. Bad rows go to rejected.jsonl, never silently dropped.

    The rows are cut into partitions; each is one task (on --num-proc local workers or a Ray cluster)
    that writes its own shard files. Re-running with unchanged inputs, processor and options does
    nothing (the manifest's fingerprint matches); a killed build re-run with the same command redoes
    only the unfinished partitions; --force rebuilds everything.
    """
    from qvl_data.build import build as run_build
    from qvl_data.report import print_build_summary

    config = _encode_config(config_path, **overrides)
    result = run_build(config)
    if result.skipped:
        click.echo(
            f"{config.out} is up to date (fingerprint {result.manifest.fingerprint[:12]}); nothing to do."
        )
        return
    if result.reused and not config.quiet:
        click.echo(f"resumed: reused {result.reused} of {result.partitions} partitions already built")
    if result.images and not config.quiet:
        click.echo(
            f"images: reused {result.images_reused} of {result.images} from the image store, "
            f"processed {result.images - result.images_reused}"
        )
    if not config.quiet:
        print_build_summary(result)


@main.command()
@add_options(_build_options("read", "encode"))
@click.option(
    "--report", type=click.Path(dir_okay=False), help="Also write every rejected row as JSON lines here."
)
def validate(config_path: str | None, report: str | None, **overrides) -> None:
    """Run every check the build runs (images decoded, rows encoded) and report each bad row.

    Nothing is written except --report. Exit code 0 when every row is valid, 1 when some are rejected.
    With --quiet only the rejected rows are printed.
    """
    from qvl_data.build import run_pipeline
    from qvl_data.files import refuse_foreign
    from qvl_data.report import is_rejection_list, print_build_summary, print_rejections, write_rejection_list

    config = _encode_config(config_path, **overrides)
    if report:  # refused before the run, not after it
        refuse_foreign(Path(report), is_rejection_list, "rejected-rows list", "--report")
    rejections = []
    result = run_pipeline(config, write=False, on_rejection=rejections.append, label="validating")
    if report:
        write_rejection_list(Path(report), rejections)
    if not config.quiet:  # --quiet: only the rejected rows (the report), no progress bar or table
        print_build_summary(result, title="validation")
    print_rejections(rejections)
    sys.exit(1 if rejections else 0)


@main.command()
@add_options(_build_options("read"))
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Parquet file to write.")
def convert(config_path: str | None, out: str, **overrides) -> None:
    """Convert rows to the unified schema (schemas/unified_record.schema.json) as Parquet; no tokenization.

    Structural checks only: images must exist but are not decoded (build and validate decode them).
    Rows failing the checks go to OUT's sibling `<name>.rejected.jsonl`. Both files are replaced only
    when the run succeeds.
    """
    from qvl_data.convert import convert_to_parquet

    config = _config(config_path, **overrides)
    result = convert_to_parquet(config, Path(out))
    click.echo(
        f"wrote {result.written} rows to {out}; {result.rejected} rejected, listed in {result.rejected_path}\n"
        "structural checks only: images were not decoded (qvl-data validate decodes them)"
    )


@main.command("inspect")
@click.argument("shards_dir", required=False, default=BuildConfig.out)
@click.option("--sample", type=click.IntRange(min=0), help="Show N random rows (default 3 when no --index).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of --sample (reproducible).")
@click.option("--index", "indices", multiple=True, metavar="SOURCE:INDEX", help="Show this row (repeatable).")
@click.option("--source", help="Sample only rows of this source (with --rejected: list only its rejections).")
@click.option("--tokens", is_flag=True, help="Add a per-token table: position, id, token text, label.")
@click.option("--rejected", is_flag=True, help="List the rejected rows with their reasons.")
@click.option("--color/--no-color", default=None, help="Colour on or off (default: only on a terminal).")
def inspect_command(shards_dir: str, color: bool | None, **options) -> None:
    """Show rows of SHARDS_DIR (default data/qvl-demo) exactly as they will be trained on.

    \b
    ⟦...⟧   trained text (labels = ids); everything outside is masked (-100)
    ↵       a trained line break (the newline after <|im_end|>)
    [image 1 · 12×22 patches · 66 tokens]
            one image span: <|vision_start|> + 66 × <|image_pad|>
            + <|vision_end|>
    With colour, trained text is also green and masked text dim; the markers
    stay, so piped output (no colour) shows the same distinction.
    """
    from qvl_data.inspect import inspect_rows, make_console

    inspect_rows(shards_dir, console=make_console(color), **options)


@main.command("notebook")
@click.argument("shards_dir", required=False, default=BuildConfig.out)
@click.option(
    "--out",
    type=click.Path(dir_okay=False),
    help="Executed notebook to write (default: ./dataset_qa-<build folder name>.ipynb).",
)
@click.option(
    "--timeout", type=click.IntRange(min=1), default=600, show_default=True, help="Seconds per cell."
)
def notebook_command(shards_dir: str, out: str | None, timeout: int) -> None:
    """Run notebooks/dataset_qa.ipynb on SHARDS_DIR (default data/qvl-demo) and keep its outputs.

    Needs the [dev] extra (nbclient, ipykernel), not Jupyter; open the result in any notebook viewer.
    """
    from qvl_data.qa_notebook import run_notebook

    click.echo(f"wrote {run_notebook(shards_dir, out, timeout=timeout)}")


@main.command("stats")
@click.argument("shards_dir", required=False, default=BuildConfig.out)
@click.option("--json", "as_json", is_flag=True, help="Print the statistics as JSON, for scripts.")
@click.option("--color/--no-color", default=None, help="Colour on or off (default: only on a terminal).")
@click.option(
    "--verify",
    is_flag=True,
    help="Then check every row and image shard against its recorded sha256 (what `qvl-data verify` does).",
)
def stats_command(shards_dir: str, as_json: bool, color: bool | None, verify: bool) -> None:
    """Rows, tokens, trained ratio, lengths, images, rejections and storage of SHARDS_DIR.

    Reads the manifest and the small columns of the memory-mapped shards only (never the pixels); with
    --verify it then reads every byte of every shard. Exit code 1 when --verify finds a damaged shard.
    """
    from qvl_data.inspect import make_console
    from qvl_data.stats import compute_stats, render_stats

    stats = compute_stats(shards_dir)
    if as_json:
        click.echo(json.dumps(stats, indent=2, ensure_ascii=False))
    else:
        render_stats(stats, make_console(color))
    if verify:
        _report_verification(shards_dir, err=as_json)  # keep --json's stdout one JSON document


@main.command("verify")
@click.argument("shards_dir", required=False, default=BuildConfig.out)
def verify_command(shards_dir: str) -> None:
    """Check every shard of SHARDS_DIR (default data/qvl-demo) against the sha256 its manifest records.

    Exit code 0 when all match, 1 when some are damaged (each listed, then how to repair them).
    """
    _report_verification(shards_dir)


def _report_verification(shards_dir: str, err: bool = False) -> None:
    """Every shard of the build against its sha256: one line per damaged one and how to repair (exit 1),
    or one line saying all match."""
    from qvl_data.verify import REPAIR, verify_build

    result = verify_build(shards_dir)
    for line in result.damaged:
        click.echo(line, err=err)
    if result.damaged:
        click.echo(REPAIR, err=err)
        sys.exit(1)
    click.echo(
        f"{shards_dir}: all {result.shards} shard(s) and {result.image_shards} image shard(s) "
        f"({result.bytes / 2**20:,.1f} MiB) match the manifest",
        err=err,
    )


@main.command("gc-images")
@click.argument("store_dir")
@click.option("--dry-run", is_flag=True, help="Only list what would be removed.")
def gc_images_command(store_dir: str, dry_run: bool) -> None:
    """Remove the image shards of the image store STORE_DIR that no build using it lists.

    The builds are those registered in STORE_DIR/builds/ (every build registers its store); one whose
    manifest is gone or uses another store now is forgotten. Entries are removed a whole image shard at a
    time, and only files qvl names as its own.
    """
    from qvl_data.image_store import gc_images

    report = gc_images(Path(store_dir), dry_run=dry_run)
    verb = "would remove" if dry_run else "removed"
    for path in report.removed:
        click.echo(f"{verb} {path}")
    click.echo(
        f"{store_dir}: {verb} {len(report.removed)} image shard(s), {report.bytes_freed / 2**20:,.1f} MiB; "
        f"kept {report.kept} used by {report.builds} build(s)"
    )


if __name__ == "__main__":
    main()
