"""JPEG libraries for camera frames: decode (the sampler) and encode (the edge), PIL as the baseline.

Frames are synthetic camera images (bench/capacity.py's ``camera_frame``: gradient, moving shapes,
sensor noise) encoded the way the edge encodes them today (Pillow, quality 90, 4:2:0). For each
library and size:

    decode ms       CPU time of one frame into a preallocated uint8 (H, W, C) slot, one thread (best of 3;
                    thread CPU time, so other jobs on the machine do not inflate it)
    GIL free        share of the decode time another Python thread ran: a pure-Python thread counts while
                    the main thread decodes, with the GIL switch interval at 1 s (so it runs only while
                    the decoder has released the GIL), over its count alone for the same time (a lower
                    bound when the cores are busy with other jobs)
    2 threads x     frames/s with 2 threads over frames/s with 1 (best of 3; about 2 if the library
                    releases the GIL and 2 cores are free, about 1 if it holds it)
    encode ms       CPU time of one (H, W, 3) frame at quality 90, 4:2:0 (ImageEncodingSink's work per camera)
    vs PIL          PIL's time over the library's (higher is faster), same run
    batch           frames/s filling a [64, H, W, 3] batch: decode_image per frame + copy (the sampler's
                    path today) against cloud/frames.FrameDecoder with 0 (calling thread), 1 and 2 workers

Libraries: Pillow, simplejpeg (libjpeg-turbo in the wheel), PyTurboJPEG (needs the system library:
apt-get install libturbojpeg0; PyTurboJPEG 2.x needs libjpeg-turbo >= 3.0, Debian 12 ships 2.1.5, so
there measure PyTurboJPEG 1.x: pip install --target DIR 'PyTurboJPEG<2' and prepend DIR to
PYTHONPATH), torchvision.io (torch's bundled libjpeg-turbo; torch threads = 1).

    python bench/jpeg_decode.py --quick --json bench/results/jpeg_decode.json
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.capacity import camera_frame  # noqa: E402
from bench.report import write_json  # noqa: E402

SIZES = ((224, 224), (480, 640))
QUALITY = 90


def pil_codec():
    from PIL import Image

    def decode(data: bytes, out: np.ndarray) -> None:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            out[...] = np.asarray(img)

    def encode(pixels: np.ndarray) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="JPEG", quality=QUALITY)
        return buf.getvalue()

    return decode, encode


def simplejpeg_codec():
    import simplejpeg

    def decode(data: bytes, out: np.ndarray) -> None:
        simplejpeg.decode_jpeg(data, colorspace="RGB", buffer=out)

    def encode(pixels: np.ndarray) -> bytes:
        return simplejpeg.encode_jpeg(pixels, quality=QUALITY, colorspace="RGB", colorsubsampling="420")

    return decode, encode


def turbojpeg_codec():
    import turbojpeg

    tj = turbojpeg.TurboJPEG()  # raises if libturbojpeg is not installed

    def decode(data: bytes, out: np.ndarray) -> None:
        tj.decode(data, pixel_format=turbojpeg.TJPF_RGB, dst=out)

    def encode(pixels: np.ndarray) -> bytes:
        return tj.encode(pixels, quality=QUALITY, pixel_format=turbojpeg.TJPF_RGB, jpeg_subsample=turbojpeg.TJSAMP_420)

    return decode, encode


def torchvision_codec():
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg, encode_jpeg

    torch.set_num_threads(1)

    def decode(data: bytes, out: np.ndarray) -> None:
        chw = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
        torch.from_numpy(out).copy_(chw.permute(1, 2, 0))

    def encode(pixels: np.ndarray) -> bytes:
        return encode_jpeg(torch.from_numpy(pixels).permute(2, 0, 1).contiguous(), quality=QUALITY).numpy().tobytes()

    return decode, encode


LIBRARIES: dict[str, Callable] = {"pil": pil_codec, "simplejpeg": simplejpeg_codec, "turbojpeg": turbojpeg_codec,
                                  "torchvision": torchvision_codec}


def frames_per_s(decode, blobs: list[bytes], out: np.ndarray, threads: int, seconds: float) -> float:
    """Decode ``blobs`` round-robin on ``threads`` threads for about ``seconds``; frames per second."""
    stop = time.perf_counter() + seconds
    counts = [0] * threads
    start = threading.Barrier(threads + 1)

    def work(k: int) -> None:
        start.wait()
        i, n = k, 0
        while time.perf_counter() < stop:
            decode(blobs[i % len(blobs)], out[i % len(out)])
            i, n = i + threads, n + 1
        counts[k] = n

    pool = [threading.Thread(target=work, args=(k,)) for k in range(threads)]
    for t in pool:
        t.start()
    t0 = time.perf_counter()
    start.wait()
    for t in pool:
        t.join()
    return sum(counts) / (time.perf_counter() - t0)


def gil_free_share(decode, blobs: list[bytes], out: np.ndarray, seconds: float) -> float:
    """Share of decoding time during which another Python thread ran (see the module docstring)."""

    def count_for(stop: threading.Event, counts: list[int]) -> None:
        n = 0
        while not stop.is_set():
            for _ in range(100):
                n += 1
            time.sleep(0)  # hand the GIL back at once if the main thread wants it
        counts.append(n)

    def other_thread_count(work) -> tuple[int, float]:
        stop, counts = threading.Event(), []
        spinner = threading.Thread(target=count_for, args=(stop, counts))
        old = sys.getswitchinterval()
        sys.setswitchinterval(1.0)
        try:
            spinner.start()
            time.sleep(0.01)
            t0 = time.perf_counter()
            work()
            elapsed = time.perf_counter() - t0
            stop.set()
        finally:
            sys.setswitchinterval(old)
        spinner.join()
        return counts[0], elapsed

    def decode_for() -> None:
        stop, i = time.perf_counter() + seconds, 0
        while time.perf_counter() < stop:
            decode(blobs[i % len(blobs)], out[i % len(out)])
            i += 1

    alone, alone_s = other_thread_count(lambda: time.sleep(seconds))
    during, during_s = other_thread_count(decode_for)
    return min(1.0, (during / during_s) / (alone / alone_s))


def cpu_ms(work, items: list, seconds: float) -> float:
    """CPU time of this thread per ``work(item)`` call, in ms (robust to other jobs taking the cores)."""
    n, t0, cpu0 = 0, time.perf_counter(), time.thread_time()
    while time.perf_counter() - t0 < seconds:
        work(items[n % len(items)])
        n += 1
    return 1e3 * (time.thread_time() - cpu0) / n


def max_abs_error(decode, blobs: list[bytes], reference: np.ndarray) -> int:
    out = np.empty_like(reference)
    for i, data in enumerate(blobs):
        decode(data, out[i])
    return int(np.abs(out.astype(np.int16) - reference.astype(np.int16)).max())


BATCH = 64


def batch_rates(blobs: list[bytes], height: int, width: int, seconds: float) -> dict[str, float]:
    """Frames/s filling one [BATCH, H, W, 3] batch (best of 3, wall time): the sampler's path today
    (fleet.codec.decode_image per frame, then a copy into the batch) and cloud/frames.FrameDecoder."""
    from cloud.frames import FrameDecoder
    from fleet.codec import decode_image
    from fleet.types import EncodedImage

    frames = [blobs[i % len(blobs)] for i in range(BATCH)]
    images = [EncodedImage("jpeg", height, width, 3, b) for b in frames]
    out = np.empty((BATCH, height, width, 3), np.uint8)

    def rate(fill) -> float:
        best = 0.0
        for _ in range(3):
            n, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < seconds:
                fill()
                n += 1
            best = max(best, n * BATCH / (time.perf_counter() - t0))
        return best

    def pil_loop() -> None:
        for i, image in enumerate(images):
            out[i] = decode_image(image)

    rates = {"decode_image_loop": rate(pil_loop)}
    for workers in (0, 1, 2):
        with FrameDecoder(workers) as decoder:
            rates[f"FrameDecoder({workers})"] = rate(lambda d=decoder: d.decode_into(frames, out))
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="0.3 s per measurement instead of 1")
    parser.add_argument("--frames", type=int, default=32, help="distinct frames per size")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    seconds = 0.3 if args.quick else 1.0
    load = os.getloadavg()[0]

    codecs = {}
    for name, make in LIBRARIES.items():
        try:
            codecs[name] = make()
        except Exception as exc:  # noqa: BLE001 - a missing optional library is reported, not fatal
            print(f"{name}: unavailable ({exc})", file=sys.stderr)
    pil_decode, pil_encode = codecs["pil"]

    results: dict = {"quality": QUALITY, "cpus": os.cpu_count(), "load_average_1m": load, "sizes": {}}
    for height, width in SIZES:
        rng = np.random.default_rng(0)
        frames = [camera_frame(height, width, t, 0, rng) for t in range(args.frames)]
        blobs = [pil_encode(f) for f in frames]
        reference = np.empty((len(blobs), height, width, 3), np.uint8)
        for i, data in enumerate(blobs):
            pil_decode(data, reference[i])
        out = np.empty((8, height, width, 3), np.uint8)
        rows = {}
        for name, (decode, encode) in codecs.items():
            one = max(frames_per_s(decode, blobs, out, 1, seconds) for _ in range(3))
            two = max(frames_per_s(decode, blobs, out, 2, seconds) for _ in range(3))
            rows[name] = {
                "decode_ms": min(cpu_ms(lambda b: decode(b, out[0]), blobs, seconds) for _ in range(3)),
                "decode_fps_1_thread": one, "decode_fps_2_threads": two, "speedup_2_threads": two / one,
                "gil_free_share": gil_free_share(decode, blobs, out, seconds),
                "encode_ms": min(cpu_ms(encode, frames, seconds) for _ in range(3)),
                "encoded_kb": sum(len(encode(f)) for f in frames) / len(frames) / 1e3,
                "max_abs_diff_vs_pil": max_abs_error(decode, blobs, reference)}
        for row in rows.values():
            row["decode_vs_pil"] = rows["pil"]["decode_ms"] / row["decode_ms"]
            row["encode_vs_pil"] = rows["pil"]["encode_ms"] / row["encode_ms"]
        results["sizes"][f"{height}x{width}x3"] = {"jpeg_kb": sum(map(len, blobs)) / len(blobs) / 1e3,
                                                   "libraries": rows,
                                                   "batch": batch_rates(blobs, height, width, seconds)}

    for size, entry in results["sizes"].items():
        print(f"\n{size}, Pillow q{QUALITY} JPEG of {entry['jpeg_kb']:.1f} kB")
        print(f"{'library':12} {'decode ms':>10} {'vs PIL':>7} {'GIL free':>8} {'2 threads x':>12} {'encode ms':>10} "
              f"{'vs PIL':>7} {'enc kB':>7} {'max |diff|':>10}")
        for name, r in entry["libraries"].items():
            print(f"{name:12} {r['decode_ms']:>10.3f} {r['decode_vs_pil']:>7.2f} {r['gil_free_share']:>8.0%} "
                  f"{r['speedup_2_threads']:>12.2f} "
                  f"{r['encode_ms']:>10.3f} {r['encode_vs_pil']:>7.2f} {r['encoded_kb']:>7.1f} "
                  f"{r['max_abs_diff_vs_pil']:>10}")
        rates = entry["batch"]
        print(f"batch of {BATCH} into [{BATCH}, H, W, 3], frames/s: " + ", ".join(
            f"{name} {fps:.0f} ({fps / rates['decode_image_loop']:.2f}x)" for name, fps in rates.items()))
    print(f"\n{os.cpu_count()} CPUs, load average {load:.1f} at the start: the machine is shared with other jobs, "
          "so absolute times and the 2-thread speed-up are pessimistic; compare the same-run ratios.")
    write_json(args.json, results)


if __name__ == "__main__":
    main()
