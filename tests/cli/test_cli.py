import subprocess
import sys

from slidechat.cli import COMMANDS, main


def test_help_lists_every_subcommand(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    for name in ["synth", "extract", "chat", "report", "eval", "train", "app", "demo"]:
        assert name in COMMANDS
        assert name in out


def test_console_script_runs():
    proc = subprocess.run([sys.executable, "-m", "slidechat.cli", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0
    assert "extract" in proc.stdout
