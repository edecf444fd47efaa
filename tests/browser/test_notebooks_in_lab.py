"""Every notebook opened in JupyterLab in headless Chromium, run with its smoke parameters
through the Run menu, and checked the way a person would look at it: no error output, every
cell ran, the explanations render, and the widgets redraw what they drive.

Each notebook in notebooks/ is one case; the CASES table adds notebook-specific checks by
number, so a new notebook is run by this test as soon as it exists. A screenshot of every
notebook after running lands in outputs/browser/<notebook>.png.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

NOTEBOOKS = sorted((Path(__file__).resolve().parents[2] / "notebooks").glob("*.ipynb"))

OPEN_TIMEOUT_S = 90
RUN_TIMEOUT_S = 240
REDRAW_TIMEOUT_S = 60
MAX_SCREENSHOT_HEIGHT = 16000

# JavaScript helpers, reaching the open notebook through window.jupyterapp (exposed by the
# server's --LabApp.expose_app_in_browser) only for state the page does not show as text.
PANEL = """(path) => [...window.jupyterapp.shell.widgets('main')]
    .find(w => w.context && w.context.path === path)"""
KERNEL_IDLE = f"""(path) => {{
    const panel = window.jupyterapp && ({PANEL})(path);  // undefined while the page loads
    const kernel = panel && panel.sessionContext.session && panel.sessionContext.session.kernel;
    return Boolean(kernel) && kernel.status === 'idle' && panel.context.isReady;
}}"""
CODE_CELLS = f"""(path) => ({PANEL})(path).content.model.toJSON().cells
    .filter(c => c.cell_type === 'code')
    .map(c => ({{
        count: c.execution_count,
        errors: c.outputs.filter(o => o.output_type === 'error')
            .map(o => [o.ename + ': ' + o.evalue, ...o.traceback].join('\\n')),
    }}))"""
KERNEL_PREFIX = f"""async (path) => {{
    const kernel = ({PANEL})(path).sessionContext.session.kernel;
    const future = kernel.requestExecute({{
        code: 'import sys; print(sys.prefix)', silent: false, store_history: false,
    }});
    let text = '';
    future.onIOPub = (msg) => {{ if (msg.header.msg_type === 'stream') text += msg.content.text; }};
    await future.done;
    return text.trim();
}}"""
ANSI = re.compile(r"\x1b\[[0-9;]*m")


class NotebookInLab:
    """One notebook open in a JupyterLab tab, driven through the page like a user would."""

    def __init__(self, page, lab, notebook: Path) -> None:
        self.page, self.lab, self.name = page, lab, notebook.name
        self.notebook = notebook
        self.path = f"notebooks/{notebook.name}"

    def open(self, extra_parameters: dict) -> None:
        self.page.goto(self.lab.add_notebook(self.notebook, extra_parameters))
        self.page.wait_for_function(KERNEL_IDLE, arg=self.path, timeout=OPEN_TIMEOUT_S * 1000)

    @property
    def panel(self):
        return self.page.locator(".jp-NotebookPanel:not(.lm-mod-hidden)")

    def run_all_cells(self) -> None:
        """Run > Run All Cells, then wait until no cell is queued or running and the kernel
        is idle (twice in a row: between two cells the kernel is idle for a moment)."""
        self.page.locator(".lm-MenuBar-itemLabel", has_text=re.compile("^Run$")).click()
        self.page.locator(".lm-Menu-itemLabel", has_text=re.compile("^Run All Cells$")).click()
        prompts = self.panel.locator(".jp-CodeCell .jp-InputArea-prompt")
        deadline = time.monotonic() + RUN_TIMEOUT_S
        settled = 0
        while settled < 2:
            if time.monotonic() > deadline:
                pytest.fail(f"{self.name} still running after {RUN_TIMEOUT_S} s")
            time.sleep(0.5)
            texts = prompts.all_text_contents()
            started = bool(texts) and re.search(r"\d", texts[0])
            busy = any("*" in text for text in texts)
            idle = self.page.evaluate(KERNEL_IDLE, self.path)
            settled = settled + 1 if started and not busy and idle else 0

    def code_cells(self) -> list[dict]:
        return self.page.evaluate(CODE_CELLS, self.path)

    def kernel_prefix(self) -> str:
        return self.page.evaluate(KERNEL_PREFIX, self.path)

    def rendered_headings(self) -> list[str]:
        texts = self.panel.locator(
            ".jp-MarkdownOutput :is(h1, h2, h3, h4, h5, h6)"
        ).all_inner_texts()
        return [" ".join(text.replace("¶", "").split()) for text in texts]

    def printed_lines(self) -> list[str]:
        outputs = self.panel.locator(
            '.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stdout"]'
        )
        return [line for text in outputs.all_inner_texts() for line in text.splitlines()]

    def wait_until(self, predicate: str, arg: object, what: str) -> None:
        """Wait for the JavaScript ``predicate(arg)`` to hold; fail saying ``what`` did not
        happen (Playwright's own timeout names only the function)."""
        from playwright.sync_api import TimeoutError as PlaywrightTimeout

        try:
            self.page.wait_for_function(predicate, arg=arg, timeout=REDRAW_TIMEOUT_S * 1000)
        except PlaywrightTimeout:
            pytest.fail(f"{self.name}: {what} within {REDRAW_TIMEOUT_S} s")

    def cell_with(self, selector: str):
        """The (single) cell whose output holds an element matching ``selector``."""
        cell = self.panel.locator(".jp-CodeCell").filter(has=self.page.locator(selector))
        assert cell.count() == 1, f"{self.name}: expected one cell with {selector}"
        return cell

    def screenshot(self, path: Path) -> None:
        """The whole notebook in one picture: the window is made as tall as the notebook."""
        scroller = self.panel.locator(".jp-WindowedPanel-outer")
        height = scroller.evaluate("e => { e.scrollTop = 0; return e.scrollHeight; }")
        width = self.page.viewport_size["width"]
        self.page.set_viewport_size(
            {"width": width, "height": min(height + 200, MAX_SCREENSHOT_HEIGHT)}
        )
        self.page.wait_for_timeout(1000)  # layout and plotly resize
        self.page.screenshot(path=str(path))


def markdown_headings(notebook: Path) -> list[str]:
    """Heading texts of the notebook's markdown cells as rendered (no #, backticks, **)."""
    cells = json.loads(notebook.read_text())["cells"]
    headings = []
    for cell in cells:
        if cell["cell_type"] != "markdown":
            continue
        for line in "".join(cell["source"]).splitlines():
            match = re.match(r"^#{1,6} (.+)$", line)
            if match:
                headings.append(" ".join(re.sub(r"[`*]", "", match[1]).split()))
    return headings


# ----------------------------------------------------------------- notebook-specific checks


def explanations_render_and_digests_are_equal(nb: NotebookInLab) -> None:
    """02 and 03: every section heading rendered; each printed digest comparison says True."""
    expected = markdown_headings(nb.notebook)
    assert len(expected) >= 3, f"{nb.name} should explain itself in sections"
    assert nb.rendered_headings() == expected
    claims = [line for line in nb.printed_lines() if re.search(r"digests? equal", line)]
    assert claims, f"{nb.name} printed no digest comparison"
    assert all(line.rstrip().endswith(": True") for line in claims), claims


def seq_len_redraws_the_shape_table(nb: NotebookInLab) -> None:
    """04: typing another seq_len into the explorer redraws the shape table below it."""
    cell = nb.cell_with(".widget-text label:text-is('seq_len')")
    seq_len = cell.locator(".widget-text").filter(has=nb.page.locator("label:text-is('seq_len')"))
    box = seq_len.locator("input")
    shape_table = cell.locator(".jp-OutputArea-output table").first
    before = shape_table.inner_text()
    new_value = 2 * int(box.input_value())
    box.fill(str(new_value))
    box.press("Enter")
    nb.wait_until(  # the redraw replaces the table's element
        """([cell, before]) => {
            const table = cell.querySelector('.jp-OutputArea-output table');
            return table !== null && table.innerText !== before;
        }""",
        [cell.element_handle(), before],
        f"seq_len {new_value} did not redraw the shape table",
    )
    after = shape_table.inner_text()
    assert after != before
    assert re.search(rf"\b{new_value}\b", after), f"seq_len {new_value} not in:\n{after}"


def plot_traces(cell) -> list[str]:
    """Names of the traces of the first plotly figure in ``cell`` (as plotly holds them)."""
    figure = cell.locator(".js-plotly-plot").first
    figure.wait_for(state="attached", timeout=REDRAW_TIMEOUT_S * 1000)
    return figure.evaluate("gd => gd.data.map(t => t.name || '')")


def picking_a_run_redraws_the_plot(nb: NotebookInLab) -> None:
    """06: a plotly figure with drawn traces; picking another run redraws it, and its static
    twin, for that run alone."""
    cell = nb.cell_with(".widget-select-multiple")
    before = plot_traces(cell)
    assert before, "the runs explorer's plotly figure has no traces"
    assert cell.locator(".js-plotly-plot .scatterlayer .trace").count() > 0
    static_figure = cell.locator(".jp-RenderedImage img").first
    static_before = static_figure.get_attribute("src")
    picker = cell.locator(".widget-select-multiple select")
    labels = picker.locator("option").all_inner_texts()
    assert len(labels) >= 2, f"the runs explorer should list several runs, got {labels}"
    chosen = labels[-1]
    picker.select_option(label=chosen)
    nb.wait_until(
        """([cell, before]) => {
            const gd = cell.querySelector('.js-plotly-plot');
            const names = gd && gd.data ? gd.data.map(t => t.name || '') : before;
            return names.length !== before.length || names.some((n, i) => n !== before[i]);
        }""",
        [cell.element_handle(), before],
        f"picking {chosen} did not redraw the plotly figure (its traces stayed {before})",
    )
    after = plot_traces(cell)
    named = [name for name in after if name]
    assert named and all(chosen in name for name in named), (chosen, after)
    assert cell.locator(".js-plotly-plot .scatterlayer .trace").count() > 0
    nb.wait_until(
        """([cell, before]) => {
            const img = cell.querySelector('.jp-RenderedImage img');
            return img !== null && img.getAttribute('src') !== before;
        }""",
        [cell.element_handle(), static_before],
        f"picking {chosen} did not redraw the static figure",
    )


@dataclass(frozen=True)
class Case:
    """What one notebook needs beyond its smoke parameters, and what is checked after it ran."""

    needs: tuple[str, ...] = ()  # fixtures that must exist before the notebook runs
    after_run: Callable[[NotebookInLab], None] | None = None
    parameters: dict = field(default_factory=dict)  # on top of the smoke parameters


CASES = {
    # One epoch instead of two, as tests/test_notebook_01.py runs it: the training is the
    # same code either way and the whole browser suite stays under five minutes.
    "01": Case(parameters={"overrides": ["train.epochs=1"]}),
    "02": Case(after_run=explanations_render_and_digests_are_equal),
    "03": Case(after_run=explanations_render_and_digests_are_equal),
    "04": Case(after_run=seq_len_redraws_the_shape_table),
    # Only the two runs made for it, not whatever the other notebooks trained before.
    "06": Case(
        needs=("explorer_runs",),
        after_run=picking_a_run_redraws_the_plot,
        parameters={"runs_root": "outputs/explorer"},
    ),
}

TRAIN_TWO_RUNS = """
from timellm_lib.config import load_config
from timellm_lib.training import train

for seed in (1, 2):
    overrides = ["model.name=mlp", "train.epochs=1", f"train.seed={seed}"]
    train(load_config("configs/smoke.yaml", overrides), run_dir=f"outputs/explorer/seed{seed}")
"""


@pytest.fixture(scope="session")
def explorer_runs(lab) -> None:
    """Two small finished runs under the lab root's outputs/ for the runs explorer (06)."""
    done = subprocess.run(
        [sys.executable, "-c", TRAIN_TWO_RUNS], cwd=lab.root, capture_output=True, text=True
    )
    assert done.returncode == 0, f"training the explorer's runs failed:\n{done.stderr[-3000:]}"


# ------------------------------------------------------------------------------------ test


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs_in_jupyterlab(notebook, lab, page, screenshots, request):
    case = CASES.get(notebook.name.split("_")[0], Case())
    for fixture in case.needs:
        request.getfixturevalue(fixture)
    nb = NotebookInLab(page, lab, notebook)
    nb.open(case.parameters)
    assert nb.kernel_prefix() == sys.prefix, "the kernel is not this project's Python"
    try:
        nb.run_all_cells()
    finally:
        nb.screenshot(screenshots / f"{notebook.stem}.png")
    cells = nb.code_cells()
    errors = [ANSI.sub("", e) for cell in cells for e in cell["errors"]]
    assert not errors, f"{notebook.name} shows error output:\n" + "\n\n".join(errors)
    assert all(cell["count"] for cell in cells), f"{notebook.name}: not every cell ran"
    if case.after_run:
        case.after_run(nb)
