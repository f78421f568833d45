"""What the command line shows: --help (the config keys from their declarations), --list (every sweep, and what
it needs where the embedded default cannot run it), "did you mean" for sweep files, --dry-run, and the
`diffseg-bench` console script's subcommands."""

from __future__ import annotations

import dataclasses
import sys
from importlib import import_module
from pathlib import Path

import pytest
import tomllib

from bench import cli
from bench.config import SweepConfig
from bench.config_reference import INTERNAL_KEYS, format_keys, method_params, sweep_keys
from bench.run import main
from methods import METHODS

ROOT = Path(__file__).resolve().parents[1]
SWEEP_FILES = sorted((ROOT / "sweeps").glob("*.yaml"))


def run_cli(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_config_reference_covers_every_declared_key():
    keys = {k.key: k for k in sweep_keys()}
    for f in dataclasses.fields(SweepConfig):
        if f.name in INTERNAL_KEYS:
            continue
        section = SweepConfig.SECTIONS.get(f.name)
        if section is None:
            assert f.name in keys and keys[f.name].help, f.name
        else:
            for name in section.yaml_keys():
                assert f"{f.name}.{name}" in keys, f"{f.name}.{name}"
    assert keys["ray.num_actors"].type == "int | str" and keys["ray.num_actors"].default == "auto"
    assert keys["fit.from"].type == "str | None"  # the YAML spelling, not the attribute
    assert "server" in keys["tracking.uri"].help  # the declaration's own comment


@pytest.mark.parametrize("method", METHODS.names())
def test_every_method_parameter_is_listed_with_its_default(method):
    listed = {k.key: k for k in method_params(method)}
    for name, param in METHODS.get(method).all_params().items():
        assert listed[name].default == param.default and listed[name].kind == param.kind


def test_help_shows_the_keys_with_types_and_defaults(capsys):
    code, out, _ = run_cli(capsys, "--help")
    assert code == 0
    assert format_keys(sweep_keys(), cli.WIDTH) in out
    assert "--list" in out and "--dry-run" in out
    code, out, _ = run_cli(capsys, "--help", "iseg")
    assert code == 0 and "lambda" in out and "0.01" in out and "Eq. 7" in out
    code, _, err = run_cli(capsys, "--help", "isg")
    assert code == 2 and err.startswith("error:") and "Did you mean 'iseg'?" in err


def test_misspelt_sweep_file_gets_did_you_mean(capsys, tmp_path, monkeypatch):
    code, out, err = run_cli(capsys, ROOT / "sweeps/iseg_lamda.yaml", f"output_dir={tmp_path / 'x'}")
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1
    assert "iseg_lambda.yaml" in err and "Did you mean" in err
    code, _, err = run_cli(capsys, "ovam_blcks")  # a bare name: the shipped sweeps are searched too
    assert code == 2 and "ovam_blocks.yaml" in err
    assert not (tmp_path / "x").exists() and not (tmp_path / "x.partial").exists()
    code, _, err = run_cli(capsys, ROOT / "sweeps/iseg_lambda.yaml", "--dry-rn")
    assert code == 2 and "did you mean --dry-run?" in err


def test_a_shipped_sweep_by_bare_name():
    assert Path(cli.resolve_sweep("iseg_lambda")).resolve() == ROOT / "sweeps" / "iseg_lambda.yaml"


def test_list_names_every_sweep_with_its_description():
    from io import StringIO

    out = StringIO()
    cli.list_sweeps(out, check=False)
    text = out.getvalue()
    for path in SWEEP_FILES:
        assert f"  {path.stem} " in text, path.stem
    assert "(no description)" not in text
    registries = StringIO()
    cli.list_registries(registries)
    for name in (*METHODS.names(), "shapes", "voc2012", "embedded"):
        assert f"  {name} " in registries.getvalue(), name


def test_first_sentence_keeps_abbreviations():
    assert cli.first_sentence("OVAM blocks in Eq. 5 (Table 5). More text.") == "OVAM blocks in Eq. 5 (Table 5)."
    assert cli.first_sentence("x " * 200, 40).endswith("…")


def test_list_says_what_a_sweep_needs_on_the_embedded_default():
    """Derived from the checks a run makes: ovam_blocks names a third attention level the embedded UNet lacks,
    the VOC sweeps need the dataset's files; the main job needs nothing."""
    check = cli.EmbeddedCheck()
    assert check.needs(ROOT / "sweeps/iseg_lambda.yaml") is None
    blocks = check.needs(ROOT / "sweeps/ovam_blocks.yaml")
    assert blocks and "attention levels" in blocks and "rank 2" in blocks
    voc = check.needs(ROOT / "sweeps/iseg_voc_wsss.yaml")
    assert voc and "voc2012" in voc and "data.root" in voc


@pytest.mark.slow
def test_list_checks_every_shipped_sweep(capsys):
    """`--list` names every sweep file, each with a `needs` line exactly where the checks refuse it on the
    default (ovam_blocks and the sweeps on dataset files: not the main job)."""
    code, out, _ = run_cli(capsys, "--list")
    assert code == 0 and "Backbones" in out
    sweeps_part = out.split("\nMethods")[0]
    entries, current = {}, None
    for line in sweeps_part.splitlines()[1:]:
        if line.startswith("  ") and not line.startswith("   "):
            current = line.split()[0]
            entries[current] = ""
        elif current is not None:
            entries[current] += line
    assert sorted(entries) == [p.stem for p in SWEEP_FILES]
    check = cli.EmbeddedCheck()
    for name, text in entries.items():
        assert ("needs " in text) == (check.needs(ROOT / "sweeps" / f"{name}.yaml") is not None), name
    assert "needs " in entries["ovam_blocks"] and "needs " not in entries["iseg_lambda"]
    from bench.config import compose

    for path in SWEEP_FILES:  # --list's shortcut past Hydra resolves every shipped sweep as the run does
        assert cli.quick_compose(path).as_dict() == compose(path, []).as_dict(), path.stem


def test_dry_run_prints_the_plan_and_runs_nothing(capsys, tmp_path, tiny_model):
    out_dir = tmp_path / "never"
    code, out, err = run_cli(capsys, ROOT / "sweeps/iseg_lambda.yaml", "--dry-run", "data.limit=2", "data.size=32",
                             f"model.path={tiny_model}", f"output_dir={out_dir}")
    assert code == 0, err
    assert "configurations   6" in out and "forward settings 1" in out and "UNet passes      2" in out
    assert "fits             0" in out and "estimate" in out and "a UNet pass" in out
    assert not out_dir.exists() and not out_dir.with_name("never.partial").exists()


def test_console_script_is_declared_and_dispatches(capsys):
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    module, func = scripts["diffseg-bench"].split(":")
    assert getattr(import_module(module), func) is cli.script
    assert cli.console_main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in ("run", "report", "data", "synthesize", "perf", "track", "list"):
        assert f"  {name} " in out
    assert cli.console_main(["rnu"]) == 2 and "Did you mean 'run'?" in capsys.readouterr().err
    assert cli.console_main(["run", "--help"]) == 0 and "ray.num_actors" in capsys.readouterr().out
    for name, (target, _) in cli.SUBCOMMANDS.items():  # every subcommand's module has the main() it calls
        assert callable(import_module(target).main), name
    with pytest.raises(SystemExit) as done:
        cli.console_main(["data", "--help"])
    assert done.value.code == 0


def test_python_m_bench_run_main_is_a_thin_call(monkeypatch):
    calls = []
    monkeypatch.setattr(cli, "run_main", lambda argv, work: calls.append((argv, work)) or 0)
    import bench.run

    assert bench.run.main(["--list"]) == 0 and calls == [(["--list"], bench.run.run)]
    assert sys.modules["bench.cli"] is cli


def test_warning_summary_is_one_line_of_the_reports_warnings(tmp_path):
    from test_report import make_cfg, make_frame, make_prov, make_run_dir

    from bench.reporting import load_run, warning_summary, write_report

    cfg = make_cfg()
    frame = make_frame({0: [60.0], 0.01: [64.5], 0.1: [62.0]}).assign(tied=[80.0, 3.0, 40.0])
    prov = {**make_prov(cfg), "notes": ["Prompts are longer than the tokenizer's 16 tokens; the rest is cut."]}
    run_dir = make_run_dir(tmp_path / "run", cfg, frame, prov)
    write_report(run_dir, cfg, frame, prov)
    line = warning_summary(load_run(run_dir))
    assert "\n" not in line
    assert "labels without margin in 2 of 3 configurations" in line and "up to 80%" in line
    assert "prompts are longer than the tokenizer's 16 tokens" in line
    assert (run_dir / "report.md").read_text().count("Prompts are longer than the tokenizer's 16 tokens") == 1
    clean = make_run_dir(tmp_path / "clean", cfg, frame.assign(tied=1.0), make_prov(cfg))
    assert warning_summary(load_run(clean)) is None
    assert cli.report_line(clean) is None and "see " in cli.report_line(run_dir)


def test_markdown_reference_has_a_row_per_key():
    from bench.config_reference import markdown_table

    keys = sweep_keys()
    table = markdown_table(keys).splitlines()
    assert len(table) == len(keys) + 2 and all(line.count(" | ") >= 3 for line in table[2:])
    assert "`tracking.uri`" in markdown_table(keys) and "\\|" in markdown_table(method_params("iseg"))
