"""Compiles a CUDA source with NVRTC for real GPU architectures, as the CUDA backend does at run
time (there for the one device it opens, to PTX), here through to machine code (NVRTC's own
PTX assembler), so that a kernel that does not compile, or uses an instruction an older GPU
lacks, fails on a machine without a GPU. NVRTC comes from NVIDIA's `nvidia-cuda-nvrtc` wheel
(pip install nvidia-cuda-nvrtc) or the library named by FLEXGEN_NVRTC_LIB.

Usage: nvrtc_check.py FILE ARCH...   (ARCH as 75, 90: sm_75, sm_90); exit 1 on any error.
Prints, per architecture, "ok" and the kernels that spill registers to local memory; with
NVRTC_SHOW=name, what ptxas reports of the kernels whose names contain it; with NVRTC_CUBIN=FILE, the machine code in FILE."""
import ctypes
import glob
import os
import re
import sys


def find_lib():
    if os.environ.get("FLEXGEN_NVRTC_LIB"):
        return os.environ["FLEXGEN_NVRTC_LIB"]
    import importlib.util

    spec = importlib.util.find_spec("nvidia")
    roots = list(spec.submodule_search_locations) if spec else []
    libs = sorted(p for r in roots for p in glob.glob(os.path.join(r, "**", "libnvrtc.so.*"), recursive=True)
                  if "builtins" not in p and "alt" not in p)
    if not libs:
        sys.exit("no libnvrtc: pip install nvidia-cuda-nvrtc, or set FLEXGEN_NVRTC_LIB")
    return libs[-1]


def main():
    path, archs = sys.argv[1], sys.argv[2:]
    lib = ctypes.CDLL(find_lib())
    src = open(path, "rb").read()
    failed = False
    for arch in archs:
        prog = ctypes.c_void_p()
        assert lib.nvrtcCreateProgram(ctypes.byref(prog), src, os.path.basename(path).encode(), 0, None, None) == 0
        opts = [f"--gpu-architecture=sm_{arch}".encode(), b"--ptxas-options=-v"]
        # FLEXGEN_NVRTC_DEFINES="NAME=VALUE …": as the executor passes them.
        opts += [f"-D{d}".encode() for d in os.environ.get("FLEXGEN_NVRTC_DEFINES", "").split()]
        rc = lib.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
        n = ctypes.c_size_t()
        lib.nvrtcGetProgramLogSize(prog, ctypes.byref(n))
        log = ctypes.create_string_buffer(n.value)
        lib.nvrtcGetProgramLog(prog, log)
        log = log.value.decode(errors="replace")
        if rc != 0:
            lib.nvrtcDestroyProgram(ctypes.byref(prog))
            failed = True
            errors = [l for l in log.splitlines() if "error" in l.lower()]
            print(f"sm_{arch}: FAILED (nvrtc {rc})\n  " + "\n  ".join(errors[:10]))
            continue
        spills, fn = [], None
        for line in log.splitlines():
            m = re.search(r"Function properties for (\S+)", line)
            if m:
                fn = m.group(1)
            m = re.search(r"(\d+) bytes spill stores", line)
            if m and int(m.group(1)) > 0:
                spills.append(f"{fn} ({m.group(1)} bytes)")
        print(f"sm_{arch}: ok" + (f"; spills: {', '.join(spills)}" if spills else ""))
        # NVRTC_CUBIN=FILE: the machine code written out (of the last architecture), for a
        # disassembler (cuobjdump -sass FILE).
        if os.environ.get("NVRTC_CUBIN"):
            lib.nvrtcGetCUBINSize(prog, ctypes.byref(n))
            cubin = ctypes.create_string_buffer(n.value)
            lib.nvrtcGetCUBIN(prog, cubin)
            open(os.environ["NVRTC_CUBIN"], "wb").write(cubin.raw)
        # NVRTC_SHOW=name: ptxas's registers, shared memory and spills of the kernels so named.
        show = os.environ.get("NVRTC_SHOW")
        if show:
            for line in log.splitlines():
                if "ptxas info" in line and ("Used" in line or "Compiling" in line) or "spill" in line:
                    fn = (re.search(r"'(\S+)'", line) or [None, fn])[1] if "Compiling" in line else fn
                    if fn and show in fn:
                        print("  " + line.strip())
        lib.nvrtcDestroyProgram(ctypes.byref(prog))
    sys.exit(1 if failed else 0)


main()
