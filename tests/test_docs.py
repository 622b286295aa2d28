"""The documentation runs: every shell command and Python block a reader would paste, in the README
and the site's pages (docs/), is run here, so the documentation cannot drift from the code.

A fenced block's mode is the HTML comment on the line above it (invisible on the site):

    (none) or <!-- ci: run -->   run every command as written (bash), or the code (python)
    <!-- ci: check (why) -->     run each experiment command with --check appended (the spec, the
                                 data, the memory, the model validated; nothing computed): for the
                                 commands that take minutes to hours; other commands run as written
    <!-- ci: skip (why) -->      not run; the reason is required (a clone, an sbatch script)
    <!-- ci: file NAME -->       a python block the reader saves as NAME: written to the working dir
    <!-- ci: spec EXPERIMENT --> a yaml block: `ntkrun EXPERIMENT --config it --check`

A yaml block with an `experiment:` key is checked the same way without a comment. Python blocks of
a page run in order, each after the page's earlier ones (a later block uses an earlier's names).
Each page runs in its own empty working directory. In commands, RUN_DIR stands for a finished
quick run (made first when a block uses it) and `--data-dir DIR` for Fashion-MNIST's folder.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
FENCE = re.compile(r"^```(\w*)\s*$")
MARK = re.compile(r"^<!-- ci: (run|check|skip|file|spec)(?: (.*?))? -->$")
RUNNABLE = {"bash", "python", "yaml"}
FASHION = Path(os.environ.get("NTKRUN_TEST_FASHION", "/usr/share/datasets/fashion-mnist"))
EXPERIMENTS = ("convergence", "regression", "scaling", "pca", "generalization", "features")


@dataclass(frozen=True)
class Block:
    page: Path
    line: int  # of the opening fence, 1-based
    lang: str
    code: str
    mode: str
    arg: str

    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def blocks(page: Path) -> list[Block]:
    """The fenced blocks of a page with their modes."""
    lines = page.read_text().splitlines()
    out, i = [], 0
    while i < len(lines):
        fence = FENCE.match(lines[i])
        if not fence:
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
        mark = MARK.match(lines[i - 1].strip()) if i else None
        mode, arg = (mark.group(1), mark.group(2) or "") if mark else ("run", "")
        out.append(Block(page, i + 1, fence.group(1), "\n".join(lines[i + 1 : end]), mode, arg))
        i = end + 1
    return out


ALL = [b for page in PAGES for b in blocks(page)]


def commands(code: str) -> list[str]:
    """The command lines of a bash block: continuations joined, comment-only lines dropped."""
    joined = re.sub(r"\\\n\s*", " ", code)
    lines = (line.strip() for line in joined.splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def test_the_pages_hold_runnable_blocks_and_every_skip_says_why():
    """The collector sees the pages' blocks (a parser that found none would pass vacuously), every
    runnable language is one it runs, and a skipped block gives its reason in parentheses."""
    assert len([b for b in ALL if b.mode != "skip"]) >= 20
    for b in ALL:
        assert b.lang in RUNNABLE or b.mode == "skip" or b.lang == "", f"{b.where()}: ```{b.lang} is not run"
        if b.mode == "skip":
            assert re.fullmatch(r"\(.+\)", b.arg), f"{b.where()}: a skipped block says why, in parentheses"


def test_the_readme_fits_on_a_screen_or_two():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 150


class Session:
    """One page's working directory and environment."""

    def __init__(self, cwd: Path) -> None:
        self.cwd = cwd
        self.env = dict(os.environ, PYTHONPATH=str(cwd), COLUMNS="200", NO_COLOR="1")
        if os.environ.get("NTKRUN_TEST_MNIST"):
            self.env["NTKRUN_DATA_DIR"] = os.environ["NTKRUN_TEST_MNIST"]
        self.python: list[str] = []  # the page's python blocks so far

    def run(self, argv: list[str] | str, where: str, shell: bool = False) -> str:
        done = subprocess.run(
            argv, cwd=self.cwd, env=self.env, shell=shell, capture_output=True, text=True, timeout=900,
            executable="/bin/bash" if shell else None,
        )  # fmt: skip
        shown = argv if isinstance(argv, str) else " ".join(argv[-3:])
        output = f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        assert done.returncode == 0, f"{where}: {shown!r} exited {done.returncode}:\n{output}"
        return done.stdout

    def ntkrun(self, line: str, mode: str, where: str) -> None:
        if "RUN_DIR" in line and not (self.cwd / "outputs/convergence/latest").exists():
            self.run([sys.executable, "-m", "ntkrun", "convergence", "--preset", "quick", "--quiet"], where)
        line = line.replace("RUN_DIR", "outputs/convergence/latest")
        line = line.replace("--data-dir DIR", f"--data-dir {FASHION}")
        words = line.split()
        listed = "--list-units" in words or "--check" in words
        if mode == "check" and words[1] in EXPERIMENTS and not listed:
            line = line.split(" #", 1)[0] + " --check"
        self.run(f"{sys.executable} -m {line}", where, shell=True)


def _needs(code: str) -> None:
    """Skip, saying so, where a block reads data this machine lacks (never where it fails)."""
    if str(FASHION) in code or "--data-dir DIR" in code:
        if not (FASHION / "train-images-idx3-ubyte.gz").exists():
            pytest.skip(f"no Fashion-MNIST at {FASHION} (Debian's dataset-fashion-mnist)")
    if re.search(r"ntkrun pca\b", code) and not os.environ.get("NTKRUN_TEST_MNIST"):
        pytest.skip("pca reads MNIST: NTKRUN_TEST_MNIST is not set")


