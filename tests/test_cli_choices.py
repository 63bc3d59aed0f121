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
