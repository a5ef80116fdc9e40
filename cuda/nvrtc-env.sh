# Source this file (bash): installs the two pinned NVRTC wheels from PyPI if they are not there
# yet, puts the first one's lib folder on LD_LIBRARY_PATH (cudarc finds libnvrtc.so.12 there at
# run time) and names the second one's in CLAYFLOW_PTX_NVRTC_LIB:
#   CLAYFLOW_NVRTC_VERSION      a current NVRTC: the CUBIN compile check (tests/cuda_nvrtc.rs:
#                               registers, no spills with today's ptxas);
#   CLAYFLOW_PTX_NVRTC_VERSION  the oldest CUDA 12 NVRTC: it makes the PTX shipped in the binary
#                               (cuda/kernels/ptx/, see cuda/ptx.sh), whose ISA every CUDA 12
#                               driver can JIT.
#   CLAYFLOW_NVRTC_DIR  where to install (default: <repo>/target)
CLAYFLOW_NVRTC_VERSION=12.9.86
CLAYFLOW_PTX_NVRTC_VERSION=12.0.140
_cf_repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
_cf_install() { # version -> prints the lib folder
    local dir="${CLAYFLOW_NVRTC_DIR:-$_cf_repo/target}/nvrtc-wheel-$1"
    if [ ! -e "$dir/nvidia/cuda_nvrtc/lib/libnvrtc.so.12" ]; then
        echo "installing nvidia-cuda-nvrtc-cu12==$1 into $dir" >&2
        python3 -m pip install --quiet --disable-pip-version-check --no-deps \
            --target "$dir" "nvidia-cuda-nvrtc-cu12==$1" >&2 || {
            echo "error: could not install nvidia-cuda-nvrtc-cu12==$1 (needs python3 -m pip and PyPI)" >&2
            return 1
        }
    fi
    echo "$dir/nvidia/cuda_nvrtc/lib"
}
if _cf_lib=$(_cf_install "$CLAYFLOW_NVRTC_VERSION") \
    && CLAYFLOW_PTX_NVRTC_LIB=$(_cf_install "$CLAYFLOW_PTX_NVRTC_VERSION"); then
    export LD_LIBRARY_PATH="$_cf_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    export CLAYFLOW_PTX_NVRTC_LIB
    unset _cf_repo _cf_lib
    unset -f _cf_install
else
    unset _cf_repo _cf_lib
    unset -f _cf_install
    return 1 2>/dev/null || exit 1
fi
