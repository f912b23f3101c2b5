#!/usr/bin/env python3
"""Check a folder of wheels meant for the GPU device image (CPython 3.12, linux x86-64).

    python benchmarks/check_gpu_wheels.py .whl [--device-list benchmarks/gpu_device_packages.txt]

Fails (exit 1, naming the wheel and the requirement) unless:
  * every distribution appears exactly once, and every wheel's tags fit cp312 / manylinux x86-64;
  * each wheel's Requires-Python admits 3.12.3;
  * each Requires-Dist (lines with an `extra` marker skipped, other markers evaluated for 3.12 / linux x86-64)
    is met by another carried wheel (name and version specifier), or else by a package of the device image
    (benchmarks/gpu_device_packages.txt) whose recorded version, if any, satisfies the specifier,
    or else is listed in WAIVED below with the reason it is not needed.
Needs only `packaging`.
"""

import argparse
import email.parser
import pathlib
import sys
import zipfile

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name, parse_wheel_filename

PY = "3.12.3"
ENV = {
    "python_version": "3.12",
    "python_full_version": PY,
    "sys_platform": "linux",
    "platform_system": "Linux",
    "platform_machine": "x86_64",
    "os_name": "posix",
    "implementation_name": "cpython",
    "platform_python_implementation": "CPython",
    "implementation_version": PY,
    "extra": "",
}
# Requirements known to be unneeded on the device, as (wheel's distribution, requirement) -> why.
WAIVED = {("diffusers", "importlib-metadata"): "diffusers imports it only on Python < 3.8 (its import_utils.py)"}


def metadata(whl):
    with zipfile.ZipFile(whl) as z:
        name = next(n for n in z.namelist() if n.count("/") == 1 and n.endswith(".dist-info/METADATA"))
        return email.parser.Parser().parsestr(z.read(name).decode())


def tag_ok(tag):
    return (
        tag.interpreter in ("py3", "cp312")
        and tag.abi in ("none", "abi3", "cp312")
        and (tag.platform == "any" or (tag.platform.startswith("manylinux") and tag.platform.endswith("x86_64")))
    )


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    ap.add_argument("wheel_dir")
    ap.add_argument("--device-list", default=pathlib.Path(__file__).with_name("gpu_device_packages.txt"))
    a = ap.parse_args()
    device = {}
    for line in pathlib.Path(a.device_list).read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, ver = line.partition("==")
            device[canonicalize_name(name)] = ver or None
    errors, carried, metas = [], {}, {}
    wheels = sorted(pathlib.Path(a.wheel_dir).glob("*.whl"))
    if not wheels:
        errors.append(f"no wheels in {a.wheel_dir}")
    for whl in wheels:
        name, ver, _, tags = parse_wheel_filename(whl.name)
        if name in carried:
            errors.append(f"{name} appears twice: {carried[name][1]} and {whl.name}")
        carried[name] = (ver, whl.name)
        if not any(tag_ok(t) for t in tags):
            errors.append(f"{whl.name}: no tag fits cp312 / manylinux x86_64")
        metas[whl.name] = metadata(whl)
    for whl, md in metas.items():
        rp = md.get("Requires-Python")
        if rp and not SpecifierSet(rp).contains(PY, prereleases=True):
            errors.append(f"{whl}: Requires-Python {rp} excludes {PY}")
        for line in md.get_all("Requires-Dist") or []:
            req = Requirement(line)
            if req.marker is not None and ("extra" in str(req.marker) or not req.marker.evaluate(ENV)):
                continue
            n, spec = canonicalize_name(req.name), req.specifier
            why = WAIVED.get((canonicalize_name(md["Name"]), n))
            if why and n not in carried:
                print(f"note: {whl}: '{line}' waived: {why}")
            elif n in carried:
                if not spec.contains(carried[n][0], prereleases=True):
                    errors.append(f"{whl}: requires '{line}', but the carried {carried[n][1]} does not satisfy it")
            elif n in device:
                v = device[n]
                if v is not None and not spec.contains(v, prereleases=True):
                    errors.append(f"{whl}: requires '{line}', but the device has {n}=={v}; carry a fitting wheel")
                elif v is None and str(spec):
                    print(f"note: {whl}: '{line}' met by the device's {n} (version not recorded, unchecked)")
            else:
                errors.append(f"{whl}: requires '{line}', neither carried nor on the device; add a pinned wheel")
    for n, (_ver, whl) in sorted(carried.items()):
        if n in device:
            print(f"note: {whl} shadows the device's {n}{'==' + device[n] if device[n] else ''}")
    sys.stdout.flush()
    for e in errors:
        print("ERROR:", e, file=sys.stderr)
    print(f"checked {len(wheels)} wheels: {'FAILED' if errors else 'ok'}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
