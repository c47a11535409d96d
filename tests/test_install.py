"""The install: constraints.txt pins lie in setup.py's tested ranges; `make install` uses them."""
import ast
import os
import re

import pytest

packaging = pytest.importorskip("packaging")
from packaging.requirements import Requirement  # noqa: E402
from packaging.utils import canonicalize_name  # noqa: E402
from packaging.version import Version  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def setup_requirements():
    """{name: Requirement} from setup.py's INSTALL_REQUIRES and EXTRAS literals (not run)."""
    with open(os.path.join(ROOT, "setup.py")) as f:
        tree = ast.parse(f.read())
    reqs = []
    for node in tree.body:
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            if node.targets[0].id == "INSTALL_REQUIRES":
                reqs += ast.literal_eval(node.value)
            elif node.targets[0].id == "EXTRAS":
                reqs += [r for group in ast.literal_eval(node.value).values() for r in group]
    return {canonicalize_name(r.name): r for r in map(Requirement, reqs)}


def constraints():
    pins = {}
    with open(os.path.join(ROOT, "constraints.txt")) as f:
        for line in f:
            line = line.split("#", 1)[0].strip()
            if line:
                name, version = line.split("==")
                pins[canonicalize_name(name)] = Version(version)
    return pins


def test_every_pin_lies_in_the_tested_range():
    reqs, pins = setup_requirements(), constraints()
    assert len(reqs) >= 15 and len(pins) >= len(reqs)
    for name, req in reqs.items():
        assert name in pins, f"{name} has no pin in constraints.txt; run `make constraints`"
        assert req.specifier, f"setup.py gives {name} no tested range"
        # `==2.13.0` must accept the local build 2.13.0+cpu, as pip does.
        assert req.specifier.contains(pins[name], prereleases=True), \
            f"constraints.txt pins {name}=={pins[name]}, outside setup.py's {req.specifier}"
    # Every range has an upper bound (a future release cannot slip in), and the HF extra
    # keeps the CPU torch that lies on disk.
    for name, req in reqs.items():
        assert any(s.operator in ("<", "<=", "==", "~=") for s in req.specifier), name
    assert str(reqs["torch"].specifier) == "==2.13.0"
    assert "tensorboard" in reqs  # the docs tell users to run it


def test_constraints_pin_exactly_and_leave_out_the_package_itself():
    pins = constraints()
    assert "ssr-jax" not in pins and "ssr_jax" not in pins
    with open(os.path.join(ROOT, "constraints.txt")) as f:
        body = [l.strip() for l in f if l.strip() and not l.startswith("#")]
    assert all(re.fullmatch(r"[A-Za-z0-9_.\-]+==[0-9A-Za-z.+!\-]+", l) for l in body), body


def test_make_install_uses_the_constraints_file():
    with open(os.path.join(ROOT, "Makefile")) as f:
        text = f.read()
    rule = re.search(r"^\$\(STAMP\):(.*)\n((?:\t.*\n)+)", text, re.M)
    assert rule, "no $(STAMP) rule in the Makefile"
    deps, recipe = rule.group(1).split(), rule.group(2)
    assert "constraints.txt" in deps  # a new pin reinstalls
    install = [l for l in recipe.splitlines() if "pip install" in l]
    assert install and all("-c constraints.txt" in l for l in install), install
    constraints_rule = re.search(r"^constraints:.*\n((?:\t.*\n)+)", text, re.M)
    assert constraints_rule and "pip freeze" in constraints_rule.group(1)


def test_tensorboard_the_docs_suggest_is_installed():
    # `make run` ends with `tensorboard --logdir ...`: the install must provide it.
    import subprocess
    import sys
    script = os.path.join(os.path.dirname(sys.executable), "tensorboard")
    assert os.path.exists(script), f"no {script}; `make install` (setup.py) installs it"
    out = subprocess.run([script, "--help"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "--logdir" in out.stdout, out.stderr[-1000:]
