"""docs/serve.png: the `motfusion serve` playground on a checkpoint after one text-to-image request,
as headless Chromium shows it.

    python benchmarks/serve_screenshot.py [--ckpt runs/demo] [--prompt TEXT] [--n 6] [--out docs/serve.png]

Needs Debian's chromium and chromium-driver (`make debs`) and selenium (requirements-dev.txt); the
browser is the system's, nothing is downloaded. The server runs in this process on a free port.
"""

from __future__ import annotations

import argparse
import threading
from pathlib import Path

from selenium import webdriver
from selenium.webdriver.support.ui import WebDriverWait

from motfusion import MotFusion
from motfusion.serve import make_server

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


def chromium(width: int, height: int) -> webdriver.Chrome:
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--hide-scrollbars"):
        options.add_argument(arg)
    options.add_argument(f"--window-size={width},{height}")
    return webdriver.Chrome(options=options, service=webdriver.ChromeService(CHROMEDRIVER))


def screenshot(url: str, args: argparse.Namespace) -> None:
    driver = chromium(args.width, args.height)
    try:
        driver.get(url)
        wait = WebDriverWait(driver, 300)
        wait.until(lambda d: d.find_element("tag name", "body").get_attribute("data-ready") == "true")
        for name, value in [("prompt", args.prompt), ("n", args.n), ("seed", args.seed)]:
            field = driver.find_element("css selector", f"#t2i-form input[name={name}]")
            field.clear()
            field.send_keys(str(value))
        driver.find_element("css selector", "#t2i-form button").click()
        wait.until(lambda d: len(d.find_elements("css selector", "#t2i-results img")) == args.n)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(args.out))
    finally:
        driver.quit()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", type=Path, default=Path("runs/demo"), help="a run directory or checkpoint")
    p.add_argument("--prompt", default="a small red circle")
    p.add_argument("--n", type=int, default=6, help="images to generate (6 fill a row)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--width", type=int, default=1000)
    p.add_argument("--height", type=int, default=720)
    p.add_argument("--out", type=Path, default=Path("docs/serve.png"))
    args = p.parse_args()
    server = make_server(MotFusion.load(args.ckpt, device="cpu"), port=0, name=str(args.ckpt))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        screenshot(server.url, args)
    finally:
        server.shutdown()
        server.server_close()
    print(args.out)


if __name__ == "__main__":
    main()
