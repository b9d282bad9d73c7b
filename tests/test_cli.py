"""Every command keeps the one CLI contract: --help exits 0; a bad flag value is one line on
stderr, no traceback, exit 2 — before any TensorFlow work.

One fresh process runs every command's `--help` and a bad flag value through its own `run`,
then reports whether TensorFlow or Keras was ever imported: none of them may be. Another runs
each top-level script and `python -m data_prep.<name>` once, so that the entry points are the
commands themselves.
"""

import subprocess
import sys

from _subprocess import ENV, ROOT, run_json_script

# (module with `run(argv)`, a flag value it must refuse)
COMMANDS = [
    ("m2cnn_tf.commands.train", ["--stage", "7", "--data", "d", "--model-dir", "m"]),
    ("m2cnn_tf.commands.evaluate", ["--split", "holdout"]),
    ("m2cnn_tf.commands.predict", ["--tta", "sideways"]),
    ("m2cnn_tf.commands.serve", ["--port", "http"]),
    ("m2cnn_tf.commands.export", ["--quantize", "int4"]),
    ("m2cnn_tf.commands.reproduce", ["--ablation-init", "sideways"]),
    ("data_prep.kaggle", ["--workers", "many"]),
    ("data_prep.folder", ["--workers", "many"]),
    ("data_prep.aptos", ["--workers", "many"]),
    ("data_prep.messidor2", ["--workers", "many"]),
    ("data_prep.idrid", ["--workers", "many"]),
    ("data_prep.ddr", ["--workers", "many"]),
    ("data_prep.demo", ["--per-grade", "lots"]),
    ("data_prep.cli", ["reshape"]),
]

SCRIPT = """
import contextlib, importlib, io, json, sys
found = {}
for module, bad in %r:
    run = importlib.import_module(module).run
    for name, argv in (("help", ["--help"]), ("bad", bad)):
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = run([module, *argv])
        found[f"{module} {name}"] = [code, out.getvalue(), err.getvalue()]
found["tensorflow"] = sorted(m for m in sys.modules if m.split(".")[0] in ("tensorflow", "keras"))
print(json.dumps(found))
"""


def test_help_exits_0_and_a_bad_flag_value_is_one_line_exit_2_with_no_tensorflow():
    found = run_json_script(SCRIPT % (COMMANDS,), timeout=300)
    for module, _ in COMMANDS:
        code, out, err = found[f"{module} help"]
        assert code == 0 and out.strip() and not err, module
        code, out, err = found[f"{module} bad"]
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1, (module, err)
        assert "error" in lines[0] and "Traceback" not in err, module
    assert found["tensorflow"] == []  # not one command loaded TensorFlow or Keras


def test_the_scripts_and_modules_are_the_commands():
    """Each entry point in its own process (all at once): a bad flag value gives its command's
    one line and exit 2."""
    entries = {
        f"m2cnn_tf.commands.{name}": [str(ROOT / f"{name}.py")]
        for name in ("train", "evaluate", "predict", "serve", "export", "reproduce")
    }
    entries |= {m: ["-m", m] for m, _ in COMMANDS if m.startswith("data_prep.")}
    processes = {
        module: subprocess.Popen(
            [sys.executable, *entry, *dict(COMMANDS)[module]], stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True, cwd=ROOT, env=ENV,
        )
        for module, entry in entries.items()
    }  # fmt: skip
    for module, process in processes.items():
        try:
            _, err = process.communicate(timeout=120)
        finally:
            process.kill()
        assert process.returncode == 2 and len(err.strip().splitlines()) == 1, (module, err)
