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


def test_usage_mistakes_are_one_line_with_exit_2():
    cases = [
        (["extract", "x.svs", "--out", "o", "--patch-size", "0"], "--patch-size"),
        (["extract"], "required"),
        (["no-such-command"], "invalid choice"),
        (["eval", "score", "--bootstrap", "many"], "--bootstrap"),
    ]
    for argv, needle in cases:
        proc = subprocess.run([sys.executable, "-m", "slidechat.cli", *argv], capture_output=True, text=True)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2, (argv, proc.stderr)
        assert len(lines) == 1 and lines[0].startswith("error: slidechat") and needle in lines[0], (argv, lines)
        assert "--help" in lines[0]
