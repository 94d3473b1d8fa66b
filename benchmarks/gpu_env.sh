# Source this on a GPU machine without network before running a benchmark:
# installs wheels carried in .whl/ (if any) and builds the agent in place.
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || return 1
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD/src:$PYTHONPATH
# setup.py needs a setuptools that reads pyproject.toml's SPDX license (>= 77); an image with an
# older one gets the same library from the compiler directly (the flags are setup.py's)
python3 setup.py -q build_ext --inplace 2>/dev/null ||
    cc -std=c11 -O2 -Wall -Wextra -Wno-format-truncation -fvisibility=hidden -fPIC -shared -Iagent agent/*.c \
        -o src/tally/libtally_agent.so -ldl -lpthread ||
    { echo "agent build failed"; return 1; }
