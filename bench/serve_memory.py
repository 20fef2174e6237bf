"""Issue 17's memory repro against ``clipkit serve`` at its default limits.

3 concurrent ``/embed/image`` requests of 24 16-bit 4096x4096 RGB PNGs each (JSON, base64);
prints the server's RSS after a warm-up of 24 small images (the baseline: the model loaded),
its peak during the 3 requests (``VmHWM`` after ``/proc/PID/clear_refs``; Linux, own process),
its RSS afterwards, its thread count and the memory lanes from ``/info``. Run:
    flock /tmp/clipkit-bench.lock python bench/serve_memory.py RUN_OR_EXPORT
"""

import base64
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "embed"))
from serve_hostile_helpers import free_port, png16  # noqa: E402

model = sys.argv[1]
port = free_port()
cmd = [sys.executable, "-m", "clipkit.cli", "serve", "--model", model, "--port", str(port)]
proc = subprocess.Popen(cmd)
url = f"http://127.0.0.1:{port}"
try:
    while True:
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            time.sleep(0.3)
    small = base64.b64encode(png16(16, 16, 2)).decode()
    warm = httpx.post(url + "/embed/image", json={"images": [small] * 24}, timeout=600)
    assert warm.status_code == 200
    base = psutil.Process(proc.pid).memory_info().rss
    Path(f"/proc/{proc.pid}/clear_refs").write_text("5")
    img = base64.b64encode(png16(4096, 4096, 2)).decode()
    body = {"images": [img] * 24}
    print("body KiB", len(img) * 24 // 1024)
    t = time.time()

    def one(_: int) -> int:
        return httpx.post(url + "/embed/image", json=body, timeout=900).status_code

    with ThreadPoolExecutor(3) as pool:
        codes = list(pool.map(one, range(3)))
    status = Path(f"/proc/{proc.pid}/status").read_text().splitlines()
    hwm = [int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM")][0]
    after = psutil.Process(proc.pid).memory_info().rss
    threads = psutil.Process(proc.pid).num_threads()
    print(
        f"codes {codes} baseline {base / 2**20:.0f} MiB peak {hwm / 2**20:.0f} MiB "
        f"(+{(hwm - base) / 2**20:.0f}) after {after / 2**20:.0f} MiB threads {threads} "
        f"wall {time.time() - t:.0f} s"
    )
    print(httpx.get(url + "/info").json()["memory"])
finally:
    proc.terminate()
    proc.wait()
