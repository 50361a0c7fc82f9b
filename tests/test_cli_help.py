"""`pyro-livi ... --help` teaches: every option of every subcommand has help text and shows its
default (or says it is required), choices are listed and checked by argparse, and usage mistakes
give one-line errors with exit code 2 instead of tracebacks."""

from __future__ import annotations

import argparse
import re

import pandas as pd
import pytest

from pyro_livi.cli import COMMAND_MODULES, build_parser, main
from pyro_livi.likelihoods import LIKELIHOODS
from pyro_livi.models import MODELS


def _subparsers(argv=None) -> dict[str, argparse.ArgumentParser]:
    parser = build_parser(argv or [])
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def _option_help(parser: argparse.ArgumentParser) -> dict[str, str]:
    """Option -> its help as printed (formatter applied, %(default)s expanded)."""
    formatter = parser._get_formatter()
    return {action.option_strings[-1]: formatter._expand_help(action)
            for action in parser._actions
            if action.option_strings and not isinstance(action, argparse._HelpAction)}


def _every_parser():
    for name, sub in _subparsers().items():
        yield name, sub
    for model in MODELS:  # fit's flags depend on --model
        yield f"fit --model {model}", _subparsers(["fit", "--model", model])["fit"]


def test_every_option_of_every_subcommand_has_help_with_its_default():
    names = set(_subparsers())
    assert names == set(COMMAND_MODULES)
    missing = []
    for name, sub in _every_parser():
        for option, text in _option_help(sub).items():
            if not text.strip():
                missing.append(f"{name} {option}: no help")
            elif not re.search(r"default|\(required\)", text, re.IGNORECASE):
                missing.append(f"{name} {option}: no default shown ({text!r})")
    assert not missing, "\n".join(missing)


def test_help_shows_defaults_and_choices_and_no_internal_jargon(capsys):
    texts = {}
    for name in _subparsers():
        with pytest.raises(SystemExit) as exit_:
            main([name, "--help"])
        assert exit_.value.code == 0
        texts[name] = capsys.readouterr().out
    for model in MODELS:  # each model's own options
        with pytest.raises(SystemExit):
            main(["fit", "--model", model, "--help"])
        texts[f"fit --model {model}"] = capsys.readouterr().out
    for name, text in texts.items():
        assert not re.search(r"\bseeds? \d{3}\b", text), (name, re.search(r"seeds? \d{3}", text))
    flat = {k: " ".join(v.split()) for k, v in texts.items()}
    assert "--fdr RATE false discovery rate threshold (a fraction, 0..1) (default: 0.05)" in flat["associate"]
    assert "(default: auto)" in flat["associate"] and "{auto,snps_x_donors,donors_x_snps}" in flat["associate"]
    assert "--out RESULTS.tsv results table (its folder is created when missing) (required)" in flat["associate"]
    assert "--ppc-samples N" in flat["evaluate"] and "(default: 20)" in flat["evaluate"]
    assert "(default: from --config)" in flat["simulate"]
    assert "{" + ",".join(sorted(LIKELIHOODS)) + "}" in flat["fit"]
    assert "--device {cpu,cuda}" in flat["fit"]


def _one_line_error(capsys, argv, *fragments) -> str:
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in err, err
    return err


def test_usage_mistakes_give_one_line_errors(capsys, monkeypatch, tmp_path):
    base = ["fit", "--data", str(tmp_path / "x.h5ad"), "--out", str(tmp_path / "run")]
    err = _one_line_error(capsys, [*base, "--likelihood", "gaussianish"],
                          "pyro-livi fit: error: argument --likelihood: invalid choice: 'gaussianish'",
                          "see `pyro-livi fit --help`")
    for name in LIKELIHOODS:
        assert repr(name) in err or name in err  # the choices are listed
    _one_line_error(capsys, [*base, "--device", "gpu"], "argument --device: invalid choice: 'gpu'")
    _one_line_error(capsys, [*base, "--epochs", "many"], "argument --epochs: invalid int value: 'many'")
    _one_line_error(capsys, ["associate", "--run", "r"], "the following arguments are required")
    _one_line_error(capsys, ["associate", "--run", "r", "--genotypes", "g", "--out", "o",
                             "--fdr", "five"], "argument --fdr: invalid float value: 'five'")
    _one_line_error(capsys, ["no-such-command"], "invalid choice: 'no-such-command'")

    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    _one_line_error(capsys, [*base, "--device", "cuda"], "pyro-livi fit: error: argument --device: 'cuda' requested "
                    "but CUDA is not available here", "use --device cpu")


def test_missing_files_give_one_line_errors(capsys, tmp_path):
    """Files that are not there: `error: ...` on one line, exit code 2, no traceback."""
    code = main(["associate", "--run", str(tmp_path / "nowhere"), "--genotypes", str(tmp_path / "g.csv"),
                 "--out", str(tmp_path / "r.tsv"), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: ") and "\n" not in err and "--run" in err
    run = tmp_path / "run"
    run.mkdir()
    pd.DataFrame({"D_0": [0.1, 0.2]}, index=pd.Index(["a", "b"], name="donor")).to_csv(run / "D.tsv", sep="\t")
    code = main(["associate", "--run", str(run), "--genotypes", str(tmp_path / "g.csv"),
                 "--out", str(tmp_path / "r.tsv"), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "file not found" in err and "\n" not in err


def test_models_list_has_no_internal_design_document_names(capsys):
    from pyro_livi.commands.models import public_reference

    assert public_reference("seed 001 (LIVI, eq. 2-4); PMBio/LIVI") == "LIVI, eq. 2-4; PMBio/LIVI"
    assert public_reference("seed 002 section 5.2; Gayoso et al. 2021") == "Gayoso et al. 2021"
    assert main(["models"]) == 0
    text = capsys.readouterr().out
    assert len(text.splitlines()) == len(MODELS) and not re.search(r"\bseeds? \d{3}", text), text