RUN_PAGES = [p for p in PAGES if any(b.page == p and b.mode != "skip" and b.lang in RUNNABLE for b in ALL)]


@pytest.mark.parametrize("page", RUN_PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_block_of_the_page_runs(page, tmp_path):
    session = Session(tmp_path)
    for b in blocks(page):
        if b.mode == "skip" or b.lang not in RUNNABLE:
            continue
        _needs(b.code)
        if b.lang == "python" and b.mode == "file":
            (tmp_path / b.arg).write_text(b.code + "\n")
        elif b.lang == "python":
            session.python.append(b.code)
            script = tmp_path / f"block{b.line}.py"
            script.write_text("\n\n".join(session.python) + "\n")
            session.run([sys.executable, str(script)], b.where())
        elif b.lang == "yaml":
            experiment = b.arg or (yaml.safe_load(b.code) or {}).get("experiment")
            if experiment is None:
                continue  # a fragment shown for its shape, not a spec
            spec = tmp_path / f"block{b.line}.yaml"
            spec.write_text(b.code + "\n")
            argv = [sys.executable, "-m", "ntkrun", experiment, "--config", str(spec), "--check"]
            session.run(argv, b.where())
        else:
            for line in commands(b.code):
                program = line.split()[0]
                assert program in ("ntkrun", "python"), (
                    f"{b.where()}: {program!r} in a block that is run: mark the block skip, saying why"
                )
                if program == "python":
                    session.run(f"{sys.executable} {line.split(' ', 1)[1]}", b.where(), shell=True)
                else:
                    session.ntkrun(line, b.mode, b.where())


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """The site built as `make docs` builds it (mkdocs build --strict), into a temporary folder."""
    mkdocs = shutil.which("mkdocs", path=str(Path(sys.executable).parent))
    if mkdocs is None:
        pytest.skip("mkdocs is not installed (pip install -e '.[docs]')")
    out = tmp_path_factory.mktemp("site")
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    done = subprocess.run(
        [mkdocs, "build", "--strict", "-d", str(out)], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def test_the_site_builds_strictly_with_the_generated_spec_reference(site):
    """A broken link, a page missing from the navigation or a docstring reference that does not
    resolve fails the build (the fixture); the spec page holds every experiment's keys."""
    page = (site / "reference/spec/index.html").read_text()
    assert page.count("<tr>") > 200
    for key in ("network.width", "kernels.solver", "executor.slurm.partition", "training.record_steps"):
        assert key in page


# Reports, once the page has loaded, its images and those that did not load, in a body attribute
# that --dump-dom prints.
PROBE = """<script>window.addEventListener("load", () => {
  const images = Array.from(document.images);
  const broken = images.filter((i) => !(i.complete && i.naturalWidth > 0)).map((i) => i.src);
  document.body.setAttribute("data-ci", JSON.stringify({images: images.length, broken: broken}));
});</script>"""


@pytest.mark.parametrize(
    ("page", "title"), [("index.html", "ntkrun"), ("experiments/generalization/index.html", "generalization")]
)
def test_the_site_in_a_real_browser(site, page, title, tmp_path):
    """The built page opened in headless Chromium as a reader's browser opens it: its title, every
    image loaded (none broken), and a screenshot that is not blank."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("no chromium on this machine (Debian's chromium; .ci/run installs it)")
    import json

    import matplotlib.image

    html = (site / page).read_text()
    shutil.copytree(site, tmp_path / "site")
    probed = (tmp_path / "site" / page).with_name("probed.html")
    probed.write_text(html.replace("</body>", PROBE + "</body>"))
    flags = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=10000"]
    dom = subprocess.run([*flags, "--dump-dom", probed.as_uri()], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    found = re.search(r"<title>(.*?)</title>", dom.stdout, re.S)
    assert found and title in found.group(1) and "ntkrun" in found.group(1)
    report = re.search(r'data-ci="([^"]*)"', dom.stdout)
    assert report, "the page's load event never ran"
    loaded = json.loads(report.group(1).replace("&quot;", '"'))
    assert loaded["images"] >= 1 and loaded["broken"] == [], loaded
    shot = tmp_path / "shot.png"
    done = subprocess.run(
        [*flags, "--window-size=1280,1600", f"--screenshot={shot}", (tmp_path / "site" / page).as_uri()],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0 and shot.is_file(), done.stderr[-2000:]
    pixels = matplotlib.image.imread(shot)
    assert pixels.shape[:2] == (1600, 1280) and pixels[..., :3].std() > 0.05


def test_every_spec_key_has_a_type_a_default_and_a_meaning():
    """The spec reference (ntkrun.specdoc) lists every leaf key of every experiment's spec model,
    blocks expanded, each with a meaning read from the comment beside its field."""
    from pydantic import BaseModel

    from ntkrun.experiments import EXPERIMENTS
    from ntkrun.specdoc import rows

    def leaves(model: type[BaseModel]) -> int:
        blocks = [f.annotation for f in model.model_fields.values()]
        return sum(leaves(b) if isinstance(b, type) and issubclass(b, BaseModel) else 1 for b in blocks)

    for name, experiment in EXPERIMENTS.items():
        table = rows(experiment.model)
        assert len(table) == leaves(experiment.model) > 20
        for key, kind, default, meaning in table:
            assert kind and default and meaning, f"{name}: {key} lacks a type, default or meaning"
    convergence = {key: (kind, default) for key, kind, default, _ in rows(EXPERIMENTS["convergence"].model)}
    assert convergence["network.width"] == ("list of int > 0", "[500, 10000]")
    assert convergence["executor.slurm.time"] == ("int > 0", "60")
