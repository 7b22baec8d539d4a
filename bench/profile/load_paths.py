"""Which way of moving a warm-page-cache file to the GPU is fastest on this machine? A diagnostic for
bench/load.py (anvil's load_all reads shards with parallel pread into a pinned ring at ~6.5 GB/s, while
load_file + .to("cuda") reaches ~8 GB/s). Times, for one shard-sized file:
  pread-1 / pread-N   pread into a pinned buffer, 1 or N threads (no device copy)
  mmap-touch          reading every byte of a fresh mapping (page faults included)
  mmap-to-cuda        torch.frombuffer(mmap) .to("cuda") (the pageable copy load_file + .to() does)
  register-to-cuda    cudaHostRegister(mapping, read-only) then one H2D copy, registration included
  pinned-h2d          H2D from an already pinned buffer (the DMA ceiling)

    python3 bench/profile/load_paths.py [FILE] [--threads 16]
"""
import ctypes
import mmap
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import torch


def timed(label, nbytes, fn, reps=2):
    best = float("inf")
    for _ in range(reps):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    print(f"{label:28} {best:7.3f} s  {nbytes / best / 1e9:6.2f} GB/s", flush=True)


def main():
    path = sys.argv[1] if len(sys.argv) > 1 and not sys.argv[1].startswith("--") else None
    threads = int(sys.argv[sys.argv.index("--threads") + 1]) if "--threads" in sys.argv else 16
    if path is None:
        path = "/tmp/anvil-load-paths.bin"
        if not os.path.exists(path):
            with open(path, "wb") as f:
                for _ in range(16):
                    f.write(os.urandom(256 << 20))
    n = os.path.getsize(path)
    with open(path, "rb") as f:  # warm the page cache
        while f.read(64 << 20):
            pass
    print(f"{path}: {n / 1e9:.2f} GB, {threads} threads")
    pinned = torch.empty(n, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(n, dtype=torch.uint8, device="cuda")
    fd = os.open(path, os.O_RDONLY)
    buf = memoryview(pinned.numpy())

    def pread_all(k):
        step = (n + k - 1) // k

        def part(i):
            lo, hi = i * step, min(n, (i + 1) * step)
            at = lo
            while at < hi:
                at += os.preadv(fd, [buf[at:min(hi, at + (64 << 20))]], at)
        with ThreadPoolExecutor(k) as ex:
            list(ex.map(part, range(k)))

    timed("pread-1 (to pinned)", n, lambda: pread_all(1))
    timed(f"pread-{threads} (to pinned)", n, lambda: pread_all(threads))
    timed("pinned-h2d", n, lambda: dev.copy_(pinned, non_blocking=True))

    def mmap_touch():
        with open(path, "rb") as f:
            m = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
            t = torch.frombuffer(m, dtype=torch.uint8)
            t.sum(dtype=torch.int64)  # reads every byte (multi-threaded)
            del t
            m.close()
    timed("mmap-touch (sum)", n, mmap_touch)

    def mmap_to_cuda():
        with open(path, "rb") as f:
            m = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
            t = torch.frombuffer(m, dtype=torch.uint8)
            dev.copy_(t)
            del t
            m.close()
    timed("mmap-to-cuda (pageable)", n, mmap_to_cuda)

    cudart = torch.cuda.cudart()

    def register_to_cuda():
        with open(path, "rb") as f:
            m = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
            t = torch.frombuffer(m, dtype=torch.uint8)
            ptr = t.data_ptr()
            t0 = time.perf_counter()
            err = cudart.cudaHostRegister(ptr, n, 8)  # cudaHostRegisterReadOnly
            reg = time.perf_counter() - t0
            if int(err) != 0:
                print(f"  cudaHostRegister failed: {err}")
            dev.copy_(t, non_blocking=True)
            torch.cuda.synchronize()
            if int(err) == 0:
                cudart.cudaHostUnregister(ptr)
            print(f"  (registration {reg:.3f} s)")
            del t
            m.close()
    timed("register-to-cuda", n, register_to_cuda)
    os.close(fd)


if __name__ == "__main__":
    main()
