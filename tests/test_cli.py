import subprocess
import sys

from pipeline.cli import build_parser


def test_every_command_module_registers_a_subcommand():
    parser = build_parser()
    actions = [a for a in parser._actions if a.dest == "command"]
    assert actions and actions[0].choices, "no subcommands registered"


def test_console_entry_point_runs():
    out = subprocess.run([sys.executable, "-m", "pipeline.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    assert "simplebits" in out.stdout
