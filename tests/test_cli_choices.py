"""The CLI's --method choices are the library's vocabularies (one definition each), read without importing torch
for `vlmsparse --help`."""

import subprocess
import sys

import pytest

from vlmsparse.cli import build_parser
from vlmsparse.pipeline.lora import METHODS as FINETUNE_METHODS
from vlmsparse.pipeline.prune import ALLOCATIONS, PROPAGATIONS, SCOPES
from vlmsparse.pruning import METHODS as PRUNE_METHODS
from vlmsparse.training.config import METHODS as CONFIG_METHODS


@pytest.mark.parametrize("command, methods", [(["prune", "m", "o"], PRUNE_METHODS),
                                              (["finetune", "m", "--data", "d", "-o", "o"], FINETUNE_METHODS)])
def test_method_choices_are_the_library_vocabulary(command, methods, capsys):
    parser = build_parser()
    for method in methods:
        assert parser.parse_args([*command, "--method", method]).method == method
    with pytest.raises(SystemExit):
        parser.parse_args([*command, "--method", "not-a-method"])
    assert ", ".join(repr(m) for m in methods) in capsys.readouterr().err


@pytest.mark.parametrize("option, values", [("--allocation", ALLOCATIONS), ("--scope", SCOPES),
                                            ("--propagate", PROPAGATIONS)])
def test_prune_allocation_scope_and_propagate_choices_are_the_library_vocabulary(option, values, capsys):
    parser = build_parser()
    for value in values:
        assert getattr(parser.parse_args(["prune", "m", "o", option, value]), option[2:]) == value
    with pytest.raises(SystemExit):
        parser.parse_args(["prune", "m", "o", option, "not-a-choice"])
    assert ", ".join(repr(v) for v in values) in capsys.readouterr().err


def test_finetune_config_uses_the_pipeline_vocabulary():
    assert CONFIG_METHODS is FINETUNE_METHODS
    assert FINETUNE_METHODS[-1] == "full" and "full" not in FINETUNE_METHODS[:-1]


def test_top_level_help_imports_no_torch():
    code = "import sys\nfrom vlmsparse.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n" \
           "sys.stdout.flush()\nprint('torch' in sys.modules, file=sys.stderr)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stderr.strip().splitlines()[-1] == "False"


@pytest.mark.parametrize("command", [["prune", "m"], ["finetune", "m", "--data", "d"], ["compress", "m"]])
def test_output_folder_positional_or_by_option(command, capsys):
    """prune, finetune and compress take MODEL OUTPUT or MODEL -o OUTPUT, OUTPUT before or after the options;
    neither or two different ones are usage errors that name both forms, an unknown option one too."""
    from vlmsparse.cli import _parse, _resolve_output

    parser = build_parser()
    for extra in (["out"], ["-o", "out"], ["--output", "out"], ["out", "-o", "out"]):
        args = _parse(parser, [*command[:2], *extra, *command[2:]])
        _resolve_output(args)
        assert args.output == "out", extra
        args = _parse(parser, ["-v", *command, *extra])
        _resolve_output(args)
        assert args.output == "out" and args.verbose, extra
    with pytest.raises(SystemExit):
        _parse(parser, [*command, "out", "--no-such-option"])
    assert "unrecognized arguments: --no-such-option" in capsys.readouterr().err
    for extra, message in (([], "the output folder is required: vlmsparse {} MODEL OUTPUT (or -o OUTPUT)"),
                           (["a", "-o", "b"], "two output folders given ('a' and -o 'b'); give one")):
        args = _parse(parser, [*command, *extra])
        with pytest.raises(SystemExit) as stopped:
            _resolve_output(args)
        assert stopped.value.code == 2
        assert message.format(command[0]) in capsys.readouterr().err
