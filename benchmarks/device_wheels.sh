#!/usr/bin/env bash
# Downloads, into .whl/ (ignored by git), the cp312 manylinux wheels the device check needs that
# the device image lacks, for `benchmarks/device_check.sh` to install with --no-deps --target.
#
# The image (docs/BENCHMARKS.md, "The device check") has Python 3.12, torch 2.11, transformers
# 5.17, tokenizers 0.23, h5py, mpi4py, xxhash, numpy, safetensors, psutil, py-cpuinfo, msgpack,
# ninja, einops, pyyaml, tqdm, typer and huggingface-hub. It lacks DeepSpeed (and its hjson and
# pydantic), hdf5plugin and python-blosc (umbrella_ds/shards.py imports both), and nibabel
# (data_prep, to pack the synthetic cohorts). transformers travels at our pin, 5.24.0
# (setup.cfg): the check is of the stack we ship, and the image's 5.17 predates APIs the model
# code may use; the image's tokenizers 0.23 satisfies 5.24's requirement, so it stays.
# torch does not travel (2.5 GB): the results record that it is the image's 2.11, not our 2.13.
# hdf5plugin's wheel is 46 MB (twelve HDF5 filters; SZ3 alone is 99 MB unpacked): it is
# slimmed here to the Blosc filter, the only one the shards use (umbrella_ds/shards.py,
# COMPRESSION), and its build config lists only that filter, so its import registers Blosc and
# skips the rest quietly (hdf5plugin/_utils.py register_filter). About 3 MB remain.
# DeepSpeed is published as a source archive only; its wheel is built here, pure Python, with
# no ops compiled (DS_BUILD_OPS=0: they are JIT-built at run time, and ZeRO with torch's Adam
# needs none). Run from the repository root; prints the total size (the tree and the wheels
# travel together, 64 MiB a call).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
mkdir -p .whl
WHEELS=(
  "pydantic==2.14.4" "pydantic-core==2.50.5" "annotated-types==0.7.0" "typing-inspection==0.4.2"
  "hjson==3.1.0" "hdf5plugin==7.1.0" "blosc==1.11.4" "nibabel==5.4.2"
  "importlib-resources==6.5.2" "transformers==5.24.0"
)
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform manylinux1_x86_64 -d .whl "${WHEELS[@]}"
if ! ls .whl/deepspeed-0.19.8-*.whl >/dev/null 2>&1; then
  DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w .whl deepspeed==0.19.8
fi
"$PY" - .whl/hdf5plugin-7.1.0-*.whl <<'PYEOF'
"""Rewrite the hdf5plugin wheel in place with only the filters in KEEP (RECORD regenerated)."""
import base64, hashlib, re, sys, zipfile
KEEP = ("blosc",)
path = sys.argv[1]
with zipfile.ZipFile(path) as z:
    files = {i.filename: z.read(i) for i in z.infolist()}
plugin = re.compile(r"hdf5plugin/plugins/libh5(\w+?)\.so$")
out = {}
for name, data in files.items():
    m = plugin.search(name)
    if (m and m.group(1) not in KEEP) or name.endswith("/RECORD"):
        continue
    if name == "hdf5plugin/_config.py":
        data = re.sub(rb"'embedded_filters': \([^)]*\)",
                      ("'embedded_filters': " + repr(KEEP)).encode(), data)
        assert repr(KEEP).encode() in data, "hdf5plugin/_config.py: embedded_filters not found"
    out[name] = data
record = next(n for n in files if n.endswith(".dist-info/RECORD"))
lines = []
for name, data in out.items():
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    lines.append(f"{name},sha256={digest},{len(data)}")
out[record] = ("\n".join(lines + [f"{record},,"]) + "\n").encode()
with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
    for name, data in out.items():
        z.writestr(name, data)
print(f"{path}: kept filters {KEEP}")
PYEOF
ls -l .whl
du -cb .whl/*.whl | tail -1 | awk '{printf "wheels: %.1f MiB\n", $1 / 1048576}'
