# Source this file (bash): installs the pinned NVRTC wheel from PyPI if it is not there yet and
# puts its lib folder on LD_LIBRARY_PATH, so that cudarc finds libnvrtc.so.12 at run time.
#   CLAYFLOW_NVRTC_DIR  where to install (default: <repo>/target/nvrtc-wheel-<version>)
CLAYFLOW_NVRTC_VERSION=12.9.86
_cf_repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CLAYFLOW_NVRTC_DIR="${CLAYFLOW_NVRTC_DIR:-$_cf_repo/target/nvrtc-wheel-$CLAYFLOW_NVRTC_VERSION}"
_cf_lib="$CLAYFLOW_NVRTC_DIR/nvidia/cuda_nvrtc/lib"
if [ ! -e "$_cf_lib/libnvrtc.so.12" ]; then
    echo "installing nvidia-cuda-nvrtc-cu12==$CLAYFLOW_NVRTC_VERSION into $CLAYFLOW_NVRTC_DIR" >&2
    python3 -m pip install --quiet --disable-pip-version-check --no-deps \
        --target "$CLAYFLOW_NVRTC_DIR" "nvidia-cuda-nvrtc-cu12==$CLAYFLOW_NVRTC_VERSION" >&2 || {
        echo "error: could not install nvidia-cuda-nvrtc-cu12==$CLAYFLOW_NVRTC_VERSION (needs python3 -m pip and PyPI)" >&2
        return 1 2>/dev/null || exit 1
    }
fi
export LD_LIBRARY_PATH="$_cf_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
unset _cf_repo _cf_lib
