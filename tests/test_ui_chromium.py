"""The UI in a real browser: headless Chromium (Debian's `chromium`) opens the pages served
by `dagster dev` after the demo graph has run (`python -m pipelines.demo` into the same
DAGSTER_HOME): the asset graph shows every asset; the lineage of a model_checkpoint
partition reaches merged_dataset and the tokenized datasets; model_eval shows its
expert-utilization plot as an image the browser decoded. Chromium is driven over the
DevTools protocol on a pipe (`--remote-debugging-pipe`); a screenshot of each page is
saved under the test's temporary folder (`screenshots/`; README: "Screenshots of the UI")."""

import base64
import json
import os
import shutil
import subprocess
import sys
import time

import pytest
from blues_project import write_project
from dagster_server import REPO, dagster_dev, graphql

from pipelines.home import ensure_dagster_home

CHROMIUM = shutil.which("chromium")
ASSETS = {
    "data": ["raw_corpus", "tokenized_dataset", "merged_dataset"],
    "training": ["trained_model", "model_checkpoint", "model_eval"],
}
# model_eval's metadata row `expert_utilization` is Markdown, shown after a click on
# "[Show Markdown]"; then its <img>: the PNG as the browser decoded it.
SHOW_PLOT = """(() => { const row = [...document.querySelectorAll('tr')].find(r => r.innerText.startsWith('expert_utilization'));
  const link = row && [...row.querySelectorAll('*')].filter(e => e.innerText === '[Show Markdown]').pop();
  if (link) link.click(); return !!link; })()"""
PLOT = """(() => { const img = [...document.querySelectorAll('img')].find(i => i.src.startsWith('data:image/png;base64,'));
  return img && img.complete ? [img.naturalWidth, img.naturalHeight, img.alt] : null; })()"""


class Browser:
    """Headless Chromium with one page, driven over the DevTools protocol on fds 3 and 4."""

    def __init__(self, profile):
        to_browser, self._commands = os.pipe()
        self._events, from_browser = os.pipe()

        def pipes():  # in the child: its ends of the pipes as fds 3 and 4, kept across exec
            ends = [os.dup(to_browser), os.dup(from_browser)]
            for fd, end in zip((3, 4), ends):
                os.dup2(end, fd, inheritable=True)

        self.process = subprocess.Popen(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--hide-scrollbars",
             "--remote-debugging-pipe", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=pipes, close_fds=False,
        )
        os.close(to_browser)
        os.close(from_browser)
        self._reader = os.fdopen(self._events, "rb")
        self._next_id, self.session, self._buffer = 0, None, b""
        target = self.send("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        self.send("Emulation.setDeviceMetricsOverride", width=1600, height=1000, deviceScaleFactor=1, mobile=False)

    def send(self, method: str, **params) -> dict:
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params}
        if self.session:
            message["sessionId"] = self.session
        os.write(self._commands, json.dumps(message).encode() + b"\0")
        while True:  # events and other replies until ours
            while b"\0" not in self._buffer:
                chunk = self._reader.read1(1 << 16)
                assert chunk, "chromium closed its DevTools pipe"
                self._buffer += chunk
            text, self._buffer = self._buffer.split(b"\0", 1)
            reply = json.loads(text)
            if reply.get("id") == self._next_id:
                assert "error" not in reply, f"{method}: {reply['error']}"
                return reply["result"]

    def evaluate(self, expression: str):
        return self.send("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")

    def open(self, url: str, shows: list[str], timeout: float = 90) -> str:
        """Navigate to `url` and wait until its markup names everything in `shows` (the graph
        labels a node by the last part of its key; the whole key is in its links)."""
        self.send("Page.navigate", url=url)
        deadline = time.monotonic() + timeout
        while missing := [name for name in shows if name not in (html := self.evaluate(
                "document.documentElement.outerHTML") or "")]:
            assert time.monotonic() < deadline, f"{url} shows no {missing}:\n{html[-2000:]}"
            time.sleep(0.5)
        time.sleep(1)  # the graph lays itself out before the screenshot
        return html

    def wait_for(self, expression: str, what: str, timeout: float = 30):
        deadline = time.monotonic() + timeout
        while not (value := self.evaluate(expression)):
            assert time.monotonic() < deadline, what
            time.sleep(0.5)
        return value

    def screenshot(self, path) -> None:
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(base64.b64decode(self.send("Page.captureScreenshot", format="png")["data"]))

    def close(self) -> None:
        os.close(self._commands)
        self._reader.close()
        self.process.terminate()
        self.process.wait(timeout=30)


def run_demo(tmp_path, config, monkeypatch) -> list[str]:
    """`make demo`'s graph, on the test project, recorded in the DAGSTER_HOME dagster dev
    will serve; the model_checkpoint partitions it recorded."""
    import dagster as dg

    home = ensure_dagster_home(tmp_path / "dagster_home")
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    done = subprocess.run([sys.executable, "-m", "pipelines.demo", "--config", str(config), "--corpus", "corpus",
                           "--corpus_mb", "0.05"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "Setting accelerator to CPU" not in done.stdout + done.stderr  # nobody can act on it
    assert (config.parent / "exports" / "demo" / "model.safetensors").is_file()  # the export it names
    assert "blues generate --checkpoint" in done.stdout and "Catalog lists the assets" in done.stdout
    with dg.DagsterInstance.get() as instance:
        return instance.get_dynamic_partitions("checkpoints")


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="Debian's `chromium` is not installed (apt-get install -y chromium)")
def test_ui_pages_after_the_demo(tmp_path, monkeypatch):
    config = write_project(tmp_path, corpus_mb=0.05)
    checkpoints = run_demo(tmp_path, config, monkeypatch)
    assert checkpoints, "the demo recorded no model_checkpoint partition"
    shots = tmp_path / "screenshots"
    with dagster_dev(tmp_path, config) as port:
        graphql(port, "mutation { setNuxSeen }")  # no "Join the Dagster community" dialog over the pages
        base = f"http://127.0.0.1:{port}"
        browser = Browser(tmp_path / "chromium")
        try:
            for group, names in ASSETS.items():  # the asset graph shows every asset
                browser.open(f"{base}/locations/blues/asset-groups/{group}", shows=names)
                browser.screenshot(shots / f"group-{group}.png")

            # The upstream lineage of the latest checkpoint: trained_model, the mixture, the token stores.
            browser.open(f"{base}/assets/model_checkpoint?view=lineage&lineageScope=upstream&lineageDepth=4"
                         f"&partition={checkpoints[-1]}",
                         shows=["trained_model", "merged_dataset", "tokenized_dataset/code", "tokenized_dataset/prose"])
            browser.screenshot(shots / "model_checkpoint-lineage.png")

            browser.open(f"{base}/assets/model_eval", shows=["expert_utilization", checkpoints[-1]])
            browser.wait_for(SHOW_PLOT, "model_eval shows no expert_utilization row to open")
            width, height, alt = browser.wait_for(PLOT, "the expert-utilization <img> never decoded")
            time.sleep(1)  # the dialog fades in
            browser.screenshot(shots / "model_eval-expert_utilization.png")
            assert width > 100 and height > 100 and alt == "expert utilization", (width, height, alt)
        finally:
            browser.close()
    assert all((shots / f"{name}.png").read_bytes().startswith(b"\x89PNG") for name in
               ("group-data", "group-training", "model_checkpoint-lineage", "model_eval-expert_utilization"))
