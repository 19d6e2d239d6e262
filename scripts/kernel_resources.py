"""Registers, stack and spills of every kernel specialisation the PTX tests compile, from ptxas
(through nvJitLink: no GPU needed), and the warps an SM can hold at that register count.

    python scripts/kernel_resources.py                 # run the PTX tests, then print the table
    python scripts/kernel_resources.py tests/test_ptx_halo.py      # only these test files
    python scripts/kernel_resources.py --from REPORT.jsonl         # print a saved report
    python scripts/kernel_resources.py --json OUT.json             # also save the table

The PTX tests assemble each specialisation for sm_90 (tests/ptx_arches.py, ``assemble``); with
``SWR_PTXAS_REPORT`` set they append what ptxas reports to that file, which this script sets,
reads and summarises. "warps/SM (regs)" is the register file's limit alone (65536 registers an
SM, allocated per warp in units of 256): the launch's block size and shared memory can lower it.
A kernel with spill bytes keeps values in local memory (DRAM, through L1/L2).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

REGS_PER_SM = 65536
MAX_WARPS_PER_SM = 64
REG_UNIT = 256  # registers are allocated per warp in units of this many


def warps_per_sm(registers: int) -> int:
    """Resident warps an SM's register file allows at ``registers`` per thread (sm_90)."""
    per_warp = -(-max(registers, 1) * 32 // REG_UNIT) * REG_UNIT
    return min(MAX_WARPS_PER_SM, REGS_PER_SM // per_warp)


def readable(entry: str) -> str:
    """The dotted name inside an Itanium-mangled kernel entry (``_ZN<len><name>...``), without
    Numba's ABI tags; the entry itself when it is not mangled that way."""
    if not entry.startswith("_ZN"):
        return entry
    parts, i = [], 3
    while i < len(entry) and entry[i].isdigit():
        j = i
        while entry[j].isdigit():
            j += 1
        n = int(entry[i:j])
        parts.append(entry[j:j + n])
        i = j + n
    name = ".".join(p for p in parts if p not in ("swr_array", "numba_kernels"))
    return re.sub(r"_3clocals_3e", "<locals>", name) or entry


def load(path: str) -> list[dict]:
    """The report's rows, one per distinct (entry, cc), keeping the last."""
    rows = {}
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                row = json.loads(line)
                rows[(row["entry"], row["cc"])] = row
    return list(rows.values())


def table(rows: list[dict]) -> str:
    out = ["| kernel | cc | registers | warps/SM (regs) | stack B | spill stores B "
           "| spill loads B |", "|---|---|---:|---:|---:|---:|---:|"]
    for r in sorted(rows, key=lambda r: (readable(r["entry"]), r["registers"])):
        out.append(f"| {readable(r['entry'])} | {r['cc']} | {r['registers']} | "
                   f"{warps_per_sm(r['registers'])} | {r['stack']} | {r['spill_stores']} | "
                   f"{r['spill_loads']} |")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("tests", nargs="*", help="PTX test files (default: tests/test_ptx*.py)")
    ap.add_argument("--from", dest="source", metavar="REPORT",
                    help="print a saved report (JSON lines) instead of running the tests")
    ap.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    args = ap.parse_args(argv)
    if args.source:
        path = args.source
    else:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        tests = args.tests or sorted(
            os.path.join("tests", f) for f in os.listdir(os.path.join(root, "tests"))
            if f.startswith("test_ptx") and f.endswith(".py"))
        fd, path = tempfile.mkstemp(prefix="ptxas_", suffix=".jsonl")
        os.close(fd)
        env = dict(os.environ, SWR_PTXAS_REPORT=path)
        env.pop("NUMBA_ENABLE_CUDASIM", None)
        print(f"running the PTX tests ({len(tests)} files); report: {path}", file=sys.stderr)
        rc = subprocess.call([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                              *tests], cwd=root, env=env)
        if rc != 0:
            print(f"the PTX tests failed (exit {rc}); the table holds what was assembled",
                  file=sys.stderr)
    rows = load(path)
    if not rows:
        print("no kernel was assembled", file=sys.stderr)
        return 1
    print(table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([dict(r, name=readable(r["entry"]), warps_per_sm=warps_per_sm(
                r["registers"])) for r in rows], f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
