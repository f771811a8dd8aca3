# Set up lmms-eval and this package on the lent GPU machine (Python 3.12, torch, transformers,
# accelerate, datasets' own dependencies already there; no internet). Source it from the repository
# root, with the ignored folder `.whl` carried along:
#
#   source scripts/gpu_setup.sh
#
# .whl holds lmms-eval 0.7.3 and only the packages it needs that the machine lacks, all pure Python
# (about 6.4 MiB): lmms_eval, datasets, evaluate, dill, multiprocess (py312 build), loguru, tenacity,
# pytz (lmms_eval.utils imports it; pandas 3 no longer brings it), pytablewriter with DataProperty,
# mbstrdecoder, chardet, pathvalidate, tabledata, tcolorpy and typepy. Fetch them here with
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
#     lmms_eval==0.7.3 datasets==5.2.0 evaluate==0.4.6 dill==0.4.1 multiprocess==0.70.19 loguru==0.7.3 \
#     tenacity==9.2.1 pytz==2026.6 pytablewriter==1.2.1 DataProperty==1.1.1 mbstrdecoder==1.1.5 \
#     chardet==6.0.0.post1 pathvalidate==3.3.1 tabledata==1.3.5 tcolorpy==0.1.7 typepy==1.3.5
# (`echo /.whl/ >> .git/info/exclude` first). lmms-eval's other requirements (wandb, openai, av, nltk,
# spacy, ...) are imported only by tasks and models this project does not use.
#
# The install line: the wheels go to /tmp/site (on PYTHONPATH, so child processes of `accelerate
# launch` see them too); this package is installed editable without dependencies (setuptools is
# there), so that lmms-eval finds the plugin through the entry point `lmms_eval.models:
# llava_msd_calibrated` and the code is the travelled source; should python3's environment refuse
# it, a plain install into /tmp/site (with the 21 MB of bundled assets) instead. Then the versions,
# the entry point and an import of the plugin are printed.

# Required on that machine: NVLink multicast off in NCCL, PyTorch and NVSHMEM.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1

python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} && { python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . || python3 -m pip install -q --no-index --no-deps --no-build-isolation --target /tmp/site .; } || { echo "gpu_setup: installing .whl/*.whl or this package failed (is .whl carried, and is this the repository root?)" >&2; return 1 2>/dev/null || exit 1; }

python3 - <<'EOF' || { echo "gpu_setup: the check above failed" >&2; return 1 2>/dev/null || exit 1; }
"""Versions, the plugin's entry point, and each carried package's requirements against what is installed."""
import pathlib
from importlib.metadata import PackageNotFoundError, entry_points, requires, version

import torch
from packaging.requirements import Requirement

print(f"python torch {torch.__version__} (cuda {torch.version.cuda}, {torch.cuda.device_count()} GPUs)")
for name in ("transformers", "accelerate", "lmms_eval", "lmms-msd", "datasets", "huggingface_hub", "pyarrow", "fsspec", "pandas", "numpy"):
    print(f"{name} {version(name)}")
plugins = entry_points(group="lmms_eval.models")
print("lmms_eval.models entry points:", [f"{e.name} = {e.value}" for e in plugins])
assert "llava_msd_calibrated" in plugins.names, "the plugin's entry point is missing: was this package installed?"
# lmms_eval's own requirements are mostly unused here (see the header); check those of the rest.
carried = [p.name.split("-")[0] for p in sorted(pathlib.Path(".whl").glob("*.whl")) if not p.name.startswith("lmms_eval-")]
for dist in carried:
    for text in requires(dist) or []:
        req = Requirement(text)
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        try:
            found = version(req.name)
        except PackageNotFoundError:
            print(f"WARNING: {dist} needs {req}, which is not installed")
            continue
        if not req.specifier.contains(found, prereleases=True):
            print(f"WARNING: {dist} needs {req}, found {req.name} {found}")
import lmms_msd.lmms_eval.plugin  # noqa: E402,F401  (imports lmms_eval's API, datasets and evaluate)

print("gpu_setup: lmms-eval and the plugin import")
EOF
