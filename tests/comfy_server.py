"""A real ComfyUI server with this pack installed, and a headless Chromium to drive its frontend.

For tests that need the whole stack (HTTP routes, the web frontend) rather than ComfyUI imported
in-process::

    from comfy_server import comfy_server, chromium_driver, wait_for_app

    with comfy_server(comfy_path) as server, chromium_driver() as driver:
        driver.get(server.url)
        wait_for_app(driver)

The server runs ``main.py --cpu`` of the given ComfyUI checkout with the current Python (a venv
with that checkout's requirements) in a fresh temporary base directory: its own custom_nodes
(this repository linked in, plus any extra packs), models, input, output, temp and user folders,
and an in-memory database, so nothing is written into the checkout. ``skip_reason`` says why the
stack is unavailable so a test can skip with that sentence.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACK_FOLDER = "comfyui-grounded-forcing"  # the folder name ComfyUI (and its template list) knows the pack by
CHROMIUM = ("/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome")
CHROMEDRIVER = ("/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver")
# Settings of a fresh user that keep first-run dialogs and network lookups out of the way.
QUIET_SETTINGS = {
    "Comfy.TutorialCompleted": True,
    "Comfy.InstalledVersion": "99.0.0",
    "Comfy.Release.Version": "99.0.0",
    "Comfy.Release.Timestamp": 4102444800000,
    "Comfy.Release.Status": "skipped",
    "Comfy.Workflow.ShowMissingModelsWarning": False,
    "Comfy.Validation.Workflows": True,
}


@dataclass(frozen=True)
class ComfyServer:
    """A running server: its ``url`` (no trailing slash), its temporary ``base`` folder and ``log`` file."""

    url: str
    base: Path
    log: Path
    process: subprocess.Popen

    def get(self, route: str, timeout: float = 30.0) -> bytes:
        """The body of ``GET <url><route>``."""
        with urllib.request.urlopen(self.url + route, timeout=timeout) as response:
            return response.read()

    def get_json(self, route: str, timeout: float = 30.0):
        return json.loads(self.get(route, timeout))

    def log_tail(self, chars: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-chars:]


def _binary(candidates: Iterable[str]) -> str | None:
    return next((path for path in candidates if os.access(path, os.X_OK)), None)


def skip_reason(comfy_path: str | None, browser: bool = True) -> str | None:
    """Why the server (and, with ``browser``, Chromium + selenium) cannot run here; None when it can."""
    if not comfy_path:
        return "set GF_COMFYUI_PATH to a ComfyUI checkout (and run with its Python) to test against a live server"
    if not (Path(comfy_path) / "main.py").is_file():
        return f"GF_COMFYUI_PATH={comfy_path} has no main.py; point it at a ComfyUI checkout"
    try:
        import aiohttp  # noqa: F401
    except ImportError:
        return "this Python lacks ComfyUI's requirements (aiohttp); run the test with the ComfyUI venv's Python"
    if browser:
        if _binary(CHROMIUM) is None or _binary(CHROMEDRIVER) is None:
            return "no Chromium + chromedriver found; install Debian's chromium and chromium-driver"
        try:
            import selenium  # noqa: F401
        except ImportError:
            return "selenium is not installed in this Python; pip install selenium"
    return None


# The loaders' model widgets in UI-format workflows: node type -> ((widget index, models folder), ...).
MODEL_WIDGETS = {"GFLoadCausalWanModel": ((0, "diffusion_models"), (2, "loras")), "CLIPLoader": ((0, "text_encoders"),),
                 "VAELoader": ((0, "vae"),)}
NO_FILE = "none"  # a loader's value for "no LoRA"


def workflow_models(paths: Iterable[Path]) -> dict[str, dict[str, bytes]]:
    """Empty model files under the names these UI-format workflows load, for :func:`comfy_server`'s
    ``models`` (so the frontend finds every model a workflow lists)."""
    files: dict[str, dict[str, bytes]] = {}
    for path in paths:
        for node in json.loads(Path(path).read_text())["nodes"]:
            for index, folder in MODEL_WIDGETS.get(node["type"], ()):
                if node["widgets_values"][index] != NO_FILE:
                    files.setdefault(folder, {})[node["widgets_values"][index]] = b""
    return files


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _supports(comfy_path: Path, flag: str) -> bool:
    return flag in (comfy_path / "comfy" / "cli_args.py").read_text()


@contextlib.contextmanager
def comfy_server(
    comfy_path: str | os.PathLike,
    *,
    extra_custom_nodes: Iterable[str | os.PathLike] = (),
    models: dict[str, dict[str, bytes | Path]] | None = None,
    settings: dict | None = None,
    python: str = sys.executable,
    extra_args: Iterable[str] = (),
    timeout_s: float = 180.0,
) -> Iterator[ComfyServer]:
    """Start ``main.py --cpu`` of ``comfy_path`` with this pack installed; yield it; stop it.

    ``models`` maps a model folder (``diffusion_models``, ``loras``, ...) to ``{file name: bytes or a
    path to copy}``; ``settings`` are merged over :data:`QUIET_SETTINGS` into the default user's
    comfy.settings.json. Raises RuntimeError with the server log's tail if it exits or does not
    answer within ``timeout_s``.
    """
    comfy_path = Path(comfy_path).resolve()
    with tempfile.TemporaryDirectory(prefix="gf-comfy-") as tmp:
        base = Path(tmp)
        custom_nodes = base / "custom_nodes"
        custom_nodes.mkdir()
        (custom_nodes / PACK_FOLDER).symlink_to(REPO, target_is_directory=True)
        for pack in extra_custom_nodes:
            pack = Path(pack).resolve()
            (custom_nodes / pack.name).symlink_to(pack, target_is_directory=True)
        for folder, files in (models or {}).items():
            (base / "models" / folder).mkdir(parents=True, exist_ok=True)
            for name, content in files.items():
                target = base / "models" / folder / name
                target.parent.mkdir(parents=True, exist_ok=True)
                if isinstance(content, Path):
                    shutil.copyfile(content, target)
                else:
                    target.write_bytes(content)
        user = base / "user" / "default"
        user.mkdir(parents=True)
        (user / "comfy.settings.json").write_text(json.dumps({**QUIET_SETTINGS, **(settings or {})}))

        port = free_port()
        command = [python, str(comfy_path / "main.py"), "--cpu", "--listen", "127.0.0.1", "--port", str(port),
                   "--base-directory", str(base), "--disable-auto-launch"]
        if _supports(comfy_path, "--database-url"):
            command += ["--database-url", "sqlite:///:memory:"]
        command += list(extra_args)
        env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "HF_HUB_OFFLINE": "1", "DO_NOT_TRACK": "1"}
        log = base / "server.log"
        with open(log, "wb") as log_file:
            process = subprocess.Popen(command, cwd=base, env=env, stdout=log_file, stderr=subprocess.STDOUT)
        server = ComfyServer(url=f"http://127.0.0.1:{port}", base=base, log=log, process=process)
        try:
            _wait_until_up(server, timeout_s)
            yield server
        finally:
            process.terminate()
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _wait_until_up(server: ComfyServer, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"ComfyUI exited with code {server.process.returncode}:\n{server.log_tail()}")
        try:
            server.get("/system_stats", timeout=2)
            return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"ComfyUI did not answer within {timeout_s:.0f} s:\n{server.log_tail()}")


@contextlib.contextmanager
def chromium_driver(width: int = 1600, height: int = 1000):
    """A headless Chromium driven by selenium (Debian's chromedriver), with a fresh profile; quit on exit.

    The page's viewport (``innerWidth`` x ``innerHeight``) is exactly ``width`` x ``height`` CSS pixels.
    """
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    with tempfile.TemporaryDirectory(prefix="gf-chromium-") as profile:
        options = webdriver.ChromeOptions()
        options.binary_location = _binary(CHROMIUM)
        for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                     "--disable-background-networking", "--disable-component-update", "--disable-sync",
                     "--disable-dev-shm-usage", "--hide-scrollbars", f"--window-size={width},{height}",
                     f"--user-data-dir={profile}"):
            options.add_argument(flag)
        options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})  # console, network
        driver = webdriver.Chrome(options=options, service=Service(executable_path=_binary(CHROMEDRIVER)))
        try:
            driver.set_window_size(width, height + 200)
            driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                                   {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})
            yield driver
        finally:
            driver.quit()


def load_workflow(driver, workflow: dict, name: str | None = None) -> None:
    """Load a UI-format workflow in the page as the template browser does (in a tab named ``name``,
    if given); return once it has drawn."""
    driver.execute_async_script("""
        const [workflow, name, done] = arguments;
        app.loadGraphData(workflow, true, true, name).then(() => {
          app.canvas.setDirty(true, true);
          requestAnimationFrame(() => requestAnimationFrame(() => done(true)));
        });""", workflow, name)


def responses(driver) -> dict[str, int]:
    """URL -> HTTP status of every response the page received since the last call (Chrome's network log)."""
    statuses = {}
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.responseReceived":
            response = message["params"]["response"]
            statuses[response["url"]] = response["status"]
    return statuses


def wait_for_app(driver, timeout_s: float = 120.0) -> None:
    """Wait until the frontend has set up ``window.app`` with a graph and the node definitions."""
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, timeout_s, poll_frequency=0.5).until(lambda d: d.execute_script(
        "return !!(window.app && window.app.graph && window.app.canvas"
        " && window.LiteGraph && Object.keys(window.LiteGraph.registered_node_types || {}).length > 0)"))
